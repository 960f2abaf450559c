"""The release gate: retention (compressed / original, one run, one code) against the floors in
`eval/regression/*.yaml`.

    python -m eval.check_regression results/*.json [--specs eval/regression] [--table results/regression.md]

`results/NAME.json` (written by `python -m eval.regression eval/regression/NAME.yaml --output results/NAME.json`)
is checked against `eval/regression/NAME.yaml`. The release job evaluates the original and the compressed model
itself, with the same code, settings and harness, so their ratio is what a release can be held to. A task fails
when the compressed model keeps less than the YAML's `retention_floor` (percent of the original's score), or when
either score is missing, or when the original scored 0 (no ratio: the evaluation itself is broken). Absolute
scores are never gated: the paper's published numbers were measured with other code and settings (no refit,
another saliency, another HumanEval harness), so the YAML keeps them only as a labelled `reference` for the table
and the model card. The exit status is 1 when anything fails, 2 for unusable input. Everything but `main` is pure
and unit-tested.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REQUIRED_KEYS = ("model", "target_experts", "method", "tasks", "retention_floor")
OPTIONAL_KEYS = ("reference", "config", "eval", "limit")
REFERENCE_KEYS = ("label", "original", "compressed")


@dataclass(frozen=True)
class Reference:
    """Scores published elsewhere (the paper's): shown beside the measured ones, never compared with them."""

    label: str
    original: dict[str, float]
    compressed: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "original": dict(self.original), "compressed": dict(self.compressed)}


@dataclass(frozen=True)
class Spec:
    """One regression configuration (eval/regression/NAME.yaml); README.md there describes the format."""

    name: str
    model: str
    target_experts: int
    method: str
    tasks: tuple[str, ...]
    retention_floor: dict[str, float]  # percent of the original's score, per task
    reference: Reference | None
    config: dict[str, Any]
    eval: dict[str, Any]
    limit: int | None


@dataclass(frozen=True)
class Row:
    name: str
    task: str
    floor: float  # percent
    original: float | None  # this run's scores, in [0, 1]
    compressed: float | None
    reference_original: float | None = None
    reference_compressed: float | None = None

    @property
    def retention(self) -> float | None:
        """100 * compressed / original; None when either is missing or the original scored 0."""
        if self.original is None or self.compressed is None or not self.original:
            return None
        return 100.0 * self.compressed / self.original

    @property
    def reference_retention(self) -> float | None:
        if self.reference_original is None or self.reference_compressed is None or not self.reference_original:
            return None
        return 100.0 * self.reference_compressed / self.reference_original

    @property
    def failed(self) -> bool:
        # one-sided: only keeping less than the floor fails (1e-9 absorbs float noise at the boundary)
        return self.retention is None or self.retention < self.floor - 1e-9

    def message(self) -> str:
        for role, score in (("compressed", self.compressed), ("original", self.original)):
            if score is None:
                return f"{self.name}: {self.task} has no score for the {role} model in the results"
        if not self.original:
            return f"{self.name}: {self.task}: the original model scored 0, so there is no retention to check"
        return (f"{self.name}: {self.task} kept {self.retention:.1f}% of the original's score "
                f"({self.compressed:.4f} / {self.original:.4f}), below its floor of {self.floor:.1f}%")


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where} must be a score in [0, 1], got {value!r}")
    return float(value)


def _floors(raw: Any, tasks: list[str], name: str) -> dict[str, float]:
    floors = {t: raw.get(t, raw.get("default")) for t in tasks} if isinstance(raw, dict) else {t: raw for t in tasks}
    for task, value in floors.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
            raise ValueError(f"{name}: retention_floor for {task} must be a percent in (0, 100] (compressed / "
                             f"original x 100), got {value!r}")
    return {t: float(v) for t, v in floors.items()}


def _reference(raw: Any, name: str) -> Reference | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - set(REFERENCE_KEYS) or not raw.get("label"):
        raise ValueError(f"{name}: reference must be a mapping with a label (where the numbers were published) and "
                         "original / compressed scores per task")
    scores = {}
    for role in ("original", "compressed"):
        if not isinstance(raw.get(role) or {}, dict):
            raise ValueError(f"{name}: reference.{role} must map tasks to scores in [0, 1]")
        scores[role] = {t: _score(s, f"{name}: reference.{role}.{t}") for t, s in (raw.get(role) or {}).items()}
    return Reference(str(raw["label"]), scores["original"], scores["compressed"])


def parse_spec(data: Any, name: str) -> Spec:
    """Validate one YAML document; errors name the file and the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{name}: the YAML must be a mapping with keys {', '.join(REQUIRED_KEYS)}")
    unknown = [key for key in data if key not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if unknown:
        hint = ("; the gate is now retention_floor (percent of the original's score in the same run) and the "
                "paper's numbers go under reference" if {"baseline", "tolerance", "original"} & set(unknown) else "")
        raise ValueError(f"{name}: unknown key(s) {', '.join(unknown)}{hint}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(missing)}")
    tasks = data["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{name}: tasks must be a non-empty list of task names")
    target = data["target_experts"]
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"{name}: target_experts must be a positive integer, got {target!r}")
    for key in ("config", "eval"):
        if not isinstance(data.get(key) or {}, dict):
            raise ValueError(f"{name}: {key} must be a mapping")
    return Spec(
        name=name, model=str(data["model"]), target_experts=target, method=str(data["method"]), tasks=tuple(tasks),
        retention_floor=_floors(data["retention_floor"], tasks, name), reference=_reference(data.get("reference"), name),
        config=dict(data.get("config") or {}), eval=dict(data.get("eval") or {}), limit=data.get("limit"),
    )


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    return parse_spec(data, path.stem)


def measured_scores(results: dict[str, Any], role: str) -> dict[str, float]:
    try:
        return dict(results["models"][role]["scores"])
    except (KeyError, TypeError):
        raise ValueError(f"results have no models.{role}.scores") from None


def check_scores(spec: Spec, results: dict[str, Any]) -> list[Row]:
    """One row per task of `spec`, with both models' scores found in `results` and the spec's reference."""
    original, compressed = measured_scores(results, "original"), measured_scores(results, "compressed")
    reference = spec.reference
    return [Row(spec.name, task, spec.retention_floor[task], original.get(task), compressed.get(task),
                reference.original.get(task) if reference else None,
                reference.compressed.get(task) if reference else None)
            for task in spec.tasks]


def failures(rows: list[Row]) -> list[Row]:
    return [row for row in rows if row.failed]


def check_files(result_paths: list[str | Path], specs: str | Path) -> list[Row]:
    """Rows for every results file, each against the YAML of the same name in `specs`."""
    rows: list[Row] = []
    for path in map(Path, result_paths):
        spec_path = Path(specs) / f"{path.stem}.yaml"
        if not spec_path.is_file():
            raise ValueError(f"{path} has no regression spec: expected {spec_path}")
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

    def kept(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}%"

    lines = ["| Config | Task | Original | Compressed | Retention | Floor | Status "
             "| Paper: original | Paper: compressed | Paper: retention |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.name} | {row.task} | {pct(row.original)} | {pct(row.compressed)} | {kept(row.retention)} "
                     f"| {row.floor:.1f}% | {'FAIL' if row.failed else 'ok'} | {pct(row.reference_original)} "
                     f"| {pct(row.reference_compressed)} | {kept(row.reference_retention)} |")
    lines.append("")
    lines.append("Original and Compressed were measured in this run with the same code and settings; the gate is "
                 "Retention >= Floor. The Paper columns are the published numbers (other code, settings and "
                 "harness): a reference, not gated.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.check_regression", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results/NAME.json files written by eval.regression")
    parser.add_argument("--specs", default=str(Path(__file__).parent / "regression"),
                        help="folder of NAME.yaml regression specs (default: eval/regression)")
    parser.add_argument("--table", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    try:
        rows = check_files(args.results, args.specs)
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
