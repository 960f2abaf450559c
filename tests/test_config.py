import json

import pytest

from ream_hf.config import CalibrationSource, ReamConfig


def test_defaults_are_the_papers_full_ream():
    config = ReamConfig(target_experts=96)
    assert config.method == "ream" and config.group_size == 16 and config.merge == "activations+weights"
    assert config.num_calibration_sequences == 3072 and config.sequence_length == 512 and config.seed == 42
    assert config.calibration_ratios == [0.0, 0.3, 0.7]
    assert [s.path for s in config.calibration] == ["allenai/c4", "AI-MO/NuminaMath-1.5", "bigcode/the-stack-smol"]


def test_round_trip_dict_json_and_file(tmp_path):
    config = ReamConfig(compression_ratio=0.25, method="reap", calibration=["a.txt", {"path": "x/y", "split": "test"}],
                        calibration_ratios=[0.25, 0.75], group_size=32)
    again = ReamConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config
    config.to_json_file(tmp_path / "c.json")
    assert ReamConfig.from_json_file(tmp_path / "c.json") == config
    assert again.calibration[1] == CalibrationSource(path="x/y", split="test")
    assert config.to_dict()["quant_method"] == "ream"


def test_from_pretrained_reads_ream_config_key(tmp_path):
    config = ReamConfig(target_experts=4)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "ream_config": config.to_dict()}))
    assert ReamConfig.from_pretrained(tmp_path) == config
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ValueError, match="ream_config"):
        ReamConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of target_experts"),
        ({"target_experts": 4, "compression_ratio": 0.5}, "exactly one of target_experts"),
        ({"target_experts": 0}, "positive integer"),
        ({"compression_ratio": 1.0}, r"in \(0, 1\)"),
        ({"target_experts": 4, "method": "magic"}, "method must be one of"),
        ({"target_experts": 4, "merge": "mean"}, "merge must be one of"),
        ({"target_experts": 4, "calibration": []}, "at least one source"),
        ({"target_experts": 4, "calibration": ["a.txt"], "calibration_ratios": [0.5, 0.5]}, "one ratio per source"),
        ({"target_experts": 4, "batch_size": 0}, "batch_size must be a positive integer"),
        ({"target_experts": 4, "group_size": -1}, "group_size"),
        ({"target_experts": 4, "mtp": "sometimes"}, "mtp must be one of"),
        ({"target_experts": 4, "calibration": [{"path": "a", "colour": 1}]}, "unknown keys"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReamConfig(**kwargs)


def test_resolve_target_refuses_more_than_available_and_below_top_k():
    assert ReamConfig(compression_ratio=0.25).resolve_target(128, 8) == 96
    with pytest.raises(ValueError, match="more than the model's 16 experts"):
        ReamConfig(target_experts=17).resolve_target(16, 4)
    with pytest.raises(ValueError, match="below the router's top-k"):
        ReamConfig(target_experts=3).resolve_target(16, 4)


def test_old_merge_mode_names_are_accepted_as_aliases():
    assert ReamConfig(target_experts=4, merge="logits+weights").merge == "activations+weights"
    assert ReamConfig(target_experts=4, merge="logits").merge == "activations"
    assert ReamConfig.from_dict({"target_experts": 4, "merge": "logits"}).merge == "activations"
    with pytest.raises(ValueError, match="merge must be one of"):
        ReamConfig(target_experts=4, merge="router")
