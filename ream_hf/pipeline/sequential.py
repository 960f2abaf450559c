"""The sequential pass (METHOD.md §5): calibration data embedded once, then every trunk layer in order
(statistics on the current hidden states, compression, re-forward), then the MTP layers, fed the last trunk
layer's outputs. With a work folder, each finished layer's shard part and the next layer's inputs are
committed, so an interrupted run resumes after its last finished layer."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..arch import MoEFamily, decoder_layers, moe_block
from ..config import ReamConfig
from ..io.source import SourceCheckpoint
from ..io.checkpoint_writer import CheckpointWriter
from ..io.writer import LayerOutput
from ..kill_points import kill_point
from ..method.surgery import routing_groups
from . import distributed
from .calibration import CalibrationBatch
from .device import Placement
from .distributed import BatchShare
from .layer import LayerReport, compress_moe_layer, forward_in_place, layer_sample_positions
from .mtp import run_mtp_layers, shifted_batch
from .runner import capture_layer_inputs
from .saved_statistics import StatisticsReader, StatisticsWriter
from .hidden_states import HiddenStateStore
from .loading import LayerLoader, check_finite
from .work_folder import WorkFolder

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
    checkpoint: CheckpointWriter | None = None  # the output's writer (a source checkpoint's run)
    background_write_seconds: float = 0.0  # hidden-state files, shard parts, commits: the writer threads' time
    write_wait_seconds: float = 0.0  # the compute thread's time blocked on those writes

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
               mtp_loader: LayerLoader | None = None, statistics: StatisticsReader | None = None,
               save_statistics: StatisticsWriter | None = None) -> None:
    """The trunk layer by layer, then (`mtp_loader` given) the MTP layers, fed the last trunk layer's outputs.
    `loader` fills each trunk layer from the source when the model is a streaming skeleton. `batches` are all
    calibration batches; under torch.distributed each rank runs its share (pipeline/distributed.py). With
    `statistics` (saved by an earlier non-sequential run) no calibration data is run: each layer is planned from
    its file.

    With a work folder, each layer's hidden-state files, shard part and commit are written by a background
    thread while the next layer computes; a layer counts as finished (and resumable) once its commit is on disk."""
    work, trunk_prefix = result.work, result.trunk_prefix
    ranks = distributed.current()
    placement = Placement.of(device)
    layers = decoder_layers(model)
    share = BatchShare.of_masks([b.attention_mask for b in batches], ranks)
    own = [batches[b] for b in share.numbers]
    numbers = list(share.numbers)
    if statistics is None:
        embedding = tqdm(own, desc="Embedding calibration", leave=False, disable=not ranks.is_main)
        hidden, calls = capture_layer_inputs(model, layers, embedding, device, family.layer_carry)
        kill_point("calibration-embedded")
    else:
        hidden, calls = [], [[] for _ in layers]  # per layer: no calibration batches to run
    sample = layer_sample_positions(config, share.total_tokens) \
        if config.layer_sample_tokens and statistics is None else None
    groups_per_layer = routing_groups(family, model.config.get_text_config())
    last = len(layers) - 1
    store = None
    start = 0
    if work is not None:
        hidden_bytes = sum(h.numel() * h.element_size() for h in hidden)
        store = HiddenStateStore(work.folder, in_memory=hidden_bytes <= config.hidden_states_budget_gb * 2**30)
        result.checkpoint.start_layer_parts(work.folder, work.state["parts"])
        start = work.finished_layers
        if start and family.layer_carry and start < len(layers):
            raise ValueError(f"{family.name} runs cannot be resumed mid-way yet: its layers hand {family.layer_carry} "
                             "on to the next, and that is not saved; delete the work folder and start over")
        if start:
            if start < len(layers) or mtp_loader is not None:  # the last layer's outputs are stored only if used
                hidden = store.read_batches(start, numbers, device)
            result.layer_entries = list(work.state["layers"])
        elif not store.in_memory:
            hidden = [store.write(0, number, h) for number, h in zip(numbers, hidden)]
    progress = tqdm(range(start, len(layers)), desc="Compressing layers", unit="layer", initial=start, total=len(layers),
                    disable=not ranks.is_main)
    try:
        for index in progress:
            layer = layers[index]
            started = time.perf_counter()
            if loader is not None:
                loader.fill(layer, f"{trunk_prefix}{index}.")  # each tensor checked for NaN/inf as it is read
                if index < last:
                    loader.prefetch(f"{trunk_prefix}{index + 1}.")  # checked in the reading thread
            else:  # loaded by transformers: checked here, before its statistics
                for name, tensor in layer.state_dict().items():
                    check_finite(f"{trunk_prefix}{index}.{name}", tensor, "as loaded")
            placement.synchronize()
            load_seconds = time.perf_counter() - started
            layer_calls = [per_batch[index] for per_batch in calls] if statistics is None else []
            block = moe_block(family, layer)
            # its outputs are some layer's inputs (not when every layer is planned from saved statistics)
            feeds_next = (index < last or mtp_loader is not None) and statistics is None

            next_calls = [per_batch[index + 1] for per_batch in calls] \
                if family.layer_carry and statistics is None and index < last else None

            def forward(layer=layer, layer_calls=layer_calls, generation=index + 1, next_calls=next_calls) -> None:
                forward_in_place(family, layer, hidden, layer_calls, store, generation, device, numbers, next_calls)

            if block is None:
                if feeds_next:
                    forward()
            else:
                report, output = compress_moe_layer(config, family, layer, block, f"{trunk_prefix}{index}", index,
                                                    hidden, layer_calls, own, sample, target, groups_per_layer,
                                                    started, forward if feeds_next else None, share, statistics,
                                                    save_statistics)
                report.timings["load"] = load_seconds
                result.record(report, output)
                logger.info("layer %d: %d -> %d experts, %.2f s (%s), peak RSS %.2f GB", index, report.experts_before,
                            report.experts_after, report.seconds,
                            ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()), peak_rss_gb())
            if work is not None:
                key = f"{trunk_prefix}{index}"
                outputs = {key: result.outputs.pop(key)} if key in result.outputs else {}  # written: dropped after
                store.writer.submit(functools.partial(commit_layer, result, store, index, outputs,
                                                      index + 1, list(result.layer_entries), ranks),
                                    output_bytes(outputs), after_all=True)
                loader.release(layer)
        if store is not None:
            store.flush()  # every layer's files and commit on disk: save_pretrained reads the parts' list
            result.background_write_seconds += store.writer.busy_seconds
            result.write_wait_seconds += store.writer.waited_seconds
    except BaseException:
        if store is not None:  # what was submitted lands (a commit too), then nothing writes into the work folder
            store.writer.drain()
        raise
    if mtp_loader is not None:
        run_mtp(config, model, family, batches, target, mtp_loader, calls, hidden, result, save_statistics)


def output_bytes(outputs: dict[str, LayerOutput]) -> int:
    """Bytes a layer's compressed tensors hold until written (they count against the writer's bound)."""
    tensors = [t for output in outputs.values()
               for t in (*vars(output.experts).values(), *output.router.values()) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def commit_layer(result: CompressionResult, store: HiddenStateStore, index: int, outputs: dict[str, LayerOutput],
                 finished: int, entries: list[dict], ranks) -> None:
    """In a writer thread, once this rank's hidden-state files of generation `finished` (submitted before it) are
    written and every rank is there, rank 0 writes the layer's shard part and records the layer as finished."""
    distributed.io_barrier()
    if ranks.is_main:
        result.checkpoint.write_layer(index, outputs)
        kill_point("layer-written")
        result.work.commit(finished, result.checkpoint.parts, entries)
        store.drop_before(finished)


def run_mtp(config: ReamConfig, model, family: MoEFamily, batches: list[CalibrationBatch], target: int,
            loader: LayerLoader, calls, trunk_out: list[torch.Tensor], result: CompressionResult,
            save_statistics: StatisticsWriter | None = None) -> None:
    """MTP layers (mtp="compress"), METHOD.md §6: each is one more MoE layer after the trunk, fed as vLLM feeds
    its drafter (pipeline/mtp.py) from the last trunk layer's outputs `trunk_out` (this rank's batches),
    compressed with the same method and target, written under its own names."""
    ranks = distributed.current()
    groups_per_layer = routing_groups(family, model.config.get_text_config())
    num_hidden_layers = int(model.config.get_text_config().num_hidden_layers)
    for item in tqdm(run_mtp_layers(model, family, loader, trunk_out, ranks.share(batches), calls),
                     desc="Compressing MTP layers", unit="layer", disable=not ranks.is_main):
        block = moe_block(family, item.layer)
        if block is None:  # a dense MTP layer: copied as it is
            continue
        started = time.perf_counter()
        kill_point("mtp-layer")
        shift = item.index - num_hidden_layers + 1  # position t is fed token t + shift
        share = BatchShare.of_masks([shifted_batch(b, shift).attention_mask for b in batches], ranks)
        sample = layer_sample_positions(config, share.total_tokens) if config.layer_sample_tokens else None
        report, output = compress_moe_layer(config, family, item.layer, block, item.key, item.index, item.hidden,
                                            item.calls, item.batches, sample, target, groups_per_layer, started,
                                            share=share, save_statistics=save_statistics)
        result.record(report, output)
        logger.info("MTP layer %s: %d -> %d experts, %.2f s", item.key, report.experts_before,
                    report.experts_after, report.seconds)
