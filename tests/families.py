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
from ream_hf.arch import family_for_config, parse_moe_name
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
FAMILIES = tuple(FAMILY_CONFIGS)
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
    for module in model.modules():  # bias-corrected routers: make selection differ from scores
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape) * 0.3)
    model.save_pretrained(str(folder))
    if dtype is not None:  # transformers' own load in `dtype` decides which tensors stay float32
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        model.save_pretrained(str(folder))
    if family in HUB_KEY_RENAMES:
        hub_style_config(folder, HUB_KEY_RENAMES[family])
    return folder


def compress(source: Path, calibration: Path, output: Path, *, method: str = "reap", target: int = 8,
             mtp: str = "compress", streaming: bool = False, **kw) -> ReamCompressor:
    """Compress a tiny family checkpoint (8 calibration sequences of 48 tokens, group size 4) and save it to
    `output`; `kw` goes to `ReamCompressor.compress` (allow_full_width, work_dir, ...). In memory unless
    `streaming` (the library's default)."""
    config = ReamConfig(target_experts=target, method=method, calibration=[str(calibration)], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=48, batch_size=4, group_size=4, mtp=mtp,
                        streaming=streaming)
    compressor = ReamCompressor(config)
    compressor.compress(str(source), **kw)
    compressor.save_pretrained(output)
    return compressor


def assert_pruned_bit_exact(source, output):
    """A pruned checkpoint against its source: every tensor in the source's dtype; untouched tensors (shared experts
    and their gates included) bit-exact; output expert j and router row j bit-exact copies of the source's centroid
    j (per-expert or fused tensors, biases included)."""
    arch = family_for_config(json.loads((source / "config.json").read_text()))
    manifest = json.loads((output / "ream_manifest.json").read_text())
    centroids = {entry["layer"]: [g["centroid"] for g in entry["groups"]] for entry in manifest["layers"]}
    src, out = tensors(source), tensors(output)
    for name, tensor in out.items():
        parsed = parse_moe_name(arch, name)
        if parsed is None:
            want = src[name]
        elif parsed.kind == "expert":
            want = src[f"{parsed.experts_prefix}{centroids[parsed.layer_key][parsed.expert]}.{parsed.proj}.{parsed.param}"]
        else:  # fused experts or a router tensor: indexed by expert on dim 0
            want = src[name][centroids[parsed.layer_key]]
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
