import torch

from ream_hf.method.similarity import expert_distance, gate_similarity, gate_similarity_from_gram, logit_gram, output_similarity


def test_output_similarity_identical_is_one_opposite_is_zero():
    v = torch.tensor([1.0, -2.0, 3.0])
    sim = output_similarity(torch.stack([v, 2 * v, -v]))
    assert torch.allclose(sim[0, 1], torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(sim[0, 2], torch.tensor(0.0), atol=1e-6)
    assert sim.dtype == torch.float32


def test_output_similarity_orthogonal_is_half_and_zero_vector_is_not_nan():
    outputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    sim = output_similarity(outputs)
    assert not torch.isnan(sim).any()
    assert torch.allclose(sim[0, 1], torch.tensor(0.5))
    assert torch.allclose(sim[2], torch.full((3,), 0.5))


def test_output_similarity_tiny_vectors_keep_their_direction():
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    sim = output_similarity(torch.stack([v * 1e-30, v * 1e-25]))
    assert torch.allclose(sim[0, 1], torch.tensor(1.0), atol=1e-6)


def test_gate_similarity_symmetric_unit_diagonal_scaled_by_max():
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    sim = gate_similarity(logits)
    assert torch.equal(sim, sim.T)
    assert torch.equal(torch.diagonal(sim), torch.ones(6))
    assert torch.isclose(sim.min(), torch.tensor(0.0), atol=1e-6)
    # columns are normalised over tokens: scaling one expert's column changes nothing
    scaled = logits.clone()
    scaled[:, 2] *= 7.0
    assert torch.allclose(gate_similarity(scaled), sim, atol=1e-5)


def test_gate_similarity_all_equal_columns_is_all_ones():
    logits = torch.ones(10, 4)
    assert torch.equal(gate_similarity(logits), torch.ones(4, 4))


def test_expert_distance_combines_terms_with_zero_diagonal():
    torch.manual_seed(1)
    outputs, logits = torch.randn(5, 8), torch.randn(30, 5)
    distance = expert_distance(outputs, logit_gram(logits))
    expected = 1 - (output_similarity(outputs) + gate_similarity(logits)) / 2
    expected.fill_diagonal_(0)
    assert torch.allclose(distance, expected, atol=1e-6)
    assert torch.equal(torch.diagonal(distance), torch.zeros(5))
    assert torch.equal(distance, distance.T)
    alone = expert_distance(outputs, None)
    assert torch.allclose(alone, (1 - output_similarity(outputs)).fill_diagonal_(0), atol=1e-6)
    assert torch.equal(torch.diagonal(expert_distance(torch.zeros(3, 4), None)), torch.zeros(3))


def test_gate_similarity_from_chunked_gram_equals_cdist_of_unit_columns():
    torch.manual_seed(2)
    logits = torch.randn(40, 6)
    logits[:, 4] = 0.0  # a column of zeros stays a zero vector: distance 1 to every unit column
    gram = sum(logit_gram(logits[start : start + 7]) for start in range(0, 40, 7))
    columns = logits.double().T
    norms = columns.norm(dim=1, keepdim=True)
    unit = columns / torch.where(norms > 0, norms, torch.ones_like(norms))
    distance = torch.cdist(unit, unit, compute_mode="donot_use_mm_for_euclid_dist")
    distance.fill_diagonal_(0)
    want = (1 - distance / distance.max()).float()
    assert torch.allclose(gate_similarity_from_gram(gram), want, atol=1e-6)
    assert torch.allclose(gate_similarity(logits), want, atol=1e-6)
