#!/usr/bin/env bash
# GPU checks of issue 12, run from the repository root on a machine with a CUDA GPU (no network needed):
#
#   OUT=/somewhere bash eval/gpu_check.sh        # LAYERS=4 by default; WHEELS=/dir installs missing optimum/pytest
#
# 1. the GPU smoke test (tests/test_gpu.py: pytest -m gpu, or as a script without pytest): the whole pipeline on
#    CUDA, bf16 GEMMs and grouped_mm checked, hidden states spilled and resumed (about 1 minute)
# 2. eval/bench_gpu.py: LAYERS layers of Qwen3-30B-A3B's shape, 3072 x 512 calibration tokens, REAM 128 -> 96:
#    seconds per layer by stage, TFLOP/s against the card's peak, the 48-layer job extrapolated (2-4 minutes on an
#    H100 for 4 layers)
# Everything printed is also written under $OUT (default ./gpu-check-results): gpu_smoke.txt, bench_gpu.txt,
# bench_gpu.json. The exit status is 0 only if both steps passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check-results}
LAYERS=${LAYERS:-4}
mkdir -p "$OUT"
status=0

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU'); print('transformers', transformers.__version__)"
for package in optimum pytest; do
  if ! $PYTHON -c "import $package" 2>/dev/null && [ -n "${WHEELS:-}" ]; then
    $PYTHON -m pip install -q --no-index --find-links "$WHEELS" "$package" || true
  fi
done
if ! $PYTHON -c "import optimum" 2>/dev/null; then
  echo "optimum is missing (ream_hf.compressor imports it): install its wheel, or pass WHEELS=/dir/with/wheels"
  exit 2
fi

echo "== 1/2 GPU smoke test"
started=$SECONDS
if $PYTHON -c "import pytest" 2>/dev/null; then
  timeout 300 $PYTHON -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_smoke.txt"
else
  timeout 300 $PYTHON tests/test_gpu.py 2>&1 | tee "$OUT/gpu_smoke.txt"
fi
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "smoke test: $((SECONDS - started)) s"

echo "== 2/2 bench_gpu.py --layers $LAYERS"
started=$SECONDS
timeout 480 $PYTHON eval/bench_gpu.py --layers "$LAYERS" --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "bench: $((SECONDS - started)) s"
exit $status
