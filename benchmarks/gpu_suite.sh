#!/usr/bin/env bash
# One pass of the GPU measurements for docs/performance.md (about 6-8 minutes on one recent GPU; nothing here needs the
# original code or any weights): the 3 published variants x float32 / bfloat16 / float16 x eager / torch.compile,
# batch 1 and 8, images per second and peak memory, plus one training step per variant and precision; then the R50
# export on ONNX Runtime's CUDA and TensorRT providers (benchmarks/runtimes.py --gpu).
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
  # The R50 export on ONNX Runtime's CUDA (float32) and TensorRT (float32 and float16 engines) providers (needs
  # onnxruntime-gpu, whose wheel replaces onnxruntime; TensorRT's libraries for the TensorRT provider)
  if "$python" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    runtimes="ORT CUDA float32"
    if "$python" -c "import onnxruntime as o, sys; sys.exit('TensorrtExecutionProvider' not in o.get_available_providers())"; then
      runtimes="$runtimes|ORT TensorRT float32|ORT TensorRT float16"
    fi
    IFS='|' read -r -a names <<< "$runtimes"
    timeout 900 "$python" benchmarks/runtimes.py --gpu --runtimes "${names[@]}" --rounds 5 --sweep-rounds 2 \
      || echo "!! ONNX Runtime GPU providers stopped (exit $?)"
  else
    echo "onnxruntime-gpu not installed (pip install onnxruntime-gpu): ONNX Runtime CUDA / TensorRT left out"
  fi
} 2>&1 | tee "$log"
echo "written: $log"
