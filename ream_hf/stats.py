"""Per-layer expert statistics, accumulated in one streaming pass over token chunks.

Memory never holds (experts x tokens x hidden) for more than one chunk: running sums are kept for
frequency, REAP saliency and the gated output signature; only the router-logit matrix (T, E) and a
fixed-size activation sample grow with the data, as METHOD.md §1 requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .experts import Activation, ExpertWeights, expert_hidden, expert_output_from_hidden, single_expert_output

CHUNK_BYTES_BUDGET = 256 * 2**20


@dataclass
class LayerStatistics:
    frequency: torch.Tensor  # (E,) int64: tokens that selected each expert
    saliency: torch.Tensor | None  # (E,) float64: REAP, mean over selecting tokens of g_i(x) * ||f_i(x)||
    gated_outputs: torch.Tensor | None  # (E, H) float32: mean over all tokens of g_i(x) * f_i(x) (or f_i(x) ungated)
    router_logits: torch.Tensor | None  # (T, E) float32
    activations: torch.Tensor | None  # (E, T_s, D) float32, the same sampled tokens for every expert
    num_tokens: int


def gate_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-expert gate values over all experts (not just the top-k), for the gated output signature."""
    logits = logits.float()
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)


def chunk_rows(num_experts: int, hidden: int, inner: int, requested: int) -> int:
    """Token rows per chunk so the dense (E, rows, 2D + H) float32 intermediates stay within budget."""
    per_row = num_experts * (2 * inner + hidden) * 4
    return max(1, min(requested, CHUNK_BYTES_BUDGET // per_row))


class LayerStatsAccumulator:
    """Streaming accumulator for one MoE layer.

    `dense=True` evaluates every expert on every token (needed for the gated output signature and
    activation samples: REAM, HC-SMoE, M-SMoE); otherwise each expert runs only on its routed tokens,
    which is all REAP saliency needs. `with_saliency=False` (frequency pruning) runs no expert at all.
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
        self.num_experts = num_experts
        self.chunk_size = chunk_rows(num_experts, hidden, inner, chunk_size)
        self.frequency = torch.zeros(num_experts, dtype=torch.int64)
        self.saliency_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.gated_sum = torch.zeros(num_experts, hidden, dtype=torch.float64) if dense else None
        self.logit_chunks: list[torch.Tensor] = []
        self.sample_positions = sample_positions  # sorted global token positions
        self.sample_chunks: list[torch.Tensor] = []
        self.seen_tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, logits: torch.Tensor, topk_weights: torch.Tensor, topk_index: torch.Tensor) -> None:
        """x: (T, H) block inputs of real (non-padding) tokens; the rest is the router's output for them."""
        x = x.float()
        topk_weights = topk_weights.float()
        self.frequency += torch.bincount(topk_index.reshape(-1), minlength=self.num_experts)
        if self.keep_logits:
            self.logit_chunks.append(logits.float().cpu())
        if self.dense:
            for start in range(0, x.shape[0], self.chunk_size):
                stop = start + self.chunk_size
                self._add_dense(
                    x[start:stop], logits[start:stop], topk_weights[start:stop], topk_index[start:stop],
                    first_position=self.seen_tokens + start,
                )
        elif self.with_saliency:
            self._add_sparse(x, topk_weights, topk_index)
        self.seen_tokens += x.shape[0]

    def _add_dense(self, x, logits, topk_weights, topk_index, first_position: int) -> None:
        hidden = expert_hidden(self.weights, self.activation, x)  # (E, c, D)
        out = expert_output_from_hidden(self.weights, hidden)  # (E, c, H)
        norms = out.norm(dim=-1)  # (E, c)
        selected = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32).scatter_(1, topk_index, topk_weights)
        self.saliency_sum += (selected.T * norms).sum(dim=1, dtype=torch.float64)
        if self.gated:
            gates = gate_scores(logits, self.scoring)  # (c, E)
        else:
            gates = torch.ones(x.shape[0], self.num_experts)
        self.gated_sum += torch.bmm(gates.T.unsqueeze(1), out).squeeze(1).double()
        if self.sample_positions is not None:
            lo = torch.searchsorted(self.sample_positions, first_position)
            hi = torch.searchsorted(self.sample_positions, first_position + x.shape[0])
            if hi > lo:
                self.sample_chunks.append(hidden[:, self.sample_positions[lo:hi] - first_position].clone())

    def _add_sparse(self, x, topk_weights, topk_index) -> None:
        for expert in torch.unique(topk_index).tolist():
            token, slot = torch.nonzero(topk_index == expert, as_tuple=True)
            out = single_expert_output(self.weights, self.activation, expert, x[token])
            self.saliency_sum[expert] += (topk_weights[token, slot] * out.norm(dim=-1)).sum(dtype=torch.float64)

    def finalize(self) -> LayerStatistics:
        count = self.frequency.clamp(min=1).double()
        return LayerStatistics(
            frequency=self.frequency.clone(),
            saliency=self.saliency_sum / count if self.with_saliency else None,
            gated_outputs=(self.gated_sum / max(self.seen_tokens, 1)).float() if self.dense else None,
            router_logits=torch.cat(self.logit_chunks) if self.keep_logits and self.logit_chunks else None,
            activations=torch.cat(self.sample_chunks, dim=1) if self.sample_chunks else None,
            num_tokens=self.seen_tokens,
        )
