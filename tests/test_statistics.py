"""Saliency and frequency against a slow, obviously-correct per-token computation written here.

The reference re-implements each family's routing rule token by token (softmax + renormalised top-k
for Qwen3-MoE; sigmoid + correction bias + group-limited top-k + renormalisation + scaling for GLM-4.5)
and evaluates experts one at a time from the fused weights; it shares no code with the package.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.pipeline.calibration import load_calibration, make_batches
from tests.families import build_family_checkpoint


def route_softmax(logits, top_k, normalise):
    probs = [math.exp(v) for v in logits]
    total = sum(probs)
    probs = [p / total for p in probs]
    chosen = sorted(range(len(probs)), key=lambda i: -probs[i])[:top_k]
    weights = [probs[i] for i in chosen]
    if normalise:
        weights = [w / sum(weights) for w in weights]
    return chosen, weights


def route_sigmoid_grouped(logits, bias, top_k, n_group, topk_group, normalise, scale):
    scores = [1 / (1 + math.exp(-v)) for v in logits]
    choice = [s + b for s, b in zip(scores, bias)]
    size = len(scores) // n_group
    group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
    groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
    allowed = [i for g in groups for i in range(g * size, (g + 1) * size)]
    chosen = sorted(allowed, key=lambda i: -choice[i])[:top_k]
    weights = [scores[i] for i in chosen]
    if normalise:
        weights = [w / (sum(weights) + 1e-20) for w in weights]
    return chosen, [w * scale for w in weights]


def expert_output(experts, i, x):
    inner = experts.gate_up_proj.shape[1] // 2
    gate = experts.gate_up_proj[i, :inner] @ x
    up = experts.gate_up_proj[i, inner:] @ x
    return experts.down_proj[i] @ (F.silu(gate) * up)


def reference_stats(model, batches, layer_index, router_rule, probability_rule):
    """Loop over real tokens of every batch; returns (frequency, {(factor, mean): saliency list}, routing weight sums)
    for the factors g (routing weight), p (probability over all experts) and p^2, means over tokens and per batch."""
    captured = []
    block = model.model.layers[layer_index].mlp
    handle = block.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    handle.remove()
    num = block.experts.gate_up_proj.shape[0]
    factors = ("weight", "probability", "probability_squared")
    freq, routing = [0] * num, [0.0] * num
    sums = {(f, m): [0.0] * num for f in factors for m in ("tokens", "batches")}
    with torch.no_grad():
        for hidden, batch in zip(captured, batches):
            batch_freq, batch_sum = [0] * num, {f: [0.0] * num for f in factors}
            for b in range(hidden.shape[0]):
                for t in range(hidden.shape[1]):
                    if not batch.attention_mask[b, t]:
                        continue
                    x = hidden[b, t]
                    logits = (block.gate.weight @ x).tolist()
                    chosen, weights = router_rule(block, logits)
                    probs = probability_rule(logits)
                    for i, w in zip(chosen, weights):
                        norm = float(expert_output(block.experts, i, x).norm())
                        batch_freq[i] += 1
                        routing[i] += w
                        batch_sum["weight"][i] += w * norm
                        batch_sum["probability"][i] += probs[i] * norm
                        batch_sum["probability_squared"][i] += probs[i] ** 2 * norm
            for i in range(num):
                freq[i] += batch_freq[i]
                for f in factors:
                    sums[f, "tokens"][i] += batch_sum[f][i]
                    if batch_freq[i]:
                        sums[f, "batches"][i] += batch_sum[f][i] / batch_freq[i] / len(batches)
    saliency = {(f, m): [s / c if c else 0.0 for s, c in zip(v, freq)] if m == "tokens" else v
                for (f, m), v in sums.items()}
    return freq, saliency, routing


def softmax_probabilities(logits):
    peak = max(logits)
    exps = [math.exp(v - peak) for v in logits]
    return [e / sum(exps) for e in exps]


def sigmoid_scores(logits):
    return [1 / (1 + math.exp(-v)) for v in logits]


SALIENCY_CASES = [("weight", "tokens"), ("probability", "batches"), ("probability_squared", "tokens"),
                  ("probability_squared", "batches")]


def compress_and_manifest(source, calibration, method, sequential, tmp_path, target, **overrides):
    config = ReamConfig(target_experts=target, method=method, calibration=[str(calibration)], calibration_ratios=None,
                        num_calibration_sequences=12, sequence_length=64, batch_size=4, sequential=sequential,
                        **overrides)
    compressor = ReamCompressor(config)
    compressor.compress(str(source))
    return compressor.manifest(), config


def batches_for(source, config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return make_batches(load_calibration(config, tokenizer), config.batch_size, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def glm_source(tmp_path_factory):
    """Tiny GLM-4.5 (16 experts, 4 groups, top-4, layer 0 dense) with random correction biases, so that selection
    differs from scores."""
    return build_family_checkpoint("glm4_moe", tmp_path_factory.mktemp("glm") / "source")


@pytest.mark.parametrize("sequential, saliency", [(False, SALIENCY_CASES[0]), (True, SALIENCY_CASES[0]),
                                                   *((False, case) for case in SALIENCY_CASES[1:])])
def test_qwen3_softmax_saliency_and_frequency_match_reference(qwen3_source, ragged_calibration, tmp_path, sequential,
                                                              saliency):
    manifest, config = compress_and_manifest(qwen3_source, ragged_calibration, "reap", sequential, tmp_path, 8,
                                             saliency=saliency[0], saliency_mean=saliency[1])
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_source)).eval()
    batches = batches_for(qwen3_source, config)
    assert any((b.attention_mask == 0).any() for b in batches), "the fixture must produce padding"
    layers = [0] if sequential else [0, 1]  # with sequential=False every layer sees the original model's inputs
    for index in layers:
        rule = lambda block, logits: route_softmax(logits, 4, True)  # noqa: E731
        freq, sal, routing = reference_stats(model, batches, index, rule, softmax_probabilities)
        entry = manifest["layers"][index]
        assert entry["frequency"] == freq
        assert entry["routing_weight"] == pytest.approx(routing, rel=1e-5, abs=1e-5)
        assert entry["saliency"] == pytest.approx(sal[saliency], rel=1e-4, abs=1e-6)
        assert sum(freq) == 4 * manifest["calibration"]["tokens"]


@pytest.mark.parametrize("saliency", [SALIENCY_CASES[0], SALIENCY_CASES[2]])
def test_glm_sigmoid_bias_grouped_saliency_matches_reference(glm_source, ragged_calibration, tmp_path, saliency):
    """p for a sigmoid router is the expert's sigmoid score (its gate value over all experts, before the selection
    bias, the top-k renormalisation and the scaling)."""
    manifest, config = compress_and_manifest(glm_source, ragged_calibration, "reap", False, tmp_path, 8,
                                             saliency=saliency[0], saliency_mean=saliency[1])
    model = AutoModelForCausalLM.from_pretrained(str(glm_source)).eval()
    batches = batches_for(glm_source, config)
    assert [e["index"] for e in manifest["layers"]] == [1, 2]  # layer 0 is dense
    for entry in manifest["layers"]:
        def rule(block, logits):
            return route_sigmoid_grouped(logits, block.gate.e_score_correction_bias.tolist(), 4, 4, 2, True, 2.5)
        freq, sal, routing = reference_stats(model, batches, entry["index"], rule, sigmoid_scores)
        assert entry["frequency"] == freq
        assert entry["routing_weight"] == pytest.approx(routing, rel=1e-5, abs=1e-5)
        assert entry["saliency"] == pytest.approx(sal[saliency], rel=1e-4, abs=1e-6)


def test_frequency_method_ranks_by_counts(qwen3_source, ragged_calibration, tmp_path):
    manifest, _ = compress_and_manifest(qwen3_source, ragged_calibration, "frequency", True, tmp_path, 8)
    for entry in manifest["layers"]:
        kept = [g["centroid"] for g in entry["groups"]]
        freq = entry["frequency"]
        threshold = sorted(freq, reverse=True)[7]
        assert all(freq[i] >= threshold for i in kept) and len(kept) == 8
        assert entry["saliency"] is None


def test_grouped_routing_keeps_equal_experts_per_group(glm_source, ragged_calibration, tmp_path):
    manifest, _ = compress_and_manifest(glm_source, ragged_calibration, "reap", True, tmp_path, 8)
    for entry in manifest["layers"]:
        kept = [g["centroid"] for g in entry["groups"]]
        assert [sum(1 for k in kept if k // 4 == g) for g in range(4)] == [2, 2, 2, 2]
