"""The sequential pass (METHOD.md §5): calibration data embedded once, then every trunk layer in order
(statistics on the current hidden states, compression, re-forward), then the MTP layers, fed the last trunk
layer's outputs. With a work folder, each finished layer's shard part and the next layer's inputs are
committed, so an interrupted run resumes after its last finished layer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..arch import MoEFamily, decoder_layers, moe_block
from ..config import ReamConfig
from ..io.quantization import output_dtype
from ..io.source import SourceCheckpoint
from ..io.writer import LayerOutput, PartWriter, group_tensors, output_groups
from ..method.surgery import routing_groups
from .calibration import CalibrationBatch
from .layer import LayerReport, compress_moe_layer, forward_in_place, sample_positions
from .mtp import run_mtp_layers
from .runner import capture_layer_inputs
from .streaming import HiddenStateStore, LayerLoader, WorkFolder

logger = logging.getLogger(__name__)


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


@dataclass
class CompressionResult:
    family: MoEFamily
    experts_before: int
    experts_after: int
    source: SourceCheckpoint | None
    source_name: str
    trunk_prefix: str = "model.layers."
    layers: list[LayerReport] = field(default_factory=list)
    outputs: dict[str, LayerOutput] = field(default_factory=dict)
    calibration_sequences: int = 0
    calibration_tokens: int = 0
    dropped_prefixes: tuple[str, ...] = ()
    layer_entries: list[dict[str, Any]] = field(default_factory=list)  # manifest entries, restored on resume
    work: WorkFolder | None = None
    dequantize_to: str | None = None  # a quantized source written dequantized to this dtype (None: its own format)

    @property
    def dequantize_dtype(self) -> torch.dtype | None:
        return None if self.dequantize_to is None else output_dtype(self.dequantize_to)

    @property
    def outputs_complete(self) -> bool:
        """Whether every compressed layer's tensors are still held (a streaming run hands them to its shard parts
        layer by layer)."""
        return self.work is None and (self.source is None or len(self.outputs) == len(self.layers))

    def record(self, report: LayerReport, output: LayerOutput) -> None:
        self.layers.append(report)
        self.layer_entries.append(report.manifest_entry())
        self.outputs[report.key] = output


@torch.no_grad()
def run_layers(config: ReamConfig, model, family: MoEFamily, batches: list[CalibrationBatch], target: int,
               device: torch.device, result: CompressionResult, loader: LayerLoader | None = None,
               mtp_loader: LayerLoader | None = None) -> None:
    """The trunk layer by layer, then (`mtp_loader` given) the MTP layers, fed the last trunk layer's outputs.
    `loader` fills each trunk layer from the source when the model is a streaming skeleton."""
    work, trunk_prefix = result.work, result.trunk_prefix
    layers = decoder_layers(model)
    hidden, calls = capture_layer_inputs(model, layers, tqdm(batches, desc="Embedding calibration", leave=False), device)
    total_tokens = int(sum(int(b.attention_mask.sum()) for b in batches))
    sample = sample_positions(config, total_tokens) if config.is_merging else None
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
        feeds_next = index < last or mtp_loader is not None  # its outputs are some layer's inputs

        def forward(layer=layer, layer_calls=layer_calls, generation=index + 1) -> None:
            forward_in_place(family, layer, hidden, layer_calls, store, generation, device)

        if block is None:
            if feeds_next:
                forward()
        else:
            report, output = compress_moe_layer(config, family, layer, block, f"{trunk_prefix}{index}", index, hidden,
                                                layer_calls, batches, sample, target, groups_per_layer, started,
                                                forward if feeds_next else None)
            result.record(report, output)
            logger.info("layer %d: %d -> %d experts, %.2f s, peak RSS %.2f GB", index, report.experts_before,
                        report.experts_after, report.seconds, peak_rss_gb())
        if work is not None:
            writer.write_group(group_tensors(result.source, family, groups[index], result.outputs,
                                             result.dequantize_dtype))
            result.outputs.pop(f"{trunk_prefix}{index}", None)  # written: its views die with the layer
            loader.release(layer)
            work.commit(index + 1, writer.parts, result.layer_entries)
            store.drop_before(index + 1)
    if mtp_loader is not None:
        run_mtp(config, model, family, batches, target, mtp_loader, calls, hidden, result)


def run_mtp(config: ReamConfig, model, family: MoEFamily, batches: list[CalibrationBatch], target: int,
            loader: LayerLoader, calls, trunk_out: list[torch.Tensor], result: CompressionResult) -> None:
    """MTP layers (mtp="compress"), METHOD.md §6: each is one more MoE layer after the trunk, fed as vLLM feeds
    its drafter (pipeline/mtp.py) from the last trunk layer's outputs `trunk_out`, compressed with the same
    method and target, written under its own names."""
    groups_per_layer = routing_groups(family, model.config.get_text_config())
    for item in tqdm(run_mtp_layers(model, family, loader, trunk_out, batches, calls),
                     desc="Compressing MTP layers", unit="layer"):
        block = moe_block(family, item.layer)
        if block is None:  # a dense MTP layer: copied as it is
            continue
        started = time.perf_counter()
        sample = sample_positions(config, item.num_tokens) if config.is_merging else None
        report, output = compress_moe_layer(config, family, item.layer, block, item.key, item.index, item.hidden,
                                            item.calls, item.batches, sample, target, groups_per_layer, started)
        result.record(report, output)
        logger.info("MTP layer %s: %d -> %d experts, %.2f s", item.key, report.experts_before,
                    report.experts_after, report.seconds)
