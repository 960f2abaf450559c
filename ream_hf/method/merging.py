"""Merging one group of experts into one (METHOD.md §4): neuron alignment to the centroid, then a weighted sum.

Canonical layout (see experts.py): gate (n, D, H), up (n, D, H), down (n, H, D); optional biases
"gate_bias" / "up_bias" (n, D) and "down_bias" (n, H) passed as a dict. Hidden neuron d of an expert is
gate row d, up row d and down column d; permuting neurons leaves the expert's function unchanged, which
is why members are permuted to match the centroid before averaging.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..arch import ExpertWeights
from ..config import WEIGHT_FEATURES
from .refit import ridge_solve
from .similarity import unit_column_distance

ALIGNMENT_MODES = ("activations+weights", "activations", "weights")
PCA_SEED = 0


def _unit_rows(rows: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return rows / torch.where(norm > 0, norm, torch.ones_like(norm))


FEATURE_CHUNK_BYTES = 64 * 2**20  # float32 neuron rows built at once; the whole layer's would be 2x its bf16 size


def _neuron_row_chunks(gate: Tensor, up: Tensor, down: Tensor) -> Iterator[Tensor]:
    """Unit-normalised concat(gate row, up row, down column) of every hidden neuron, a few experts at a time:
    (chunk experts * D, 3H) float32 blocks in expert order, rebuilt on each pass instead of stored."""
    num_experts, inner, hidden = gate.shape
    per_chunk = max(1, FEATURE_CHUNK_BYTES // (inner * 3 * hidden * 4))
    for start in range(0, num_experts, per_chunk):
        part = slice(start, start + per_chunk)
        rows = torch.cat([gate[part].float(), up[part].float(), down[part].float().transpose(1, 2)], dim=2)
        yield _unit_rows(rows.reshape(-1, 3 * hidden))


def _principal_directions(row_chunks: Callable[[], Iterator[Tensor]], dim: int, iterations: int = 4,
                          oversample: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`dim` principal directions (C, dim) of the centred rows (N, C), their singular values (dim,) and
    the row mean (1, C), by
    randomized subspace iteration with a fixed seed: deterministic, and exact whenever dim + oversample covers
    all C columns. Rows come from `row_chunks()` (called once per pass), so the (N, C) matrix never exists."""
    total, count = None, 0
    for rows in row_chunks():
        total = rows.sum(dim=0, keepdim=True) if total is None else total + rows.sum(dim=0, keepdim=True)
        count += rows.shape[0]
    mean = total / count
    columns = mean.shape[1]
    width = min(dim + oversample, columns)
    generator = torch.Generator(device=mean.device).manual_seed(PCA_SEED)
    basis = torch.randn(columns, width, generator=generator, device=mean.device, dtype=mean.dtype)

    def centred_image(basis: Tensor) -> Tensor:  # (N, width): centred rows times basis
        return torch.cat([rows @ basis for rows in row_chunks()]) - mean @ basis

    for _ in range(iterations):
        image = torch.linalg.qr(centred_image(basis)).Q
        back = -mean.T @ image.sum(dim=0, keepdim=True)
        start = 0
        for rows in row_chunks():
            back += rows.T @ image[start : start + rows.shape[0]]
            start += rows.shape[0]
        basis = torch.linalg.qr(back).Q
    _, singular, right = torch.linalg.svd(centred_image(basis), full_matrices=False)
    return basis @ right[:dim].T, singular[:dim], mean


def weight_features(gate: Tensor, up: Tensor, down: Tensor, dim: int = 64, kind: str = "scaled") -> Tensor:
    """Per-neuron weight signature for alignment: concat(gate row, up row, down column), unit-normalised,
    then PCA over all neurons of all experts of the layer so every expert shares one basis. (E, D, p).

    kind "plain": the centred projection onto the principal directions. Its rows are short (most of a unit row's
    length lies outside 64 of 3H dimensions), so next to the unit-column activation distances the weight term
    barely counts. kind "scaled" (the reference code's): the projection scaled by the singular values, each row
    then re-normalised to unit length, so the weight distance spans [0, 2] like the activation one."""
    if kind not in WEIGHT_FEATURES:
        raise ValueError(f"weight feature kind must be one of {', '.join(WEIGHT_FEATURES)}; got {kind!r}")
    num_experts, inner, hidden = gate.shape
    dims = min(dim, 3 * hidden, num_experts * inner)
    row_chunks = lambda: _neuron_row_chunks(gate, up, down)  # noqa: E731
    directions, singular, mean = _principal_directions(row_chunks, dims)
    if kind == "scaled":
        directions = directions * singular
    projected = torch.cat([rows @ directions for rows in row_chunks()]) - mean @ directions
    if kind == "scaled":
        projected = _unit_rows(projected)
    return projected.reshape(num_experts, inner, dims)


class ActivationGram:
    """What the activation part of the alignment cost needs, accumulated over chunks of sample tokens.

    The cost compares neuron columns of (Ts, D) activation matrices after normalising each column over the
    tokens. The distance between unit columns depends only on their norms and dot products, so these running
    sums give it exactly, and a large group's activations never have to be held as (members, Ts, D).
    """

    def __init__(self, count: int, inner: int) -> None:
        self.squared_norms = torch.zeros(count, inner, dtype=torch.float64)  # (n, D)
        self.centroid_dots = torch.zeros(count, inner, inner, dtype=torch.float64)  # [j][a, b] = <c col a, j col b>

    @classmethod
    def of(cls, acts: Tensor) -> ActivationGram:
        """From whole activation samples (n, Ts, D), centroid first."""
        gram = cls(acts.shape[0], acts.shape[2])
        gram.add(acts)
        return gram

    def add(self, acts: Tensor) -> None:
        """Activations (n, c, D) of the group (centroid first) on the next chunk of sample tokens."""
        acts = acts.float()
        self.squared_norms += acts.pow(2).sum(dim=1).double().cpu()
        self.centroid_dots += torch.matmul(acts[0].T, acts).double().cpu()

    def distance(self, member: int) -> Tensor:
        """(D, D) Euclidean distances between the centroid's unit columns and member's (zero columns stay zero)."""
        return unit_column_distance(self.centroid_dots[member], self.squared_norms[0], self.squared_norms[member]).float()


def alignment_cost(
    centroid_acts: Tensor | None,
    member_acts: Tensor | None,
    centroid_feats: Tensor | None,
    member_feats: Tensor | None,
    mode: str,
    *,
    activation_distance: Tensor | None = None,
) -> Tensor:
    """(D, D) cost of matching centroid neuron i to member neuron j. Activations are (Ts, D) on the same
    sample tokens, each neuron's column normalised over tokens here (or their distances already computed by
    `ActivationGram.distance`); features are `weight_features` rows."""
    if mode not in ALIGNMENT_MODES:
        raise ValueError(f"alignment mode must be one of {', '.join(ALIGNMENT_MODES)}; got {mode!r}")
    cost = None
    if "activations" in mode:
        if activation_distance is None:
            if centroid_acts is None or member_acts is None:
                raise ValueError(f"merge mode {mode!r} needs hidden activation samples; collect them or use merge='weights'")
            activation_distance = ActivationGram.of(torch.stack([centroid_acts, member_acts])).distance(1)
        cost = activation_distance
    if "weights" in mode:
        if centroid_feats is None or member_feats is None:
            raise ValueError(f"merge mode {mode!r} needs weight features; compute them with weight_features()")
        feature_cost = torch.cdist(centroid_feats.float(), member_feats.float())
        cost = feature_cost if cost is None else cost.to(feature_cost.device) + feature_cost  # Gram sums live on the host
    return cost


def align_to_centroid(cost: Tensor) -> Tensor:
    """Hungarian matching: perm (D,) with member neuron perm[n] matched to centroid neuron n."""
    rows, columns = linear_sum_assignment(cost.detach().cpu().double().numpy())
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(columns, dtype=torch.long)
    return perm


def permute_expert(
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    perm: Tensor,
    gate_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """One expert (gate (D, H), up (D, H), down (H, D)) with its hidden neurons reordered; same function."""
    perm = perm.to(gate.device)
    return (
        gate[perm],
        up[perm],
        down[:, perm],
        None if gate_bias is None else gate_bias[perm],
        None if up_bias is None else up_bias[perm],
    )


def merge_group(
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    weights: Tensor,
    perms: Tensor | list[Tensor] | None = None,
    biases: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Weighted sum of the group's (permuted) experts, accumulated in float32 and cast back to the input
    dtype. Members are stacked centroid first; weights (n,) should sum to 1; perms[0] is the identity.
    Returns merged gate (D, H), up (D, H), down (H, D) and the merged biases (empty dict without biases)."""
    count = gate.shape[0]
    if weights.shape[0] != count:
        raise ValueError(f"{weights.shape[0]} merge weights for a group of {count} experts")
    biases = {name: b for name, b in (biases or {}).items() if b is not None}
    merged_gate = torch.zeros(gate.shape[1:], dtype=torch.float32, device=gate.device)
    merged_up = torch.zeros(up.shape[1:], dtype=torch.float32, device=up.device)
    merged_down = torch.zeros(down.shape[1:], dtype=torch.float32, device=down.device)
    merged_biases = {name: torch.zeros(b.shape[1:], dtype=torch.float32, device=b.device) for name, b in biases.items()}
    for j, weight in enumerate(weights.double().tolist()):
        perm = None if perms is None else perms[j]
        member_gate, member_up, member_down = gate[j], up[j], down[j]
        member_biases = {name: b[j] for name, b in biases.items()}
        if perm is not None:
            member_gate, member_up, member_down, gate_bias, up_bias = permute_expert(
                member_gate, member_up, member_down, perm, member_biases.get("gate_bias"), member_biases.get("up_bias")
            )
            member_biases.update({k: v for k, v in (("gate_bias", gate_bias), ("up_bias", up_bias)) if v is not None})
        merged_gate.add_(member_gate.float(), alpha=weight)
        merged_up.add_(member_up.float(), alpha=weight)
        merged_down.add_(member_down.float(), alpha=weight)
        for name, b in member_biases.items():
            merged_biases[name].add_(b.float(), alpha=weight)
    return (
        merged_gate.to(gate.dtype),
        merged_up.to(up.dtype),
        merged_down.to(down.dtype),
        {name: merged_biases[name].to(biases[name].dtype) for name in merged_biases},
    )


def keeps_centroid(mode: str, group_size: int) -> bool:
    """Whether merging a group of `group_size` experts (centroid included) returns the centroid unchanged: a
    writer can then copy the centroid's stored tensors as they are (a quantized source's bytes and scales)."""
    return mode == "none" or group_size == 1


def merge_expert_group(
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    weights: Tensor,
    mode: str,
    acts: Tensor | None = None,
    feats: Tensor | None = None,
    biases: dict[str, Tensor] | None = None,
    gram: ActivationGram | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """One output expert from its group (stacked centroid first), per merge mode: "activations+weights" /
    "activations" / "weights" align every member to the centroid, then saliency-weighted sum; "avg" uniform
    average without alignment; "none" the centroid unchanged. Activations come as acts (n, Ts, D) or as
    their `ActivationGram`; feats (n, D, p). "neurons" also returns the centroid here: its neurons are chosen
    and its down projection fit (`neuron_merge`) against the compressed router's weights, so only once the
    router has been cut (pipeline/layer.py `merge_neurons`)."""
    biases = {name: b for name, b in (biases or {}).items() if b is not None}
    count = gate.shape[0]
    if keeps_centroid(mode, count) or mode == "neurons":
        return gate[0], up[0], down[0], {name: b[0] for name, b in biases.items()}
    if mode == "avg":
        return merge_group(gate, up, down, torch.full((count,), 1.0 / count, dtype=torch.float64), biases=biases)
    if mode not in ALIGNMENT_MODES:
        raise ValueError(f"merge mode must be one of {', '.join((*ALIGNMENT_MODES, 'avg', 'neurons', 'none'))}; got {mode!r}")
    if gram is None and acts is not None and "activations" in mode:
        gram = ActivationGram.of(acts)
    perms = [torch.arange(gate.shape[1])]
    for j in range(1, count):
        cost = alignment_cost(
            None,
            None,
            None if feats is None else feats[0],
            None if feats is None else feats[j],
            mode,
            activation_distance=None if gram is None else gram.distance(j),
        )
        perms.append(align_to_centroid(cost))
    return merge_group(gate, up, down, weights, perms=perms, biases=biases)


def select_neurons(gram: Tensor, cross: Tensor, count: int, ridge: float) -> Tensor:
    """Greedy forward selection of `count` of the N candidate neurons whose least-squares fit of the target is
    best, from the candidates' Gram sum u u^T (N, N) and cross sum t u^T (H, N). Each step adds the neuron that
    lowers the residual sum of squares most given those already chosen (a pivoted Cholesky of the Gram, ridge
    `ridge` x its mean diagonal on the diagonal, carrying the residual cross terms along): the fit itself is the
    criterion, not a per-neuron score, which misses that two neurons may carry the same signal. Returns the
    chosen indices (count,) in the order chosen; O(count * N * (H + count)) time, (N, count) extra memory."""
    gram, residual_cross = gram.double(), cross.double().clone()
    total = gram.shape[0]
    count = min(count, total)
    scale = float(torch.diagonal(gram).mean())
    lam = ridge * scale if scale > 0 else 1.0
    residual_var = torch.diagonal(gram).clone() + lam  # each candidate's variance left after the chosen ones
    factor = torch.zeros(total, count, dtype=torch.float64, device=gram.device)
    free = torch.ones(total, dtype=torch.bool, device=gram.device)
    chosen = []
    for step in range(count):
        gain = (residual_cross ** 2).sum(dim=0) / residual_var.clamp(min=lam * 1e-12)
        gain = torch.where(free, gain, torch.full_like(gain, -1.0))
        pick = int(torch.argmax(gain))
        pivot = float(residual_var[pick]) ** 0.5
        column = (gram[:, pick] - factor[:, :step] @ factor[pick, :step]) / pivot
        column[pick] = pivot  # the ridge sits on the diagonal
        factor[:, step] = column
        residual_var -= column ** 2
        residual_cross -= torch.outer(residual_cross[:, pick] / pivot, column)
        free[pick] = False
        chosen.append(pick)
    return torch.tensor(chosen, dtype=torch.long)


def neuron_merge(group: ExpertWeights, activation: Callable[[Tensor, Tensor], Tensor], x: Tensor, weight: Tensor,
                 goal: Tensor, ridge: float) -> ExpertWeights:
    """One expert of D neurons chosen among the group's C x D (stacked centroid first), each kept with its exact
    gate and up rows (and biases), whose down projection is then fit by ridge least squares so that its gated
    output w(x) W a(x) reproduces `goal` (n, H), the group's gated output, on the routed tokens x (n, H) with the
    output expert's routing weights `weight` (n, 1). The prior of the fit is each chosen neuron's own down column
    (and the centroid's down bias). The neurons are chosen by `select_neurons`; the centroid's own D neurons are
    the other candidate, and whichever fits `goal` better on these rows is returned: never worse than the
    centroid alone on the rows it is fit on (held out, `floor.merge_floor` decides). Returns a one-expert
    `ExpertWeights` in the group's dtype."""
    count, inner, hidden = group.gate.shape
    if x.shape[0] == 0:
        return group.select([0])
    fp = group.to(torch.float32)
    x, weight = x.float(), weight.float()
    gate, up = torch.matmul(x, fp.gate.transpose(1, 2)), torch.matmul(x, fp.up.transpose(1, 2))  # (C, n, D)
    if fp.gate_bias is not None:
        gate, up = gate + fp.gate_bias[:, None, :], up + fp.up_bias[:, None, :]
    inputs = (weight * activation(gate, up).transpose(0, 1).reshape(x.shape[0], count * inner)).double()  # (n, C D)
    goal = goal.double()
    columns = (fp.down.transpose(1, 2).reshape(count * inner, hidden).T).double()  # (H, C D): neuron n's down column
    extra = [weight.double()] if fp.down_bias is not None else []  # the down bias: one more input column
    bias_prior = [fp.down_bias[0].double().unsqueeze(1)] if fp.down_bias is not None else []
    best = None
    candidates = [torch.arange(inner)]
    if count > 1:
        candidates.insert(0, select_neurons(inputs.T @ inputs, goal.T @ inputs, inner, ridge).sort().values)
    for chosen in candidates:
        u = torch.cat([inputs[:, chosen], *extra], dim=1)
        prior = torch.cat([columns[:, chosen], *bias_prior], dim=1)
        solved = ridge_solve((u.T @ u)[None], (goal.T @ u)[None], prior[None], ridge)[0]
        error = float(((u @ solved.T - goal) ** 2).sum())
        if best is None or error <= best[0]:  # ties go to the centroid's own neurons (last)
            best = (error, chosen, solved)
    _, chosen, solved = best
    flat = lambda t: t.reshape(count * inner, *t.shape[2:])[chosen]  # noqa: E731  (C, D, ...) -> chosen neurons
    dtype = group.gate.dtype
    return ExpertWeights(
        gate=flat(group.gate).unsqueeze(0), up=flat(group.up).unsqueeze(0),
        down=solved[:, :inner].to(dtype).unsqueeze(0),
        gate_bias=None if group.gate_bias is None else flat(group.gate_bias).unsqueeze(0),
        up_bias=None if group.up_bias is None else flat(group.up_bias).unsqueeze(0),
        down_bias=None if group.down_bias is None else solved[:, inner].to(group.down_bias.dtype).unsqueeze(0),
    )
