"""Where a loaded model keeps its decoder layers, MoE blocks, routers and experts (by the family's declaration)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .families import MoEFamily


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (the text tower of a VLM)."""
    base = getattr(model, "model", model)
    for path in ("layers", "language_model.layers"):
        target: Any = base
        for part in path.split("."):
            target = getattr(target, part, None)
        if isinstance(target, nn.ModuleList):
            return target
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}")


def moe_block(family: MoEFamily, layer: nn.Module) -> nn.Module | None:
    """The layer's MoE block, or None for a dense layer (first_k_dense_replace, mlp_only_layers)."""
    block = getattr(layer, family.block_attr, None)
    experts = getattr(block, family.experts_attr, None) if block is not None else None
    if experts is None or not hasattr(experts, "down_proj"):
        return None
    return block


def router(family: MoEFamily, block: nn.Module) -> nn.Module:
    return getattr(block, family.router_attr)


def experts(family: MoEFamily, block: nn.Module) -> nn.Module:
    return getattr(block, family.experts_attr)
