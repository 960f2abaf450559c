"""compressed-tensors checkpoints (`quant_method: compressed-tensors`, the format llm-compressor writes and vLLM
loads; Kimi-K2-Thinking, Kimi-K2.5 / K2.6 and RedHatAI's W4A16 / W8A16 / FP8 releases), read and written back through
the `compressed-tensors` package itself: its scheme matching, its compressors (packing, unpacking), its qparams.

A module `M` quantized under a config group's scheme is stored as the tensors its compressor names
(`compression_param_names`): `pack-quantized` (INT1..8 packed into int32) as `M.weight_packed`, `M.weight_scale`,
`M.weight_shape` and, asymmetric, `M.weight_zero_point` (packed along rows); `naive-quantized` / `int-quantized` /
`float-quantized` (int8 or float8 weights as they are) as `M.weight`, `M.weight_scale` and, asymmetric,
`M.weight_zero_point`. Which scheme a module has is decided as compressed-tensors decides it (the first config group
whose targets match its name, exact names before `re:` patterns before class names such as `Linear`, unless `ignore`
matches it); whether it is quantized, by its stored tensors (a `Linear` target also names norms and routers, which are
stored plain).

Read: each quantized weight dequantized as it is read (`dequantize`, in float32: the integer or float8 values times
their scale, exact). Written back in the same format: tensors the method does not change copied bit-exact, new ones
quantized afresh with the module's own scheme (`quantize`: min/max per tensor, channel, group or block as
llm-compressor's `minmax` observer takes them, then compressed-tensors' `calculate_qparams` and compressor).

Refused from config.json alone, with the reason: schemes that need calibration data of their own (static activation
scales: W8A8 / W4A8 static, a KV-cache scheme; a global scale: NVFP4), formats this module does not write
(nvfp4 / mxfp4 / mxfp8 pack, sparse, `dense`), activation-ordered groups (`actorder: group`, a `weight_g_idx`),
checkpoints not in `compressed` status, and sparsity or transform configs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import safetensors as st
from .quantized_format import QuantizedFormat

WRITTEN_FORMATS = ("pack-quantized", "naive-quantized", "int-quantized", "float-quantized")
_REQUANTIZE_WAY_OUT = ("compress the model's unquantized release, or dequantize it first with the compressed-tensors "
                       "package (`convert_checkpoint(SRC, DST, CompressedTensorsDequantizer(SRC))` from "
                       "compressed_tensors.entrypoints.convert), then compress that")
# parameters of a quantized module that are not its weight (the weight itself is `weight` or `weight_packed`)
_PARAMS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "weight_global_scale")


def _value(item: Any) -> Any:
    return getattr(item, "value", item)


def read_compressed_tensors(config: Mapping[str, Any], where: str | Path = "the source") -> CompressedTensorsFormat:
    """The format of a compressed-tensors `quantization_config`, or a one-line ValueError saying why it cannot be
    compressed and written back (before any tensor is read)."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        raise ValueError(f"{where} is quantized with compressed-tensors: install it (`pip install compressed-tensors`)"
                         ) from None
    refuse = lambda reason: ValueError(f"{where} is compressed-tensors {reason}; {_REQUANTIZE_WAY_OUT}")  # noqa: E731
    status = str(config.get("quantization_status") or "compressed").lower()
    if status != "compressed":
        raise refuse(f"in quantization_status {status!r}: only 'compressed' checkpoints store quantized weights")
    for key in ("sparsity_config", "transform_config"):
        if config.get(key):
            raise refuse(f"with a {key}, which ream-hf does not read")
    if config.get("kv_cache_scheme"):
        raise refuse("with a kv_cache_scheme: its static KV-cache scales need calibration data of their own")
    try:
        parsed = QuantizationConfig.model_validate(dict(config))
    except Exception as error:  # pydantic's error is many lines: its first says what is wrong
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{where}: cannot read its compressed-tensors quantization_config ({first})") from None
    for name, scheme in parsed.config_groups.items():
        weights, inputs = scheme.weights, scheme.input_activations
        if weights is None:
            raise refuse(f"config group {name} quantizes no weights")
        if inputs is not None and not inputs.dynamic:
            raise refuse(f"config group {name} has static activation scales ({_describe(scheme)}): they need "
                         "calibration data of their own")
        if scheme.output_activations is not None:
            raise refuse(f"config group {name} quantizes output activations, which need calibration data of their own")
        if "tensor_group" in (_value(weights.strategy), _value(getattr(inputs, "strategy", None))):
            raise refuse(f"config group {name} uses a global scale (tensor_group, NVFP4), which needs calibration "
                         "data of its own")
        if _value(weights.actorder) == "group":
            raise refuse(f"config group {name} orders groups by activation (actorder 'group', weight_g_idx), which "
                         "ream-hf does not write")
        if weights.dynamic:
            raise refuse(f"config group {name} quantizes weights dynamically")
        scheme_format = _group_format(parsed, scheme)
        if scheme_format not in WRITTEN_FORMATS:
            raise refuse(f"format {scheme_format!r} (config group {name}), which ream-hf does not write back (it "
                         f"writes {', '.join(WRITTEN_FORMATS)})")
    folder = Path(where) if isinstance(where, (str, Path)) and Path(where).is_dir() else None
    return CompressedTensorsFormat(dict(config), parsed, folder)


def _describe(scheme: Any) -> str:
    weights, inputs = scheme.weights, scheme.input_activations
    name = f"W{weights.num_bits}"
    if inputs is not None:
        name += f"A{inputs.num_bits}"
    return name


def _group_format(parsed: Any, scheme: Any) -> str:
    """The format a config group is stored in: its own, else the config's, else what compressed-tensors infers for a
    Linear (a `mixed-precision` config names it per group)."""
    found = _value(scheme.format) or _value(parsed.format)
    if found in (None, "mixed-precision"):
        from compressed_tensors.compressors.format import infer_module_format

        found = _value(infer_module_format(torch.nn.Linear, scheme))
    return str(found)


def observed_min_max(weight: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of a 2-D weight per quantization unit (shaped as its scale: (1,) tensor, (rows, 1) channel,
    (rows, groups) group, (block rows, block cols) block), as llm-compressor's `minmax` weight observer takes them
    (`flatten_for_calibration`): blocks zero-padded at the edges, which leaves their extremes."""
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    strategy = _value(args.strategy)
    if strategy == "tensor":
        low, high = torch.aminmax(weight)
        return low.reshape(1), high.reshape(1)
    if strategy == "channel":
        return weight.amin(dim=-1, keepdim=True), weight.amax(dim=-1, keepdim=True)
    if strategy == "group":
        if weight.shape[-1] % args.group_size:
            raise ValueError(f"a weight of {weight.shape[-1]} columns cannot be quantized in groups of "
                             f"{args.group_size}")
        grouped = weight.unflatten(-1, (-1, args.group_size))
        return grouped.amin(dim=-1), grouped.amax(dim=-1)
    if strategy == "block":
        height, width = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(weight, tuple(args.block_structure))
        tiles = padded.reshape(padded.shape[0] // height, height, padded.shape[1] // width, width)
        return tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    raise ValueError(f"weight strategy {strategy!r} cannot be quantized here")


def scale_shape(args: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a (rows, cols) weight's scale under its quantization args (compressed-tensors'
    `initialize_qparams`; calculate_qparams gives a tensor scale the shape (1,))."""
    rows, cols = shape[-2:]
    strategy = _value(args.strategy)
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return rows, 1
    if strategy == "group":
        return rows, -(-cols // args.group_size)
    height, width = args.block_structure
    return -(-rows // height), -(-cols // width)


class CompressedTensorsFormat(QuantizedFormat):
    """A compressed-tensors checkpoint: real tensor `M.weight` <-> the stored tensors of module `M`'s scheme.

    `folder` (the checkpoint's, when it is known) is where the packed weights' `weight_shape` values are read: the
    headers give a packed weight's rows but not its exact columns."""

    quant_method = "compressed-tensors"
    writes_back = True

    def __init__(self, config: dict[str, Any], parsed: Any, folder: Path | None = None) -> None:
        super().__init__(config)
        self.parsed, self.folder = parsed, folder
        # (target, scheme) most specific first, as compressed-tensors' match_targets orders them: exact names, then
        # `re:` patterns, then class names (which a stored tensor's name cannot show: they match every module)
        pairs = [(target, scheme) for scheme in parsed.config_groups.values() for target in scheme.targets]
        self._targets = sorted(pairs, key=lambda pair: ("re:" in pair[0], pair[0]))
        self._schemes: dict[str, Any | None] = {}

    # -- which scheme a module has ------------------------------------------------------------------------------
    def scheme(self, module: str) -> Any | None:
        """The scheme compressed-tensors gives `module` (None where `ignore` matches it or no target does)."""
        if module not in self._schemes:
            self._schemes[module] = self._match(module)
        return self._schemes[module]

    def _match(self, module: str) -> Any | None:
        from compressed_tensors.utils.match import match_name

        if any(match_name(module, pattern) for pattern in self.parsed.ignore or ()):
            return None
        for target, scheme in self._targets:  # exact names and patterns: matched on the name
            if match_name(module, target):
                return scheme
        for target, scheme in self._targets:  # a class name (Linear): any module, quantized or not by its tensors
            if not target.startswith("re:") and target[:1].isupper() and "." not in target:
                return scheme
        return None

    def compressor(self, scheme: Any):
        from compressed_tensors.compressors import BaseCompressor

        return BaseCompressor.get_value_from_registry(_group_format(self.parsed, scheme))

    def param_names(self, scheme: Any) -> tuple[str, ...]:
        return tuple(self.compressor(scheme).compression_param_names(scheme))

    @staticmethod
    def module_of(real: str) -> str | None:
        return real[: -len(".weight")] if real.endswith(".weight") else None

    # -- the QuantizedFormat interface --------------------------------------------------------------------------
    def real_name(self, stored: str) -> str:
        module, _, param = stored.rpartition(".")
        return f"{module}.weight" if param in _PARAMS else stored

    def stored_layout(self, real: str) -> tuple[str, ...]:
        module = self.module_of(real)
        scheme = self.scheme(module) if module is not None else None
        if scheme is None:
            return (real,)
        return tuple(f"{module}.{param}" for param in self.param_names(scheme))

    def dequantize(self, real: str, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The stored values times their scales in float32 (exact), through compressed-tensors' own unpacking and
        `dequantize` with the scheme's args (its compressors infer the strategy from the scale's shape instead,
        which misreads partial edge groups and blocks)."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        module = self.module_of(real)
        scheme = self.scheme(module)
        args = scheme.weights
        local = {name.rpartition(".")[2]: tensor for name, tensor in stored.items()}
        zero_point = local.get("weight_zero_point")
        if "weight_packed" in local:
            shape = tuple(int(v) for v in local["weight_shape"])
            values = unpack_from_int32(local["weight_packed"], args.num_bits, shape)
            if zero_point is not None:
                zero_point = unpack_from_int32(zero_point, args.num_bits, local["weight_scale"].shape, packed_dim=0)
        else:
            values = local["weight"]
        try:
            return dequantize(values, local["weight_scale"].to(torch.float32), zero_point, args, dtype=torch.float32)
        except RuntimeError as error:  # a scale that does not fit its weight
            raise ValueError(f"{real}: cannot dequantize ({error})") from None

    @functools.cached_property
    def _weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """`M.weight_shape` -> its value, for every packed weight of the folder (read once: a few bytes each)."""
        if self.folder is None:
            return {}
        weight_map = st.weight_map(self.folder)
        names = [name for name in weight_map if name.endswith(".weight_shape")]
        return {name: tuple(int(v) for v in tensor) for name, tensor in st.iter_tensors(self.folder, weight_map, names)}

    def real_shape(self, real: str, infos: Mapping[str, st.TensorInfo]) -> tuple[int, ...]:
        module = self.module_of(real)
        if f"{module}.weight_packed" not in infos:
            return infos[real].shape
        shape_name = f"{module}.weight_shape"
        if shape_name not in self._weight_shapes:
            raise ValueError(f"the shape of packed weight {module}.weight_packed is unknown: {shape_name} is not read "
                             "(no checkpoint folder)")
        return self._weight_shapes[shape_name]

    def check(self, infos: Mapping[str, st.TensorInfo]) -> None:
        """Every quantized module has exactly its scheme's tensors (none missing, none orphaned: a scale or zero point
        of a removed expert, a plain weight beside a packed one, a zero point of a symmetric scheme), of the dtypes
        and shapes the scheme implies."""
        modules: dict[str, set[str]] = {}
        for name in infos:
            module, _, param = name.rpartition(".")
            if param in _PARAMS:
                modules.setdefault(module, set()).add(param)
        for module, params in modules.items():
            scheme = self.scheme(module)
            if scheme is None:
                raise ValueError(f"{module} holds {sorted(params)[0]}, but the quantization_config gives it no scheme "
                                 "(ignored or not targeted)")
            names = self.param_names(scheme)
            expected = set(names)
            present = params | ({"weight"} if f"{module}.weight" in infos else set())
            missing, orphan = expected - present, present - expected
            if names[0] not in present:  # a removed expert's scale left behind
                raise ValueError(f"orphan tensor {module}.{sorted(params)[0]}: the weight it belongs to "
                                 f"({module}.{names[0]}) is not in the checkpoint")
            if missing:
                raise ValueError(f"quantized module {module} lacks {module}.{sorted(missing)[0]}")
            if orphan:
                raise ValueError(f"orphan tensor {module}.{sorted(orphan)[0]}: the scheme of {module} "
                                 f"({_group_format(self.parsed, scheme)}, {_describe(scheme)}) has no such tensor")
            self._check_shapes(module, scheme, infos)

    def _check_shapes(self, module: str, scheme: Any, infos: Mapping[str, st.TensorInfo]) -> None:
        args = scheme.weights
        packed = infos.get(f"{module}.weight_packed")
        if packed is not None:
            if packed.dtype != "I32":
                raise ValueError(f"{module}.weight_packed is {packed.dtype}, not int32")
            shape = self.real_shape(f"{module}.weight", infos) if self.folder is not None else None
            if shape is not None and packed.shape != (shape[0], -(-shape[1] // (32 // args.num_bits))):
                raise ValueError(f"{module}.weight_packed has shape {packed.shape}, which does not hold a weight of "
                                 f"shape {shape} at {args.num_bits} bits")
        else:
            weight = infos[f"{module}.weight"]
            want = "F8_E4M3" if _value(args.type) == "float" else "I8"
            if weight.dtype != want:
                raise ValueError(f"quantized weight {module}.weight is {weight.dtype}, expected {want}")
            shape = weight.shape
        if shape is None:
            return
        expected = scale_shape(args, shape)
        found = infos[f"{module}.weight_scale"].shape
        if found != expected:
            raise ValueError(f"{module}.weight_scale has shape {found}, expected {expected} for a weight of shape "
                             f"{shape} ({_value(args.strategy)} strategy)")

    def quantize(self, real: str, tensor: torch.Tensor, like: Mapping[str, st.TensorInfo]) -> dict[str, torch.Tensor]:
        """`real` (a 2-D weight) quantized afresh with its module's scheme; scale and shape tensors in the dtypes the
        source stores them in (`like`: the source's stored infos, looked up under the same names)."""
        from compressed_tensors.quantization.utils import calculate_qparams

        module = self.module_of(real)
        scheme = self.scheme(module)
        weight = tensor.detach().to(torch.float32)
        low, high = observed_min_max(weight, scheme.weights)
        scale, zero_point = calculate_qparams(low, high, scheme.weights)
        scale_dtype = _stored_dtype(like, f"{module}.weight_scale", torch.float32)
        state = {"weight": weight, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zero_point}
        compressed = self.compressor(scheme).compress(state, scheme)
        if "weight_shape" in compressed:
            compressed["weight_shape"] = compressed["weight_shape"].to(
                _stored_dtype(like, f"{module}.weight_shape", torch.int64))
        return {f"{module}.{param}": compressed[param] for param in self.param_names(scheme)}


def expert_stored_bytes(fmt: CompressedTensorsFormat, real: str, shape: tuple[int, int], scale_bytes: int = 2) -> int:
    """The bytes a (rows, cols) weight `real` takes in its module's scheme (the plan's estimate, before any header is
    read): its values at num_bits each, packed into int32 rows where the format packs, plus scales (`scale_bytes`
    each), zero points and the shape tensor."""
    module = fmt.module_of(real)
    scheme = fmt.scheme(module) if module is not None else None
    if scheme is None:
        return shape[0] * shape[1] * scale_bytes
    args, params = scheme.weights, fmt.param_names(scheme)
    scales = math.prod(scale_shape(args, shape))
    if "weight_packed" in params:
        per_int = 32 // args.num_bits
        values = 4 * shape[0] * -(-shape[1] // per_int)
        zero_points = 4 * -(-scales // per_int) if "weight_zero_point" in params else 0
        return values + scales * scale_bytes + zero_points + 16
    return shape[0] * shape[1] * args.num_bits // 8 + scales * (scale_bytes + ("weight_zero_point" in params))


def _stored_dtype(infos: Mapping[str, st.TensorInfo], name: str, default: torch.dtype) -> torch.dtype:
    return infos[name].torch_dtype if name in infos else default
