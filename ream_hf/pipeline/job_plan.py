"""`ream-hf plan`: what a compression job needs, from config.json (and the weight index) alone.

Sizes come from the model built on the meta device (no memory, no weights), so every family is measured as the
pipeline builds it: per decoder layer, the bytes of its parameters in the working dtype; per MoE layer, the
bytes one expert and one router row take. The arithmetic, with T = sequences x sequence length calibration
tokens, H the hidden size, D the expert width, E experts, k kept experts, b bytes per element:

- source_bytes: the index's `total_size` (exact, MTP layers included), else the shard headers' sizes when the
  shards are local, else the parameters' bytes in the recorded dtype;
- output_bytes: source_bytes minus, per compressed MoE layer, (E - k) x (3HD [+ biases] + router row) x b; with
  output_dtype "fp8", each linear weight of the decoder layers at one byte a value and a float32 scale a block;
- layer_bytes_max: the largest decoder layer's parameters in the working dtype;
- hidden_states_bytes: one generation of calibration hidden states, T x H x b (sequences may be shorter);
- statistics_flops: the exact statistic, every expert on every token, 3 x 2HD x E x T per MoE layer (REAP and
  frequency evaluate only the routed experts: 6HD x top-k x T, and nothing);
- work_dir_bytes: the compressed trunk's shards plus two generations of hidden-state files (the next layer's
  inputs are written before the previous ones are deleted);
- device_bytes_needed: the largest layer, the statistics pass's fused gate/up copy (in its GEMM dtype) and
  working set, the merged experts, the embeddings, and the hidden states when they are held on the device.

The estimate is executed FLOPs at a stated throughput plus reading the source at a stated disk speed (writes
overlap with compute).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch import (decoder_layers, expert_count, experts, experts_per_token, family_for_config, moe_block,
                    parse_moe_name, router_tensors, text_config_dict)
from ..config import TORCH_DTYPES, ReamConfig
from ..io import safetensors as st
from ..io.names import looks_like_hub_id
from ..io.quantization import FP8_OUTPUT, Fp8BlockOutput
from ..io.source import SourceCheckpoint
from ..method.planning import LayerWork, layer_work
from ..method.refit import refit_bytes as refit_bytes_of, sized_refit_config
from ..method.stats import CHUNK_BYTES_BUDGET, ROUTED_BYTES_BUDGET
from .device import CUDA_CHUNK_BYTES, CUDA_MEMORY_FRACTION, CUDA_ROUTED_BYTES, memory_bytes
from .background_writer import WRITER_PENDING_BYTES

DEFAULT_DISK_GBPS = 2.0


@dataclass(frozen=True)
class Rate:
    """One rate the estimate divides work by, and where it comes from: "measured: <bench, shape, machine>" or
    "assumed: <why>" (the plan prints which)."""

    value: float
    source: str

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured")


@dataclass(frozen=True)
class DeviceRates:
    """Per-device rates of the stages that dominate a layer (method/planning.py `LayerWork` counts their work).

    On the CPU they are one thread's (the estimate scales the GEMM stages by the thread count, an assumption; the
    Hungarian matchings run in scipy, one thread); `fixed` is the job's cost outside the layers (imports,
    calibration, skeleton, final writes and verification), `baseline` the process's own resident memory then."""

    statistics_gflops: Rate
    merge_gflops: Rate  # weight features and alignment activations
    matching_ns: Rate  # one Hungarian matching of D x D costs takes matching_ns x (D / 256) ** 2.5 nanoseconds
    refit_gflops: Rate
    forward_gflops: Rate
    fixed_seconds: Rate
    baseline_bytes: Rate


RATE_UNITS = {"statistics_gflops": "GFLOP/s", "merge_gflops": "GFLOP/s", "matching_ns": "ns at D 256",
              "refit_gflops": "GFLOP/s", "forward_gflops": "GFLOP/s", "fixed_seconds": "s", "baseline_bytes": "bytes"}
MATCHING_EXPONENT = 2.5  # linear_sum_assignment's time on alignment costs grows as D^2.5 (measured D 128-768, below)

@dataclass(frozen=True)
class MeasuredRun:
    """A run whose seconds per layer by stage calibrate a device's rates: its shape and settings, and where and how
    it was measured (`source`). Rates are its stages' work (`LayerWork`) over their seconds."""

    source: str
    hidden: int
    inner: int
    experts: int
    target: int
    top_k: int
    tokens: int
    sequence_length: int
    dense_params: int
    attention_width: int
    config: dict[str, Any]  # the ReamConfig fields that change the work (method, refit, samples)
    seconds: dict[str, float]  # per layer: statistics, merge, refit, forward
    matching_ns: float | None = None  # this device's host's matching rate, where the run cannot separate it
    fixed_seconds: float = 0.0
    baseline_bytes: int = 0


# Qwen3-30B-A3B's layer on one H100 80GB HBM3 (eval/bench_gpu.py --layers 4, README "Measured on a GPU",
# 2026-11-26): steady seconds per layer, bf16, 3072 x 512 calibration tokens, REAM 128 -> 96, refit down
H100_RUN = MeasuredRun(
    "measured: eval/bench_gpu.py, Qwen3-30B-A3B layer shape, one H100 80GB HBM3, 2026-11-26",
    hidden=2048, inner=768, experts=128, target=96, top_k=8, tokens=3072 * 512, sequence_length=512,
    dense_params=18_874_624 + 128 * 2048 + 2 * 2048, attention_width=32 * 128,
    config={"method": "ream", "group_size": 16, "refit": "down", "layer_floor": False},  # measured before it
    seconds={"statistics": 5.03, "merge": 1.36, "refit": 0.35, "forward": 1.29},
    fixed_seconds=15.0, baseline_bytes=2 * 2**30)
# this project's 2-core CPU, one thread, stages in the compute thread's CPU seconds (eval/bench_plan.py --cpu-clock)
CPU_RUN = MeasuredRun(
    "measured: eval/bench_plan.py --threads 1 --cpu-clock, random Qwen3-MoE H 1024 D 512 E 64 top-8, 2-core x86 "
    "AVX2 CPU, 2026-12-06",
    hidden=1024, inner=512, experts=64, target=48, top_k=8, tokens=16 * 128, sequence_length=128,
    dense_params=4 * 1024 * 1024 + 64 * 1024 + 2 * 1024 + 2 * 256, attention_width=1024,
    config={"method": "ream", "group_size": 16, "layer_floor": False},  # measured before the layer floor
    # 6 layers, 16 x 128 tokens, REAM 64 -> 48 with the default refit (one ridge sweep per round, factored rows):
    # 39.1, 67.1, 27.0 s over 6 layers, the re-forward 4.3 s over 5 (the last layer has none); peak RSS 2.66 GB
    # (anonymous 2.41); re-measured 2026-12-06 21:40 after the refit's rework (it was 45.6 s before); the refit
    # 23.5 s after its routed passes stopped copying each expert (23:05, the other stages within 7 % of the above)
    seconds={"statistics": 39.1 / 6, "merge": 67.1 / 6, "refit": 23.5 / 6, "forward": 4.3 / 5},
    fixed_seconds=17.0, baseline_bytes=600_000_000)
MATCHING_NS_CPU = 2.6e6  # scipy linear_sum_assignment at D = 256 on this CPU, one thread (measured, 2026-12-06)


def rates_from_run(run: MeasuredRun) -> DeviceRates:
    """The rates `run` measured: each stage's counted work over its seconds (the merge's matchings first taken
    out at the host's measured matching rate)."""
    config = sized_refit_config(ReamConfig(target_experts=run.target, **run.config), top_k=run.top_k,
                                kept=run.target, inner=run.inner, hidden=run.hidden)
    work = layer_work(config, hidden=run.hidden, inner=run.inner,
                      experts=run.experts, target=run.target, top_k=run.top_k, tokens=run.tokens,
                      dense_params=run.dense_params, attention_width=run.attention_width,
                      sequence_length=run.sequence_length)
    matching_ns = run.matching_ns or MATCHING_NS_CPU
    matching = work.matchings * matching_ns * 1e-9 * (run.inner / 256) ** MATCHING_EXPONENT
    merge_seconds = max(run.seconds["merge"] - matching, 0.1 * run.seconds["merge"])
    rate = lambda flops, seconds: Rate(round(flops / seconds / 1e9, 1), run.source)  # noqa: E731
    return DeviceRates(
        statistics_gflops=rate(work.statistics_flops, run.seconds["statistics"]),
        merge_gflops=rate(work.feature_flops + work.alignment_flops, merge_seconds),
        matching_ns=Rate(matching_ns, "measured: scipy linear_sum_assignment on random D x D costs, D 128-768, "
                                      "this project's CPU, one thread, 2026-12-06"),
        refit_gflops=rate(work.refit_flops, run.seconds["refit"]),
        forward_gflops=rate(work.forward_flops, run.seconds["forward"]),
        fixed_seconds=Rate(run.fixed_seconds, run.source),
        baseline_bytes=Rate(run.baseline_bytes, run.source),
    )


def device_rates(device: torch.device) -> DeviceRates:
    return rates_from_run(H100_RUN if device.type == "cuda" else CPU_RUN)


@dataclass
class JobPlan:
    source: str
    family: str
    dtype: str  # the working dtype
    num_layers: int
    moe_layers: int  # trunk MoE layers (+ MTP MoE layers compressed with them)
    experts_before: int
    experts_after: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    calibration_tokens: int
    source_bytes: int
    source_bytes_from: str  # "index" (its total_size), "safetensors headers" or "config"
    output_bytes: int
    layer_bytes_max: int
    hidden_states_bytes: int
    hidden_states_in_memory: bool  # within hidden_states_budget_gb: held on the device, else spilled to files
    statistics_flops: float
    executed_flops: float  # what the pass runs: gate/up of every expert (merging), the routed down projections,
    #                        and the re-forward's routed experts
    work_dir_bytes: int
    device: str
    device_bytes_needed: int
    device_memory_bytes: int | None
    fits_device: bool | None
    layer_fits_device: bool | None  # the refusal test of `compress`: the largest layer and its statistics (the
    #                                 whole model without streaming)
    ram_bytes: int
    ram_bytes_needed: int
    fits_ram: bool
    gpu_memory_bytes: int | None  # this machine's first GPU, if any
    throughput_tflops: float
    disk_gbps: float
    estimated_seconds: float
    ram_parts: dict[str, int] = field(default_factory=dict)  # ram_bytes_needed by what holds it
    stage_seconds: dict[str, float] = field(default_factory=dict)  # estimated_seconds by stage, all layers
    threads: int = 1
    refit_sample_tokens: int = 0  # tokens per layer the down refit draws (0: no down refit)
    refit_rows_per_unknown: float = 0.0  # its routed rows per unknown: tokens * top-k / (kept experts * D)
    rates: dict[str, dict[str, Any]] = field(default_factory=dict)  # each rate's value and source (measured/assumed)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        gb = lambda n: "unknown" if n is None else f"{n / 1e9:,.2f} GB"  # noqa: E731
        fits = lambda ok: "unknown" if ok is None else ("yes" if ok else "NO")  # noqa: E731
        return [
            f"{self.source}: {self.family}, {self.num_layers} layers ({self.moe_layers} MoE), "
            f"{self.experts_before} -> {self.experts_after} experts (top-{self.top_k}), {self.dtype}",
            f"source            {gb(self.source_bytes)} (from the {self.source_bytes_from})",
            f"output            {gb(self.output_bytes)}",
            f"largest layer     {gb(self.layer_bytes_max)}",
            f"hidden states     {gb(self.hidden_states_bytes)} per layer boundary "
            f"({self.calibration_tokens:,} tokens; {'on the device' if self.hidden_states_in_memory else 'spilled to files'})",
            f"statistics        {self.statistics_flops / 1e15:,.2f} PFLOP exact statistic, "
            f"{self.executed_flops / 1e15:,.2f} PFLOP executed",
            f"work folder       {gb(self.work_dir_bytes)} of disk at most",
            *([f"refit sample      {self.refit_sample_tokens:,} tokens per layer ({self.refit_rows_per_unknown:.2f} "
               "routed rows per unknown)"] if self.refit_sample_tokens else []),
            f"{self.device:<17} needs {gb(self.device_bytes_needed)} of {gb(self.device_memory_bytes)}: "
            f"fits {fits(self.fits_device)}",
            f"this machine RAM  needs {gb(self.ram_bytes_needed)} of {gb(self.ram_bytes)}: fits {fits(self.fits_ram)}"
            + ("" if self.gpu_memory_bytes is None else f"; GPU memory {gb(self.gpu_memory_bytes)}"),
            "  peak RAM        " + ", ".join(f"{part} {n / 1e9:.2f}" for part, n in self.ram_parts.items() if n) + " GB",
            f"estimate          {self.estimated_seconds / 60:,.1f} min ("
            + ", ".join(f"{stage} {s:,.0f} s" for stage, s in self.stage_seconds.items())
            + f"; {self.threads} thread(s), {self.disk_gbps:g} GB/s from disk)",
            *(f"  rate {name:<17} {r['value']:g} {RATE_UNITS[name]}: {r['source']}" for name, r in self.rates.items()),
            *(f"note: {note}" for note in self.notes),
        ]


def source_files(model_path: str | os.PathLike) -> Path:
    """A folder holding the source's config.json (and weight index when it has one): a local folder as it is;
    for a Hub repo id, only those two files are downloaded."""
    path = Path(model_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"source {model_path} is a file; give a model folder or a Hub repo id")
        return path
    if not looks_like_hub_id(model_path):
        raise ValueError(f"source {model_path} is neither a local folder nor a Hub repo id (owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config = Path(hf_hub_download(str(model_path), "config.json"))
        try:
            hf_hub_download(str(model_path), st.INDEX_NAME)
        except EntryNotFoundError:
            pass  # a single-shard model: its size comes from the config
    except Exception as error:  # the hub raises many types; the user needs one line
        raise ValueError(f"cannot read {model_path}'s config from the Hugging Face Hub: {error}") from None
    return config.parent


def _stored_size(folder: Path) -> tuple[int | None, str, list[str]]:
    """The weights' bytes on disk and tensor names, from the index (its total_size, else the shard headers when
    the shards are here) or a single shard's header: never tensor data."""
    index = folder / st.INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data.get("weight_map", {})
        total = (data.get("metadata") or {}).get("total_size")
        if total is not None:
            return int(total), "index", list(weight_map)
        if all((folder / shard).is_file() for shard in set(weight_map.values())):
            infos = st.tensor_infos(folder, weight_map)
            return sum(info.nbytes for info in infos.values()), "safetensors headers", list(weight_map)
        return None, "config", list(weight_map)
    single = folder / st.SINGLE_NAME
    if single.is_file():
        infos = st.read_header(single)
        return sum(info.nbytes for info in infos.values()), "safetensors headers", list(infos)
    return None, "config", []


def _fp8_savings(family, folder: Path, names: list[str], model, disk_size: int, output_experts: int,
                 expert_numel: int, expert_shape: tuple[int, int], notes: list[str]) -> int:
    """Bytes output_dtype "fp8" takes off a plain output: per tensor `Fp8BlockOutput` quantizes, its bytes in the
    source dtype less one byte a value and a float32 scale a block; from the shard headers when they are here, else
    from the model built on the meta device (the trunk only: MTP layers are then counted unquantized)."""
    weight_map = st.weight_map(folder, shards_present=False) if names else {}
    if weight_map and all((folder / shard).is_file() for shard in set(weight_map.values())):
        shapes = {name: info.shape for name, info in st.tensor_infos(folder, weight_map).items()}
    else:
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        notes.append("output_dtype fp8 without the shards here: the savings are counted on the trunk as transformers "
                     "builds it (MTP layers counted unquantized)")
    # refused as compress refuses it, by the checkpoint's own names (the meta model holds every family's experts fused)
    fp8 = Fp8BlockOutput(family, names or [n for n in shapes if (p := parse_moe_name(family, n)) is None
                                           or p.kind == "router"])
    saved = 0
    for name, shape in shapes.items():
        parsed = parse_moe_name(family, name)
        if parsed is not None and parsed.kind != "router":
            continue  # experts: counted per output expert below (the meta model holds them fused)
        if fp8.quantizes(name, shape):
            saved += math.prod(shape) * disk_size - fp8.stored_bytes(shape)
    rows, cols = expert_shape
    per_expert = expert_numel * disk_size - 2 * fp8.stored_bytes((rows, cols)) - fp8.stored_bytes((cols, rows))
    notes.append("output_dtype fp8: the decoder layers' linear weights count one byte a value and a float32 scale per "
                 "128 x 128 block; embeddings, lm_head, norms and routers their source dtype")
    return saved + output_experts * per_expert


def _tensor_bytes(tensors, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() for t in tensors) * size


def plan_job(model_path: str | os.PathLike | SourceCheckpoint, config: ReamConfig, *, device: str | None = None,
             tflops: float | None = None, disk_gbps: float = DEFAULT_DISK_GBPS, threads: int | None = None,
             ram_bytes: int | None = None) -> JobPlan:
    """The job's sizes and needs (module docstring), reading config.json and the index only (`model_path`: a
    folder, a Hub id, or a source `compress` has opened, whose weights may not be downloaded yet). `threads`: the
    CPU threads the job will run with (default: torch's); `ram_bytes`: the RAM to plan for (default: this
    machine's)."""
    from transformers import AutoModelForCausalLM

    from ..arch import config_mtp_prefixes, disk_expert_name
    from ..io.compressed_tensors import expert_stored_bytes
    from ..io.quantization import quantization_config

    source = model_path if isinstance(model_path, SourceCheckpoint) else SourceCheckpoint(source_files(model_path))
    folder, config_dict = source.folder, source.config
    family = family_for_config(config_dict)
    num_experts = expert_count(family, config_dict)
    text = text_config_dict(config_dict)
    top_k = experts_per_token(config_dict)
    target = config.resolve_target(num_experts, top_k)
    recorded = config_dict.get("dtype") or config_dict.get("torch_dtype") or text.get("dtype") \
        or text.get("torch_dtype") or "float32"
    disk_dtype = TORCH_DTYPES.get(recorded, torch.bfloat16)
    working = disk_dtype if config.dtype == "auto" else TORCH_DTYPES[config.dtype]
    notes: list[str] = []
    quant_method = str((quantization_config(config_dict) or {}).get("quant_method", "")).lower()
    if quant_method and quant_method not in ("fp8", "compressed-tensors"):
        notes.append(f"the source is quantized ({quant_method}); output_bytes counts its experts in {recorded}")

    hf_config = source.transformers_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=working)
    layers = decoder_layers(model)
    layer_bytes = [_tensor_bytes(layer.state_dict().values(), working) for layer in layers]
    model_bytes = _tensor_bytes([p for _, p in model.named_parameters()], disk_dtype)
    embed_bytes = _tensor_bytes(model.get_input_embeddings().parameters(), working)

    moe = [(i, moe_block(family, layer)) for i, layer in enumerate(layers)]
    moe = [(i, block) for i, block in moe if block is not None]
    if not moe:
        raise ValueError(f"{folder} has no MoE layer the {family.name} adapter recognises")
    block = moe[0][1]
    experts_module = experts(family, block)
    expert_numel = sum(p.numel() for p in experts_module.parameters()) // num_experts
    router_numel = sum(t.numel() for t in router_tensors(family, block).values()) // num_experts
    hidden = int(text["hidden_size"])
    inner = int(experts_module.down_proj.shape[-1] if family.expert_layout != "gpt_oss" else experts_module.down_proj.shape[1])

    total_size, source_from, names = _stored_size(folder)
    mtp_moe = 0
    if names:
        mtp = config_mtp_prefixes(config_dict, names)
        mtp_moe = len({p.layer_key for n in names if mtp and n.startswith(mtp) and (p := parse_moe_name(family, n))
                       and p.kind != "router"})
    compressed = len(moe) + (mtp_moe if config.mtp == "compress" else 0)
    if mtp_moe and config.mtp == "drop":
        notes.append("--mtp drop: the MTP layers' bytes are not subtracted from output_bytes")
    source_bytes = total_size if total_size is not None else model_bytes
    if total_size is None:
        notes.append("no weight index: source_bytes counts the model transformers builds (MTP layers, if any, excluded)")
    disk_size = torch.empty((), dtype=disk_dtype).element_size()
    expert_disk_bytes = expert_numel * disk_size
    if quant_method == "fp8":  # written back in FP8: a byte per weight and a float32 scale per block
        block = (config_dict.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
        blocks = lambda rows, cols: -(-rows // block[0]) * -(-cols // block[1])  # noqa: E731
        expert_disk_bytes = expert_numel + 4 * (2 * blocks(inner, hidden) + blocks(hidden, inner))
    if quant_method == "compressed-tensors":  # written back in its scheme: as the first expert's projections are
        fmt = source.quantization
        first = next((p for n in names if (p := parse_moe_name(family, fmt.real_name(n))) and p.kind == "expert"), None)
        if first is not None:
            shapes = {"gate": (inner, hidden), "up": (inner, hidden), "down": (hidden, inner)}
            expert_disk_bytes = sum(expert_stored_bytes(fmt, disk_expert_name(family, first.experts_prefix, 0, role),
                                                        shape) for role, shape in shapes.items())
    removed = compressed * (num_experts - target) * (expert_disk_bytes + router_numel * disk_size)
    output_bytes = source_bytes - removed
    if config.output_dtype == FP8_OUTPUT and not quant_method:
        output_bytes -= _fp8_savings(family, folder, names, model, disk_size, compressed * target,
                                     expert_numel, (inner, hidden), notes)

    config = sized_refit_config(config, top_k=top_k, kept=target, inner=inner, hidden=hidden)  # as `compress` does
    tokens = config.num_calibration_sequences * config.sequence_length
    size = torch.empty((), dtype=working).element_size()
    hidden_bytes = tokens * hidden * size
    in_memory = hidden_bytes <= config.hidden_states_budget_gb * 2**30
    per_layer_exact = 3 * 2 * hidden * inner * tokens
    if config.is_merging:
        statistics_flops = per_layer_exact * num_experts * compressed
    elif config.method == "reap":
        statistics_flops = per_layer_exact * top_k * compressed
    else:
        statistics_flops = 0
    heads = int(text.get("num_attention_heads") or 1)
    head_dim = int(text.get("head_dim") or hidden // heads)
    moe_layer_params = sum(t.numel() for t in layers[moe[0][0]].state_dict().values())
    work = layer_work(config, hidden=hidden, inner=inner, experts=num_experts, target=target, top_k=top_k,
                      tokens=tokens, dense_params=moe_layer_params - num_experts * expert_numel,
                      attention_width=heads * head_dim, sequence_length=config.sequence_length)
    executed = (work.statistics_flops + work.refit_flops + work.forward_flops) * compressed
    refit_tokens = min(config.refit_tokens, tokens) if "down" in config.refit else 0
    refit_bytes = 0
    if refit_tokens:  # the down refit and its held-out check (method/refit.py), per compressed layer
        refit_bytes = refit_bytes_of(refit_tokens, top_k, inner, hidden, target,
                                     torch.empty((), dtype=working).element_size())
    merge_sample = min(config.refit_tokens, tokens) if config.is_merging else 0
    group = config.resolve_group_size(num_experts, target) if config.is_merging else 1
    if config.is_merging and config.prune_fallback:
        # the merge floor (method/floor.py): each output expert's routed sample tokens through its group's members
        # (the target) and its two candidates, plus a ridge fit of each candidate's down projection
        executed += 2 * 3 * hidden * inner * top_k * merge_sample * (group + 2) * compressed
    if config.is_merging and config.merge == "neurons" and group > 1:
        # the neuron merge (method/merging.py neuron_merge) per merged group of `group` experts: the pooled neurons'
        # activations on its routed sample rows, their Gram, the greedy selection of D of them and two ridge fits
        rows, pool = max(1, merge_sample * top_k // target), group * inner
        merged_groups = -(-(num_experts - target) // (group - 1))
        executed += (2 * 2 * hidden * pool * rows + 2 * rows * pool ** 2 + 2 * inner * pool * (hidden + inner)
                     + 4 * (inner + 1) ** 3) * merged_groups * compressed
        # float64: the (rows, pool) activations, the (pool, pool) Gram, the (H, pool) cross terms, the selection's
        # (pool, D) factor
        refit_bytes = max(refit_bytes, 8 * (rows * pool + pool * pool + hidden * pool + pool * inner))

    run_device = torch.device(device or config.run_device)
    cuda = run_device.type == "cuda"
    gpu_memory = memory_bytes(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    operand = size if cuda and working in (torch.float16, torch.bfloat16) else 4
    gate_up_copy = num_experts * (expert_numel - hidden * inner) * operand  # the statistics' fused gate/up matrix
    if cuda:  # the statistics' chunk and saliency window (pipeline/device.py)
        workspace = CUDA_CHUNK_BYTES + CUDA_ROUTED_BYTES
        if gpu_memory:
            workspace = min(workspace, int(2 * CUDA_MEMORY_FRACTION * gpu_memory))
    else:
        workspace = CHUNK_BYTES_BUDGET + ROUTED_BYTES_BUDGET
    merged = target * expert_numel * size
    layer_need = max(layer_bytes) + gate_up_copy + max(workspace, refit_bytes) + merged + embed_bytes
    held_hidden = hidden_bytes if in_memory else 0
    if config.streaming:
        device_need = layer_need + held_hidden
    else:
        device_need = _tensor_bytes([p for _, p in model.named_parameters()], working) + gate_up_copy + workspace + held_hidden
    rates = device_rates(run_device)
    # the token sample's rows: the block inputs, and their routed output (float32) where the statistics keep it (the
    # dense pass in float32 GEMMs: merging on the CPU; stats.py `keeps_sample_outputs`)
    sample_row_bytes = 4 * hidden * (2 if config.is_merging and not cuda else 1)
    ram_parts = _ram_parts(rates, config, cuda=cuda, layer=max(layer_bytes), disk_layer=max(layer_bytes) * disk_size // size,
                           statistics=gate_up_copy + max(workspace, refit_bytes) + merged, embed=embed_bytes,
                           hidden_states=held_hidden, sample=sample_row_bytes * min(tokens, config.layer_sample_tokens),
                           written=min(target * expert_numel * size + max(layer_bytes) - num_experts * expert_numel * size,
                                       WRITER_PENDING_BYTES), whole_model=device_need)
    ram_need = sum(ram_parts.values())
    if cuda:
        device_total = gpu_memory if run_device.index in (None, 0) or gpu_memory is None else memory_bytes(run_device)
    else:
        device_total = memory_bytes(torch.device("cpu")) if ram_bytes is None else ram_bytes
    ram_total = memory_bytes(torch.device("cpu")) if ram_bytes is None else ram_bytes
    if cuda and device_total is None:
        notes.append("no CUDA GPU on this machine: whether the job fits one is not known here")

    threads = max(1, threads or torch.get_num_threads()) if not cuda else 1
    if tflops is not None:
        given = Rate(tflops * 1e3, "given: --tflops")
        rates = DeviceRates(given, given, rates.matching_ns, given, given, rates.fixed_seconds, rates.baseline_bytes)
    stage_seconds = _stage_seconds(work, rates, inner, threads)
    stage_seconds = {stage: seconds * compressed for stage, seconds in stage_seconds.items()}
    dense_layers = len(layers) - len(moe)
    if dense_layers:  # a dense layer's re-forward: its parameters once per token
        stage_seconds["forward"] += dense_layers * 2 * max(layer_bytes) / size * tokens / (
            rates.forward_gflops.value * 1e9 * threads)
    stage_seconds["load"] = source_bytes / (disk_gbps * 1e9)
    if cuda:  # read ahead while the GPU computes: only what the compute does not hide
        stage_seconds["load"] = max(0.0, stage_seconds["load"] - sum(stage_seconds.values()))
    stage_seconds["fixed"] = rates.fixed_seconds.value
    seconds = sum(stage_seconds.values())
    if not cuda and threads > 1:
        notes.append(f"the CPU rates are one thread's: {threads} threads are assumed {threads} x as fast (the "
                     "matchings excepted); on a machine shared with other jobs expect longer")
    return JobPlan(
        source=str(source.folder if isinstance(model_path, SourceCheckpoint) else model_path), family=family.name, dtype=str(working).removeprefix("torch."),
        num_layers=len(layers), moe_layers=compressed, experts_before=num_experts, experts_after=target, top_k=top_k,
        hidden_size=hidden, expert_intermediate_size=inner, calibration_tokens=tokens,
        source_bytes=int(source_bytes), source_bytes_from=source_from, output_bytes=int(output_bytes),
        layer_bytes_max=int(max(layer_bytes)), hidden_states_bytes=int(hidden_bytes), hidden_states_in_memory=in_memory,
        statistics_flops=float(statistics_flops), executed_flops=float(executed),
        work_dir_bytes=int(output_bytes + 2 * hidden_bytes) if config.streaming else 0,
        device=str(run_device), device_bytes_needed=int(device_need), device_memory_bytes=device_total,
        fits_device=None if device_total is None else device_need <= device_total,
        layer_fits_device=None if device_total is None else (layer_need if config.streaming else device_need) <= device_total,
        ram_bytes=ram_total, ram_bytes_needed=int(ram_need), fits_ram=ram_need <= ram_total,
        gpu_memory_bytes=gpu_memory, throughput_tflops=rates.statistics_gflops.value / 1e3, disk_gbps=disk_gbps,
        estimated_seconds=float(seconds), ram_parts={k: int(v) for k, v in ram_parts.items()},
        stage_seconds=stage_seconds, threads=threads, refit_sample_tokens=refit_tokens,
        refit_rows_per_unknown=refit_tokens * top_k / (target * inner), rates={k: asdict(v) for k, v in vars(rates).items()},
        notes=notes,
    )


def _stage_seconds(work: LayerWork, rates: DeviceRates, inner: int, threads: int) -> dict[str, float]:
    """One MoE layer's seconds by stage: its GEMM work at the device's rates (`threads` CPU threads), the
    Hungarian matchings at theirs (one thread)."""
    def at(flops: float, rate: Rate) -> float:
        return flops / (rate.value * 1e9 * threads)

    matching = work.matchings * rates.matching_ns.value * 1e-9 * (inner / 256) ** MATCHING_EXPONENT
    return {"statistics": at(work.statistics_flops, rates.statistics_gflops),
            "merge": at(work.feature_flops + work.alignment_flops, rates.merge_gflops) + matching,
            "refit": at(work.refit_flops, rates.refit_gflops),
            "forward": at(work.forward_flops, rates.forward_gflops)}


def _ram_parts(rates: DeviceRates, config: ReamConfig, *, cuda: bool, layer: int, disk_layer: int, statistics: int,
               embed: int, hidden_states: int, sample: int, written: int, whole_model: int) -> dict[str, int]:
    """The host memory a run holds at its peak, by what holds it. The process itself (torch, transformers and their
    libraries), then: on the CPU the layer being compressed with its statistics' working set and merged experts,
    the embeddings, the hidden states (when held in memory) and the layer's token sample; the previous layer's
    output waiting in the writer's queue; on CUDA the next layer read ahead (pinned) and that queue only."""
    parts = {"process": int(rates.baseline_bytes.value)}
    if cuda:
        parts["layer read ahead"] = disk_layer
    elif not config.streaming:
        parts["model and statistics"] = whole_model
    else:
        # the layer's shard pages stay mapped (resident, file-backed) while it is read: measured, eval/bench_plan.py
        parts.update({"layer": layer, "source pages": disk_layer, "statistics and merge": statistics,
                      "embeddings": embed, "hidden states": hidden_states, "token sample": sample})
    if config.streaming:
        parts["writer queue"] = written
    return parts


def check_fits(plan: JobPlan) -> None:
    """Refuse a job whose largest layer cannot be held on the device with its statistics (before any weight is
    read); a job that fits only without its hidden states on the device runs, with them spilled to files."""
    if plan.layer_fits_device is False:
        gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
        raise ValueError(
            f"a decoder layer of {plan.source} cannot fit {plan.device} ({gb(plan.device_memory_bytes)}): its largest "
            f"layer is {gb(plan.layer_bytes_max)} in {plan.dtype} and needs about "
            f"{gb(plan.device_bytes_needed - (plan.hidden_states_bytes if plan.hidden_states_in_memory else 0))} with "
            f"its statistics; use a device with more memory (see `ream-hf plan`)")

