#!/usr/bin/env bash
# The GPU check: every figure a reviewer needs from one CUDA machine, in one short run.
#
#   bash bench/gpu_check.sh [--quick]        (OUT=DIR sets the output directory; default gpu_check_out)
#
# Six independent parts, each under its own `timeout`, each writing OUT/<part>.json the moment it ends
# (OUT/<part>.log keeps its output). A part that fails or times out is recorded and the next one runs;
# OUT/summary.json lists every part's status and seconds at the end. Budget: the limits below add up
# to 440 s (+5 s grace each), under 8 minutes; with --quick to 200 s, under 4.
# Without a CUDA device every part writes {"skipped": "no CUDA device"}
# and the script exits 0; otherwise it exits 1 when any part failed or timed out.
#   train_step     ResNet-50 bf16 step, engine vs plain PyTorch loop (bench/train_step_gpu.py)
#   pairwise       pairwise losses fwd+bwd, n=16384, d=512, bf16: Triton vs GEMM floor vs PML (bench/losses.py)
#   classifier     fused CE / Proxy-Anchor at C=1e5 vs F.linear+F.cross_entropy / PML, C=1e6 alone (bench/classifier.py)
#   evaluation     exact 60k x 512 evaluation, faiss-gpu vs torch.mm + top-k (bench/evaluation_gpu.py)
#   data_pipeline  DALI mixed decode + augment vs the torchvision loader (bench/data_pipeline_gpu.py)
#   smoke          20 steps each of DDP (NCCL), DeepSpeed ZeRO-1, torch.compile (bench/smoke_gpu.py)
# The repository runs uninstalled (PYTHONPATH=.). Every part needs torch; the parts that import unidml
# also need its core dependencies (omegaconf, PyYAML, numpy, ...); a part whose import fails records the
# error in its JSON. Missing optional libraries (faiss, DALI, DeepSpeed, PML) are recorded as skips.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
QUICK=""
case "${1:-}" in
  "") ;;
  --quick) QUICK="--quick" ;;
  *) echo "usage: bash bench/gpu_check.sh [--quick]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python}"

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$CUDA" = 1 ]; then
  { "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    nvidia-smi 2>&1; } > "$OUT/env.txt"
fi

STATUS=()   # one "name status seconds" per part, for the summary
FAILED=0

# part NAME SECONDS QUICK_SECONDS COMMAND...: run COMMAND under its timeout; make sure OUT/NAME.json exists.
part() {
  local name=$1 limit=$2 quick_limit=$3
  shift 3
  local json="$OUT/$name.json"
  rm -f "$json"
  if [ "$CUDA" != 1 ]; then
    echo '{"part": "'"$name"'", "skipped": "no CUDA device"}' > "$json"
    STATUS+=("$name skipped 0")
    return
  fi
  [ -n "$QUICK" ] && limit=$quick_limit
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS rc=0
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - start)) state=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    state=timed_out
  elif [ "$rc" != 0 ]; then
    state=failed
  fi
  if [ ! -s "$json" ]; then
    echo '{"part": "'"$name"'", "failed": "exit status '"$rc"' ('"$state"') before writing its JSON; see '"$name"'.log"}' > "$json"
    [ "$state" = ok ] && state=failed
  fi
  [ "$state" = ok ] || FAILED=1
  STATUS+=("$name $state $took")
  tail -n 3 "$OUT/$name.log"
}

part train_step 70 30 "$PY" bench/train_step_gpu.py $QUICK --out "$OUT"
part pairwise 95 45 "$PY" bench/losses.py --device cuda --n 16384 --d 512 --json "$OUT/pairwise.json"
part classifier 95 45 "$PY" bench/classifier.py --device cuda --json "$OUT/classifier.json"
part evaluation 45 20 "$PY" bench/evaluation_gpu.py $QUICK --out "$OUT"
part data_pipeline 45 20 "$PY" bench/data_pipeline_gpu.py $QUICK --out "$OUT"
part smoke 90 40 "$PY" bench/smoke_gpu.py $QUICK --out "$OUT"

{
  echo "{"
  echo '  "cuda": '"$([ "$CUDA" = 1 ] && echo true || echo false)"', "quick": '"$([ -n "$QUICK" ] && echo true || echo false)"','
  echo '  "parts": ['
  for i in "${!STATUS[@]}"; do
    read -r name state took <<< "${STATUS[$i]}"
    sep=","; [ "$i" = $(( ${#STATUS[@]} - 1 )) ] && sep=""
    echo '    {"part": "'"$name"'", "status": "'"$state"'", "seconds": '"$took"', "json": "'"$name"'.json"}'"$sep"
  done
  echo "  ]"
  echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
exit $FAILED
