"""transformers' own entry point (`from_pretrained(..., quantization_config=ReamConfig(...))`, registered by
`import ream_hf`) and optimum's `OptimumQuantizer` contract on `ReamCompressor`."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.cli import main as cli
from tests.conftest import snapshot, tensors
from tests.families import build_family_checkpoint
from tests.test_mtp import add_mtp_layers

REPO = Path(__file__).resolve().parent.parent
IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def hf_config(calibration: Path, **overrides) -> ReamConfig:
    """16 -> 8 experts on 8 calibration sequences of 64 tokens (group size 4 for the merging methods)."""
    kwargs = dict(target_experts=8, method="reap", calibration=[str(calibration)], calibration_ratios=None,
                  num_calibration_sequences=8, sequence_length=64, batch_size=4, group_size=4)
    return ReamConfig(**{**kwargs, **overrides})


def run_python(*parts: str) -> str:
    code = "\n".join(textwrap.dedent(part) for part in parts)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


# -- registration --------------------------------------------------------------------------------------------

def test_import_registers_ream_in_transformers_public_registry():
    """`import ream_hf` registers "ream" through transformers' own registry (`register_quantization_config` /
    `register_quantizer`); also when the registry was imported first, and again, replacing our own classes, when
    our module is reloaded."""
    check = """
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
        from ream_hf.config import ReamConfig
        from ream_hf.integrations.transformers import ReamHfQuantizer
        assert AUTO_QUANTIZER_MAPPING["ream"] is ReamHfQuantizer
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["ream"] is ReamConfig
    """
    run_python("import ream_hf", check)
    run_python("import transformers.quantizers.auto\nimport ream_hf", check)
    run_python("""
        import importlib
        import ream_hf.integrations.transformers as module
        importlib.reload(module)  # registering again replaces our own classes, never raises "already registered"
    """, check.replace("from ream_hf.integrations.transformers import ReamHfQuantizer",
                        "ReamHfQuantizer = module.ReamHfQuantizer"))


def test_ream_config_serialisation_through_transformers_registry(calibration_txt):
    from transformers.quantizers.auto import AutoQuantizationConfig

    config = hf_config(calibration_txt, method="ream", merge="logits")  # an old alias, stored under its new name
    data = config.to_dict()
    assert data["quant_method"] == "ream" and data["merge"] == "activations"
    again = AutoQuantizationConfig.from_dict(data)
    assert isinstance(again, ReamConfig) and again.to_dict() == data
    assert json.loads(config.to_json_string()) == data


# -- from_pretrained -> save_pretrained -> plain reload ------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(qwen3_source, calibration_txt, tmp_path_factory):
    """The tiny Qwen3-MoE compressed by `from_pretrained` (REAP, 16 -> 8) and saved with transformers' own
    `save_pretrained`."""
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_source), quantization_config=hf_config(calibration_txt))
    folder = tmp_path_factory.mktemp("hf") / "out"
    model.save_pretrained(str(folder))
    return model, folder


def test_from_pretrained_returns_the_compressed_model_detached_from_the_quantizer(loaded):
    model, _ = loaded
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert not hasattr(model.config, "quantization_config") and "_is_quantized" not in vars(model.config)
    assert model.config.num_experts == 8
    for layer in model.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape[0] == 8 and layer.mlp.gate.weight.shape[0] == 8
    assert model.ream_manifest["experts_after"] == 8 and len(model.ream_manifest["layers"]) == 2
    assert torch.isfinite(model(IDS).logits).all()
    copy.deepcopy(model).half()  # refused for quantized models: this one is an ordinary model again


def test_saved_config_has_ream_config_and_family_key_never_quantization_config(loaded, tmp_path):
    model, folder = loaded
    saved = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in saved and "_is_quantized" not in saved
    assert saved["num_experts"] == 8, "the family's own key, as `ream-hf compress` writes it"
    assert saved.get("num_local_experts", 8) == 8
    assert saved["ream_config"]["quant_method"] == "ream" and "streaming" not in saved["ream_config"]
    assert ReamConfig.from_pretrained(folder).target_experts == 8
    model.save_pretrained(str(tmp_path / "again"))  # a second save writes the same folder
    assert snapshot(tmp_path / "again") == snapshot(folder)


def test_plain_transformers_reloads_it_without_ream_hf(loaded, tmp_path):
    """A fresh process in which ream_hf cannot even be imported loads the folder and gives the same logits."""
    model, folder = loaded
    with torch.no_grad():
        expected = model.eval()(IDS).logits
    torch.save(IDS, tmp_path / "ids.pt")
    run_python(f"""
        import sys
        import importlib.abc

        class NoReamHf(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "ream_hf":
                    raise ImportError("ream_hf must not be needed to load its output")

        sys.meta_path.insert(0, NoReamHf())
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        assert model.config.num_experts == 8 and getattr(model, "hf_quantizer", None) is None
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        assert not any(name.split(".")[0] == "ream_hf" for name in sys.modules)
    """)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


@pytest.mark.parametrize("method", ["reap", "ream"])
def test_from_pretrained_equals_the_cli(method, qwen3_source, calibration_txt, tmp_path):
    """Same settings, same result: `ream-hf compress` (streaming) and from_pretrained write bit-identical expert and
    router tensors (every tensor, in fact) and the same groups. REAM runs without its floors, so that merges stay on
    this random model and both paths write merged experts."""
    floors = ["--no-merge-floor"] if method == "ream" else []
    code = cli(["compress", str(qwen3_source), "--target-experts", "8", "--method", method, "--calibration",
                str(calibration_txt), "--num-sequences", "8", "--sequence-length", "64", "--batch-size", "4",
                "--group-size", "4", "--output", str(tmp_path / "cli"), *floors])
    assert code == 0
    settings = dict(prune_fallback=False, layer_floor=False) if floors else {}
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_source),
                                                 quantization_config=hf_config(calibration_txt, method=method,
                                                                               **settings))
    model.save_pretrained(str(tmp_path / "hf"))
    by_cli, by_hf = tensors(tmp_path / "cli"), tensors(tmp_path / "hf")
    assert by_cli.keys() == by_hf.keys()
    assert [name for name in by_cli if not torch.equal(by_cli[name], by_hf[name])] == []
    manifest = json.loads((tmp_path / "cli" / "ream_manifest.json").read_text())
    assert manifest["layers"] == model.ream_manifest["layers"]
    if method == "ream":
        assert any(len(g["members"]) > 1 for entry in manifest["layers"] for g in entry["groups"]), "real merges"


# -- refusals before any weight is read ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def glm_with_mtp(tmp_path_factory) -> Path:
    return add_mtp_layers(build_family_checkpoint("glm4_moe", tmp_path_factory.mktemp("glm") / "source"))


@pytest.mark.parametrize("case, message", [
    ("target equals experts", "equals the model's 16 experts"),
    ("target below top-k", r"below the router's top-k \(4\)"),
    ("missing calibration", "does not exist"),
    ("quantization_config in config.json", "delete that entry"),
])
def test_from_pretrained_refuses_before_loading_weights(case, message, qwen3_source, calibration_txt, tmp_path,
                                                       no_weight_reads):
    source, kwargs = qwen3_source, {}
    if case == "quantization_config in config.json":
        source = tmp_path / "source"
        shutil.copytree(qwen3_source, source)
        config = json.loads((source / "config.json").read_text())
        config["quantization_config"] = hf_config(calibration_txt).to_dict()
        (source / "config.json").write_text(json.dumps(config))
    else:
        overrides = {"target equals experts": {"target_experts": 16}, "target below top-k": {"target_experts": 3},
                     "missing calibration": {}}[case]
        calibration = tmp_path / "nothing.txt" if case == "missing calibration" else calibration_txt
        kwargs["quantization_config"] = hf_config(calibration, **overrides)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(str(source), **kwargs)


WHOLE_MODULES = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")


@pytest.mark.parametrize("device_map, device, gpus, message", [
    (dict(zip(WHOLE_MODULES, ["cpu", "disk", "cpu", "cpu"])), None, 0, "on cpu, disk: .*without offload"),
    (dict(zip(WHOLE_MODULES, [0, 1, 1, 0])), None, 2, "on cuda:0, cuda:1: .*one device"),
    (dict(zip(WHOLE_MODULES, [0, "cpu", "cpu", 0])), None, 1, "on cpu, cuda:0: .*without offload"),
    ("auto", None, 2, "this machine's 2 GPUs"),
    ("cuda", "cpu", 1, "places the model on cuda:0 but ReamConfig.device is 'cpu'"),
    ("cpu", "cuda:1", 2, "places the model on cpu but ReamConfig.device is 'cuda:1'"),
])
def test_from_pretrained_refuses_device_maps_before_loading(device_map, device, gpus, message, qwen3_source,
                                                             calibration_txt, monkeypatch, no_weight_reads):
    """Several devices, offload, or a map that contradicts ReamConfig.device: one line each, before a shard is opened
    (the number of GPUs this machine has is what `device_map="auto"` decides on; faked, nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(str(qwen3_source), device_map=device_map,
                                             quantization_config=hf_config(calibration_txt, device=device))


def test_the_config_device_follows_a_single_device_map(calibration_txt):
    from ream_hf.integrations.transformers import ReamHfQuantizer

    config = hf_config(calibration_txt)
    quantizer = ReamHfQuantizer(config, pre_quantized=False)
    quantizer.validate_environment(device_map={"": torch.device("cuda:1")})
    assert quantizer.quantization_config.device == "cuda:1" and config.device is None, "the caller's config untouched"
    assert quantizer.update_device_map({"": torch.device("cuda:1")}) == {"": "cuda:1"}
    given = ReamHfQuantizer(hf_config(calibration_txt, device="cuda:0"), pre_quantized=False)
    given.validate_environment(device_map={"": 0})  # the same device, spelt otherwise
    assert given.update_device_map(None) == {"": "cuda:0"}, "ReamConfig.device alone places the model"
    assert ReamHfQuantizer(hf_config(calibration_txt), pre_quantized=False).update_device_map(None) is None, "transformers' CPU load"


def test_device_map_auto_on_one_device_compresses_there(qwen3_source, calibration_txt, tmp_path):
    """`device_map="auto"` where there is one device (this machine's CPU): the whole model there, compressed."""
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_source), device_map="auto",
                                                 quantization_config=hf_config(calibration_txt))
    assert model.config.num_experts == 8 and model.config.ream_config["device"] == "cpu"
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_the_tokenizer_comes_from_the_models_revision_and_subfolder(qwen3_source, calibration_txt, tmp_path,
                                                                   monkeypatch, no_weight_reads):
    """revision, token, subfolder and trust_remote_code reach the tokenizer (the first thing loaded: a fake
    records its arguments and stops the load)."""
    import transformers

    root = tmp_path / "repo"
    shutil.copytree(qwen3_source, root / "sub")
    calls = []

    def record(name, **kwargs):
        calls.append((name, kwargs))
        raise RuntimeError("recorded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    with pytest.raises(ValueError, match="cannot load the tokenizer.*recorded"):
        AutoModelForCausalLM.from_pretrained(str(root), subfolder="sub", revision="v1.0", token="hf_test",
                                             trust_remote_code=True, quantization_config=hf_config(calibration_txt))
    assert calls == [(str(root), {"revision": "v1.0", "token": "hf_test", "subfolder": "sub",
                                  "local_files_only": True, "trust_remote_code": True})]


@pytest.fixture(scope="module")
def fp8_source(qwen3_source, tmp_path_factory) -> Path:
    from ream_hf.fixtures import fp8_block_checkpoint

    return fp8_block_checkpoint(qwen3_source, tmp_path_factory.mktemp("fp8") / "source")


def test_from_pretrained_refuses_a_quantized_source_in_one_line(fp8_source, qwen3_source, calibration_txt, tmp_path,
                                                                no_weight_reads):
    """An FP8 checkpoint (transformers would otherwise raise its class-mismatch error between FineGrainedFP8Config
    and ReamConfig) and one in a format transformers has no quantizer for: ream-hf's line, naming `ream-hf compress`."""
    fp8 = fp8_source
    with pytest.raises(ValueError, match=r"is a fp8 checkpoint, which from_pretrained cannot compress.*ream-hf compress"):
        AutoModelForCausalLM.from_pretrained(str(fp8), quantization_config=hf_config(calibration_txt))
    other = tmp_path / "other"
    shutil.copytree(qwen3_source, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "made_up_int3"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is a made_up_int3 checkpoint, which from_pretrained cannot compress"):
        AutoModelForCausalLM.from_pretrained(str(other), quantization_config=hf_config(calibration_txt))


def test_from_pretrained_refuses_mtp_layers_it_cannot_keep(glm_with_mtp, calibration_txt, no_weight_reads):
    for mode in ("compress", "keep"):
        with pytest.raises(ValueError, match=rf"multi-token-prediction layers \(model\.layers\.3\.\*\).*cannot {mode} them.*mtp='drop'"):
            AutoModelForCausalLM.from_pretrained(str(glm_with_mtp),
                                                 quantization_config=hf_config(calibration_txt, mtp=mode))


def test_from_pretrained_with_mtp_drop_writes_a_consistent_checkpoint(glm_with_mtp, calibration_txt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(glm_with_mtp),
                                                 quantization_config=hf_config(calibration_txt, mtp="drop"))
    model.save_pretrained(str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["n_routed_experts"] == 8 and saved["num_nextn_predict_layers"] == 0
    assert not [name for name in tensors(tmp_path / "out") if name.startswith("model.layers.3.")]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert reloaded.model.layers[2].mlp.experts.gate_up_proj.shape[0] == 8


# -- optimum's OptimumQuantizer contract ---------------------------------------------------------------------

def test_optimum_from_pretrained_and_quantize(qwen3_source, calibration_txt, tmp_path):
    from optimum.quantization_base import OptimumQuantizer

    compressor = ReamCompressor.from_pretrained(str(qwen3_source), config=hf_config(calibration_txt))
    assert isinstance(compressor, OptimumQuantizer)
    assert compressor.quantize(tmp_path / "out", file_prefix="model") == tmp_path / "out"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 8
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    by_fields = ReamCompressor.from_pretrained(str(qwen3_source), target_experts=8, method="reap",
                                               calibration=[str(calibration_txt)], calibration_ratios=None,
                                               num_calibration_sequences=8, sequence_length=64, batch_size=4)
    by_fields.quantize(tmp_path / "fields")
    assert snapshot(tmp_path / "fields").keys() == snapshot(tmp_path / "out").keys()


def test_optimum_arguments_that_cannot_be_honoured_are_refused_before_work(qwen3_source, calibration_txt, tmp_path,
                                                                          no_work_started):
    compressor = ReamCompressor.from_pretrained(str(qwen3_source), config=hf_config(calibration_txt))
    with pytest.raises(ValueError, match="file_prefix='compressed'.*leave file_prefix out"):
        compressor.quantize(tmp_path / "out", file_prefix="compressed")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        compressor.quantize(tmp_path / "taken")
    with pytest.raises(ValueError, match="file_name='model.onnx'.*whole checkpoint folder"):
        ReamCompressor.from_pretrained(str(qwen3_source), "model.onnx", config=hf_config(calibration_txt))
    with pytest.raises(TypeError, match="config="):
        ReamCompressor.from_pretrained(str(qwen3_source), hf_config(calibration_txt))
    assert not (tmp_path / "out").exists()
