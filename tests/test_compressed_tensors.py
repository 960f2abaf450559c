"""compressed-tensors sources (ream_hf/io/compressed_tensors.py): every format read and written back in itself, checked
against compressed-tensors' own quantization, dequantization and readers; Kimi-K2.5 / K2.6 in its published INT4
layout; schemes that need calibration data of their own refused before anything is read."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eval import bench_quantized as bench
from ream_hf.arch import family_for_config, parse_moe_name
from ream_hf.fixtures import (build_tiny_qwen3_moe, compressed_tensors_checkpoint, compressed_tensors_twin,
                              kimi_int4_scheme)
from ream_hf.io.compressed_tensors import observed_min_max, read_compressed_tensors
from ream_hf.io.safetensors import SINGLE_NAME
from ream_hf.io.source import SourceCheckpoint
from ream_hf.io.verify import CheckpointError, verify_checkpoint
from tests.conftest import tensors
from tests.test_bad_input import run_cli
from tests.test_quantized import rewrite

EXPERTS = ["re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$"]


def scheme(weights: dict, fmt: str, inputs: dict | None = None, targets=EXPERTS, **extra) -> dict:
    """A compressed-tensors quantization_config with one config group (as llm-compressor writes them)."""
    weights = {"dynamic": False, "actorder": None, "observer": "minmax", **weights}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": targets, "weights": weights, "input_activations": inputs,
                                          "output_activations": None}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, **extra}


INT = dict(type="int")
FP8 = dict(num_bits=8, type="float")
DYNAMIC_FP8_TOKENS = dict(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
# every format and strategy the issue lists, each as a published scheme of that format
SCHEMES = {
    "W4A16 group, pack-quantized": scheme(dict(INT, num_bits=4, strategy="group", group_size=32, symmetric=True),
                                          "pack-quantized"),
    "W4A16 group asymmetric (zero points), pack-quantized": scheme(
        dict(INT, num_bits=4, strategy="group", group_size=32, symmetric=False), "pack-quantized"),
    "W4A16 channel, pack-quantized": scheme(dict(INT, num_bits=4, strategy="channel", symmetric=True),
                                            "pack-quantized"),
    "W8A16 channel asymmetric, pack-quantized": scheme(dict(INT, num_bits=8, strategy="channel", symmetric=False),
                                                       "pack-quantized"),
    "FP8 channel (FP8_DYNAMIC), float-quantized": scheme(dict(FP8, strategy="channel", symmetric=True),
                                                         "float-quantized", DYNAMIC_FP8_TOKENS),
    # blocks of 32 (FP8_BLOCK's are 128): compressed-tensors' own dequantizer infers the block from the scale's shape
    # and takes a single column of blocks for a channel scale
    "FP8 block (FP8_BLOCK), float-quantized": scheme(
        dict(FP8, strategy="block", block_structure=[32, 32], symmetric=True), "float-quantized",
        dict(DYNAMIC_FP8_TOKENS, strategy="group", group_size=32)),
    "FP8 tensor, float-quantized": scheme(dict(FP8, strategy="tensor", symmetric=True), "float-quantized",
                                          DYNAMIC_FP8_TOKENS),
    "W8A16 channel, naive-quantized": scheme(dict(INT, num_bits=8, strategy="channel", symmetric=True),
                                             "naive-quantized"),
}


def manifest_groups(folder: Path) -> dict[str, list[dict]]:
    manifest = json.loads((folder / "ream_manifest.json").read_text())
    return {entry["layer"]: entry["groups"] for entry in manifest["layers"]}


def module_tensors(found: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """A module's stored tensors by parameter name (`weight_packed`, `weight_scale`, ...)."""
    return {name[len(module) + 1:]: tensor for name, tensor in found.items() if name.rpartition(".")[0] == module}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert got.keys() == want.keys(), where
    for param in want:
        assert got[param].dtype == want[param].dtype and torch.equal(got[param], want[param]), f"{where}.{param}"


def assert_written_in_the_source_scheme(source: Path, twin_out: Path, out: Path) -> tuple[int, int]:
    """Every output expert projection: a kept one (its group is its centroid alone, nothing changed it) is its
    centroid's stored tensors byte for byte; a merged one is the twin's merged values quantized afresh with the
    source's scheme (compressed-tensors' qparams and compressor), tensor for tensor. Returns (kept, merged)."""
    src, got, expected = tensors(source), tensors(out), tensors(twin_out)
    fmt = SourceCheckpoint(source).quantization
    infos = SourceCheckpoint(source).tensor_infos
    kept = merged = 0
    for layer, groups in manifest_groups(out).items():
        for group in groups:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                module, centroid = (f"{layer}.mlp.experts.{e}.{proj}" for e in (group["output_expert"],
                                                                                  group["centroid"]))
                if len(group["members"]) == 1:
                    assert_same(module_tensors(got, module), module_tensors(src, centroid), module)
                    kept += 1
                else:
                    fresh = fmt.quantize(f"{module}.weight", expected[f"{module}.weight"], infos)
                    assert_same(module_tensors(got, module), {n.rpartition(".")[2]: t for n, t in fresh.items()},
                                module)
                    merged += 1
    return kept, merged


# -- the scheme math, against compressed-tensors' own ---------------------------------------------------------
@pytest.mark.parametrize("strategy", ["tensor", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_observed_min_max_gives_compressed_tensors_own_qparams(strategy, symmetric):
    """Where compressed-tensors computes weight qparams itself (`compute_dynamic_scales_and_zp`: tensor and group),
    our min/max per unit, through its `calculate_qparams`, gives the same scales and zero points."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp

    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    args = QuantizationArgs(num_bits=4, type="int", strategy=strategy, group_size=32 if strategy == "group" else None,
                            symmetric=symmetric)
    ours = calculate_qparams(*observed_min_max(weight, args), args)
    theirs = compute_dynamic_scales_and_zp(weight, args, module=None)
    for got, want in zip(ours, theirs):
        assert got.shape == want.shape and torch.equal(got, want)


def test_partial_edge_blocks_dequantize_with_the_scheme_args():
    """A (200, 130) FP8 weight in 128 x 128 blocks has partial edge blocks; each value is its stored FP8 value
    times its own block's scale (the scheme's block structure is passed to compressed-tensors' `dequantize`: its
    compressor would infer 100 x 65 blocks from the scale's shape)."""
    config = scheme(dict(FP8, strategy="block", block_structure=[128, 128], symmetric=True), "float-quantized",
                    targets=["Linear"])
    fmt = read_compressed_tensors(config)
    torch.manual_seed(0)
    weight = torch.randn(200, 130)
    stored = fmt.quantize("m.weight", weight, {})
    assert stored["m.weight"].dtype == torch.float8_e4m3fn and stored["m.weight_scale"].shape == (2, 2)
    real = fmt.dequantize("m.weight", stored)
    scale = stored["m.weight_scale"].repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
    assert torch.equal(real, stored["m.weight"].float() * scale)
    assert ((real - weight).abs() <= weight.abs() / 16 + 1e-6).all()  # e4m3: 3 mantissa bits


def test_scheme_matching_follows_compressed_tensors():
    """Exact names before `re:` patterns before class names; `ignore` wins; a module is quantized only where its
    scheme's tensors are stored (a `Linear` target also names routers and norms, stored plain)."""
    config = scheme(dict(INT, num_bits=4, strategy="group", group_size=32, symmetric=True), "pack-quantized",
                    targets=["Linear"])
    config["config_groups"]["group_1"] = {"targets": ["re:.*experts.*", "model.layers.0.mlp.experts.0.up_proj"],
                                          "weights": dict(INT, num_bits=8, strategy="channel", symmetric=False)}
    config["ignore"] = ["lm_head", "re:.*self_attn.*"]
    fmt = read_compressed_tensors(config)
    assert fmt.scheme("model.layers.0.self_attn.q_proj") is None and fmt.scheme("lm_head") is None
    assert fmt.scheme("model.layers.0.mlp.experts.1.up_proj").weights.num_bits == 8
    assert fmt.scheme("model.layers.0.mlp.shared_expert.up_proj").weights.num_bits == 4  # Linear
    expert = "model.layers.0.mlp.experts.1.down_proj"
    assert fmt.stored_layout(f"{expert}.weight") == tuple(f"{expert}.{p}" for p in (
        "weight_packed", "weight_scale", "weight_shape", "weight_zero_point"))
    assert fmt.real_name(f"{expert}.weight_zero_point") == f"{expert}.weight"
    names = {"model.norm.weight", "model.layers.0.mlp.gate.weight"}
    assert not fmt.is_quantized("model.layers.0.mlp.gate.weight", names)


# -- every format, end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_qwen3(tmp_path_factory) -> Path:
    """A bfloat16 Qwen3-MoE whose dims are multiples of every group and block below (hidden 128, experts 64)."""
    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("ct") / "plain", dtype=torch.bfloat16)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_each_format_is_written_back_in_its_own_scheme(name, plain_qwen3, calibration_txt, tmp_path):
    """A Qwen3-MoE quantized by compressed-tensors (its model-free converter) in each format, compressed with REAM
    (--refit none): kept experts are the source's stored tensors byte for byte; merged ones are the merged values of
    the dequantized twin (compressed-tensors' own dequantization) quantized afresh in the source's scheme; the
    quantization_config is the source's; our check passes; compressed-tensors' own dequantizer reads the output, and
    our reading of every source tensor is its."""
    source = compressed_tensors_checkpoint(plain_qwen3, tmp_path / "source", SCHEMES[name])
    twin = compressed_tensors_twin(source, tmp_path / "twin")
    expected_real = tensors(twin)
    for real, tensor in SourceCheckpoint(source).iter_real_tensors(list(expected_real)):
        assert torch.equal(tensor.to(torch.bfloat16), expected_real[real]), real
    run = dict(sequences=8, length=48, refit="none", prune_fallback=False)  # merged experts stay (the floor may prune)
    twin_out = bench.compress(twin, calibration_txt, tmp_path / "twin-out", "ream", **run)
    out = bench.compress(source, calibration_txt, tmp_path / "out", "ream", **run)
    kept, merged = assert_written_in_the_source_scheme(source, twin_out, out)
    assert kept and merged
    configs = [json.loads((folder / "config.json").read_text()) for folder in (source, out)]
    assert configs[1]["quantization_config"] == configs[0]["quantization_config"]
    family = family_for_config(configs[1])
    verify_checkpoint(out, family, SourceCheckpoint(source))
    readable = tensors(compressed_tensors_twin(out, tmp_path / "out-twin"))
    ours = dict(SourceCheckpoint(out).iter_real_tensors(list(readable)))
    assert all(torch.equal(ours[n].to(readable[n].dtype), readable[n]) for n in readable)


# -- Kimi-K2.5 / K2.6: the published INT4, a vision tower, transformers' reload, KL ------------------------------
@pytest.fixture(scope="module")
def kimi_runs(tmp_path_factory):
    """eval/bench_quantized.py on the Kimi-K2.5 INT4 fixture at a small calibration size (--refit none): per method,
    the outputs of compressing the twin, the INT4 source (INT4 output) and the INT4 source with --output-dtype
    bfloat16, with KLs (an INT4 output dequantized by compressed-tensors first). The merge floor is off: merged
    experts must stay to be tested."""
    rows = bench.run(tmp_path_factory.mktemp("kimi"), ("reap", "ream"), 16, 48, source="kimi-int4", prune_fallback=False)
    return {row["method"]: row for row in rows}


@pytest.mark.parametrize("method", ["reap", "ream"])
def test_kimi_k26_int4_is_compressed_in_its_published_format(kimi_runs, method):
    """The done-when of issue 21 for Kimi-K2.6's format: kept experts byte-identical, merged experts in the same
    scheme, the vision tower, projector, attention, shared experts and every other tensor as stored, the
    quantization_config kept in text_config; its KL to the source is within 5% of compressing the dequantized twin
    (REAP's is the twin's exactly), and with --output-dtype bfloat16 it is the twin's output tensor for tensor."""
    row = kimi_runs[method]
    source, twin_out, out, bf16_out = (row["quantized_source"], *(row["folders"][m] for m in bench.MODES))
    kept, merged = assert_written_in_the_source_scheme(source, twin_out, out)
    assert kept and (merged > 0) == (method == "ream")
    src, got = tensors(source), tensors(out)
    family = family_for_config(json.loads((source / "config.json").read_text()))
    untouched = [n for n in src if parse_moe_name(family, SourceCheckpoint(source).quantization.real_name(n)) is None]
    assert {n.split(".")[0] for n in untouched} >= {"vision_tower", "mm_projector"}
    assert all(torch.equal(got[n], src[n]) for n in untouched)
    configs = [json.loads((folder / "config.json").read_text()) for folder in (source, out, bf16_out)]
    assert configs[1]["text_config"]["quantization_config"] == configs[0]["text_config"]["quantization_config"]
    assert "quantization_config" not in configs[2]["text_config"] and configs[1]["text_config"]["n_routed_experts"] == 8
    assert tensors(bf16_out).keys() == tensors(twin_out).keys()
    assert all(torch.equal(tensors(bf16_out)[n], t) for n, t in tensors(twin_out).items())
    kl = row["kl"]
    assert kl["twin"] > 0.01 and kl["quantized->bfloat16"] == kl["twin"]
    if method == "reap":
        assert kl["quantized"] == kl["twin"]
    else:
        assert kl["quantized"] != kl["twin"] and abs(kl["quantized"] - kl["twin"]) <= 0.05 * kl["twin"]


def test_kimi_output_reloads_through_transformers_as_we_read_it(kimi_runs):
    """transformers' compressed-tensors support (on CPU: it decompresses the packed experts as it loads them, in
    bfloat16) reads the REAM output's experts, merged ones included, as our dequantization does."""
    out = kimi_runs["ream"]["folders"]["quantized"]
    model = bench.load_model(out, torch.bfloat16)
    assert model.config.text_config.quantization_config is not None
    experts = model.model.language_model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape[0] == 8
    prefix = "language_model.model.layers.1.mlp.experts."
    names = [f"{prefix}{e}.{p}.weight" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")]
    ours = dict(SourceCheckpoint(out).iter_real_tensors(names))
    for e in range(8):
        gate_up = torch.cat([ours[f"{prefix}{e}.gate_proj.weight"], ours[f"{prefix}{e}.up_proj.weight"]])
        assert torch.equal(experts.gate_up_proj[e], gate_up.to(torch.bfloat16))
        assert torch.equal(experts.down_proj[e], ours[f"{prefix}{e}.down_proj.weight"].to(torch.bfloat16))


def test_kimi_refit_quantizes_only_the_refit_down_projections_afresh(tmp_path):
    """REAP's default refit changes the kept experts' down projections alone: those are quantized afresh (the twin's
    refit values in the source's scheme); gate and up projections stay the source's bytes."""
    row = bench.run(tmp_path, ("reap",), 16, 48, refit="down", source="kimi-int4")[0]
    source, twin_out, out = row["quantized_source"], row["folders"]["twin"], row["folders"]["quantized"]
    src, got, expected = tensors(source), tensors(out), tensors(twin_out)
    fmt, infos = SourceCheckpoint(source).quantization, SourceCheckpoint(source).tensor_infos
    changed = 0
    for layer, groups in manifest_groups(out).items():
        for group in groups:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                module, centroid = (f"{layer}.mlp.experts.{e}.{proj}" for e in (group["output_expert"],
                                                                                  group["centroid"]))
                if proj == "down_proj":
                    fresh = fmt.quantize(f"{module}.weight", expected[f"{module}.weight"], infos)
                    assert_same(module_tensors(got, module), {n.rpartition(".")[2]: t for n, t in fresh.items()},
                                module)
                    changed += not torch.equal(got[f"{module}.weight_packed"], src[f"{centroid}.weight_packed"])
                else:
                    assert_same(module_tensors(got, module), module_tensors(src, centroid), module)
    assert changed
    assert abs(row["kl"]["quantized"] - row["kl"]["twin"]) <= 0.05 * row["kl"]["twin"]


def add_kimi_mtp_layer(folder: Path, seed: int = 1) -> Path:
    """A DeepSeek-V3 next-n layer for a tiny kimi_k25 (its text_config counts it): `language_model.model.layers.N.*`
    with N = num_hidden_layers, the trunk's last layer's tensors (random values), `eh_proj`, `enorm`, `hnorm`,
    `shared_head.norm`, `shared_head.head` and `embed_tokens`, as DeepSeek-V3 publishes its MTP layer."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    n, hidden, prefix = text["num_hidden_layers"], text["hidden_size"], "language_model.model.layers."
    found = load_file(folder / SINGLE_NAME)
    generator = torch.Generator().manual_seed(seed)
    rand = lambda like, scale: (torch.randn(like.shape, generator=generator) * scale).to(like.dtype)  # noqa: E731
    for name, tensor in list(found.items()):
        if name.startswith(f"{prefix}{n - 1}."):
            found[f"{prefix}{n}." + name[len(f"{prefix}{n - 1}."):]] = \
                1 + rand(tensor, 0.05) if "norm" in name else rand(tensor, max(float(tensor.float().std()), 0.02))
    norm = found["language_model.model.norm.weight"]
    found |= {f"{prefix}{n}.eh_proj.weight": rand(torch.empty(hidden, 2 * hidden, dtype=norm.dtype), 0.1),
              f"{prefix}{n}.enorm.weight": 1 + rand(norm, 0.05), f"{prefix}{n}.hnorm.weight": 1 + rand(norm, 0.05),
              f"{prefix}{n}.shared_head.norm.weight": 1 + rand(norm, 0.05),
              f"{prefix}{n}.shared_head.head.weight": found["language_model.lm_head.weight"].clone(),
              f"{prefix}{n}.embed_tokens.weight": found["language_model.model.embed_tokens.weight"].clone()}
    save_file(found, str(folder / SINGLE_NAME), metadata={"format": "pt"})
    text["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def test_kimi_k25_mtp_layer_is_compressed_in_int4(calibration_txt, tmp_path):
    """A kimi_k25 whose text_config counts an MTP layer (`language_model.model.layers.N`, as DeepSeek-V3): the layer
    is read from the published names, compressed like the trunk's and written back in the source's INT4 scheme."""
    from ream_hf.fixtures import build_tiny_kimi_k25

    plain = add_kimi_mtp_layer(build_tiny_kimi_k25(tmp_path / "plain", dtype=torch.bfloat16))
    source = compressed_tensors_checkpoint(plain, tmp_path / "int4", kimi_int4_scheme(), in_text_config=True)
    twin = compressed_tensors_twin(source, tmp_path / "twin")
    run = dict(sequences=8, length=48, refit="none", prune_fallback=False)  # merged experts stay (the floor may prune)
    twin_out = bench.compress(twin, calibration_txt, tmp_path / "twin-out", "ream", **run)
    out = bench.compress(source, calibration_txt, tmp_path / "out", "ream", **run)
    assert "language_model.model.layers.3" in manifest_groups(out)
    kept, merged = assert_written_in_the_source_scheme(source, twin_out, out)
    assert kept and merged
    got = tensors(out)
    assert {int(n.split(".experts.")[1].split(".")[0]) for n in got if n.startswith("language_model.model.layers.3.")
            and ".experts." in n} == set(range(8))
    assert json.loads((out / "config.json").read_text())["text_config"]["num_nextn_predict_layers"] == 1


@pytest.mark.parametrize("case", ["no streaming", "loaded model"])
def test_kimi_k25_outside_the_streaming_loader_is_refused_first(case, kimi_runs, calibration_txt, no_work_started):
    """transformers would load a kimi_k25 folder as DeepSeek-V3 with none of its weights, and writes a loaded one
    back in names of its own: both refused before any read."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ream_hf import ReamCompressor, ReamConfig

    folder = kimi_runs["reap"]["twin_source"]
    if case == "loaded model":
        with torch.device("meta"):
            source = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
    else:
        source = str(folder)
    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        streaming=case != "no streaming")
    with pytest.raises(ValueError, match="streaming loader only") as error:
        ReamCompressor(config).compress(source)
    assert "\n" not in str(error.value)


# -- our check of compressed-tensors outputs ----------------------------------------------------------------------
@pytest.mark.parametrize("damage, message", [
    ("missing scale", "lacks language_model.model.layers.1.mlp.experts.3.gate_proj.weight_scale"),
    ("orphan of a removed expert", "orphan tensor language_model.model.layers.1.mlp.experts.8.gate_proj.weight_scale"),
    ("zero point of a symmetric scheme", "orphan tensor language_model.model.layers.1.mlp.experts.3.gate_proj."
                                         "weight_zero_point"),
    ("misshaped scale", "expected \\(64, 4\\)"),
    ("expert written plain",
     "layer language_model.model.layers.1 gate_proj of expert 3 is stored as weight \\(BF16\\)"),
])
def test_verify_checks_each_experts_scheme_tensors(kimi_runs, tmp_path, damage, message):
    good = kimi_runs["ream"]["folders"]["quantized"]
    source = SourceCheckpoint(kimi_runs["ream"]["quantized_source"])
    family = family_for_config(source.config)
    verify_checkpoint(good, family, source)
    module = "language_model.model.layers.1.mlp.experts.3.gate_proj"

    def edit(found):
        if damage == "missing scale":
            del found[f"{module}.weight_scale"]
        elif damage == "orphan of a removed expert":  # the bug of issue 10, in this format
            found["language_model.model.layers.1.mlp.experts.8.gate_proj.weight_scale"] = \
                found[f"{module}.weight_scale"].clone()
        elif damage == "zero point of a symmetric scheme":
            found[f"{module}.weight_zero_point"] = torch.zeros(8, 4, dtype=torch.int32)
        elif damage == "misshaped scale":
            found[f"{module}.weight_scale"] = torch.ones(64, 2, dtype=torch.bfloat16)
        else:
            for param in ("weight_packed", "weight_scale", "weight_shape"):
                del found[f"{module}.{param}"]
            found[f"{module}.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
        return found

    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(rewrite(good, tmp_path / "broken", edit), family, source)


# -- refusals, before anything is read ----------------------------------------------------------------------------
W8A8_STATIC = scheme(dict(INT, num_bits=8, strategy="channel", symmetric=True), "int-quantized",
                     dict(num_bits=8, type="int", strategy="tensor", symmetric=True, dynamic=False))
W4A8_STATIC = scheme(dict(INT, num_bits=4, strategy="group", group_size=128, symmetric=True), "int-quantized",
                     dict(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False))
NVFP4 = scheme(dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True),
               "nvfp4-pack-quantized", dict(num_bits=4, type="float", strategy="tensor_group", group_size=16,
                                            symmetric=True, dynamic="local"))
REFUSED = {
    "W8A8 static": (W8A8_STATIC, "static activation scales (W8A8)"),
    "W4A8 static": (W4A8_STATIC, "static activation scales (W4A8)"),
    "NVFP4": (NVFP4, "global scale (tensor_group, NVFP4)"),
    "KV-cache scales": (dict(SCHEMES["W4A16 group, pack-quantized"], kv_cache_scheme=dict(num_bits=8, type="float")),
                        "kv_cache_scheme"),
    "MXFP4 (Kimi-K3)": (scheme(dict(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True,
                                    scale_dtype="torch.uint8"), "mxfp4-pack-quantized"), "'mxfp4-pack-quantized'"),
    "activation-ordered groups": (scheme(dict(INT, num_bits=4, strategy="group", group_size=32, symmetric=True,
                                              actorder="group"), "pack-quantized"), "actorder 'group'"),
    "not compressed": (dict(SCHEMES["W4A16 group, pack-quantized"], quantization_status="frozen"), "'frozen'"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_schemes_needing_their_own_calibration_or_unwritten_formats_are_refused_first(kind, qwen3_source,
                                                                                      calibration_txt, tmp_path,
                                                                                      capsys, no_work_started):
    quantization, reason = REFUSED[kind]
    source = tmp_path / "src"
    shutil.copytree(qwen3_source, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    code, err = run_cli(["compress", source, "--target-experts", "8", "--calibration", calibration_txt,
                         "--output", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "compressed-tensors" in err and reason in err and "CompressedTensorsDequantizer" in err, err
    assert not (tmp_path / "out").exists()


def test_kimi_int4_scheme_is_the_published_one():
    """The fixture's scheme reads as Kimi-K2-Thinking's published config does (W4A16, pack-quantized, symmetric
    group 32 on Linear targets, experts only) and is written back."""
    fmt = read_compressed_tensors(kimi_int4_scheme())
    group = fmt.scheme("language_model.model.layers.1.mlp.experts.0.gate_proj")
    assert (group.weights.num_bits, group.weights.group_size, group.weights.symmetric) == (4, 32, True)
    layer = "language_model.model.layers."
    for ignored in (f"{layer}1.self_attn.q_a_proj", f"{layer}1.mlp.shared_experts.up_proj", f"{layer}0.mlp.gate_proj",
                    "vision_tower.encoder.blocks.0.wqkv", "mm_projector.proj.0"):
        assert fmt.scheme(ignored) is None, ignored
