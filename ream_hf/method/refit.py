"""Closed-form, calibration-only corrections after merging or pruning a layer (beyond the paper).

Merging perturbs the kept expert and pruning drops the removed experts' share of the layer output; both leave
the router scoring the kept rows as before. Two least-squares corrections, each a ridge regression towards the
compressed weights, solved in closed form from sums accumulated over token chunks (never (T, D) matrices):

- **Down-projection refit** (the idea of MergeMoE, arXiv 2510.14436): output expert j's down projection W is
  refit so that on the calibration tokens routed to j by the compressed router, its gated output
  w'_j(x) W a_j(x) matches a target. With u = w'_j(x) a_j(x) (D) and target t (H) per routed pair,
  W = (sum t u^T + lam W_0)(sum u u^T + lam I)^-1, lam = ridge * mean(diag(sum u u^T)). Targets
  (`REFIT_TARGETS`):
    "group":    t = sum over i in j's group of g_i(x) f_i(x), the original gated outputs of the experts j stands
                for, under the original router (0 on a token none of them was routed to);
    "residual": t = w'_j(x) f'_j(x) + s_j(x) r(x), with r = Y(x) - Y'(x) the layer's error on that token (original
                MoE output minus compressed) and s_j = w'_j / sum of the token's compressed weights, so the routed
                experts share the error in proportion to their weights (one damped Jacobi step of the joint
                least squares over all experts). It needs no groups, so it also lets a kept expert absorb pruned
                experts' contribution.
  The ridge stays anchored to the merged/pruned W_0 over every step. A least-squares fit generalises only with
  enough routed rows per unknown (rows per output expert / D): thousands on a toy model, below 1 on published
  MoEs with a few thousand sample tokens, where the fit learns the sample and makes the model worse.
  `checked_down_refit` therefore fits on some calibration sequences and keeps the refit (per layer, and per
  output expert) only where it lowers the layer output's error on the held-out sequences, choosing the ridge and
  the number of steps there too: it cannot make a layer worse on text it did not fit.
- **Router refit** (cf. router-only distillation after pruning, arXiv 2603.02217, here in closed form): the kept
  rows R (k', H) are fit by least squares on logits, R = (sum t x^T + lam R_0)(sum x x^T + lam I)^-1, to the
  target logit of each output expert's group: log sum_{i in group} exp z_i(x) for softmax routers (softmax over
  the kept experts then gives each output expert exactly its group's probability mass), logit(sum_i sigmoid
  z_i(x)) for sigmoid routers. A singleton group's target is its own logit, which the least squares reproduces:
  only the rows of merged groups move.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..arch import ExpertWeights
from ..config import REFIT_TARGETS, ReamConfig
from .experts import Activation, pairs_by_expert, single_expert_output

SIGMOID_EPS = 1e-6


def ridge_solve(gram: Tensor, cross: Tensor, prior: Tensor, ridge: float) -> Tensor:
    """argmin_W sum ||W u - t||^2 + lam ||W - prior||^2 for every leading index, from gram = sum u u^T (n, d, d),
    cross = sum t u^T (n, h, d) and prior (n, h, d); lam = ridge * mean(diag(gram)) (scale-free), float64.
    A zero gram (no token routed) gives the prior back. `gram` may be (d, d), shared by all n."""
    gram, cross, prior = gram.double(), cross.double(), prior.double()
    shared = gram.dim() == 2
    grams = gram.unsqueeze(0) if shared else gram
    scale = torch.diagonal(grams, dim1=-2, dim2=-1).mean(dim=-1)  # (n,) or (1,)
    lam = ridge * scale
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    system = grams + lam[:, None, None] * eye
    rhs = cross + lam[:, None, None] * prior  # (n, h, d)
    empty = scale <= 0
    if shared:
        if bool(empty[0]):
            return prior.clone()
        # one factorisation for every output: system X^T = rhs^T with the (h*n) right-hand sides stacked
        solution = torch.linalg.solve(system[0], rhs.reshape(-1, rhs.shape[-1]).T).T.reshape(rhs.shape)
        return solution
    solution = prior.clone()
    live = ~empty
    if bool(live.any()):
        solution[live] = torch.linalg.solve(system[live], rhs[live].transpose(1, 2)).transpose(1, 2)
    return solution


class LeastSquaresSums:
    """Running sums for `ridge_solve` over token chunks when one input row serves every output (the router refit:
    one input x per token, one target logit per kept expert): a (d, d) gram shared by the n outputs and their
    (n, 1, d) cross terms. Memory does not depend on how many rows are added."""

    def __init__(self, outputs: int, inputs: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(inputs, inputs, dtype=torch.float64, device=device)
        self.cross = torch.zeros(outputs, 1, inputs, dtype=torch.float64, device=device)

    def add(self, inputs: Tensor, targets: Tensor) -> None:
        """inputs (rows, d); targets (rows, n): output j's target is column j."""
        inputs, targets = inputs.double(), targets.double()
        self.gram += inputs.T @ inputs
        self.cross += (targets.T @ inputs).unsqueeze(1)

    def solve(self, prior: Tensor, ridge: float) -> Tensor:
        """(n, 1, d) refit rows; the prior (n, 1, d) where no row was added."""
        return ridge_solve(self.gram, self.cross, prior, ridge).to(prior.dtype)


def group_logit_targets(logits: Tensor, output_of: Tensor, num_outputs: int, scoring: str) -> Tensor:
    """(T, n) target logits of the kept router rows from the original logits (T, E): per output expert, the
    logit whose score is its group's total score (log-sum-exp over the group for softmax routers, the logit of
    the summed sigmoid scores, clamped below 1, for sigmoid routers). `output_of[i]` is source expert i's output
    expert, -1 for an expert that no output stands for (pruned): its score is left out."""
    logits = logits.double()
    kept = output_of >= 0
    columns = output_of[kept]
    if scoring == "sigmoid":
        total = torch.zeros(logits.shape[0], num_outputs, dtype=torch.float64, device=logits.device)
        total.index_add_(1, columns, torch.sigmoid(logits[:, kept]))
        total = total.clamp(SIGMOID_EPS, 1 - SIGMOID_EPS)
        return torch.log(total) - torch.log1p(-total)
    peak = logits.max(dim=1, keepdim=True).values
    total = torch.zeros(logits.shape[0], num_outputs, dtype=torch.float64, device=logits.device)
    total.index_add_(1, columns, torch.exp(logits[:, kept] - peak))
    return torch.log(total) + peak


@dataclass
class Routing:
    """A router's choice for a set of tokens: weights (T, k) and expert indices (T, k)."""

    weights: Tensor
    index: Tensor


@dataclass
class RoutedPairs:
    """One expert's routed (token, slot) pairs on the sample, their routing weights and hidden activations."""

    token: Tensor
    slot: Tensor
    weight: Tensor  # (n, 1) float32
    acts: Tensor  # (n, D) float32


def _routed_pass(weights: ExpertWeights, activation: Activation, x: Tensor, routing: Routing,
                 keep: bool) -> tuple[Tensor, list[tuple[int, RoutedPairs]]]:
    """sum_k w_k f_{i_k}(x) per token (T, H) in float32, one expert (converted to float32) at a time; with `keep`,
    also each expert's `RoutedPairs`, so the refit reuses the activations instead of computing them again."""
    tokens, inner = x.shape[0], weights.down.shape[2]
    out = torch.zeros(tokens, weights.down.shape[1], dtype=torch.float32, device=x.device)
    kept = []
    order, slices = pairs_by_expert(routing.index, weights.num_experts)
    for expert, part in slices:
        pair = order[part]
        token, slot = pair % tokens, pair // tokens
        # one GEMM for gate and up (a quarter faster); the expert's own rows, in float32, no other copy
        gate_up = x[token] @ torch.cat([weights.gate[expert], weights.up[expert]]).float().T
        gate, up = gate_up[:, :inner], gate_up[:, inner:]
        if weights.gate_bias is not None:
            gate, up = gate + weights.gate_bias[expert].float(), up + weights.up_bias[expert].float()
        acts = activation(gate, up)
        weight = routing.weights[token, slot].float().unsqueeze(1)
        result = acts @ weights.down[expert].float().T
        if weights.down_bias is not None:
            result += weights.down_bias[expert].float()
        out.index_add_(0, token, weight * result)
        if keep:
            kept.append((expert, RoutedPairs(token, slot, weight, acts)))
    return out, kept


def _member_outputs(source: ExpertWeights, activation: Activation, x: Tensor, routing: Routing,
                    members: list[int], routed_token: Tensor) -> Tensor:
    """The "group" target of one output expert: sum over its members i of g_i(x) f_i(x) (original router), on
    the tokens that route to the output expert (`routed_token`, its routed pairs' tokens: row r of the result is
    token routed_token[r])."""
    rows_of_token = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)  # -1: not routed to it
    rows_of_token[routed_token] = torch.arange(routed_token.shape[0], device=x.device)
    out = torch.zeros(routed_token.shape[0], source.down.shape[1], dtype=torch.float32, device=x.device)
    for member in members:
        token, slot = torch.nonzero(routing.index == member, as_tuple=True)
        keep = rows_of_token[token] >= 0
        token, slot = token[keep], slot[keep]
        if token.numel():
            f = single_expert_output(source.select([member]).to(torch.float32), activation, 0, x[token])
            out.index_add_(0, rows_of_token[token], f * routing.weights[token, slot].float().unsqueeze(1))
    return out


def _design(weight: Tensor, acts: Tensor, down: Tensor, down_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """A down-projection fit's inputs u = w a (n, D), with a column w when the expert has a down bias, and the
    expert's current [down | bias] (H, D [+1]) in float64: the fitted bias is one more column of the solve."""
    inputs, current = weight * acts, down.double()
    if down_bias is not None:
        inputs = torch.cat([inputs, weight], dim=1)
        current = torch.cat([current, down_bias.double().unsqueeze(1)], dim=1)
    return inputs, current


RIDGE_GRID = (1.0, 10.0, 100.0, 1000.0)  # the down refit's ridges, in units of `refit_ridge`, chosen on held-out data
HELDOUT_FRACTION = 0.25  # share of the sample's calibration sequences the down refit holds out to check itself


def heldout_sequences(sequence_of: Tensor, fraction: float, seed: int) -> Tensor:
    """(T,) bool: the tokens whose whole calibration sequence is held out, round(fraction * sequences) of the
    distinct ids in `sequence_of` (at least one, never all; none when there is one sequence), drawn with `seed`.
    Whole sequences, not alternate tokens: neighbouring tokens of one text are near-copies of each other, so a
    check on them would reward a fit that learnt the sample."""
    ids = torch.unique(sequence_of)
    if ids.numel() < 2:
        return torch.zeros(sequence_of.shape, dtype=torch.bool, device=sequence_of.device)
    count = min(ids.numel() - 1, max(1, round(fraction * ids.numel())))
    generator = torch.Generator().manual_seed(seed)
    chosen = ids[torch.randperm(ids.numel(), generator=generator)[:count].to(ids.device)]
    return torch.isin(sequence_of, chosen)


def _rows(routing: Routing, mask: Tensor) -> Routing:
    return Routing(routing.weights[mask], routing.index[mask])


class RidgeFactor:
    """One output expert's rows u (n, d) factored once for every ridge and every step: the eigendecomposition of
    the smaller Gram, u^T u (d, d) where rows are plentiful, the dual u u^T (n, n) where they are fewer than the
    unknowns (published MoEs). `solve` then costs two small products per ridge instead of a Gram and a
    factorisation (the refit tries several ridges and steps on the same rows). Memory: min(n, d)^2 float64."""

    def __init__(self, inputs: Tensor) -> None:
        u = inputs.double()
        self.dual = u.shape[0] < u.shape[1]
        gram = u @ u.T if self.dual else u.T @ u
        self.scale = float(torch.diagonal(gram).sum()) / u.shape[1]  # mean diag of u^T u, in both forms
        values, self.vectors = torch.linalg.eigh(gram) if self.scale > 0 else (None, None)
        self.values = None if values is None else values.clamp(min=0)

    def solve(self, inputs: Tensor, moved: Tensor, previous: Tensor | None, ridges: Sequence[float]) -> list[Tensor]:
        """For each ridge, argmin_D sum ||D u - t||^2 + lam ||D||^2 (h, d) over the rows u of `inputs` and
        targets t = moved + u previous^T (`moved` (n, h); `previous` (h, d) or None), lam = ridge * mean(diag(u^T u)),
        solved in the dual, t^T (u u^T + lam I)^-1 u, where rows are fewer than unknowns (n < d: the regime of
        published MoEs), so the work and memory are n^2 d, not d^3 and d^2. Zero where the rows are all zero.
        Float32: the factor and each ridge's scaling are float64 (where the conditioning lies); the last product,
        by the eigenvectors (orthonormal) or their rows' images, only rotates, so float32 loses nothing the changes
        keep (float32 or less), at a quarter of a float64 product's time on CPU."""
        width = inputs.shape[1]
        if self.vectors is None:
            return [torch.zeros(moved.shape[1], width, dtype=torch.float32, device=inputs.device) for _ in ridges]
        v = self.vectors
        if self.dual:  # D = t^T V (L + lam)^-1 V^T u
            targets = moved if previous is None else moved + inputs @ previous.T.to(inputs.dtype)
            left, right = targets.double().T @ v, v.T @ inputs.double()
        else:  # D = (t^T u) V (L + lam)^-1 V^T, with t^T u = moved^T u + previous u^T u = moved^T u + previous V L V^T
            left = (moved.T @ inputs).double() @ v
            if previous is not None:
                left += (previous.double() @ v) * self.values
            right = v.T
        shrink = torch.stack([1.0 / (self.values + ridge * self.scale) for ridge in ridges]).unsqueeze(1)
        return list((left * shrink).float() @ right.float())  # every ridge in one batched product


def _delta_dtype(merged: ExpertWeights) -> torch.dtype:
    """What the refit keeps each expert's change in: float32, or the merged weights' 16-bit dtype (the change is
    recomputed from the targets at every step, not accumulated, so its rounding does not add up)."""
    return merged.down.dtype if merged.down.element_size() < 4 and merged.down.is_floating_point() else torch.float32


class DownRefit:
    """One layer's down-projection refit problem on its fit tokens x (T, H): each output expert's routed rows
    u = w a (n, D [+1]), factored once (`RidgeFactor`), and what they must reproduce, built once and shared by
    every ridge and step tried. Pure tensors in and out: `step` moves each expert's change of [down | bias] from the
    merged weights one step on, `candidates` gives that step for several ridges at once.

    The ridge is anchored to the merged (or pruned) weights W0 at every step: W = W0 + Delta with
    argmin ||W u - t||^2 + lam ||Delta||^2 for the step's target t. (Re-centring it on the previous step's weights
    lets the steps walk to the unregularised least squares, which over-fits where rows per unknown are few.)

    Memory (`refit_bytes` counts it): the routed pairs' (T * k, D) rows, four (T, H) layer outputs, one (H, D)
    change per output expert, and every expert's factor (min(n, D)^2)."""

    def __init__(self, source: ExpertWeights, merged: ExpertWeights, activation: Activation, x: Tensor,
                 original: Routing, compressed: Routing, groups: list[list[int]], target: str,
                 original_out: Tensor | None = None) -> None:
        if target not in REFIT_TARGETS:
            raise ValueError(f"refit target must be one of {', '.join(REFIT_TARGETS)}; got {target!r}")
        x = x.float()
        self.target, self.delta_dtype = target, _delta_dtype(merged)
        self.compressed_out, pairs = _routed_pass(merged, activation, x, compressed, keep=True)
        self.experts = []  # (expert, routed token, inputs (n, D [+1]) float32, factor)
        self.moved = []  # "group": goal - W0 u per expert; "residual": the token's share of the layer's error
        if target == "residual":
            total = compressed.weights.float().sum(dim=1, keepdim=True)
            share_of = compressed.weights.float() / total.clamp(min=1e-20)  # the token's error shared by weight
        for n, (expert, routed) in enumerate(pairs):
            pairs[n] = None  # the activations become the inputs in place: one copy of the routed rows
            inputs = _inputs(routed.weight, routed.acts, merged.down_bias is not None)
            self.experts.append((expert, routed.token, inputs, RidgeFactor(inputs)))
            if target == "group":
                goal = _member_outputs(source, activation, x, original, groups[expert], routed.token)
                self.moved.append(goal - inputs @ _anchor(merged, expert).T.float())
            else:
                self.moved.append(share_of[routed.token, routed.slot].unsqueeze(1))
        if target == "residual":
            self.original_out = original_out if original_out is not None else \
                _routed_pass(source, activation, x, original, keep=False)[0]

    def residual(self, delta: dict[int, Tensor]) -> Tensor | None:
        """The layer's error on the fit tokens (T, H), original output minus the compressed layer's changed by
        `delta`; None for "group" targets, which do not depend on the other experts."""
        if self.target == "group":
            return None
        out = self.compressed_out
        if delta:
            out = out.clone()
            for expert, token, inputs, _ in self.experts:
                if expert in delta:
                    out.index_add_(0, token, inputs @ delta[expert].T.float())
        return self.original_out - out

    def _problems(self, delta: dict[int, Tensor], residual: Tensor | None):
        """Each output expert's next step: (expert, inputs, factor, moved target rows, its current change)."""
        for (expert, token, inputs, factor), moved in zip(self.experts, self.moved):
            yield expert, inputs, factor, moved if residual is None else moved * residual[token], delta.get(expert)

    def candidates(self, delta: dict[int, Tensor], residual: Tensor | None,
                   ridges: Sequence[float]) -> Iterator[tuple[int, list[Tensor]]]:
        """The next step from `delta` (and its `residual`) for each of `ridges` at once, one output expert at a
        time (the changes are not kept here): the ridges share one target and one factor per expert."""
        for expert, inputs, factor, moved, current in self._problems(delta, residual):
            yield expert, [d.to(self.delta_dtype) for d in factor.solve(inputs, moved, current, ridges)]

    def step(self, delta: dict[int, Tensor], residual: Tensor | None, ridge: float) -> None:
        """One step with `ridge`, `delta` updated in place: every routed output expert's change Delta of
        [down | bias] (H, D [+1]) from the merged weights. "residual": the target is the expert's own output plus
        its share of the layer's error under `delta` (block Jacobi on the joint least squares); anchored at W0,
        Delta' = argmin ||Delta' u - (Delta u + s r)||^2 + lam ||Delta'||^2."""
        for expert, inputs, factor, moved, current in self._problems(delta, residual):
            delta[expert] = factor.solve(inputs, moved, current, [ridge])[0].to(self.delta_dtype)

    def solutions(self, ridge: float, steps: int) -> Iterator[dict[int, Tensor]]:
        """`delta` after each of `steps` steps with one ridge (one step for "group" targets), updated in place."""
        delta: dict[int, Tensor] = {}
        for _ in range(1 if self.target == "group" else steps):
            residual = self.residual(delta)
            self.step(delta, residual, ridge)
            del residual
            yield delta


def _anchor(merged: ExpertWeights, expert: int) -> Tensor:
    """Output expert's merged [down | bias] (H, D [+1])."""
    if merged.down_bias is None:
        return merged.down[expert]
    return torch.cat([merged.down[expert], merged.down_bias[expert].unsqueeze(1)], dim=1)


def _inputs(weight: Tensor, acts: Tensor, biased: bool) -> Tensor:
    """The rows u = w a (n, D), with a column w for a down bias (fitted as one more column), from the routed
    activations, which are overwritten."""
    inputs = acts.mul_(weight)
    return torch.cat([inputs, weight], dim=1) if biased else inputs


def _apply(merged: ExpertWeights, delta: dict[int, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The merged down projections (n, H, D) and biases plus `delta`'s changes, in the merged dtype."""
    inner = merged.down.shape[2]
    down = merged.down.detach().clone()
    bias = None if merged.down_bias is None else merged.down_bias.detach().clone()
    for expert, change in delta.items():
        change = change.double()
        down[expert] = (down[expert].double() + change[:, :inner]).to(down.dtype)
        if bias is not None:
            bias[expert] = (bias[expert].double() + change[:, inner]).to(bias.dtype)
    return down, bias


def refit_down_projections(source: ExpertWeights, merged: ExpertWeights, activation: Activation, x: Tensor,
                           original: Routing, compressed: Routing, groups: list[list[int]], target: str,
                           ridge: float, steps: int = 1) -> tuple[Tensor, Tensor | None]:
    """Each output expert's down projection (and down bias, if any) refit by ridge least squares, anchored to the
    merged weights, on the tokens `x` (T, H) that `compressed` routes to it, towards the `target` ("residual" or
    "group", see the module docstring); `original` is the source router's choice on the same tokens, `groups[j]`
    the source experts output expert j stands for. Unchecked: `checked_down_refit` is the one that keeps a refit
    only where it helps held-out tokens. Returns the new down (n, H, D) and bias (n, H) in the merged dtype."""
    last: dict[int, Tensor] = {}
    for last in DownRefit(source, merged, activation, x, original, compressed, groups, target).solutions(ridge, steps):
        pass
    return _apply(merged, last)


@dataclass
class RefitCheck:
    """What the down refit's held-out check found in one layer (the manifest's per-layer "refit" entry). Errors
    are relative: sum ||Y - Y'||^2 / sum ||Y||^2 of the layer output Y over the held-out tokens."""

    kept: bool
    experts_refit: int  # output experts whose refit was kept
    heldout_error_before: float | None  # the merged/pruned layer's (None: nothing to check on)
    heldout_error_after: float | None  # the returned weights'
    ridges: list[float] | None  # each step's ridge, chosen on the held-out tokens (None when not kept)
    steps: int | None
    train_tokens: int
    heldout_tokens: int

    def manifest_entry(self, mode: str) -> dict[str, Any]:
        return {"mode": mode, **asdict(self)}


class _HeldOut:
    """The held-out tokens' layer-output error (T_h, H) under the merged weights and the compressed layer's routed
    rows, to score candidate changes. Errors are kept in float32 (they are differences of float32 outputs; their
    squared sums are taken in float64)."""

    def __init__(self, source: ExpertWeights, merged: ExpertWeights, activation: Activation, x: Tensor,
                 original: Routing, compressed: Routing, original_out: Tensor | None = None) -> None:
        x = x.float()
        target = (original_out if original_out is not None else
                  _routed_pass(source, activation, x, original, keep=False)[0]).float()
        self.scale = _squares(target)
        base, pairs = _routed_pass(merged, activation, x, compressed, keep=True)
        self.base_error = target - base
        del base, target
        self.rows = {}
        for n, (expert, routed) in enumerate(pairs):
            pairs[n] = None
            self.rows[expert] = (routed.token, _inputs(routed.weight, routed.acts, merged.down_bias is not None))

    def change(self, expert: int, delta: Tensor) -> tuple[Tensor, Tensor] | None:
        """The expert's held-out tokens and its output change there for a change `delta` of [down | bias]."""
        if expert not in self.rows:
            return None
        token, inputs = self.rows[expert]
        return token, inputs @ delta.T.float()

    def errors_of(self, changes: Iterator[tuple[int, list[Tensor]]], count: int,
                  keep: list[dict[int, Tensor]] | None = None) -> tuple[list[float], Tensor]:
        """The held-out squared error of each of `count` candidates whose changes arrive one expert at a time
        (`DownRefit.candidates`), and their errors (T_h, count, H): one error per candidate, not one copy of the
        weights unless `keep` (a list of `count` dicts) asks for every candidate's changes. An expert's candidates
        move the errors in one product, (n, D) x (D, count * H)."""
        errors = self.base_error.unsqueeze(1).repeat(1, count, 1)
        flat = errors.view(errors.shape[0], -1)
        for expert, candidates in changes:
            if keep is not None:
                for n, delta in enumerate(candidates):
                    keep[n][expert] = delta
            if expert in self.rows:
                token, inputs = self.rows[expert]
                flat.index_add_(0, token, inputs @ torch.cat(candidates).T.float(), alpha=-1)
        return [_squares(errors[:, n]) for n in range(count)], errors

    def error(self, delta: dict[int, Tensor]) -> Tensor:
        """(T_h, H) layer-output error Y - Y' of the merged layer changed by `delta`."""
        error = self.base_error.clone()
        for expert, change in delta.items():
            moved = self.change(expert, change)
            if moved is not None:
                error.index_add_(0, moved[0], moved[1], alpha=-1)
        return error


def _squares(values: Tensor) -> float:
    """sum of squares, accumulated in float64."""
    return float(values.square().sum(dtype=torch.float64))


KEEP_CANDIDATES_BYTES = 256 * 2**20  # a round keeps every ridge's changes (no second solve) up to this size


def _changes_bytes(experts: int, hidden: int, inner: int, element_size: int) -> int:
    """One set of changes of a layer's down projections (and a bias column)."""
    return experts * hidden * (inner + 1) * element_size


def _keeps_candidates(ridges: int, changes_bytes: int) -> bool:
    """Whether a round keeps every ridge's changes (`checked_down_refit`; `refit_bytes` counts them)."""
    return ridges * changes_bytes <= KEEP_CANDIDATES_BYTES


@dataclass
class SourceOutputs:
    """The original layer's output (sum_k w_k f_{i_k}(x), float32) on the sample's fit and held-out tokens: what a
    checked refit reproduces, computed once where two refits of one layer share it (`source_outputs`)."""

    fit: Tensor  # (T_fit, H)
    held_out: Tensor  # (T_held, H)


def source_outputs(source: ExpertWeights, activation: Activation, x: Tensor, held_out: Tensor,
                   original: Routing) -> SourceOutputs:
    x = x.float()
    return SourceOutputs(_routed_pass(source, activation, x[~held_out], _rows(original, ~held_out), keep=False)[0],
                         _routed_pass(source, activation, x[held_out], _rows(original, held_out), keep=False)[0])


def checked_down_refit(source: ExpertWeights, merged: ExpertWeights, activation: Activation, x: Tensor,
                       held_out: Tensor, original: Routing, compressed: Routing, groups: list[list[int]], target: str,
                       ridges: Sequence[float], steps: int,
                       outputs: SourceOutputs | None = None) -> tuple[Tensor, Tensor | None, RefitCheck]:
    """`refit_down_projections` fitted on the tokens of x not `held_out` (whole sequences: `heldout_sequences`)
    and kept only where it lowers the held-out error of the layer output, so it can never make a layer worse on
    text it did not fit. Up to `steps` steps (one for "group" targets) are taken while one lowers it, each with the
    ridge (of `ridges`) whose step has the lowest held-out error: every ridge's step comes from one target and one
    factor per expert, so the sweep costs little more than one step. Then each output expert whose refit does not
    lower the held-out error (given the others) gets its merged weights back, and the layer keeps its merged weights
    outright unless the result beats them. `outputs`: the source layer's outputs on the fit and held-out tokens,
    when already computed (`source_outputs`). Returns the down (n, H, D), bias (n, H) or None, and the check's
    record."""
    fit = ~held_out
    train_tokens, heldout_tokens = int(fit.sum()), int(held_out.sum())
    if train_tokens == 0 or heldout_tokens == 0:
        return (*_apply(merged, {}), RefitCheck(False, 0, None, None, None, None, train_tokens, heldout_tokens))
    problem = DownRefit(source, merged, activation, x[fit], _rows(original, fit), _rows(compressed, fit), groups,
                        target, None if outputs is None else outputs.fit)
    check = _HeldOut(source, merged, activation, x[held_out], _rows(original, held_out), _rows(compressed, held_out),
                     None if outputs is None else outputs.held_out)
    scale = max(check.scale, 1e-30)
    before = _squares(check.base_error)
    best, chosen = before, []
    best_error: Tensor | None = None  # the held-out errors of the last round taken, where its candidates were kept
    delta: dict[int, Tensor] = {}
    # every ridge's changes are kept through a round where they are small (else the chosen one is computed again)
    keep = _keeps_candidates(len(ridges), _changes_bytes(*merged.down.shape,
                                                         torch.empty((), dtype=problem.delta_dtype).element_size()))
    for _ in range(1 if target == "group" else steps):
        residual = problem.residual(delta)
        kept_candidates = [{} for _ in ridges] if keep else None
        errors, per_ridge = check.errors_of(problem.candidates(delta, residual, ridges), len(ridges), kept_candidates)
        pick = min(range(len(ridges)), key=errors.__getitem__)
        if errors[pick] >= best:
            break
        if kept_candidates is not None:
            delta, best_error = kept_candidates[pick], per_ridge[:, pick].clone()
        else:
            problem.step(delta, residual, ridges[pick])
            best_error = None
        del kept_candidates, per_ridge
        best = errors[pick]
        chosen.append(ridges[pick])
        del residual
    del problem
    error = best_error if best_error is not None else check.error(delta)
    for expert in sorted(delta):  # an expert's refit stays only where the held-out tokens it serves gain
        moved = check.change(expert, delta[expert])
        if moved is None:
            del delta[expert]  # no held-out token reaches it: nothing says its refit helps
            continue
        token, change = moved
        reverted = error[token] + change
        if _squares(reverted) <= _squares(error[token]):
            error[token] = reverted
            del delta[expert]
    after = _squares(error)
    kept = bool(delta) and after < before
    down, bias = _apply(merged, delta if kept else {})
    return down, bias, RefitCheck(kept, len(delta) if kept else 0, before / scale,
                                  (after if kept else before) / scale, chosen if kept else None,
                                  len(chosen) if kept else None, train_tokens, heldout_tokens)


def refit_bytes(tokens: int, top_k: int, inner: int, hidden: int, experts: int, weight_size: int = 4,
                heldout: float = HELDOUT_FRACTION, ridges: int = len(RIDGE_GRID)) -> int:
    """Peak working memory of `checked_down_refit` on a `tokens`-token sample of one layer kept to `experts`
    output experts of width `inner` (weights of `weight_size` bytes): the fit phase (the sample split in two,
    the fit pairs' rows and indices, every expert's factor, four (T, H) layer outputs, the held-out rows and one
    error per ridge of the sweep, every expert's change, the busiest expert's solve) plus the new down projections.
    The fit phase's memory is not given back before they are written (freed in many per-expert pieces, under the
    later allocations: measured, CPU), so the two add up. Checked against a measurement in tests/test_refit.py."""
    fit = tokens - round(tokens * heldout)
    held = tokens - fit
    rows, held_rows = fit * top_k, held * top_k
    delta = _changes_bytes(experts, hidden, inner, min(weight_size, 4))
    if _keeps_candidates(ridges, delta):
        delta *= ridges + 1
    busiest = min(rows, 2 * -(-rows // max(experts, 1)))  # a routed expert's rows, with room for skew
    factors = 8 * min(busiest, inner) * min(rows, experts * inner)  # sum of min(n, D)^2: exact where n >= D
    solve = 8 * (busiest * (inner + 2 * hidden) + 2 * min(busiest, inner) ** 2 + 2 * hidden * inner)
    held_part = held_rows * (4 * inner + 8) + (2 + ridges) * 8 * held * hidden
    fitting = (4 * tokens * hidden + rows * (4 * inner + 24) + factors + 4 * 4 * fit * hidden + held_part + delta
               + solve)
    return fitting + experts * hidden * inner * weight_size


REFIT_ROWS_PER_UNKNOWN = 8  # the sample `sized_refit_tokens` aims for: routed rows per unknown of one output channel
REFIT_MIN_TOKENS = 8192  # never a smaller sample than this (the former fixed one, the bench's regime)
REFIT_SAMPLE_BYTES = 8 * 2**30  # at most this much of the refit's working memory grows with its sample


def sized_refit_tokens(top_k: int, kept: int, inner: int, hidden: int) -> int:
    """The refit's sample for a layer of this shape when `refit_tokens` is not given: enough tokens for
    REFIT_ROWS_PER_UNKNOWN routed rows per unknown, tokens * top_k / (kept * D), where a least-squares fit starts to
    generalise (eval/bench_quality.py: held-out KL falls steadily from 0.12 to 16 rows per unknown), but at least
    REFIT_MIN_TOKENS, and no more than keeps the sample-dependent part of `refit_bytes` within REFIT_SAMPLE_BYTES
    (the activations, layer outputs and factors grow with the sample; the down projections and their changes do
    not). A fixed count gave 0.11 to 1.3 rows per unknown on published MoEs; this gives Qwen3-30B-A3B 8, GLM-4.5-Air
    2.4 to 3.7, DeepSeek-V3 0.5 to 0.7. Depends on the shape alone, so every machine and rank draws the same
    sample (the calibration's own size may cap it further)."""
    wanted = max(REFIT_MIN_TOKENS, -(-REFIT_ROWS_PER_UNKNOWN * kept * inner // top_k))
    grows = lambda tokens: refit_bytes(tokens, top_k, inner, hidden, kept) - refit_bytes(0, top_k, inner, hidden, kept)  # noqa: E731
    if grows(wanted) <= REFIT_SAMPLE_BYTES:
        return wanted
    low, high = REFIT_MIN_TOKENS, wanted  # the largest sample within the bound, never below the floor
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if grows(middle) <= REFIT_SAMPLE_BYTES else (low, middle)
    return low


def sized_refit_config(config: ReamConfig, *, top_k: int, kept: int, inner: int, hidden: int) -> ReamConfig:
    """`config` with `refit_tokens` set for a model whose MoE layers keep `kept` experts of width `inner` (hidden
    size `hidden`, top-`top_k` routing): itself when the field is given, else a copy with the sample
    `sized_refit_tokens` picks for that shape (a count that suits one shape is far too few rows per unknown for
    another). The saved `ream_config` keeps None (sized); the manifest's refit entries record the tokens."""
    if config.refit_tokens is not None:
        return config
    sized = copy.copy(config)
    sized.refit_tokens = sized_refit_tokens(top_k, kept, inner, hidden)
    return sized


def refit_flops(tokens: int, top_k: int, inner: int, hidden: int, experts: int, ridges: int, steps: int) -> float:
    """Multiply-adds x 2 of `checked_down_refit`: the routed passes of the original and the compressed experts
    on the sample (three GEMMs each); per expert its factor (Gram and eigendecomposition of the smaller side), then
    per step the layer's error under the current changes, the step's target, every ridge's solve and held-out
    change, and the chosen ridge's step again."""
    pairs = tokens * top_k
    rows = pairs / max(experts, 1)
    held_rows = rows * HELDOUT_FRACTION / (1 - HELDOUT_FRACTION)
    small = min(rows, inner)  # the dual's n or the primal's D
    factor = 2 * rows * small * inner + 9 * small ** 3
    product = 2 * rows * hidden * inner  # rows times a change, or targets times rows
    apply = 2 * hidden * small * inner  # one ridge's solve from the factor
    held = 2 * held_rows * hidden * inner
    per_step = 3 * product + (ridges + 1) * apply + ridges * held
    return 12.0 * hidden * inner * pairs + experts * (factor + steps * per_step + held)
