import math

import pytest
import torch

from ream_hf.method.grouping import (
    ExpertGroup,
    hc_smoe_groups,
    m_smoe_groups,
    merge_weights,
    prune_groups,
    pseudo_prune_groups,
    select_centroids,
)


def random_distance(num_experts: int, generator: torch.Generator) -> torch.Tensor:
    points = torch.randn(num_experts, 4, generator=generator)
    distance = torch.cdist(points, points)
    distance.fill_diagonal_(0)
    return distance


def check_partition(groups: list[ExpertGroup], num_experts: int, k: int, centroids: list[int]) -> None:
    assert len(groups) == k
    members = [m for g in groups for m in g.members]
    assert sorted(members) == list(range(num_experts))
    assert [g.centroid for g in groups] == sorted(centroids)
    assert all(g.members[0] == g.centroid for g in groups)


def test_select_centroids_descending_ties_to_lower_index():
    saliency = torch.tensor([0.5, 2.0, 0.5, 2.0, 1.0])
    assert select_centroids(saliency, 4) == [1, 3, 4, 0]


def test_prune_groups_keeps_top_k_as_singletons_sorted_by_index():
    groups = prune_groups(torch.tensor([0.1, 3.0, 0.0, 2.0]), 2)
    assert groups == [ExpertGroup(1, (1,)), ExpertGroup(3, (3,))]


def test_pseudo_prune_random_cases_respect_group_size_and_target():
    generator = torch.Generator().manual_seed(0)
    for case in range(50):
        num_experts = int(torch.randint(2, 40, (1,), generator=generator))
        group_size = int(torch.randint(1, 9, (1,), generator=generator))
        lowest = math.ceil(num_experts / group_size)
        k = int(torch.randint(lowest, num_experts + 1, (1,), generator=generator))
        saliency = torch.rand(num_experts, generator=generator)
        saliency[torch.rand(num_experts, generator=generator) < 0.2] = 0.0
        groups = pseudo_prune_groups(saliency, random_distance(num_experts, generator), k, group_size)
        check_partition(groups, num_experts, k, select_centroids(saliency, k))
        assert max(len(g.members) for g in groups) <= group_size, case


def test_pseudo_prune_takes_nearest_unassigned_in_saliency_order():
    # experts on a line; 0 and 4 are centroids (most salient first: 4), group_size 3
    positions = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.5, 10.0])
    distance = (positions[:, None] - positions[None, :]).abs()
    saliency = torch.tensor([2.0, 0.1, 0.1, 0.1, 5.0, 0.1])
    groups = pseudo_prune_groups(saliency, distance, 2, 3)
    assert groups == [ExpertGroup(0, (0, 1, 5)), ExpertGroup(4, (4, 3, 2))]


def test_pseudo_prune_centroids_are_never_absorbed():
    # every centroid is nearest to another centroid: a fork that lets centroids join earlier groups ends
    # with about E / C groups instead of k
    positions = torch.tensor([0.0, 0.1, 0.2, 0.3, 5.0, 6.0, 7.0, 8.0])
    distance = (positions[:, None] - positions[None, :]).abs()
    saliency = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    groups = pseudo_prune_groups(saliency, distance, 4, 4)
    check_partition(groups, 8, 4, [0, 1, 2, 3])
    assert groups[0] == ExpertGroup(0, (0, 4, 5, 6))
    assert groups[1] == ExpertGroup(1, (1, 7))


def test_pseudo_prune_never_routed_expert_is_kept_in_a_group():
    saliency = torch.tensor([1.0, 0.0, 0.5, 0.0])
    distance = random_distance(4, torch.Generator().manual_seed(3))
    groups = pseudo_prune_groups(saliency, distance, 2, 2)
    check_partition(groups, 4, 2, [0, 2])


def test_pseudo_prune_refuses_target_below_experts_over_group_size():
    with pytest.raises(ValueError, match="group_size"):
        pseudo_prune_groups(torch.rand(16), torch.zeros(16, 16), 3, 4)
    assert len(pseudo_prune_groups(torch.rand(16), torch.zeros(16, 16), 4, 4)) == 4


def test_m_smoe_every_non_centroid_joins_nearest_centroid():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        saliency = torch.rand(12, generator=generator)
        distance = random_distance(12, generator)
        groups = m_smoe_groups(saliency, distance, 4)
        centroids = select_centroids(saliency, 4)
        check_partition(groups, 12, 4, centroids)
        owner = {m: g.centroid for g in groups for m in g.members}
        for expert in set(range(12)) - set(centroids):
            nearest = min(sorted(centroids), key=lambda c: float(distance[expert, c]))
            assert owner[expert] == nearest


def test_hc_smoe_recovers_separated_clusters_and_mean_representatives():
    generator = torch.Generator().manual_seed(2)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    features = centres[labels] + 0.5 * torch.randn(10, 2, generator=generator)
    groups = hc_smoe_groups(features, 3, torch.rand(10, generator=generator))
    assert len(groups) == 3
    for group in groups:
        members = sorted(group.members)
        assert members == [i for i, label in enumerate(labels) if label == labels[group.centroid]]
        to_mean = (features[members] - features[members].mean(0)).norm(dim=1)
        assert group.centroid == members[int(torch.argmin(to_mean))]
        assert list(group.members[1:]) == sorted(group.members[1:])
    assert [g.centroid for g in groups] == sorted(g.centroid for g in groups)


def test_hc_smoe_exact_k_when_merge_heights_tie():
    # square corners: two merges at the same height, where a height cut can only give 4 or 2 clusters
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [1.0, 3.0]])
    for k in (1, 2, 3, 4):
        groups = hc_smoe_groups(features, k, torch.ones(4))
        assert len(groups) == k
        assert sorted(m for g in groups for m in g.members) == [0, 1, 2, 3]


def test_merge_weights_normalised_and_uniform_for_zero_saliency():
    saliency = torch.tensor([3.0, 0.0, 1.0, 0.0])
    weights = merge_weights(saliency, ExpertGroup(0, (0, 2, 1)))
    assert torch.allclose(weights, torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64))
    assert float(weights.sum()) == pytest.approx(1.0)
    uniform = merge_weights(saliency, ExpertGroup(1, (1, 3)))
    assert torch.equal(uniform, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_distinct_centroids_keep_one_of_each_near_copy_pair():
    """Eight experts as four near-copy pairs (2i, 2i + 1) of descending saliency: the top 4 by saliency are two whole
    pairs; distinct centroids keep one of each pair, and pseudo-pruning then merges each copy into its twin. Without
    `near` the rule is the paper's (the top 4)."""
    saliency = torch.tensor([8.0, 7.9, 6.0, 5.9, 4.0, 3.9, 2.0, 1.9])
    pair = torch.arange(8) // 2
    distance = torch.where(pair[:, None] == pair[None, :], 0.01, 0.8)
    distance.fill_diagonal_(0)
    assert select_centroids(saliency, 4) == [0, 1, 2, 3]
    groups = pseudo_prune_groups(saliency, distance, 4, 2, near=0.05)
    assert [g.members for g in groups] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert pseudo_prune_groups(saliency, distance, 4, 2) == pseudo_prune_groups(saliency, distance, 4, 2, near=0.0)
    assert [g.centroid for g in pseudo_prune_groups(saliency, distance, 4, 2)] == [0, 1, 2, 3]
    # fewer distinct experts than places: the skipped copies fill them, most salient first
    assert [g.centroid for g in pseudo_prune_groups(saliency, distance, 6, 2, near=0.05)] == [0, 1, 2, 3, 4, 6]
