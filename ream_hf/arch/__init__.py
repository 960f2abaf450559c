"""Architecture knowledge, one declaration per model family, and nowhere else.

`families`: the supported families as data (where a family keeps its blocks, routers and experts, its
expert-count config keys, routing and MTP style). `layout`: the expert tensor layout in memory and on disk
(canonical <-> fused <-> disk names, expected shapes, MTP tensor names). `modules`: finding layers, blocks,
routers and experts in a loaded model.
"""

from .families import (
    EXPERT_COUNT_KEYS,
    FAMILIES,
    NATIVE_ARCHITECTURES,
    TEXT_ARCHITECTURES,
    MoEFamily,
    check_text_architecture,
    expert_count,
    experts_per_token,
    family_for_config,
    set_expert_count,
    supported_families,
    text_config_dict,
)
from .layout import (
    FUSED_PARAMS,
    MTP_STYLES,
    ExpertWeights,
    MoETensorName,
    MTPStyle,
    config_mtp_prefixes,
    disk_expert_name,
    disk_expert_names,
    disk_expert_tensors,
    fused_as_stored,
    disk_router_names,
    expert_shapes,
    fused_expert_params,
    in_memory_key,
    mtp_prefix,
    mtp_tensor_names,
    parse_moe_name,
    read_expert_weights,
    write_expert_weights,
)
from .modules import RouterView, decoder_layers, experts, moe_block, router, router_tensors, set_router_tensor

__all__ = [
    "EXPERT_COUNT_KEYS", "FAMILIES", "FUSED_PARAMS", "MTP_STYLES", "NATIVE_ARCHITECTURES", "TEXT_ARCHITECTURES",
    "ExpertWeights", "MTPStyle", "check_text_architecture",
    "MoEFamily", "MoETensorName", "config_mtp_prefixes", "decoder_layers", "disk_expert_name", "disk_expert_names",
    "disk_expert_tensors", "fused_as_stored", "disk_router_names", "RouterView", "router_tensors", "set_router_tensor",
    "expert_count", "experts_per_token", "expert_shapes", "experts", "family_for_config", "fused_expert_params", "in_memory_key",
    "moe_block", "mtp_prefix", "mtp_tensor_names", "parse_moe_name", "read_expert_weights", "router",
    "set_expert_count", "supported_families", "text_config_dict", "write_expert_weights",
]
