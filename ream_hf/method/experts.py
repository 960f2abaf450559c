"""Expert math on the canonical layout (`ream_hf.arch.ExpertWeights`), independent of how a family stores it:
the gated activation, every expert's hidden activations, one expert's output, and the routed forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ExpertWeights, MoEFamily


@dataclass(frozen=True)
class Activation:
    """The experts' gated activation: act(gate) * up, or GPT-OSS's clamped variant."""

    kind: str  # "glu" or "gpt_oss"
    act_fn: nn.Module | None = None
    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "gpt_oss":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return self.act_fn(gate) * up

    def apply_into_gate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up written over `gate` and returned. The statistics pass runs this on every expert for
        every token; allocating a fresh (tokens, E, D) result each chunk cost more than the arithmetic."""
        if self.kind == "glu" and type(self.act_fn).__name__ in _INPLACE_SILU:
            return F.silu(gate, inplace=True).mul_(up)
        return gate.copy_(self(gate, up))


_INPLACE_SILU = ("SiLU", "SiLUActivation")  # torch's and transformers' silu modules, both plain F.silu


def activation_for(family: MoEFamily, experts_module: nn.Module) -> Activation:
    if family.expert_layout == "gpt_oss":
        return Activation("gpt_oss", alpha=float(experts_module.alpha), limit=float(experts_module.limit))
    return Activation("glu", act_fn=experts_module.act_fn)


def expert_hidden(weights: ExpertWeights, activation: Activation, x: torch.Tensor) -> torch.Tensor:
    """Hidden activations a_i(x) of every expert on every token: (E, T, D), one batched matmul."""
    gate = torch.matmul(x, weights.gate.transpose(1, 2))
    up = torch.matmul(x, weights.up.transpose(1, 2))
    if weights.gate_bias is not None:
        gate = gate + weights.gate_bias[:, None, :]
        up = up + weights.up_bias[:, None, :]
    return activation(gate, up)


def single_expert_output(weights: ExpertWeights, activation: Activation, expert: int, x: torch.Tensor) -> torch.Tensor:
    """f_i(x) for one expert on the tokens routed to it: the sparse path for pruning criteria."""
    gate = F.linear(x, weights.gate[expert], None if weights.gate_bias is None else weights.gate_bias[expert])
    up = F.linear(x, weights.up[expert], None if weights.up_bias is None else weights.up_bias[expert])
    bias = None if weights.down_bias is None else weights.down_bias[expert]
    return F.linear(activation(gate, up), weights.down[expert], bias)


def pairs_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[tuple[int, slice]]]:
    """The routed (token, slot) pairs in a stable order by expert, and each routed expert's slice of that order,
    so per-expert work runs on contiguous rows. Pairs are numbered slot-major, p = slot * tokens + token (token
    = p % tokens), as `top_k_index.T.reshape(-1)`: within an expert that is the row order of transformers' eager
    experts loop (torch.where over its (k, tokens) mask), and the GEMMs' rounding depends on row positions."""
    flat = top_k_index.T.reshape(-1)
    order = torch.argsort(flat, stable=True)
    slices, start = [], 0
    for expert, count in enumerate(torch.bincount(flat, minlength=num_experts).tolist()):
        if count:
            slices.append((expert, slice(start, start + count)))
            start += count
    return order, slices


def routed_forward(weights: ExpertWeights, activation: Activation, x: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k f_{i_k}(x) for every token: tokens sorted by expert, one gather, one GEMM chain per expert,
    one scatter. Same result as transformers' eager experts loop (one index_add per expert), without its
    per-expert scatter cost, which dominated re-forwarding calibration data on CPU. Bit-identical to that loop
    (tested for every family) because `pairs_by_expert` visits rows in its order."""
    order, slices = pairs_by_expert(top_k_index, weights.num_experts)
    token_of_row = order % top_k_index.shape[0]
    rows = x[token_of_row]
    out = torch.empty(rows.shape[0], weights.down.shape[1], dtype=x.dtype, device=x.device)
    for expert, part in slices:
        out[part] = single_expert_output(weights, activation, expert, rows[part])
    out *= top_k_weights.T.reshape(-1)[order].unsqueeze(1).to(out.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_row, out)
