"""`output_dtype="fp8"` (`--output-dtype fp8`): a plain source written FP8 block-wise in the compressing pass, as
DeepSeek-V3 and Qwen3-*-FP8 publish it; what is quantized, the quantization_config, the plan's size, our verification
and transformers' reload."""

import json

import pytest

from ream_hf.arch import family_for_config
from ream_hf.cli import main
from ream_hf.io.quantization import Fp8BlockOutput
from tests.test_plan import EXPERT, QWEN3_30B_A3B



def family(model_type: str):
    return family_for_config({"model_type": model_type, "num_experts": 16, "n_routed_experts": 16})


DEEPSEEK = family("deepseek_v3")


def decide(family, shapes: dict[str, tuple[int, ...]]) -> tuple[set[str], list[str]]:
    fp8 = Fp8BlockOutput(family, list(shapes))
    return {n for n, s in shapes.items() if fp8.quantizes(n, s)}, fp8.quantization_config(shapes)["modules_to_not_convert"]


def test_which_tensors_are_quantized_deepseek_v3_with_a_dense_layer_shared_experts_and_mtp():
    """Attention (MLA's partial blocks too), dense and shared MLPs and routed experts are FP8; routers, their bias
    correction, norms, embeddings, lm_head and the MTP heads are not, and each 2-D one is named exactly."""
    layer = "model.layers.{}."
    shapes = {"model.embed_tokens.weight": (512, 64), "lm_head.weight": (512, 64), "model.norm.weight": (64,)}
    for i in (0, 1, 3):  # 0 dense, 1 MoE, 3 the MTP layer (num_hidden_layers 3)
        p = layer.format(i)
        shapes |= {p + "self_attn.kv_a_proj_with_mqa.weight": (48, 64), p + "self_attn.o_proj.weight": (64, 64),
                   p + "input_layernorm.weight": (64,)}
        if i == 0:
            shapes |= {p + "mlp.gate_proj.weight": (128, 64), p + "mlp.down_proj.weight": (64, 128)}
        else:
            shapes |= {p + "mlp.gate.weight": (16, 64), p + "mlp.gate.e_score_correction_bias": (16,),
                       p + "mlp.shared_experts.up_proj.weight": (32, 64),
                       **{p + f"mlp.experts.{e}.{proj}.weight": (32, 64) for e in range(2) for proj in ("gate_proj", "up_proj")},
                       **{p + f"mlp.experts.{e}.down_proj.weight": (64, 32) for e in range(2)}}
    shapes |= {"model.layers.3.eh_proj.weight": (64, 128), "model.layers.3.enorm.weight": (64,),
               "model.layers.3.shared_head.head.weight": (512, 64), "model.layers.3.embed_tokens.weight": (512, 64)}
    quantized, kept = decide(DEEPSEEK, shapes)
    assert quantized == {n for n in shapes if n.endswith(("_proj.weight", "_mqa.weight")) and "eh_proj" not in n}
    assert kept == sorted(["lm_head", "model.embed_tokens", "model.layers.1.mlp.gate", "model.layers.3.mlp.gate",
                           "model.layers.3.eh_proj", "model.layers.3.shared_head.head", "model.layers.3.embed_tokens"])


def test_which_tensors_are_quantized_qwen3_5_vision_tower_linear_attention_mtp():
    """A Qwen3.5 layout with per-expert tensors: the vision tower, the linear attention's conv1d, the shared-expert
    gate and the MTP fc stay unquantized and are named; the MTP layer's linear weights are FP8."""
    lm = "model.language_model.layers.0."
    shapes = {lm + "mlp.experts.0.gate_proj.weight": (32, 64), lm + "mlp.experts.0.down_proj.weight": (64, 32),
              lm + "mlp.gate.weight": (16, 64), lm + "mlp.shared_expert_gate.weight": (1, 64),
              lm + "mlp.shared_expert.down_proj.weight": (64, 32), lm + "linear_attn.in_proj_qkvz.weight": (192, 64),
              lm + "linear_attn.conv1d.weight": (128, 1, 4), lm + "linear_attn.A_log": (4,),
              "model.visual.blocks.0.attn.qkv.weight": (96, 32), "model.visual.blocks.0.attn.qkv.bias": (96,),
              "mtp.fc.weight": (64, 128), "mtp.layers.0.mlp.experts.0.gate_proj.weight": (32, 64),
              "mtp.layers.0.mlp.gate.weight": (16, 64), "mtp.layers.0.self_attn.q_proj.weight": (64, 64),
              "model.language_model.embed_tokens.weight": (512, 64), "lm_head.weight": (512, 64)}
    quantized, kept = decide(family("qwen3_5_moe"), shapes)
    assert quantized == {lm + "mlp.experts.0.gate_proj.weight", lm + "mlp.experts.0.down_proj.weight",
                         lm + "mlp.shared_expert.down_proj.weight", lm + "linear_attn.in_proj_qkvz.weight",
                         "mtp.layers.0.mlp.experts.0.gate_proj.weight", "mtp.layers.0.self_attn.q_proj.weight"}
    assert kept == sorted(["lm_head", "model.language_model.embed_tokens", lm + "mlp.gate",
                           lm + "mlp.shared_expert_gate", lm + "linear_attn.conv1d", "model.visual.blocks.0.attn.qkv",
                           "mtp.fc", "mtp.layers.0.mlp.gate"])


@pytest.mark.parametrize("model_type, name", [("gpt_oss", "model.layers.0.mlp.experts.gate_up_proj"),
                                              ("qwen3_5_moe", "model.language_model.layers.0.mlp.experts.down_proj")])
def test_fused_experts_are_refused(model_type, name):
    """transformers 5 loads fused FP8 expert tensors without their scales (it reports them as unexpected)."""
    with pytest.raises(ValueError, match="stores them fused .* use output_dtype='bfloat16'"):
        Fp8BlockOutput(family(model_type), [name])


def test_plan_fp8_output_of_qwen3_30b_a3b_is_checkable_by_hand(tmp_path, capsys, no_weight_reads):
    """By hand, 96 of 128 experts kept: per layer q, k, v, o (18,874,368 values in 1,152 blocks) and 96 experts (each
    4,718,592 values in 288 blocks) at a byte a value and 4 a block; router, q/k norms and layer norms in bf16;
    embeddings and lm_head in bf16. 51.4% of the bf16 output."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    assert main(["plan", str(tmp_path), "--target-experts", "96", "--output-dtype", "fp8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    attention = 2 * 4096 * 2048 + 2 * 512 * 2048 + 4 * (2 * 32 * 16 + 2 * 4 * 16)
    layer = attention + 96 * (EXPERT + 4 * 288) + 2 * (96 * 2048 + 2 * 128 + 2 * 2048)
    assert plan["output_bytes"] == 48 * layer + 2 * (2 * 151936 * 2048 + 2048) == 23_918_727_168
    assert plan["output_bytes"] / 46_562_439_168 == pytest.approx(0.5137, abs=1e-4)  # / the bf16 output
    assert any("fp8" in note for note in plan["notes"])


# -- end to end, on a tiny bfloat16 Qwen3-MoE ------------------------------------------------------------------
@pytest.fixture(scope="module")
def outputs(tmp_path_factory, calibration_txt):
    """The same REAM run 16 -> 8 written twice: in the source's bfloat16 and, from the command line, as FP8."""
    import torch

    from ream_hf import ReamCompressor, ReamConfig
    from ream_hf.fixtures import build_tiny_qwen3_moe

    root = tmp_path_factory.mktemp("fp8-output")
    source = build_tiny_qwen3_moe(root / "source", dtype=torch.bfloat16)
    settings = dict(num_calibration_sequences=16, sequence_length=48, batch_size=4, group_size=4)
    compressor = ReamCompressor(ReamConfig(target_experts=8, method="ream", calibration=[str(calibration_txt)],
                                           calibration_ratios=None, **settings))
    compressor.compress(str(source))
    bf16 = compressor.save_pretrained(root / "bf16")
    assert main(["compress", str(source), "--target-experts", "8", "--method", "ream", "--calibration",
                 str(calibration_txt), "--num-sequences", "16", "--sequence-length", "48", "--batch-size", "4",
                 "--group-size", "4", "--output-dtype", "fp8", "--output", str(root / "fp8")]) == 0
    return {"source": source, "bf16": bf16, "fp8": root / "fp8", "root": root}


def test_fp8_output_is_the_bf16_output_quantized_as_it_is_written(outputs):
    """Every linear weight of the decoder layers is the bf16 output's tensor quantized with 128 x 128 blocks
    (transformers' rounding); every other tensor is the bf16 output's, bit for bit; no tensor is left over."""
    import torch

    from ream_hf.io.quantization import Fp8BlockFormat
    from tests.conftest import tensors

    bf16, fp8 = tensors(outputs["bf16"]), tensors(outputs["fp8"])
    fmt = Fp8BlockFormat({"weight_block_size": [128, 128]})
    quantized = {n for n, t in bf16.items() if t.dim() == 2 and n.startswith("model.layers.") and ".mlp.gate." not in n}
    assert quantized and all(".experts." in n or ".self_attn." in n for n in quantized)
    assert set(fp8) == set(bf16) | {fmt.scale_name(n) for n in quantized}
    for name, tensor in bf16.items():
        if name in quantized:
            fresh = fmt.quantize(name, tensor, {})
            assert fp8[name].dtype == torch.float8_e4m3fn and torch.equal(fp8[name].view(torch.uint8),
                                                                          fresh[name].view(torch.uint8)), name
            assert torch.equal(fp8[fmt.scale_name(name)], fresh[fmt.scale_name(name)]), name
        else:
            assert fp8[name].dtype == tensor.dtype and torch.equal(fp8[name], tensor), name
    config = json.loads((outputs["fp8"] / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]}
    assert config["ream_config"]["output_dtype"] == "fp8" and config["num_experts"] == 8


def test_plan_counts_the_fp8_output(outputs, capsys):
    """`ream-hf plan --output-dtype fp8` from the source's headers: the bytes the run wrote, exactly."""
    assert main(["plan", str(outputs["source"]), "--target-experts", "8", "--output-dtype", "fp8", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["output_bytes"]
    written = {kind: json.loads((outputs[kind] / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
               for kind in ("bf16", "fp8")}
    assert planned == written["fp8"] < written["bf16"]


def test_transformers_reloads_the_fp8_output_as_our_dequantization(outputs):
    """On a CPU transformers dequantizes an FP8 checkpoint as it loads it: the logits are those of our own
    dequantized twin, bit for bit (the tiny model's k_proj and down_proj have partial blocks)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ream_hf.io.dequantize import dequantize_checkpoint

    twin = dequantize_checkpoint(outputs["fp8"], outputs["root"] / "twin", "bfloat16")
    ids = torch.arange(3, 67).view(2, 32)
    logits = []
    for folder in (outputs["fp8"], twin):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_verify_requires_every_unquantized_module_named(outputs, tmp_path):
    """vLLM matches modules_to_not_convert by exact name: a bf16 router left out of it would be built as FP8."""
    from ream_hf.arch import family_for_config
    from ream_hf.io.source import SourceCheckpoint
    from ream_hf.io.verify import CheckpointError, verify_checkpoint
    from tests.test_quantized import rewrite

    config = json.loads((outputs["fp8"] / "config.json").read_text())
    family, source = family_for_config(config), SourceCheckpoint(outputs["source"])
    verify_checkpoint(outputs["fp8"], family, source)
    broken = rewrite(outputs["fp8"], tmp_path / "broken", lambda found: found)
    config["quantization_config"]["modules_to_not_convert"].remove("model.layers.1.mlp.gate")
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.gate.weight is BF16, not FP8, and "
                                              "modules_to_not_convert does not name model.layers.1.mlp.gate"):
        verify_checkpoint(broken, family, source)


@pytest.mark.parametrize("case", ["in memory", "mxfp4 source"])
def test_fp8_output_that_cannot_be_written_is_refused_before_any_work(case, qwen3_source, calibration_txt, tmp_path,
                                                                     capsys, no_work_started):
    from tests.test_quantized import with_quantization_config

    source, extra = qwen3_source, []
    if case == "in memory":
        extra = ["--no-streaming"]
    else:
        source = with_quantization_config(qwen3_source, tmp_path / "src", {"quant_method": "mxfp4"})
    capsys.readouterr()
    code = main([str(a) for a in ["compress", source, "--target-experts", "8", "--calibration", calibration_txt,
                                  "--output-dtype", "fp8", "--output", tmp_path / "out", *extra]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: output_dtype='fp8'") and "\n" not in err, err
    assert ("streaming" if case == "in memory" else "mxfp4-quantized") in err
    assert not (tmp_path / "out").exists()


def test_an_fp8_source_keeps_its_own_format():
    from ream_hf.io.quantization import Fp8BlockFormat, plan_output

    assert plan_output(Fp8BlockFormat({"weight_block_size": [128, 128]}), "fp8", True) is None
