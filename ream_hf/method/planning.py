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
from .refit import RIDGE_GRID, refit_flops
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
            local = pseudo_prune_groups(scores, distance, target, group_size, config.distinct_centroids)
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


@dataclass(frozen=True)
class LayerWork:
    """What one MoE layer's stages compute, counted from the shapes (`ream-hf plan` divides these by measured
    rates): floating-point operations of each stage's GEMMs, and the Hungarian matchings of the alignment, whose
    cost grows with D faster than any GEMM's (scipy's `linear_sum_assignment`, cubic in D at worst)."""

    statistics_flops: float  # the statistics pass as executed: gate/up of every expert (merging) or the routed ones
    feature_flops: float  # the weight features' randomized PCA over every neuron of the layer (merging with weights)
    alignment_flops: float  # the groups' activations on the alignment sample and their Gram sums
    matchings: int  # Hungarian matchings of D x D costs: one per merged member that is not its group's centroid
    refit_flops: float  # the corrections on the refit sample: routed passes, per-step errors, per-expert solves
    forward_flops: float  # the re-forward of the compressed layer on every calibration token (attention included)

    @property
    def gemm_flops(self) -> float:
        return self.statistics_flops + self.feature_flops + self.alignment_flops + self.refit_flops + self.forward_flops


def layer_work(config: ReamConfig, *, hidden: int, inner: int, experts: int, target: int, top_k: int, tokens: int,
               dense_params: int, attention_width: int, sequence_length: int) -> LayerWork:
    """The work of one compressed MoE layer of `experts` experts (H = `hidden`, D = `inner`) kept to `target`, on
    `tokens` calibration tokens. `dense_params`: the layer's parameters outside its experts (attention, router,
    norms), each a multiply-add per token in the re-forward; `attention_width`: query heads x head dim, for the
    attention scores over `sequence_length` positions."""
    expert_gemm = 2 * hidden * inner  # one projection of one expert on one token
    routed = 3 * expert_gemm * top_k  # a token through its top-k experts
    if config.is_merging:  # gate/up of every expert on every token (the down projection once per expert, linearity)
        statistics = (2 * expert_gemm * experts + expert_gemm * top_k) * tokens
    elif config.method == "reap" or config.saliency != "frequency":
        statistics = routed * tokens
    else:
        statistics = 0.0
    features = alignment = 0.0
    matchings = 0
    if config.is_merging and target < experts and config.merge in ("activations+weights", "activations", "weights"):
        matchings = experts - target  # every expert is in one of `target` groups: the non-centroids are aligned
        group_size = max(2, config.resolve_group_size(experts, target))
        members = matchings + -(-matchings // (group_size - 1))  # and the centroids of the multi-member groups
        if "weights" in config.merge:  # about ten passes of (E D, 3H) neuron rows times (3H, p + 10) bases
            width = min(config.pca_dim + 10, 3 * hidden)
            features = 10 * 2 * experts * inner * 3 * hidden * width + matchings * 3 * inner * inner * config.pca_dim
        if "activations" in config.merge:  # gate/up of each member on the sample, then its columns' dots (D x D)
            sample = min(config.activation_sample_tokens, tokens)
            alignment = members * sample * (2 * expert_gemm + 2 * inner * inner)
    refit = 0.0
    refit_tokens = min(config.refit_tokens, tokens) if "down" in config.refit else 0
    if refit_tokens:  # the down refit and its held-out check (method/refit.py counts its work)
        steps = 1 if config.refit_target == "group" else config.refit_steps
        refit = refit_flops(refit_tokens, top_k, inner, hidden, target, len(RIDGE_GRID), steps)
        if config.is_merging and config.layer_floor and target < experts:
            # the layer floor's second refit (the layer pruned), which reuses the source's outputs on the sample
            refit += refit - 6.0 * hidden * inner * top_k * refit_tokens
    forward = (routed + 2 * dense_params + 4 * sequence_length * attention_width) * tokens
    return LayerWork(float(statistics), float(features), float(alignment), matchings, float(refit), float(forward))
