"""One-sided regression check of release-evaluation results against `eval/regression/*.yaml` baselines.

    python -m eval.check_regression results/*.json [--baselines eval/regression] [--table results/regression.md]

`results/NAME.json` (written by `python -m eval.regression eval/regression/NAME.yaml --output results/NAME.json`)
is checked against `eval/regression/NAME.yaml`. A task fails when the compressed model scores more than its
tolerance *below* the baseline, or has no score; scoring above the baseline never fails. The exit status is 1
when anything fails, 2 for unusable input. Everything but `main` is pure and unit-tested.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REQUIRED_KEYS = ("model", "target_experts", "method", "tasks", "baseline", "tolerance")


@dataclass(frozen=True)
class Spec:
    """One regression configuration (eval/regression/NAME.yaml); README.md there describes the format."""

    name: str
    model: str
    target_experts: int
    method: str
    tasks: tuple[str, ...]
    baseline: dict[str, float]
    tolerance: dict[str, float]
    original: dict[str, float]
    config: dict[str, Any]
    eval: dict[str, Any]
    limit: int | None


@dataclass(frozen=True)
class Row:
    name: str
    task: str
    baseline: float
    tolerance: float
    score: float | None
    original: float | None

    @property
    def delta(self) -> float | None:
        return None if self.score is None else self.score - self.baseline

    @property
    def failed(self) -> bool:
        # one-sided: only a drop of more than the tolerance fails (1e-9 absorbs float noise at the boundary)
        return self.score is None or self.score < self.baseline - self.tolerance - 1e-9

    def message(self) -> str:
        if self.score is None:
            return f"{self.name}: {self.task} has no score in the results"
        return (f"{self.name}: {self.task} scored {self.score:.4f}, more than {self.tolerance:.4f} below "
                f"its baseline {self.baseline:.4f} (delta {self.delta:+.4f})")


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where} must be a score in [0, 1], got {value!r}")
    return float(value)


def parse_spec(data: Any, name: str) -> Spec:
    """Validate one YAML document; errors name the file and the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{name}: the YAML must be a mapping with keys {', '.join(REQUIRED_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(missing)}")
    tasks = data["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{name}: tasks must be a non-empty list of task names")
    baseline_raw = data["baseline"]
    if not isinstance(baseline_raw, dict):
        raise ValueError(f"{name}: baseline must map each task to the expected score")
    baseline = {task: _score(score, f"{name}: baseline.{task}") for task, score in baseline_raw.items()}
    without = [t for t in tasks if t not in baseline]
    if without:
        raise ValueError(f"{name}: tasks without a baseline score: {', '.join(without)}")
    raw = data["tolerance"]
    if isinstance(raw, dict):
        default = raw.get("default")
        tolerance = {t: raw.get(t, default) for t in tasks}
    else:
        tolerance = {t: raw for t in tasks}
    for task, value in tolerance.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}: tolerance for {task} must be a number >= 0 (absolute score units), got {value!r}")
    original = {t: _score(s, f"{name}: original.{t}") for t, s in (data.get("original") or {}).items()}
    target = data["target_experts"]
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"{name}: target_experts must be a positive integer, got {target!r}")
    for key in ("config", "eval"):
        if not isinstance(data.get(key) or {}, dict):
            raise ValueError(f"{name}: {key} must be a mapping")
    return Spec(
        name=name, model=str(data["model"]), target_experts=target, method=str(data["method"]), tasks=tuple(tasks),
        baseline={t: baseline[t] for t in tasks}, tolerance={t: float(v) for t, v in tolerance.items()},
        original=original, config=dict(data.get("config") or {}), eval=dict(data.get("eval") or {}),
        limit=data.get("limit"),
    )


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    return parse_spec(data, path.stem)


def compressed_scores(results: dict[str, Any]) -> dict[str, float]:
    try:
        return dict(results["models"]["compressed"]["scores"])
    except (KeyError, TypeError):
        raise ValueError("results have no models.compressed.scores") from None


def check_scores(spec: Spec, results: dict[str, Any]) -> list[Row]:
    """One row per task of `spec`, with the compressed (and original) scores found in `results`."""
    scores = compressed_scores(results)
    original = (results.get("models", {}).get("original") or {}).get("scores") or {}
    return [Row(spec.name, task, spec.baseline[task], spec.tolerance[task], scores.get(task), original.get(task))
            for task in spec.tasks]


def failures(rows: list[Row]) -> list[Row]:
    return [row for row in rows if row.failed]


def check_files(result_paths: list[str | Path], baselines: str | Path) -> list[Row]:
    """Rows for every results file, each against the baseline YAML of the same name in `baselines`."""
    rows: list[Row] = []
    for path in map(Path, result_paths):
        spec_path = Path(baselines) / f"{path.stem}.yaml"
        if not spec_path.is_file():
            raise ValueError(f"{path} has no baseline: expected {spec_path}")
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {path}: {error}") from None
        try:
            rows.extend(check_scores(load_spec(spec_path), results))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    return rows


def markdown_table(rows: list[Row]) -> str:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    lines = ["| Config | Task | Original | Compressed | Baseline | Delta | Tolerance | Status |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        delta = "—" if row.delta is None else f"{100 * row.delta:+.1f}"
        lines.append(f"| {row.name} | {row.task} | {pct(row.original)} | {pct(row.score)} | {pct(row.baseline)} | "
                     f"{delta} | {100 * row.tolerance:.1f} | {'FAIL' if row.failed else 'ok'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.check_regression", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results/NAME.json files written by eval.regression")
    parser.add_argument("--baselines", default=str(Path(__file__).parent / "regression"),
                        help="folder of NAME.yaml baselines (default: eval/regression)")
    parser.add_argument("--table", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    try:
        rows = check_files(args.results, args.baselines)
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    table = markdown_table(rows)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table, encoding="utf-8")
    sys.stdout.write(table)
    failed = failures(rows)
    for row in failed:
        sys.stderr.write(f"REGRESSION {row.message()}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
