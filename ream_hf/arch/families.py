"""The supported model families, each declared as data.

Each `MoEFamily` says where a family keeps its MoE blocks, router, experts and shared experts,
which config keys hold the expert count, how its experts are laid out (in memory and on disk),
how it scores experts, and which router tensors are indexed by expert. The routing rule itself is
never re-derived: statistics call the model's own router module, which returns
`(logits, top-k weights, top-k indices)` in every supported family, so sigmoid scoring,
`e_score_correction_bias`, grouped top-k, `norm_topk_prob` and `routed_scaling_factor` are exactly
the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MoEFamily:
    name: str
    model_types: tuple[str, ...]
    num_experts_attr: str  # attribute of the in-memory config holding the expert count
    expert_count_keys: tuple[str, ...]  # config.json keys that may hold it (edited where present)
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    router_tensors: tuple[str, ...] = ("weight",)  # router parameters/buffers indexed by expert (on dim 0 unless
    #                                                router_expert_dims says otherwise)
    expert_layout: str = "gate_up"  # "gate_up": gate_up_proj (E,2D,H) gate rows first; "gpt_oss": interleaved, biased
    scoring: str = "softmax"  # how logits become per-expert gate values over all experts
    disk_block_attr: str | None = None  # on-disk name of the block when it differs (Mixtral: block_sparse_moe)
    disk_proj_names: dict[str, str] = field(
        default_factory=lambda: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    )
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) for grouped top-k routing
    mtp_layers_key: str | None = None  # config key counting MTP layers
    mtp_style: str | None = None  # "layers": model.layers.{N+i}; "mtp": mtp.layers.{i}
    mtp_moe: bool = True  # False: vLLM builds the MTP layers with a dense MLP (EXAONE-MoE's `is_mtp`), so they
    #                       have nothing to compress (copied as they are) and expert tensors there are refused
    shared_expert_attrs: tuple[str, ...] = ()
    vision_prefixes: tuple[str, ...] = ()  # tensors copied through untouched
    # where transformers' module differs from the common shape (router tensors on `<router_attr>.<name>`, router
    # called with the hidden states alone, the same names in memory and on disk):
    router_paths: dict[str, str] = field(default_factory=dict)  # in-memory path of a router tensor, relative to the
    #                                                             block (Hunyuan: gate.wg.weight; MiniMax-M2's bias)
    router_args: tuple[str, ...] = ()  # block attributes the router takes after the hidden states (MiniMax-M2)
    router_expert_dims: dict[str, int] = field(default_factory=dict)  # expert dimension where not 0 (ERNIE's (1, E))
    router_returns: tuple[str, str, str] = ("logits", "weights", "index")  # the order of the router's outputs
    #                                                                        (Granite-MoE: index, weights, logits)
    route_method: str | None = None  # a block method (hidden, logits) -> (index, weights) that routes the logits of
    #                                  a plain Linear router (Jamba: route_tokens_to_experts), called as the block does
    router_takes_batch: bool = False  # the router reads (batch, sequence, hidden) and flattens it itself (AFMoE):
    #                                   handed the tokens as one batch row, which it flattens back alike
    disk_renames: tuple[tuple[str, str], ...] = ()  # (in-memory, on-disk) name fragments under a layer's block
    #                                                  (Granite-MoE's fused experts: experts.gate_up_proj on disk
    #                                                  as input_linear.weight)
    layer_carry: str | None = None  # a decoder layer returning (hidden, value) whose value the next layer takes as
    #                                this keyword argument (GLM-5's top-k token indices, shared by its "shared" layers)

    def router_path(self, name: str) -> str:
        """Where router tensor `name` sits in memory, relative to the MoE block."""
        return self.router_paths.get(name, f"{self.router_attr}.{name}")

    @property
    def on_disk_block(self) -> str:
        return self.disk_block_attr or self.block_attr


_QWEN_SHARED = ("shared_expert", "shared_expert_gate")
_DEEPSEEK_ROUTER = ("weight", "e_score_correction_bias")
_BLOCK_BIAS = "e_score_correction_bias"  # MiniMax-M2 keeps it on the block and hands it to the router
_DEEPSEEK_V3: dict[str, Any] = dict(
    num_experts_attr="n_routed_experts", expert_count_keys=("n_routed_experts",), router_tensors=_DEEPSEEK_ROUTER,
    scoring="sigmoid", group_keys=("n_group", "topk_group"), mtp_layers_key="num_nextn_predict_layers",
    mtp_style="layers", shared_expert_attrs=("shared_experts",))

_GRANITE_MOE: dict[str, Any] = dict(
    num_experts_attr="num_local_experts", expert_count_keys=("num_local_experts",), block_attr="block_sparse_moe",
    router_attr="router", router_returns=("index", "weights", "logits"),
    disk_renames=(("experts.gate_up_proj", "input_linear.weight"), ("experts.down_proj", "output_linear.weight"),
                  ("router.weight", "router.layer.weight")))

FAMILIES: tuple[MoEFamily, ...] = (
    MoEFamily("Qwen3-MoE", ("qwen3_moe",), "num_experts", ("num_experts", "num_local_experts")),
    MoEFamily("Qwen2-MoE", ("qwen2_moe",), "num_experts", ("num_experts",), shared_expert_attrs=_QWEN_SHARED),
    MoEFamily(
        "Mixtral", ("mixtral",), "num_local_experts", ("num_local_experts",),
        disk_block_attr="block_sparse_moe", disk_proj_names={"gate": "w1", "up": "w3", "down": "w2"},
    ),
    MoEFamily("OLMoE", ("olmoe",), "num_experts", ("num_experts",)),
    MoEFamily("DeepSeek-V3 / Kimi-K2", ("deepseek_v3", "kimi_k2"), **_DEEPSEEK_V3),
    # a DeepSeek-V3 text model (text_config, under `language_model.model.*`) beneath a MoonViT vision tower and
    # projector (`vision_tower.*`, `mm_projector.*`), which are copied as stored
    MoEFamily("Kimi-K2.5 / K2.6", ("kimi_k25",), **_DEEPSEEK_V3, vision_prefixes=("vision_tower.", "mm_projector.")),
    MoEFamily(
        "GLM-4.5 (Glm4Moe)", ("glm4_moe",), "n_routed_experts", ("n_routed_experts",),
        router_tensors=_DEEPSEEK_ROUTER, scoring="sigmoid", group_keys=("n_group", "topk_group"),
        mtp_layers_key="num_nextn_predict_layers", mtp_style="layers", shared_expert_attrs=("shared_experts",),
    ),
    MoEFamily(
        "Qwen3-Next", ("qwen3_next",), "num_experts", ("num_experts",),
        mtp_layers_key="mtp_num_hidden_layers", mtp_style="mtp", shared_expert_attrs=_QWEN_SHARED,
    ),
    MoEFamily(
        "Qwen3.5-MoE", ("qwen3_5_moe", "qwen3_5_moe_text"), "num_experts", ("num_experts",),
        mtp_layers_key="mtp_num_hidden_layers", mtp_style="mtp", shared_expert_attrs=_QWEN_SHARED,
        vision_prefixes=("model.visual.",),
    ),
    MoEFamily(
        "GPT-OSS", ("gpt_oss",), "num_local_experts", ("num_local_experts",),
        router_attr="router", router_tensors=("weight", "bias"), expert_layout="gpt_oss",
    ),
    # -- families whose transformers modules are the same fused experts + (logits, weights, indices) router, each
    #    declaring only what differs. Sigmoid + correction bias, grouped top-k and scaling stay inside their routers.
    MoEFamily(
        "MiniMax-M2", ("minimax_m2",), "num_local_experts", ("num_local_experts",), scoring="sigmoid",
        router_tensors=("weight", _BLOCK_BIAS), router_paths={_BLOCK_BIAS: _BLOCK_BIAS}, router_args=(_BLOCK_BIAS,),
        disk_block_attr="block_sparse_moe", disk_proj_names={"gate": "w1", "up": "w3", "down": "w2"},
    ),
    # DeepSeek-V3.2 and GLM-5: DeepSeek-V3's MoE under sparse attention (the indexer's tensors are attention's,
    # copied as stored)
    MoEFamily("DeepSeek-V3.2", ("deepseek_v32",), **_DEEPSEEK_V3),
    MoEFamily("GLM-5 (GlmMoeDsa)", ("glm_moe_dsa",), **_DEEPSEEK_V3, layer_carry="prev_topk_indices"),
    MoEFamily(
        "ERNIE-4.5-MoE", ("ernie4_5_moe",), "num_experts", ("moe_num_experts",),
        router_tensors=("weight", _BLOCK_BIAS), router_paths={_BLOCK_BIAS: "gate.moe_statics.e_score_correction_bias"},
        router_expert_dims={_BLOCK_BIAS: 1}, disk_renames=(("gate.moe_statics.", "moe_statics."),),
        shared_expert_attrs=("shared_experts",),
    ),
    MoEFamily(
        "Hunyuan-MoE", ("hunyuan_v1_moe",), "num_experts", ("num_experts",), router_paths={"weight": "gate.wg.weight"},
        shared_expert_attrs=("shared_mlp",),
    ),
    # the text model under `model.language_model.*` as Qwen3-MoE's, its experts fused on disk, transposed in the
    # Hub's releases (`layout.fused_as_stored`); the vision tower (`model.visual.*`, deepstack mergers) copied as stored
    MoEFamily(
        "Qwen3-VL-MoE", ("qwen3_vl_moe", "qwen3_vl_moe_text"), "num_experts", ("num_experts", "num_local_experts"),
        vision_prefixes=("model.visual.",),
    ),
    # the text model under `model.language_model.*` as GLM-4.5's; the vision tower (`model.visual.*`) copied as stored
    MoEFamily(
        "GLM-4.5V / 4.6V", ("glm4v_moe", "glm4v_moe_text"), "n_routed_experts", ("n_routed_experts",),
        router_tensors=_DEEPSEEK_ROUTER, scoring="sigmoid", group_keys=("n_group", "topk_group"),
        shared_expert_attrs=("shared_experts",), vision_prefixes=("model.visual.",),
    ),
    # PhiMoE's router (`mlp.router`, `block_sparse_moe.gate` on disk) is sparsemixer: top-2 whatever the config's
    # top-k, each weight a softmax over the logits within a jitter threshold of that pick's (Gumbel sampling only in
    # training; statistics run in eval mode, where it is the deterministic max)
    MoEFamily(
        "PhiMoE", ("phimoe",), "num_local_experts", ("num_local_experts",), router_attr="router",
        disk_block_attr="block_sparse_moe", disk_proj_names={"gate": "w1", "up": "w3", "down": "w2"},
        disk_renames=(("router.", "gate."),),
    ),
    # LFM2-MoE: sigmoid scores, top-k of scores + the block's `expert_bias` (handed to the router as MiniMax-M2's),
    # renormalised, times routed_scaling_factor; the first num_dense_layers feed_forwards are dense MLPs
    MoEFamily(
        "LFM2-MoE", ("lfm2_moe",), "num_experts", ("num_experts",), block_attr="feed_forward", scoring="sigmoid",
        router_tensors=("weight", "expert_bias"), router_paths={"expert_bias": "expert_bias"},
        router_args=("expert_bias",), disk_proj_names={"gate": "w1", "up": "w3", "down": "w2"},
    ),
    # Granite-MoE: softmax over the top-k logits; router returns (index, weights, logits); experts fused on disk as
    # in memory, under other names (`input_linear.weight` (E, 2D, H), `output_linear.weight` (E, H, D),
    # `router.layer.weight`)
    MoEFamily("Granite-MoE", ("granitemoe",), **_GRANITE_MOE),
    # Granite-MoE's block with a dense shared MLP beside it on the decoder layer (`shared_mlp.input_linear` /
    # `output_linear`, not under the block: never parsed as experts, copied as stored)
    MoEFamily("Granite-MoE-Shared", ("granitemoeshared",), **_GRANITE_MOE),
    # Granite-4.0-H: the same block and shared MLP under Mamba-2 and attention layers (copied as stored)
    MoEFamily("Granite-MoE-Hybrid", ("granitemoehybrid",), **_GRANITE_MOE),
    MoEFamily(
        "dots.llm1", ("dots1",), "n_routed_experts", ("n_routed_experts",), router_tensors=_DEEPSEEK_ROUTER,
        scoring="sigmoid", group_keys=("n_group", "topk_group"), shared_expert_attrs=("shared_experts",),
    ),
    # OLMoE's MoE (softmax top-k, `norm_topk_prob`) in every layer, under OLMo-2's post-norms
    MoEFamily("FlexOlmo", ("flex_olmo",), "num_experts", ("num_experts",)),
    # DeepSeek-V3's routing (sigmoid + bias, grouped top-k, scaling) with dense first layers (`mlp_layer_types`) and
    # sliding-window attention; the routing bias on the block on disk, in the router in memory (transformers' renaming)
    MoEFamily(
        "EXAONE-MoE", ("exaone_moe",), "num_experts", ("num_experts",), router_tensors=_DEEPSEEK_ROUTER, scoring="sigmoid",
        group_keys=("n_group", "topk_group"), shared_expert_attrs=("shared_experts",),
        disk_renames=(("gate.e_score_correction_bias", "e_score_correction_bias"),),
        mtp_layers_key="num_nextn_predict_layers", mtp_style="mtp", mtp_moe=False,
    ),
    # AFMoE: sigmoid scores, top-k of scores + the block's `expert_bias` (float32, handed to the router), renormalised,
    # times route_scale; router weight `router.gate.weight`, shared experts, the first num_dense_layers dense
    MoEFamily(
        "AFMoE", ("afmoe",), "num_experts", ("num_experts",), scoring="sigmoid", router_attr="router",
        router_tensors=("weight", "expert_bias"), router_paths={"weight": "router.gate.weight",
                                                                "expert_bias": "expert_bias"},
        router_args=("expert_bias",), router_takes_batch=True, shared_expert_attrs=("shared_experts",),
    ),
    # Jamba: a plain Linear router (`feed_forward.router`) whose logits the block's own route_tokens_to_experts turns
    # into top-k of the softmax (not renormalised); MoE every expert_layer_period-th layer, Mamba and attention layers
    # (copied as stored) interleaved
    MoEFamily(
        "Jamba", ("jamba",), "num_experts", ("num_experts",), block_attr="feed_forward", router_attr="router",
        route_method="route_tokens_to_experts",
    ),
    MoEFamily(
        "Solar-Open", ("solar_open",), "n_routed_experts", ("n_routed_experts",), router_tensors=_DEEPSEEK_ROUTER,
        scoring="sigmoid", group_keys=("n_group", "topk_group"), shared_expert_attrs=("shared_experts",),
    ),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
# model types transformers does not register whose checkpoints are another, registered architecture: built natively as
# that one from config.json (no remote code). Kimi-K2 is DeepSeek-V3 (its config names DeepseekV3ForCausalLM; vLLM
# maps kimi_k2 to DeepseekV3Config too).
NATIVE_ARCHITECTURES = {"kimi_k2": "deepseek_v3"}
# vision-language model types whose text model (config.json's `text_config`) is compressed as this architecture: the
# model the method runs is built from text_config alone; the vision tower is never built, its tensors copied as stored
TEXT_ARCHITECTURES = {"kimi_k25": "deepseek_v3",
                      # GLM-4.5V's text model on text is GLM-4.5's, bit for bit (its 3-D rope equals 1-D rope on
                      # text positions: tests/test_families.py checks the logits)
                      "glm4v_moe": "glm4_moe", "qwen3_vl_moe": "qwen3_moe"}
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk")  # config.json keys of the router's top-k (ERNIE, Hunyuan)


def experts_per_token(config_dict: dict[str, Any]) -> int:
    """The router's top-k from config.json, under whichever key the family writes it."""
    text = text_config_dict(config_dict)
    for key in TOP_K_KEYS:
        if isinstance(text.get(key), int):
            return int(text[key])
    raise ValueError(f"config has none of {TOP_K_KEYS} (the router's top-k)")


def check_text_architecture(config_dict: dict[str, Any], streaming: bool) -> None:
    """Refuse, before any read, a model whose text model is compressed alone (`TEXT_ARCHITECTURES`) anywhere but in
    the streaming loader, which builds that text model from text_config and reads its layers by their published
    names: transformers would load such a folder as the text architecture with none of its weights (they sit under
    `language_model.model.*`), and saves a loaded kimi_k25 in names of its own (`language_model.model.blocks.*`)."""
    model_type = config_dict.get("model_type")
    if model_type in TEXT_ARCHITECTURES and not streaming:
        raise ValueError(f"{model_type} is compressed from its checkpoint folder (or Hub id) by the streaming loader "
                         f"only, its text model built as {TEXT_ARCHITECTURES[model_type]} and its vision tower copied "
                         "as stored: pass the folder, without --no-streaming (streaming=False)")


def supported_families() -> str:
    return ", ".join(f.name for f in FAMILIES)


def text_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The decoder's settings: VLM checkpoints (Qwen3.5) nest them under `text_config`."""
    return config_dict.get("text_config") or config_dict


# MoE families whose shape the method cannot honour yet, each with what is missing (refused before any read)
REFUSED_FAMILIES: dict[str, str] = {
    "longcat_flash": "LongCat-Flash routes tokens to zero-computation (identity) experts beside its real ones: they "
                     "would have to be kept apart from merging and counted apart, which ream-hf does not do",
    "llama4": "Llama-4 multiplies each token by its sigmoid router score before the experts (they see score * x, not x): "
              "the method's expert outputs, saliency (score times output) and merging assume the score weighs the "
              "expert's output",
    "nemotron_h": "Nemotron-H's experts are non-gated (up and down projections, relu^2), some behind a latent "
                  "projection: the method merges and refits gated experts (gate, up, down) only",
    "step3p5": "Step-3.5 has no causal-LM model in transformers 5.19 (only Step-3.7's vision-language model reads its "
               "text config), its experts clamp their SwiGLU per layer and are stored stacked per layer: none of which "
               "ream-hf reads or writes yet",
    "kimi_linear": "Kimi-Linear's checkpoints store attention tensors that transformers renames and concatenates on "
                   "load (q/k/v_conv1d into conv1d, the forget gate's): the streaming loader reads a layer by its "
                   "in-memory names under the MoE block's renames only",
    "qwen3_omni_moe": "Qwen3-Omni-MoE has two MoE stacks (thinker and talker) under audio and vision towers: ream-hf "
                      "compresses one decoder's MoE layers",
}


def family_for_config(config_dict: dict[str, Any]) -> MoEFamily:
    """The family of a config.json dict; one-line errors for non-MoE, refused and unsupported models."""
    text = text_config_dict(config_dict)
    model_type = config_dict.get("model_type") or text.get("model_type")
    if (reason := REFUSED_FAMILIES.get(model_type) or REFUSED_FAMILIES.get(text.get("model_type"))) is not None:
        raise ValueError(f"{model_type} is not supported: {reason}")
    family = _BY_MODEL_TYPE.get(model_type) or _BY_MODEL_TYPE.get(text.get("model_type"))
    has_experts = any(text.get(key) for key in EXPERT_COUNT_KEYS)
    if family is None:
        if not has_experts:
            raise ValueError(
                f"model type {model_type!r} is not a Mixture-of-Experts model (no expert count in its config); "
                f"ream-hf compresses MoE models: {supported_families()}"
            )
        raise ValueError(f"unsupported MoE architecture {model_type!r}; supported families: {supported_families()}")
    if not has_experts:
        raise ValueError(f"{family.name} config has no experts (expert count 0 or missing); nothing to compress")
    return family


def expert_count(family: MoEFamily, config_dict: dict[str, Any]) -> int:
    text = text_config_dict(config_dict)
    for key in family.expert_count_keys:
        if text.get(key):
            return int(text[key])
    raise ValueError(f"{family.name} config has none of {family.expert_count_keys}")


def set_expert_count(family: MoEFamily, config: Any, count: int, mtp_layers: int | None = None) -> None:
    """Write the expert count (and, when given, the MTP layer count) into a config: a config.json dict (only the
    count keys the file already holds, plus the family's own key, which readers such as vLLM look for even where
    transformers re-serialises another), or an in-memory `PretrainedConfig` (every count attribute it has, in
    the text config too). The one place that knows these keys."""
    if isinstance(config, dict):
        text = text_config_dict(config)
        for key in EXPERT_COUNT_KEYS:
            if text.get(key):
                text[key] = count
        text[family.expert_count_keys[0]] = count
        if mtp_layers is not None and family.mtp_layers_key:
            text[family.mtp_layers_key] = mtp_layers
        return
    for key in (family.num_experts_attr, *family.expert_count_keys):
        if hasattr(config, key):
            setattr(config, key, count)
    own_key = family.expert_count_keys[0]
    if own_key in getattr(config, "attribute_map", {}) and hasattr(config, own_key):
        # an alias (Qwen3-MoE: num_experts -> num_local_experts) that `to_dict` would not write: store it beside the
        # attribute so `save_pretrained` writes the family's own key, as config.json edits do
        vars(config)[own_key] = count
    if mtp_layers is not None and family.mtp_layers_key and hasattr(config, family.mtp_layers_key):
        setattr(config, family.mtp_layers_key, mtp_layers)
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        set_expert_count(family, text, count, mtp_layers)
