"""One MoE layer (trunk or MTP), from its calibration inputs to its compressed experts: statistics -> plan ->
merge -> surgery, and the re-forward that feeds what follows it."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import (ExpertWeights, MoEFamily, experts, moe_block, read_expert_weights, router, router_tensors,
                    write_expert_weights)
from ..config import ReamConfig
from ..io.writer import LayerOutput
from ..kill_points import kill_point
from ..method.experts import Activation, activation_for, expert_hidden, pairs_by_expert, routed_forward
from ..method.floor import merge_floor
from ..method.merging import ActivationGram, keeps_centroid, merge_expert_group, neuron_merge, weight_features
from ..method.planning import LayerPlan, plan_layer
from ..method.grouping import ExpertGroup
from ..method.refit import (
    HELDOUT_FRACTION,
    RIDGE_GRID,
    LeastSquaresSums,
    RefitCheck,
    Routing,
    SourceOutputs,
    _member_outputs,
    checked_down_refit,
    group_logit_targets,
    heldout_sequences,
    source_outputs,
)
from ..method.stats import LayerStatistics, LayerStatsAccumulator, sub_sample_rows, token_sample
from ..method.surgery import apply_layer_plan
from . import distributed
from .device import Placement
from .distributed import BatchShare
from .runner import feed_block_inputs, run_layer
from .saved_statistics import StatisticsReader, StatisticsWriter
from .hidden_states import HiddenStateStore


@dataclass
class LayerReport:
    key: str
    index: int
    experts_before: int
    experts_after: int
    plan: LayerPlan
    frequency: list[int]
    saliency: list[float] | None
    seconds: float
    stats_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: statistics, plan, merge, forward
    gemm: dict[str, str] = field(default_factory=dict)  # the statistics GEMMs' dtypes (GemmPolicy.describe)
    routing_weight: list[float] | None = None  # per source expert: the calibration's summed routing weight
    refit: dict[str, Any] | None = None  # the down refit's held-out check (method/refit.py RefitCheck), if it ran
    # per output expert: the merge floor's verdict (method/floor.py) on its planned group, None where nothing was merged
    floor: list[dict[str, Any] | None] | None = None

    def manifest_entry(self) -> dict[str, Any]:
        floor = self.floor or [None] * len(self.plan.groups)
        return {
            "layer": self.key,
            "index": self.index,
            "experts_before": self.experts_before,
            "experts_after": self.experts_after,
            "groups": [
                {"output_expert": j, "centroid": g.centroid, "members": list(g.members), "weights": w,
                 **({} if check is None else {"floor": check})}
                for j, (g, w, check) in enumerate(zip(self.plan.groups, self.plan.weights, floor))
            ],
            "frequency": self.frequency,
            "routing_weight": self.routing_weight,
            "saliency": self.saliency,
            "refit": self.refit,
        }


@contextlib.contextmanager
def routed_experts(family: MoEFamily, layer, device: torch.device):
    """On CPU, run the layer's experts with `routed_forward` (bit-identical to transformers' eager loop, faster)."""
    block = moe_block(family, layer)
    if block is None or device.type != "cpu":
        yield
        return
    module = experts(family, block)
    weights, activation = read_expert_weights(family, module), activation_for(family, module)
    module.forward = lambda hidden, index, scores: routed_forward(weights, activation, hidden, index, scores)
    try:
        yield
    finally:
        del module.forward


def forward_in_place(family: MoEFamily, layer, hidden: list[torch.Tensor], calls, store: HiddenStateStore | None,
                     generation: int, device: torch.device, numbers: list[int] | None = None,
                     next_calls: list | None = None) -> None:
    """Replace each batch's inputs in `hidden` by the layer's outputs (the next layer's inputs; persisted when
    resumable, under the batches' global `numbers`) as soon as they exist, so one generation is held, not two.
    `next_calls`: the next layer's calls, given what this one hands on (`MoEFamily.layer_carry`)."""
    numbers = list(range(len(calls))) if numbers is None else numbers
    with routed_experts(family, layer, device):
        for b, (inputs, call) in enumerate(zip(Placement.of(device).feed(hidden), calls)):
            out = run_layer(layer, inputs, call, family.layer_carry, None if next_calls is None else next_calls[b])
            hidden[b] = out if store is None else store.write(generation, numbers[b], out)


def layer_sample_positions(config: ReamConfig, total_tokens: int) -> torch.Tensor:
    """One token sample per layer, shared by every expert, so alignment compares the same tokens (the refit takes
    its tokens from it too)."""
    return token_sample(total_tokens, config.layer_sample_tokens, config.seed)


def group_activation_gram(group: ExpertWeights, activation: Activation, sample_inputs: torch.Tensor) -> ActivationGram:
    """The group's alignment activations on the shared token sample, folded chunk by chunk into their Gram
    sums: a 16-member group on 32k sample tokens would otherwise hold about 0.8 GB of activations."""
    group = group.to(torch.float32)
    count, inner, _ = group.gate.shape
    rows = max(16, Placement.of(group.gate.device).alignment_bytes // (3 * 4 * count * inner))
    gram = ActivationGram(count, inner)
    for start in range(0, sample_inputs.shape[0], rows):
        gram.add(expert_hidden(group, activation, sample_inputs[start : start + rows].to(group.gate.device, torch.float32)))
    return gram


def layer_statistics(config: ReamConfig, family: MoEFamily, layer, block, hidden, calls, batches,
                     sample: torch.Tensor | None, share: BatchShare | None = None,
                     gemm: dict[str, str] | None = None) -> LayerStatistics:
    """The layer's statistics over every rank's batches (`share`: this rank's, default all of `batches`), summed
    batch by batch in global order (`distributed.OrderedReduction`). `gemm`, if given, receives the GEMM dtypes."""
    experts_module, router_module = experts(family, block), router(family, block)
    weights = read_expert_weights(family, experts_module)
    placement = Placement.of(weights.gate.device)
    policy = placement.gemm(weights.gate.dtype)
    accumulator = LayerStatsAccumulator(
        weights,
        activation_for(family, experts_module),
        family.scoring,
        dense=config.is_merging,
        with_saliency=config.saliency != "frequency",
        with_logit_gram=config.is_merging and config.use_router_logits,
        gated=config.gated_similarity,
        sample_positions=sample if config.layer_sample_tokens else None,
        chunk_size=config.token_chunk_size,
        gemm=policy,
        chunk_bytes=placement.chunk_bytes,
        routed_bytes=placement.routed_bytes,
    )
    if gemm is not None:
        gemm.update(policy.describe())
    if share is None:
        share = BatchShare.of_masks([b.attention_mask for b in batches])
    reduction = distributed.OrderedReduction(accumulator, share.first_tokens, share.total_tokens, distributed.current())
    numbers = iter(share.numbers)

    def consume(x: torch.Tensor) -> None:
        logits, topk_weights, topk_index = router_module(x)
        reduction.add(next(numbers), x, logits, topk_weights, topk_index)
        kill_point("layer-statistics")

    feed_block_inputs(layer, block, hidden, calls, batches, consume, placement=placement)
    return reduction.finalize()


def merge_layer(config: ReamConfig, family: MoEFamily, block, plan: LayerPlan, stats: LayerStatistics) -> ExpertWeights:
    """Each output expert from its group: members aligned to the centroid, then saliency-weighted."""
    weights = read_expert_weights(family, experts(family, block))
    activation = activation_for(family, experts(family, block))
    mode = config.merge
    features = None
    if mode in ("activations+weights", "weights"):
        features = weight_features(weights.gate, weights.up, weights.down, config.pca_dim, config.weight_features)
    def merge(group, group_weights):
        index = list(group.members)
        part = weights.select(index)
        needs_activations = config.aligns_activations and len(index) > 1  # a singleton is kept as it is
        return merge_expert_group(
            part.gate, part.up, part.down, torch.tensor(group_weights, dtype=torch.float64), mode,
            feats=None if features is None else features[index],
            biases={"gate_bias": part.gate_bias, "up_bias": part.up_bias, "down_bias": part.down_bias},
            gram=group_activation_gram(part, activation, stats.sample_inputs) if needs_activations else None,
        )

    # multi-member groups are the work: in a distributed run each rank merges every world-th one and broadcasts it
    ranks = distributed.current()
    work = [j for j, group in enumerate(plan.groups) if len(group.members) > 1]
    results = [merge(plan.groups[j], plan.weights[j]) if ranks.owns(n) else None for n, j in enumerate(work)]
    flat = [None if r is None else [r[0], r[1], r[2], *r[3].values()] for r in results]

    def like(n: int) -> list[torch.Tensor]:
        one = weights.select([plan.groups[work[n]].centroid])
        return [torch.empty_like(t[0]) for t in (one.gate, one.up, one.down, one.gate_bias, one.up_bias, one.down_bias)
                if t is not None]

    flat = distributed.broadcast_results(ranks, flat, like)
    bias_names = [name for name in ("gate_bias", "up_bias", "down_bias") if getattr(weights, name) is not None]
    done = {j: (t[0], t[1], t[2], dict(zip(bias_names, t[3:]))) for j, t in zip(work, flat)}
    merged = [done[j] if j in done else merge(group, group_weights)
              for j, (group, group_weights) in enumerate(zip(plan.groups, plan.weights))]
    stacked = {name: torch.stack([m[i] for m in merged]) for i, name in enumerate(("gate", "up", "down"))}
    for name in ("gate_bias", "up_bias", "down_bias"):
        if name in merged[0][3]:
            stacked[name] = torch.stack([m[3][name] for m in merged])
    return ExpertWeights(**stacked)


@dataclass
class OriginalModules:
    """The block's experts and router modules as they were before surgery. Deep copies that share the parameter
    tensors (surgery replaces the live modules' parameters, so these keep the originals without a copy)."""

    experts: torch.nn.Module
    router: torch.nn.Module

    @classmethod
    def capture(cls, family: MoEFamily, block) -> OriginalModules:
        def sharing_copy(module):
            memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
            return copy.deepcopy(module, memo)

        return cls(sharing_copy(experts(family, block)), sharing_copy(router(family, block)))


def refit_sample(config: ReamConfig,
                 stats: LayerStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The refit's tokens: `refit_tokens` rows of the layer's token sample, their global token positions
    (`token_sample`'s) and the source layer's routed output there (None where the statistics do not keep it:
    stats.py `keeps_sample_outputs`). Where the sample is larger (alignment needs more), the rows are those of the
    `refit_tokens`-token sample of the same seed (`token_sample`: a smaller sample is a subset of a larger one),
    which is the whole sample of a run that aligns nothing: so a merging run's refit, its floors' pruned
    alternative included, fits and checks on exactly the tokens REAP's refit does, and a layer where nothing is
    merged is REAP's layer, not the same pruning refit on other random tokens (whose verdicts differ)."""
    inputs, outputs = stats.sample_inputs, stats.sample_outputs
    if inputs.shape[0] <= config.refit_tokens:
        return inputs, token_sample(stats.num_tokens, inputs.shape[0], config.seed), outputs
    rows, positions = sub_sample_rows(stats.num_tokens, inputs.shape[0], config.refit_tokens, config.seed)
    return inputs[rows], positions, None if outputs is None else outputs[rows]


def routing(router_module, x: torch.Tensor, rows: int) -> Routing:
    """The top-k choice of `router_module` on tokens x, `rows` at a time."""
    parts = [router_module(x[start : start + rows]) for start in range(0, x.shape[0], rows)]
    return Routing(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))


def sample_routings(config: ReamConfig, family: MoEFamily, block, original: OriginalModules,
                    x: torch.Tensor) -> tuple[ExpertWeights, torch.Tensor, Routing, Routing]:
    """What the down-projection refit and the merge fallback compare on the sample tokens x: the compressed
    layer's expert weights, x on their device, and the original and the compressed router's choices on x."""
    merged = read_expert_weights(family, experts(family, block))
    x = x.to(merged.down.device)
    typed, rows = x.to(merged.down.dtype), config.token_chunk_size
    return merged, x, routing(original.router, typed, rows), routing(router(family, block), typed, rows)


def refit_router(config: ReamConfig, family: MoEFamily, block, plan: LayerPlan, original: OriginalModules,
                 x: torch.Tensor) -> None:
    """Kept router rows refit to their groups' target logits (method/refit.py) on the sample tokens x."""
    router_module = router(family, block)
    weight = router_module.weight
    has_bias = getattr(router_module, "bias", None) is not None and "bias" in family.router_tensors
    output_of = torch.full((original.router.weight.shape[0],), -1, dtype=torch.long, device=weight.device)
    for j, group in enumerate(plan.groups):
        output_of[list(group.members)] = j
    prior = weight.detach().double()
    if has_bias:
        prior = torch.cat([prior, router_module.bias.detach().double().unsqueeze(1)], dim=1)

    def compute() -> list[torch.Tensor]:
        sums = LeastSquaresSums(len(plan.groups), weight.shape[1] + int(has_bias), device=weight.device)
        for start in range(0, x.shape[0], config.token_chunk_size):
            chunk = x[start : start + config.token_chunk_size].to(weight.device)
            logits = original.router(chunk.to(weight.dtype))[0]
            inputs = chunk.float()
            if has_bias:
                inputs = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)
            sums.add(inputs, group_logit_targets(logits, output_of, len(plan.groups), family.scoring))
        return [sums.solve(prior.unsqueeze(1), config.refit_ridge).squeeze(1)]

    ranks = distributed.current()  # computed on rank 0 and broadcast, as the down refit
    solved = distributed.broadcast_results(ranks, [compute() if ranks.is_main else None],
                                           lambda _: [torch.empty_like(prior)])[0][0]
    with torch.no_grad():
        weight.copy_(solved[:, : weight.shape[1]].to(weight.dtype))
        if has_bias:
            router_module.bias.copy_(solved[:, -1].to(router_module.bias.dtype))


def refit_down(config: ReamConfig, family: MoEFamily, block, plan: LayerPlan, original: OriginalModules,
               x: torch.Tensor, sequence: torch.Tensor, shared: dict[str, Any] | None = None,
               x_outputs: torch.Tensor | None = None) -> RefitCheck:
    """Each output expert's down projection (and bias) refit on the sample tokens x (method/refit.py), fitted on
    some calibration sequences and kept only where it lowers the layer's output error on the others (`sequence`:
    each token's calibration sequence). `x_outputs`: the source layer's routed output on x, as the statistics pass
    computed it (None: computed here). With `shared`, what the refit was computed from (the source's weights and
    outputs on the sample, the routings, the held-out tokens) is left there for `layer_floor`'s second refit (on
    the rank that computes). Returns the check's record."""
    experts_module = experts(family, block)
    merged = read_expert_weights(family, experts_module)
    solved: list[torch.Tensor] = []

    def compute() -> RefitCheck:
        _, sample, before, after = sample_routings(config, family, block, original, x)
        held_out = heldout_sequences(sequence, HELDOUT_FRACTION, config.seed + 2).to(sample.device)
        source, activation = read_expert_weights(family, original.experts), activation_for(family, experts_module)
        if x_outputs is not None:
            outputs = x_outputs.to(sample.device, torch.float32)
            outputs = SourceOutputs(outputs[~held_out], outputs[held_out])
        else:
            outputs = None if shared is None else source_outputs(source, activation, sample, held_out, before)
        if shared is not None:
            # the floor's pruned refit takes the source outputs as REAP's refit computes them, so a layer that falls
            # back is REAP's bit for bit (tests/test_merge_floor.py); None: `layer_floor` computes them
            shared.update(source=source, activation=activation, sample=sample, held_out=held_out, before=before,
                          after=after, outputs=None if x_outputs is not None else outputs)
        down, bias, check = checked_down_refit(
            source, merged, activation, sample, held_out, before, after, [list(g.members) for g in plan.groups],
            config.refit_target, [config.refit_ridge * g for g in RIDGE_GRID], config.refit_steps, outputs)
        solved.extend(t for t in (down, bias) if t is not None)
        return check

    # computed once, on rank 0, and broadcast as merges are: every rank writes and re-forwards the same weights
    # (index_add_ on CUDA does not add in a fixed order, so a recomputation could differ in the last bits)
    ranks = distributed.current()
    check = distributed.on_main(ranks, compute)
    if check.kept:
        like = [torch.empty_like(t) for t in (merged.down, merged.down_bias) if t is not None]
        down, *bias = distributed.broadcast_results(ranks, [solved if ranks.is_main else None], lambda _: like)[0]
        write_expert_weights(family, experts_module, ExpertWeights(merged.gate, merged.up, down, merged.gate_bias,
                                                                   merged.up_bias, bias[0] if bias else None))
    return check


def layer_floor(config: ReamConfig, family: MoEFamily, block, plan: LayerPlan, check: RefitCheck,
                shared: dict[str, Any]) -> dict[str, Any] | None:
    """The merge floor for the whole layer: the merged (and refit) layer against pruning it to the same centroids
    (the source's experts, refit the same way, under the same router rows), on the down refit's held-out
    sequences; the layer keeps the merge only where its held-out layer-output error is lower. Per-group verdicts
    rest on the few held-out rows one output expert sees; this one on every held-out token of the layer, so a
    merge cannot make a layer worse than pruning on text it did not fit. `shared`: what `refit_down` left (its
    inputs, on the rank that computes). Returns the manifest record (None: no group is merged, nothing to compare)."""
    if all(len(g.members) < 2 for g in plan.groups) or check.heldout_error_before is None:
        return None
    experts_module = experts(family, block)
    centroids = [g.centroid for g in plan.groups]
    solved: list[torch.Tensor] = []

    def compute() -> dict[str, Any]:
        pruned = shared["source"].select(centroids)
        outputs = shared["outputs"] or source_outputs(shared["source"], shared["activation"], shared["sample"],
                                                      shared["held_out"], shared["before"])
        down, bias, pruned_check = checked_down_refit(
            shared["source"], pruned, shared["activation"], shared["sample"], shared["held_out"], shared["before"],
            shared["after"], [[c] for c in centroids], config.refit_target,
            [config.refit_ridge * g for g in RIDGE_GRID], config.refit_steps, outputs)
        merged_error, pruned_error = check.heldout_error_after, pruned_check.heldout_error_after
        keep_merge = merged_error < pruned_error
        if not keep_merge:
            solved.extend(t for t in (pruned.gate, pruned.up, down, pruned.gate_bias, pruned.up_bias, bias)
                          if t is not None)
        return {"merged": keep_merge, "heldout_error_merged": merged_error, "heldout_error_pruned": pruned_error,
                "pruned_refit": pruned_check.manifest_entry(config.refit)}

    ranks = distributed.current()
    record = distributed.on_main(ranks, compute)
    if not record["merged"]:
        current = read_expert_weights(family, experts_module)
        names = [n for n in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
                 if getattr(current, n) is not None]  # the order `compute` solved them in
        like = [torch.empty_like(getattr(current, n)) for n in names]
        tensors = distributed.broadcast_results(ranks, [solved if ranks.is_main else None], lambda _: like)[0]
        write_expert_weights(family, experts_module, ExpertWeights(**dict(zip(names, tensors))))
        for j, centroid in enumerate(centroids):
            plan.groups[j] = ExpertGroup(centroid, (centroid,))
            plan.weights[j] = [1.0]
    return record


def merge_neurons(config: ReamConfig, family: MoEFamily, block, plan: LayerPlan, original: OriginalModules,
                  x: torch.Tensor, held_out: torch.Tensor) -> None:
    """`--merge neurons`: each merged group's output expert rebuilt from D of the group's neurons with its down
    projection fit to the group's gated output (method/merging.py `neuron_merge`), on the sample tokens the
    compressed router sends to it outside the held-out sequences (which the floor then judges it on)."""
    experts_module = experts(family, block)
    merged, x, before, after = sample_routings(config, family, block, original, x)
    source = read_expert_weights(family, original.experts)
    activation = activation_for(family, experts_module)
    fit = ~held_out.to(x.device)
    tensors = {name: None if getattr(merged, name) is None else getattr(merged, name).detach().clone()
               for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")}
    tokens = x.shape[0]
    order, slices = pairs_by_expert(after.index, len(plan.groups))
    for expert, part in slices:
        members = list(plan.groups[expert].members)
        if len(members) < 2:
            continue
        pair = order[part]
        token, slot = pair % tokens, pair // tokens
        token, slot = token[fit[token]], slot[fit[token]]
        goal = _member_outputs(source, activation, x.float(), before, members, token)
        one = neuron_merge(source.select(members), activation, x[token].float(),
                           after.weights[token, slot].float().unsqueeze(1), goal, config.refit_ridge)
        for name, tensor in tensors.items():
            if tensor is not None:
                tensor[expert] = getattr(one, name)[0].to(tensor.dtype)
    write_expert_weights(family, experts_module, ExpertWeights(**tensors))


def apply_merge_floor(config: ReamConfig, family: MoEFamily, block, plan: LayerPlan, original: OriginalModules,
                      x: torch.Tensor, held_out: torch.Tensor) -> list[dict[str, Any] | None]:
    """Groups whose merged expert reproduces the group's gated output on held-out calibration sequences worse than
    its centroid alone (method/floor.py) get the centroid back, unmerged; the plan records them as pruned. With
    the down refit on, both candidates are compared after a down-projection fit, as they will be refit. Returns
    each output expert's manifest record: the planned group ("group") and the verdict (None: nothing merged)."""
    experts_module = experts(family, block)
    merged, x, before, after = sample_routings(config, family, block, original, x)
    source = read_expert_weights(family, original.experts)
    checks = merge_floor(source, merged, activation_for(family, experts_module), x, held_out, before, after,
                         [list(g.members) for g in plan.groups],
                         config.refit_ridge if "down" in config.refit else None, config.prune_fallback_margin)
    records = [None if check is None else {"group": list(g.members), **check.manifest_entry()}
               for g, check in zip(plan.groups, checks)]
    if all(check is None or check.merged for check in checks):
        return records
    fields = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
    tensors = {name: None if getattr(merged, name) is None else getattr(merged, name).detach().clone()
               for name in fields}
    for j, check in enumerate(checks):
        if check is not None and not check.merged:
            centroid = plan.groups[j].centroid
            for name, tensor in tensors.items():
                if tensor is not None:
                    tensor[j] = getattr(source, name)[centroid]
            plan.groups[j] = ExpertGroup(centroid, (centroid,))
            plan.weights[j] = [1.0]
    write_expert_weights(family, experts_module, ExpertWeights(**tensors))
    return records


def compress_moe_layer(config: ReamConfig, family: MoEFamily, layer, block, key: str, index: int, hidden, calls,
                       batches, sample: torch.Tensor | None, target: int, groups_per_layer: int, started: float,
                       forward: Callable[[], None] | None = None, share: BatchShare | None = None,
                       statistics: StatisticsReader | None = None,
                       save_statistics: StatisticsWriter | None = None) -> tuple[LayerReport, LayerOutput]:
    """Statistics, plan, merge and surgery of one MoE layer. `forward` re-runs the layer on the calibration data
    for what follows it: after the surgery (the paper's sequential mode) or, for the non-sequential ablation,
    with the original experts. Statistics come from `statistics` (saved by an earlier run) when given, and are
    written to `save_statistics` when given. Returns the report and the tensors that replace the layer's on disk."""
    placement = Placement.of(read_expert_weights(family, experts(family, block)).gate.device)
    timings: dict[str, float] = {}
    gemm: dict[str, str] = {}

    def stage(name: str, since: float) -> float:
        placement.synchronize()
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - since
        return now

    if share is None:
        share = BatchShare.of_masks([b.attention_mask for b in batches])
    if statistics is not None:
        stats = statistics.read(key)
    else:
        stats = layer_statistics(config, family, layer, block, hidden, calls, batches, sample, share, gemm)
    if save_statistics is not None:
        save_statistics.write(key, stats)
    clock = stage("statistics", started)
    stats_seconds = clock - started
    plan = plan_layer(config, stats, target, groups_per_layer)
    clock = stage("plan", clock)
    # the corrections only where the layer loses experts: a full-width run stays the exact no-op it is
    reduced = len(plan.groups) < stats.frequency.shape[0]
    refit = config.refit != "none" and reduced
    neurons = config.is_merging and config.merge == "neurons" and reduced
    fallback = config.is_merging and config.prune_fallback and reduced
    if forward is not None and not config.sequential:
        forward()
        clock = stage("forward", clock)
    merged = merge_layer(config, family, block, plan, stats) if config.is_merging else None
    before = experts(family, block).num_experts
    original = OriginalModules.capture(family, block) if refit or fallback or neurons else None
    apply_layer_plan(family, block, plan.centroids, merged)
    check, checks, floor_record = None, None, None
    if refit or fallback or neurons:
        x, positions, x_outputs = refit_sample(config, stats)
        sequence = share.sequence_of(positions, config.sequence_length)
    if neurons or fallback:
        # the same held-out sequences as the down refit's check: what the merge fits on, the refit fits on too
        held_out = heldout_sequences(sequence, HELDOUT_FRACTION, config.seed + 2)
        if neurons:
            merge_neurons(config, family, block, plan, original, x, held_out)
        if fallback:
            checks = apply_merge_floor(config, family, block, plan, original, x, held_out)
    clock = stage("merge", clock)
    if refit:
        if "router" in config.refit:
            refit_router(config, family, block, plan, original, x)
        if "down" in config.refit:
            floors = config.is_merging and config.layer_floor
            shared: dict[str, Any] | None = {} if floors else None  # the refit's inputs, computed once for both
            check = refit_down(config, family, block, plan, original, x, sequence, shared, x_outputs)
            if floors:
                floor_record = layer_floor(config, family, block, plan, check, shared)
            del shared
        clock = stage("refit", clock)
    if forward is not None and config.sequential:
        forward()
        clock = stage("forward", clock)
    # whether the layer's down projections were refit: the merged layer's refit, or the pruned one's it fell back to
    refit_kept = (check is not None and check.kept) if floor_record is None or floor_record["merged"] \
        else floor_record["pruned_refit"]["kept"]
    output = LayerOutput(
        experts=read_expert_weights(family, experts(family, block)),
        router=router_tensors(family, block),
        centroids=plan.centroids,
        # per projection: a refit down projection is new even where the group is one expert, its gate and up are not
        copy_stored_bytes=[
            frozenset(("gate", "up") if refit_kept else ("gate", "up", "down"))
            if merged is None or keeps_centroid(config.merge, len(g.members)) else frozenset()
            for g in plan.groups],
    )
    report = LayerReport(
        key, index, before, len(plan.groups), plan, stats.frequency.tolist(),
        None if config.saliency == "frequency" else [round(float(s), 8) for s in plan.scores],
        time.perf_counter() - started, stats_seconds, timings, gemm,
        None if stats.routing_weight is None else [round(float(w), 6) for w in stats.routing_weight],
        None if check is None else {**check.manifest_entry(config.refit),
                                    **({} if floor_record is None else {"layer_floor": floor_record})},
        checks,
    )
    return report, output
