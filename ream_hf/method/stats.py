"""Per-layer expert statistics, accumulated in one streaming pass over token chunks.

Memory never holds (experts x tokens x hidden) for more than one chunk: running sums are kept for
frequency, every saliency variant, the gated output signature and the router-logit columns' dot products (all
gate similarity needs); only the fixed-size activation sample is kept as rows, so a layer's statistics take the
same memory whatever the number of calibration tokens.

Saliency variants (all accumulated in the same pass, so saved statistics can be re-planned with any of them):
each scores expert i by a factor times ||f_i(x)|| on the tokens that route to i, where the factor is
  "weight"               g_i(x), the model's own routing weight (renormalised top-k, scaled, ...): REAP's paper
  "probability"          p_i(x), the router's score of i over all experts (softmax over all E, no top-k
                         renormalisation; the sigmoid score for sigmoid routers, without the selection bias)
  "probability_squared"  p_i(x)^2: what the reference REAM code computes (it multiplies the expert outputs by
                         p before its REAP function multiplies by p again)
and the mean is taken either over all routed tokens ("tokens"), or per calibration batch and then averaged
over batches, a batch where i is not routed counting 0 ("batches", as the reference code does it: rarely
routed experts score lower).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..arch import ExpertWeights
from ..config import SALIENCY_MEANS
from .experts import Activation, pairs_by_expert, single_expert_output
from .similarity import logit_gram

# The (rows, E*2D) float32 gate/up buffer of one chunk. Kept under glibc's 32 MiB mmap ceiling so every
# temporary of a chunk is recycled by malloc: larger chunks were mmapped afresh each time and page-faulted
# (a third of the statistics pass was kernel time), and a smaller working set also stays in cache.
CHUNK_BYTES_BUDGET = 24 * 2**20
MIN_CHUNK_ROWS = 16
ROUTED_BYTES_BUDGET = 16 * 2**20  # hidden rows of routed pairs gathered for one saliency window


SALIENCY_FACTORS = ("weight", "probability", "probability_squared")


def saliency_name(factor: str, mean: str) -> str:
    return f"{factor}/{mean}"


SALIENCY_VARIANTS = tuple(saliency_name(f, m) for m in SALIENCY_MEANS for f in SALIENCY_FACTORS)


@dataclass(frozen=True)
class GemmPolicy:
    """How the statistics pass runs its GEMMs; `ream_hf.pipeline.device` picks one per device and checkpoint dtype.

    `operands`: the dtype the block inputs and the fused gate/up matrix are cast to. float32 is exact for every
    checkpoint; for a bfloat16/float16 checkpoint the weights and hidden states already hold bfloat16/float16
    values, so GEMMs in that dtype read the same numbers and, with products exact in the float32 accumulator,
    differ from float32 GEMMs only in summation order. `result`: float32 keeps that accumulator (CUDA's
    `mm(..., out_dtype=float32)`); the operand dtype rounds each gate/up pre-activation to it. `grouped`:
    saliency's down projection as one grouped GEMM over the routed pairs (operands in `operands`, result rounded
    to it) instead of one float32 GEMM per expert.
    """

    operands: torch.dtype = torch.float32
    result: torch.dtype = torch.float32
    grouped: bool = False

    def describe(self) -> dict[str, str]:
        """Which dtype each GEMM of the pass uses, for logs and benchmarks."""
        name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
        down = f"{name(self.operands)} grouped_mm -> {name(self.operands)}" if self.grouped else "float32 per expert"
        return {"gate_up": f"{name(self.operands)} x {name(self.operands)} -> {name(self.result)}",
                "saliency_down": down, "signature_down": "float32"}


FLOAT32_GEMMS = GemmPolicy()


def grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows (P, K) sorted by group, weights (G, K, N), offsets (G,) int32 cumulative row counts -> (P, N)."""
    function = getattr(F, "grouped_mm", None) or torch._grouped_mm  # public from torch 2.10
    return function(rows, weights, offs=offsets)


def token_sample(total_tokens: int, size: int, seed: int) -> torch.Tensor:
    """Sorted positions of the layer's token sample: `size` of `total_tokens` tokens drawn with `seed`. A smaller
    sample with the same seed is a subset of a larger one (the first `size` of one permutation), so statistics
    saved with a larger sample serve a run that needs a smaller one (`sub_sample`)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total_tokens, generator=generator)[: min(size, total_tokens)].sort().values


def sub_sample_rows(total_tokens: int, sample_size: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the `size`-token sample's tokens sit among the rows of the larger `sample_size`-token sample of the same
    seed (a subset of it by construction), and their positions."""
    held = token_sample(total_tokens, sample_size, seed)
    wanted = token_sample(total_tokens, size, seed)
    return torch.searchsorted(held, wanted), wanted


def sub_sample(rows: torch.Tensor, total_tokens: int, size: int, seed: int) -> torch.Tensor:
    """The rows of the `size`-token sample, from `rows` (T_s, H), those of a larger sample of the same seed."""
    return rows[sub_sample_rows(total_tokens, rows.shape[0], size, seed)[0]]


@dataclass
class LayerStatistics:
    frequency: torch.Tensor  # (E,) int64: tokens that selected each expert
    saliency: dict[str, torch.Tensor] | None  # variant name (SALIENCY_VARIANTS) -> (E,) float64; 0 if never routed
    output_signatures: torch.Tensor | None  # (E, H) float32: mean over all tokens of g_i(x) * f_i(x) (or f_i(x) ungated)
    router_logit_gram: torch.Tensor | None  # (E, E) float64: dot products of the router-logit columns over tokens
    sample_inputs: torch.Tensor | None  # (T_s, H) block inputs of one token sample shared by every expert
    num_tokens: int
    # (E,) float64: sum over tokens of the model's routing weight g_i(x) (0 where i is not selected): the share of
    # the layer's expert output each expert carries. None in statistics saved before it was collected.
    routing_weight: torch.Tensor | None = None
    # (T_s, H) float32: the routed experts' output sum_k w_k f_{i_k}(x) on the token sample's rows, which the
    # dense pass's saliency computes anyway in its float32 GEMMs (`LayerStatsAccumulator.keeps_sample_outputs`); the
    # refit reproduces it. None from the routed-only pass (REAP, frequency), from bfloat16 GEMMs (a GPU's) and in
    # statistics saved before it was collected: the refit then computes it itself, so a run and its re-plan from
    # saved statistics of either kind compute it the same way.
    sample_outputs: torch.Tensor | None = None


def gate_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-expert gate values over all experts (not just the top-k), for the gated output signature."""
    logits = logits.float()
    return torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)


def chunk_rows(num_experts: int, inner: int, requested: int, budget: int | None = None) -> int:
    """Token rows per chunk so the dense (rows, E, 2D) float32 gate/up buffer stays within `budget` bytes
    (default CHUNK_BYTES_BUDGET, the CPU's; a GPU's is larger, see `ream_hf.pipeline.device`)."""
    per_row = num_experts * 2 * inner * 4
    budget = CHUNK_BYTES_BUDGET if budget is None else budget
    return max(1, min(requested, max(MIN_CHUNK_ROWS, budget // per_row)))


class _SampleOutputs:
    """The routed experts' output sum_k w_k f_{i_k}(x) on one `add` call's sample rows, added as the saliency
    computes each routed pair's f_i (no expert is run for it)."""

    def __init__(self, rows: torch.Tensor, tokens: int, topk_weights: torch.Tensor, hidden: int) -> None:
        device = topk_weights.device
        self.row_of = torch.full((tokens,), -1, dtype=torch.long, device=device)  # -1: not a sample token
        self.row_of[rows] = torch.arange(rows.shape[0], device=device)
        self.topk_weights = topk_weights
        self.out = torch.zeros(rows.shape[0], hidden, dtype=torch.float32, device=device)

    def add(self, pairs: torch.Tensor, outputs: torch.Tensor, first: int, count: int) -> None:
        """`outputs` (P, H) of `pairs`, numbered slot-major over the `count` tokens from `first` (as
        `pairs_by_expert` numbers them over a window of the call's tokens)."""
        token, slot = first + pairs % count, pairs // count
        row = self.row_of[token]
        keep = torch.nonzero(row >= 0).squeeze(1)
        if keep.numel():
            weight = self.topk_weights[token[keep], slot[keep]].unsqueeze(1)
            self.out.index_add_(0, row[keep], outputs[keep].float() * weight)


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
        with_logit_gram: bool = False,
        gated: bool = True,
        sample_positions: torch.Tensor | None = None,
        chunk_size: int = 2048,
        gemm: GemmPolicy = FLOAT32_GEMMS,
        chunk_bytes: int | None = None,
        routed_bytes: int | None = None,
    ) -> None:
        # the source dtype is kept: a float32 copy of a bfloat16 layer would double its memory; what the math
        # needs in float32 (the fused gate/up matrix, one expert's down projection) is converted where used
        self.weights = weights
        self.activation = activation
        self.scoring = scoring
        self.dense = dense
        self.with_saliency = with_saliency or dense
        self.gated = gated  # False: the "no gated similarity" ablation, plain mean expert outputs
        num_experts, inner, hidden = self.weights.gate.shape
        self.num_experts, self.inner = num_experts, inner
        device = self.device = self.weights.gate.device  # running sums live beside the weights; finalize() moves to CPU
        self.logit_gram = torch.zeros(num_experts, num_experts, dtype=torch.float64, device=device) if with_logit_gram else None
        self.gemm = gemm
        self.chunk_size = chunk_rows(num_experts, inner, chunk_size, chunk_bytes)
        self.routed_bytes = ROUTED_BYTES_BUDGET if routed_bytes is None else routed_bytes
        self.frequency = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.routing_weight = torch.zeros(num_experts, dtype=torch.float64)  # on the host, like the saliency sums
        factors = len(SALIENCY_FACTORS)
        # on the host on every device: index_add_ there adds in a fixed order (CUDA's adds floats atomically)
        self.saliency_sum = torch.zeros(factors, num_experts, dtype=torch.float64)  # over routed tokens
        self.batch_mean_sum = torch.zeros(factors, num_experts, dtype=torch.float64)  # of each batch's mean
        self.batches = torch.zeros((), dtype=torch.int64)  # add() calls: calibration batches
        self.sample_positions = sample_positions  # sorted global token positions
        self.sample_chunks: list[torch.Tensor] = []
        self.sample_output_chunks: list[torch.Tensor] = []  # their routed output (`keeps_sample_outputs`)
        # the sample rows' routed output comes with the dense pass's saliency where its GEMMs are float32 (the CPU's):
        # a GPU's bfloat16 GEMMs round each pair's output, and the routed-only pass (REAP) takes another code path,
        # so there the refit computes it in float32 itself (a fallen-back REAM layer then equals REAP's bit for bit)
        self.keeps_sample_outputs = dense and gemm.operands == torch.float32 and not gemm.grouped
        self.seen_tokens = 0
        if dense:
            # (H, E*2D): column block e holds [gate_e; up_e]^T
            gate_up = torch.cat([self.weights.gate, self.weights.up], dim=1).reshape(-1, hidden)
            self.gate_up_matrix = torch.empty(hidden, gate_up.shape[0], dtype=gemm.operands, device=device)
            self.gate_up_matrix.copy_(gate_up.T)
            del gate_up
            self.gate_up_bias = None
            if self.weights.gate_bias is not None:
                self.gate_up_bias = torch.cat([self.weights.gate_bias, self.weights.up_bias], dim=1).reshape(-1).float()
            self.weighted_hidden_sum = torch.zeros(num_experts, inner, dtype=torch.float64, device=device)
            self.gate_sum = torch.zeros(num_experts, dtype=torch.float64, device=device)
            self.gate_up_buffer: torch.Tensor | None = None  # reused by every chunk

    def running_sums(self) -> dict[str, torch.Tensor]:
        """Every running sum `add` accumulates into, by attribute name: what a distributed run reduces over its
        ranks (`ream_hf.pipeline.distributed`). A statistic added to this class must list its sums here."""
        names = ("frequency", "routing_weight", "saliency_sum", "batch_mean_sum", "batches", "logit_gram", "weighted_hidden_sum",
                 "gate_sum")
        return {name: value for name in names if isinstance(value := getattr(self, name, None), torch.Tensor)}

    @torch.no_grad()
    def add(self, x: torch.Tensor, logits: torch.Tensor, topk_weights: torch.Tensor, topk_index: torch.Tensor,
            position: int | None = None) -> None:
        """x: (T, H) block inputs of real (non-padding) tokens; the rest is the router's output for them.
        `position`: the global index of x's first token (default: right after the tokens added so far)."""
        x, logits = x.to(self.device), logits.to(self.device, torch.float32)
        topk_weights, topk_index = topk_weights.to(self.device, torch.float32), topk_index.to(self.device)
        first_token = self.seen_tokens if position is None else position
        counts = torch.bincount(topk_index.reshape(-1), minlength=self.num_experts)
        self.frequency += counts
        self.routing_weight.index_add_(0, topk_index.reshape(-1).cpu(), topk_weights.reshape(-1).double().cpu())
        batch_sum = torch.zeros_like(self.saliency_sum)  # this call's saliency sums: its batch mean below
        factors = self._pair_factors(logits, topk_weights, topk_index) if self.with_saliency else None
        if self.logit_gram is not None:
            self.logit_gram += logit_gram(logits)
        sample: _SampleOutputs | None = None
        if self.sample_positions is not None:
            lo = int(torch.searchsorted(self.sample_positions, first_token))
            hi = int(torch.searchsorted(self.sample_positions, first_token + x.shape[0]))
            if hi > lo:
                rows = (self.sample_positions[lo:hi] - first_token).to(self.device)
                self.sample_chunks.append(x[rows].cpu())
                if self.keeps_sample_outputs:
                    sample = _SampleOutputs(rows, x.shape[0], topk_weights, self.weights.down.shape[1])
        if self.dense:
            k = topk_index.shape[1]
            window = self.chunk_size * max(1, self.routed_bytes // (self.chunk_size * k * self.inner * 4))
            for first in range(0, x.shape[0], window):  # saliency once per window: fewer per-expert matmuls
                last = min(first + window, x.shape[0])
                routed_hidden = torch.empty(k, last - first, self.inner, dtype=torch.float32, device=self.device)
                for start in range(first, last, self.chunk_size):
                    stop = min(start + self.chunk_size, last)
                    self._add_dense(x[start:stop], logits[start:stop], topk_index[start:stop],
                                    routed_hidden[:, start - first : stop - first])
                sampled = (sample, first, last - first) if sample is not None else None
                if self.gemm.grouped:
                    self._add_grouped_saliency(factors[:, first:last], topk_index[first:last], routed_hidden,
                                               batch_sum, sampled)
                else:
                    self._add_saliency(factors[:, first:last], topk_index[first:last],
                                       self._down_projection(routed_hidden.view(-1, self.inner)), batch_sum, sampled)
        elif self.with_saliency:
            self._add_saliency(factors, topk_index, self._full_expert(x.float()), batch_sum)
        if sample is not None:
            self.sample_output_chunks.append(sample.out.cpu())
        if self.with_saliency:
            self.saliency_sum += batch_sum
            self.batch_mean_sum += batch_sum / counts.cpu().clamp(min=1).double()
        self.batches += 1
        self.seen_tokens += x.shape[0]

    def _pair_factors(self, logits: torch.Tensor, topk_weights: torch.Tensor, topk_index: torch.Tensor) -> torch.Tensor:
        """(factors, T, k) saliency factors of the routed (token, slot) pairs, in SALIENCY_FACTORS order."""
        probability = gate_scores(logits, self.scoring).gather(1, topk_index)
        return torch.stack([topk_weights, probability, probability * probability])

    def _add_dense(self, x, logits, topk_index, routed_hidden) -> None:
        """Gated signature sums for one chunk; copies the routed (token, expert) hidden rows into
        `routed_hidden` (k, c, D), slot-major as `pairs_by_expert` numbers them, for the window's saliency."""
        rows = x.shape[0]
        gate_up = self._gate_up(x)  # one GEMM for every expert
        if self.gate_up_bias is not None:
            gate_up += self.gate_up_bias
        gate_up = gate_up.view(rows, self.num_experts, 2 * self.inner)
        hidden = self.activation.apply_into_gate(gate_up[..., : self.inner], gate_up[..., self.inner :])  # (c, E, D) view
        routed_hidden.copy_(hidden[torch.arange(rows, device=self.device), topk_index.T])
        if self.gated:
            gates = gate_scores(logits, self.scoring)
            # sum_x g_e(x) a_e(x) for every expert as one batched (1, c) x (c, D) product over the strided view:
            # one read of the activations, where scaling them in place and summing took two passes and a write
            weighted = torch.bmm(gates.T.unsqueeze(1), hidden.transpose(0, 1)).squeeze(1)
            self.gate_sum += gates.sum(dim=0, dtype=torch.float64)
        else:
            weighted = hidden.sum(dim=0)
            self.gate_sum += rows
        self.weighted_hidden_sum += weighted.double()

    def _gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, E*2D) float32 gate/up pre-activations of every expert, per the GEMM policy."""
        rows = x.shape[0]
        if self.gemm.operands != torch.float32 and self.gemm.result == torch.float32:
            return torch.mm(x.to(self.gemm.operands), self.gate_up_matrix, out_dtype=torch.float32)  # CUDA only
        if self.gate_up_buffer is None or self.gate_up_buffer.shape[0] < rows:
            self.gate_up_buffer = torch.empty(rows, self.gate_up_matrix.shape[1], dtype=torch.float32, device=self.device)
        if self.gemm.operands == torch.float32:
            return torch.mm(x.float(), self.gate_up_matrix, out=self.gate_up_buffer[:rows])
        return self.gate_up_buffer[:rows].copy_(torch.mm(x.to(self.gemm.operands), self.gate_up_matrix))

    def _add_grouped_saliency(self, factors: torch.Tensor, topk_index: torch.Tensor, routed_hidden: torch.Tensor,
                              into: torch.Tensor, sample: tuple[_SampleOutputs, int, int] | None = None) -> None:
        """Saliency of a window's routed pairs with one grouped GEMM for every expert's down projection: no
        per-expert loop. `routed_hidden` (k, c, D) as `_add_dense` fills it. `sample`: where the pairs' outputs on
        sample tokens go (the `_SampleOutputs`, the window's first token and its token count)."""
        flat = topk_index.T.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offsets = torch.cumsum(torch.bincount(flat, minlength=self.num_experts), 0).to(torch.int32)
        down = self.weights.down.to(self.gemm.operands).transpose(1, 2)  # (E, D, H), a view in the source dtype
        out = grouped_mm(routed_hidden.reshape(-1, self.inner)[order].to(self.gemm.operands), down, offsets).float()
        if self.weights.down_bias is not None:
            out += self.weights.down_bias.float()[flat[order]]
        if sample is not None:
            sample[0].add(order, out, sample[1], sample[2])
        self._add_pair_saliency(factors, topk_index, order, torch.linalg.vector_norm(out, dim=-1), into)

    def _add_saliency(self, factors: torch.Tensor, topk_index: torch.Tensor,
                      expert_output: Callable[[int, torch.Tensor], torch.Tensor], into: torch.Tensor,
                      sample: tuple[_SampleOutputs, int, int] | None = None) -> None:
        """factor * ||f_i(x)|| on routed (token, expert) pairs only, summed per expert into `into` (factors, E);
        `factors` (factors, T, k) as `_pair_factors` gives them. `expert_output(i, pairs)` gives expert i's
        outputs for the given pair numbers (slot-major, as `pairs_by_expert` numbers them); pairs are grouped by
        expert, so each call is one expert's contiguous batch. `sample`: as `_add_grouped_saliency`'s."""
        order, slices = pairs_by_expert(topk_index, self.num_experts)
        norms = torch.empty(order.shape[0], dtype=torch.float32, device=self.device)
        for expert, part in slices:
            out = expert_output(expert, order[part])
            if sample is not None:
                sample[0].add(order[part], out, sample[1], sample[2])
            norms[part] = torch.linalg.vector_norm(out, dim=-1)
        self._add_pair_saliency(factors, topk_index, order, norms, into)

    def _add_pair_saliency(self, factors: torch.Tensor, topk_index: torch.Tensor, order: torch.Tensor,
                           norms: torch.Tensor, into: torch.Tensor) -> None:
        """Adds factor * ||f_i(x)|| of the routed pairs to their experts' sums in `into` (factors, E), on the
        host; `norms` in `order` (by expert), `factors` (factors, T, k) as `_pair_factors` gives them."""
        pair_saliency = factors.transpose(1, 2).reshape(factors.shape[0], -1)[:, order].double() * norms.double()
        into.index_add_(1, topk_index.T.reshape(-1)[order].cpu(), pair_saliency.cpu())

    def _down_projection(self, routed_hidden: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Expert outputs from the routed pairs' hidden rows (dense path): just the down projection."""
        def output(expert: int, pairs: torch.Tensor) -> torch.Tensor:
            out = routed_hidden[pairs] @ self.weights.down[expert].T.float()
            if self.weights.down_bias is not None:
                out += self.weights.down_bias[expert].float()
            return out

        return output

    def _full_expert(self, x: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Expert outputs from the block inputs (sparse path): the routed expert only, on its tokens only."""
        def output(expert: int, pairs: torch.Tensor) -> torch.Tensor:
            one = self.weights.select([expert]).to(torch.float32)
            return single_expert_output(one, self.activation, 0, x[pairs % x.shape[0]])

        return output

    def _saliency(self, count: torch.Tensor) -> dict[str, torch.Tensor]:
        by_tokens = self.saliency_sum / count
        by_batches = self.batch_mean_sum / max(int(self.batches), 1)
        out = {saliency_name(f, "tokens"): by_tokens[i] for i, f in enumerate(SALIENCY_FACTORS)}
        out.update({saliency_name(f, "batches"): by_batches[i] for i, f in enumerate(SALIENCY_FACTORS)})
        return out

    def finalize(self) -> LayerStatistics:
        count = self.frequency.clamp(min=1).double()
        output_signatures = None
        if self.dense:
            total = max(self.seen_tokens, 1)
            mean_hidden = (self.weighted_hidden_sum / total).float()  # (E, D)
            output_signatures = torch.stack([self.weights.down[e].float() @ mean_hidden[e] for e in range(self.num_experts)])
            if self.weights.down_bias is not None:
                output_signatures += (self.gate_sum / total).float().unsqueeze(1) * self.weights.down_bias.float()
            output_signatures = output_signatures.cpu()
        return LayerStatistics(
            frequency=self.frequency.cpu(),
            saliency=self._saliency(count.cpu()) if self.with_saliency else None,
            output_signatures=output_signatures,
            router_logit_gram=None if self.logit_gram is None else self.logit_gram.cpu(),
            sample_inputs=torch.cat(self.sample_chunks) if self.sample_chunks else None,
            num_tokens=self.seen_tokens,
            routing_weight=self.routing_weight.clone(),
            sample_outputs=torch.cat(self.sample_output_chunks) if self.sample_output_chunks else None,
        )
