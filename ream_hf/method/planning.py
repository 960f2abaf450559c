"""From a layer's statistics to its plan: which source experts form each output expert, and how merged.

Grouped routing (DeepSeek-V3, GLM-4.5 with n_group > 1) routes within fixed blocks of consecutive
experts, so every routing group keeps the same number of experts and groups never cross blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ReamConfig
from .grouping import (
    ExpertGroup,
    check_group_capacity,
    hc_smoe_groups,
    m_smoe_groups,
    merge_weights,
    prune_groups,
    pseudo_prune_groups,
)
from .similarity import expert_distance
from .stats import LayerStatistics, saliency_name


@dataclass
class LayerPlan:
    groups: list[ExpertGroup]  # output expert j = groups[j]
    weights: list[list[float]]  # merge weight of each member, same order as groups[j].members
    scores: torch.Tensor  # the ranking criterion: saliency, or frequency for "frequency"

    @property
    def centroids(self) -> list[int]:
        return [g.centroid for g in self.groups]


def ranking_scores(config: ReamConfig, stats: LayerStatistics) -> torch.Tensor:
    """The configured saliency (config.saliency, config.saliency_mean) of every expert, float64 (E,)."""
    if config.saliency == "frequency":
        return stats.frequency.double()
    if stats.saliency is None:
        raise ValueError(f"saliency={config.saliency!r} needs expert outputs, which these statistics lack "
                         "(collected for frequency pruning)")
    return stats.saliency[saliency_name(config.saliency, config.saliency_mean)]


def merge_saliency(saliency: torch.Tensor) -> torch.Tensor:
    """Never-routed experts get saliency 0; raise them to min(0.5, smallest non-zero) so they still merge."""
    positive = saliency[saliency > 0]
    floor = min(0.5, float(positive.min())) if positive.numel() else 1.0
    return torch.where(saliency > 0, saliency, torch.full_like(saliency, floor))


def pseudo_prunes(config: ReamConfig, group_size: int) -> bool:
    """Whether the plan is REAM's pseudo-pruning (groups of at most `group_size`, the resolved C), not the C=0
    (M-SMoE) rule."""
    return config.method == "ream" and group_size != 0


def check_plan(config: ReamConfig, num_experts: int, target: int) -> None:
    """Refuse, before any statistics are gathered, a plan no layer can follow: `target` groups of at most
    `group_size` experts (the resolved one: E / 8 when not given) must hold all `num_experts` (within each routing
    group too: its share of both, the same ratio, since the target is a multiple of the group count)."""
    group_size = config.resolve_group_size(num_experts, target)
    if pseudo_prunes(config, group_size):
        check_group_capacity(num_experts, target, group_size)


def _groups_for_block(config: ReamConfig, stats: LayerStatistics, experts: list[int], target: int,
                      group_size: int) -> list[ExpertGroup]:
    """Groups over the subset `experts` (one routing group) with local statistics, mapped back to global ids."""
    index = torch.tensor(experts)
    scores = ranking_scores(config, stats)[index]
    if not config.is_merging:
        local = prune_groups(scores, target)
    elif config.method == "hc_smoe":
        local = hc_smoe_groups(stats.output_signatures[index], target, scores)
    else:
        gram = stats.router_logit_gram
        gram = gram[index][:, index] if (config.use_router_logits and gram is not None) else None
        distance = expert_distance(stats.output_signatures[index], gram)
        if pseudo_prunes(config, group_size):
            local = pseudo_prune_groups(scores, distance, target, group_size)
        else:
            local = m_smoe_groups(scores, distance, target)
    return [ExpertGroup(experts[g.centroid], tuple(experts[m] for m in g.members)) for g in local]


def plan_layer(config: ReamConfig, stats: LayerStatistics, target: int, routing_groups: int = 1) -> LayerPlan:
    num_experts = stats.frequency.shape[0]
    block = num_experts // routing_groups
    group_size = config.resolve_group_size(num_experts, target)
    groups: list[ExpertGroup] = []
    for start in range(0, num_experts, block):
        groups += _groups_for_block(config, stats, list(range(start, start + block)), target // routing_groups,
                                    group_size)
    groups.sort(key=lambda g: g.centroid)
    scores = ranking_scores(config, stats)
    weight_source = merge_saliency(scores) if config.is_merging else scores
    weights = [merge_weights(weight_source, g).tolist() for g in groups]
    return LayerPlan(groups, weights, scores)
