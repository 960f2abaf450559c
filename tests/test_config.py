import json

import pytest

from ream_hf.config import CalibrationSource, ReamConfig


def test_defaults_are_the_papers_full_ream():
    config = ReamConfig(target_experts=96)
    assert config.method == "ream" and config.group_size is None and config.merge == "activations+weights"
    assert config.resolve_group_size(128, 96) == 16 and config.resolve_group_size(256, 192) == 32  # the paper's C
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
        ({"target_experts": 4, "group_size": 2.5}, "group_size"),
        ({"target_experts": 4, "saliency": "loudness"}, "saliency must be one of"),
        ({"target_experts": 4, "saliency_mean": "median"}, "saliency_mean must be one of"),
        ({"target_experts": 4, "method": "frequency", "saliency": "weight"}, "contradicts"),
        ({"target_experts": 4, "weight_features": "raw"}, "weight_features must be one of"),
        ({"target_experts": 4, "refit": "everything"}, "refit must be one of"),
        ({"target_experts": 4, "refit_target": "layer"}, "refit_target must be one of"),
        ({"target_experts": 4, "refit_ridge": 0}, "refit_ridge"),
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


def test_group_size_scales_with_the_expert_count_and_refuses_too_small_values():
    auto = ReamConfig(target_experts=4)
    assert [auto.resolve_group_size(e, k) for e, k in ((32, 16), (32, 24), (512, 384), (16, 2), (8, 6))] == \
        [4, 4, 64, 8, 2]  # E/8, raised to ceil(E/k) where the groups could not hold every expert
    assert ReamConfig(target_experts=4, group_size=5).resolve_group_size(32, 16) == 5
    assert ReamConfig(target_experts=4, group_size=0).resolve_group_size(32, 16) == 0  # the M-SMoE rule
    from ream_hf.method.planning import check_plan

    with pytest.raises(ValueError, match="raise group_size to at least 4"):
        check_plan(ReamConfig(target_experts=8, method="ream", group_size=3), 32, 8)
    check_plan(ReamConfig(target_experts=8, method="ream"), 32, 8)  # the resolved default (ceil(32/8) = 4) fits


def test_saliency_defaults_follow_the_method_and_are_recorded():
    from ream_hf.config import DEFAULT_SALIENCY

    for method, (saliency, mean) in DEFAULT_SALIENCY.items():
        config = ReamConfig(target_experts=4, method=method)
        assert (config.saliency, config.saliency_mean) == (saliency, mean)
        assert config.to_dict()["saliency"] == saliency  # stored in ream_config as resolved
    explicit = ReamConfig(target_experts=4, method="reap", saliency="weight", saliency_mean="tokens")
    assert ReamConfig.from_dict(explicit.to_dict()) == explicit
