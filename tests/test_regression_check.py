"""eval/check_regression.py: the one-sided rule, spec validation, and the command line."""

import json
import re
from pathlib import Path

import pytest

from eval.check_regression import Row, check_files, check_scores, failures, load_spec, main, markdown_table, parse_spec

REPO = Path(__file__).resolve().parent.parent
SPEC = {"model": "org/model", "target_experts": 96, "method": "ream", "tasks": ["ifeval", "gsm8k"],
        "baseline": {"ifeval": 0.90, "gsm8k": 0.80}, "tolerance": 0.02}


def results(**scores) -> dict:
    return {"schema": "ream-hf eval results v1",
            "models": {"original": {"scores": {"ifeval": 0.92, "gsm8k": 0.85}}, "compressed": {"scores": scores}}}


def test_one_sided_rule():
    spec = parse_spec(SPEC, "x")
    rows = check_scores(spec, results(ifeval=0.88, gsm8k=0.95))  # ifeval exactly at baseline - tolerance
    assert failures(rows) == [], "a drop up to the tolerance passes; any improvement passes"
    rows = check_scores(spec, results(ifeval=0.8799, gsm8k=0.99))
    assert [r.task for r in failures(rows)] == ["ifeval"]
    assert "0.8799" in failures(rows)[0].message() and "0.9000" in failures(rows)[0].message()
    rows = check_scores(spec, results(ifeval=1.0))
    assert [(r.task, r.score) for r in failures(rows)] == [("gsm8k", None)], "a missing score fails"


def test_per_task_tolerance_and_validation():
    spec = parse_spec({**SPEC, "tolerance": {"default": 0.01, "gsm8k": 0.05}}, "x")
    assert spec.tolerance == {"ifeval": 0.01, "gsm8k": 0.05}
    assert [r.task for r in failures(check_scores(spec, results(ifeval=0.885, gsm8k=0.76)))] == ["ifeval"]
    with pytest.raises(ValueError, match="tasks without a baseline score: humaneval"):
        parse_spec({**SPEC, "tasks": ["ifeval", "humaneval"]}, "x")
    with pytest.raises(ValueError, match="missing tolerance"):
        parse_spec({k: v for k, v in SPEC.items() if k != "tolerance"}, "x")
    with pytest.raises(ValueError, match=r"baseline.ifeval must be a score in \[0, 1\]"):
        parse_spec({**SPEC, "baseline": {"ifeval": 90.0, "gsm8k": 0.8}}, "x")
    with pytest.raises(ValueError, match="tolerance for gsm8k"):
        parse_spec({**SPEC, "tolerance": {"ifeval": 0.01}}, "x")


def test_shipped_example_is_valid():
    spec = load_spec(REPO / "eval" / "regression" / "qwen3-30b-a3b.yaml")
    assert (spec.target_experts, spec.method, spec.tasks) == (96, "ream", ("ifeval", "gsm8k", "humaneval"))
    assert spec.baseline == {"ifeval": 0.892, "gsm8k": 0.881, "humaneval": 0.866}
    assert spec.original == {"ifeval": 0.904, "gsm8k": 0.893, "humaneval": 0.933}
    assert spec.tolerance["humaneval"] == 0.03 and spec.tolerance["ifeval"] == 0.02
    from eval.regression import ream_config

    config = ream_config(spec)  # the YAML's config block is a valid ReamConfig
    assert (config.target_experts, config.group_size, config.calibration_ratios) == (96, 16, [0.0, 0.3, 0.7])


def test_command_line(tmp_path, capsys):
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    (baselines / "good.yaml").write_text(json.dumps(SPEC))  # JSON is YAML
    (baselines / "bad.yaml").write_text(json.dumps(SPEC))
    out = tmp_path / "results"
    out.mkdir()
    (out / "good.json").write_text(json.dumps(results(ifeval=0.91, gsm8k=0.79)))
    (out / "bad.json").write_text(json.dumps(results(ifeval=0.70, gsm8k=0.80)))
    table = tmp_path / "table.md"

    assert main([str(out / "good.json"), "--baselines", str(baselines), "--table", str(table)]) == 0
    assert "| good | gsm8k | 85.0 | 79.0 | 80.0 | -1.0 | 2.0 | ok |" in table.read_text()
    assert main([str(out / "good.json"), str(out / "bad.json"), "--baselines", str(baselines)]) == 1
    captured = capsys.readouterr()
    assert "REGRESSION bad: ifeval scored 0.7000" in captured.err and "| bad | ifeval |" in captured.out
    assert main([str(tmp_path / "nobaseline.json"), "--baselines", str(baselines)]) == 2
    assert "has no baseline" in capsys.readouterr().err


def test_table_and_files(tmp_path):
    rows = [Row("m", "gsm8k", 0.8, 0.02, None, 0.85)]
    assert "| m | gsm8k | 85.0 | — | 80.0 | — | 2.0 | FAIL |" in markdown_table(rows)
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
