"""Expert-to-expert distances for grouping (METHOD.md §2): gated-output cosine and router-logit columns."""

from __future__ import annotations

import torch
from torch import Tensor


def _unit_rows(rows: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm; all-zero rows stay zero so their cosines come out 0, not NaN.

    Rows are first divided by their largest entry so tiny gated outputs do not underflow in the norm.
    """
    rows = rows.float()
    peak = rows.abs().amax(dim=1, keepdim=True)
    rows = rows / torch.where(peak > 0, peak, torch.ones_like(peak))
    norm = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows / torch.where(norm > 0, norm, torch.ones_like(norm))


def output_similarity(gated_outputs: Tensor) -> Tensor:
    """(cos(o_i, o_j) + 1) / 2 for the (E, H) gated output signatures; a zero signature has cosine 0 with all."""
    unit = _unit_rows(gated_outputs)
    cosine = (unit @ unit.T).clamp(-1.0, 1.0)
    return (cosine + 1.0) / 2.0


def gate_similarity(router_logits: Tensor) -> Tensor:
    """1 - d / max(d) over the (T, E) logit columns, each normalised over tokens, so experts the router
    scores alike on the same tokens are close."""
    columns = _unit_rows(router_logits.T)
    distance = torch.cdist(columns, columns)
    distance = (distance + distance.T) / 2
    distance.fill_diagonal_(0.0)
    largest = distance.max()
    if largest <= 0:
        return torch.ones_like(distance)
    return 1.0 - distance / largest


def expert_distance(gated_outputs: Tensor, router_logits: Tensor | None) -> Tensor:
    """1 - sim with sim the mean of output and gate similarity (output only without logits); (E, E), zero diagonal."""
    similarity = output_similarity(gated_outputs)
    if router_logits is not None:
        if router_logits.shape[1] != gated_outputs.shape[0]:
            raise ValueError(
                f"router_logits has {router_logits.shape[1]} expert columns but gated_outputs has "
                f"{gated_outputs.shape[0]} experts; pass the same layer's statistics"
            )
        similarity = (similarity + gate_similarity(router_logits)) / 2
    distance = 1.0 - similarity
    distance = (distance + distance.T) / 2
    distance.fill_diagonal_(0.0)
    return distance
