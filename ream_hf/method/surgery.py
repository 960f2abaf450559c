"""Applying a layer's grouping to the in-memory model: experts replaced, router rows kept by centroid."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import (ExpertWeights, MoEFamily, experts, read_expert_weights, router_tensors, set_router_tensor,
                    write_expert_weights)


def check_grouped_routing(family: MoEFamily, config, target: int, top_k: int) -> None:
    """Grouped top-k (DeepSeek-V3, GLM-4.5) needs the same number of experts in each routing group."""
    if family.group_keys is None:
        return
    n_group = int(getattr(config, family.group_keys[0], 1) or 1)
    topk_group = int(getattr(config, family.group_keys[1], 1) or 1)
    if n_group <= 1:
        return
    if target % n_group:
        raise ValueError(
            f"target_experts={target} is not divisible by n_group={n_group}: grouped routing needs equal groups; "
            f"choose a multiple of {n_group}"
        )
    per_group = target // n_group
    if per_group < 2 or per_group * topk_group < top_k:
        raise ValueError(
            f"target_experts={target} leaves {per_group} experts in each of {n_group} routing groups, too few for "
            f"top-{top_k} over {topk_group} groups; keep at least {n_group * max(2, -(-top_k // topk_group))}"
        )


def routing_groups(family: MoEFamily, config) -> int:
    if family.group_keys is None:
        return 1
    return int(getattr(config, family.group_keys[0], 1) or 1)


def replace_router_rows(family: MoEFamily, block: nn.Module, keep: list[int]) -> None:
    """The block's router tensors cut to rows `keep` (on each tensor's expert dimension), wherever they live."""
    index = torch.tensor(keep, dtype=torch.long)
    for name, tensor in router_tensors(family, block).items():
        dim = family.router_expert_dims.get(name, 0)
        set_router_tensor(family, block, name, tensor.detach().index_select(dim, index.to(tensor.device)).clone())
    getattr(block, family.router_attr).num_experts = len(keep)


def apply_layer_plan(
    family: MoEFamily, block: nn.Module, centroids: list[int], merged: ExpertWeights | None = None
) -> None:
    """Output expert j takes `merged[j]` (or source expert centroids[j] when pruning) and router row centroids[j]."""
    experts_module = experts(family, block)
    weights = merged if merged is not None else read_expert_weights(family, experts_module).select(centroids)
    write_expert_weights(family, experts_module, weights)
    replace_router_rows(family, block, centroids)
    if hasattr(block, "num_experts"):
        block.num_experts = len(centroids)
