"""The model on the meta device with only embeddings, rotary tables and the final norm real, and the float32
tensors transformers keeps in a lower-precision load (the skeleton and the MTP layers keep them too)."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..arch import config_mtp_prefixes
from .device import Placement
from .loading import LayerLoader


def text_model(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers, the final norm and the embeddings (the text tower of a VLM)."""
    base = getattr(model, "model", model)
    if not hasattr(base, "layers") and hasattr(base, "language_model"):
        base = base.language_model
    return base


def final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(text_model(model), "norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__}")
    return norm


def fp32_tensors(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """Which tensors transformers keeps in float32 when it loads `model` in `dtype` (None: none of them).

    `from_pretrained` does (`_keep_in_fp32_modules_strict` in bfloat16 and float16, e.g. DeepSeek-V3's and GLM-4.5's
    `e_score_correction_bias`; `_keep_in_fp32_modules` in float16 only), `from_config` does not: the streaming
    skeleton and the MTP layers must, or a bfloat16 model routes with a rounded bias and writes rounded rows. The
    patterns are matched as transformers matches them (`*` any run, searched in the state-dict key)."""
    patterns = list(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in sorted(set(patterns))))


def keep_fp32(module: nn.Module, pattern: re.Pattern | None, prefix: str = "") -> None:
    """Turn `module`'s parameters and buffers whose key (`prefix` + name) matches `pattern` to float32 (on meta
    too: the loader then fills them with the source's values, uncast)."""
    if pattern is None:
        return
    persistent = set(module.state_dict())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.dtype == torch.float32 or not tensor.is_floating_point() or not pattern.search(prefix + name):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if isinstance(tensor, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(tensor.detach().float(), requires_grad=tensor.requires_grad))
        else:
            owner.register_buffer(leaf, tensor.float(), persistent=name in persistent)


def build_skeleton(hf_config, dtype, device: torch.device, loader: LayerLoader):
    """The model on meta with embeddings, rotary tables and the final norm real: enough to embed calibration
    tokens and, after the last layer, to feed MTP layers the normed trunk output. Tensors transformers keeps in
    float32 (`fp32_tensors`) are float32 here too."""
    from transformers import AutoModelForCausalLM

    implementation = Placement.of(device).experts_implementation(dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, experts_implementation=implementation)
    keep_fp32(model, fp32_tensors(model, dtype))
    base = model.model
    embed = base.get_input_embeddings()
    mtp = config_mtp_prefixes(loader.source.config, loader.source.weight_map)
    embed_name = next(n for n in loader.source.weight_map
                      if n.endswith("embed_tokens.weight") and not (mtp and n.startswith(mtp)))
    loader.fill(embed, embed_name[: -len("weight")])
    norm_prefix = embed_name[: -len("embed_tokens.weight")] + "norm."  # the trunk's final norm sits beside it
    if f"{norm_prefix}weight" in loader.source.weight_map:
        loader.fill(final_norm(model), norm_prefix)
    for name, rotary in base.named_children():  # `rotary_emb` (LFM2-MoE: `pos_emb`): its tables are non-persistent
        if isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):  # buffers computed at construction
            with torch.device(device):
                setattr(base, name, type(rotary)(config=rotary.config))
    return model
