"""The merge floor: a merged expert is kept only where it reproduces its group better than the centroid alone.

Pruning a group keeps the centroid's weights exactly; a merge changes them. Whether that helps is a question
about the group's gated output, sum_{i in group} g_i(x) f_i(x) under the original router, on the tokens the
compressed router sends to the group's output expert j (the only tokens j's weights can change): candidate c's
error there is sum ||goal(x) - w'_j(x) f_c(x)||^2. It is judged on held-out WHOLE calibration sequences: the
fits before it (the neuron-selection merge, the down refit) see the other sequences, and neighbouring tokens of
one text are near-copies, so a check on them would reward a candidate that learnt the sample.

With `ridge`, each candidate's down projection (and down bias) is first fit on the non-held-out rows (ridge
least squares anchored to its own, `refit.ridge_solve`), so the comparison is between what the gate and up
projections can reproduce once the down projection is refit, as the default pipeline then does. Without it the
candidates are compared as they are. Everything is computed on the layer's fixed-size token sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..arch import ExpertWeights
from .experts import Activation, pairs_by_expert
from .refit import Routing, _design, _member_outputs, ridge_solve


@dataclass
class FloorCheck:
    """One merge group's verdict. Errors are relative to the group's gated output on the held-out tokens routed
    to the output expert: sum ||goal - candidate||^2 / sum ||goal||^2 (None: no held-out token reached it)."""

    merged: bool  # False: the group fell back to its centroid alone (pruned)
    heldout_error_merged: float | None
    heldout_error_centroid: float | None
    heldout_tokens: int  # held-out routed rows the verdict rests on
    fit_tokens: int

    def manifest_entry(self) -> dict[str, Any]:
        return asdict(self)


def routed_rows(one: ExpertWeights, activation: Activation, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The expert `one` (a single expert, float32) on routed tokens x (n, H) with routing weights (n, 1): its
    design rows u = w a(x) (n, D [+1 with a down bias]) and its [down | bias] (H, D [+1]) float64, so that its
    gated output is u @ [down | bias]^T."""
    gate, up = x @ one.gate[0].T, x @ one.up[0].T
    if one.gate_bias is not None:
        gate, up = gate + one.gate_bias[0], up + one.up_bias[0]
    return _design(weight, activation(gate, up), one.down[0], None if one.down_bias is None else one.down_bias[0])


def heldout_error(inputs: Tensor, current: Tensor, goal: Tensor, held_out: Tensor, ridge: float | None) -> float:
    """Squared error of u @ W^T against `goal` on the `held_out` rows; W is `current`, or with `ridge` its ridge
    fit (anchored to `current`) on the other rows."""
    weights = current
    fit = ~held_out
    if ridge is not None and bool(fit.any()):
        u, t = inputs[fit].double(), goal[fit].double()
        weights = ridge_solve((u.T @ u)[None], (t.T @ u)[None], current[None], ridge)[0]
    residual = inputs[held_out].double() @ weights.T - goal[held_out].double()
    return float((residual ** 2).sum())


def merge_floor(source: ExpertWeights, merged: ExpertWeights, activation: Activation, x: Tensor, held_out: Tensor,
                original: Routing, compressed: Routing, groups: list[list[int]], ridge: float | None = None,
                margin: float = 0.0) -> list[FloorCheck | None]:
    """Per output expert j: None for a singleton group (nothing merged), else whether its merged weights
    (`merged`, j-th expert) reproduce the group's gated output on the held-out tokens (`held_out` (T,) bool over
    the sample x (T, H)) better than its centroid alone (source expert groups[j][0]) by more than the relative
    `margin`. A group no held-out token reaches falls back: nothing shows that its merge helps. `original` and
    `compressed` are the source and the compressed router's choices on x."""
    x = x.float()
    tokens = x.shape[0]
    held_out = held_out.to(x.device)
    checks: list[FloorCheck | None] = [None if len(g) < 2 else FloorCheck(False, None, None, 0, 0) for g in groups]
    order, slices = pairs_by_expert(compressed.index, len(groups))
    for expert, part in slices:
        if len(groups[expert]) < 2:
            continue
        pair = order[part]
        token, slot = pair % tokens, pair // tokens
        test = held_out[token]
        heldout_tokens, fit_tokens = int(test.sum()), int((~test).sum())
        if heldout_tokens == 0:
            checks[expert] = FloorCheck(False, None, None, 0, fit_tokens)
            continue
        weight = compressed.weights[token, slot].float().unsqueeze(1)
        goal = _member_outputs(source, activation, x, original, groups[expert], token)
        errors = [heldout_error(*routed_rows(candidate.to(torch.float32), activation, x[token], weight), goal, test,
                                ridge)
                  for candidate in (merged.select([expert]), source.select([groups[expert][0]]))]
        scale = float((goal[test].double() ** 2).sum())
        scale = scale if scale > 0 else 1.0
        checks[expert] = FloorCheck(errors[0] < (1.0 - margin) * errors[1], errors[0] / scale, errors[1] / scale,
                                    heldout_tokens, fit_tokens)
    return checks
