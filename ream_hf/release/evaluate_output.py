"""`ream-hf eval OUTPUT --original SOURCE`: score a compressed output and its source on IFEval, GSM8K and HumanEval
(each served by vLLM, scored by lm-eval), write `eval_results.json` into the output and its model card again, with
the scores and their retention.

The arguments are shared with `eval/run_eval.py` (which writes the results JSON anywhere and touches no card).
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any, Mapping

from ..io.names import MANIFEST_NAME
from .card import EVAL_RESULTS_NAME, render_model_card
from .evaluation import (DEFAULT_CONCURRENCY, DEFAULT_HUMANEVAL_MAX_TOKENS, DEFAULT_HUMANEVAL_TIMEOUT,
                         DEFAULT_MAX_TOKENS, GSM8K_VARIANTS, TASKS)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """What an evaluation run takes besides the two models: tasks, limits, data, cache, generation and vLLM settings.

    The defaults are the published model cards' settings: chat template applied, thinking off
    (`chat_template_kwargs={"enable_thinking": false}`), max_tokens 8192, GSM8K 5-shot as multi-turn chat.
    """
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--limit", type=int, default=None, help="first N items per task (quick runs)")
    parser.add_argument("--data-dir", help="local JSONL data: ifeval.jsonl, gsm8k.jsonl [gsm8k_train.jsonl], "
                                           "humaneval.jsonl (missing files: the Hub datasets)")
    parser.add_argument("--cache-dir", help="score cache (default ~/.cache/ream-hf/eval)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the score cache")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="max_tokens for IFEval/GSM8K chat requests (vLLM clamps to the context)")
    parser.add_argument("--humaneval-max-tokens", type=int, default=DEFAULT_HUMANEVAL_MAX_TOKENS)
    parser.add_argument("--humaneval-timeout", type=float, default=DEFAULT_HUMANEVAL_TIMEOUT,
                        help="seconds per HumanEval test program")
    parser.add_argument("--num-fewshot", type=int, default=None, help="GSM8K shots (default: the task's, 5)")
    parser.add_argument("--gsm8k-variant", choices=sorted(GSM8K_VARIANTS), default="gsm8k")
    thinking = parser.add_mutually_exclusive_group()
    thinking.add_argument("--enable-thinking", dest="enable_thinking", action="store_const", const=True,
                          default=False, help="send enable_thinking=true (default: false, as the model cards)")
    thinking.add_argument("--no-thinking-kwarg", dest="enable_thinking", action="store_const", const=None,
                          help="send no chat_template_kwargs at all")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="parallel requests")
    parser.add_argument("--dtype", default=None, help="vLLM --dtype (default: vLLM's auto)")
    parser.add_argument("--vllm-args", default="", help='extra vLLM server arguments, one string: '
                                                        '"--tensor-parallel-size 4 --max-model-len 16384"')
    parser.add_argument("--no-mtp", action="store_true", help="no MTP speculative decoding even if present")
    parser.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for vLLM /health")


def eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`evaluate_pair`'s keyword arguments from `add_eval_arguments`' options."""
    from .evaluation import data_files_from_dir

    return dict(
        tasks=args.tasks, limit=args.limit,
        data_files=data_files_from_dir(args.data_dir, args.tasks) if args.data_dir else None,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, max_tokens=args.max_tokens,
        humaneval_max_tokens=args.humaneval_max_tokens, humaneval_timeout=args.humaneval_timeout,
        num_fewshot=args.num_fewshot, gsm8k_variant=args.gsm8k_variant, enable_thinking=args.enable_thinking,
        concurrency=args.concurrency,
        server_args={"dtype": args.dtype, "extra_args": shlex.split(args.vllm_args), "mtp": not args.no_mtp,
                     "timeout": args.startup_timeout},
    )


def results_table(results: Mapping[str, Any]) -> str:
    """Both models' scores and the retention, one task a line."""
    rows = [("task", "original", "compressed", "retention %")]
    for task in results["settings"]["tasks"]:
        keep = results["retention"][task]
        rows.append((task, f"{results['models']['original']['scores'][task]:.4f}",
                     f"{results['models']['compressed']['scores'][task]:.4f}",
                     "n/a" if keep is None else f"{keep:.1f}"))
    return "\n".join(f"{r[0]:<10} {r[1]:>10} {r[2]:>12} {r[3]:>12}" for r in rows)


def evaluate_output(output: str | os.PathLike, original: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Score `output` and `original` (the source checkpoint folder) with `evaluate_pair(**kwargs)`, write
    `eval_results.json` into `output` and render its model card again with the scores; returns the results."""
    from .evaluation import evaluate_pair, preflight, write_results

    output = Path(output)
    if not (output / MANIFEST_NAME).is_file():
        raise ValueError(f"{output} has no {MANIFEST_NAME}: give the output folder of `ream-hf compress`")
    original = Path(original)
    if not (original / "config.json").is_file():
        raise ValueError(f"{original} is not a checkpoint folder (no config.json)")
    preflight(list(kwargs.get("tasks", TASKS)), serve=True)  # before any server or hashing
    results = evaluate_pair(str(original), str(output), **kwargs)
    write_results(results, output / EVAL_RESULTS_NAME)
    render_model_card(output, source_dir=original)
    return results
