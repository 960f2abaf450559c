"""Score an original and a compressed checkpoint on IFEval, GSM8K and HumanEval; write one results JSON.

A thin wrapper over the installed package's evaluation (`ream-hf eval OUTPUT --original SOURCE` does the same and also
writes the results and the model card into the output folder). Each model is served by vLLM (one server at a time,
started and stopped here); scores are cached in ~/.cache/ream-hf/eval (or --cache-dir), so re-running starts no
server for finished tasks.

    python eval/run_eval.py --original Qwen3-30B-A3B --compressed out/ --output results.json
    python eval/run_eval.py --original A --compressed B --limit 20 --tasks gsm8k humaneval -o quick.json
    # offline: ifeval.jsonl, gsm8k.jsonl (+ gsm8k_train.jsonl), humaneval.jsonl in DIR
    python eval/run_eval.py --original A --compressed B --data-dir DIR --output r.json
    # vLLM options (GPU): --vllm-args "--tensor-parallel-size 4 --max-model-len 16384"

IFEval needs NLTK's punkt_tab (`python -m nltk.downloader punkt_tab`).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from ream_hf.release.evaluate_output import add_eval_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, help="original checkpoint folder")
    parser.add_argument("--compressed", required=True, help="compressed checkpoint folder")
    parser.add_argument("--output", "-o", required=True, help="results JSON to write")
    add_eval_arguments(parser)
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ream_hf.release.evaluate_output import eval_kwargs, results_table
    from ream_hf.release.evaluation import evaluate_pair, write_results
    from ream_hf.release.serve import signals_raise_keyboard_interrupt

    try:
        with signals_raise_keyboard_interrupt():  # SIGTERM too: the vLLM server is stopped, not orphaned
            results = evaluate_pair(args.original, args.compressed, **eval_kwargs(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, FileNotFoundError, ValueError, TimeoutError) as error:  # EvaluationError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = write_results(results, args.output)
    print(results_table(results))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
