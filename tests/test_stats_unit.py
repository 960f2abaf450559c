"""The streaming accumulator equals a naive computation that materialises (E, T, H)."""

import pytest
import torch
from torch import nn

from ream_hf.arch import ExpertWeights
from ream_hf.method.experts import Activation
from ream_hf.method import stats as stats_module
from ream_hf.method.stats import SALIENCY_VARIANTS, GemmPolicy, LayerStatsAccumulator, gate_scores


def naive(weights, activation, x, logits, topk_w, topk_i, scoring, gated=True, batches=None):
    """Frequency, every saliency variant (dict) and the gated signature, by loops over tokens; `batches` lists the
    (start, stop) token ranges the accumulator was given one call each (the "batches" mean)."""
    num = weights.gate.shape[0]
    outs = []
    for e in range(num):
        g = x @ weights.gate[e].T + (0 if weights.gate_bias is None else weights.gate_bias[e])
        u = x @ weights.up[e].T + (0 if weights.up_bias is None else weights.up_bias[e])
        outs.append(activation(g, u) @ weights.down[e].T + (0 if weights.down_bias is None else weights.down_bias[e]))
    out = torch.stack(outs)  # (E, T, H)
    gates = gate_scores(logits, scoring) if gated else torch.ones_like(logits)
    gated_mean = (gates.T.unsqueeze(-1) * out).mean(dim=1)
    probs = gate_scores(logits, scoring)
    batches = batches or [(0, x.shape[0])]
    freq = torch.zeros(num, dtype=torch.long)
    sums = {name: torch.zeros(num, dtype=torch.float64) for name in SALIENCY_VARIANTS}
    for start, stop in batches:
        batch_freq = torch.zeros(num, dtype=torch.long)
        batch_sum = {factor: torch.zeros(num, dtype=torch.float64) for factor in ("weight", "probability", "probability_squared")}
        for t in range(start, stop):
            for slot in range(topk_i.shape[1]):
                e = int(topk_i[t, slot])
                batch_freq[e] += 1
                norm, p = float(out[e, t].norm()), float(probs[t, e])
                batch_sum["weight"][e] += float(topk_w[t, slot]) * norm
                batch_sum["probability"][e] += p * norm
                batch_sum["probability_squared"][e] += p * p * norm
        freq += batch_freq
        for factor, value in batch_sum.items():
            sums[f"{factor}/tokens"] += value
            sums[f"{factor}/batches"] += value / batch_freq.clamp(min=1) / len(batches)
    sal = {name: (value / freq.clamp(min=1) if name.endswith("/tokens") else value) for name, value in sums.items()}
    return freq, sal, gated_mean


def same_saliency(got, expected, **tolerance):
    assert set(got) == set(SALIENCY_VARIANTS)
    for name in SALIENCY_VARIANTS:
        assert torch.allclose(got[name], expected[name], **tolerance), name


@pytest.mark.parametrize("kind", ["glu", "glu_gelu", "gpt_oss"])
@pytest.mark.parametrize("scoring, gated", [("softmax", True), ("sigmoid", True), ("softmax", False)])
@pytest.mark.parametrize("saliency_window", ["one per call", "one per chunk"])
def test_dense_accumulator_matches_naive(kind, scoring, gated, saliency_window, monkeypatch):
    if saliency_window == "one per chunk":
        monkeypatch.setattr(stats_module, "ROUTED_BYTES_BUDGET", 1)
    torch.manual_seed(0)
    num, inner, hidden, tokens, k = 6, 5, 7, 50, 2
    biased = kind == "gpt_oss"
    weights = ExpertWeights(
        torch.randn(num, inner, hidden), torch.randn(num, inner, hidden), torch.randn(num, hidden, inner),
        *( (torch.randn(num, inner), torch.randn(num, inner), torch.randn(num, hidden)) if biased else (None,) * 3),
    )
    activation = {"glu": Activation("glu", act_fn=nn.SiLU()), "glu_gelu": Activation("glu", act_fn=nn.GELU()),
                  "gpt_oss": Activation("gpt_oss")}[kind]  # silu runs in place, the others through a copy
    x, logits = torch.randn(tokens, hidden), torch.randn(tokens, num)
    topk_w, topk_i = torch.softmax(logits, -1).topk(k, dim=-1)
    topk_i[0] = torch.tensor([0, 1])  # make sure expert 5 may go unrouted in some seeds; expert 0 is routed
    acc = LayerStatsAccumulator(weights, activation, scoring, dense=True, gated=gated, chunk_size=16,
                                sample_positions=torch.tensor([3, 17, 40]), with_logit_gram=True)
    acc.add(x[:30], logits[:30], topk_w[:30], topk_i[:30])  # two calls and several chunks
    acc.add(x[30:], logits[30:], topk_w[30:], topk_i[30:])
    stats = acc.finalize()
    freq, sal, gated_mean = naive(weights, activation, x, logits, topk_w, topk_i, scoring, gated, [(0, 30), (30, 50)])
    assert torch.equal(stats.frequency, freq)
    same_saliency(stats.saliency, sal, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.output_signatures, gated_mean, rtol=1e-4, atol=1e-5)
    assert torch.equal(stats.sample_inputs, x[[3, 17, 40]])
    assert torch.allclose(stats.router_logit_gram, logits.double().T @ logits.double(), rtol=1e-12)


@pytest.mark.parametrize("dense", [True, False])
def test_bfloat16_weights_give_the_statistics_of_their_float32_values(dense):
    torch.manual_seed(3)
    num, inner, hidden = 4, 6, 8
    weights = ExpertWeights(torch.randn(num, inner, hidden), torch.randn(num, inner, hidden), torch.randn(num, hidden, inner))
    rounded = weights.to(torch.bfloat16)
    activation = Activation("glu", act_fn=nn.SiLU())
    x, logits = torch.randn(30, hidden), torch.randn(30, num)
    topk_w, topk_i = torch.softmax(logits, -1).topk(2, dim=-1)
    results = []
    for w in (rounded, rounded.to(torch.float32)):
        acc = LayerStatsAccumulator(w, activation, "softmax", dense=dense)
        acc.add(x, logits, topk_w, topk_i)
        results.append(acc.finalize())
    assert rounded.gate.dtype == torch.bfloat16  # the accumulator converts what it needs, not the caller
    same_saliency(results[0].saliency, results[1].saliency, rtol=1e-6)
    if dense:
        assert torch.allclose(results[0].output_signatures, results[1].output_signatures, rtol=1e-5, atol=1e-6)


def test_sparse_accumulator_matches_naive_and_unrouted_expert_has_zero_saliency():
    torch.manual_seed(1)
    num, inner, hidden = 5, 4, 6
    weights = ExpertWeights(torch.randn(num, inner, hidden), torch.randn(num, inner, hidden), torch.randn(num, hidden, inner))
    activation = Activation("glu", act_fn=nn.SiLU())
    x, logits = torch.randn(40, hidden), torch.randn(40, num)
    logits[:, 4] = -1e4  # expert 4 is never routed
    topk_w, topk_i = torch.softmax(logits, -1).topk(2, dim=-1)
    acc = LayerStatsAccumulator(weights, activation, "softmax", dense=False)
    acc.add(x, logits, topk_w, topk_i)
    stats = acc.finalize()
    freq, sal, _ = naive(weights, activation, x, logits, topk_w, topk_i, "softmax")
    assert torch.equal(stats.frequency, freq) and stats.frequency[4] == 0
    same_saliency(stats.saliency, sal, rtol=1e-5)
    assert all(stats.saliency[name][4] == 0 for name in SALIENCY_VARIANTS)


def routed_sum(weights, activation, x, topk_w, topk_i):
    """sum_k w_k f_{i_k}(x) per token, one token and slot at a time."""
    out = torch.zeros(x.shape[0], weights.down.shape[1])
    for t in range(x.shape[0]):
        for slot in range(topk_i.shape[1]):
            e = int(topk_i[t, slot])
            a = activation(x[t : t + 1] @ weights.gate[e].T, x[t : t + 1] @ weights.up[e].T)
            out[t] += float(topk_w[t, slot]) * (a @ weights.down[e].T)[0]
    return out


@pytest.mark.parametrize("path", ["dense", "dense grouped_mm", "sparse", "frequency"])
def test_the_sample_rows_routed_output_comes_with_the_saliency(path):
    """The token sample's routed output sum_k w_k f_{i_k}(x), which the refit reproduces, is added as the saliency
    runs the routed pairs in the dense pass's float32 GEMMs (two calls, windows of several chunks). A GPU's grouped
    down projection (here float32 grouped_mm, which needs 16-byte rows) and the routed-only pass (REAP, frequency)
    leave it to the refit: none."""
    torch.manual_seed(5)
    num, inner, hidden, tokens, k = 6, 8, 8, 60, 2
    weights = ExpertWeights(torch.randn(num, inner, hidden), torch.randn(num, inner, hidden), torch.randn(num, hidden, inner))
    activation = Activation("glu", act_fn=nn.SiLU())
    x, logits = torch.randn(tokens, hidden), torch.randn(tokens, num)
    topk_w, topk_i = torch.softmax(logits, -1).topk(k, dim=-1)
    positions = torch.tensor([0, 3, 17, 29, 30, 41, 59])
    acc = LayerStatsAccumulator(weights, activation, "softmax", dense=path.startswith("dense"),
                                with_saliency=path != "frequency", chunk_size=16, sample_positions=positions,
                                gemm=GemmPolicy(grouped=path == "dense grouped_mm"))
    acc.add(x[:30], logits[:30], topk_w[:30], topk_i[:30])
    acc.add(x[30:], logits[30:], topk_w[30:], topk_i[30:])
    stats = acc.finalize()
    assert torch.equal(stats.sample_inputs, x[positions])
    if path != "dense":
        assert stats.sample_outputs is None
    else:
        expected = routed_sum(weights, activation, x, topk_w, topk_i)[positions]
        assert torch.allclose(stats.sample_outputs, expected, rtol=1e-5, atol=1e-5)


def test_statistics_memory_does_not_grow_with_calibration_tokens():
    """Every running sum has a fixed size: 40 or 4000 tokens leave the same bytes in the accumulator (the token
    sample is capped by its positions), and the finalized statistics are the same size too."""
    torch.manual_seed(4)
    num, inner, hidden, k = 6, 5, 7, 2
    weights = ExpertWeights(torch.randn(num, inner, hidden), torch.randn(num, inner, hidden), torch.randn(num, hidden, inner))
    activation = Activation("glu", act_fn=nn.SiLU())

    def held_bytes(tokens):
        acc = LayerStatsAccumulator(weights, activation, "softmax", dense=True, with_logit_gram=True, chunk_size=16,
                                    sample_positions=torch.tensor([1, 5, 9]))
        for _ in range(tokens // 40):
            x, logits = torch.randn(40, hidden), torch.randn(40, num)
            topk_w, topk_i = torch.softmax(logits, -1).topk(k, dim=-1)
            acc.add(x, logits, topk_w, topk_i)
        state = [v for v in vars(acc).values() if isinstance(v, torch.Tensor)] + acc.sample_chunks + \
            acc.sample_output_chunks
        stats = acc.finalize()
        final = [stats.frequency, stats.output_signatures, stats.router_logit_gram, stats.sample_inputs,
                 stats.sample_outputs, *stats.saliency.values()]
        return sum(t.numel() * t.element_size() for t in state), sum(t.numel() * t.element_size() for t in final)

    assert held_bytes(40) == held_bytes(4000)
