"""REAM's groups equal those of a slow, straightforward implementation of METHOD.md written here.

The reference uses Python loops over tokens, experts and pairs, float64, and nothing from ream_hf
but the calibration loader (so both see the same tokens). It checks every layer with sequential=False
(each layer sees the original model's inputs) and layer 0 with sequential=True.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.pipeline.calibration import load_calibration, make_batches

TOP_K, TARGET, GROUP_SIZE = 4, 8, 4


def block_inputs(model, batches, layer):
    captured = []
    block = model.model.layers[layer].mlp
    handle = block.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().double()))
    with torch.no_grad():
        for batch in batches:
            model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    handle.remove()
    tokens = []
    for hidden, batch in zip(captured, batches):
        for b in range(hidden.shape[0]):
            for t in range(hidden.shape[1]):
                if batch.attention_mask[b, t]:
                    tokens.append(hidden[b, t])
    return tokens


def slow_ream_groups(block, tokens):
    gate_up = block.experts.gate_up_proj.detach().double()
    down = block.experts.down_proj.detach().double()
    router = block.gate.weight.detach().double()
    num, inner = gate_up.shape[0], gate_up.shape[1] // 2
    saliency_sum, count = [0.0] * num, [0] * num
    signature = [torch.zeros(down.shape[1], dtype=torch.float64) for _ in range(num)]
    logit_columns = [[] for _ in range(num)]
    for x in tokens:
        logits = [float(router[e] @ x) for e in range(num)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        probs = [v / sum(exps) for v in exps]
        chosen = sorted(range(num), key=lambda e: -probs[e])[:TOP_K]
        for e in range(num):
            out = down[e] @ (F.silu(gate_up[e, :inner] @ x) * (gate_up[e, inner:] @ x))
            signature[e] += probs[e] * out
            logit_columns[e].append(logits[e])
            if e in chosen:
                saliency_sum[e] += probs[e] ** 2 * float(out.norm())  # the default saliency: p^2 ||f||, token mean
                count[e] += 1
    saliency = [s / c if c else 0.0 for s, c in zip(saliency_sum, count)]

    def cosine(a, b):
        na, nb = float(a.norm()), float(b.norm())
        return float(a @ b) / (na * nb) if na and nb else 0.0

    columns = [torch.tensor(c, dtype=torch.float64) for c in logit_columns]
    columns = [c / c.norm() for c in columns]
    gate_distance = [[float((columns[i] - columns[j]).norm()) for j in range(num)] for i in range(num)]
    largest = max(max(row) for row in gate_distance)
    distance = [[0.0] * num for _ in range(num)]
    for i in range(num):
        for j in range(num):
            if i != j:
                similarity = ((cosine(signature[i], signature[j]) + 1) / 2 + (1 - gate_distance[i][j] / largest)) / 2
                distance[i][j] = 1 - similarity
    centroids = sorted(range(num), key=lambda e: (-saliency[e], e))[:TARGET]
    assigned = set(centroids)
    groups = {}
    for c in centroids:  # descending saliency
        candidates = sorted((e for e in range(num) if e not in assigned), key=lambda e: (distance[c][e], e))
        members = candidates[: GROUP_SIZE - 1]
        assigned.update(members)
        groups[c] = [c] + members
    assert len(assigned) == num
    return [groups[c] for c in sorted(groups)]


@pytest.mark.parametrize("sequential", [False, True])
def test_groups_equal_slow_reference(qwen3_source, calibration_txt, sequential):
    config = ReamConfig(target_experts=TARGET, method="ream", group_size=GROUP_SIZE, calibration=[str(calibration_txt)],
                        calibration_ratios=None, num_calibration_sequences=8, sequence_length=48, batch_size=4,
                        sequential=sequential)
    compressor = ReamCompressor(config)
    compressor.compress(str(qwen3_source))
    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_source))
    batches = make_batches(load_calibration(config, tokenizer), 4, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_source), dtype=torch.float64, experts_implementation="eager").eval()
    layers = [0, 1] if not sequential else [0]
    for index in layers:
        expected = slow_ream_groups(model.model.layers[index].mlp, block_inputs(model, batches, index))
        layer = compressor.result.layers[index]
        # the groups as planned: the merge floor may since have pruned some to their centroid (it records the plan's)
        floor = layer.floor or [None] * len(layer.plan.groups)
        got = [list(g.members) if check is None else check["group"] for g, check in zip(layer.plan.groups, floor)]
        assert got == expected, f"layer {index}"
        assert len(got) == TARGET and sorted(e for g in got for e in g) == list(range(16))
        assert any(len(g) > 1 for g in got), "the fixture should produce real merges"
