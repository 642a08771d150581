#!/usr/bin/env bash
# make docker-check: the Docker deployment built and run for real on this host (CPU image), end to end.
#   1. the local Debian base (docker/make-base.sh; skipped when it exists) and the CPU image (docker/build.sh cpu)
#   2. the image inspected: non-root user, HEALTHCHECK, no secret / host CA certificate / build-only file in
#      any layer (docker save, every layer) or in its environment and history
#   3. docker/compose.yaml (+ docker/compose.check.yaml: 2 s health interval, no restarts) up with
#      docker-compose: Gadgetron + a warm `scoremri serve`; both turn healthy; Gadgetron published on
#      127.0.0.1 only; serve's 9003 not reachable from outside its network namespace
#   4. a simulated noise-free multi-slice raw file sent with the host's gadgetron_ismrmrd_client through the
#      published port, connect mode (scoremri_connect.xml, warm model) twice and execute mode (scoremri.xml)
#      once; every answer equal to `scoremri replay` on the host (max rel diff <= 1e-4, same thread count)
#   5. docker-compose stop/down: serve exits 0 on SIGTERM, nothing of the project is left
#   6. the MRD server (openrecon target, compose service mrd, profile mrd): healthy, published on 127.0.0.1
#      only, a scan with python-ismrmrd-server's client.py equal to replay, exit 0 on SIGTERM, down
#   7. compose.distributed.yaml: the front Gadgetron spreads the slices over two worker Gadgetrons
#      (scoremri_distributed.xml); each worker reconstructs a slice, the images equal replay
# Prints build time, image size, start-up to healthy and seconds per scan.
#
# Env: IMAGE (scoremri:cpu), THREADS (2), SLICES (3), SIZE (128: the 256x256 evaluation slice block-averaged;
# 256 for full size), SCANS (2 warm connect-mode scans), PORT (host port, default a free one), NO_CACHE=1
# (cold build), KEEP=1 (keep the work folder), GADGETRON_DIR (../shared/gadgetron), MRD_IMAGE
# (scoremri-openrecon:cpu), MRD_PORT (default a free one), MRD_CLIENT (../shared/mrd-client/client.py).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

IMAGE=${IMAGE:-scoremri:cpu}
MRD_IMAGE=${MRD_IMAGE:-scoremri-openrecon:cpu}
MRD_CLIENT=${MRD_CLIENT:-$REPO/../shared/mrd-client/client.py}
THREADS=${THREADS:-2}
SLICES=${SLICES:-3}
SIZE=${SIZE:-128}
SCANS=${SCANS:-2}
PROJECT=scoremri-check
PY=$REPO/.venv/bin/python
CLIENT=$REPO/docker/stage/gadgetron/bin/gadgetron_ismrmrd_client
COMPOSE=(docker-compose -p "$PROJECT" -f docker/compose.yaml -f docker/compose.check.yaml)
command -v docker-compose >/dev/null || COMPOSE=(docker compose -p "$PROJECT" -f docker/compose.yaml -f docker/compose.check.yaml)

say() { printf '\n== %s\n' "$*"; }
die() { echo "docker-check: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[[ -x $PY ]] || die "no venv: run make venv first"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd)"
avail=$(df -Pk / | awk 'NR == 2 { print int($4 / 1048576) }')
(( avail >= 8 )) || die "only ${avail} GB free on /: the build needs about 8 GB"

work=$(mktemp -d /tmp/scoremri-docker-check.XXXXXX)
cleanup() {
  local rc=$?
  if (( rc != 0 )); then
    echo "--- container logs (last 40 lines each)" >&2
    "${COMPOSE[@]}" -f docker/compose.distributed.yaml --profile mrd logs --no-color --tail 40 >&2 2>/dev/null || true
  fi
  "${COMPOSE[@]}" -f docker/compose.distributed.yaml --profile mrd down --remove-orphans >/dev/null 2>&1 || true
  if [[ ${KEEP:-0} == 1 || $rc != 0 ]]; then echo "work folder kept: $work" >&2; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------ 1. build
say "1. base image and CPU image"
if [[ $(id -u) == 0 ]]; then docker/make-base.sh; else
  docker image inspect local/debian:bookworm >/dev/null 2>&1 || die "local/debian:bookworm missing: sudo docker/make-base.sh"
fi
t0=$(now)
build_args=(--progress=plain)
[[ ${NO_CACHE:-0} == 1 ]] && build_args+=(--no-cache)
docker/build.sh cpu -t "$IMAGE" -- "${build_args[@]}" >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "image build failed"; }
build_s=$(since "$t0")
steps=$(grep -cE '^#[0-9]+ \[' "$work/build.log" || true)
cached=$(grep -cE '^#[0-9]+ CACHED' "$work/build.log" || true)
size_mb=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f", $1 / 1e6 }')
echo "built $IMAGE in ${build_s} s ($cached of $steps steps from the layer cache), ${size_mb} MB"
[[ -x $CLIENT ]] || die "no staged Gadgetron client at $CLIENT"
[[ -f $MRD_CLIENT ]] || die "no python-ismrmrd-server client at $MRD_CLIENT (MRD_CLIENT=...)"

# ------------------------------------------------------------------------------------------------ 2. inspect
say "2. image: user, health check, layers"
"$PY" docker/check.py layers "$IMAGE" || die "the image carries something it must not (above)"
docker run --rm --entrypoint id "$IMAGE" -u | grep -qx 10001 || die "the image does not run as uid 10001"
docker run --rm "$IMAGE" python -c 'import sysconfig, pathlib, sys
p = pathlib.Path(sysconfig.get_paths()["purelib"]) / "scoremri-gadgetron.pth"
sys.exit(0 if p.is_file() else f"no {p}")' || die "gadgetron-python's start-up patch is not installed"
echo "runs as uid 10001; scoremri-gadgetron.pth (gadgetron-python start-up patch) in site-packages"

# ------------------------------------------------------------------------------------------------ 3. up
say "3. docker-compose up: Gadgetron + warm scoremri serve"
PORT=${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export SCOREMRI_IMAGE=$IMAGE GADGETRON_PORT=$PORT OMP_NUM_THREADS=$THREADS SCANNER_IP=127.0.0.1
"${COMPOSE[@]}" down --remove-orphans >/dev/null 2>&1 || true
t0=$(now)
"${COMPOSE[@]}" up -d >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; die "docker-compose up failed"; }
cid_g=$("${COMPOSE[@]}" ps -q gadgetron)
cid_s=$("${COMPOSE[@]}" ps -q scoremri)
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1"; }
declare -A healthy_at=()
while :; do
  for c in "$cid_g" "$cid_s"; do
    [[ -z ${healthy_at[$c]:-} && $(health "$c") == healthy ]] && healthy_at[$c]=$(since "$t0")
  done
  [[ -n ${healthy_at[$cid_g]:-} && -n ${healthy_at[$cid_s]:-} ]] && break
  [[ $(docker inspect -f '{{.State.Running}}' "$cid_g") == true && $(docker inspect -f '{{.State.Running}}' "$cid_s") == true ]] \
    || die "a container stopped while starting"
  awk -v t="$(since "$t0")" 'BEGIN { exit !(t > 600) }' && die "not healthy after 600 s"
  sleep 0.5
done
up_s=$(since "$t0")
echo "healthy: scoremri serve after ${healthy_at[$cid_s]} s, gadgetron (with serve behind it) after ${healthy_at[$cid_g]} s"
"${COMPOSE[@]}" ps

# published ports: Gadgetron on 127.0.0.1 only; serve nowhere
ports_g=$(docker port "$cid_g")
ports_s=$(docker port "$cid_s")
echo "published: gadgetron: ${ports_g//$'\n'/; }  scoremri: ${ports_s:-none}"
[[ $ports_g == "9002/tcp -> 127.0.0.1:$PORT" ]] || die "gadgetron published as '$ports_g', expected 127.0.0.1:$PORT only"
[[ -z $ports_s ]] || die "scoremri serve is published: $ports_s"
ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$cid_g")
if (exec 3<>"/dev/tcp/$ip/9003") 2>/dev/null; then die "serve's port 9003 answers on the container address $ip"; fi
(exec 3<>"/dev/tcp/$ip/9002") 2>/dev/null || die "Gadgetron does not answer on $ip:9002"
echo "scoremri serve 9003: refused on the container address $ip (loopback of Gadgetron's namespace only)"

# ------------------------------------------------------------------------------------------------ 4. scans
say "4. scans through the published port (host gadgetron_ismrmrd_client)"
src=$("$PY" -c 'import dipy.data, os; print(os.path.join(os.path.dirname(dipy.data.__file__), "files", "t1_coronal_slice.npy"))')
"$PY" docker/check.py downsample "$src" "$work/slice.npy" $(( 256 / SIZE ))
"$REPO/.venv/bin/scoremri" simulate "$work/slice.npy" -o "$work/raw.h5" --sigma 0 --slices "$SLICES" \
  --noise-samples 0 --log-level WARNING
echo "raw: $SLICES slices ${SIZE}x${SIZE}, 8 coils, x4, noise-free (no noise scans: this Gadgetron has no storage server)"
scan() {  # scan CONFIG OUT -> seconds
  local t
  t=$(now)
  (cd "$work" && timeout 900 "$CLIENT" -a 127.0.0.1 -p "$PORT" -f raw.h5 -c "$1" -o "$2" -G out >>client.log 2>&1) \
    || { tail -n 20 "$work/client.log" >&2; die "gadgetron_ismrmrd_client failed ($1)"; }
  since "$t"
}
secs=()
for i in $(seq 1 "$SCANS"); do
  s=$(scan scoremri_connect.xml "connect$i.h5")
  secs+=("$s")
  echo "connect mode scan $i: $s s"
done
exec_s=$(scan scoremri.xml execute.h5)
echo "execute mode scan (Python started and model loaded for the scan): $exec_s s"
hjson=$(docker exec "$cid_s" scoremri serve --check --port 9003)
echo "serve health: $hjson"
"$PY" - "$hjson" "$SCANS" <<'EOF' || die "serve's health does not show $SCANS scans on one model load"
import json, sys
h = json.loads(sys.argv[1]); n = int(sys.argv[2])
sys.exit(0 if h["model_loads"] == 1 and h["scans_done"] == n and h["scans_failed"] == 0 else 1)
EOF

say "reference: scoremri replay on the host (OMP_NUM_THREADS=$THREADS)"
t0=$(now)
(cd "$work" && OMP_NUM_THREADS=$THREADS OMP_WAIT_POLICY=PASSIVE nice -n 10 "$REPO/.venv/bin/scoremri" replay raw.h5 \
   -o ref.h5 -G ref --pipeline "$REPO/pipelines/scoremri_connect.xml" --no-progress --log-level WARNING)
replay_s=$(since "$t0")
echo "replay: $replay_s s"
for f in $(seq -f "connect%g.h5" 1 "$SCANS") execute.h5; do
  "$PY" docker/check.py compare "$work/$f" out "$work/ref.h5" ref --tol 1e-4 || die "$f differs from replay"
done

# ------------------------------------------------------------------------------------------------ 5. down
say "5. docker-compose stop / down"
"${COMPOSE[@]}" stop >/dev/null 2>&1
code_s=$(docker inspect -f '{{.State.ExitCode}}' "$cid_s")
code_g=$(docker inspect -f '{{.State.ExitCode}}' "$cid_g")
echo "exit codes after SIGTERM: scoremri serve $code_s, gadgetron $code_g"
[[ $code_s == 0 ]] || die "scoremri serve exited $code_s on SIGTERM"
docker logs "$cid_s" 2>&1 | grep -q "scoremri serve stopped" || die "serve did not log its stop"
"${COMPOSE[@]}" down --remove-orphans >/dev/null 2>&1
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
[[ -z $left ]] || die "left after down: $left"
echo "nothing of project $PROJECT left (containers, networks)"

# ------------------------------------------------------------------------------------------------ 6. MRD
say "6. MRD server: the openrecon target, compose service mrd, python-ismrmrd-server's client.py"
t0=$(now)
TARGET=openrecon docker/build.sh cpu -t "$MRD_IMAGE" -- --progress=plain >"$work/build-mrd.log" 2>&1 \
  || { tail -n 40 "$work/build-mrd.log" >&2; die "openrecon build failed"; }
echo "built $MRD_IMAGE in $(since "$t0") s (the shared stages from the cache)"
MRD_PORT=${MRD_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$work/config"
export SCOREMRI_MRD_IMAGE=$MRD_IMAGE MRD_PORT SCOREMRI_CONFIG_DIR=$work/config
t0=$(now)
"${COMPOSE[@]}" --profile mrd up -d mrd >"$work/up-mrd.log" 2>&1 || { cat "$work/up-mrd.log" >&2; die "mrd up failed"; }
cid_m=$("${COMPOSE[@]}" --profile mrd ps -q mrd)
until [[ $(health "$cid_m") == healthy ]]; do
  [[ $(docker inspect -f '{{.State.Running}}' "$cid_m") == true ]] || die "the MRD container stopped while starting"
  awk -v t="$(since "$t0")" 'BEGIN { exit !(t > 600) }' && die "MRD server not healthy after 600 s"
  sleep 0.5
done
mrd_up_s=$(since "$t0")
ports_m=$(docker port "$cid_m")
echo "healthy after $mrd_up_s s; published: ${ports_m//$'\n'/; }"
[[ $ports_m == "9002/tcp -> 127.0.0.1:$MRD_PORT" ]] || die "mrd published as '$ports_m', expected 127.0.0.1:$MRD_PORT only"
t0=$(now)
(cd "$work" && timeout 900 "$PY" "$MRD_CLIENT" -a 127.0.0.1 -p "$MRD_PORT" -c fast -o mrd.h5 -G out raw.h5 >mrd-client.log 2>&1) \
  || { tail -n 20 "$work/mrd-client.log" >&2; die "client.py failed"; }
mrd_s=$(since "$t0")
echo "MRD scan (client.py -c fast): $mrd_s s"
grep -q "ERR" "$work/mrd-client.log" && { grep "ERR" "$work/mrd-client.log" >&2; die "the MRD server sent ERR lines"; }
"$PY" docker/check.py compare "$work/mrd.h5" out "$work/ref.h5" ref --tol 1e-4 || die "the MRD server's images differ from replay"
"${COMPOSE[@]}" --profile mrd stop mrd >/dev/null 2>&1
code_m=$(docker inspect -f '{{.State.ExitCode}}' "$cid_m")
echo "exit code after SIGTERM: MRD server $code_m"
[[ $code_m == 0 ]] || die "the MRD server exited $code_m on SIGTERM"
"${COMPOSE[@]}" --profile mrd down --remove-orphans >/dev/null 2>&1
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
[[ -z $left ]] || die "left after down: $left"
echo "nothing of project $PROJECT left"

# ------------------------------------------------------------------------------------------------ 7. distributed
say "7. distributed: compose.distributed.yaml, the front Gadgetron and two worker Gadgetrons"
cat >"$work/compose.check-workers.yaml" <<'YAML'
services:
  worker1: {restart: "no", healthcheck: {interval: 2s}}
  worker2: {restart: "no", healthcheck: {interval: 2s}}
YAML
DIST=("${COMPOSE[@]}" -f docker/compose.distributed.yaml -f "$work/compose.check-workers.yaml")
t0=$(now)
"${DIST[@]}" up -d >"$work/up-dist.log" 2>&1 || { cat "$work/up-dist.log" >&2; die "distributed up failed"; }
cids=()
for svc in gadgetron scoremri worker1 worker2; do cids+=("$("${DIST[@]}" ps -q "$svc")"); done
for c in "${cids[@]}"; do
  until [[ $(health "$c") == healthy ]]; do
    [[ $(docker inspect -f '{{.State.Running}}' "$c") == true ]] || die "a container of the distributed set stopped"
    awk -v t="$(since "$t0")" 'BEGIN { exit !(t > 600) }' && die "distributed set not healthy after 600 s"
    sleep 0.5
  done
done
dist_up_s=$(since "$t0")
for w in "${cids[@]:2}"; do
  [[ -z $(docker port "$w") ]] || die "a worker is published: $(docker port "$w")"
done
echo "front, serve and two workers healthy after $dist_up_s s; workers not published"
dist_s=$(scan scoremri_distributed.xml distributed.h5)
echo "distributed scan: $dist_s s"
"$PY" docker/check.py compare "$work/distributed.h5" out "$work/ref.h5" ref --tol 1e-4 --skip image_index \
  || die "the distributed images differ from replay"
front_log=$(docker logs "${cids[0]}" 2>&1)
[[ $(grep -c "Connecting to peer: worker" <<<"$front_log") -ge 2 ]] || die "the front did not connect to the workers"
done_w=()
for w in "${cids[@]:2}"; do
  done_w+=("$(docker logs "$w" 2>&1 | grep -oE "image sent: slice [0-9]+" | awk '{ print $4 }' | sort -n | paste -sd, -)")
done
echo "slices reconstructed: worker1 [${done_w[0]}], worker2 [${done_w[1]}]"
[[ -n ${done_w[0]} && -n ${done_w[1]} ]] || die "each worker must reconstruct a slice"
"${DIST[@]}" down --remove-orphans >/dev/null 2>&1
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
[[ -z $left ]] || die "left after down: $left"
echo "nothing of project $PROJECT left"

mean=$(printf '%s\n' "${secs[@]}" | awk '{ s += $1 } END { printf "%.1f", s / NR }')
say "docker-check: PASS (busy shared host: timings are indicative)"
printf '  %-34s %s\n' \
  "build time" "${build_s} s ($cached of $steps steps cached)" \
  "image size ($IMAGE)" "${size_mb} MB" \
  "start-up to healthy" "${up_s} s (serve ${healthy_at[$cid_s]} s, model load + warm-up included)" \
  "seconds per scan (warm, connect)" "${mean} s for $SLICES slices ${SIZE}x${SIZE} ($(awk -v m="$mean" -v n="$SLICES" 'BEGIN { printf "%.1f", m / n }') s/slice; scans: ${secs[*]})" \
  "seconds per scan (execute mode)" "${exec_s} s" \
  "MRD server: start-up to healthy" "${mrd_up_s} s" \
  "MRD server: seconds per scan" "${mrd_s} s (client.py -c fast)" \
  "distributed (2 workers): healthy" "${dist_up_s} s" \
  "distributed: seconds per scan" "${dist_s} s (execute mode on the workers: Python + model per slice)" \
  "scoremri replay on the host" "${replay_s} s (nice 10)" \
  "threads" "OMP_NUM_THREADS=$THREADS in the containers and for replay"
