"""Where a loaded model keeps its decoder layers, MoE blocks, routers and experts (by the family's declaration)."""

from __future__ import annotations

from typing import Any

import torch
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


class RouterView(nn.Module):
    """A router called as every family's is, `router(x) -> (logits, top-k weights, top-k indices)`, where the
    family's own module needs more (MiniMax-M2 passes its block's `e_score_correction_bias`), keeps its weight
    deeper (Hunyuan: `gate.wg.weight`), returns them in another order (Granite-MoE), reads a batch of sequences
    (AFMoE) or is a plain Linear whose logits a block method routes (Jamba). The tensors are the block's own (a
    live view, nothing copied): `weight` is the router's weight, and a deep copy sharing the tensors keeps
    routing as it was before surgery."""

    def __init__(self, family: MoEFamily, block: nn.Module) -> None:
        super().__init__()
        self.gate = getattr(block, family.router_attr)
        for name in family.router_args:  # None where the block has none (LFM2-MoE with use_expert_bias false)
            self.register_buffer(name, getattr(block, name, None), persistent=False)
        self.arg_names = family.router_args
        self.weight_path = family.router_path("weight")[len(family.router_attr) + 1:]
        self.returns = family.router_returns
        self.takes_batch = family.router_takes_batch
        self.route = None if family.route_method is None else _Unshared(getattr(block, family.route_method))

    @property
    def weight(self) -> torch.Tensor:
        return self.gate.get_parameter(self.weight_path)

    def forward(self, hidden_states: torch.Tensor):
        if self.takes_batch:  # (tokens, hidden) as one batch row: the router flattens it back to the same tokens
            hidden_states = hidden_states.unsqueeze(0)
        if self.route is not None:  # a Linear router; the block's own method routes its logits
            logits = self.gate(hidden_states)
            index, weights = self.route.target(hidden_states, logits)
            return logits, weights, index
        out = dict(zip(self.returns, self.gate(hidden_states, *(getattr(self, name) for name in self.arg_names))))
        return out["logits"], out["weights"], out["index"]


class _Unshared:
    """A block's routing method held by a `RouterView`, the same object in every deep copy of the view (copying the
    bound method would copy its whole block, experts included)."""

    def __init__(self, target) -> None:
        self.target = target

    def __deepcopy__(self, memo) -> _Unshared:
        return self


def router(family: MoEFamily, block: nn.Module) -> nn.Module:
    """The block's router, callable on hidden states alone (a `RouterView` where the family's is not)."""
    if family.router_args or family.router_path("weight") != f"{family.router_attr}.weight" \
            or family.router_returns != MoEFamily.router_returns or family.router_takes_batch \
            or family.route_method is not None:
        return RouterView(family, block)
    return getattr(block, family.router_attr)


def router_tensors(family: MoEFamily, block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's tensors indexed by expert on the router side (weight, bias, routing-bias correction), by
    name, wherever the family keeps them (`MoEFamily.router_path`)."""
    found = {}
    for name in family.router_tensors:
        owner, _, attr = family.router_path(name).rpartition(".")
        tensor = getattr(block.get_submodule(owner), attr, None)
        if isinstance(tensor, torch.Tensor):
            found[name] = tensor
    return found


def set_router_tensor(family: MoEFamily, block: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace router tensor `name` (a parameter stays a frozen parameter, a buffer a buffer of the same
    persistence)."""
    owner_path, _, attr = family.router_path(name).rpartition(".")
    owner = block.get_submodule(owner_path)
    if isinstance(getattr(owner, attr), nn.Parameter):
        setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        owner.register_buffer(attr, tensor, persistent=attr not in owner._non_persistent_buffers_set)


def experts(family: MoEFamily, block: nn.Module) -> nn.Module:
    return getattr(block, family.experts_attr)
