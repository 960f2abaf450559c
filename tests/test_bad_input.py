"""Every bad input: a one-line error (exit 2), raised before any work starts, nothing written."""

import json

import pytest

from ream_hf.cli import main


def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def dense_model(folder):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    Qwen3ForCausalLM(config).save_pretrained(str(folder))
    return folder


def unknown_moe(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "fancy_moe", "num_experts": 8, "num_experts_per_tok": 2}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


CASES = {
    "target equals experts": (["--target-experts", "16"], "equals the model's 16 experts"),
    "target above experts": (["--target-experts", "17"], "more than the model's 16 experts"),
    "target below top-k": (["--target-experts", "3"], "below the router's top-k (4)"),
    "both target and ratio": (["--target-experts", "8", "--compression-ratio", "0.5"], "exactly one of"),
    "neither target nor ratio": ([], "exactly one of"),
    "bad method": (["--target-experts", "8", "--method", "ream", "--group-size", "-2"], "group_size"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_targets(name, qwen3_source, calibration_txt, tmp_path, capsys, no_work_started):
    extra, message = CASES[name]
    code, err = run_cli(["compress", str(qwen3_source), "--calibration", str(calibration_txt),
                         "--output", str(tmp_path / "out"), *extra], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_non_moe_and_unknown_architectures(tmp_path, calibration_txt, capsys, no_work_started):
    dense = dense_model(tmp_path / "dense")
    code, err = run_cli(["compress", str(dense), "--target-experts", "4", "--calibration", str(calibration_txt),
                         "--output", str(tmp_path / "o1")], capsys)
    assert code == 2 and "not a Mixture-of-Experts model" in err and "Qwen3-MoE" in err and "\n" not in err
    strange = unknown_moe(tmp_path / "strange")
    code, err = run_cli(["compress", str(strange), "--target-experts", "4", "--calibration", str(calibration_txt),
                         "--output", str(tmp_path / "o2")], capsys)
    assert code == 2 and "unsupported MoE architecture 'fancy_moe'" in err and "GPT-OSS" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("name, content, message", [
    ("cal.txt", None, "does not exist"),
    ("cal.txt", "", "is empty"),
    ("short.jsonl", json.dumps({"text": "too short"}) + "\n", "calibration data is empty"),  # no usable sequence
])
def test_missing_empty_or_unusable_calibration_file(qwen3_source, tmp_path, capsys, no_weight_reads, name, content,
                                                    message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, err = run_cli(["compress", str(qwen3_source), "--target-experts", "8", "--calibration", str(path),
                         "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_existing_output_folder(qwen3_source, calibration_txt, tmp_path, capsys, no_work_started):
    (tmp_path / "out").mkdir()
    code, err = run_cli(["compress", str(qwen3_source), "--target-experts", "8", "--calibration", str(calibration_txt),
                         "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("kind", ["missing", "no config", "broken config", "no weights", "missing shard", "a file"])
def test_unreadable_source(kind, tmp_path, calibration_txt, capsys, no_work_started):
    source = tmp_path / "src"
    if kind != "missing" and kind != "a file":
        source.mkdir()
    if kind == "a file":
        source.write_text("x")
    if kind in ("broken config", "no weights", "missing shard"):
        (source / "config.json").write_text("{not json" if kind == "broken config" else
                                            json.dumps({"model_type": "qwen3_moe", "num_experts": 16}))
    if kind == "missing shard":
        (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    code, err = run_cli(["compress", str(source), "--target-experts", "8", "--calibration", str(calibration_txt),
                         "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_guard_catches_weight_reads_on_the_streaming_path(qwen3_source, calibration_txt, tmp_path, no_weight_reads):
    """The guard itself can fail: a valid streaming run reads weights and trips it (no from_pretrained involved)."""
    from ream_hf import ReamCompressor, ReamConfig

    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=4, sequence_length=32)
    with pytest.raises(AssertionError, match="a weight tensor was read"):
        ReamCompressor(config).compress(str(qwen3_source))


def test_the_guard_catches_weight_reads_on_the_in_memory_path(qwen3_source, calibration_txt, no_weight_reads):
    """...and on the in-memory path, whose weights transformers reads."""
    from ream_hf import ReamCompressor, ReamConfig

    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=4, sequence_length=32, streaming=False)
    with pytest.raises(AssertionError, match="model weights were loaded"):
        ReamCompressor(config).compress(str(qwen3_source))


@pytest.fixture(scope="module")
def deepseek_source(tmp_path_factory):
    """DeepSeek-V3: 16 experts in n_group=4 routing groups, topk_group=2, top-4."""
    from tests.families import build_family_checkpoint

    return build_family_checkpoint("deepseek_v3", tmp_path_factory.mktemp("deepseek") / "source")


PLAN_CASES = {  # refused from the config alone, not after a layer's statistics
    "groups cannot hold the experts": ("qwen3", ["--target-experts", "4", "--method", "ream", "--group-size", "2"],
                                       "4 groups of at most group_size=2 cannot hold 16 experts"),
    "target across routing groups": ("deepseek", ["--target-experts", "6"], "not divisible by n_group=4"),
    "too few per routing group": ("deepseek", ["--target-experts", "4"], "too few for top-4"),
    "group size within routing groups": ("deepseek", ["--target-experts", "8", "--method", "ream", "--group-size", "1"],
                                         "cannot hold 16 experts"),
    "resume without streaming": ("qwen3", ["--target-experts", "8", "--resume", "--no-streaming"], "resume needs streaming"),
}


@pytest.mark.parametrize("name", list(PLAN_CASES))
def test_impossible_plans_are_refused_before_work(name, qwen3_source, deepseek_source, calibration_txt, tmp_path, capsys,
                                                  no_work_started):
    which, extra, message = PLAN_CASES[name]
    source = qwen3_source if which == "qwen3" else deepseek_source
    code, err = run_cli(["compress", str(source), "--calibration", str(calibration_txt), "--output",
                         str(tmp_path / "out"), *extra], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_unfinished_or_foreign_work_folder_is_refused_before_work(qwen3_source, calibration_txt, tmp_path, capsys,
                                                                  no_work_started):
    from ream_hf.pipeline.streaming import WorkFolder

    WorkFolder.open(tmp_path / "work", "another-job", resume=False).commit(1, [], [])
    args = ["compress", str(qwen3_source), "--target-experts", "8", "--calibration", str(calibration_txt),
            "--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    code, err = run_cli(args, capsys)
    assert code == 2 and "found an unfinished run" in err and "--resume" in err
    code, err = run_cli([*args, "--resume"], capsys)
    assert code == 2 and "different source or settings" in err
