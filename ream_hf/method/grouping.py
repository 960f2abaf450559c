"""Which source experts form each output expert (METHOD.md §3): REAM pseudo-pruning, M-SMoE, HC-SMoE, pruning.

Every function returns exactly k groups, each expert in at most one group (in exactly one when merging),
sorted by centroid index: output expert j is built from groups[j] and keeps router row groups[j].centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.cluster.hierarchy import linkage
from torch import Tensor


@dataclass(frozen=True)
class ExpertGroup:
    centroid: int
    members: tuple[int, ...]  # centroid first, then the others in the order they joined


def _check_target(num_experts: int, k: int) -> None:
    if not 1 <= k <= num_experts:
        raise ValueError(f"target of {k} experts is outside 1..{num_experts} for a layer of {num_experts} experts")


def check_group_capacity(num_experts: int, k: int, group_size: int) -> None:
    """REAM's pseudo-pruning puts at most `group_size` experts in each of the k groups, and every expert in one."""
    if k * group_size < num_experts:
        raise ValueError(
            f"{k} groups of at most group_size={group_size} cannot hold {num_experts} experts; "
            f"raise group_size to at least {math.ceil(num_experts / k)} or raise the target experts"
        )


def select_centroids(saliency: Tensor, k: int) -> list[int]:
    """The k most salient experts, most salient first; a stable sort makes ties go to the lower index."""
    _check_target(saliency.shape[0], k)
    order = torch.sort(saliency.detach().cpu().double(), descending=True, stable=True).indices
    return order[:k].tolist()


def _sorted(groups: list[ExpertGroup]) -> list[ExpertGroup]:
    return sorted(groups, key=lambda group: group.centroid)


def prune_groups(saliency: Tensor, k: int) -> list[ExpertGroup]:
    """Pruning (REAP / frequency): the top-k experts survive unchanged, the rest are dropped."""
    return _sorted([ExpertGroup(c, (c,)) for c in select_centroids(saliency, k)])


def distinct_centroids(saliency: Tensor, distance: Tensor, k: int, near: float) -> list[int]:
    """k centroids in descending saliency, skipping an expert within `near` (distance) of one already taken while
    others remain: near-copies rank alike, so the top-k by saliency keeps both copies of one expert and drops both of
    another, where keeping one of each loses nothing once the other is merged into it. Skipped experts fill the
    remaining places, most salient first, if too few distinct ones are left."""
    order = select_centroids(saliency, saliency.shape[0])
    close = (distance.detach().cpu().double() < near).tolist()
    taken: list[int] = []
    skipped: list[int] = []
    for expert in order:
        (skipped if any(close[expert][c] for c in taken) else taken).append(expert)
    return (taken + skipped)[:k]


def pseudo_prune_groups(saliency: Tensor, distance: Tensor, k: int, group_size: int,
                        near: float = 0.0) -> list[ExpertGroup]:
    """REAM: in descending saliency, each centroid takes up to group_size - 1 of its nearest unassigned
    non-centroids, so a few salient experts absorb many neighbours and most stay singletons. With `near` > 0 the
    centroids are `distinct_centroids`."""
    num_experts = saliency.shape[0]
    if distance.shape != (num_experts, num_experts):
        raise ValueError(f"distance must be ({num_experts}, {num_experts}) for {num_experts} experts, got {tuple(distance.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1 for pseudo-pruning, got {group_size}; use m_smoe_groups for the C=0 rule")
    _check_target(num_experts, k)
    check_group_capacity(num_experts, k, group_size)
    centroids = select_centroids(saliency, k) if near <= 0 else distinct_centroids(saliency, distance, k, near)
    nearest_first = torch.argsort(distance.detach().cpu().double(), dim=1, stable=True).tolist()
    taken = [False] * num_experts
    for c in centroids:
        taken[c] = True
    unassigned = num_experts - k
    groups = []
    for c in centroids:
        joined: list[int] = []
        for candidate in nearest_first[c]:
            if len(joined) == group_size - 1 or unassigned == 0:
                break
            if not taken[candidate]:
                taken[candidate] = True
                joined.append(candidate)
                unassigned -= 1
        groups.append(ExpertGroup(c, (c, *joined)))
    assert unassigned == 0, "pseudo-pruning left experts unassigned despite k * group_size >= E"
    return _sorted(groups)


def m_smoe_groups(saliency: Tensor, distance: Tensor, k: int) -> list[ExpertGroup]:
    """The C=0 rule (M-SMoE): every non-centroid joins its nearest centroid (ties: lower centroid index)."""
    num_experts = saliency.shape[0]
    if distance.shape != (num_experts, num_experts):
        raise ValueError(f"distance must be ({num_experts}, {num_experts}) for {num_experts} experts, got {tuple(distance.shape)}")
    centroids = sorted(select_centroids(saliency, k))
    to_centroids = distance.detach().cpu().double()[:, centroids]
    members: dict[int, list[int]] = {c: [c] for c in centroids}
    is_centroid = set(centroids)
    for expert in range(num_experts):
        if expert not in is_centroid:
            members[centroids[int(torch.argmin(to_centroids[expert]))]].append(expert)
    return [ExpertGroup(c, tuple(members[c])) for c in centroids]


def _cut_linkage(merges, num_items: int, k: int) -> list[list[int]]:
    """Clusters after the first num_items - k merges of a linkage: exactly k, even where merge heights tie
    (fcluster's maxclust cuts by height and returns fewer clusters when the cut falls on a tie)."""
    clusters: dict[int, list[int]] = {i: [i] for i in range(num_items)}
    for step in range(num_items - k):
        left, right = int(merges[step, 0]), int(merges[step, 1])
        clusters[num_items + step] = clusters.pop(left) + clusters.pop(right)
    return [sorted(members) for members in clusters.values()]


def hc_smoe_groups(features: Tensor, k: int, saliency: Tensor) -> list[ExpertGroup]:
    """HC-SMoE baseline: average-linkage clustering of the (E, H) expert output vectors into exactly k clusters;
    each cluster is represented by the member nearest its mean (ties: higher saliency, then lower index)."""
    num_experts = features.shape[0]
    _check_target(num_experts, k)
    points = features.detach().cpu().double()
    if num_experts == 1:
        return [ExpertGroup(0, (0,))]
    merges = linkage(points.numpy(), method="average", metric="euclidean")
    scores = saliency.detach().cpu().double()
    groups = []
    for members in _cut_linkage(merges, num_experts, k):
        cluster = points[members]
        to_mean = torch.linalg.vector_norm(cluster - cluster.mean(dim=0), dim=1).tolist()
        representative = min(members, key=lambda e: (to_mean[members.index(e)], -float(scores[e]), e))
        groups.append(ExpertGroup(representative, (representative, *(m for m in members if m != representative))))
    return _sorted(groups)


def merge_weights(saliency: Tensor, group: ExpertGroup) -> Tensor:
    """Members' saliency normalised to sum 1 (float64), uniform when all are 0 so the group still merges."""
    weights = saliency.detach().cpu().double()[list(group.members)].clamp(min=0.0)
    total = weights.sum()
    if total <= 0:
        return torch.full_like(weights, 1.0 / len(group.members))
    return weights / total
