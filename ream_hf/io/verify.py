"""Our own check of a written checkpoint, run before the output folder is moved into place.

vLLM loads a checkpoint with a missing expert or MTP tensor without a word, so every layer's expert
set, every router's row count and every tensor's shape is checked against the config and, where
the source is known, every other tensor's name and shape against the source. A quantized checkpoint
is checked against its quantization_config first (every scale has its weight and the block grid's shape,
every FP8 weight its scale, every compressed-tensors module exactly its scheme's tensors: so no scale of a removed
expert survives; an output quantized from a plain source names in `modules_to_not_convert` exactly the modules left
unquantized), then by its real tensors' shapes; written in the source's format, every expert is stored as the
source stores that projection (the same tensors, the same dtypes: none written plain, none missing a scale).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from ..arch import MoEFamily, expert_count, expert_shapes, parse_moe_name, text_config_dict
from . import safetensors as st
from .quantization import QuantizedFormat, read_quantization, real_shapes, real_tensor_names
from .source import SourceCheckpoint


class CheckpointError(ValueError):
    pass


STRAY_SUFFIXES = ("_scale_inv", ".weight_packed", ".weight_scale")  # quantized storage, named by no config


def read_shapes(folder: Path, config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Real tensor name -> shape (a quantized tensor's dequantized shape, its scales checked and folded in)."""
    return _read(folder, config)[2]


def _read(folder: Path, config: dict | None, quantized_here: bool = False) -> tuple[
        QuantizedFormat | None, dict[str, st.TensorInfo], dict[str, tuple[int, ...]]]:
    """`quantized_here`: the folder's FP8 tensors were quantized by our writer from a plain source
    (output_dtype "fp8"), so its `modules_to_not_convert` must name exactly the modules it left unquantized."""
    try:
        infos = st.tensor_infos(folder)
        fmt = read_quantization(config or {}, folder)
        if fmt is not None:
            fmt.check(infos)
            if quantized_here:
                fmt.check_not_converted(infos)
        else:
            stray = next((n for n, info in infos.items() if info.dtype.startswith("F8_") or n.endswith(STRAY_SUFFIXES)),
                         None)
            if stray is not None:
                raise ValueError(f"{stray} is {infos[stray].dtype}, but config.json has no quantization_config")
        return fmt, infos, real_shapes(fmt, infos)
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def expert_storage(family: MoEFamily, fmt: QuantizedFormat | None,
                   infos: dict[str, st.TensorInfo]) -> dict[tuple[str, str], dict[int | None, tuple]]:
    """How each expert tensor is stored, by (layer, projection or fused parameter) and expert (None: fused): its
    stored tensors' suffixes after the module name, with their dtypes (plain `weight`; FP8 `weight`,
    `weight_scale_inv`; compressed-tensors' `weight_packed`, `weight_scale`, `weight_shape`, ...)."""
    found: dict[tuple[str, str], dict[int | None, tuple]] = defaultdict(dict)
    for real, stored in real_tensor_names(fmt, infos).items():
        parsed = parse_moe_name(family, real)
        if parsed is None or parsed.kind == "router":
            continue
        module = real.rpartition(".")[0] + "."
        found[parsed.layer_key, parsed.proj or parsed.param][parsed.expert] = tuple(
            (name[len(module):], infos[name].dtype) for name in stored)
    return found


def verify_checkpoint(
    folder: str | Path,
    family: MoEFamily,
    source: SourceCheckpoint | None = None,
    full_width_layers: set[str] = frozenset(),
    dropped_prefixes: tuple[str, ...] = (),
) -> dict[str, int]:
    """Raise CheckpointError on the first inconsistency; return experts per MoE layer.

    `full_width_layers` names layers deliberately left uncompressed (an MTP layer kept with mtp="keep").
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = text_config_dict(config)
    target = expert_count(family, config)
    quantized_here = source is not None and source.quantization is None
    fmt, infos, shapes = _read(folder, config, quantized_here)
    per_expert_shapes, fused_shapes = expert_shapes(family, text)
    hidden = int(text["hidden_size"])

    experts_seen: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    fused_seen: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    routers: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for name, shape in shapes.items():
        parsed = parse_moe_name(family, name)
        if parsed is None:
            continue
        if parsed.kind == "expert":
            expected = per_expert_shapes.get(parsed.proj)
            if expected is not None and shape != expected:
                raise CheckpointError(f"{name} has shape {shape}, expected {expected}")
            experts_seen[parsed.layer_key][parsed.expert].add(parsed.proj)
        elif parsed.kind == "fused":
            fused_seen[parsed.layer_key][parsed.param] = shape
        else:
            routers[parsed.layer_key][parsed.param] = shape

    counts: dict[str, int] = {}
    for layer, by_expert in experts_seen.items():
        want = len(by_expert) if layer in full_width_layers else target
        if sorted(by_expert) != list(range(want)):
            raise CheckpointError(
                f"layer {layer} has experts {sorted(by_expert)[:5]}... ({len(by_expert)}), expected 0..{want - 1}"
            )
        for expert, projs in by_expert.items():
            if projs != set(family.disk_proj_names.values()):
                raise CheckpointError(f"layer {layer} expert {expert} lacks {set(family.disk_proj_names.values()) - projs}")
        counts[layer] = want
    for layer, params in fused_seen.items():
        want = params["down_proj"][0] if layer in full_width_layers else target
        for param, expected in fused_shapes.items():  # in either orientation (Qwen3-VL-MoE's Hub layout transposed)
            if params.get(param) not in ((want, *expected), (want, *expected[::-1])):
                raise CheckpointError(f"layer {layer} {param} has shape {params.get(param)}, expected {(want, *expected)}")
        counts[layer] = want
    for layer, params in routers.items():
        want = counts.get(layer)
        if want is None:
            raise CheckpointError(f"layer {layer} has a router but no expert tensors")
        if params.get("weight") != (want, hidden):
            raise CheckpointError(f"layer {layer} router weight has shape {params.get('weight')}, expected {(want, hidden)}")
        for param, shape in params.items():  # one value per expert, on the family's expert dimension (ERNIE: (1, E))
            dim = family.router_expert_dims.get(param, 0)
            if param != "weight" and (not shape or shape[dim] != want or math.prod(shape) != want):
                raise CheckpointError(f"layer {layer} router {param} has shape {shape}, expected {want} values on "
                                      f"dimension {dim}")
    missing_router = set(counts) - set(routers)
    if missing_router:
        raise CheckpointError(f"layers {sorted(missing_router)} have experts but no router weight")

    if source is not None:
        source_shapes = real_shapes(source.quantization, source.tensor_infos)
        kept_names = [n for n in source_shapes if not (dropped_prefixes and n.startswith(dropped_prefixes))]
        source_layers = {p.layer_key for n in kept_names if (p := parse_moe_name(family, n))}
        lost = source_layers - set(counts)
        if lost:
            raise CheckpointError(f"MoE layers {sorted(lost)} of the source are missing from the output")
        for name in kept_names:
            if parse_moe_name(family, name) is not None:
                continue
            if name not in shapes:
                raise CheckpointError(f"tensor {name} of the source is missing from the output")
            if shapes[name] != source_shapes[name]:
                raise CheckpointError(f"{name} has shape {shapes[name]} in the output, {source_shapes[name]} in "
                                      "the source")
    if source is not None and fmt is not None and not quantized_here:  # in the source's format: experts stored as its
        stored = expert_storage(family, source.quantization, source.tensor_infos)
        for (layer, proj), by_expert in expert_storage(family, fmt, infos).items():
            want = next(iter(stored.get((layer, proj), {}).values()), None)
            for expert, layout in by_expert.items():
                if want is not None and layout != want:
                    where = f"layer {layer} {proj}" + (f" of expert {expert}" if expert is not None else "")
                    raise CheckpointError(f"{where} is stored as {_layout(layout)}, the source's as {_layout(want)}")
    if dropped_prefixes:
        left = [n for n in shapes if n.startswith(dropped_prefixes)]
        if left:
            raise CheckpointError(f"dropped MTP tensor {left[0]} is still in the output")
    return counts


def _layout(layout: tuple) -> str:
    return " + ".join(f"{suffix} ({dtype})" for suffix, dtype in layout)
