"""End-to-end behaviour on a tiny Qwen3-MoE: names, exact slicing, identity, determinism, atomicity."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.io.safetensors import INDEX_NAME
from tests.conftest import snapshot, tensors


def ream_config(calibration, **overrides) -> ReamConfig:
    """16 -> 8 experts by REAP on 8 sequences of 64 tokens; `overrides` replace any of these."""
    kwargs = dict(target_experts=8, method="reap", calibration=[str(calibration)], calibration_ratios=None,
                  num_calibration_sequences=8, sequence_length=64)
    return ReamConfig(**{**kwargs, **overrides})


def compress(source, calibration, output, allow_full_width=False, **overrides):
    overrides = {"num_calibration_sequences": 16, "batch_size": 4, **overrides}
    compressor = ReamCompressor(ream_config(calibration, **overrides))
    compressor.compress(str(source), allow_full_width=allow_full_width)
    compressor.save_pretrained(output)
    return compressor


@pytest.mark.parametrize("method", ["reap", "frequency"])
def test_kept_experts_and_router_rows_are_exact_copies_under_source_names(qwen3_source, calibration_txt, tmp_path, method):
    before = snapshot(qwen3_source)
    compressor = compress(qwen3_source, calibration_txt, tmp_path / "out", method=method)
    assert snapshot(qwen3_source) == before, "the source must never be modified"
    src, out = tensors(qwen3_source), tensors(tmp_path / "out")
    assert set(out) <= set(src), "every output name is a source name (experts renumbered into 0..k-1)"
    assert {n for n in src if ".experts." not in n} <= set(out)
    refit = compressor.config.refit == "down"  # REAP's default: new down projections (tests/test_refit.py)
    assert refit == (method == "reap")
    for report in compressor.result.layers:
        prefix = f"model.layers.{report.index}.mlp."
        for j, centroid in enumerate(report.plan.centroids):
            for proj in ("gate_proj", "up_proj") if refit else ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(out[f"{prefix}experts.{j}.{proj}.weight"], src[f"{prefix}experts.{centroid}.{proj}.weight"])
            # the kept router row j belongs to output expert j (a fork dispatched to the wrong expert)
            assert torch.equal(out[f"{prefix}gate.weight"][j], src[f"{prefix}gate.weight"][centroid])
        assert f"{prefix}experts.8.gate_proj.weight" not in out
    for name in src:
        if ".experts." not in name and ".gate.weight" not in name:
            assert torch.equal(out[name], src[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    source_config = json.loads((qwen3_source / "config.json").read_text())
    assert list(config) == list(source_config) + ["ream_config"], "source keys kept, in order; only ream_config added"
    assert config["num_experts"] == 8 and "num_local_experts" not in config
    assert {k: v for k, v in config.items() if k not in ("num_experts", "ream_config")} == \
        {k: v for k, v in source_config.items() if k != "num_experts"}
    assert ReamConfig.from_pretrained(tmp_path / "out").method == method
    for side_file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / side_file).read_bytes() == (qwen3_source / side_file).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.config.num_experts == 8 and model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 8
    assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_manifest_records_groups_and_statistics(qwen3_source, calibration_txt, tmp_path):
    compress(qwen3_source, calibration_txt, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "ream_manifest.json").read_text())
    assert manifest["method"] == "reap" and manifest["experts_before"] == 16 and manifest["experts_after"] == 8
    assert [entry["index"] for entry in manifest["layers"]] == [0, 1]
    for entry in manifest["layers"]:
        assert [g["output_expert"] for g in entry["groups"]] == list(range(8))
        assert all(g["members"] == [g["centroid"]] and g["weights"] == [1.0] for g in entry["groups"])
        assert len(entry["saliency"]) == 16 and sum(entry["frequency"]) == 4 * manifest["calibration"]["tokens"]
        kept = {g["centroid"] for g in entry["groups"]}
        assert min(entry["saliency"][i] for i in kept) >= max(entry["saliency"][i] for i in set(range(16)) - kept)


def test_same_expert_count_reproduces_original_logits_exactly(qwen3_source, calibration_txt, tmp_path):
    compress(qwen3_source, calibration_txt, tmp_path / "out", target_experts=16, allow_full_width=True)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(str(qwen3_source)).eval()(ids).logits
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()(ids).logits
    assert torch.equal(original, again)
    src, out = tensors(qwen3_source), tensors(tmp_path / "out")
    assert src.keys() == out.keys() and all(torch.equal(src[n], out[n]) for n in src)


@pytest.mark.parametrize("method", ["reap", "ream", "hc_smoe"])
def test_same_inputs_give_byte_identical_files(qwen3_source, calibration_txt, tmp_path, method):
    compress(qwen3_source, calibration_txt, tmp_path / "a", method=method, group_size=4)
    compress(qwen3_source, calibration_txt, tmp_path / "b", method=method, group_size=4)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_sharding_and_index(qwen3_source, calibration_txt, tmp_path):
    compressor = ReamCompressor(ream_config(calibration_txt, method="frequency", max_shard_size=200_000))
    compressor.compress(str(qwen3_source))
    compressor.save_pretrained(tmp_path / "out")
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(tmp_path / "out").values())
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).config.num_experts == 8


def test_failed_save_leaves_nothing_behind(qwen3_source, calibration_txt, tmp_path, monkeypatch):
    import ream_hf.compressor as compressor_module

    def broken_check(*args, **kwargs):
        raise RuntimeError("simulated crash while verifying")

    compressor = ReamCompressor(ream_config(calibration_txt, method="frequency"))
    compressor.compress(str(qwen3_source))
    monkeypatch.setattr(compressor_module, "verify_checkpoint", broken_check)
    with pytest.raises(RuntimeError, match="simulated crash"):
        compressor.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(qwen3_source, calibration_txt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    compressor = ReamCompressor(ream_config(calibration_txt, method="frequency"))
    compressor.compress(str(qwen3_source))
    with pytest.raises(ValueError, match="already exists"):
        compressor.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="ream-hf did not write"):  # --overwrite replaces only our own outputs
        compressor.save_pretrained(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "ream_manifest.json").write_text("{}")  # now it is an earlier ream-hf output
    compressor.save_pretrained(tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_in_memory_model_is_compressed_and_saved_with_hub_key(qwen3_source, calibration_txt, tmp_path):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(qwen3_source), experts_implementation="eager")
    model.name_or_path = ""  # as if built in memory: no source folder to copy from
    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_source))
    compressor = ReamCompressor(ream_config(calibration_txt))
    compressor.compress(model, tokenizer=tokenizer)
    compressor.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_experts"] == 8 and "ream_config" in config and "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8


def test_optimum_quantizer_interface(qwen3_source, calibration_txt, tmp_path):
    from optimum.quantization_base import OptimumQuantizer

    compressor = ReamCompressor.from_pretrained(str(qwen3_source), config=ream_config(calibration_txt, method="frequency"))
    assert isinstance(compressor, OptimumQuantizer)
    compressor.quantize(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 8
