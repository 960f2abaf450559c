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


def output_similarity(output_signatures: Tensor) -> Tensor:
    """(cos(o_i, o_j) + 1) / 2 for the (E, H) gated output signatures; a zero signature has cosine 0 with all."""
    unit = _unit_rows(output_signatures)
    cosine = (unit @ unit.T).clamp(-1.0, 1.0)
    return (cosine + 1.0) / 2.0


# Gram-derived distances of identical columns come out as rounding noise (about 1e-8), not 0
GRAM_DISTANCE_NOISE = 1e-7


def logit_gram(router_logits: Tensor) -> Tensor:
    """(E, E) float64 dot products of the (T, E) router-logit columns: all that gate similarity needs, and
    summable over token chunks, so the statistics pass never keeps the (T, E) logits themselves."""
    logits = router_logits.double()
    return logits.T @ logits


def gate_similarity(router_logits: Tensor) -> Tensor:
    """1 - d / max(d) over the (T, E) logit columns, each normalised over tokens, so experts the router
    scores alike on the same tokens are close."""
    return gate_similarity_from_gram(logit_gram(router_logits))


def unit_column_distance(dots: Tensor, left_squared_norms: Tensor, right_squared_norms: Tensor) -> Tensor:
    """(a, b) float64 Euclidean distances between columns after each is scaled to unit norm, from the columns'
    dot products (a, b) and squared norms alone (so both can be summed over token chunks): unit columns u, v
    have |u - v|^2 = |u|^2 + |v|^2 - 2 cos(u, v), with |u|^2 = 1, or 0 for an all-zero column (which stays zero)."""
    left, right = left_squared_norms.double().sqrt(), right_squared_norms.double().sqrt()
    scale = torch.outer(torch.where(left > 0, left, 1.0), torch.where(right > 0, right, 1.0))
    cosine = (dots.double() / scale).clamp(-1.0, 1.0)
    unit = (left > 0).double()[:, None] + (right > 0).double()[None, :]
    return (unit - 2.0 * cosine).clamp_min(0.0).sqrt()


def gate_similarity_from_gram(gram: Tensor) -> Tensor:
    """`gate_similarity` from the columns' `logit_gram`."""
    squared_norms = torch.diagonal(gram)
    distance = unit_column_distance(gram, squared_norms, squared_norms)
    distance = torch.where(distance < GRAM_DISTANCE_NOISE, torch.zeros_like(distance), distance)
    distance = (distance + distance.T) / 2
    distance.fill_diagonal_(0.0)
    largest = distance.max()
    if largest <= 0:
        return torch.ones_like(distance, dtype=torch.float32)
    return (1.0 - distance / largest).float()


def expert_distance(output_signatures: Tensor, router_logit_gram: Tensor | None) -> Tensor:
    """1 - sim with sim the mean of output and gate similarity (output only without logits); (E, E), zero
    diagonal. The gate term comes from the router-logit columns' `logit_gram`."""
    similarity = output_similarity(output_signatures)
    if router_logit_gram is not None:
        if router_logit_gram.shape != (output_signatures.shape[0],) * 2:
            raise ValueError(
                f"router_logit_gram has shape {tuple(router_logit_gram.shape)} but output_signatures has "
                f"{output_signatures.shape[0]} experts; pass the same layer's statistics"
            )
        similarity = (similarity + gate_similarity_from_gram(router_logit_gram)) / 2
    distance = 1.0 - similarity
    distance = (distance + distance.T) / 2
    distance.fill_diagonal_(0.0)
    return distance
