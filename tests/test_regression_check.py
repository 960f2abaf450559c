"""eval/check_regression.py: the one-sided rule, spec validation, and the command line."""

import json
import re
from pathlib import Path

import pytest

from eval.check_regression import Row, check_files, check_scores, failures, load_spec, main, markdown_table, parse_spec

REPO = Path(__file__).resolve().parent.parent
SPEC = {"model": "org/model", "target_experts": 96, "method": "ream", "tasks": ["ifeval", "gsm8k"],
        "retention_floor": 97.0}
PAPER = {"label": "the paper", "original": {"ifeval": 0.90, "gsm8k": 0.85}, "compressed": {"ifeval": 0.89, "gsm8k": 0.84}}


def results(original: dict | None = None, **compressed) -> dict:
    return {"schema": "ream-hf eval results v1",
            "models": {"original": {"scores": original if original is not None else {"ifeval": 0.80, "gsm8k": 0.70}},
                       "compressed": {"scores": compressed}}}


def test_the_gate_is_retention_in_the_same_run_not_the_papers_scores():
    spec = parse_spec({**SPEC, "reference": PAPER}, "x")
    # far below the paper's absolute numbers (0.89 / 0.84), but keeping 97.5% / 98.6% of the original in this run
    rows = check_scores(spec, results(ifeval=0.78, gsm8k=0.69))
    assert failures(rows) == []
    assert [round(r.retention, 2) for r in rows] == [97.5, 98.57]
    assert all(r.compressed < r.reference_compressed for r in rows), "absolute scores below the paper's pass"
    # above the paper's absolute numbers, but losing more than the floor allows against its own original
    rows = check_scores(spec, results({"ifeval": 0.99, "gsm8k": 0.95}, ifeval=0.95, gsm8k=0.93))
    assert [r.task for r in failures(rows)] == ["ifeval"], "95.96% < 97%; gsm8k keeps 97.9%"
    assert failures(rows)[0].compressed > PAPER["compressed"]["ifeval"]
    assert "kept 96.0% of the original's score (0.9500 / 0.9900), below its floor of 97.0%" in failures(rows)[0].message()
    # exactly at the floor passes; any improvement passes
    rows = check_scores(spec, results({"ifeval": 0.5, "gsm8k": 0.5}, ifeval=0.485, gsm8k=0.6))
    assert failures(rows) == []


def test_missing_scores_and_a_zero_original_fail():
    spec = parse_spec(SPEC, "x")
    rows = check_scores(spec, results(ifeval=1.0))
    assert [(r.task, r.compressed) for r in failures(rows)] == [("gsm8k", None)], "a missing score fails"
    assert "no score for the compressed model" in failures(rows)[0].message()
    rows = check_scores(spec, results({"ifeval": 0.0, "gsm8k": 0.7}, ifeval=0.1, gsm8k=0.7))
    assert [r.task for r in failures(rows)] == ["ifeval"] and "the original model scored 0" in failures(rows)[0].message()
    rows = check_scores(spec, results({"gsm8k": 0.7}, ifeval=0.8, gsm8k=0.7))
    assert "no score for the original model" in failures(rows)[0].message()


def test_per_task_floor_and_validation():
    spec = parse_spec({**SPEC, "retention_floor": {"default": 99.0, "gsm8k": 90.0}}, "x")
    assert spec.retention_floor == {"ifeval": 99.0, "gsm8k": 90.0}
    assert [r.task for r in failures(check_scores(spec, results(ifeval=0.79, gsm8k=0.64)))] == ["ifeval"]
    with pytest.raises(ValueError, match="missing retention_floor"):
        parse_spec({k: v for k, v in SPEC.items() if k != "retention_floor"}, "x")
    with pytest.raises(ValueError, match=r"retention_floor for ifeval must be a percent in \(0, 100\]"):
        parse_spec({**SPEC, "retention_floor": 101}, "x")
    with pytest.raises(ValueError, match="retention_floor for gsm8k"):
        parse_spec({**SPEC, "retention_floor": {"ifeval": 97.0}}, "x")
    with pytest.raises(ValueError, match="unknown key.*baseline, tolerance.*retention_floor"):
        parse_spec({**SPEC, "baseline": {"ifeval": 0.9}, "tolerance": 0.02}, "x")
    with pytest.raises(ValueError, match=r"reference.compressed.ifeval must be a score in \[0, 1\]"):
        parse_spec({**SPEC, "reference": {**PAPER, "compressed": {"ifeval": 89.2}}}, "x")
    with pytest.raises(ValueError, match="reference must be a mapping with a label"):
        parse_spec({**SPEC, "reference": {"original": {}}}, "x")


def test_shipped_spec_is_valid():
    spec = load_spec(REPO / "eval" / "regression" / "qwen3-30b-a3b.yaml")
    assert (spec.target_experts, spec.method, spec.tasks) == (96, "ream", ("ifeval", "gsm8k", "humaneval"))
    assert spec.retention_floor == {"ifeval": 96.5, "gsm8k": 96.5, "humaneval": 89.5}
    assert spec.reference.original == {"ifeval": 0.904, "gsm8k": 0.893, "humaneval": 0.933}
    assert spec.reference.compressed == {"ifeval": 0.892, "gsm8k": 0.881, "humaneval": 0.866}
    rows = check_scores(spec, {"models": {"original": {"scores": spec.reference.original},
                                          "compressed": {"scores": spec.reference.compressed}}})
    assert failures(rows) == [], "the paper's own retention clears every floor"
    from eval.regression import ream_config

    config = ream_config(spec)  # the YAML's config block is a valid ReamConfig
    assert (config.target_experts, config.group_size, config.calibration_ratios) == (96, 16, [0.0, 0.3, 0.7])


def test_command_line(tmp_path, capsys):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "good.yaml").write_text(json.dumps({**SPEC, "reference": PAPER}))  # JSON is YAML
    (specs / "bad.yaml").write_text(json.dumps(SPEC))
    out = tmp_path / "results"
    out.mkdir()
    (out / "good.json").write_text(json.dumps(results(ifeval=0.79, gsm8k=0.69)))
    (out / "bad.json").write_text(json.dumps(results(ifeval=0.70, gsm8k=0.70)))
    table = tmp_path / "table.md"

    assert main([str(out / "good.json"), "--specs", str(specs), "--table", str(table)]) == 0
    assert "| good | gsm8k | 70.0 | 69.0 | 98.6% | 97.0% | ok | 85.0 | 84.0 | 98.8% |" in table.read_text()
    assert "a reference, not gated" in table.read_text()
    assert main([str(out / "good.json"), str(out / "bad.json"), "--specs", str(specs)]) == 1
    captured = capsys.readouterr()
    assert "REGRESSION bad: ifeval kept 87.5%" in captured.err and "| bad | ifeval |" in captured.out
    assert "| bad | gsm8k | 70.0 | 70.0 | 100.0% | 97.0% | ok | — | — | — |" in captured.out
    assert main([str(tmp_path / "nospec.json"), "--specs", str(specs)]) == 2
    assert "has no regression spec" in capsys.readouterr().err


def test_table_and_files(tmp_path):
    rows = [Row("m", "gsm8k", 97.0, 0.85, None)]
    assert "| m | gsm8k | 85.0 | — | — | 97.0% | FAIL |" in markdown_table(rows)
    (tmp_path / "m.yaml").write_text(json.dumps(SPEC))
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        check_files([tmp_path / "m.json"], tmp_path)


@pytest.mark.parametrize("missing", ["vllm", "punkt_tab"])
def test_regression_run_refuses_before_compressing(missing, qwen3_source, calibration_txt, tmp_path, monkeypatch,
                                                   capsys, no_work_started):
    """eval/regression.py on the GPU runner: a missing evaluation dependency stops it before the compression."""
    from eval.regression import main as run_main
    from tests.test_evaluation import simulate_missing

    message = simulate_missing(missing, monkeypatch, tmp_path)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps({**SPEC, "model": str(qwen3_source), "target_experts": 8, "method": "reap",
                                "config": {"calibration": [str(calibration_txt)], "calibration_ratios": None}}))
    assert run_main([str(spec), "--output", str(tmp_path / "results.json"), "--work-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err, re.S), err
    assert not (tmp_path / "results.json").exists() and list(tmp_path.glob("ream-regression-*")) == []
