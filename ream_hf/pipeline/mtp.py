"""Multi-token-prediction (MTP) layers: found in the source's index, built and fed as vLLM runs them.

transformers drops MTP weights on load (TRANSFORMERS.md), so this module reads them from the source's
safetensors itself, through the same `LayerLoader` as the trunk's layers. The on-disk names of the two styles
(`MoEFamily.mtp_style`: "layers" for DeepSeek-V3 / Kimi-K2 / GLM-4.5, "mtp" for Qwen3-Next / Qwen3.5) are
declared in `ream_hf.arch.layout` (`MTP_STYLES`, `mtp_prefix`).

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

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import MTP_STYLES, MoEFamily, MTPStyle, config_mtp_prefixes, decoder_layers, parse_moe_name
from ..io.source import SourceCheckpoint
from .calibration import CalibrationBatch
from .device import Placement
from .runner import LayerCall, run_layer
from .loading import LayerLoader
from .skeleton import final_norm, fp32_tensors, keep_fp32


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


def mtp_prefixes(family: MoEFamily, source: SourceCheckpoint) -> tuple[str, ...]:
    """Name prefixes of the source's multi-token-prediction layers (dropped by transformers on load)."""
    if family.mtp_style is None:
        return ()
    return config_mtp_prefixes(source.config, source.weight_map)


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
    style = MTP_STYLES.get(family.mtp_style or "")
    if specs and style is None:
        raise ValueError(f"{family.name}: no MTP layout known for style {family.mtp_style!r}")
    names = source.real_names
    for spec in specs:
        required = [f"{spec.prefix}{part}.weight" for part in (style.proj, style.embed_norm, style.hidden_norm)]
        missing = [n for n in required if n not in names]
        if missing:
            raise ValueError(
                f"MTP layer {spec.layer_key} of {source.folder} lacks {missing[0]}: the checkpoint is incomplete; "
                "pass mtp='drop' (removed, config fixed) or mtp='keep' (copied as is)"
            )
        kinds = {p.kind for n in names if n.startswith(spec.layer_prefix) and (p := parse_moe_name(family, n))}
        if kinds and not family.mtp_moe:
            first = min(n for n in names if n.startswith(spec.layer_prefix) and parse_moe_name(family, n))
            raise ValueError(
                f"{family.name}: MTP layer {spec.layer_key} of {source.folder} has {first}, but vLLM builds "
                f"{family.name}'s MTP layers with a dense MLP; pass mtp='drop' (removed, config fixed) or mtp='keep'"
            )
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


def mtp_call_layer(model: nn.Module) -> int:
    """Index of the trunk layer whose call arguments an MTP layer takes: the last full-attention layer
    (hybrid Qwen3-Next/3.5 models alternate linear and full attention; MTP layers are full attention), the last
    layer where every layer is of one kind."""
    text = model.config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    count = len(decoder_layers(model))
    if layer_types and len(set(layer_types[:count])) > 1:  # hybrid; one kind (DSA's indexed_attention): the last
        full = [i for i, kind in enumerate(layer_types[:count]) if kind == "full_attention"]
        if not full:
            raise ValueError("the model has no full-attention layer to take the MTP layer's attention arguments from")
        return full[-1]
    return count - 1


def _norm_like(model: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A norm of the family's own RMSNorm class (as the trunk's final norm), holding `weight`."""
    template = final_norm(model)
    eps = getattr(template, "variance_epsilon", getattr(template, "eps", None))
    with torch.device("meta"):
        norm = type(template)(weight.shape[0], eps=eps)
    norm.load_state_dict({"weight": weight}, assign=True)
    return norm


# per-layer kind lists that an MTP layer (index N + depth) reads past the trunk's N: the MTP layer's kind where it is
# not the last trunk layer's (GLM-5's MTP layer runs its own indexer: it has no previous layer's top-k to share)
_MTP_LAYER_KINDS = {"indexer_types": "full"}
_PER_LAYER_KINDS = ("layer_types", "mlp_layer_types", "indexer_types")


def mtp_layer_config(text, depth: int):
    """The text config an MTP layer of depth `depth` is built from: per-layer kind lists (DeepSeek-V3.2's and
    GLM-5's `layer_types`, `mlp_layer_types`, `indexer_types`) reaching its index N + depth."""
    lists = {key: value for key in _PER_LAYER_KINDS if isinstance(value := getattr(text, key, None), list)}
    if not lists:
        return text
    config = copy.deepcopy(text)
    size = int(text.num_hidden_layers) + depth + 1
    for key, kinds in lists.items():
        setattr(config, key, kinds + [_MTP_LAYER_KINDS.get(key, kinds[-1])] * (size - len(kinds)))
    return config


def build_mtp_block(model: nn.Module, family: MoEFamily, loader: LayerLoader, spec: MTPLayerSpec) -> MTPBlock:
    """Materialise one MTP layer from the source's safetensors (only its tensors are read), in the model's dtype
    (float32 where transformers keeps a trunk layer's tensor so), on the loader's device, through the loader that fills the trunk's layers.

    The decoder layer is the family's own transformers class: for "layers"-style families built with the
    layer index vLLM uses (N + depth, so `first_k_dense_replace` makes it MoE exactly when vLLM does); for
    Qwen3-Next/3.5 with index `depth` and a full-attention layer type, as vLLM builds `mtp.layers.{depth}`.
    """
    style = MTP_STYLES[family.mtp_style]
    source = loader.source
    dtype = model.get_input_embeddings().weight.dtype
    text = model.config.get_text_config()

    block_names = {part: f"{spec.prefix}{part}.weight"
                   for part in (style.proj, style.embed_norm, style.hidden_norm, style.final_norm)}
    if spec.prefix == spec.layer_prefix:
        layer_names = {n for n in source.weight_map if n.startswith(spec.layer_prefix)
                       and not n[len(spec.layer_prefix):].startswith(style.not_layer)}
    else:
        layer_names = {n for n in source.weight_map if n.startswith(spec.layer_prefix)}
    tensors = {name: tensor.to(dtype) for name, tensor in
               loader.read([n for n in block_names.values() if n in source.real_names]).items()}

    trunk_layers = decoder_layers(model)
    trunk_layer = trunk_layers[0]
    if family.mtp_style == "mtp":
        config = copy.deepcopy(text)
        config.layer_types = ["full_attention"] * max(int(text.num_hidden_layers), spec.depth + 1)
        layer_index = spec.depth
    else:
        config, layer_index = mtp_layer_config(text, spec.depth), int(text.num_hidden_layers) + spec.depth
    with torch.device("meta"):
        layer = type(trunk_layer)(config, layer_index).to(dtype)
    # float32 where transformers would keep it so in a trunk layer (e_score_correction_bias in bfloat16)
    layers_name = next(name for name, module in model.named_modules() if module is trunk_layers)
    keep_fp32(layer, fp32_tensors(model, dtype), f"{layers_name}.{layer_index}.")
    read = loader.fill(layer, spec.layer_prefix)
    unexpected = sorted(layer_names - read)
    if unexpected:
        raise ValueError(f"MTP layer {spec.layer_key} does not match {type(layer).__name__}: the checkpoint has "
                         f"{unexpected[0]}, which its config does not explain")

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
    return block.to(loader.device).eval().requires_grad_(False)


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
    loader: LayerLoader,
    last_hidden: Sequence[torch.Tensor],
    batches: list[CalibrationBatch],
    calls: list[list[LayerCall]],
) -> Iterator[MTPCalibration]:
    """For each MTP layer of the source, in depth order: the layer and its calibration inputs.

    `last_hidden`: per batch, the last trunk layer's output before the final norm (the final norm is applied
    here, as vLLM feeds the drafter the model's normed output). `calls`: per batch, the captured call arguments
    of every trunk layer (`capture_layer_inputs`). Inputs are computed when read (`LazyBatches`); a later MTP
    layer reads the earlier one's outputs, computed then, i.e. after the caller has compressed that layer.
    """
    source = loader.source
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
    placement = Placement.of(loader.device)  # the trunk's outputs may be spilled or still being written
    previous: Sequence[torch.Tensor] = LazyBatches(count, lambda b: norm(placement.fetch(last_hidden[b])))
    num_hidden_layers = int(model.config.get_text_config().num_hidden_layers)
    for spec in specs:
        block = build_mtp_block(model, family, loader, spec)
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


__all__ = ["MTPBlock", "MTPCalibration", "MTPLayerSpec", "build_mtp_block", "check_mtp_layers", "LazyBatches",
           "mtp_call_layer", "mtp_layer_specs", "mtp_prefixes", "run_mtp_layers", "shifted_batch"]
