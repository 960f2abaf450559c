"""`ReamCompressor`: the pipeline from a source model to a compressed, verified checkpoint.

checkpoint in -> calibration -> per-layer statistics -> grouping -> merging/surgery -> checkpoint out.
Everything that can be refused (bad target, unsupported model, missing files) is refused before the
model or the calibration data is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from tqdm.auto import tqdm

from . import __version__
from .arch import MoEFamily, decoder_layers, expert_count, experts, family_for_config, moe_block, router, text_config_dict
from .calibration import check_sources, load_calibration, make_batches
from .checkpoint import (
    MANIFEST_NAME,
    LayerOutput,
    SourceCheckpoint,
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
    edit_config_json,
    parse_moe_name,
    PartWriter,
    finalize_parts,
    group_tensors,
    output_groups,
    write_json,
)
from .config import CONFIG_KEY, ReamConfig
from .experts import ExpertWeights, activation_for, expert_hidden, read_expert_weights, routed_forward
from .layers import capture_layer_inputs, feed_block_inputs, run_layer
from .streaming import HiddenStateStore, LayerLoader, WorkFolder, build_skeleton, default_work_root, fingerprint
from .merging import ActivationGram, merge_expert_group, weight_features
from .mtp import check_mtp_layers, mtp_prefixes, run_mtp_layers
from .planning import LayerPlan, plan_layer
from .stats import LayerStatistics, LayerStatsAccumulator
from .surgery import apply_layer_plan, check_grouped_routing, routing_groups, set_config_expert_count
from .verify import verify_checkpoint


def peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    subprocess would report its parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

logger = logging.getLogger(__name__)


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

ALIGNMENT_CHUNK_BYTES = 24 * 2**20  # a group's (members, rows, D) gate/up/activation intermediates per chunk


def group_activation_gram(group: ExpertWeights, activation, sample_inputs: torch.Tensor) -> ActivationGram:
    """The group's alignment activations on the shared token sample, folded chunk by chunk into their Gram
    sums: a 16-member group on 32k sample tokens would otherwise hold about 0.8 GB of activations."""
    group = group.to(torch.float32)
    count, inner, _ = group.gate.shape
    rows = max(16, ALIGNMENT_CHUNK_BYTES // (3 * 4 * count * inner))
    gram = ActivationGram(count, inner)
    for start in range(0, sample_inputs.shape[0], rows):
        gram.add(expert_hidden(group, activation, sample_inputs[start : start + rows].to(group.gate.device, torch.float32)))
    return gram


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "layer": self.key,
            "index": self.index,
            "experts_before": self.experts_before,
            "experts_after": self.experts_after,
            "groups": [
                {"output_expert": j, "centroid": g.centroid, "members": list(g.members), "weights": w}
                for j, (g, w) in enumerate(zip(self.plan.groups, self.plan.weights))
            ],
            "frequency": self.frequency,
            "saliency": self.saliency,
        }


@dataclass
class CompressionResult:
    family: MoEFamily
    experts_before: int
    experts_after: int
    source: SourceCheckpoint | None
    source_name: str
    layers: list[LayerReport] = field(default_factory=list)
    outputs: dict[str, LayerOutput] = field(default_factory=dict)
    calibration_sequences: int = 0
    calibration_tokens: int = 0
    dropped_prefixes: tuple[str, ...] = ()
    layer_entries: list[dict[str, Any]] = field(default_factory=list)  # manifest entries, restored on resume
    work: WorkFolder | None = None


def resolve_source(model_path: str | os.PathLike) -> Path:
    """A local folder as is; anything else is taken as a Hub repo id and downloaded (weights as safetensors)."""
    path = Path(model_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"source {model_path} is a file; give a model folder or a Hub repo id")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"source folder {model_path} is not readable")
        return path
    if str(model_path).startswith((".", "/", "~")) or str(model_path).count("/") != 1:
        raise ValueError(f"source {model_path} is neither a local folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model_path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                        "*.jinja", "*.py", "*.tiktoken"]))
    except Exception as error:  # the hub raises many types; the user needs one line
        raise ValueError(f"cannot download {model_path} from the Hugging Face Hub: {error}") from None

class ReamCompressor(OptimumQuantizer):
    """Compress an MoE model's experts per `ReamConfig`; save a checkpoint vLLM and transformers load as is."""

    def __init__(self, config: ReamConfig | None = None, **config_kwargs: Any) -> None:
        if config is not None and config_kwargs:
            raise ValueError("give either a ReamConfig or its fields as keyword arguments, not both")
        self.config = config if config is not None else ReamConfig(**config_kwargs)
        self.config.validate()
        self.model = None
        self.tokenizer = None
        self.result: CompressionResult | None = None
        self._pending_source: Any = None

    # -- optimum's OptimumQuantizer interface ------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_or_path: Any, config: ReamConfig | None = None, **config_kwargs: Any):
        compressor = cls(config, **config_kwargs)
        compressor._pending_source = model_or_path
        return compressor

    def quantize(self, save_dir: str | os.PathLike, file_prefix: str | None = None, **kwargs: Any) -> Path:
        if self._pending_source is None:
            raise ValueError("quantize() needs a source: create the compressor with ReamCompressor.from_pretrained(...)")
        check_output_dir(save_dir, kwargs.get("overwrite", False))
        self.compress(self._pending_source)
        return self.save_pretrained(save_dir, **kwargs)

    # -- the pipeline ------------------------------------------------------------------------
    def compress(self, model_or_path: Any, *, tokenizer: Any = None, allow_full_width: bool = False,
                 resume: bool = False, work_dir: str | os.PathLike | None = None):
        """Compress and return the model (a meta-device skeleton when streaming).

        A folder or Hub id is streamed layer by layer (`ReamConfig.streaming`, the default) through a work
        folder (`work_dir`, default under ~/.cache/ream-hf/work, keyed by source and settings) from which
        `resume=True` continues an interrupted run. `allow_full_width` permits target == current experts
        (a no-op that exercises the whole pipeline; used to prove it lossless)."""
        config = self.config
        if isinstance(model_or_path, (str, os.PathLike)):
            source = SourceCheckpoint(resolve_source(model_or_path))
            config_dict, model, source_name = source.config, None, str(model_or_path)
        else:
            model, source = model_or_path, None
            config_dict, source_name = model.config.to_dict(), getattr(model, "name_or_path", "") or "<in-memory model>"
        family = family_for_config(config_dict)
        num_experts = expert_count(family, config_dict)
        text_config = (model.config if model is not None else _load_config(source.folder)).get_text_config()
        top_k = int(text_config.num_experts_per_tok)
        target = config.resolve_target(num_experts, top_k)
        if target == num_experts and not allow_full_width:
            raise ValueError(
                f"target_experts={target} equals the model's {num_experts} experts; nothing to compress, choose fewer"
            )
        check_grouped_routing(family, text_config, target, top_k)
        trunk_prefix = self._trunk_prefix(family, source)  # reads the weight index: missing shards fail here
        drop: tuple[str, ...] = ()
        found = mtp_prefixes(family, source) if source is not None else ()
        if found:
            if config.mtp == "compress":  # compressed after the trunk (_run_mtp); incomplete MTP layers fail here
                check_mtp_layers(family, source)
            if config.mtp == "drop":
                drop = found
        check_sources(config.calibration)

        if tokenizer is None:
            tokenizer = self._load_tokenizer(source.folder if source else getattr(model, "name_or_path", None))
        sequences = load_calibration(config, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        batches = make_batches(sequences, config.batch_size, pad_id)
        device = torch.device(config.device)
        loader = work = None
        if source is not None and model is None and config.streaming:
            job = fingerprint(source, {**config.to_dict(), "allow_full_width": allow_full_width})
            work = WorkFolder.open(Path(work_dir) if work_dir else default_work_root() / job, job, resume)
            loader = LayerLoader(source, family, device)
            model = build_skeleton(_load_config(source.folder), self._source_dtype(source), device, loader)
        elif resume:
            raise ValueError("resume needs streaming (the default) and a source folder or Hub id, not a loaded model")
        elif model is None:
            model = self._load_model(source.folder, device)
        model.eval()

        result = CompressionResult(family, num_experts, target, source, source_name)
        result.calibration_sequences = len(sequences)
        result.calibration_tokens = int(sum(int(s.numel()) for s in sequences))
        result.dropped_prefixes = drop
        result.work = work
        compress_mtp = bool(found) and config.mtp == "compress"
        self._run_layers(model, family, batches, target, device, trunk_prefix, result, loader, compress_mtp)
        set_config_expert_count(family, model.config, target)
        self.model, self.tokenizer, self.result = model, tokenizer, result
        return model

    def _source_dtype(self, source: SourceCheckpoint) -> torch.dtype:
        """The dtype `from_pretrained(dtype="auto")` would pick: the one config.json records."""
        if self.config.dtype != "auto":
            return _TORCH_DTYPES[self.config.dtype]
        text = text_config_dict(source.config)
        recorded = source.config.get("dtype") or source.config.get("torch_dtype") or text.get("dtype") \
            or text.get("torch_dtype") or "float32"
        if recorded not in _TORCH_DTYPES:
            raise ValueError(f"unsupported dtype {recorded!r} in {source.folder}/config.json; pass --dtype")
        return _TORCH_DTYPES[recorded]

    def _dtype(self):
        return "auto" if self.config.dtype == "auto" else _TORCH_DTYPES[self.config.dtype]

    def _load_tokenizer(self, folder):
        from transformers import AutoTokenizer

        if folder is None or not Path(str(folder)).is_dir():
            raise ValueError("no tokenizer: pass tokenizer=... to compress() for an in-memory model")
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as error:
            raise ValueError(f"cannot load the tokenizer from {folder}: {error}") from None

    def _load_model(self, folder: Path, device: torch.device):
        from transformers import AutoModelForCausalLM

        dtype = self._dtype()
        # eager experts are the fastest on CPU and gather no per-token weight copies (TRANSFORMERS.md)
        implementation = "eager" if device.type == "cpu" else "grouped_mm"
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, experts_implementation=implementation)
        return model.to(device)

    @staticmethod
    def _trunk_prefix(family: MoEFamily, source: SourceCheckpoint | None) -> str:
        if source is None:
            return "model.layers."
        for name in source.weight_map:
            parsed = parse_moe_name(family, name)
            if parsed and not parsed.prefix.startswith("mtp."):
                return parsed.prefix
        raise ValueError(f"no MoE expert tensors found in {source.folder}")

    @torch.no_grad()
    def _run_layers(self, model, family, batches, target, device, trunk_prefix, result: CompressionResult,
                    loader: LayerLoader | None = None, compress_mtp: bool = False) -> None:
        """The trunk layer by layer, then (`compress_mtp`) the MTP layers, fed the last trunk layer's outputs."""
        config, work = self.config, result.work
        layers = decoder_layers(model)
        hidden, calls = capture_layer_inputs(model, layers, tqdm(batches, desc="Embedding calibration", leave=False), device)
        total_tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
        sample = self._sample_positions(total_tokens) if config.is_merging else None
        groups_per_layer = routing_groups(family, model.config.get_text_config())
        last = len(layers) - 1
        store = writer = groups = None
        start = 0
        if work is not None:
            hidden_bytes = sum(h.numel() * h.element_size() for h in hidden)
            store = HiddenStateStore(work.folder, in_memory=hidden_bytes <= config.hidden_states_budget_gb * 2**30)
            writer = PartWriter(work.folder, config.max_shard_size, parts=work.state["parts"])
            groups = output_groups(result.source, trunk_prefix, len(layers), result.dropped_prefixes)
            start = work.finished_layers
            if start:
                hidden = store.read_all(start, len(batches))
                result.layer_entries = list(work.state["layers"])
            elif not store.in_memory:
                hidden = [store.write(0, b, h) for b, h in enumerate(hidden)]
        progress = tqdm(range(start, len(layers)), desc="Compressing layers", unit="layer", initial=start, total=len(layers))
        for index in progress:
            layer = layers[index]
            started = time.perf_counter()
            if loader is not None:
                loader.fill(layer, f"{trunk_prefix}{index}.")
            layer_calls = [per_batch[index] for per_batch in calls]
            block = moe_block(family, layer)
            feeds_next = index < last or compress_mtp  # its outputs are some layer's inputs

            def forward(layer=layer, layer_calls=layer_calls, generation=index + 1) -> None:
                self._forward(family, layer, hidden, layer_calls, store, generation)

            if block is None:
                if feeds_next:
                    forward()
            else:
                report = self._compress_moe_layer(family, layer, block, f"{trunk_prefix}{index}", index, hidden,
                                                  layer_calls, batches, sample, target, groups_per_layer, result,
                                                  started, forward if feeds_next else None)
                logger.info("layer %d: %d -> %d experts, %.2f s, peak RSS %.2f GB", index, report.experts_before,
                            report.experts_after, report.seconds, peak_rss_gb())
            if work is not None:
                writer.write_group(group_tensors(result.source, family, groups[index], result.outputs))
                result.outputs.pop(f"{trunk_prefix}{index}", None)  # written: its views die with the layer
                loader.release(layer)
                work.commit(index + 1, writer.parts, result.layer_entries)
                store.drop_before(index + 1)
        if compress_mtp:
            self._run_mtp(model, family, batches, target, device, calls, hidden, result)

    def _forward(self, family, layer, hidden: list[torch.Tensor], calls, store: HiddenStateStore | None,
                 generation: int) -> None:
        """Replace each batch's inputs in `hidden` by the layer's outputs (the next layer's inputs; persisted when
        resumable) as soon as they exist, so one generation is held, not two."""
        with routed_experts(family, layer, torch.device(self.config.device)):
            for b, call in enumerate(calls):
                out = run_layer(layer, hidden[b], call)
                hidden[b] = out if store is None else store.write(generation, b, out)

    def _compress_moe_layer(self, family, layer, block, key: str, index: int, hidden, calls, batches, sample,
                            target: int, groups_per_layer: int, result: CompressionResult, started: float,
                            forward: Callable[[], None] | None = None) -> LayerReport:
        """Statistics, plan, merge and surgery of one MoE layer (trunk or MTP), recorded in `result`. `forward`
        re-runs the layer on the calibration data for what follows it: after the surgery (the paper's sequential
        mode) or, for the non-sequential ablation, with the original experts."""
        config = self.config
        stats = self._layer_statistics(family, layer, block, hidden, calls, batches, sample)
        stats_seconds = time.perf_counter() - started
        plan = plan_layer(config, stats, target, groups_per_layer)
        if forward is not None and not config.sequential:
            forward()
        merged = self._merge(family, block, plan, stats) if config.is_merging else None
        before = experts(family, block).num_experts
        apply_layer_plan(family, block, plan.centroids, merged)
        if forward is not None and config.sequential:
            forward()
        result.outputs[key] = LayerOutput(
            experts=read_expert_weights(family, experts(family, block)),
            router={name: getattr(router(family, block), name) for name in family.router_tensors
                    if getattr(router(family, block), name, None) is not None},
        )
        report = LayerReport(
            key, index, before, len(plan.groups), plan, stats.frequency.tolist(),
            None if stats.saliency is None else [round(float(s), 8) for s in stats.saliency],
            time.perf_counter() - started, stats_seconds,
        )
        result.layers.append(report)
        result.layer_entries.append(report.manifest_entry())
        return report

    def _sample_positions(self, total_tokens: int) -> torch.Tensor:
        """One token sample per layer, shared by every expert, so alignment compares the same tokens."""
        size = min(self.config.activation_sample_tokens, total_tokens)
        generator = torch.Generator().manual_seed(self.config.seed)
        return torch.randperm(total_tokens, generator=generator)[:size].sort().values

    def _layer_statistics(self, family, layer, block, hidden, calls, batches, sample) -> LayerStatistics:
        config = self.config
        experts_module, router_module = experts(family, block), router(family, block)
        accumulator = LayerStatsAccumulator(
            read_expert_weights(family, experts_module),
            activation_for(family, experts_module),
            family.scoring,
            dense=config.is_merging,
            with_saliency=config.method != "frequency",
            with_logit_gram=config.is_merging and config.use_router_logits,
            gated=config.gated_similarity,
            sample_positions=sample if config.merge in ("logits+weights", "logits") else None,
            chunk_size=config.token_chunk_size,
        )

        def consume(x: torch.Tensor) -> None:
            logits, topk_weights, topk_index = router_module(x)
            accumulator.add(x, logits, topk_weights, topk_index)

        feed_block_inputs(layer, block, hidden, calls, batches, consume)
        return accumulator.finalize()

    def _merge(self, family, block, plan: LayerPlan, stats: LayerStatistics) -> ExpertWeights:
        """Each output expert from its group: members aligned to the centroid, then saliency-weighted."""
        weights = read_expert_weights(family, experts(family, block))
        activation = activation_for(family, experts(family, block))
        mode = self.config.merge
        features = None
        if mode in ("logits+weights", "weights"):
            features = weight_features(weights.gate, weights.up, weights.down, self.config.pca_dim)  # float32 per block
        merged = []
        for group, group_weights in zip(plan.groups, plan.weights):
            index = list(group.members)
            part = weights.select(index)
            needs_activations = stats.sample_inputs is not None and len(index) > 1  # a singleton is kept as it is
            merged.append(merge_expert_group(
                part.gate, part.up, part.down, torch.tensor(group_weights, dtype=torch.float64), mode,
                feats=None if features is None else features[index],
                biases={"gate_bias": part.gate_bias, "up_bias": part.up_bias, "down_bias": part.down_bias},
                gram=group_activation_gram(part, activation, stats.sample_inputs) if needs_activations else None,
            ))
        stacked = {name: torch.stack([m[i] for m in merged]) for i, name in enumerate(("gate", "up", "down"))}
        for name in ("gate_bias", "up_bias", "down_bias"):
            if name in merged[0][3]:
                stacked[name] = torch.stack([m[3][name] for m in merged])
        return ExpertWeights(**stacked)

    def compress_and_push(self, source: Any, repo_id: str, **kwargs: Any) -> str:
        """Compress, optionally evaluate both models, render the model card and upload; returns the repo URL.
        Keyword arguments are those of `ream_hf.hub.compress_and_push` (private, token, evaluate, output_dir, ...)."""
        from .hub import compress_and_push

        return compress_and_push(self, source, repo_id, **kwargs)

    # -- output ------------------------------------------------------------------------------
    def save_pretrained(self, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the checkpoint to a temporary folder, verify it, then move it into place.

        After a streaming run the trunk layers' shards are already written in the work folder: they are
        moved (not copied) into the output, and the work folder is removed once the output is in place.
        """
        if self.result is None:
            raise ValueError("nothing to save: call compress() first")
        result, config = self.result, self.config
        with atomic_output_dir(output_dir, overwrite) as folder:
            if result.source is not None:
                source = result.source
                num_layers = len(decoder_layers(self.model))
                groups = output_groups(source, self._trunk_prefix(result.family, source), num_layers,
                                       result.dropped_prefixes)
                if result.work is not None:  # trunk layers written while streaming; the rest now
                    parts_folder = result.work.folder
                    writer = PartWriter(parts_folder, config.max_shard_size, parts=result.work.state["parts"])
                    pending = [groups[-1]]
                else:
                    parts_folder = folder
                    writer = PartWriter(folder, config.max_shard_size)
                    pending = groups
                for names in pending:
                    writer.write_group(group_tensors(source, result.family, names, result.outputs))
                finalize_parts(parts_folder, writer.parts, folder)
                mtp_count = 0 if result.dropped_prefixes else None
                write_json(folder / "config.json",
                           edit_config_json(source.config, result.family, result.experts_after, config.to_dict(), mtp_count))
                copy_side_files(source.folder, folder)
            else:
                self._save_in_memory(folder, config.max_shard_size)
            write_json(folder / MANIFEST_NAME, self.manifest())
            verify_checkpoint(folder, result.family, result.source, full_width_layers=self._full_width_layers(),
                              dropped_prefixes=result.dropped_prefixes)
        if result.work is not None:
            result.work.remove()
            result.work = None
        logger.info("wrote %s", output_dir)
        return Path(output_dir)

    def _full_width_layers(self) -> set[str]:
        result = self.result
        if result.source is None or self.config.mtp != "keep":
            return set()
        prefixes = mtp_prefixes(result.family, result.source)
        return {p.layer_key for n in result.source.weight_map
                if n.startswith(prefixes) and (p := parse_moe_name(result.family, n))}

    def _save_in_memory(self, folder: Path, shard_bytes: int) -> None:
        import json

        self.model.save_pretrained(str(folder), max_shard_size=shard_bytes)
        config_path = folder / "config.json"
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        family = self.result.family
        text = text_config_dict(saved)
        # transformers may re-serialise the count under another name (Qwen3-MoE: num_local_experts);
        # readers of the family's Hub checkpoints (vLLM included) look for the family's own key.
        text[family.expert_count_keys[0]] = self.result.experts_after
        saved[CONFIG_KEY] = self.config.to_dict()
        write_json(config_path, saved)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))

    def manifest(self) -> dict[str, Any]:
        result = self.result
        return {
            "format": "ream-hf manifest v1",
            "ream_hf_version": __version__,
            "source": result.source_name,
            "family": result.family.name,
            "method": self.config.method,
            "experts_before": result.experts_before,
            "experts_after": result.experts_after,
            "calibration": {"sequences": result.calibration_sequences, "tokens": result.calibration_tokens},
            "mtp": {"mode": self.config.mtp, "dropped": list(result.dropped_prefixes)},
            "layers": result.layer_entries,
        }

    def _run_mtp(self, model, family, batches, target, device, calls, trunk_out: list[torch.Tensor],
                 result: CompressionResult) -> None:
        """MTP layers (mtp="compress"), METHOD.md §6: each is one more MoE layer after the trunk, fed as vLLM feeds
        its drafter (ream_hf/mtp.py) from the last trunk layer's outputs `trunk_out`, compressed with the same
        method and target, written under its own names."""
        config, source = self.config, result.source
        groups_per_layer = routing_groups(family, model.config.get_text_config())
        for item in tqdm(run_mtp_layers(model, family, source, trunk_out, batches, calls, device),
                         desc="Compressing MTP layers", unit="layer"):
            block = moe_block(family, item.layer)
            if block is None:  # a dense MTP layer: copied as it is
                continue
            started = time.perf_counter()
            sample = self._sample_positions(item.num_tokens) if config.is_merging else None
            report = self._compress_moe_layer(family, item.layer, block, item.key, item.index, item.hidden, item.calls,
                                              item.batches, sample, target, groups_per_layer, result, started)
            logger.info("MTP layer %s: %d -> %d experts, %.2f s", item.key, report.experts_before,
                        report.experts_after, report.seconds)


def _load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as error:  # transformers raises several types for unreadable configs
        raise ValueError(f"cannot read the model config in {folder}: {error}") from None
