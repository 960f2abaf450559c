"""Quantized sources: FP8 block-wise (read dequantized, written as FP8 or dequantized), MXFP4 (read dequantized,
written bf16), every other format refused before any tensor is read; our verification of quantized outputs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Quantize

from eval import bench_quantized as bench
from ream_hf import ReamCompressor, ReamConfig
from ream_hf.arch import ExpertWeights, family_for_config
from ream_hf.fixtures import fp8_block_checkpoint, mxfp4_checkpoint
from ream_hf.io.dequantize import dequantize_checkpoint
from ream_hf.io.quantization import Fp8BlockFormat, dequantize_fp8_blocks, quantize_fp8_blocks
from ream_hf.io.safetensors import INDEX_NAME, SINGLE_NAME
from ream_hf.io.source import SourceCheckpoint
from ream_hf.io.verify import CheckpointError, verify_checkpoint
from ream_hf.io.writer import LayerOutput, output_tensors
from ream_hf.release.card import weights_summary
from tests.conftest import tensors
from tests.families import build_family_checkpoint
from tests.test_bad_input import run_cli
from tests.test_mtp import add_mtp_layers

BLOCK = (128, 128)
SCALE = ".weight_scale_inv"


# -- the block math, on hand-made tensors --------------------------------------------------------------------
def test_dequantize_expands_each_scale_over_its_block_including_partial_edge_blocks():
    weight = torch.ones(200, 130).to(torch.float8_e4m3fn)  # blocks: rows 128 + 72, cols 128 + 2
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    real = dequantize_fp8_blocks(weight, scale, BLOCK)
    assert real[:128, :128].unique().tolist() == [1.0] and real[:128, 128:].unique().tolist() == [2.0]
    assert real[128:, :128].unique().tolist() == [3.0] and real[128:, 128:].unique().tolist() == [4.0]
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        dequantize_fp8_blocks(weight, torch.ones(1, 2), BLOCK)


def test_quantize_matches_transformers_rounding_and_round_trips():
    torch.manual_seed(0)
    weight = torch.randn(256, 384) * 0.05
    weight[:128, :128] = 0  # an all-zero block: scale 1, values 0
    ours, inv = quantize_fp8_blocks(weight, BLOCK)
    theirs = Fp8Quantize(type("Q", (), {"quantization_config": FineGrainedFP8Config()})()).convert({"w.weight": weight})
    assert torch.equal(ours.view(torch.uint8), theirs["w.weight"].view(torch.uint8))
    assert torch.equal(inv, theirs["w.weight_scale_inv"]) and inv[0, 0] == 1.0
    # partial blocks: zero padding leaves each block's amax, so every block's largest value maps to +-448
    odd = torch.randn(200, 130)
    q, s = quantize_fp8_blocks(odd, BLOCK)
    assert q.shape == (200, 130) and s.shape == (2, 2)
    assert q[128:, 128:].float().abs().max() == 448 and q[:128, :128].float().abs().max() == 448
    real = dequantize_fp8_blocks(q, s, BLOCK)
    assert ((real - odd).abs() <= odd.abs() / 16 + 1e-6).all()  # e4m3: 3 mantissa bits
    # quantizing real FP8 values again gives the same bytes and scales (kept tensors stay as they were)
    again_q, again_s = quantize_fp8_blocks(real, BLOCK)
    assert torch.equal(again_q.view(torch.uint8), q.view(torch.uint8)) and torch.allclose(again_s, s, rtol=1e-6)


def test_ue8m0_scales_are_powers_of_two():
    q, s = quantize_fp8_blocks(torch.randn(130, 260), BLOCK, "ue8m0")
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    assert (dequantize_fp8_blocks(q, s, BLOCK) - dequantize_fp8_blocks(q, s, BLOCK)).abs().max() == 0


# -- FP8 block source end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fp8_runs(tmp_path_factory):
    """eval/bench_quantized.py at a small calibration size: per method (reap, ream, ream with the neuron merge), the
    outputs of compressing the dequantized twin, the FP8 source (FP8 output) and the FP8 source with output_dtype
    bfloat16, with KLs. The merge floor is off: on this random model it may prune every group, and what is tested
    here is how merged experts are written."""
    return {row["method"]: row for row in bench.run(tmp_path_factory.mktemp("fp8"), ("reap", *MERGES), 16, 48,
                                                    prune_fallback=False)}


def manifest_groups(folder: Path) -> dict[str, list[dict]]:
    manifest = json.loads((folder / "ream_manifest.json").read_text())
    return {entry["layer"]: entry["groups"] for entry in manifest["layers"]}


MERGES = ("ream", "ream:merge=neurons")


@pytest.mark.parametrize("method", ["reap", *MERGES])
def test_fp8_source_compresses_as_its_dequantized_twin(fp8_runs, method):
    """The done-when of issue 10, measured by next-token KL on held-out tokens: the FP8 source's outputs, after
    dequantization, are as good as the twin's. With --output-dtype bfloat16 the output is the twin's output,
    tensor for tensor; as FP8, REAP's kept experts are the twin's exactly and REAM's merged ones differ only by
    the re-quantization."""
    row = fp8_runs[method]
    kl = row["kl"]
    twin_out, fp8_out, bf16_out = (row["folders"][m] for m in bench.MODES)
    assert kl["twin"] > 0.01  # compression changed the model: the comparison can fail
    expected, got = tensors(twin_out), tensors(bf16_out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
    assert kl["quantized->bfloat16"] == kl["twin"]
    assert weights_summary(fp8_out).parameters == weights_summary(twin_out).parameters  # scales are not parameters
    assert "quantization_config" not in json.loads((bf16_out / "config.json").read_text())
    if method == "reap":
        assert kl["quantized"] == kl["twin"]
    else:
        assert kl["quantized"] != kl["twin"] and abs(kl["quantized"] - kl["twin"]) <= 0.02 * kl["twin"]


@pytest.mark.parametrize("method", ["reap", *MERGES])
def test_fp8_output_keeps_experts_bit_exact_requantizes_merged_ones_and_orphans_nothing(fp8_runs, method):
    row = fp8_runs[method]
    source, out_folder = row["quantized_source"], row["folders"]["quantized"]
    src, out, twin_out = tensors(source), tensors(out_folder), tensors(row["folders"]["twin"])
    src_config, out_config = (json.loads((f / "config.json").read_text()) for f in (source, out_folder))
    assert out_config["quantization_config"] == src_config["quantization_config"]
    fmt = Fp8BlockFormat(src_config["quantization_config"])
    merged = kept = 0
    for layer, groups in manifest_groups(out_folder).items():
        for group in groups:
            j, c = group["output_expert"], group["centroid"]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name, source_name = (f"{layer}.mlp.experts.{e}.{proj}.weight" for e in (j, c))
                if len(group["members"]) == 1:  # kept: the source's bytes and its own scale, renumbered
                    assert torch.equal(out[name].view(torch.uint8), src[source_name].view(torch.uint8))
                    assert torch.equal(out[fmt.scale_name(name)], src[fmt.scale_name(source_name)])
                    kept += 1
                else:  # merged: quantized afresh from the merged real values (the twin's merged expert)
                    fresh = fmt.quantize(name, twin_out[name], {})
                    assert torch.equal(out[name].view(torch.uint8), fresh[name].view(torch.uint8))
                    assert torch.equal(out[fmt.scale_name(name)], fresh[fmt.scale_name(name)])
                    merged += 1
    assert kept and (merged > 0) == (method in MERGES)
    scales = {n for n in out if n.endswith(SCALE)}
    assert scales == {fmt.scale_name(n) for n, t in out.items() if t.dtype == torch.float8_e4m3fn}
    experts = {int(n.split(".experts.")[1].split(".")[0]) for n in out if ".experts." in n}
    assert experts == set(range(8))
    untouched = [n for n in src if ".experts." not in n and ".mlp.gate." not in n]
    assert untouched and all(torch.equal(out[n].view(torch.uint8), src[n].view(torch.uint8)) for n in untouched)


def test_fp8_source_with_the_refit_quantizes_only_the_refit_projections_afresh(tmp_path):
    """REAP's default refit gives every kept expert a new down projection: an FP8 output quantizes those down
    projections afresh from the twin's refit values (the refit of the FP8 source's real values is the twin's refit,
    tensor for tensor) and copies the gate and up projections, which the refit leaves alone, with their own bytes
    and scales; it scores within 2% of the twin and leaves no scale orphaned."""
    row = bench.run(tmp_path, ("reap",), 16, 48, refit="down")[0]
    twin_out, fp8_out, bf16_out = (row["folders"][m] for m in bench.MODES)
    expected, out = tensors(twin_out), tensors(fp8_out)
    got = tensors(bf16_out)
    assert expected.keys() == got.keys() and all(torch.equal(got[n], expected[n]) for n in expected)
    fmt = Fp8BlockFormat(json.loads((row["quantized_source"] / "config.json").read_text())["quantization_config"])
    source, stored = tensors(row["twin_source"]), tensors(row["quantized_source"])
    refit_changed = 0
    for layer, groups in manifest_groups(fp8_out).items():
        for group in groups:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"{layer}.mlp.experts.{group['output_expert']}.{proj}.weight"
                source_name = f"{layer}.mlp.experts.{group['centroid']}.{proj}.weight"
                want = fmt.quantize(name, expected[name], {}) if proj == "down_proj" else \
                    {name: stored[source_name], fmt.scale_name(name): stored[fmt.scale_name(source_name)]}
                assert torch.equal(out[name].view(torch.uint8), want[name].view(torch.uint8)), name
                assert torch.equal(out[fmt.scale_name(name)], want[fmt.scale_name(name)]), name
                refit_changed += proj == "down_proj" and not torch.equal(expected[name], source[source_name])
    assert refit_changed
    kl = row["kl"]
    assert kl["quantized->bfloat16"] == kl["twin"] and abs(kl["quantized"] - kl["twin"]) <= 0.02 * kl["twin"]
    scales = {n for n in out if n.endswith(SCALE)}
    assert scales == {fmt.scale_name(n) for n, t in out.items() if t.dtype == torch.float8_e4m3fn}


def test_fp8_deepseek_v3_with_mla_shared_experts_and_mtp(calibration_txt, tmp_path):
    """DeepSeek-V3's FP8 layout: MLA projections with partial blocks (kv_a_proj_with_mqa: 48 rows), a dense first
    layer, shared experts, a float32 routing bias and an MTP layer (its eh_proj quantized too), compressed with
    REAP: the FP8 output dequantizes to the twin's output, the bfloat16 output is it."""
    plain = add_mtp_layers(build_family_checkpoint("deepseek_v3", tmp_path / "plain"))
    fp8 = fp8_block_checkpoint(plain, tmp_path / "fp8")
    stored = SourceCheckpoint(fp8).tensor_infos
    assert stored["model.layers.3.eh_proj.weight_scale_inv"].shape == (1, 1)
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == "F8_E4M3"
    twin = dequantize_checkpoint(fp8, tmp_path / "twin", "bfloat16")
    run = dict(sequences=8, length=48)
    outputs = {mode: bench.compress(fp8 if mode != "twin" else twin, calibration_txt, tmp_path / f"out-{mode}", "reap", **run,
                                    output_dtype="bfloat16" if mode == "bf16" else None)
               for mode in ("twin", "fp8", "bf16")}
    expected = tensors(outputs["twin"])
    assert any(n.startswith("model.layers.3.mlp.experts.7.") for n in expected)  # the MTP layer, compressed
    for got in (tensors(outputs["bf16"]), tensors(dequantize_checkpoint(outputs["fp8"], tmp_path / "fp8-deq"))):
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) and got[n].dtype == expected[n].dtype for n in expected)
    assert tensors(outputs["fp8"])["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


# MiniMax-M2 / M2.5's published quantization_config: the dtype's name for `fmt`, the router and its routing bias named
MINIMAX_M2_FP8 = {"fmt": "float8_e4m3fn", "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}


@pytest.fixture(scope="module")
def minimax_m2_fp8(tmp_path_factory):
    """(FP8 source, its dequantized bfloat16 twin): a tiny MiniMax-M2 as MiniMaxAI publishes it."""
    folder = tmp_path_factory.mktemp("minimax_m2")
    plain = build_family_checkpoint("minimax_m2", folder / "plain", dtype=torch.bfloat16)
    fp8 = fp8_block_checkpoint(plain, folder / "fp8", quantization_config=MINIMAX_M2_FP8)
    return fp8, dequantize_checkpoint(fp8, folder / "twin", "bfloat16")


@pytest.mark.parametrize("method", ["reap", "ream"])
def test_fp8_minimax_m2_as_published_compresses_verifies_and_reloads(minimax_m2_fp8, method, calibration_txt,
                                                                      tmp_path):
    """MiniMax-M2 in its published FP8 layout (128 x 128 blocks, per-expert w1 / w2 / w3 under block_sparse_moe, the
    float32 routing bias, config.json's own `fmt` spelling) with the library's defaults (REAP's down refit): the FP8
    output verifies against the source, keeps its quantization_config, and transformers reloads it to our own
    dequantization of it; with output_dtype bfloat16 the output is the twin's, tensor for tensor."""
    from transformers import AutoModelForCausalLM

    from tests.families import compress

    fp8, twin = minimax_m2_fp8
    outputs = {}
    for mode, source, settings in (("twin", twin, {}), ("fp8", fp8, {}), ("bf16", fp8, {"output_dtype": "bfloat16"})):
        compress(source, calibration_txt, tmp_path / mode, method=method, streaming=True, settings=settings)
        outputs[mode] = tmp_path / mode
    config = json.loads((outputs["fp8"] / "config.json").read_text())
    verify_checkpoint(outputs["fp8"], family_for_config(config), SourceCheckpoint(fp8))
    assert config["quantization_config"] == json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert config["num_local_experts"] == 8
    out = tensors(outputs["fp8"])
    assert out["model.layers.0.block_sparse_moe.experts.7.w1.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.0.block_sparse_moe.e_score_correction_bias"].dtype == torch.float32
    expected, got = tensors(outputs["twin"]), tensors(outputs["bf16"])
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[n], expected[n]) and got[n].dtype == expected[n].dtype for n in expected)
    reloaded = AutoModelForCausalLM.from_pretrained(str(outputs["fp8"])).state_dict()  # FP8 dequantized on CPU
    ours = AutoModelForCausalLM.from_pretrained(str(dequantize_checkpoint(outputs["fp8"], tmp_path / "deq")),
                                                dtype=torch.bfloat16).state_dict()
    assert reloaded.keys() == ours.keys() and all(torch.equal(reloaded[n], ours[n]) for n in ours)


def test_fused_fp8_experts_keep_unchanged_rows_and_requantize_merged_ones(tmp_path):
    """Experts stored fused (`experts.gate_up_proj` (E, 2I, H) with a per-expert block grid), projection by
    projection: an unchanged output expert takes its source expert's FP8 rows and scales; one whose down projection
    alone changed (a refit) keeps its source's gate_up rows and gets a fresh down projection."""
    torch.manual_seed(0)
    fmt = Fp8BlockFormat({"quant_method": "fp8", "weight_block_size": [128, 128]})
    prefix = "model.layers.0.mlp."
    stored = {prefix + "gate.weight": torch.randn(4, 160).to(torch.bfloat16)}
    stored.update(fmt.quantize(prefix + "experts.gate_up_proj", torch.randn(4, 192, 160) * 0.1, {}))
    stored.update(fmt.quantize(prefix + "experts.down_proj", torch.randn(4, 160, 96) * 0.1, {}))
    tmp_path.joinpath("src").mkdir()
    save_file(stored, str(tmp_path / "src" / SINGLE_NAME))
    config = {"model_type": "qwen3_moe", "hidden_size": 160, "moe_intermediate_size": 96, "num_experts": 4,
              "quantization_config": fmt.config}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    source = SourceCheckpoint(tmp_path / "src")
    family = family_for_config(config)
    real = dict(source.iter_real_tensors([prefix + "experts.gate_up_proj", prefix + "experts.down_proj"]))
    gate_up, down = real[prefix + "experts.gate_up_proj"], real[prefix + "experts.down_proj"]
    experts = ExpertWeights(gate=gate_up[[2, 0], :96], up=gate_up[[2, 0], 96:], down=down[[2, 0]].clone())
    experts.down[1] *= 0.5  # output expert 1's down projection is refit: changed values, gate and up as they were
    output = LayerOutput(experts=experts, router={"weight": stored[prefix + "gate.weight"][[2, 0]]}, centroids=[2, 0],
                         copy_stored_bytes=[frozenset({"gate", "up", "down"}), frozenset({"gate", "up"})])
    written = dict(output_tensors(source, family, list(source.weight_map), {"model.layers.0": output}))
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        q, s = written[prefix + name], written[prefix + name + "_scale_inv"]
        assert q.shape[0] == 2 and s.shape == (2, *stored[prefix + name + "_scale_inv"].shape[1:])
        kept = [(0, 2), (1, 0)] if name == "experts.gate_up_proj" else [(0, 2)]
        for j, c in kept:
            assert torch.equal(q[j].view(torch.uint8), stored[prefix + name][c].view(torch.uint8))
            assert torch.equal(s[j], stored[prefix + name + "_scale_inv"][c])
    fresh = fmt.quantize("d", experts.down[1], {})
    assert torch.equal(written[prefix + "experts.down_proj"][1].view(torch.uint8), fresh["d"].view(torch.uint8))
    assert torch.equal(written[prefix + "experts.down_proj_scale_inv"][1], fresh["d_scale_inv"])


# -- verification of quantized outputs ---------------------------------------------------------------------
def rewrite(folder: Path, target: Path, edit) -> Path:
    """A copy of checkpoint `folder` with its tensors passed through `edit` (dict -> dict), in one shard."""
    shutil.copytree(folder, target)
    for shard in target.glob("*.safetensors"):
        shard.unlink()
    (target / INDEX_NAME).unlink(missing_ok=True)
    save_file(edit(tensors(folder)), str(target / SINGLE_NAME))
    return target


@pytest.mark.parametrize("damage, message", [
    ("missing", "has no scale"),
    ("orphan", "orphan scale model.layers.0.mlp.experts.8.gate_proj.weight_scale_inv"),
    ("misshaped", "expected (1, 2)"),
    ("unquantized config", "no quantization_config"),
])
def test_verify_catches_missing_orphan_and_misshaped_scales(fp8_runs, tmp_path, damage, message):
    row = fp8_runs["reap"]
    good = row["folders"]["quantized"]
    family = family_for_config(json.loads((good / "config.json").read_text()))
    source = SourceCheckpoint(row["quantized_source"])
    verify_checkpoint(good, family, source)
    name = "model.layers.0.mlp.experts.3.gate_proj.weight"

    def edit(found):
        if damage == "missing":
            del found[name + "_scale_inv"]
        elif damage == "orphan":  # a removed expert's scale left behind: the bug this issue started from
            found["model.layers.0.mlp.experts.8.gate_proj.weight_scale_inv"] = found[name + "_scale_inv"].clone()
        elif damage == "misshaped":
            found[name + "_scale_inv"] = torch.ones(2, 2)
        return found

    broken = rewrite(good, tmp_path / "broken", edit)
    if damage == "unquantized config":
        config = json.loads((broken / "config.json").read_text())
        del config["quantization_config"]
        (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message.replace("(", "\\(").replace(")", "\\)")):
        verify_checkpoint(broken, family, source)


# -- MXFP4 (GPT-OSS) ---------------------------------------------------------------------------------------
def test_mxfp4_source_is_read_through_transformers_conversion_and_written_bf16(tmp_path, calibration_txt):
    plain = build_family_checkpoint("gpt_oss", tmp_path / "plain")
    mxfp4 = mxfp4_checkpoint(plain, tmp_path / "mxfp4")
    twin = dequantize_checkpoint(mxfp4, tmp_path / "twin", "bfloat16")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    real = dict(SourceCheckpoint(mxfp4).iter_real_tensors([name]))[name]
    original = tensors(plain)[name]
    assert real.shape == original.shape and (real - original).abs().max() <= original.abs().max() / 6
    outputs = []
    for source in (mxfp4, twin):
        config = ReamConfig(target_experts=8, method="ream", calibration=[str(calibration_txt)], calibration_ratios=None,
                            num_calibration_sequences=8, sequence_length=48, batch_size=4, group_size=4)
        compressor = ReamCompressor(config)
        compressor.compress(str(source))
        outputs.append(compressor.save_pretrained(tmp_path / f"out-{source.name}"))
    from_mxfp4, from_twin = (tensors(f) for f in outputs)
    assert from_mxfp4.keys() == from_twin.keys() and not any(n.endswith(("_blocks", "_scales")) for n in from_mxfp4)
    assert all(torch.equal(from_mxfp4[n], from_twin[n]) for n in from_twin)
    assert from_mxfp4[name].dtype == torch.bfloat16 and from_mxfp4[name].shape[0] == 8
    assert "quantization_config" not in json.loads((outputs[0] / "config.json").read_text())


# -- refusals, before anything is read ---------------------------------------------------------------------
REFUSED = {
    "awq": ({"quant_method": "awq", "bits": 4}, "AWQ", "unquantized (bf16) release"),
    "gptq": ({"quant_method": "gptq", "bits": 4}, "GPTQ", "unquantized (bf16) release"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes", "unquantized"),
    "fp8 per-tensor": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "per-tensor FP8", "unquantized"),
    "fp8 static": ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
                   "activation_scheme 'static'", "unquantized"),
}


def with_quantization_config(qwen3_source: Path, folder: Path, quantization: dict) -> Path:
    shutil.copytree(qwen3_source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    return folder


@pytest.mark.parametrize("kind", list(REFUSED))
def test_unsupported_quantization_is_refused_before_anything_is_read(kind, qwen3_source, calibration_txt, tmp_path,
                                                                     capsys, no_work_started):
    quantization, names, way_out = REFUSED[kind]
    source = with_quantization_config(qwen3_source, tmp_path / "src", quantization)
    code, err = run_cli(["compress", str(source), "--target-experts", "8", "--calibration", str(calibration_txt),
                         "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert names in err and way_out in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["output dtype of a plain source", "fp8 in memory", "quantized model object"])
def test_output_choices_that_cannot_be_done_are_refused_before_anything_is_read(case, qwen3_source, calibration_txt,
                                                                                tmp_path, no_work_started):
    overrides, source = {}, qwen3_source
    if case == "output dtype of a plain source":
        overrides["output_dtype"] = "bfloat16"
    elif case == "fp8 in memory":
        overrides["streaming"] = False
        source = with_quantization_config(qwen3_source, tmp_path / "src", {"quant_method": "fp8",
                                                                            "weight_block_size": [128, 128]})
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(qwen3_source)
        with torch.device("meta"):
            source = AutoModelForCausalLM.from_config(config)
        source.config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        **overrides)
    with pytest.raises(ValueError) as error:
        ReamCompressor(config).compress(source if not isinstance(source, Path) else str(source))
    message = str(error.value)
    assert "\n" not in message and {"output dtype of a plain source": "not quantized", "fp8 in memory": "streaming",
                                     "quantized model object": "loaded quantized"}[case] in message



def test_cli_output_dtype_reaches_the_config(qwen3_source, calibration_txt, tmp_path, capsys, no_work_started):
    code, err = run_cli(["compress", str(qwen3_source), "--target-experts", "8", "--calibration", str(calibration_txt),
                         "--output-dtype", "bfloat16", "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "output_dtype='bfloat16' is for quantized sources" in err and "\n" not in err
