"""Multi-token-prediction (MTP) layers: found in the source's index, built and fed as vLLM runs them.

transformers drops MTP weights on load (TRANSFORMERS.md), so this module reads them from the source's
safetensors itself. Two on-disk styles (`MoEFamily.mtp_style`):

- "layers" (DeepSeek-V3 / Kimi-K2, GLM-4.5): MTP layer i is `model.layers.{N+i}.*` with N = num_hidden_layers:
  `enorm`, `hnorm`, `eh_proj`, `shared_head.{norm,head}`, `embed_tokens`, and the decoder layer's own tensors
  (`self_attn.*`, `mlp.*`, `input_layernorm`, `post_attention_layernorm`) right under that prefix.
- "mtp" (Qwen3-Next, Qwen3.5-MoE): `mtp.fc`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.norm`
  shared by the layers `mtp.layers.{i}.*` (full-attention decoder layers).

The block math is vLLM's (deepseek_mtp.py, glm4_moe_mtp.py, qwen3_next_mtp.py, qwen3_5_mtp.py). At position t:

    x_t = proj(concat(norm_e(embed(token_{t+1})), norm_h(h_t)))      proj = eh_proj / fc
    y_t = decoder_layer(x_t)       (full attention, the family's MoE block with its shared expert)
    logits_t = head(norm(y_t))     (predicts token t+2; not needed for compression)

with h_t the target model's output hidden state *after* its final norm (vLLM hands the drafter what the
model's forward returns, and every one of these models returns `norm(hidden, residual)`), the norms the
family's own RMSNorm ((1 + w) scaling for Qwen3-Next/3.5), and, for DeepSeek/GLM, the embedding zeroed at
position 0. The decoder layer is an instance of the family's own transformers decoder-layer class, so
`ream_hf.arch.moe_block / router / experts` apply to it and it is compressed exactly like a trunk layer.

A position t takes part in the statistics only if token t+1 exists (the last real token of each row has no
next token; padding never counts). A second MTP layer (none of the released models has one) is fed the first
one's normed output and the token two places ahead, as vLLM's chained drafting does for DeepSeek/Qwen.
"""

from __future__ import annotations

from collections.abc import Iterable

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .arch import MoEFamily, decoder_layers, text_config_dict
from .calibration import CalibrationBatch
from .checkpoint import SourceCheckpoint, parse_moe_name
from .layers import LayerCall, run_layer


@dataclass(frozen=True)
class MTPStyle:
    """Names of the MTP block's own tensors (relative to `MTPLayerSpec.prefix`) for one on-disk style."""

    proj: str  # Linear(2H -> H) over concat(embedding part, hidden part)
    embed_norm: str
    hidden_norm: str
    final_norm: str
    not_layer: tuple[str, ...]  # sub-names under the layer prefix that are not the decoder layer's (never read:
    #                             shared_head.head and embed_tokens are vocabulary-sized copies of the trunk's)
    mask_first_position: bool  # vLLM zeroes the embedding at position 0


STYLES: dict[str, MTPStyle] = {
    "layers": MTPStyle("eh_proj", "enorm", "hnorm", "shared_head.norm",
                       not_layer=("eh_proj.", "enorm.", "hnorm.", "shared_head.", "embed_tokens."),
                       mask_first_position=True),
    "mtp": MTPStyle("fc", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm", not_layer=(),
                    mask_first_position=False),
}


@dataclass(frozen=True)
class MTPLayerSpec:
    """Where one MTP layer lives in the source checkpoint."""

    depth: int  # 0 for the first MTP layer
    prefix: str  # its block tensors (proj, norms): "model.layers.61." or "mtp."
    layer_prefix: str  # its decoder layer's tensors: "model.layers.61." or "mtp.layers.0."

    @property
    def layer_key(self) -> str:
        """The layer key `parse_moe_name` gives this layer's expert and router tensors."""
        return self.layer_prefix[:-1]


def mtp_prefix(name: str, num_hidden_layers: int) -> str | None:
    """The MTP layer a tensor belongs to, as a name prefix, or None for a trunk tensor. The one rule for
    every reader: a module named `mtp` near the top (Qwen3-Next/Qwen3.5, also under a VLM's prefix), or a
    decoder layer numbered at or past `num_hidden_layers` (DeepSeek-V3/Kimi-K2/GLM-4.5 next-n layers)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "mtp" and i <= 2:
            return ".".join(parts[: i + 1]) + "."
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2]) + "." if int(parts[i + 1]) >= num_hidden_layers else None
    return None


def mtp_tensor_names(names: Iterable[str], num_hidden_layers: int) -> list[str]:
    return [name for name in names if mtp_prefix(name, num_hidden_layers) is not None]


def mtp_prefixes(family: MoEFamily, source: SourceCheckpoint) -> tuple[str, ...]:
    """Name prefixes of the source's multi-token-prediction layers (dropped by transformers on load)."""
    if family.mtp_style is None:
        return ()
    first_mtp = int(text_config_dict(source.config)["num_hidden_layers"])
    return tuple(sorted({p for name in source.weight_map if (p := mtp_prefix(name, first_mtp)) is not None}))


def mtp_layer_specs(family: MoEFamily, source: SourceCheckpoint) -> list[MTPLayerSpec]:
    """The source's MTP layers in depth order (empty when it has none)."""
    prefixes = mtp_prefixes(family, source)
    if not prefixes:
        return []
    if family.mtp_style == "mtp":
        numbers = sorted({int(parts[2]) for n in source.weight_map
                          if n.startswith("mtp.layers.") and (parts := n.split("."))[2].isdigit()})
        return [MTPLayerSpec(depth, "mtp.", f"mtp.layers.{number}.") for depth, number in enumerate(numbers)]
    ordered = sorted(prefixes, key=lambda p: int(p.rstrip(".").rsplit(".", 1)[1]))
    return [MTPLayerSpec(depth, prefix, prefix) for depth, prefix in enumerate(ordered)]


def check_mtp_layers(family: MoEFamily, source: SourceCheckpoint) -> list[MTPLayerSpec]:
    """Refuse, before any work, MTP layers whose block tensors are missing or that have no router for experts."""
    specs = mtp_layer_specs(family, source)
    style = STYLES.get(family.mtp_style or "")
    if specs and style is None:
        raise ValueError(f"{family.name}: no MTP layout known for style {family.mtp_style!r}")
    names = source.weight_map
    for spec in specs:
        required = [f"{spec.prefix}{part}.weight" for part in (style.proj, style.embed_norm, style.hidden_norm)]
        missing = [n for n in required if n not in names]
        if missing:
            raise ValueError(
                f"MTP layer {spec.layer_key} of {source.folder} lacks {missing[0]}: the checkpoint is incomplete; "
                "pass mtp='drop' (removed, config fixed) or mtp='keep' (copied as is)"
            )
        kinds = {p.kind for n in names if n.startswith(spec.layer_prefix) and (p := parse_moe_name(family, n))}
        if kinds and "router" not in kinds:
            raise ValueError(f"MTP layer {spec.layer_key} of {source.folder} has expert tensors but no router weight")
        if kinds == {"router"}:
            raise ValueError(f"MTP layer {spec.layer_key} of {source.folder} has a router but no expert tensors")
    return specs


class MTPBlock(nn.Module):
    """One MTP layer as vLLM runs it: proj(concat(norm_e(e), norm_h(h))) -> decoder layer -> norm."""

    def __init__(self, style: MTPStyle, embed_norm: nn.Module, hidden_norm: nn.Module, proj: nn.Linear,
                 layer: nn.Module, norm: nn.Module | None) -> None:
        super().__init__()
        self.style = style
        self.embed_norm, self.hidden_norm, self.proj, self.layer, self.norm = embed_norm, hidden_norm, proj, layer, norm

    def layer_input(self, next_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder layer's input from the next tokens' embeddings and the (final-normed) hidden states,
        both (B, S, H), right-padded so column 0 is position 0."""
        if self.style.mask_first_position:
            next_embeds = next_embeds.clone()
            next_embeds[:, 0] = 0
        return self.proj(torch.cat([self.embed_norm(next_embeds), self.hidden_norm(hidden)], dim=-1))


def _text_model(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers, the final norm and the embeddings (the text tower of a VLM)."""
    base = getattr(model, "model", model)
    if not hasattr(base, "layers") and hasattr(base, "language_model"):
        base = base.language_model
    return base


def final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(_text_model(model), "norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__}")
    return norm


def mtp_call_layer(model: nn.Module) -> int:
    """Index of the trunk layer whose call arguments an MTP layer takes: the last full-attention layer
    (hybrid Qwen3-Next/3.5 models alternate linear and full attention; MTP layers are full attention)."""
    text = model.config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    count = len(decoder_layers(model))
    if layer_types:
        full = [i for i, kind in enumerate(layer_types[:count]) if kind == "full_attention"]
        if not full:
            raise ValueError("the model has no full-attention layer to take the MTP layer's attention arguments from")
        return full[-1]
    return count - 1


def _read_tensors(source: SourceCheckpoint, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: tensor.to(dtype) for name, tensor in source.iter_tensors(names)}


def _read_layer_state(family: MoEFamily, source: SourceCheckpoint, names: list[str], layer_prefix: str,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The decoder layer's state dict (in-memory names, experts fused as in memory) from its on-disk tensors.

    Per-expert tensors are copied straight into the fused buffers, so the layer is held once (no stack, no cat)."""
    state: dict[str, torch.Tensor] = {}
    experts_key = f"{family.block_attr}.{family.experts_attr}."
    parsed = {name: parse_moe_name(family, name) for name in names}
    per_expert = [n for n, p in parsed.items() if p is not None and p.kind == "expert"]
    count = 1 + max((parsed[n].expert for n in per_expert), default=-1)
    role_of = {proj: role for role, proj in family.disk_proj_names.items()}
    if per_expert and family.expert_layout != "gate_up":
        raise ValueError(f"MTP layer {layer_prefix[:-1]}: per-expert tensors of the {family.expert_layout!r} layout "
                         "are not supported")
    filled: set[tuple[int, str]] = set()
    for name, tensor in source.iter_tensors(names):
        p = parsed[name]
        if p is not None and p.kind == "expert":
            role = role_of[p.proj]
            rows = tensor.shape[0]
            if role == "down":
                buffer = state.setdefault(experts_key + "down_proj", torch.empty(count, *tensor.shape, dtype=dtype))
                buffer[p.expert].copy_(tensor)
            else:  # gate rows first, then up rows: (E, 2D, H)
                buffer = state.setdefault(experts_key + "gate_up_proj",
                                          torch.empty(count, 2 * rows, tensor.shape[1], dtype=dtype))
                offset = 0 if role == "gate" else rows
                buffer[p.expert, offset:offset + rows].copy_(tensor)
            filled.add((p.expert, role))
        elif p is not None and p.kind == "fused":
            state[experts_key + p.param] = tensor.to(dtype)
        else:
            state[name[len(layer_prefix):]] = tensor.to(dtype)
    missing = {(e, r) for e in range(count) for r in ("gate", "up", "down")} - filled
    if missing:
        expert, role = min(missing)
        raise ValueError(f"MTP layer {layer_prefix[:-1]} lacks the {role} projection of expert {expert}")
    return state


def _norm_like(model: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A norm of the family's own RMSNorm class (as the trunk's final norm), holding `weight`."""
    template = final_norm(model)
    eps = getattr(template, "variance_epsilon", getattr(template, "eps", None))
    with torch.device("meta"):
        norm = type(template)(weight.shape[0], eps=eps)
    norm.load_state_dict({"weight": weight}, assign=True)
    return norm


def build_mtp_block(model: nn.Module, family: MoEFamily, source: SourceCheckpoint, spec: MTPLayerSpec,
                    device: torch.device | str | None = None) -> MTPBlock:
    """Materialise one MTP layer from the source's safetensors (only its tensors are read), in the model's dtype.

    The decoder layer is the family's own transformers class: for "layers"-style families built with the
    layer index vLLM uses (N + depth, so `first_k_dense_replace` makes it MoE exactly when vLLM does); for
    Qwen3-Next/3.5 with index `depth` and a full-attention layer type, as vLLM builds `mtp.layers.{depth}`.
    """
    style = STYLES[family.mtp_style]
    embeddings = model.get_input_embeddings()
    dtype = embeddings.weight.dtype
    device = torch.device(device) if device is not None else embeddings.weight.device
    text = model.config.get_text_config()

    block_names = {part: f"{spec.prefix}{part}.weight"
                   for part in (style.proj, style.embed_norm, style.hidden_norm, style.final_norm)}
    if spec.prefix == spec.layer_prefix:
        layer_names = [n for n in source.weight_map if n.startswith(spec.layer_prefix)
                       and not n[len(spec.layer_prefix):].startswith(style.not_layer)]
    else:
        layer_names = [n for n in source.weight_map if n.startswith(spec.layer_prefix)]
    tensors = _read_tensors(source, [n for n in block_names.values() if n in source.weight_map], dtype)

    trunk_layer = decoder_layers(model)[0]
    if family.mtp_style == "mtp":
        config = copy.deepcopy(text)
        config.layer_types = ["full_attention"] * max(int(text.num_hidden_layers), spec.depth + 1)
        layer_index = spec.depth
    else:
        config, layer_index = text, int(text.num_hidden_layers) + spec.depth
    with torch.device("meta"):
        layer = type(trunk_layer)(config, layer_index)
    state = _read_layer_state(family, source, layer_names, spec.layer_prefix, dtype)
    try:
        layer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"MTP layer {spec.layer_key} does not match {type(layer).__name__}: {error}") from None
    meta = [n for n, t in (*layer.named_parameters(), *layer.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"MTP layer {spec.layer_key}: {meta[0]} is neither in the checkpoint nor computable")

    hidden = int(text.hidden_size)
    with torch.device("meta"):
        proj = nn.Linear(2 * hidden, hidden, bias=False)
    proj.load_state_dict({"weight": tensors[block_names[style.proj]]}, assign=True)
    norm_name = block_names[style.final_norm]
    block = MTPBlock(
        style,
        _norm_like(model, tensors[block_names[style.embed_norm]]),
        _norm_like(model, tensors[block_names[style.hidden_norm]]),
        proj,
        layer,
        _norm_like(model, tensors[norm_name]) if norm_name in tensors else None,
    )
    return block.to(device).eval().requires_grad_(False)


@dataclass
class MTPCalibration:
    """One MTP layer, ready for statistics: everything `ReamCompressor._layer_statistics` takes."""

    key: str  # on-disk layer key, as parse_moe_name gives it ("model.layers.61", "mtp.layers.0")
    index: int  # its place after the trunk: num_hidden_layers + depth (vLLM's layer index)
    layer: nn.Module  # the family's decoder layer
    block: MTPBlock
    hidden: list[torch.Tensor]  # the decoder layer's input per batch
    calls: list[LayerCall]  # its call arguments per batch (a full-attention trunk layer's)
    batches: list[CalibrationBatch]  # per batch: the next tokens, and as mask the positions that have one

    @property
    def num_tokens(self) -> int:
        return int(sum(int(b.attention_mask.sum()) for b in self.batches))


def shifted_batch(batch: CalibrationBatch, shift: int) -> CalibrationBatch:
    """Token t+shift at position t; the mask keeps positions whose token t+shift is real."""
    ids, mask = batch.input_ids, batch.attention_mask
    next_ids = torch.roll(ids, -shift, dims=1)  # wrapped ids sit on masked positions only
    next_mask = torch.zeros_like(mask)
    if ids.shape[1] > shift:
        next_mask[:, :-shift] = mask[:, :-shift] * mask[:, shift:]
    return CalibrationBatch(next_ids, next_mask)


class LazyBatches(Sequence):
    """Per-batch tensors computed on access, so an MTP layer's inputs never add a copy of every batch's hidden
    states to memory (the trunk's, possibly memory-mapped, are the only ones held). Read once per pass."""

    def __init__(self, count: int, compute: Callable[[int], torch.Tensor]) -> None:
        self.count, self.compute = count, compute

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise IndexError(index)
        with torch.no_grad():
            return self.compute(index)


def run_mtp_layers(
    model: nn.Module,
    family: MoEFamily,
    source: SourceCheckpoint,
    last_hidden: Sequence[torch.Tensor],
    batches: list[CalibrationBatch],
    calls: list[list[LayerCall]],
    device: torch.device | str | None = None,
) -> Iterator[MTPCalibration]:
    """For each MTP layer of the source, in depth order: the layer and its calibration inputs.

    `last_hidden`: per batch, the last trunk layer's output before the final norm (the final norm is applied
    here, as vLLM feeds the drafter the model's normed output). `calls`: per batch, the captured call arguments
    of every trunk layer (`capture_layer_inputs`). Inputs are computed when read (`LazyBatches`); a later MTP
    layer reads the earlier one's outputs, computed then, i.e. after the caller has compressed that layer.
    """
    specs = mtp_layer_specs(family, source)
    if not specs:
        return
    embed = model.get_input_embeddings()
    norm = final_norm(model)
    if norm.weight.is_meta:  # the streaming skeleton fills it only where it finds it beside the embeddings
        raise ValueError(f"cannot find the final norm of the trunk in {source.folder}")
    call_index = mtp_call_layer(model)
    layer_calls = [per_batch[call_index] for per_batch in calls]
    count = len(batches)
    previous: Sequence[torch.Tensor] = LazyBatches(count, lambda b: norm(last_hidden[b]))
    num_hidden_layers = int(model.config.get_text_config().num_hidden_layers)
    for spec in specs:
        block = build_mtp_block(model, family, source, spec, device)
        shifted = [shifted_batch(b, spec.depth + 1) for b in batches]
        inputs = _mtp_inputs(block, embed, shifted, previous)
        yield MTPCalibration(spec.layer_key, num_hidden_layers + spec.depth, block.layer, block, inputs,
                             layer_calls, shifted)
        previous = _mtp_outputs(block, inputs, layer_calls)


def _mtp_inputs(block: MTPBlock, embed: nn.Module, shifted: list[CalibrationBatch],
                previous: Sequence[torch.Tensor]) -> LazyBatches:
    def compute(b: int) -> torch.Tensor:
        hidden = previous[b]
        return block.layer_input(embed(shifted[b].input_ids.to(hidden.device)), hidden)

    return LazyBatches(len(shifted), compute)


def _mtp_outputs(block: MTPBlock, inputs: Sequence[torch.Tensor], calls: list[LayerCall]) -> LazyBatches:
    """What the next MTP layer is fed: this one's output, normed (vLLM's DeepSeek and Qwen drafters recycle the
    normed state; GLM's recycles the pre-norm one, which matters only for models with several MTP layers)."""
    def compute(b: int) -> torch.Tensor:
        out = run_layer(block.layer, inputs[b], calls[b])
        return block.norm(out) if block.norm is not None else out

    return LazyBatches(len(inputs), compute)


__all__ = ["MTPBlock", "MTPCalibration", "MTPLayerSpec", "STYLES", "build_mtp_block", "check_mtp_layers",
           "LazyBatches", "final_norm", "mtp_call_layer", "mtp_layer_specs", "mtp_prefixes", "run_mtp_layers",
           "shifted_batch"]
