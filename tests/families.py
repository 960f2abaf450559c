"""Tiny configs of every supported family, with the fields their Hub checkpoints carry.

Each builds in well under a second; `build_family_checkpoint` saves one with a tokenizer and rewrites
config.json keys to the names the Hub's originals use where transformers re-serialises them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.arch import decoder_layers, family_for_config, moe_block, parse_moe_name, router_tensors
from ream_hf.fixtures import build_tiny_tokenizer, hub_style_config
from tests.conftest import tensors

ATTENTION = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1)
MLA_ATTENTION = {k: v for k, v in ATTENTION.items() if k not in ("head_dim", "num_key_value_heads")}
NEXT_ATTENTION = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_conv_kernel_dim=4)

FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(ATTENTION, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                                         num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(ATTENTION, intermediate_size=128, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, num_hidden_layers=2, num_experts=16,
                                         num_experts_per_tok=4)),
    "mixtral": ("MixtralConfig", dict(ATTENTION, intermediate_size=32, num_hidden_layers=2, num_local_experts=16,
                                      num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(ATTENTION, intermediate_size=32, num_hidden_layers=2, num_experts=16,
                                  num_experts_per_tok=4)),
    "deepseek_v3": ("DeepseekV3Config", dict(MLA_ATTENTION, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                                             n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
                                             topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                                             norm_topk_prob=True, topk_method="noaux_tc", kv_lora_rank=32, q_lora_rank=None,
                                             qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)),
    "glm4_moe": ("Glm4MoeConfig", dict(ATTENTION, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                                       n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                                       first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True)),
    "qwen3_next": ("Qwen3NextConfig", dict(ATTENTION, **NEXT_ATTENTION, intermediate_size=128, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32, num_hidden_layers=4, num_experts=16,
                                           num_experts_per_tok=4, norm_topk_prob=True)),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(ATTENTION, **NEXT_ATTENTION, moe_intermediate_size=32,
                                                 shared_expert_intermediate_size=32, num_hidden_layers=4, num_experts=16,
                                                 num_experts_per_tok=4)),
    "gpt_oss": ("GptOssConfig", dict(ATTENTION, intermediate_size=32, num_hidden_layers=2, num_local_experts=16,
                                     num_experts_per_tok=4, sliding_window=32)),
}
FAMILIES = tuple(FAMILY_CONFIGS)  # the families whose outputs tests/output_digests.json pins byte for byte
DSA_ATTENTION = dict(MLA_ATTENTION, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                     v_head_dim=16, index_topk=8, index_head_dim=16, index_n_heads=2)
DEEPSEEK_MOE = dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=1,
                    num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
# issue 21's families, in order of demand (tests/test_families.py runs them with the 9 above)
MORE_FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "minimax_m2": ("MiniMaxM2Config", dict(ATTENTION, intermediate_size=32, num_hidden_layers=2, num_local_experts=16,
                                           num_experts_per_tok=4)),
    "deepseek_v32": ("DeepseekV32Config", dict(DSA_ATTENTION, **DEEPSEEK_MOE, num_hidden_layers=3,
                                               first_k_dense_replace=1)),
    # layer 1 takes layer 0's top-k tokens (index_topk < the 48-token calibration: the choice matters); layer 2 has
    # its own indexer, the template of the MTP layer tests/test_mtp.py adds
    "glm_moe_dsa": ("GlmMoeDsaConfig", dict(DSA_ATTENTION, **DEEPSEEK_MOE, num_hidden_layers=3, first_k_dense_replace=1,
                                            indexer_types=["full", "shared", "full"])),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(ATTENTION, intermediate_size=128, moe_intermediate_size=32,
                                                num_hidden_layers=3, moe_num_experts=16, moe_k=4,
                                                moe_num_shared_experts=1, moe_layer_start_index=1)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(ATTENTION, intermediate_size=32, num_hidden_layers=2, num_experts=16,
                                                  moe_topk=4)),
    "dots1": ("Dots1Config", dict(ATTENTION, **DEEPSEEK_MOE, num_hidden_layers=2, first_k_dense_replace=0)),
    # its config defaults to OLMo's 100k-vocabulary token ids: none here (the tiny checkpoints set the tokenizer's)
    "flex_olmo": ("FlexOlmoConfig", dict(ATTENTION, intermediate_size=32, num_hidden_layers=2, num_experts=16,
                                         num_experts_per_tok=4, pad_token_id=None, eos_token_id=None)),
    # layer 0 dense; layers 0 and 2 slide over 32 of the 48 calibration tokens, layer 1 attends to all
    "exaone_moe": ("ExaoneMoeConfig", dict(ATTENTION, intermediate_size=128, moe_intermediate_size=32, num_experts=16,
                                           num_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                                           routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3,
                                           first_k_dense_replace=1, sliding_window=32, sliding_window_pattern=2)),
    "solar_open": ("SolarOpenConfig", dict(ATTENTION, **DEEPSEEK_MOE, num_hidden_layers=2)),
    # sparsemixer routes top-2 whatever num_experts_per_tok says: 2, as Phi-3.5-MoE's config
    "phimoe": ("PhimoeConfig", dict(ATTENTION, intermediate_size=32, num_hidden_layers=2, num_local_experts=16,
                                    num_experts_per_tok=2, attention_bias=True, lm_head_bias=True)),
    # experts fused on disk under their own names (input_linear / output_linear), (E, 2D, H) non-square so that a
    # transposed read or write cannot pass; Granite's muP-style multipliers
    "granitemoe": ("GraniteMoeConfig", dict(ATTENTION, intermediate_size=16, num_hidden_layers=2, num_local_experts=16,
                                            num_experts_per_tok=4, embedding_multiplier=12.0, residual_multiplier=0.22,
                                            attention_multiplier=0.0625, logits_scaling=6.0)),
    # Granite-MoE's block beside a dense shared MLP on each layer (copied as stored)
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(ATTENTION, intermediate_size=16, shared_intermediate_size=32,
                                                        num_hidden_layers=2, num_local_experts=16, num_experts_per_tok=4,
                                                        embedding_multiplier=12.0, residual_multiplier=0.22,
                                                        attention_multiplier=0.0625, logits_scaling=6.0)),
    # Granite-4.0-H: Mamba-2 layers 0 and 2, attention layer 1 (RoPE), each with the MoE block and the shared MLP
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(ATTENTION, intermediate_size=16, shared_intermediate_size=32,
                                                        num_hidden_layers=3, num_local_experts=16, num_experts_per_tok=4,
                                                        layer_types=["linear_attention", "full_attention",
                                                                     "linear_attention"],
                                                        position_embedding_type="rope", mamba_n_heads=8,
                                                        mamba_d_state=16, mamba_chunk_size=16, embedding_multiplier=12.0,
                                                        residual_multiplier=0.22, attention_multiplier=0.0625,
                                                        logits_scaling=6.0)),
    # layer 0 dense; layers 0 and 2 slide over 32 of the 48 calibration tokens; the routing bias (expert_bias) kept
    # float32; muP input scaling and route_scale as Trinity's
    "afmoe": ("AfmoeConfig", dict(ATTENTION, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                                  num_dense_layers=1, num_experts=16, num_experts_per_tok=4, num_shared_experts=1,
                                  route_scale=2.5, sliding_window=32,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  mup_enabled=True)),
    # Mamba layers 0, 2, 3 and attention layer 1; MoE on layers 1 (attention) and 3 (Mamba), dense MLPs on 0 and 2
    "jamba": ("JambaConfig", dict({k: v for k, v in ATTENTION.items() if k != "head_dim"}, intermediate_size=32,
                                  num_hidden_layers=4, num_experts=16, num_experts_per_tok=2, attn_layer_period=4,
                                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                                  mamba_d_conv=4, mamba_expand=2)),
    # hybrid: short-conv and attention layers; layer 0 a dense MLP; embeddings tied as LFM2-8B-A1B's
    "lfm2_moe": ("Lfm2MoeConfig", dict({k: v for k, v in ATTENTION.items() if k != "head_dim"}, tie_word_embeddings=True,
                                       intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                                       layer_types=["conv", "full_attention", "conv"], num_dense_layers=1, num_experts=16,
                                       num_experts_per_tok=4, use_expert_bias=True, norm_topk_prob=True,
                                       routed_scaling_factor=2.5)),
}
FAMILY_CONFIGS.update(MORE_FAMILY_CONFIGS)
MORE_FAMILIES = tuple(MORE_FAMILY_CONFIGS)
# keys transformers re-serialises under another name than the family's Hub checkpoints use
HUB_KEY_RENAMES = {"qwen3_moe": {"num_local_experts": "num_experts"}}


def family_config(family: str, vocab_size: int, **overrides):
    class_name, kwargs = FAMILY_CONFIGS[family]
    return getattr(transformers, class_name)(vocab_size=vocab_size, **{**kwargs, **overrides})


def build_family_checkpoint(family: str, folder: Path, *, seed: int = 0, dtype: torch.dtype | None = None,
                            **overrides) -> Path:
    """A random checkpoint of `family` with a tokenizer, in float32, or in `dtype` as transformers saves a model
    loaded in it: tensors the model keeps in float32 (DeepSeek-V3's e_score_correction_bias) stay float32."""
    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(folder)
    config = family_config(family, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for module in model.modules():  # bias-corrected routers: make selection differ from scores
            for name in ("e_score_correction_bias", "expert_bias"):  # LFM2-MoE's is expert_bias
                if isinstance(bias := getattr(module, name, None), torch.Tensor):
                    bias.copy_(torch.randn(bias.shape) * 0.3)
        arch = family_for_config(config.to_dict())
        for layer in decoder_layers(model):  # a router transformers initialises to zeros (ERNIE): as trained
            weight = None if (block := moe_block(arch, layer)) is None else router_tensors(arch, block)["weight"]
            if weight is not None and not weight.any():
                weight.copy_(torch.randn(weight.shape) * 0.1)
        for name, param in model.named_parameters():  # GPT-OSS experts carry biases: as published, not zeros
            if name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
                param.copy_(torch.randn(param.shape) * 0.05)
    model.save_pretrained(str(folder))
    if dtype is not None:  # transformers' own load in `dtype` decides which tensors stay float32
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        model.save_pretrained(str(folder))
    if family in HUB_KEY_RENAMES:
        hub_style_config(folder, HUB_KEY_RENAMES[family])
    return folder


def compress(source: Path, calibration: Path, output: Path, *, method: str = "reap", target: int = 8,
             mtp: str = "compress", streaming: bool = False, settings: dict | None = None, **kw) -> ReamCompressor:
    """Compress a tiny family checkpoint (8 calibration sequences of 48 tokens, group size 4) and save it to
    `output`; `settings` are more `ReamConfig` fields, `kw` goes to `ReamCompressor.compress` (allow_full_width,
    work_dir, ...). In memory unless `streaming` (the library's default)."""
    config = ReamConfig(target_experts=target, method=method, calibration=[str(calibration)], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=48, batch_size=4, group_size=4, mtp=mtp,
                        streaming=streaming, **(settings or {}))
    compressor = ReamCompressor(config)
    compressor.compress(str(source), **kw)
    compressor.save_pretrained(output)
    return compressor


def assert_pruned_bit_exact(source, output):
    """A pruned checkpoint against its source: every tensor in the source's dtype; untouched tensors (shared experts
    and their gates included) bit-exact; output expert j and router row j bit-exact copies of the source's centroid
    j (per-expert or fused tensors, biases included). With the down-projection refit (the REAP default, recorded
    in config.json's ream_config) the experts' down projections are new: same dtype and shape, some changed, and
    everything else still bit-exact."""
    arch = family_for_config(json.loads((source / "config.json").read_text()))
    refit = json.loads((output / "config.json").read_text())["ream_config"]["refit"]
    manifest = json.loads((output / "ream_manifest.json").read_text())
    centroids = {entry["layer"]: [g["centroid"] for g in entry["groups"]] for entry in manifest["layers"]}
    src, out = tensors(source), tensors(output)
    refit_changed = []
    for name, tensor in out.items():
        parsed = parse_moe_name(arch, name)
        if parsed is None:
            want = src[name]
        elif parsed.kind == "expert":
            want = src[f"{parsed.experts_prefix}{centroids[parsed.layer_key][parsed.expert]}.{parsed.proj}.{parsed.param}"]
        else:  # fused experts (dim 0) or a router tensor (on the family's expert dimension)
            dim = arch.router_expert_dims.get(parsed.param, 0) if parsed.kind == "router" else 0
            want = src[name].index_select(dim, torch.tensor(centroids[parsed.layer_key]))
        down = parsed is not None and (parsed.proj == arch.disk_proj_names["down"] if parsed.kind == "expert"
                                       else parsed.kind == "fused" and parsed.param.startswith("down"))
        if "down" in refit and down:
            assert tensor.dtype == want.dtype and tensor.shape == want.shape, name
            refit_changed.append(not torch.equal(tensor, want))
            continue
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
    assert "down" not in refit or any(refit_changed), "the refit left every down projection as it was"


KIMI_K2_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModel": "modeling_deepseek.DeepseekV3Model",
                    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
REMOTE_CODE_STUB = "raise ImportError('ream-hf must not run the checkpoint\\'s own model code')\n"
KIMI_TOKENIZER_CODE = '''from transformers import PreTrainedTokenizerFast


class TikTokenTokenizer(PreTrainedTokenizerFast):
    """Stands in for Kimi-K2's tiktoken tokenizer (remote code); reads the tiny BPE's tokenizer.json."""
'''


def build_kimi_k2_checkpoint(folder: Path, *, dtype: torch.dtype = torch.bfloat16, **overrides) -> Path:
    """A tiny DeepSeek-V3 checkpoint laid out as moonshotai/Kimi-K2-Instruct is: config.json with model_type kimi_k2,
    the original DeepSeek-V3 keys transformers does not write (scoring_func, seq_aux, moe_layer_freq, yarn
    rope_scaling, torch_dtype, ...), one routing group, an auto_map to remote code that must never run, and a
    tokenizer that is remote code (tokenization_kimi.TikTokenTokenizer, here over the tiny BPE)."""
    folder = build_family_checkpoint("deepseek_v3", folder, dtype=dtype, **{"n_group": 1, "topk_group": 1, **overrides})
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_parameters", "dtype", "head_dim", "qk_head_dim", "rope_interleave", "output_router_logits"):
        config.pop(key, None)
    config.update(
        architectures=["DeepseekV3ForCausalLM"], auto_map=KIMI_K2_AUTO_MAP, model_type="kimi_k2", aux_loss_alpha=0.001,
        ep_size=1, moe_layer_freq=1, num_nextn_predict_layers=0, pretraining_tp=1, scoring_func="sigmoid", seq_aux=True,
        topk_method="noaux_tc", rope_theta=50000.0, torch_dtype=str(dtype).removeprefix("torch."),
        rope_scaling={"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 16, "type": "yarn"},
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        (folder / name).write_text(REMOTE_CODE_STUB)
    (folder / "tokenization_kimi.py").write_text(KIMI_TOKENIZER_CODE)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="TikTokenTokenizer",
                            auto_map={"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return folder


QWEN3_5_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                      num_position_embeddings=64, spatial_merge_size=2, temporal_patch_size=2)
QWEN3_5_IMAGE_TOKENS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)


def build_qwen3_5_vlm_checkpoint(folder: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A tiny Qwen3.5-MoE laid out as Qwen/Qwen3.5-35B-A3B is published: the vision-language model
    (Qwen3_5MoeForConditionalGeneration, model_type qwen3_5_moe, the decoder's settings nested in `text_config`), a
    vision tower under `model.visual.*`, the decoder under `model.language_model.*` with its experts fused on disk
    (`experts.gate_up_proj` (E, 2D, H), `experts.down_proj` (E, H, D)), and one MTP layer (`mtp.*`, per-expert
    tensors, `text_config.mtp_num_hidden_layers`) in a second shard, with an index."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(folder)
    _, text = FAMILY_CONFIGS["qwen3_5_moe"]
    text = dict(text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=QWEN3_5_VISION, tie_word_embeddings=False,
                                           **QWEN3_5_IMAGE_TOKENS)
    torch.manual_seed(seed)
    transformers.AutoModelForImageTextToText.from_config(config).save_pretrained(str(folder))
    transformers.AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype).save_pretrained(str(folder))

    trunk = load_file(folder / "model.safetensors")
    layers = "model.language_model.layers."
    template = max(i for i, kind in enumerate(config.text_config.layer_types) if kind == "full_attention")
    generator = torch.Generator().manual_seed(seed + 1)
    mtp = {}
    for name, tensor in trunk.items():  # the MTP layer: a full-attention decoder layer, random values
        if name.startswith(f"{layers}{template}."):
            scale = 0.05 if "norm" in name else max(float(tensor.float().std()), 0.02)
            mtp["mtp.layers.0." + name[len(f"{layers}{template}."):]] = \
                (torch.randn(tensor.shape, generator=generator) * scale).to(tensor.dtype)
    hidden = config.text_config.hidden_size
    mtp["mtp.fc.weight"] = (torch.randn(hidden, 2 * hidden, generator=generator) * 0.1).to(dtype)
    for part in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{part}.weight"] = (torch.randn(hidden, generator=generator) * 0.05).to(dtype)
    for index in range(config.text_config.num_hidden_layers):  # the trunk's experts fused, as published
        prefix, count = f"{layers}{index}.mlp.experts.", config.text_config.num_experts
        gate, up, down = ([trunk.pop(f"{prefix}{e}.{proj}.weight") for e in range(count)]
                          for proj in ("gate_proj", "up_proj", "down_proj"))
        trunk[f"{prefix}gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        trunk[f"{prefix}down_proj"] = torch.stack(down)
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": trunk, "model-00002-of-00002.safetensors": mtp}
    for shard, shard_tensors in shards.items():
        save_file(shard_tensors, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {name: shard for shard, t in shards.items() for name in sorted(t)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    saved = json.loads((folder / "config.json").read_text())
    saved["text_config"]["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    return folder


# vision-language families whose text model is compressed alone: config class, the text family whose tiny settings
# its text_config takes, vision settings, text settings changed (mrope sections sized to the tiny heads), image/video
# token ids
VLM_CHECKPOINTS: dict[str, tuple[str, str, dict, dict, dict]] = {
    "glm4v_moe": ("Glm4vMoeConfig", "glm4_moe",
                  dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                       image_size=32, spatial_merge_size=2, temporal_patch_size=2),
                  dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                            mrope_section=[2, 1, 1])),
                  dict(image_token_id=500, video_token_id=501, image_start_token_id=502, image_end_token_id=503,
                       video_start_token_id=504, video_end_token_id=505)),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "qwen3_moe",
                     dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                          num_position_embeddings=64, spatial_merge_size=2, temporal_patch_size=2,
                          deepstack_visual_indexes=[0]),
                     # 2D != H: the transposed experts on disk are told apart by shape, as transformers tells them
                     dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                               mrope_interleaved=True), moe_intermediate_size=16),
                     dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)),
}


def build_vlm_checkpoint(family: str, folder: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A tiny vision-language MoE laid out as its Hub release (zai-org/GLM-4.5V, Qwen/Qwen3-VL-30B-A3B): the
    ForConditionalGeneration model (the decoder's settings in `text_config`), a vision tower under `model.visual.*`,
    the decoder under `model.language_model.*` (Qwen3-VL-MoE's experts fused and transposed, as transformers saves
    them), bias-corrected routers' biases random."""
    class_name, text_family, vision, text_changes, tokens = VLM_CHECKPOINTS[family]
    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(folder)
    text = dict(FAMILY_CONFIGS[text_family][1], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **text_changes)
    config = getattr(transformers, class_name)(text_config=text, vision_config=vision, **tokens)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for module in model.modules():  # bias-corrected routers: make selection differ from scores
            if isinstance(bias := getattr(module, "e_score_correction_bias", None), torch.Tensor):
                bias.copy_(torch.randn(bias.shape) * 0.3)
    model.save_pretrained(str(folder))
    transformers.AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype).save_pretrained(str(folder))
    if family == "qwen3_vl_moe":  # as the Hub's: num_experts (transformers writes its alias), experts transposed
        from safetensors.torch import load_file, save_file

        saved = json.loads((folder / "config.json").read_text())
        saved["text_config"]["num_experts"] = saved["text_config"].pop("num_local_experts")
        (folder / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        stored = load_file(folder / "model.safetensors")
        for name in [n for n in stored if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            stored[name] = stored[name].transpose(1, 2).contiguous()  # (E, H, 2D), (E, D, H)
        save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
