import pytest
import torch
import torch.nn.functional as F

from ream_hf.method.merging import (
    ActivationGram,
    align_to_centroid,
    alignment_cost,
    merge_expert_group,
    merge_group,
    permute_expert,
    weight_features,
)

INNER, HIDDEN, TOKENS = 12, 8, 64


def random_experts(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    gate = torch.randn(count, INNER, HIDDEN, generator=generator)
    up = torch.randn(count, INNER, HIDDEN, generator=generator)
    down = torch.randn(count, HIDDEN, INNER, generator=generator)
    return gate, up, down


def hidden_acts(gate: torch.Tensor, up: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.silu(tokens @ gate.transpose(-1, -2)) * (tokens @ up.transpose(-1, -2))


def expert_out(gate, up, down, tokens, gate_bias=None, up_bias=None):
    g, u = tokens @ gate.T, tokens @ up.T
    if gate_bias is not None:
        g, u = g + gate_bias, u + up_bias
    return (F.silu(g) * u) @ down.T


def permuted_group(seed: int = 0):
    """Experts [centroid, neuron-permuted copy of it, unrelated], with activations on shared tokens."""
    gate, up, down = random_experts(3, seed)
    shuffle = torch.randperm(INNER, generator=torch.Generator().manual_seed(seed + 100))
    gate[1], up[1], down[1] = gate[0][shuffle], up[0][shuffle], down[0][:, shuffle]
    tokens = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(seed + 200))
    acts = hidden_acts(gate, up, tokens)  # (3, Ts, D)
    return gate, up, down, shuffle, acts


def test_identical_experts_merge_to_themselves():
    gate, up, down = random_experts(1)
    group = [t.expand(2, *t.shape[1:]).clone() for t in (gate, up, down)]
    feats = weight_features(*group)
    acts = hidden_acts(group[0], group[1], torch.randn(TOKENS, HIDDEN))
    for mode in ("activations+weights", "activations", "weights", "avg", "none"):
        for weights in ([0.5, 0.5], [0.3, 0.7], [1.0, 0.0]):
            merged = merge_expert_group(*group, torch.tensor(weights), mode, acts=acts, feats=feats)
            for got, want in zip(merged[:3], (gate[0], up[0], down[0])):
                assert torch.allclose(got, want, atol=1e-6), (mode, weights)


@pytest.mark.parametrize("mode", ["activations+weights", "weights", "activations"])
def test_permuted_copy_is_aligned_back_exactly(mode):
    gate, up, down, shuffle, acts = permuted_group()
    feats = weight_features(gate, up, down)
    cost = alignment_cost(acts[0], acts[1], feats[0], feats[1], mode)
    perm = align_to_centroid(cost)
    assert torch.equal(perm, torch.argsort(shuffle))
    assert torch.equal(gate[1][perm], gate[0])
    merged = merge_expert_group(gate[:2], up[:2], down[:2], torch.tensor([0.4, 0.6]), mode, acts=acts[:2], feats=feats[:2])
    for got, want in zip(merged[:3], (gate[0], up[0], down[0])):
        assert torch.allclose(got, want, atol=1e-6)


def test_avg_without_alignment_does_not_recover_the_permuted_copy():
    gate, up, down, _, _ = permuted_group()
    merged_gate, _, _, _ = merge_expert_group(gate[:2], up[:2], down[:2], torch.tensor([0.9, 0.1]), "avg")
    assert torch.allclose(merged_gate, (gate[0] + gate[1]) / 2, atol=1e-6)
    assert not torch.allclose(merged_gate, gate[0], atol=1e-3)


def test_none_keeps_the_centroid_and_single_member_groups_are_unchanged():
    gate, up, down = random_experts(3)
    kept = merge_expert_group(gate, up, down, torch.tensor([0.2, 0.3, 0.5]), "none")
    assert all(torch.equal(a, b) for a, b in zip(kept[:3], (gate[0], up[0], down[0])))
    alone = merge_expert_group(gate[:1], up[:1], down[:1], torch.tensor([1.0]), "activations+weights")
    assert all(torch.equal(a, b) for a, b in zip(alone[:3], (gate[0], up[0], down[0])))


def test_permute_expert_keeps_the_function():
    gate, up, down = random_experts(1, seed=4)
    gate_bias, up_bias = torch.randn(INNER), torch.randn(INNER)
    perm = torch.randperm(INNER, generator=torch.Generator().manual_seed(5))
    tokens = torch.randn(5, HIDDEN)
    permuted = permute_expert(gate[0], up[0], down[0], perm, gate_bias, up_bias)
    want = expert_out(gate[0], up[0], down[0], tokens, gate_bias, up_bias)
    assert torch.allclose(expert_out(*permuted[:3], tokens, *permuted[3:]), want, atol=1e-5)


def test_merge_group_weighted_sum_with_perms_biases_and_dtype():
    gate, up, down = random_experts(2, seed=6)
    biases = {"gate_bias": torch.randn(2, INNER), "up_bias": torch.randn(2, INNER), "down_bias": torch.randn(2, HIDDEN)}
    perm = torch.randperm(INNER, generator=torch.Generator().manual_seed(7))
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    merged_gate, merged_up, merged_down, merged_biases = merge_group(
        gate.bfloat16(), up.bfloat16(), down.bfloat16(), weights, perms=[torch.arange(INNER), perm],
        biases={k: v.bfloat16() for k, v in biases.items()},
    )
    assert merged_gate.dtype == torch.bfloat16 and merged_biases["down_bias"].dtype == torch.bfloat16
    b = {k: v.bfloat16().float() for k, v in biases.items()}
    g, u, d = gate.bfloat16().float(), up.bfloat16().float(), down.bfloat16().float()
    assert torch.allclose(merged_gate.float(), 0.25 * g[0] + 0.75 * g[1][perm], atol=2e-2)
    assert torch.allclose(merged_up.float(), 0.25 * u[0] + 0.75 * u[1][perm], atol=2e-2)
    assert torch.allclose(merged_down.float(), 0.25 * d[0] + 0.75 * d[1][:, perm], atol=2e-2)
    assert torch.allclose(merged_biases["up_bias"].float(), 0.25 * b["up_bias"][0] + 0.75 * b["up_bias"][1][perm], atol=2e-2)
    assert torch.allclose(merged_biases["down_bias"].float(), 0.25 * b["down_bias"][0] + 0.75 * b["down_bias"][1], atol=2e-2)
    assert merge_group(gate, up, down, weights)[3] == {}


def test_weight_features_shape_and_determinism():
    gate, up, down = random_experts(4, seed=8)
    feats = weight_features(gate, up, down, dim=5)
    assert feats.shape == (4, INNER, 5)
    assert torch.equal(feats, weight_features(gate, up, down, dim=5))
    assert weight_features(gate, up, down).shape == (4, INNER, 3 * HIDDEN)


def exact_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")


def test_weight_features_full_dim_preserves_distances_and_low_dim_matches_exact_pca():
    gate, up, down = random_experts(3, seed=9)
    rows = torch.cat([gate, up, down.transpose(1, 2)], dim=2).reshape(-1, 3 * HIDDEN)
    rows = rows / rows.norm(dim=1, keepdim=True)
    full = weight_features(gate, up, down, kind="plain").reshape(-1, 3 * HIDDEN)
    assert torch.allclose(exact_cdist(full, full), exact_cdist(rows, rows), atol=1e-5)
    # low-rank data: the top-3 subspace must match an exact SVD's
    generator = torch.Generator().manual_seed(10)
    basis = torch.randn(3, 3 * HIDDEN, generator=generator)
    rows = torch.randn(3 * INNER, 3, generator=generator) @ basis + 1e-4 * torch.randn(3 * INNER, 3 * HIDDEN, generator=generator)
    gate, up, down_t = rows.reshape(3, INNER, 3 * HIDDEN).split(HIDDEN, dim=2)
    feats = weight_features(gate, up, down_t.transpose(1, 2), dim=3, kind="plain").reshape(-1, 3)
    unit = rows / rows.norm(dim=1, keepdim=True)
    centred = unit - unit.mean(0)
    svd = torch.linalg.svd(centred, full_matrices=False)
    exact = centred @ svd.Vh[:3].T
    assert torch.allclose(exact_cdist(feats, feats), exact_cdist(exact, exact), atol=1e-4)
    # "scaled" (the reference's): the projection times the singular values, rows back to unit length
    scaled = weight_features(gate, up, down_t.transpose(1, 2), dim=3).reshape(-1, 3)
    exact_scaled = exact * svd.S[:3]
    exact_scaled = exact_scaled / exact_scaled.norm(dim=1, keepdim=True)
    assert torch.allclose(scaled.norm(dim=1), torch.ones(scaled.shape[0]), atol=1e-5)
    assert torch.allclose(exact_cdist(scaled, scaled), exact_cdist(exact_scaled, exact_scaled), atol=1e-4)


def test_weight_feature_kind_is_checked():
    with pytest.raises(ValueError, match="weight feature kind"):
        weight_features(*random_experts(2), kind="fancy")


def test_alignment_cost_checks_mode_and_inputs():
    acts = torch.randn(TOKENS, INNER)
    with pytest.raises(ValueError, match="alignment mode"):
        alignment_cost(acts, acts, None, None, "avg")
    with pytest.raises(ValueError, match="activation"):
        alignment_cost(None, None, torch.randn(INNER, 4), torch.randn(INNER, 4), "activations")
    with pytest.raises(ValueError, match="weight features"):
        alignment_cost(acts, acts, None, None, "activations+weights")
    cost = alignment_cost(acts, 3.0 * acts, None, None, "activations")  # activations are normalised per neuron
    assert cost.shape == (INNER, INNER)
    assert torch.allclose(torch.diagonal(cost), torch.zeros(INNER), atol=1e-3)


def test_activation_gram_over_chunks_equals_cdist_of_unit_columns():
    generator = torch.Generator().manual_seed(11)
    acts = torch.randn(3, TOKENS, INNER, generator=generator)
    acts[1, :, 2] = 0.0  # a dead neuron: its column stays a zero vector, as before normalisation
    gram = ActivationGram(3, INNER)
    for start in range(0, TOKENS, 10):  # uneven chunks
        gram.add(acts[:, start : start + 10])
    columns = acts.double().transpose(1, 2)
    norms = columns.norm(dim=2, keepdim=True)
    unit = columns / torch.where(norms > 0, norms, torch.ones_like(norms))
    for member in (1, 2):
        want = exact_cdist(unit[0], unit[member]).float()
        assert torch.allclose(gram.distance(member), want, atol=1e-5)
        assert torch.allclose(ActivationGram.of(acts).distance(member), want, atol=1e-5)
    assert torch.allclose(gram.distance(1)[:, 2], torch.ones(INNER, dtype=torch.float32), atol=1e-6)


def test_weight_features_built_a_few_experts_at_a_time_match_one_block(monkeypatch):
    from ream_hf.method import merging

    gate, up, down = random_experts(5, seed=12)
    whole = weight_features(gate, up, down, dim=6, kind="plain")
    monkeypatch.setattr(merging, "FEATURE_CHUNK_BYTES", 1)  # one expert's neurons per block
    chunked = weight_features(gate, up, down, dim=6, kind="plain")
    assert chunked.shape == whole.shape == (5, INNER, 6)
    # the same PCA up to rounding: directions may flip sign, distances between neurons may not change
    flat_whole, flat_chunked = whole.reshape(-1, 6).double(), chunked.reshape(-1, 6).double()
    assert torch.allclose(exact_cdist(flat_chunked, flat_chunked), exact_cdist(flat_whole, flat_whole), atol=1e-4)
