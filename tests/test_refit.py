"""The closed-form corrections of method/refit.py on hand-made tensors whose answers are known."""

import os
import sys

import pytest
import torch

from torch import nn

from ream_hf.arch import ExpertWeights
from ream_hf.method.experts import Activation
from ream_hf.method.refit import (
    LeastSquaresSums,
    RidgeFactor,
    Routing,
    checked_down_refit,
    group_logit_targets,
    heldout_sequences,
    refit_bytes,
    refit_down_projections,
    ridge_solve,
)


def direct_ridge(u, t, prior, ridge):
    """The normal equations written out for one output: (T^T U + lam P)(U^T U + lam I)^-1."""
    gram = u.T @ u
    lam = ridge * torch.diagonal(gram).mean()
    return (t.T @ u + lam * prior) @ torch.linalg.inv(gram + lam * torch.eye(u.shape[1], dtype=u.dtype))


def test_ridge_recovers_the_exact_weights_and_falls_back_to_the_prior():
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    exact = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    prior = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    t = u @ exact.T  # noiseless targets: the least squares answer is `exact`
    gram, cross = (u.T @ u)[None], (t.T @ u)[None]
    assert torch.allclose(ridge_solve(gram, cross, prior[None], 1e-12)[0], exact, atol=1e-8)
    assert torch.allclose(ridge_solve(gram, cross, prior[None], 1e9)[0], prior, atol=1e-6)
    noisy = t + 0.3 * torch.randn(t.shape, generator=generator, dtype=torch.float64)
    solved = ridge_solve(gram, (noisy.T @ u)[None], prior[None], 0.5)[0]
    assert torch.allclose(solved, direct_ridge(u, noisy, prior, 0.5), atol=1e-10)


def test_ridge_with_no_rows_keeps_the_prior():
    prior = torch.randn(3, 2, 5, dtype=torch.float64)
    gram = torch.zeros(3, 5, 5, dtype=torch.float64)
    gram[1] = torch.eye(5)
    cross = torch.zeros(3, 2, 5, dtype=torch.float64)
    solved = ridge_solve(gram, cross, prior, 0.1)
    assert torch.equal(solved[0], prior[0]) and torch.equal(solved[2], prior[2])
    assert torch.allclose(solved[1], prior[1] * 0.1 / 1.1)  # pulled towards the zero targets


def test_shared_gram_equals_one_regression_per_output():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(120, 6, generator=generator)
    targets = torch.randn(120, 3, generator=generator)
    prior = torch.randn(3, 1, 6, generator=generator, dtype=torch.float64)
    shared = LeastSquaresSums(3, 6)
    shared.add(x[:50], targets[:50])  # two chunks
    shared.add(x[50:], targets[50:])
    solved = shared.solve(prior, 0.05)
    for j in range(3):
        expected = direct_ridge(x.double(), targets[:, j : j + 1].double(), prior[j], 0.05)
        assert torch.allclose(solved[j], expected, atol=1e-8)


def test_router_sums_memory_does_not_grow_with_tokens():
    sums = LeastSquaresSums(4, 5)
    sizes = [t.numel() for t in (sums.gram, sums.cross)]
    for _ in range(20):
        sums.add(torch.randn(500, 5), torch.randn(500, 4))
    assert [t.numel() for t in (sums.gram, sums.cross)] == sizes


def test_softmax_group_targets_give_each_output_its_groups_mass():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 6, generator=generator, dtype=torch.float64) * 3
    output_of = torch.tensor([0, 1, 0, 2, 1, 1])  # groups {0, 2}, {1, 4, 5}, {3}
    targets = group_logit_targets(logits, output_of, 3, "softmax")
    probs = torch.softmax(logits, dim=1)
    mass = torch.stack([probs[:, [0, 2]].sum(1), probs[:, [1, 4, 5]].sum(1), probs[:, 3]], dim=1)
    assert torch.allclose(torch.softmax(targets, dim=1), mass, atol=1e-12)
    assert torch.allclose(targets[:, 2], logits[:, 3])  # a singleton keeps its own logit
    pruned = group_logit_targets(logits, torch.tensor([0, -1, 1, -1, -1, 2]), 3, "softmax")
    assert torch.allclose(pruned, logits[:, [0, 2, 5]])  # no groups: the kept logits themselves


def test_sigmoid_group_targets_score_the_groups_summed_scores():
    logits = torch.tensor([[-2.0, -1.0, 0.5, -3.0]], dtype=torch.float64)
    targets = group_logit_targets(logits, torch.tensor([0, 0, 1, 1]), 2, "sigmoid")
    scores = torch.sigmoid(logits)
    assert torch.allclose(torch.sigmoid(targets), torch.stack([scores[0, :2].sum(), scores[0, 2:].sum()])[None])
    saturated = group_logit_targets(torch.tensor([[5.0, 5.0]]), torch.tensor([0, 0]), 1, "sigmoid")
    assert torch.isfinite(saturated).all()  # a sum above 1 is clamped, not NaN


@pytest.mark.parametrize("ridge", [1e-9, 0.3])
def test_refit_lowers_the_least_squares_objective(ridge):
    """On any data the solution is no worse than the prior for the ridge objective it minimises."""
    generator = torch.Generator().manual_seed(4)
    u = torch.randn(80, 4, generator=generator, dtype=torch.float64)
    t = torch.randn(80, 3, generator=generator, dtype=torch.float64)
    prior = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    solved = ridge_solve((u.T @ u)[None], (t.T @ u)[None], prior[None], ridge)[0]
    lam = ridge * torch.diagonal(u.T @ u).mean()

    def objective(w):
        return ((u @ w.T - t) ** 2).sum() + lam * ((w - prior) ** 2).sum()

    assert objective(solved) <= objective(prior)


SILU = Activation("glu", act_fn=nn.SiLU())


def experts(count, inner=5, hidden=6, seed=5, biased=False):
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randn(count, inner, hidden, generator=generator), torch.randn(count, inner, hidden, generator=generator),
             torch.randn(count, hidden, inner, generator=generator)]
    if biased:
        parts += [torch.randn(count, inner, generator=generator), torch.randn(count, inner, generator=generator),
                  torch.randn(count, hidden, generator=generator)]
    return ExpertWeights(*parts)


@pytest.mark.parametrize("biased", [False, True])
def test_residual_refit_restores_a_damaged_down_projection_exactly(biased):
    """Top-1 routing, same routing before and after: the layer's error on a token is all the routed expert's,
    so the residual target is the source expert's output and the least squares gives its weights back."""
    source = experts(3, biased=biased)
    damaged = ExpertWeights(source.gate, source.up, 0.5 * source.down + 0.1, source.gate_bias, source.up_bias,
                            None if source.down_bias is None else source.down_bias - 1.0)
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(6))
    routing = Routing(torch.rand(300, 1, generator=torch.Generator().manual_seed(7)) + 0.5,
                      torch.arange(300).remainder(3).unsqueeze(1))
    down, bias = refit_down_projections(source, damaged, SILU, x, routing, routing, [[0], [1], [2]], "residual", 1e-10)
    assert torch.allclose(down, source.down, atol=1e-4)
    assert (bias is None) == (not biased) and (bias is None or torch.allclose(bias, source.down_bias, atol=1e-4))


def test_residual_steps_converge_to_the_joint_least_squares_with_top2_routing():
    """Top-2: one step shares each token's error between its two experts (it cannot know which one erred); more
    steps recompute the error and converge to the source experts, the exact joint answer."""
    source = experts(4, seed=9)
    damaged = ExpertWeights(source.gate, source.up, source.down * torch.tensor([0.5, 1.0, 1.5, 1.0])[:, None, None])
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(600, 6, generator=generator)
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(600)])
    routing = Routing(torch.rand(600, 2, generator=generator) + 0.2, index)
    errors = []
    for steps in (1, 3, 30):
        down, _ = refit_down_projections(source, damaged, SILU, x, routing, routing, [[0], [1], [2], [3]], "residual",
                                         1e-9, steps)
        errors.append(float((down - source.down).norm()))
    assert errors[0] < float((damaged.down - source.down).norm()) and errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-3


def test_group_refit_makes_a_merged_expert_carry_its_groups_original_weight():
    """Experts 0 and 1 are identical and merge into output 0; the compressed router gives it half the weight the
    original gave either member, so matching the group's gated output doubles its down projection. Expert 2 is
    pruned (no group) and its tokens are routed nowhere after compression."""
    base = experts(1)
    source = ExpertWeights(*(torch.cat([t, t, torch.randn_like(t)]) for t in (base.gate, base.up, base.down)))
    merged = base
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(8))
    original = Routing(torch.ones(200, 1), torch.arange(200).remainder(3).unsqueeze(1))
    routed = original.index[:, 0] < 2
    compressed = Routing(torch.full((int(routed.sum()), 1), 0.5), torch.zeros(int(routed.sum()), 1, dtype=torch.long))
    down, _ = refit_down_projections(source, merged, SILU, x[routed], Routing(original.weights[routed],
                                     original.index[routed]), compressed, [[0, 1]], "group", 1e-10)
    assert torch.allclose(down[0], 2 * base.down[0], atol=1e-4)


def test_refit_keeps_an_output_expert_no_token_reaches():
    source = experts(2)
    x = torch.randn(40, 6)
    routing = Routing(torch.ones(40, 1), torch.zeros(40, 1, dtype=torch.long))
    down, _ = refit_down_projections(source, source, SILU, x, routing, routing, [[0], [1]], "residual", 0.1)
    assert torch.equal(down[1], source.down[1])
    with pytest.raises(ValueError, match="refit target"):
        refit_down_projections(source, source, SILU, x, routing, routing, [[0], [1]], "layer", 0.1)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "glm4_moe"])
def test_refit_changes_only_the_down_projections_of_the_plan(family, calibration_txt, tmp_path):
    """End to end, per routing style (softmax; GPT-OSS's biases; GLM's sigmoid + grouped top-k): with the refit, the
    same plan, the same merged gate/up and router, new down projections, and the checkpoint loads and runs."""
    from transformers import AutoModelForCausalLM

    from ream_hf import ReamCompressor, ReamConfig
    from tests.conftest import tensors
    from tests.families import build_family_checkpoint

    source = build_family_checkpoint(family, tmp_path / "source")
    outputs = {}
    for refit in ("none", "down"):
        config = ReamConfig(target_experts=8, method="ream", calibration=[str(calibration_txt)], calibration_ratios=None,
                            num_calibration_sequences=8, sequence_length=48, batch_size=4, refit=refit,
                            refit_tokens=128, prune_fallback=False, layer_floor=False)
        # the floors judge after a down fit when the refit is on, so they could plan differently
        compressor = ReamCompressor(config)
        compressor.compress(str(source))
        compressor.save_pretrained(tmp_path / refit)
        outputs[refit] = (compressor.manifest()["layers"], tensors(tmp_path / refit))
    (plan, plain), (refit_plan, refit) = outputs["none"], outputs["down"]
    assert plan[0]["groups"] == refit_plan[0]["groups"]  # the first MoE layer sees the same inputs
    checks = [layer["refit"] for layer in refit_plan]  # the held-out check's record, per layer
    assert all(layer["refit"] is None for layer in plan) and all(c["mode"] == "down" for c in checks)
    assert all(c["heldout_error_after"] <= c["heldout_error_before"] and c["heldout_tokens"] > 0 for c in checks)
    assert any(c["kept"] for c in checks), checks
    changed = [n for n in plain if not torch.equal(plain[n], refit[n])]
    assert changed and all("down_proj" in n or f".layers.{plan[0]['index']}." not in n for n in changed), changed
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "down"))
    assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()



def test_heldout_sequences_hold_out_whole_sequences_never_all():
    sequence = torch.arange(400) // 25  # 16 sequences of 25 tokens
    held = heldout_sequences(sequence, 0.25, 0)
    assert held.sum() == 4 * 25
    for s in range(16):  # a sequence is held out whole or not at all
        assert held[sequence == s].all() or not held[sequence == s].any()
    assert not heldout_sequences(torch.zeros(30, dtype=torch.long), 0.25, 0).any()  # one sequence: nothing to hold out
    assert heldout_sequences(torch.tensor([0, 0, 1]), 0.9, 0).sum() in (1, 2)  # never every sequence


def test_residual_ridge_stays_anchored_to_the_merged_weights_over_steps():
    """Top-1 routing: every step's target is the source output, so the anchored ridge gives the same closed-form
    answer, (sum t u^T + lam W0)(G + lam I)^-1, at every step. Re-centring the prior on the previous step's
    weights would walk, step by step, to the unregularised least squares instead."""
    source = experts(3, seed=21)
    damaged = ExpertWeights(source.gate, source.up, 0.5 * source.down)
    generator = torch.Generator().manual_seed(22)
    x = torch.randn(90, 6, generator=generator)
    routing = Routing(torch.rand(90, 1, generator=generator) + 0.5, torch.arange(90).remainder(3).unsqueeze(1))
    one, _ = refit_down_projections(source, damaged, SILU, x, routing, routing, [[0], [1], [2]], "residual", 1.0, 1)
    many, _ = refit_down_projections(source, damaged, SILU, x, routing, routing, [[0], [1], [2]], "residual", 1.0, 6)
    assert torch.allclose(one, many, atol=1e-5)
    for expert in range(3):
        rows = routing.index[:, 0] == expert
        a = SILU(x[rows] @ source.gate[expert].T, x[rows] @ source.up[expert].T).double()
        u = routing.weights[rows].double() * a
        expected = direct_ridge(u, u @ source.down[expert].T.double(), damaged.down[expert].double(), 1.0)
        assert torch.allclose(many[expert].double(), expected, atol=1e-4)
    assert not torch.allclose(many, source.down, atol=1e-2)  # a ridge of 1 does not reach the least squares


def layer_output(weights, x, routing):
    """sum_k w_k f_{i_k}(x) per token, written out expert by expert (independent of method/refit.py)."""
    out = torch.zeros(x.shape[0], weights.down.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for w, e in zip(routing.weights[t].tolist(), routing.index[t].tolist()):
            a = SILU(x[t] @ weights.gate[e].T, x[t] @ weights.up[e].T)
            out[t] += w * (a @ weights.down[e].T).double()
    return out


@pytest.mark.parametrize("tokens", [24, 60, 240, 2000])
def test_checked_refit_is_never_worse_than_no_refit_on_held_out_sequences(tokens):
    """REAP-like: 6 experts pruned to 4, top-2 routing, at 0.6 to 50 routed rows per unknown. Whatever the rows,
    the held-out error of what the check returns is at most the unrefit layer's (recomputed here from the returned
    weights), and with plenty of rows the refit is kept and lowers it."""
    hidden, inner = 6, 5
    source = experts(6, inner, hidden, seed=30)
    kept = [0, 1, 2, 3]
    pruned = ExpertWeights(*(t[kept] for t in (source.gate, source.up, source.down)))
    generator = torch.Generator().manual_seed(31)
    x = torch.randn(tokens, hidden, generator=generator)
    router = torch.randn(6, hidden, generator=generator)
    scores = torch.softmax(x @ router.T, dim=1)
    top = scores.topk(2, dim=1)
    original = Routing(top.values, top.indices)
    kept_scores = torch.softmax(x @ router[kept].T, dim=1).topk(2, dim=1)
    compressed = Routing(kept_scores.values, kept_scores.indices)
    held = heldout_sequences(torch.arange(tokens) // 6, 0.25, 3)
    down, _, check = checked_down_refit(source, pruned, SILU, x, held, original, compressed, [[0], [1], [2], [3]],
                                        "residual", [0.01, 0.1, 1.0, 10.0], 3)
    target = layer_output(source, x[held], Routing(original.weights[held], original.index[held]))
    held_routing = Routing(compressed.weights[held], compressed.index[held])

    def error(weights):
        return float(((target - layer_output(weights, x[held], held_routing)) ** 2).sum() / (target ** 2).sum())

    before = error(pruned)
    after = error(ExpertWeights(pruned.gate, pruned.up, down))
    assert after <= before + 1e-9
    assert check.heldout_error_before == pytest.approx(before, rel=1e-4)
    assert check.heldout_error_after == pytest.approx(after, rel=1e-4)
    assert check.train_tokens + check.heldout_tokens == tokens
    if not check.kept:
        assert torch.equal(down, pruned.down) and check.experts_refit == 0
    if tokens >= 2000:
        assert check.kept and after < 0.9 * before and len(check.ridges) == check.steps and check.steps in (1, 2, 3)


@pytest.mark.parametrize("rows", [7, 40])
def test_ridge_factor_gives_every_ridges_answer_from_one_factorisation(rows):
    """The factor the refit builds once per expert answers each ridge and each step's target (rows' own output
    under a previous change plus a moved part) as the normal equations written out do, in the primal (more rows
    than unknowns) and the dual (fewer); all-zero rows give zero."""
    generator = torch.Generator().manual_seed(41)
    u = torch.randn(rows, 12, generator=generator)
    moved = torch.randn(rows, 3, generator=generator)
    previous = torch.randn(3, 12, generator=generator)
    factor = RidgeFactor(u)
    assert factor.dual == (rows < 12)
    ridges = [0.01, 0.3, 10.0]
    zero = torch.zeros(3, 12, dtype=torch.float64)
    targets = (moved + u @ previous.T).double()
    for got, ridge in zip(factor.solve(u, moved, previous, ridges), ridges):  # float32 answers (the last rotation)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), direct_ridge(u.double(), targets, zero, ridge), atol=1e-4)
    for got, ridge in zip(factor.solve(u, moved, None, ridges), ridges):
        assert torch.allclose(got.double(), direct_ridge(u.double(), moved.double(), zero, ridge), atol=2e-6)
    zero = zero.float()
    empty = torch.zeros(rows, 12)
    assert all(torch.equal(d, zero) for d in RidgeFactor(empty).solve(empty, moved, previous, ridges))


MEASURE_REFIT = """
import json, re, sys
import torch
from torch import nn
torch.set_num_threads(1)
from ream_hf.arch import ExpertWeights
from ream_hf.method.experts import Activation
from ream_hf.method.refit import Routing, checked_down_refit, heldout_sequences

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

experts, kept, inner, hidden, top_k, tokens = 256, 192, 2048, 64, 8, 2048  # DeepSeek-V3's experts, H cut
g = torch.Generator().manual_seed(0)
source = ExpertWeights(torch.randn(experts, inner, hidden, generator=g) / hidden ** 0.5,
                       torch.randn(experts, inner, hidden, generator=g) / hidden ** 0.5,
                       torch.randn(experts, hidden, inner, generator=g) / inner ** 0.5)
merged = ExpertWeights(source.gate[:kept], source.up[:kept], 0.7 * source.down[:kept])  # damaged: worth a refit
x = torch.randn(tokens, hidden, generator=g)
top = torch.softmax(x @ torch.randn(kept, hidden, generator=g).T, 1).topk(top_k, 1)
routing = Routing(top.values, top.indices)
held = heldout_sequences(torch.arange(tokens) // 256, 0.25, 0)
torch.cholesky_solve(torch.ones(4, 2, dtype=torch.float64), torch.linalg.cholesky(torch.eye(4, dtype=torch.float64)))
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here
base = status("VmRSS")
check = checked_down_refit(source, merged, Activation("glu", act_fn=nn.SiLU()), x, held, routing, routing,
                           [[i] for i in range(kept)], "residual", [10.0], 1)[2]
print(json.dumps({"peak": status("VmHWM") - base, "kept": check.kept}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc")
def test_plan_counts_the_refit_memory_of_a_deepseek_v3_layer():
    """One layer of DeepSeek-V3's expert shape (256 -> 192 experts, D 2048, top-8; hidden size cut to 64) on a
    2,048-token sample: the refit's measured peak RSS (a fresh process) is within 20 % of `refit_bytes`, the
    count `plan` adds to a layer's working set."""
    import json
    import subprocess

    run = subprocess.run([sys.executable, "-c", MEASURE_REFIT], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["kept"]  # the whole path ran: the changes and the new down projections were held
    planned = refit_bytes(2048, 8, 2048, 64, 192)
    assert abs(measured["peak"] - planned) <= 0.2 * planned, (measured["peak"], planned)


def test_the_refit_sample_is_sized_from_the_layer_shape():
    """Unset, `refit_tokens` is sized per shape, never one count for every model: 8 routed rows per unknown where
    that fits (Qwen3-30B-A3B 128 -> 96: 8 x 96 x 768 / 8 tokens), at least the former 8,192 (a small model), and
    at DeepSeek-V3's shape the largest sample whose sample-dependent memory stays within the bound; a given count
    is kept as it is."""
    from ream_hf import ReamConfig
    from ream_hf.method.refit import REFIT_MIN_TOKENS, REFIT_SAMPLE_BYTES, sized_refit_config, sized_refit_tokens

    assert sized_refit_tokens(8, 96, 768, 2048) == 73728
    assert sized_refit_tokens(4, 16, 128, 256) == REFIT_MIN_TOKENS
    tokens = sized_refit_tokens(8, 192, 2048, 7168)
    grows = lambda t: refit_bytes(t, 8, 2048, 7168, 192) - refit_bytes(0, 8, 2048, 7168, 192)  # noqa: E731
    assert REFIT_MIN_TOKENS < tokens < 8 * 192 * 2048 // 8
    assert grows(tokens) <= REFIT_SAMPLE_BYTES < grows(tokens + 1)
    config = ReamConfig(target_experts=96)
    with pytest.raises(ValueError, match="sized from the model's layer shape"):
        config.layer_sample_tokens
    sized = sized_refit_config(config, top_k=8, kept=96, inner=768, hidden=2048)
    assert sized.refit_tokens == 73728 and config.refit_tokens is None  # a copy: the user's config is not changed
    given = ReamConfig(target_experts=96, refit_tokens=1000)
    assert sized_refit_config(given, top_k=8, kept=96, inner=768, hidden=2048) is given


def test_compress_draws_the_sized_refit_sample(calibration_txt, tmp_path, monkeypatch):
    """End to end the refit fits and checks on the sample sized for the model (here 1 routed row per unknown: 8 kept
    experts x D 32 / top-2 = 128 tokens of the 384 calibration tokens), and config.json records the field unset."""
    import json

    from ream_hf import ReamCompressor, ReamConfig
    from ream_hf.method import refit as refit_module
    from tests.families import build_family_checkpoint

    monkeypatch.setattr(refit_module, "REFIT_ROWS_PER_UNKNOWN", 1)
    monkeypatch.setattr(refit_module, "REFIT_MIN_TOKENS", 16)
    source = build_family_checkpoint("qwen3_moe", tmp_path / "source")
    text = json.loads((source / "config.json").read_text())
    expected = -(-8 * text["moe_intermediate_size"] // text["num_experts_per_tok"])
    assert expected < 8 * 48  # a sample smaller than the calibration, so the sizing decides it
    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=48, batch_size=4)
    compressor = ReamCompressor(config)
    compressor.compress(str(source))
    checks = [layer["refit"] for layer in compressor.manifest()["layers"]]
    assert checks and all(c["train_tokens"] + c["heldout_tokens"] == expected for c in checks), checks
    compressor.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["ream_config"]["refit_tokens"] is None
