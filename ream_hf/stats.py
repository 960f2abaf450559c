"""Per-layer expert statistics, accumulated in one streaming pass over token chunks.

Memory never holds (experts x tokens x hidden) for more than one chunk: running sums are kept for
frequency, REAP saliency and the gated output signature; only the router-logit matrix (T, E) and a
fixed-size activation sample grow with the data, as METHOD.md §1 requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .experts import Activation, ExpertWeights, single_expert_output

CHUNK_BYTES_BUDGET = 256 * 2**20


@dataclass
class LayerStatistics:
    frequency: torch.Tensor  # (E,) int64: tokens that selected each expert
    saliency: torch.Tensor | None  # (E,) float64: REAP, mean over selecting tokens of g_i(x) * ||f_i(x)||
    gated_outputs: torch.Tensor | None  # (E, H) float32: mean over all tokens of g_i(x) * f_i(x) (or f_i(x) ungated)
    router_logits: torch.Tensor | None  # (T, E) float32
    sample_inputs: torch.Tensor | None  # (T_s, H) block inputs of one token sample shared by every expert
    num_tokens: int


def gate_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-expert gate values over all experts (not just the top-k), for the gated output signature."""
    logits = logits.float()
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)


def chunk_rows(num_experts: int, inner: int, requested: int) -> int:
    """Token rows per chunk so the dense (rows, E, 2D) float32 intermediates stay within budget."""
    per_row = num_experts * 3 * inner * 4
    return max(1, min(requested, CHUNK_BYTES_BUDGET // per_row))


class LayerStatsAccumulator:
    """Streaming accumulator for one MoE layer.

    `dense=True` evaluates every expert's hidden activation on every token (the gated output signature
    needs all of them: REAM, HC-SMoE, M-SMoE). Two exact savings keep this near one GEMM per chunk:
    gate and up projections of all experts are one (T, H) x (H, E*2D) matmul, and since the signature
    is linear in the expert output, o_i = W_down,i (mean_x g_i(x) a_i(x)) needs the down projection
    once per expert, not once per token. Only saliency needs ||f_i(x)||, and only on routed tokens.
    `with_saliency=False` (frequency pruning) runs no expert at all.
    """

    def __init__(
        self,
        weights: ExpertWeights,
        activation: Activation,
        scoring: str,
        *,
        dense: bool,
        with_saliency: bool = True,
        keep_logits: bool = False,
        gated: bool = True,
        sample_positions: torch.Tensor | None = None,
        chunk_size: int = 2048,
    ) -> None:
        self.weights = weights.to(torch.float32)
        self.activation = activation
        self.scoring = scoring
        self.dense = dense
        self.with_saliency = with_saliency or dense
        self.keep_logits = keep_logits
        self.gated = gated  # False: the "no gated similarity" ablation, plain mean expert outputs
        num_experts, inner, hidden = self.weights.gate.shape
        self.num_experts, self.inner = num_experts, inner
        self.chunk_size = chunk_rows(num_experts, inner, chunk_size)
        self.frequency = torch.zeros(num_experts, dtype=torch.int64)
        self.saliency_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.logit_chunks: list[torch.Tensor] = []
        self.sample_positions = sample_positions  # sorted global token positions
        self.sample_chunks: list[torch.Tensor] = []
        self.seen_tokens = 0
        if dense:
            # (H, E*2D): column block e holds [gate_e; up_e]^T
            self.gate_up_matrix = torch.cat([self.weights.gate, self.weights.up], dim=1).reshape(-1, hidden).T.contiguous()
            self.gate_up_bias = None
            if self.weights.gate_bias is not None:
                self.gate_up_bias = torch.cat([self.weights.gate_bias, self.weights.up_bias], dim=1).reshape(-1)
            self.weighted_hidden_sum = torch.zeros(num_experts, inner, dtype=torch.float64)
            self.gate_sum = torch.zeros(num_experts, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x: torch.Tensor, logits: torch.Tensor, topk_weights: torch.Tensor, topk_index: torch.Tensor) -> None:
        """x: (T, H) block inputs of real (non-padding) tokens; the rest is the router's output for them."""
        x = x.float()
        topk_weights = topk_weights.float()
        self.frequency += torch.bincount(topk_index.reshape(-1), minlength=self.num_experts)
        if self.keep_logits:
            self.logit_chunks.append(logits.float().cpu())
        if self.sample_positions is not None:
            lo = torch.searchsorted(self.sample_positions, self.seen_tokens)
            hi = torch.searchsorted(self.sample_positions, self.seen_tokens + x.shape[0])
            if hi > lo:
                self.sample_chunks.append(x[self.sample_positions[lo:hi] - self.seen_tokens].cpu())
        if self.dense:
            for start in range(0, x.shape[0], self.chunk_size):
                stop = start + self.chunk_size
                self._add_dense(x[start:stop], logits[start:stop], topk_weights[start:stop], topk_index[start:stop])
        elif self.with_saliency:
            for expert in torch.unique(topk_index).tolist():
                token, slot = torch.nonzero(topk_index == expert, as_tuple=True)
                out = single_expert_output(self.weights, self.activation, expert, x[token])
                self.saliency_sum[expert] += (topk_weights[token, slot] * out.norm(dim=-1)).sum(dtype=torch.float64)
        self.seen_tokens += x.shape[0]

    def _add_dense(self, x, logits, topk_weights, topk_index) -> None:
        gate_up = x @ self.gate_up_matrix  # (c, E*2D), one GEMM for every expert
        if self.gate_up_bias is not None:
            gate_up += self.gate_up_bias
        gate_up = gate_up.view(x.shape[0], self.num_experts, 2 * self.inner)
        hidden = self.activation(gate_up[..., : self.inner], gate_up[..., self.inner :])  # (c, E, D)
        gates = gate_scores(logits, self.scoring) if self.gated else torch.ones(x.shape[0], self.num_experts)
        self.weighted_hidden_sum += torch.einsum("ce,ced->ed", gates, hidden).double()
        self.gate_sum += gates.sum(dim=0, dtype=torch.float64)
        for expert in torch.unique(topk_index).tolist():
            token, slot = torch.nonzero(topk_index == expert, as_tuple=True)
            out = hidden[token, expert] @ self.weights.down[expert].T
            if self.weights.down_bias is not None:
                out += self.weights.down_bias[expert]
            self.saliency_sum[expert] += (topk_weights[token, slot] * out.norm(dim=-1)).sum(dtype=torch.float64)

    def finalize(self) -> LayerStatistics:
        count = self.frequency.clamp(min=1).double()
        gated_outputs = None
        if self.dense:
            total = max(self.seen_tokens, 1)
            mean_hidden = (self.weighted_hidden_sum / total).float()  # (E, D)
            gated_outputs = torch.bmm(mean_hidden.unsqueeze(1), self.weights.down.transpose(1, 2)).squeeze(1)
            if self.weights.down_bias is not None:
                gated_outputs += (self.gate_sum / total).float().unsqueeze(1) * self.weights.down_bias
        return LayerStatistics(
            frequency=self.frequency.clone(),
            saliency=self.saliency_sum / count if self.with_saliency else None,
            gated_outputs=gated_outputs,
            router_logits=torch.cat(self.logit_chunks) if self.keep_logits and self.logit_chunks else None,
            sample_inputs=torch.cat(self.sample_chunks) if self.sample_chunks else None,
            num_tokens=self.seen_tokens,
        )
