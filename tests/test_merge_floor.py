"""The neuron-selection merge (method/merging.py) and the merge floor (method/floor.py) on random tensors: a merge
is never worse than the group's centroid alone, on the rows it is fit on and, after the floor, held out."""

import pytest
import torch
from torch import nn

from ream_hf.arch import ExpertWeights
from ream_hf.method.experts import Activation
from ream_hf.method.floor import merge_floor, routed_rows
from ream_hf.method.merging import neuron_merge, select_neurons
from ream_hf.method.refit import Routing, ridge_solve

SILU = Activation("glu", act_fn=nn.SiLU())
GPT_OSS = Activation("gpt_oss")


def experts(count, inner=6, hidden=10, seed=0, biased=False):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(count, inner, hidden), (count, inner, hidden), (count, hidden, inner)]
    if biased:
        shapes += [(count, inner), (count, inner), (count, hidden)]
    return ExpertWeights(*(torch.randn(s, generator=generator) for s in shapes))


def gated(one, activation, x, weight):
    """w(x) f(x) of the single expert `one` on tokens x (n, H), float64."""
    inputs, down = routed_rows(one, activation, x, weight)
    return inputs.double() @ down.T


def fit_error(u, t, prior, ridge):
    solved = ridge_solve((u.T @ u)[None], (t.T @ u)[None], prior[None], ridge)[0]
    return float(((u @ solved.T - t) ** 2).sum())


def test_greedy_selection_adds_the_neuron_that_lowers_the_ridge_fit_most():
    """Each step of `select_neurons` equals a brute-force search over the remaining candidates of the ridge fit's
    residual (ridge towards zero, the same lambda): the pivoted-Cholesky updates compute exactly that."""
    generator = torch.Generator().manual_seed(1)
    u = torch.randn(80, 12, generator=generator, dtype=torch.float64)
    u[:, 5] = u[:, 2] + 0.01 * u[:, 7]  # near-duplicates: a per-neuron score would pick both
    t = u[:, [2, 5, 9]] @ torch.randn(3, 4, generator=generator, dtype=torch.float64) + 0.1 * torch.randn(
        80, 4, generator=generator, dtype=torch.float64)
    ridge = 1e-3
    lam = ridge * float(torch.diagonal(u.T @ u).mean())
    chosen = select_neurons(u.T @ u, t.T @ u, 5, ridge).tolist()
    assert len(set(chosen)) == 5
    for step in range(5):
        def residual(columns):
            s = u[:, columns]
            w = torch.linalg.solve(s.T @ s + lam * torch.eye(len(columns), dtype=s.dtype), s.T @ t)
            return float(((t - s @ w) ** 2).sum() + lam * (w ** 2).sum())
        best = min((c for c in range(12) if c not in chosen[:step]), key=lambda c: residual(chosen[:step] + [c]))
        assert residual(chosen[: step + 1]) == pytest.approx(residual(chosen[:step] + [best]), rel=1e-9)


def group_problem(count=3, inner=6, hidden=10, tokens=240, seed=0, biased=False, activation=SILU):
    """A group (centroid first) and its gated output on tokens routed to its output expert."""
    group = experts(count, inner, hidden, seed, biased)
    generator = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(tokens, hidden, generator=generator)
    member_weights = torch.rand(tokens, count, generator=generator) * (torch.rand(tokens, count, generator=generator) < 0.6)
    goal = sum(gated(group.select([i]), activation, x, member_weights[:, i : i + 1]) for i in range(count)).float()
    weight = 0.2 + torch.rand(tokens, 1, generator=generator)
    return group, x, weight, goal


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("biased, activation", [(False, SILU), (True, GPT_OSS)])
def test_a_neuron_merge_fits_its_rows_at_least_as_well_as_the_centroid_alone(seed, biased, activation):
    group, x, weight, goal = group_problem(seed=seed, biased=biased, activation=activation)
    merged = neuron_merge(group, activation, x, weight, goal, 1e-3)
    assert merged.gate.shape == group.gate[:1].shape and merged.down.shape == group.down[:1].shape
    assert (merged.down_bias is None) == (not biased)
    # every kept neuron is one of the group's, with its exact gate and up rows (and biases)
    pool = torch.cat([group.gate.reshape(-1, group.gate.shape[2]), group.up.reshape(-1, group.up.shape[2])], dim=1)
    rows = torch.cat([merged.gate[0], merged.up[0]], dim=1)
    assert all(bool((pool == row).all(dim=1).any()) for row in rows)
    error = lambda one: float((gated(one, activation, x, weight) - goal.double()).pow(2).sum())  # noqa: E731
    centroid = group.select([0])
    assert error(merged) <= error(centroid) * (1 + 1e-6)
    inputs, prior = routed_rows(centroid, activation, x, weight)
    assert error(merged) <= fit_error(inputs.double(), goal.double(), prior, 1e-3) * (1 + 1e-6)


def test_the_floor_keeps_a_merge_only_where_held_out_sequences_say_it_beats_the_centroid():
    """Two groups over one sample: in [0, 1] the merged expert is the neuron merge of the group (fit on the
    non-held-out rows), in [2, 3] a random expert. After the floor each output expert's held-out error is at
    most its centroid's, and the random "merge" falls back."""
    source = experts(5, seed=3)
    generator = torch.Generator().manual_seed(4)
    tokens = 600
    x = torch.randn(tokens, 10, generator=generator)
    sequence = torch.arange(tokens) // 50  # 12 sequences of 50 tokens
    held_out = sequence % 4 == 0  # whole sequences
    original = Routing(torch.rand(tokens, 2, generator=generator),
                       torch.stack([torch.randint(0, 2, (tokens,), generator=generator),
                                    torch.randint(2, 4, (tokens,), generator=generator)], dim=1))
    compressed = Routing(0.3 + torch.rand(tokens, 2, generator=generator),
                         torch.stack([torch.zeros(tokens, dtype=torch.long), torch.ones(tokens, dtype=torch.long)], dim=1))
    groups = [[0, 1], [2, 3], [4]]
    from ream_hf.method.refit import _member_outputs
    goal = _member_outputs(source, SILU, x, original, [0, 1], torch.arange(tokens))
    fit = ~held_out
    neurons = neuron_merge(source.select([0, 1]), SILU, x[fit], compressed.weights[fit, :1], goal[fit], 1e-3)
    noise = experts(1, seed=9)
    merged = ExpertWeights(*(torch.cat([a, b, c[4:5]]) for a, b, c in zip(
        (neurons.gate, neurons.up, neurons.down), (noise.gate, noise.up, noise.down), (source.gate, source.up, source.down))))
    for ridge in (None, 1e-3):
        checks = merge_floor(source, merged, SILU, x, held_out, original, compressed, groups, ridge)
        assert checks[2] is None
        assert checks[1].merged is False and checks[1].heldout_error_merged > checks[1].heldout_error_centroid
        for check in checks[:2]:
            assert check.heldout_tokens == int(held_out.sum()) and check.fit_tokens == int(fit.sum())
            kept = check.heldout_error_merged if check.merged else check.heldout_error_centroid
            assert kept <= check.heldout_error_centroid
        assert checks[0].merged == (checks[0].heldout_error_merged < checks[0].heldout_error_centroid)
    # a group no held-out token reaches falls back: nothing shows its merge helps
    none_held = merge_floor(source, merged, SILU, x, torch.zeros(tokens, dtype=torch.bool), original, compressed, groups)
    assert [c is not None and c.merged for c in none_held] == [False, False, False]


# -- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_neuron_merge_end_to_end_keeps_exact_neuron_rows_and_fits_the_down_projection(family, calibration_txt,
                                                                                       tmp_path):
    """`--merge neurons` on a fused layout (Qwen3-MoE), a per-expert one (Mixtral) and GPT-OSS's biased, interleaved
    one, the floor off so merged groups stay: each merged output expert's gate/up rows (and biases) are neurons of
    its group's experts, its down projection is new, and the checkpoint reloads and runs. With the floor on, the
    manifest records each merged group's verdict and its held-out errors."""
    from transformers import AutoModelForCausalLM

    from ream_hf.arch import experts as experts_of, family_for_config, moe_block, read_expert_weights
    from tests.families import build_family_checkpoint, compress

    source = build_family_checkpoint(family, tmp_path / "source")
    compressor = compress(source, calibration_txt, tmp_path / "out", method="ream",
                          settings=dict(merge="neurons", prune_fallback=False,
                                                      layer_floor=False))
    arch = compressor.result.family
    before = AutoModelForCausalLM.from_pretrained(str(source)).eval()
    after = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    merged_groups = 0
    for report in compressor.result.layers:
        layer = lambda model: read_expert_weights(arch, experts_of(arch, moe_block(arch, model.model.layers[report.index])))  # noqa: E731
        src, out = layer(before), layer(after)
        for j, group in enumerate(report.plan.groups):
            if len(group.members) < 2:
                continue
            merged_groups += 1
            members = list(group.members)
            pool = torch.cat([src.gate[members], src.up[members]], dim=2).reshape(-1, 2 * src.gate.shape[2])
            rows = torch.cat([out.gate[j], out.up[j]], dim=1)
            matches = [(pool == row).all(dim=1).nonzero().flatten() for row in rows]
            assert all(m.numel() for m in matches), "every kept neuron is one of the group's, rows exact"
            if src.gate_bias is not None:
                biases = torch.stack([src.gate_bias[members].reshape(-1), src.up_bias[members].reshape(-1)], dim=1)
                assert all(bool((biases[m] == torch.stack([out.gate_bias[j, n], out.up_bias[j, n]])).all(dim=1).any())
                           for n, m in enumerate(matches))
            assert not any(torch.equal(out.down[j], src.down[m]) for m in members)
    assert merged_groups
    assert torch.isfinite(after(torch.tensor([[5, 6, 7, 8]])).logits).all()
    floored = compress(source, calibration_txt, tmp_path / "floor", method="ream", settings=dict(merge="neurons"))
    checks = [g["floor"] for entry in floored.manifest()["layers"] for g in entry["groups"] if "floor" in g]
    assert checks and all(set(c) >= {"merged", "heldout_error_merged", "heldout_error_centroid"} for c in checks)
    for entry in floored.manifest()["layers"]:
        for group in entry["groups"]:
            if "floor" in group and not group["floor"]["merged"]:
                assert group["members"] == [group["centroid"]], "a group that fell back is its centroid alone"


@pytest.mark.parametrize("family_name,refit_tokens", [("qwen3_moe", None), ("gpt_oss", None), ("qwen3_moe", 160)])
def test_the_layer_floor_falls_back_to_exactly_the_pruned_layer(family_name, refit_tokens, calibration_txt, tmp_path,
                                                                monkeypatch):
    """`layer_floor`: where the merged layer does not beat pruning on the held-out sequences, the layer is the pruned
    one, refit as REAP refits it. Forced here (the merged layer's held-out error made infinite), every layer falls
    back, so the whole checkpoint is REAP's, tensor for tensor (fused and GPT-OSS's biased layouts); unforced, each
    layer's record says which side won and by how much. With a refit sample smaller than REAM's layer sample (which
    alignment sizes: 160 of 384 tokens), the merging run's refit still draws REAP's tokens (`refit_sample`)."""
    import dataclasses

    from ream_hf.pipeline import layer as layer_module
    from tests.conftest import tensors
    from tests.families import build_family_checkpoint, compress

    source = build_family_checkpoint(family_name, tmp_path / "source")
    sample = {} if refit_tokens is None else dict(refit_tokens=refit_tokens)
    reap = compress(source, calibration_txt, tmp_path / "reap", method="reap", settings=sample)
    honest = compress(source, calibration_txt, tmp_path / "honest", method="ream",
                      settings=dict(layer_floor=True, prune_fallback=False, **sample))
    records = [entry["refit"]["layer_floor"] for entry in honest.manifest()["layers"]]
    assert records
    for record in records:
        assert record["merged"] == (record["heldout_error_merged"] < record["heldout_error_pruned"])
    refit_down = layer_module.refit_down
    monkeypatch.setattr(layer_module, "refit_down", lambda *args: dataclasses.replace(
        refit_down(*args), heldout_error_after=float("inf")))
    forced = compress(source, calibration_txt, tmp_path / "forced", method="ream",
                      settings=dict(layer_floor=True, prune_fallback=False, **sample))  # every group merged: all fall back
    records = [entry["refit"]["layer_floor"] for entry in forced.manifest()["layers"]]
    assert records and not any(record["merged"] for record in records)
    expected, got = tensors(tmp_path / "reap"), tensors(tmp_path / "forced")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
