#!/usr/bin/env bash
# The one prepared GPU call of issue 10 (steps in scripts/README.md): train the default prior, publish it, measure
# it beside the shipped one, print one table -- all inside 9 minutes, everything into $OUT.
#
#   scripts/gpu_run.sh             on the lent GPU: reads gpu_pack/ (scripts/gpu_pack.py), writes $OUT
#   scripts/gpu_run.sh --dry-run   on CPU: the same stages with a tiny network, a few steps, small sizes
#                                  (tests/scripts/test_gpu_run.py runs it in CI)
#
# Environment: OUT (default gpu_out/), GPU_PACK (default gpu_pack/), PYTHON (default python3),
# GPU_RUN_BUDGET_S (whole call, default 540), GPU_RUN_TRAIN_S (training + publishing, default 330),
# GPU_RUN_DEVICE (default cuda; cpu only to rehearse the real settings for their time guards).
# Files in $OUT (at most 8 come back from the device): default.safetensors + default.json (fp16 EMA weights and
# card, rewritten every minute), loss.png, samples.png, measure.json, table.md, log.txt.
# A stage that fails or runs out of time does not stop the next; weights already written stay.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
DRY=0
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | grep '^#' | cut -c3-; exit 0 ;;
    *) echo "gpu_run.sh: unknown option '$a' (--dry-run, --help)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$REPO/gpu_out}
PACK=${GPU_PACK:-$REPO/gpu_pack}
PY=${PYTHON:-python3}
mkdir -p "$OUT" || exit 2
LOG=$OUT/log.txt
: >"$LOG"
T0=$(date +%s)
if [[ $DRY == 1 ]]; then
  BUDGET=${GPU_RUN_BUDGET_S:-240}
  TRAIN_S=${GPU_RUN_TRAIN_S:-120}
  COMMON=(--dry-run --device cpu --threads 1)  # small ops: more threads only contend on a shared CPU
  TRAIN=(--size tiny --batch 2 --crop 32 --steps 4 --warmup 2 --log-every 1 --save-every-s 0
         --compile-backend aot_eager --sample-size 16 --sample-steps 3)
  MEASURE=(--set sampler.steps=2 --k 2 --paper-steps 2 --paper-priors 1 --speed 48x48x4 --net-res 32 --series 3
           --reps 2 --compile-backend aot_eager --compile-cells 1 --compile-need-s 5 --slice-s 1)
else
  BUDGET=${GPU_RUN_BUDGET_S:-540}
  TRAIN_S=${GPU_RUN_TRAIN_S:-330}
  COMMON=(--device "${GPU_RUN_DEVICE:-cuda}")
  TRAIN=()
  MEASURE=()
fi

say() { echo "[gpu_run $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# stage NAME SECONDS ARGS...: one python stage under a hard limit, its output also into log.txt
stage() {
  local name=$1 limit=$2
  shift 2
  if (( limit < 5 )); then say "$name: no time left, skipped"; return 124; fi
  say "$name: at most ${limit}s"
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$PY" scripts/gpu_run.py "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "$name: exit $rc"
  return "$rc"
}

# The lent machine has no scoremri install (and no registry): import the layers from this tree as the
# 'scoremri' namespace, as setup.py maps them. ismrmrd, gadgetron, nibabel, nilearn, dipy are absent there, so
# the run must not import them: the dry run forbids them too.
export SCOREMRI_FORBID_IMPORTS=ismrmrd,gadgetron,nibabel,nilearn,dipy
if [[ $DRY == 1 ]] || ! "$PY" -c "import scoremri.recon.api, scoremri.model.ncsnpp" 2>/dev/null; then
  NS=$(mktemp -d)
  mkdir -p "$NS/scoremri"
  for d in gadget recon model pipelines; do ln -s "$REPO/$d" "$NS/scoremri/$d"; done
  export PYTHONPATH=$NS${PYTHONPATH:+:$PYTHONPATH}
fi

say "start: dry-run=$DRY budget ${BUDGET}s (training ${TRAIN_S}s), pack $PACK, out $OUT"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  du -sh "$PACK" 2>/dev/null; } 2>&1 | tee -a "$LOG"

# 1. train (+ publish: weights and card every minute, loss curve and sample grid at the end)
elapsed=$(( $(date +%s) - T0 ))
stage train $(( TRAIN_S - elapsed )) train "${COMMON[@]}" --pack "$PACK" --out "$OUT" \
  --deadline $(( T0 + TRAIN_S - 25 )) ${TRAIN[@]+"${TRAIN[@]}"}
train_rc=$?
# 2. measure, new prior beside the shipped one, until 20 s before the end
elapsed=$(( $(date +%s) - T0 ))
stage measure $(( BUDGET - 10 - elapsed )) measure "${COMMON[@]}" --pack "$PACK" --out "$OUT" \
  --deadline $(( T0 + BUDGET - 20 )) ${MEASURE[@]+"${MEASURE[@]}"}
measure_rc=$?
say "train exit $train_rc, measure exit $measure_rc; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
# 3. the one table, printed last
PYTHONUNBUFFERED=1 timeout -k 5 30 "$PY" scripts/gpu_run.py table "${COMMON[@]}" --pack "$PACK" --out "$OUT" 2>&1 \
  | tee -a "$LOG"
table_rc=${PIPESTATUS[0]}
[[ -s $OUT/default.safetensors && $table_rc == 0 ]]
