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
- **Router refit** (cf. router-only distillation after pruning, arXiv 2603.02217, here in closed form): the kept
  rows R (k', H) are fit by least squares on logits, R = (sum t x^T + lam R_0)(sum x x^T + lam I)^-1, to the
  target logit of each output expert's group: log sum_{i in group} exp z_i(x) for softmax routers (softmax over
  the kept experts then gives each output expert exactly its group's probability mass), logit(sum_i sigmoid
  z_i(x)) for sigmoid routers. A singleton group's target is its own logit, which the least squares reproduces:
  only the rows of merged groups move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..arch import ExpertWeights
from ..config import REFIT_TARGETS
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


class RidgeSystem:
    """`ridge_solve` with a zero prior for one (d, d) gram and many right-hand sides over time: the system
    G + lam I is factorised once (Cholesky; it is symmetric positive definite for lam > 0)."""

    def __init__(self, gram: Tensor, ridge: float) -> None:
        gram = gram.double()
        scale = float(torch.diagonal(gram).mean())
        self.factor = None
        if scale > 0:
            system = gram + ridge * scale * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
            self.factor = torch.linalg.cholesky(system)

    def solve(self, cross: Tensor) -> Tensor:
        """argmin_W sum ||W u - t||^2 + lam ||W||^2 from cross = sum t u^T (h, d); zero where no token came."""
        cross = cross.double()
        if self.factor is None:
            return torch.zeros_like(cross)
        return torch.cholesky_solve(cross.T, self.factor).T


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
        one = weights.select([expert]).to(torch.float32)
        gate_up = x[token] @ torch.cat([one.gate[0], one.up[0]]).T  # one GEMM for both: a quarter faster
        gate, up = gate_up[:, :inner], gate_up[:, inner:]
        if one.gate_bias is not None:
            gate, up = gate + one.gate_bias[0], up + one.up_bias[0]
        acts = activation(gate, up)
        weight = routing.weights[token, slot].float().unsqueeze(1)
        result = acts @ one.down[0].T
        if one.down_bias is not None:
            result += one.down_bias[0]
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


def _cross_validated_error(inputs: Tensor, goal: Tensor, prior: Tensor, ridge: float) -> float:
    """Squared error of the ridge fit on held-out rows, two folds (alternate rows): the fit's own rows would
    favour whichever candidate over-fits."""
    fold = torch.arange(inputs.shape[0], device=inputs.device) % 2
    error = 0.0
    for held in (0, 1):
        train, test = fold != held, fold == held
        u, t = inputs[train].double(), goal[train].double()
        fitted = ridge_solve((u.T @ u)[None], (t.T @ u)[None], prior[None], ridge)[0]
        error += float(((inputs[test].double() @ fitted.T - goal[test].double()) ** 2).sum())
    return error


def merges_worth_keeping(source: ExpertWeights, merged: ExpertWeights, activation: Activation, x: Tensor,
                         original: Routing, compressed: Routing, groups: list[list[int]], ridge: float,
                         margin: float = 0.0) -> list[bool]:
    """For each output expert, whether its merged weights reproduce its group's original gated outputs (the
    "group" target) on the tokens `compressed` routes to it better than its centroid alone (groups[j][0],
    unmerged): held-out squared error lower by more than the relative `margin`. Each candidate's down projection
    is fit by ridge least squares on one half of the rows and judged on the other (two folds). Singletons, and
    outputs few sample tokens reach, keep what they have (True)."""
    x = x.float()
    tokens = x.shape[0]
    keep = [True] * len(groups)
    order, slices = pairs_by_expert(compressed.index, len(groups))
    for expert, part in slices:
        if len(groups[expert]) < 2 or part.stop - part.start < 4:
            continue
        pair = order[part]
        token, slot = pair % tokens, pair // tokens
        weight = compressed.weights[token, slot].float().unsqueeze(1)
        goal = _member_outputs(source, activation, x, original, groups[expert], token)
        errors = []
        for candidate in (merged.select([expert]), source.select([groups[expert][0]])):
            one = candidate.to(torch.float32)
            gate, up = x[token] @ one.gate[0].T, x[token] @ one.up[0].T
            if one.gate_bias is not None:
                gate, up = gate + one.gate_bias[0], up + one.up_bias[0]
            inputs, prior = _design(weight, activation(gate, up), one.down[0],
                                    None if one.down_bias is None else one.down_bias[0])
            errors.append(_cross_validated_error(inputs, goal, prior, ridge))
        keep[expert] = errors[0] <= (1.0 - margin) * errors[1]
    return keep


def refit_down_projections(source: ExpertWeights, merged: ExpertWeights, activation: Activation, x: Tensor,
                           original: Routing, compressed: Routing, groups: list[list[int]], target: str,
                           ridge: float, steps: int = 1) -> tuple[Tensor, Tensor | None]:
    """Each output expert's down projection (and down bias, if any) refit by ridge least squares on the tokens
    `x` (T, H) that `compressed` routes to it, towards the `target` ("residual" or "group", see the module
    docstring); `original` is the source router's choice on the same tokens, `groups[j]` the source experts
    output expert j stands for. Returns the new down (n, H, D) and bias (n, H) in the merged dtype.

    "residual" may take several `steps`: each recomputes the layer's error with the weights of the step before
    and shares it again (block Jacobi towards the joint least squares over all experts, ridge towards the
    previous step's weights). "group" targets do not depend on the other experts: one step.

    Memory: two (T, H) layer outputs, the routed pairs' (T * k, D) activations, and one expert's (D, D) and (H, D)
    sums at a time; `x` is a fixed-size token sample, so none of it grows with the calibration."""
    if target not in REFIT_TARGETS:
        raise ValueError(f"refit target must be one of {', '.join(REFIT_TARGETS)}; got {target!r}")
    x = x.float()
    inner = merged.down.shape[2]
    has_bias = merged.down_bias is not None
    compressed_out, pairs = _routed_pass(merged, activation, x, compressed, keep=True)
    down = merged.down.detach().clone()
    bias = merged.down_bias.detach().clone() if has_bias else None

    def design(expert: int, routed: RoutedPairs) -> tuple[Tensor, Tensor]:
        return _design(routed.weight, routed.acts, down[expert], bias[expert] if has_bias else None)

    def store(expert: int, solved: Tensor) -> None:
        down[expert] = solved[:, :inner].to(down.dtype)
        if has_bias:
            bias[expert] = solved[:, inner].to(bias.dtype)

    if target == "group":
        for expert, routed in pairs:
            inputs, current = design(expert, routed)
            goal = _member_outputs(source, activation, x, original, groups[expert], routed.token)
            store(expert, ridge_solve((inputs.T @ inputs).double()[None], (goal.T @ inputs).double()[None],
                                      current[None], ridge)[0])
        return down, bias
    original_out = _routed_pass(source, activation, x, original, keep=False)[0]
    total = compressed.weights.float().sum(dim=1, keepdim=True)
    share_of = compressed.weights.float() / total.clamp(min=1e-20)  # the token's error shared by weight
    # each expert's design rows and ridge system do not change between steps: built and factorised once
    systems = []
    for expert, routed in pairs:
        inputs, _ = design(expert, routed)
        systems.append((expert, routed, inputs, RidgeSystem(inputs.T @ inputs, ridge),
                        share_of[routed.token, routed.slot].unsqueeze(1)))
    for step in range(steps):
        residual = original_out - compressed_out
        last = step == steps - 1
        compressed_out = None if last else torch.zeros_like(compressed_out)  # the next step's error needs it
        for expert, routed, inputs, system, share in systems:
            _, current = design(expert, routed)
            # target w f(x) + s r(x) with w f(x) = current u: the solution is current + (sum s r u^T)(G + lam I)^-1
            solved = current + system.solve((share * residual[routed.token]).T @ inputs)
            store(expert, solved)
            if not last:
                compressed_out.index_add_(0, routed.token, inputs @ solved.T.float())
    return down, bias
