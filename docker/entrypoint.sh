#!/usr/bin/env bash
# Entrypoint of the scoremri image.
#   (no arguments) | gadgetron [GADGETRON-OPTIONS...] | -OPTION...   ->  the Gadgetron server, with defaults:
#       -p $GADGETRON_PORT (9002), -W $HOME/gadgetron (the non-root user's working folder), and, where the image
#       has no storage server (mrd-storage-server: the cpu flavour), -d true (NoiseAdjust then cannot keep a
#       noise covariance between a noise prescan and its scan: send noise scans with the scan's data).
#   anything else (scoremri serve ..., scoremri replay ..., bash)     ->  run as given.
set -euo pipefail

if [[ $# -eq 0 || $1 == gadgetron || $1 == -* ]]; then
  [[ ${1:-} == gadgetron ]] && shift
  args=("$@")
  has() { local a o; for a in "${args[@]}"; do for o in "$@"; do [[ $a == "$o" || $a == "$o"=* ]] && return 0; done; done; return 1; }
  has -p --port || args+=(-p "${GADGETRON_PORT:-9002}")
  if ! has -W --dir; then
    mkdir -p "$HOME/gadgetron"
    args+=(-W "$HOME/gadgetron")
  fi
  if ! has -d --disable_storage -E --storage_address && ! command -v mrd-storage-server >/dev/null; then
    echo "scoremri-entrypoint: no storage server in this image: Gadgetron runs with -d true" >&2
    args+=(-d true)
  fi
  exec gadgetron "${args[@]}"
fi
exec "$@"
