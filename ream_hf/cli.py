"""`ream-hf` command line: `compress` a model, `eval` it against its source, `report` what each layer lost, `push`,
`serve`, or run the `demo`.

User errors print one line (`error: ...`) and exit with status 2, before any work starts; a failed write or upload
prints one line and exits with status 1, saying how to continue.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import tempfile
from pathlib import Path

from .config import (
    DEFAULT_REFIT,
    DEFAULT_SALIENCY,
    DTYPES,
    MERGE_MODE_ALIASES,
    MERGE_MODES,
    METHODS,
    MTP_MODES,
    OUTPUT_DTYPES,
    REFIT_MODES,
    REFIT_TARGETS,
    SALIENCY,
    SALIENCY_MEANS,
    WEIGHT_FEATURES,
    ReamConfig,
)

DEFAULTS = ReamConfig  # the dataclass's field defaults (class attributes): one source for CLI and Python


def _add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="local model folder or Hugging Face Hub repo id")
    parser.add_argument("--revision", help="branch, tag or commit of a Hub repo id (default: its main branch)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the source's custom tokenizer code (Kimi-K2's); the model always runs on "
                             "transformers' own classes")
    # not argparse-exclusive: ReamConfig gives the one-line error for both/neither
    parser.add_argument("--target-experts", type=int, help="experts kept per MoE layer")
    parser.add_argument("--compression-ratio", type=float, help="fraction of experts removed, e.g. 0.25")
    parser.add_argument("--method", choices=METHODS, default=DEFAULTS.method)
    parser.add_argument("--calibration", action="append", metavar="FILE_OR_DATASET",
                        help=".txt, .jsonl ('text' or 'input_ids' rows) or a Hub dataset id; repeat for a mix "
                             "(default: the paper's c4/NuminaMath/the-stack-smol mix)")
    parser.add_argument("--calibration-ratios", type=float, nargs="+", help="one ratio per --calibration source")
    parser.add_argument("--num-sequences", type=int, default=DEFAULTS.num_calibration_sequences)
    parser.add_argument("--sequence-length", type=int, default=DEFAULTS.sequence_length)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--device", default=DEFAULTS.device, help="cpu (the default), cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype)
    parser.add_argument("--output-dtype", choices=OUTPUT_DTYPES,
                        help="fp8: write every linear weight of the decoder layers FP8 with 128x128 block scales (the "
                             "DeepSeek-V3 / Qwen3-FP8 format), for any source; a dtype: write a quantized (FP8 block, "
                             "MXFP4) source dequantized to it, without quantization_config (default: the source's own "
                             "storage)")
    parser.add_argument("--group-size", type=int, default=DEFAULTS.group_size,
                        help="REAM group size C (0 = M-SMoE rule; default E/8, at least ceil(E/target))")
    defaults = ", ".join(f"{m}: {s}/{a}" for m, (s, a) in DEFAULT_SALIENCY.items())
    parser.add_argument("--saliency", choices=SALIENCY,
                        help="expert score for centroids, pruning and merge weights: the routing weight, the router "
                             "probability over all experts, its square (the reference code's), or routed-token "
                             f"counts; with --saliency-mean (default per method: {defaults})")
    parser.add_argument("--saliency-mean", choices=SALIENCY_MEANS,
                        help="mean over routed tokens, or per calibration batch then over batches (the reference's)")
    parser.add_argument("--weight-features", choices=WEIGHT_FEATURES, default=DEFAULTS.weight_features,
                        help="alignment weight features: PCA projection scaled by the singular values with unit rows "
                             "(the reference's) or the plain centred projection")
    refits = ", ".join(f"{m}: {r}" for m, r in DEFAULT_REFIT.items())
    parser.add_argument("--refit", choices=REFIT_MODES,
                        help="closed-form least-squares corrections after merging/pruning, on a token sample of each "
                             "layer: the output experts' down projections, the kept router rows, both, or none "
                             f"(default per method: {refits})")
    parser.add_argument("--refit-target", choices=REFIT_TARGETS, default=DEFAULTS.refit_target,
                        help="what the down-projection refit matches: the layer's output error shared by the routed "
                             "experts (residual) or each group's original gated outputs (group)")
    parser.add_argument("--refit-ridge", type=float, default=DEFAULTS.refit_ridge,
                        help="ridge towards the compressed weights, relative to the mean Gram diagonal (the router refit's; the "
                             "down refit tries it x1, 10, 100, 1000 and keeps the best on held-out sequences)")
    parser.add_argument("--refit-steps", type=int, default=DEFAULTS.refit_steps,
                        help="residual refit: at most this many rounds of recomputing the layer's error and sharing it again "
                             "(the number is chosen on held-out sequences)")
    parser.add_argument("--refit-tokens", type=int, default=DEFAULTS.refit_tokens,
                        help="tokens per layer the refit draws (a random sample of the calibration): a quarter of their "
                             "sequences is held out to check the down refit, kept only where it helps there. Default: sized "
                             "from the layer's shape, 8 routed rows per unknown (tokens x top-k / (kept experts x D)), at "
                             "least 8192 tokens, at most what 8 GiB of sample-dependent refit memory holds")
    parser.add_argument("--merge", choices=(*MERGE_MODES, *MERGE_MODE_ALIASES), default=DEFAULTS.merge,
                        metavar="{" + ",".join(MERGE_MODES) + "}",
                        help="how a group's members are aligned before the weighted sum: by their hidden activations "
                             "and/or weights, not at all (avg), or not merged (none); or (neurons) the merged expert "
                             "keeps D of the group's neurons chosen to fit the group's output, down projection fit "
                             "by least squares; 'logits+weights' and 'logits' are the old names of the activation modes")
    parser.add_argument("--no-merge-floor", action="store_true",
                        help="keep every merge, also one that reproduces its group's output on held-out calibration "
                             "sequences worse than the group's centroid alone (by default such a group is pruned), and "
                             "a merged layer whose held-out output error is above the same layer pruned (by default "
                             "such a layer is pruned: the layer floor)")
    parser.add_argument("--pca-dim", type=int, default=DEFAULTS.pca_dim)
    parser.add_argument("--no-sequential", action="store_true", help="statistics from the original model (ablation)")
    parser.add_argument("--no-gated-similarity", action="store_true", help="ablation: plain expert outputs")
    parser.add_argument("--no-router-logits", action="store_true", help="ablation: similarity from outputs only")
    parser.add_argument("--mtp", choices=MTP_MODES, default=DEFAULTS.mtp)
    parser.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--max-shard-size", type=int, default=DEFAULTS.max_shard_size, help="bytes per safetensors shard")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its work folder")
    parser.add_argument("--work-dir", help="work folder for streaming and resume (default: .OUTPUT.ream-work beside "
                                           "the output folder)")
    parser.add_argument("--no-streaming", action="store_true", help="load the whole model into memory instead")
    parser.add_argument("--save-statistics", metavar="DIR",
                        help="write each layer's statistics (safetensors) to this new folder, for re-planning")
    parser.add_argument("--statistics", metavar="DIR",
                        help="plan every layer from the statistics a --no-sequential --save-statistics run wrote "
                             "(same source and calibration; needs --no-sequential): no calibration data is run")
    parser.add_argument("--hidden-states-budget-gb", type=float, default=DEFAULTS.hidden_states_budget_gb,
                        help="calibration hidden states beyond this spill to memory-mapped files")


def _config_from_args(args: argparse.Namespace) -> ReamConfig:
    kwargs = dict(
        target_experts=args.target_experts, compression_ratio=args.compression_ratio, method=args.method,
        num_calibration_sequences=args.num_sequences, sequence_length=args.sequence_length, seed=args.seed,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, group_size=args.group_size,
        merge=args.merge, pca_dim=args.pca_dim, sequential=not args.no_sequential, saliency=args.saliency,
        saliency_mean=args.saliency_mean, weight_features=args.weight_features, refit=args.refit,
        refit_target=args.refit_target, refit_ridge=args.refit_ridge, refit_steps=args.refit_steps,
        refit_tokens=args.refit_tokens, prune_fallback=not args.no_merge_floor, layer_floor=not args.no_merge_floor,
        gated_similarity=not args.no_gated_similarity, use_router_logits=not args.no_router_logits, mtp=args.mtp,
        max_shard_size=args.max_shard_size, streaming=not args.no_streaming,
        hidden_states_budget_gb=args.hidden_states_budget_gb, output_dtype=args.output_dtype,
    )
    if args.calibration:
        kwargs["calibration"] = args.calibration
        kwargs["calibration_ratios"] = args.calibration_ratios
    elif args.calibration_ratios:
        raise ValueError("--calibration-ratios needs --calibration sources")
    return ReamConfig(**kwargs)


def _compress(args: argparse.Namespace) -> int:
    from .compressor import ReamCompressor
    from .io.folders import check_output_dir, check_paths, output_lock, recover_output
    from .pipeline import distributed
    from .pipeline.work_folder import WorkFolder

    config = _config_from_args(args)
    output_path = Path(args.output)
    work_dir = Path(args.work_dir) if args.work_dir else output_path.parent / f".{output_path.name}.ream-work"
    check_paths(args.source, output=output_path, work=work_dir)
    ranks = distributed.setup(config.run_device)
    try:
        with contextlib.ExitStack() as held:

            def prepare() -> bool:
                """On rank 0 (the one that writes): refuse an output or work folder it may not use, take the output's
                lock for the whole run, finish what an interrupted run left; True if only its cleanup was left."""
                WorkFolder.check(work_dir)
                settings = {**config.output_settings(), "allow_full_width": False, "statistics": args.statistics}
                if not WorkFolder.saved_output(work_dir, output_path, settings):
                    check_output_dir(output_path, args.overwrite)  # before the lock: a refusal creates nothing
                held.enter_context(output_lock(output_path))  # one run per output folder
                recover_output(output_path)
                if WorkFolder.saved_output(work_dir, output_path, settings):
                    if not args.resume:
                        raise ValueError(f"{output_path} is complete, but the run that wrote it was stopped before "
                                         f"removing its work folder {work_dir}; run the same command with --resume to "
                                         "finish")
                    WorkFolder.open_saved(work_dir).remove()
                    print(f"{output_path} was already complete; removed the work folder {work_dir} the interrupted "
                          "run left")
                    return True
                check_output_dir(output_path, args.overwrite)
                return False

            if distributed.on_main(ranks, prepare):  # every rank refuses, or goes on, as rank 0 decided
                return 0
            compressor = ReamCompressor(config)
            compressor.compress(args.source, resume=args.resume, work_dir=work_dir,
                                trust_remote_code=args.trust_remote_code, revision=args.revision,
                                save_statistics=args.save_statistics, statistics=args.statistics)
            output = compressor.save_pretrained(args.output, overwrite=args.overwrite)
    finally:
        distributed.shutdown()
    result = compressor.result
    if ranks.is_main:
        print(f"{result.source_name}: {result.experts_before} -> {result.experts_after} experts in "
              f"{len(result.layers)} MoE layers ({config.method}); wrote {output}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from .pipeline.job_plan import plan_job

    kwargs = dict(target_experts=args.target_experts, compression_ratio=args.compression_ratio, method=args.method,
                  num_calibration_sequences=args.num_sequences, sequence_length=args.sequence_length,
                  dtype=args.dtype, device=args.device, mtp=args.mtp, streaming=not args.no_streaming,
                  hidden_states_budget_gb=args.hidden_states_budget_gb, output_dtype=args.output_dtype)
    plan = plan_job(args.source, ReamConfig(**kwargs), tflops=args.tflops, disk_gbps=args.disk_gbps,
                    threads=args.threads, ram_bytes=None if args.ram_gb is None else int(args.ram_gb * 1e9))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else "\n".join(plan.summary_lines()))
    return 0


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="local model folder or Hugging Face Hub repo id (only config.json and the "
                                       "weight index are read)")
    parser.add_argument("--target-experts", type=int)
    parser.add_argument("--compression-ratio", type=float)
    parser.add_argument("--method", choices=METHODS, default=DEFAULTS.method)
    parser.add_argument("--num-sequences", type=int, default=DEFAULTS.num_calibration_sequences)
    parser.add_argument("--sequence-length", type=int, default=DEFAULTS.sequence_length)
    parser.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype)
    parser.add_argument("--device", default=DEFAULTS.device, help="the device the job would run on (cpu, cuda)")
    parser.add_argument("--mtp", choices=MTP_MODES, default=DEFAULTS.mtp)
    parser.add_argument("--output-dtype", choices=OUTPUT_DTYPES, help="fp8: count the output FP8 block-wise")
    parser.add_argument("--no-streaming", action="store_true")
    parser.add_argument("--hidden-states-budget-gb", type=float, default=DEFAULTS.hidden_states_budget_gb)
    parser.add_argument("--tflops", type=float, help="one throughput for every GEMM stage of the estimate (default: "
                                                     "each stage's rate as measured on an H100 or this project's CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads the job will run with (default: torch's count)")
    parser.add_argument("--ram-gb", type=float, help="the RAM to plan for (default: this machine's)")
    parser.add_argument("--disk-gbps", type=float, default=2.0, help="disk read speed for the estimate")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .release.report import LAYER_PLOT_NAME

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ream-hf-demo-"))
    print(f"ream-hf demo: building a tiny Qwen3-MoE, training it for a few seconds on demo text, then compressing "
          f"it with method={args.method} ...", flush=True)
    result = run_demo(workdir, method=args.method)
    width = max(len(row.quantity) for row in result.rows)
    print(f"\n{'':{width}}  {'original':>10}  {'compressed':>10}  {'kept':>7}")
    for row in result.rows:
        print(f"{row.quantity:{width}}  {row.before:>10}  {row.after:>10}  {row.kept:>7}")
    print(f"\nThe compressed model keeps {100 * result.accuracy_kept:.1f}% of the original's next-token accuracy on "
          f"held-out text (loss {result.before.loss:.3f} -> {result.after.loss:.3f}; a model that learned nothing "
          f"scores ln({result.vocab_size}) = {math.log(result.vocab_size):.2f}).\noutput folder: {result.output} (what each "
          f"layer lost: {LAYER_PLOT_NAME} there, or `ream-hf report {result.output}`)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .release.report import format_table, layer_losses, read_manifest, write_layer_report

    rows = layer_losses(read_manifest(args.folder))
    if not rows:
        raise ValueError(f"the manifest of {args.folder} has no MoE layer")
    print(format_table(rows))
    if args.plot:
        print(f"wrote {write_layer_report(args.folder, args.plot)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .release.card import CARD_NAME, EVAL_RESULTS_NAME
    from .release.evaluate_output import eval_kwargs, evaluate_output, results_table
    from .release.evaluation import EvaluationError
    from .release.serve import signals_raise_keyboard_interrupt

    try:
        with signals_raise_keyboard_interrupt():  # SIGTERM too: the vLLM server is stopped, not orphaned
            results = evaluate_output(args.output, args.original, **eval_kwargs(args))
    except (EvaluationError, FileNotFoundError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(results_table(results))
    print(f"wrote {Path(args.output) / EVAL_RESULTS_NAME} and the model card {Path(args.output) / CARD_NAME}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .release.hub import UploadError, push_folder

    try:
        url = push_folder(args.folder, args.repo_id, private=args.private)
    except UploadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.folder} to {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ream-hf", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="per-layer log lines")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_compress_arguments(commands.add_parser("compress", help="compress an MoE model"))
    _add_plan_arguments(commands.add_parser("plan", help="what a compression job needs (sizes, memory, time), from "
                                                         "config.json and the weight index alone"))
    from .release.serve import add_serve_arguments

    add_serve_arguments(commands.add_parser("serve", help="serve a checkpoint with vLLM's OpenAI-compatible server "
                                                          "(adds MTP speculative decoding when the checkpoint has it)"))
    from .release.evaluate_output import add_eval_arguments

    evaluate = commands.add_parser("eval", help="score a compressed output and its source on IFEval, GSM8K and "
                                                "HumanEval (vLLM + lm-eval); write eval_results.json and the model "
                                                "card with the scores and their retention")
    evaluate.add_argument("output", help="the output folder of `ream-hf compress`")
    evaluate.add_argument("--original", required=True, help="the source checkpoint folder (the output records only "
                                                            "its name)")
    add_eval_arguments(evaluate)
    push = commands.add_parser("push", help="upload a compressed checkpoint folder to the Hub; run it again to retry "
                                            "an interrupted upload (nothing is compressed again)")
    push.add_argument("folder", help="the output folder of `ream-hf compress` (or of compress_and_push); its model card "
                                     "is written first if it has none")
    push.add_argument("repo_id", help="owner/name of the model repo (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    # no --token: a token on the command line ends up in shell history and `ps`; HF_TOKEN or `hf auth login`
    report = commands.add_parser("report", help="what each MoE layer lost, as a table: routing mass kept, held-out "
                                                "error before/after the refit, merge-group sizes (the plot of the "
                                                "same is layer_report.png in the output folder)")
    report.add_argument("folder", help="an output folder of `ream-hf compress`")
    report.add_argument("--plot", metavar="PNG", help="also draw the plot into this file (for example for an output "
                                                      "written before the plot existed)")
    demo = commands.add_parser("demo", help="build and train a tiny Qwen3-MoE, compress it and print "
                                          "before/after on held-out text")
    demo.add_argument("--workdir", help="where to put the demo files (default: a new temporary folder)")
    demo.add_argument("--method", choices=METHODS, default="ream")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "serve":
            from .release.serve import run_serve

            return run_serve(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "push":
            return _push(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "report":
            return _report(args)
        return _compress(args) if args.command == "compress" else _demo(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; run the same command with --resume to continue" if args.command == "compress" else ""
        print(f"error: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as error:
        from .io.folders import StorageError

        if isinstance(error, StorageError):
            print(f"error: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
