#!/usr/bin/env bash
# Debian packages the tests and benchmarks use as independent references:
#   bart (0.8)         BART: ecalib / pics baselines
#   ismrmrd-tools      ismrmrd_generate_cartesian_shepp_logan test files
#   dicom3tools        dciodvfy: validates the DICOM files replay --dicom writes
#   dcm2niix           converts them to NIfTI: the independent check of their geometry
# Options (any combination):
#   --train   mricron-data: inia19-t1-brain.nii.gz, one of the two training volumes
#   --bench   insighttoolkit5-examples: the REPORT set of benchmarks/quality.py (ITK T1 head, mid-sagittal
#             brain, abdomen), which scripts/gpu_pack.py packs too; --quick (make bench) needs only the TUNE set
set -euo pipefail
pkgs=(bart ismrmrd-tools dicom3tools dcm2niix)
for arg in "$@"; do
  case "$arg" in
    --train) pkgs+=(mricron-data) ;;
    --bench) pkgs+=(insighttoolkit5-examples) ;;
    *) echo "system-deps: unknown option '$arg' (known: --train, --bench)" >&2; exit 2 ;;
  esac
done
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "system-deps: need root (or sudo) to apt-get install: ${missing[*]}" >&2; exit 1; fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
