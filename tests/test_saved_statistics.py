"""--save-statistics / --statistics: re-planning from saved statistics equals a fresh non-sequential run, and every
mismatch is refused before any weight or calibration text is read."""

import json

import pytest

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.cli import main
from tests.conftest import tensors


def config_for(calibration, **overrides) -> ReamConfig:
    kwargs = dict(target_experts=10, method="ream", calibration=[str(calibration)], calibration_ratios=None,
                  num_calibration_sequences=8, sequence_length=48, batch_size=4, sequential=False,
                  activation_sample_tokens=64, refit_tokens=128)
    return ReamConfig(**{**kwargs, **overrides})


def run(source, calibration, output, *, save=None, statistics=None, **overrides) -> ReamCompressor:
    compressor = ReamCompressor(config_for(calibration, **overrides))
    compressor.compress(str(source), save_statistics=save, statistics=statistics)
    compressor.save_pretrained(output)
    return compressor


@pytest.fixture(scope="module")
def saved(qwen3_source, calibration_txt, tmp_path_factory):
    """Statistics of a non-sequential REAM run 16 -> 10, with a token sample of 128 of its 384 tokens (refit_tokens)."""
    folder = tmp_path_factory.mktemp("stats") / "statistics"
    run(qwen3_source, calibration_txt, folder.parent / "first", save=folder)
    return folder


def same_model(left, right) -> bool:
    a, b = tensors(left), tensors(right)
    return a.keys() == b.keys() and all(a[n].equal(b[n]) for n in a)


@pytest.mark.parametrize("overrides", [
    {"target_experts": 6},
    {"target_experts": 8, "method": "reap"},
    {"target_experts": 8, "method": "hc_smoe"},
    {"target_experts": 12, "saliency": "weight", "saliency_mean": "tokens", "weight_features": "plain"},
    {"target_experts": 8, "refit": "down", "refit_tokens": 32},  # the refit draws on the saved token sample
    {"target_experts": 8, "method": "reap", "refit_tokens": 48},  # a smaller sample: a subset of the saved one
    {"target_experts": 8, "refit": "none"},  # alignment's 64 tokens alone
])
def test_replanning_from_saved_statistics_equals_a_fresh_non_sequential_run(qwen3_source, calibration_txt, saved,
                                                                            tmp_path, overrides, monkeypatch):
    fresh = run(qwen3_source, calibration_txt, tmp_path / "fresh", **overrides)
    import ream_hf.pipeline.calibration as calibration

    def refuse(*args, **kwargs):
        raise AssertionError("calibration data was read although statistics were given")

    monkeypatch.setattr(calibration, "_source_sequences", refuse)  # no calibration is read, no model is run
    replanned = run(qwen3_source, calibration_txt, tmp_path / "replanned", statistics=saved, **overrides)
    assert same_model(tmp_path / "fresh", tmp_path / "replanned")
    assert replanned.manifest()["layers"] == fresh.manifest()["layers"]
    assert replanned.manifest()["calibration"] == fresh.manifest()["calibration"]


def test_saved_folder_says_what_it_holds(saved):
    index = json.loads((saved / "statistics.json").read_text())
    assert index["sequential"] is False and index["dense"] is True and index["router_logits"] is True
    assert len(index["layers"]) == 2 and index["calibration"]["num_calibration_sequences"] == 8


@pytest.mark.parametrize("overrides, message", [
    ({"sequential": True}, "no-sequential"),
    ({"num_calibration_sequences": 6}, "num_calibration_sequences"),
    ({"seed": 1}, "seed"),
    ({"gated_similarity": False}, "gated_similarity"),
    ({"activation_sample_tokens": 256}, "token sample of 256"),  # more than the saved 128
    ({"method": "reap", "refit": "down", "refit_tokens": 200}, "token sample of 200"),
])
def test_mismatched_settings_are_refused_before_any_work(qwen3_source, calibration_txt, saved, tmp_path, overrides,
                                                         message, no_work_started):
    with pytest.raises(ValueError, match=message):
        ReamCompressor(config_for(calibration_txt, **overrides)).compress(str(qwen3_source), statistics=saved)


def test_statistics_of_another_model_or_kind_are_refused(qwen3_source, calibration_txt, saved, tmp_path):
    from ream_hf.fixtures import build_tiny_qwen3_moe

    other = build_tiny_qwen3_moe(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="another model"):
        ReamCompressor(config_for(calibration_txt)).compress(str(other), statistics=saved)
    sparse = tmp_path / "reap-statistics"
    run(qwen3_source, calibration_txt, tmp_path / "reap", save=sparse, method="reap")
    with pytest.raises(ValueError, match="gated output signatures"):
        ReamCompressor(config_for(calibration_txt)).compress(str(qwen3_source), statistics=sparse)
    sequential = tmp_path / "sequential-statistics"
    run(qwen3_source, calibration_txt, tmp_path / "sequential", save=sequential, sequential=True)
    with pytest.raises(ValueError, match="collected sequentially"):
        ReamCompressor(config_for(calibration_txt)).compress(str(qwen3_source), statistics=sequential)


def test_cli_refuses_an_unfinished_or_used_folder(qwen3_source, calibration_txt, saved, tmp_path, capsys):
    args = ["compress", str(qwen3_source), "--target-experts", "8", "--calibration", str(calibration_txt),
            "--num-sequences", "8", "--sequence-length", "48", "--no-sequential", "--output", str(tmp_path / "o")]
    (tmp_path / "empty").mkdir()
    assert main([*args, "--statistics", str(tmp_path / "empty")]) == 2
    assert "statistics.json" in capsys.readouterr().err
    assert main([*args, "--save-statistics", str(saved)]) == 2
    assert "not empty" in capsys.readouterr().err
