"""Quantized source checkpoints, decided at the boundary: which format config.json's `quantization_config`
names, how the tensors stored on disk map to the real-valued tensors the method works on, and back.

- FP8 block-wise (`quant_method: fp8` with `weight_block_size`; DeepSeek-V3, Kimi-K2, GLM-4.5-FP8, Qwen3-*-FP8):
  a float8_e4m3fn `X.weight` and a `X.weight_scale_inv` holding one scale per (block_m x block_n) block, shape
  (ceil(rows / block_m), ceil(cols / block_n)) with partial edge blocks; real value = weight x its block's scale.
  Tensors without a scale (routers, norms, embeddings, `modules_to_not_convert`) are stored as they are. Read
  dequantized; written back in the same format (tensors not changed copied bit-exact with their own scales, new
  ones quantized with fresh block scales exactly as transformers' `Fp8Quantize` does) or dequantized.
- MXFP4 (`quant_method: mxfp4`, the official GPT-OSS checkpoints): `X_blocks` (two e2m1 values a byte) and
  `X_scales` (one e8m0 exponent per 32 values), read through transformers' own conversion. Written dequantized:
  re-quantizing merged experts to MXFP4 needs OpenAI's triton kernels (GPU only), which nothing here can check.
- compressed-tensors (`quant_method: compressed-tensors`: Kimi-K2-Thinking / K2.5 / K2.6 INT4, W4A16 / W8A16 / FP8
  releases): its own module, io/compressed_tensors.py, through the package itself; read dequantized, written back in
  the same format; schemes that need calibration data of their own refused there.
- Every other format is refused from config.json alone, before any tensor is read, with the way out.

Reading goes through `SourceCheckpoint.iter_real_tensors`; writing through `ream_hf.io.writer.output_tensors`. This
module imports neither: formats are what they use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import safetensors as st
from .compressed_tensors import read_compressed_tensors
from .quantized_format import QuantizedFormat

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP8_OUTPUT = "fp8"  # output_dtype: write FP8 block-wise (`Fp8BlockOutput`), whatever the source's dtype

_REQUANTIZE_WAY_OUT = ("compress the model's unquantized (bf16) release instead, then quantize the compressed "
                       "checkpoint with the same tool")


# -- FP8 block-wise ---------------------------------------------------------------------------------------
def _expected_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight x its block's scale, in float32. Edge blocks may be partial (DeepSeek-V3's kv_a_proj_with_mqa has 576
    rows in 5 blocks of 128): the scale grid is expanded block-wise and cut to the weight's shape, never derived
    from the shape (transformers' Fp8Dequantize divides the shape by the grid, which is wrong for partial blocks)."""
    if weight.dim() < 2:
        raise ValueError(f"an FP8 block-quantized weight must have 2 or more dims, got shape {tuple(weight.shape)}")
    expected = _expected_scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale of shape {tuple(scale_inv.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)} in blocks of {tuple(block)}: expected {expected}")
    rows, cols = weight.shape[-2:]
    scale = scale_inv.to(torch.float32).repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.to(torch.float32) * scale


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int],
                        scale_fmt: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 weight_scale_inv) with transformers' `Fp8Quantize` rounding: per block,
    scale = 448 / amax (1 for an all-zero block), weight x scale clamped to +-448 and cast, scale_inv = 1 / scale
    (rounded up to a power of two for `scale_fmt: ue8m0`). Partial edge blocks are zero-padded, which leaves
    their amax unchanged."""
    bm, bn = block
    rows, cols = weight.shape[-2:]
    lead = weight.shape[:-2]
    padded = F.pad(weight.to(torch.float32), (0, -cols % bn, 0, -rows % bm))
    tiles = padded.reshape(*lead, padded.shape[-2] // bm, bm, padded.shape[-1] // bn, bn)
    max_abs = tiles.abs().amax(dim=(-3, -1))
    scales = FP8_MAX / torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = torch.where(max_abs > 0, scales, torch.ones_like(scales))
    inv_scales = (1.0 / scales).to(torch.float32)
    if scale_fmt == "ue8m0":
        inv_scales = torch.pow(2.0, torch.ceil(torch.log2(inv_scales.clamp(min=torch.finfo(torch.float32).tiny))))
        scales = 1.0 / inv_scales
    quantized = torch.clamp(tiles * scales.unsqueeze(-1).unsqueeze(-3), min=-FP8_MAX, max=FP8_MAX).to(FP8_DTYPE)
    quantized = quantized.reshape(padded.shape)[..., :rows, :cols].contiguous()
    return quantized, inv_scales


class Fp8BlockFormat(QuantizedFormat):
    quant_method = "fp8"
    writes_back = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.block = (int(config["weight_block_size"][0]), int(config["weight_block_size"][1]))
        self.scale_fmt = config.get("scale_fmt") or "float"

    @staticmethod
    def scale_name(real: str) -> str:
        """`X.weight` -> `X.weight_scale_inv`; a fused `experts.gate_up_proj` -> `experts.gate_up_proj_scale_inv`
        (transformers' naming)."""
        return real[: -len(".weight")] + ".weight_scale_inv" if real.endswith(".weight") else real + "_scale_inv"

    def real_name(self, stored: str) -> str:
        return stored[: -len("_scale_inv")] if stored.endswith("_scale_inv") else stored

    def stored_layout(self, real: str) -> tuple[str, ...]:
        return real, self.scale_name(real)

    def dequantize(self, real: str, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
        try:
            return dequantize_fp8_blocks(stored[real], stored[self.scale_name(real)], self.block)
        except ValueError as error:
            raise ValueError(f"{real}: {error}") from None

    def real_shape(self, real: str, infos: Mapping[str, st.TensorInfo]) -> tuple[int, ...]:
        return infos[real].shape

    def quantize(self, real: str, tensor: torch.Tensor, like: Mapping[str, st.TensorInfo]) -> dict[str, torch.Tensor]:
        """`real` quantized afresh; the scale in the dtype the source stores its scales in (`like`: that tensor's
        stored infos)."""
        quantized, inv_scales = quantize_fp8_blocks(tensor, self.block, self.scale_fmt)
        scale_dtype = like[self.scale_name(real)].torch_dtype if self.scale_name(real) in like else torch.float32
        return {real: quantized, self.scale_name(real): inv_scales.to(scale_dtype)}

    def check(self, infos: Mapping[str, st.TensorInfo]) -> None:
        for name, info in infos.items():
            if name.endswith("_scale_inv"):
                weight = self.real_name(name)
                if weight not in infos:
                    raise ValueError(f"orphan scale {name}: its weight {weight} is not in the checkpoint")
                if infos[weight].dtype != "F8_E4M3":
                    raise ValueError(f"scale {name} belongs to {weight}, which is {infos[weight].dtype}, not FP8")
                expected = _expected_scale_shape(infos[weight].shape, self.block)
                if info.shape != expected:
                    raise ValueError(f"scale {name} has shape {info.shape}, expected {expected} for {weight} of shape "
                                     f"{infos[weight].shape} in blocks of {list(self.block)}")
            elif info.dtype == "F8_E4M3" and self.scale_name(name) not in infos:
                raise ValueError(f"FP8 weight {name} has no scale {self.scale_name(name)}")

    def check_not_converted(self, infos: Mapping[str, st.TensorInfo]) -> None:
        """Raise ValueError unless `modules_to_not_convert` names exactly the modules whose weight (2 or more dims)
        is not FP8: vLLM matches the list by exact name, building an FP8 layer for every module it does not name. For
        the outputs we quantize (`Fp8BlockOutput`); published checkpoints may rely on layers vLLM never quantizes."""
        listed = set(self.config.get("modules_to_not_convert") or ())
        for name, info in infos.items():
            if not name.endswith(".weight") or len(info.shape) < 2:
                continue
            module = name[: -len(".weight")]
            if info.dtype == "F8_E4M3" and module in listed:
                raise ValueError(f"{name} is FP8 but modules_to_not_convert names {module}")
            if info.dtype != "F8_E4M3" and module not in listed:
                raise ValueError(f"{name} is {info.dtype}, not FP8, and modules_to_not_convert does not name {module}: "
                                 "vLLM would build an FP8 layer for it")


class Fp8BlockOutput:
    """A plain source's output written FP8 block-wise (output_dtype "fp8"), as DeepSeek-V3 and Qwen3-*-FP8 publish:
    every linear weight of the decoder layers (trunk and MTP: attention, dense and shared MLPs, experts) as
    float8_e4m3fn with a float32 `weight_scale_inv` per 128 x 128 block, quantized as transformers does
    (`quantize_fp8_blocks`); embeddings, `lm_head`, norms, routers, routing-bias corrections, the shared-expert gate,
    MTP heads and anything outside the decoder layers (a vision tower) as they are. Sources that store experts fused
    (GPT-OSS, the Qwen3.5 releases) are refused.

    `quantization_config` names every module whose weight stays unquantized in `modules_to_not_convert`, exactly:
    vLLM matches that list by exact module name and would otherwise build an FP8 layer for it, and transformers skips
    the listed modules when it loads. The weights are quantized as the writer emits them, so the output costs no
    extra pass over the source."""

    BLOCK = (128, 128)
    # 2-D weights inside decoder layers that published FP8 checkpoints keep unquantized and vLLM builds without
    # quantization: the shared-expert gate (one row), MTP heads (eh_proj, shared_head.head, the MTP copy of the
    # embedding); matched by the module's own name
    KEPT_MODULES = ("shared_expert_gate", "eh_proj", "head", "embed_tokens")

    def __init__(self, family: Any, names: Iterable[str], where: str | Path = "the source") -> None:
        from ..arch import parse_moe_name

        self.family, self._parse = family, parse_moe_name
        parsed = [p for name in names if (p := parse_moe_name(family, name)) is not None]
        if any(p.kind == "fused" for p in parsed):
            raise ValueError(f"output_dtype='fp8' writes experts stored one tensor per expert; {where} stores them fused "
                             f"({family.name}), and transformers 5 loads fused FP8 experts without their scales "
                             "(measured: it reports the *_scale_inv tensors as unexpected); use output_dtype='bfloat16'")
        self.layer_prefixes = tuple(sorted({p.prefix for p in parsed}))  # "model.layers.", "mtp.layers.", ...
        self.format = Fp8BlockFormat({"weight_block_size": list(self.BLOCK)})

    def quantizes(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether the tensor `name` of this shape is written FP8 (the class doc says which are)."""
        if not name.startswith(self.layer_prefixes):
            return False
        if len(shape) != 2 or not name.endswith(".weight"):
            return False
        if name[: -len(".weight")].rsplit(".", 1)[-1] in self.KEPT_MODULES:
            return False
        parsed = self._parse(self.family, name)
        return parsed is None or parsed.kind == "expert"

    def encode(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The output's tensors with each one `quantizes` names replaced by its FP8 weight and scale."""
        for name, tensor in items:
            if self.quantizes(name, tuple(tensor.shape)):
                yield from self.format.quantize(name, tensor, {}).items()
            else:
                yield name, tensor

    def quantization_config(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """config.json's `quantization_config` for an output with these tensors (name -> shape, as written before
        quantizing): every weight of 2 or more dims left unquantized named in `modules_to_not_convert`."""
        kept = {name[: -len(".weight")] for name, shape in shapes.items()
                if name.endswith(".weight") and len(shape) >= 2 and not self.quantizes(name, shape)}
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": list(self.BLOCK), "modules_to_not_convert": sorted(kept | {"lm_head"})}

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes a quantized weight of this shape takes: one a value, a float32 scale a block."""
        return math.prod(shape) + 4 * math.prod(_expected_scale_shape(shape, self.BLOCK))


# -- MXFP4 (GPT-OSS) --------------------------------------------------------------------------------------
class Mxfp4Format(QuantizedFormat):
    quant_method = "mxfp4"
    writes_back = False
    _SUFFIXES = ("_blocks", "_scales")

    def real_name(self, stored: str) -> str:
        for suffix in self._SUFFIXES:
            if stored.endswith(suffix):
                return stored[: -len(suffix)]
        return stored

    def stored_layout(self, real: str) -> tuple[str, ...]:
        return tuple(real + suffix for suffix in self._SUFFIXES)

    def dequantize(self, real: str, stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        blocks, scales = (stored[name] for name in self.stored_layout(real))
        if blocks.dim() != 4 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
            raise ValueError(f"{real}: MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not "
                             "pair as (experts, rows, groups, 16) and (experts, rows, groups)")
        return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)

    def real_shape(self, real: str, infos: Mapping[str, st.TensorInfo]) -> tuple[int, ...]:
        experts, rows, groups, width = infos[real + "_blocks"].shape  # transformers' conversion transposes rows last
        return experts, groups * width * 2, rows

    def check(self, infos: Mapping[str, st.TensorInfo]) -> None:
        for name in infos:
            real = self.real_name(name)
            if real != name:
                blocks, scales = self.stored_layout(real)
                if blocks not in infos or scales not in infos:
                    raise ValueError(f"MXFP4 tensor {name} has no partner ({blocks} / {scales})")
                if infos[blocks].shape[:-1] != infos[scales].shape:
                    raise ValueError(f"MXFP4 blocks {blocks} {infos[blocks].shape} and scales {infos[scales].shape} "
                                     "do not pair")


# -- the boundary -----------------------------------------------------------------------------------------
def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's `quantization_config` (top level, or in a VLM's `text_config`), or None."""
    found = config.get("quantization_config")
    if found is None and isinstance(config.get("text_config"), dict):
        found = config["text_config"].get("quantization_config")
    return found


# config.json's `fmt` for FP8 E4M3 weights: DeepSeek-V3 and Qwen3-*-FP8 write "e4m3", MiniMax-M2 / M2.5 the torch
# dtype's name; transformers and vLLM read neither (the stored dtype decides)
FP8_E4M3_FMTS = ("e4m3", "float8_e4m3fn")


def read_quantization(config: dict[str, Any], where: str | Path = "the source") -> QuantizedFormat | None:
    """The format of a source checkpoint from its config.json alone (no tensor is read), None for a plain one;
    a one-line ValueError naming the format and the way out for every format that is not supported."""
    found = quantization_config(config)
    if found is None:
        return None
    if not isinstance(found, dict) or not found.get("quant_method"):
        raise ValueError(f"{where}/config.json has a quantization_config without quant_method; cannot tell its format")
    method = str(found["quant_method"]).lower()
    if method == "fp8":
        block = found.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"{where}: FP8 without weight_block_size (per-tensor FP8) is not supported; only the "
                             "block-wise format (weight_block_size [128, 128]) is; " + _REQUANTIZE_WAY_OUT)
        if str(found.get("activation_scheme", "dynamic")).lower() != "dynamic":
            raise ValueError(f"{where}: FP8 with activation_scheme {found.get('activation_scheme')!r} (static input "
                             "scales) is not supported, only 'dynamic'; " + _REQUANTIZE_WAY_OUT)
        if found.get("fmt", "e4m3") not in FP8_E4M3_FMTS:
            raise ValueError(f"{where}: FP8 fmt {found.get('fmt')!r} is not supported, only E4M3 "
                             f"({', '.join(map(repr, FP8_E4M3_FMTS))})")
        if (found.get("scale_fmt") or "float") not in ("float", "ue8m0"):
            raise ValueError(f"{where}: FP8 scale_fmt {found.get('scale_fmt')!r} is not supported ('float', 'ue8m0')")
        return Fp8BlockFormat(found)
    if method == "mxfp4":
        return Mxfp4Format(found)
    if method == "compressed-tensors":  # its own module: the package's schemes and compressors
        return read_compressed_tensors(found, where)
    names = {"awq": "AWQ", "gptq": "GPTQ", "bitsandbytes": "bitsandbytes"}
    raise ValueError(f"{where} is quantized with {names.get(method, method)} (quant_method {method!r}), which "
                     "ream-hf does not read (supported: fp8 block-wise, mxfp4, compressed-tensors); "
                     + _REQUANTIZE_WAY_OUT)


def output_dtype(name: str) -> torch.dtype:
    if name not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}; got {name!r}")
    return OUTPUT_DTYPES[name]


def plan_output(fmt: QuantizedFormat | None, requested: str | None, streaming: bool,
                where: str | Path = "the source") -> str | None:
    """The dtype a compressed quantized source is written dequantized in, or None for the source's own format (and
    for a plain source, which `output_dtype` "fp8" has written FP8 block-wise: `Fp8BlockOutput`). Refuses, before any
    work, what cannot be done: a dtype for a plain source, "fp8" for a source quantized otherwise, and the in-memory
    path for a quantized source or output (transformers would load it quantized, or dequantize partial blocks
    wrongly; the FP8 output is encoded by our writer)."""
    if requested == FP8_OUTPUT:
        if fmt is not None and fmt.quant_method != "fp8":
            raise ValueError(f"output_dtype='fp8' needs a plain or FP8 source; {where} is {fmt.quant_method}-quantized: "
                             "write it as bfloat16 (output_dtype='bfloat16'), then quantize that")
        if not streaming:
            raise ValueError("output_dtype='fp8' is written from a source folder or Hub id by the streaming writer, "
                             "which quantizes as it writes: pass the folder, without streaming=False (--no-streaming)")
        return None
    if fmt is None:
        if requested is not None:
            raise ValueError(f"output_dtype={requested!r} is for quantized sources and {where} is not quantized; "
                             "use dtype to choose the dtype")
        return None
    if not streaming:
        raise ValueError(f"{where} is {fmt.quant_method}-quantized: it is read by the streaming loader, which "
                         "dequantizes as it reads; drop streaming=False (--no-streaming)")
    if requested is None and not fmt.writes_back:
        logger.info("%s: %s cannot be written back faithfully; writing bfloat16", where, fmt.quant_method)
        return "bfloat16"
    return requested


def check_loaded_model(model_config: Any) -> None:
    """Refuse an in-memory model that transformers loaded quantized: its expert parameters are not real values.
    (Our own ReamConfig, which transformers' entry point attaches while it compresses, is not a quantization.)"""
    found = getattr(model_config, "quantization_config", None)
    method = found.get("quant_method") if isinstance(found, dict) else getattr(found, "quant_method", None)
    if found is not None and str(getattr(method, "value", method)) != "ream":
        raise ValueError("the model was loaded quantized; pass its checkpoint folder or Hub id instead (ream-hf "
                         "dequantizes supported formats as it reads them)")


def dequantized_config(config: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    """A config.json dict for the dequantized checkpoint: no quantization_config, the dtype recorded."""
    edited = dict(config)
    edited.pop("quantization_config", None)
    if isinstance(edited.get("text_config"), dict):
        text = dict(edited["text_config"])
        text.pop("quantization_config", None)
        edited["text_config"] = text
    keys = [k for k in ("dtype", "torch_dtype") if k in edited] or ["dtype"]
    for key in keys:
        edited[key] = dtype_name
    return edited


def real_tensor_names(fmt: QuantizedFormat | None, names: Container[str] | Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Real tensor name -> its stored names (itself alone when plain), for a checkpoint's stored `names`."""
    if fmt is None:
        return {name: (name,) for name in names}
    real: dict[str, tuple[str, ...]] = {}
    for name in names:
        owner = fmt.real_name(name)
        if owner not in real:
            real[owner] = fmt.stored_layout(owner) if fmt.is_quantized(owner, names) else (owner,)
    return real


def real_shapes(fmt: QuantizedFormat | None, infos: Mapping[str, st.TensorInfo]) -> dict[str, tuple[int, ...]]:
    """Real tensor name -> the shape its dequantized value has."""
    return {real: (fmt.real_shape(real, infos) if len(stored) > 1 else infos[real].shape)
            for real, stored in real_tensor_names(fmt, infos).items()}

