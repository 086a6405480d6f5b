#!/usr/bin/env bash
# GPU-side check of the loss kernels, run on a CUDA machine with torch + triton (pytorch-metric-learning
# optional). Writes everything under $OUT (default: ./gpu_check_out):
#   1. compiled Triton vs reference, value and gradient, fp32 and bf16 (verify_*.txt; fails the script
#      on a mismatch);
#   2. forward+backward time and peak memory at n=16384, d=512, bf16: triton vs reference vs PML
#      (losses_16k.md / .json / .png);
#   3. n=65536 runs through the Triton kernels (losses_64k.md / .json); 3b. fused classifier CE at
#      n=16384, C=10^6, bf16 vs F.linear + F.cross_entropy (classifier_1m.md / .json);
#   4. the ResNet-50 bf16 train-step timing (bench/train_step_gpu.py, when present).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"

python -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
nvidia-smi >> "$OUT/env.txt" 2>&1 || true

BACKENDS="triton reference"
if python -c "import pytorch_metric_learning" 2>/dev/null; then
  BACKENDS="$BACKENDS pml"
else
  echo "pytorch-metric-learning not installed: PML columns skipped" | tee -a "$OUT/env.txt"
fi

# 1. Correctness of the compiled kernels (the CPU tests only ran them under TRITON_INTERPRET=1).
status=0
for dtype in float32 bfloat16; do
  python bench/losses.py --verify --device cuda --dtype "$dtype" --backends triton tiled \
    > "$OUT/verify_$dtype.txt" 2>&1 || status=1
done
cat "$OUT"/verify_*.txt

# 2. Timing and memory at n = 16384 (includes Triton compilation in a warm-up before timing).
python bench/losses.py --device cuda --dtype bfloat16 --sizes 16384 --reps 5 \
  --losses contrastive contrastive_dense multi_similarity supcon snca triplet --backends $BACKENDS \
  --json "$OUT/losses_16k.json" --plot "$OUT/losses_16k.png" > "$OUT/losses_16k.md"
cat "$OUT/losses_16k.md"

# 3. n = 65536 through the fused kernels (never an n x n matrix).
python bench/losses.py --device cuda --dtype bfloat16 --sizes 65536 --reps 3 \
  --losses contrastive contrastive_dense multi_similarity supcon snca triplet --backends triton \
  --json "$OUT/losses_64k.json" > "$OUT/losses_64k.md"
cat "$OUT/losses_64k.md"

# 3b. Fused classifier cross-entropy at n = 16384, d = 512, C = 10^6, bf16: Triton vs F.linear + F.cross_entropy
#     (the materialised logits alone are 16384 x 10^6 bf16 = 32 GB; the baseline may run out of memory).
python bench/classifier.py --device cuda --dtype bfloat16 --n 16384 --classes 1000000 --reps 3 \
  --methods fused_ce torch_ce --json "$OUT/classifier_1m.json" > "$OUT/classifier_1m.md"
cat "$OUT/classifier_1m.md"

# 4. ---- ResNet-50 bf16 train-step timing (runs only if the file exists) ----
if [ -f bench/train_step_gpu.py ]; then
  python bench/train_step_gpu.py --out "$OUT"
fi
# ---- end of the train-step section ----

exit $status
