"""The expert tensor layout, in memory and on disk: the one place that knows tensor names and shapes.

- Canonical (`ExpertWeights`): E SwiGLU-style experts as gate (E, D, H), up (E, D, H), down (E, H, D), optional
  biases gate_bias / up_bias (E, D) and down_bias (E, H). The method works on this layout only.
- Fused (in memory): transformers 5 keeps every family's experts in one module with `gate_up_proj (E, 2D, H)`
  (gate rows first) and `down_proj (E, H, D)`; GPT-OSS `gate_up_proj (E, H, 2D)` with gate/up interleaved, plus
  biases. `read_expert_weights` gives canonical views of them, `fused_expert_params` the inverse.
- On disk: per-expert `<layer>.<block>.experts.<i>.<proj>.weight` (Qwen, DeepSeek, GLM, OLMoE; Mixtral's
  `block_sparse_moe.experts.<i>.w1/w2/w3`) or the fused names (GPT-OSS); routers `<layer>.<block>.<gate|router>.*`.
- MTP layers (dropped by transformers on load): a module `mtp` near the top of the name, or a decoder layer
  numbered at or past `num_hidden_layers`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .families import MoEFamily, text_config_dict

FUSED_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


# -- canonical <-> fused (in memory) -----------------------------------------------------------------
@dataclass
class ExpertWeights:
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    def select(self, index: list[int] | torch.Tensor) -> ExpertWeights:
        return ExpertWeights(**{f.name: None if (t := getattr(self, f.name)) is None else t[index] for f in fields(self)})

    def to(self, dtype: torch.dtype) -> ExpertWeights:
        return ExpertWeights(**{f.name: None if (t := getattr(self, f.name)) is None else t.to(dtype) for f in fields(self)})


def read_expert_weights(family: MoEFamily, experts_module: nn.Module) -> ExpertWeights:
    """Views (no copies) of a fused experts module in the canonical layout."""
    if family.expert_layout == "gpt_oss":
        gate_up = experts_module.gate_up_proj  # (E, H, 2D), gate/up interleaved on the last dim
        bias = experts_module.gate_up_proj_bias  # (E, 2D)
        return ExpertWeights(
            gate=gate_up[..., ::2].transpose(1, 2),
            up=gate_up[..., 1::2].transpose(1, 2),
            down=experts_module.down_proj.transpose(1, 2),
            gate_bias=bias[:, ::2],
            up_bias=bias[:, 1::2],
            down_bias=experts_module.down_proj_bias,
        )
    gate_up = experts_module.gate_up_proj  # (E, 2D, H), gate rows first
    inner = gate_up.shape[1] // 2
    return ExpertWeights(gate=gate_up[:, :inner], up=gate_up[:, inner:], down=experts_module.down_proj)


def fused_expert_params(family: MoEFamily, weights: ExpertWeights) -> dict[str, torch.Tensor]:
    """The family's fused parameter tensors for canonical weights (inverse of `read_expert_weights`)."""
    if family.expert_layout == "gpt_oss":
        num, inner, hidden = weights.gate.shape
        gate_up = torch.empty(num, hidden, 2 * inner, dtype=weights.gate.dtype)
        gate_up[..., ::2] = weights.gate.transpose(1, 2)
        gate_up[..., 1::2] = weights.up.transpose(1, 2)
        bias = torch.empty(num, 2 * inner, dtype=weights.gate.dtype)
        bias[:, ::2] = weights.gate_bias
        bias[:, 1::2] = weights.up_bias
        return {
            "gate_up_proj": gate_up,
            "gate_up_proj_bias": bias,
            "down_proj": weights.down.transpose(1, 2).contiguous(),
            "down_proj_bias": weights.down_bias.contiguous(),
        }
    return {
        "gate_up_proj": torch.cat([weights.gate, weights.up], dim=1).contiguous(),
        "down_proj": weights.down.contiguous(),
    }


def write_expert_weights(family: MoEFamily, experts_module: nn.Module, weights: ExpertWeights) -> None:
    """Replace the module's experts (count may change) with canonical weights, in the module's dtype."""
    for name, tensor in fused_expert_params(family, weights).items():
        old = getattr(experts_module, name)
        setattr(experts_module, name, nn.Parameter(tensor.to(device=old.device, dtype=old.dtype), requires_grad=False))
    experts_module.num_experts = weights.num_experts


# -- disk names --------------------------------------------------------------------------------------
# <prefix><layer>.<block>.experts.<expert>.<proj>.<param>  |  <prefix><layer>.<block>.experts.<fused>
_PER_EXPERT = re.compile(r"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<block>\w+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<param>weight|bias)$")
_FUSED = re.compile(rf"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<block>\w+)\.experts\.(?P<param>{'|'.join(FUSED_PARAMS)})$")
_IN_BLOCK = re.compile(r"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<block>\w+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class MoETensorName:
    prefix: str  # e.g. "model.layers." or "model.language_model.layers." or "mtp.layers."
    layer: int
    block: str
    kind: str  # "expert" | "fused" | "router"
    expert: int | None
    proj: str | None
    param: str

    @property
    def layer_key(self) -> str:
        """Identifies the layer across trunk and MTP: prefix + index."""
        return f"{self.prefix}{self.layer}"

    @property
    def experts_prefix(self) -> str:
        return f"{self.prefix}{self.layer}.{self.block}.experts."


def parse_moe_name(family: MoEFamily, name: str) -> MoETensorName | None:
    """What an on-disk tensor is to the method (an expert's projection, a fused expert tensor, a router tensor
    indexed by expert), or None for every tensor the method leaves alone."""
    if ".experts." in name:
        if m := _PER_EXPERT.match(name):
            if m["proj"] in family.disk_proj_names.values():
                return MoETensorName(m["prefix"], int(m["layer"]), m["block"], "expert", int(m["expert"]), m["proj"], m["param"])
            return None  # e.g. a shared expert's weights that happen to sit under "experts"
        if m := _FUSED.match(name):
            return MoETensorName(m["prefix"], int(m["layer"]), m["block"], "fused", None, None, m["param"])
        return None
    if (m := _IN_BLOCK.match(name)) and (param := disk_router_names(family).get(m["rest"])) is not None:
        return MoETensorName(m["prefix"], int(m["layer"]), m["block"], "router", None, None, param)
    if m and m["block"] == family.on_disk_block and (param := _renamed_fused(family).get(m["rest"])) is not None:
        return MoETensorName(m["prefix"], int(m["layer"]), m["block"], "fused", None, None, param)
    return None


def disk_fused_name(family: MoEFamily, param: str) -> str:
    """The on-disk name, relative to the block, of fused expert parameter `param`: `experts.<param>`, or what
    `MoEFamily.disk_renames` makes of it (Granite-MoE: `input_linear.weight`)."""
    return in_memory_key(family, f"{family.block_attr}.{family.experts_attr}.{param}")[len(family.on_disk_block) + 1:]


def _renamed_fused(family: MoEFamily) -> dict[str, str]:
    """Fused expert parameters stored under a name without `.experts.` -> parameter name."""
    return {name: param for param in FUSED_PARAMS if ".experts." not in f".{(name := disk_fused_name(family, param))}"}


def disk_router_names(family: MoEFamily) -> dict[str, str]:
    """The family's router tensors by their on-disk name relative to the block (`gate.weight`; MiniMax-M2's
    `e_score_correction_bias` on the block; ERNIE's `moe_statics.e_score_correction_bias`) -> router tensor name."""
    block = family.on_disk_block + "."
    return {in_memory_key(family, f"{family.block_attr}.{family.router_path(name)}")[len(block):]: name
            for name in family.router_tensors}


def disk_expert_tensors(family: MoEFamily, experts_prefix: str, weights: ExpertWeights,
                        fused: bool) -> dict[str, torch.Tensor]:
    """A layer's canonical experts under the source's on-disk names: fused (GPT-OSS) or one tensor per expert
    and projection, numbered 0..k-1."""
    if fused:  # experts_prefix is `<layer>.<block>.experts.`; the names are the block's (disk_fused_name)
        block_prefix = experts_prefix[: -len("experts.")]
        return {block_prefix + disk_fused_name(family, name): tensor
                for name, tensor in fused_expert_params(family, weights).items()}
    role_tensors = {"gate": weights.gate, "up": weights.up, "down": weights.down}
    return {f"{experts_prefix}{expert}.{proj}.weight": role_tensors[role][expert]
            for expert in range(weights.num_experts) for role, proj in family.disk_proj_names.items()}


def fused_as_stored(tensor: torch.Tensor, stored_shape: tuple[int, ...]) -> torch.Tensor:
    """A fused expert tensor (E, a, b) in the orientation a stored one has (its shape after the expert dimension):
    transposed where the store holds (E, b, a), as Qwen3-VL-MoE's Hub releases hold gate_up_proj (E, H, 2D) and
    down_proj (E, D, H) against transformers' (E, 2D, H) / (E, H, D); as it is otherwise. Its own inverse. A square
    tensor is taken as it is, as transformers' loader takes it."""
    want = tuple(stored_shape[1:])
    if tensor.dim() == 3 and tuple(tensor.shape[1:]) != want and tuple(tensor.shape[1:]) == want[::-1]:
        return tensor.transpose(1, 2).contiguous()
    return tensor


def disk_expert_name(family: MoEFamily, experts_prefix: str, expert: int, role: str) -> str:
    """The on-disk name of one expert's projection (`role`: gate, up or down)."""
    return f"{experts_prefix}{expert}.{family.disk_proj_names[role]}.weight"


def disk_expert_names(family: MoEFamily, experts_prefix: str, num_experts: int) -> dict[str, tuple[str, int]]:
    """Per-expert on-disk names of a layer -> (role, expert), in expert order."""
    return {disk_expert_name(family, experts_prefix, expert, role): (role, expert)
            for expert in range(num_experts) for role in family.disk_proj_names}


def expert_shapes(family: MoEFamily, text_config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]],
                                                                            dict[str, tuple[int, ...]]]:
    """Expected on-disk shapes from config.json: (per-expert tensor by projection name, fused tensor by parameter
    name without the expert dimension)."""
    hidden = int(text_config["hidden_size"])
    inner = int(text_config.get("moe_intermediate_size") or text_config["intermediate_size"])
    per_expert = {family.disk_proj_names["gate"]: (inner, hidden), family.disk_proj_names["up"]: (inner, hidden),
                  family.disk_proj_names["down"]: (hidden, inner)}
    if family.expert_layout == "gpt_oss":
        fused = {"gate_up_proj": (hidden, 2 * inner), "gate_up_proj_bias": (2 * inner,), "down_proj": (inner, hidden),
                 "down_proj_bias": (hidden,)}
    else:  # fused on disk as in memory (some Qwen3.5 exports): gate rows first
        fused = {"gate_up_proj": (2 * inner, hidden), "down_proj": (hidden, inner)}
    return per_expert, fused


def in_memory_key(family: MoEFamily, key: str) -> str:
    """The on-disk name (relative to a layer) of an in-memory state-dict key: Mixtral's block is
    `block_sparse_moe` on disk and `mlp` in memory; ERNIE's routing bias is `mlp.moe_statics.*` on disk and
    `mlp.gate.moe_statics.*` in memory (`MoEFamily.disk_renames`, as transformers' conversion mapping renames it)."""
    block, dot, rest = key.partition(".")
    if block != family.block_attr or not dot:
        return key
    for in_memory, on_disk in family.disk_renames:
        if rest.startswith(in_memory):
            rest = on_disk + rest[len(in_memory):]
    return f"{family.on_disk_block}.{rest}"


# -- MTP layers --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MTPStyle:
    """Names of an MTP block's own tensors (relative to its prefix) for one on-disk style.

    "layers" (DeepSeek-V3 / Kimi-K2, GLM-4.5): MTP layer i is `model.layers.{N+i}.*` with N = num_hidden_layers:
    `enorm`, `hnorm`, `eh_proj`, `shared_head.{norm,head}`, `embed_tokens`, and the decoder layer's own tensors
    right under that prefix. "mtp" (Qwen3-Next, Qwen3.5-MoE): `mtp.fc`, `mtp.pre_fc_norm_embedding`,
    `mtp.pre_fc_norm_hidden`, `mtp.norm` shared by the layers `mtp.layers.{i}.*`.
    """

    proj: str  # Linear(2H -> H) over concat(embedding part, hidden part)
    embed_norm: str
    hidden_norm: str
    final_norm: str
    not_layer: tuple[str, ...]  # sub-names under the layer prefix that are not the decoder layer's (never read:
    #                             shared_head.head and embed_tokens are vocabulary-sized copies of the trunk's)
    mask_first_position: bool  # vLLM zeroes the embedding at position 0


MTP_STYLES: dict[str, MTPStyle] = {
    "layers": MTPStyle("eh_proj", "enorm", "hnorm", "shared_head.norm",
                       not_layer=("eh_proj.", "enorm.", "hnorm.", "shared_head.", "embed_tokens."),
                       mask_first_position=True),
    "mtp": MTPStyle("fc", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm", not_layer=(),
                    mask_first_position=False),
}


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


def config_mtp_prefixes(config_dict: dict[str, Any], names: Iterable[str]) -> tuple[str, ...]:
    """Name prefixes of the MTP layers among a checkpoint's tensor `names`, its config.json saying where the trunk
    ends (none without `num_hidden_layers`)."""
    num_layers = text_config_dict(config_dict).get("num_hidden_layers")
    if not isinstance(num_layers, int):
        return ()
    return tuple(sorted({p for name in names if (p := mtp_prefix(name, num_layers)) is not None}))
