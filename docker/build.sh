#!/usr/bin/env bash
# Builds the scoremri image (docker/Dockerfile) with BuildKit.
#
#   docker/build.sh gpu [-t TAG] [-- DOCKER-BUILD-ARGS...]   # official Gadgetron base + torch (CUDA) from PyPI
#   docker/build.sh cpu [-t TAG] [-- DOCKER-BUILD-ARGS...]   # local Debian base + the Gadgetron build + CPU torch
#
# Before the build it stages into docker/stage/ (ignored by git; in the build context, but only the cpu base
# stage copies from it):
#   gadgetron/  (cpu) the relocatable Gadgetron build from $GADGETRON_DIR (default ../shared/gadgetron), with
#               library links that a copy flattened into small text files turned back into symlinks;
#   wheels/     (cpu) the torch wheel $TORCH_WHEEL (default /opt/wheels/torch-2.13.0+cpu-cp311-*.whl) when
#               it exists; otherwise torch comes from $TORCH_INDEX (the CPU index for cpu).
# pip trusts $PIP_CA (default: the host's /etc/ssl/certs/ca-certificates.crt) through the build secret
# `pip-ca`: mounted for the install step only, never in the context or a layer.
# Env: DOCKER (client), DEBIAN_IMAGE, GADGETRON_IMAGE, TORCH_SPEC, TORCH_INDEX, TARGET (scoremri|openrecon).
set -euo pipefail
cd "$(dirname "$0")/.."

flavor=${1:-}
[[ $flavor == cpu || $flavor == gpu ]] || { echo "usage: docker/build.sh cpu|gpu [-t TAG] [-- ARGS...]" >&2; exit 2; }
shift
tag="scoremri:$flavor"
if [[ ${1:-} == -t ]]; then tag=$2; shift 2; fi
[[ ${1:-} == -- ]] && shift

TARGET=${TARGET:-scoremri}
GADGETRON_DIR=${GADGETRON_DIR:-../shared/gadgetron}
PIP_CA=${PIP_CA-/etc/ssl/certs/ca-certificates.crt}

# A BuildKit client: `docker buildx`, else a docker client older than 23 (its built-in BuildKit builder).
build=()
if docker buildx version >/dev/null 2>&1; then
  build=(docker buildx build --load)
else
  for c in ${DOCKER:-docker /usr/bin/docker}; do
    v=$("$c" version -f '{{.Client.Version}}' 2>/dev/null || true)
    if [[ -n $v && ${v%%.*} -lt 23 ]]; then build=(env DOCKER_BUILDKIT=1 "$c" build); break; fi
  done
fi
[[ ${#build[@]} -gt 0 ]] || { echo "build: no BuildKit-capable docker client (install docker-buildx)" >&2; exit 1; }

stage=docker/stage
rm -rf "$stage/gadgetron" "$stage/wheels"
mkdir -p "$stage/wheels"
args=(--build-arg "FLAVOR=$flavor" --target "$TARGET" -f docker/Dockerfile -t "$tag")
if [[ $flavor == cpu ]]; then
  [[ -x $GADGETRON_DIR/bin/gadgetron ]] || { echo "build: no Gadgetron build in $GADGETRON_DIR" >&2; exit 1; }
  cp -a "$GADGETRON_DIR" "$stage/gadgetron"
  chmod -R u+w "$stage/gadgetron"
  # a library link flattened by a copy is a small file holding its target's name: make it a link again
  find "$stage/gadgetron/lib" -maxdepth 1 -type f -size -256c -name '*.so*' -print0 |
    while IFS= read -r -d '' f; do
      t=$(head -c 255 "$f")
      if [[ $t =~ ^[A-Za-z0-9._+-]+$ && -e $(dirname "$f")/$t ]]; then ln -sfn "$t" "$f"; fi
    done
  TORCH_WHEEL=${TORCH_WHEEL:-$(compgen -G "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-*.whl" | head -n 1 || true)}
  if [[ -n $TORCH_WHEEL && -f $TORCH_WHEEL ]]; then
    ln "$TORCH_WHEEL" "$stage/wheels/" 2>/dev/null || cp "$TORCH_WHEEL" "$stage/wheels/"
  fi
  args+=(--build-arg "DEBIAN_IMAGE=${DEBIAN_IMAGE:-local/debian:bookworm}"
         --build-arg "TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}"
         --build-arg "TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
else
  [[ -n ${GADGETRON_IMAGE:-} ]] && args+=(--build-arg "GADGETRON_IMAGE=$GADGETRON_IMAGE")
  [[ -n ${TORCH_SPEC:-} ]] && args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC")
  [[ -n ${TORCH_INDEX:-} ]] && args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
fi
[[ -n $PIP_CA && -s $PIP_CA ]] && args+=(--secret "id=pip-ca,src=$PIP_CA")

echo "build: ${build[*]} ${args[*]} $* ."
nice -n 10 "${build[@]}" "${args[@]}" "$@" .
