#!/usr/bin/env bash
# One pass of the GPU measurements for docs/performance.md (about 6-8 minutes on one recent GPU; nothing here needs the
# original code or any weights): the 3 published variants x float32 / bfloat16 / float16 x eager / torch.compile,
# batch 1 and 8, images per second and peak memory, plus one training step per variant and precision.
#
#     bash benchmarks/gpu_suite.sh [OUTPUT_DIR]          # writes OUTPUT_DIR/gpu_suite.txt (default: gpu_suite_out)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_suite_out}"
mkdir -p "$out"
log="$out/gpu_suite.txt"
python=${PYTHON:-python}
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this suite is for a GPU machine')"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  for variant in r50 r50x4 convnext_l; do
    # each variant in its own process and time box, so one slow compilation cannot eat the whole budget
    timeout 150 "$python" benchmarks/latency.py --device cuda --variants "$variant" --batch-sizes 1 8 --iters 5 \
      --dtypes float32 bfloat16 float16 --compile --train-step || echo "!! $variant stopped (exit $?)"
  done
} 2>&1 | tee "$log"
echo "written: $log"
