"""Benchmark of the statistics pass: wall time, peak RSS and achieved GFLOP/s on a random Qwen3-MoE.

Default job (issue 3): 8 layers, 64 experts, top-8, hidden 256, expert intermediate 128, 128 calibration
sequences x 256 tokens, 64 -> 48 experts, float32, CPU. The paper's published code took 72 s and 4.2 GB
peak RSS on this job on a 2-core machine. Each configuration runs in a fresh subprocess so peak RSS
is that job's alone; the calibration set is also doubled to show peak memory stays flat. "CPU s" is the job's
process CPU time (user + system), steadier than wall time on a machine shared with other jobs; the seconds per
stage (statistics, plan, merge, refit, forward, load) are summed over the layers.

    python eval/bench_compress.py            # default job and its doubled-calibration twin
    python eval/bench_compress.py --repeat 3 # median wall time and the range of peak RSS over 3 runs each
    python eval/bench_compress.py --sequences 128 256 512 --method reap
    python eval/bench_compress.py --sequences 128 --repeat 3 --set layer_floor=true   # any ReamConfig field
    python eval/bench_compress.py --sequences 128 --repeat 5 --versus refit=none   # what the default refit costs

`--versus FIELD=VALUE` runs the job and its variant alternately (job, variant, job, ...), so a slow spell of a
shared host falls on both, and prints the job's overhead over the variant: the ratio of the fastest runs (the
least disturbed), of the medians, and of the median CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_source(folder: Path, layers: int, experts: int, top_k: int, hidden: int, inner: int) -> Path:
    from ream_hf.fixtures import build_tiny_qwen3_moe

    return build_tiny_qwen3_moe(folder, num_experts=experts, num_layers=layers, hidden_size=hidden,
                                moe_intermediate_size=inner, top_k=top_k, initializer_range=0.05)


def write_calibration(path: Path, sequences: int, length: int, vocab: int) -> Path:
    import random

    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(sequences):
            handle.write(json.dumps({"input_ids": [rng.randrange(3, vocab) for _ in range(length)]}) + "\n")
    return path


def parse_setting(item: str) -> tuple[str, object]:
    """`--set FIELD=VALUE`: true/false, an int, a float, or the text as it is."""
    name, eq, text = item.partition("=")
    if not eq:
        raise SystemExit(f"--set {item!r}: use FIELD=VALUE")
    value: object = {"true": True, "false": False}.get(text.lower(), text)
    for kind in (int, float):
        if isinstance(value, str):
            try:
                value = kind(text)
            except ValueError:
                pass
    return name, value


def run_job(args: argparse.Namespace) -> dict:
    """One compression in this process; returns its measurements."""
    import torch

    from ream_hf import ReamCompressor, ReamConfig
    from ream_hf.pipeline.sequential import peak_rss_gb

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    calibration = write_calibration(work / f"cal-{args.job_sequences}.jsonl", args.job_sequences, args.length, 512)
    config = ReamConfig(
        target_experts=args.target, method=args.method, calibration=[str(calibration)], calibration_ratios=None,
        num_calibration_sequences=args.job_sequences, sequence_length=args.length, batch_size=args.batch_size,
        group_size=args.group_size, dtype="float32", **({} if args.refit is None else {"refit": args.refit}),
        **dict(parse_setting(item) for item in args.set),
    )
    compressor = ReamCompressor(config)
    started, cpu_started = time.perf_counter(), time.process_time()
    compressor.compress(str(work / "source"), work_dir=tempfile.mkdtemp(prefix="work-", dir=work))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    layers = compressor.result.layers
    stats_seconds = sum(r.stats_seconds for r in layers)
    stages: dict[str, float] = {}
    for report in layers:
        for stage, seconds in report.timings.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    tokens = compressor.result.calibration_tokens
    flops = 0.0
    if config.is_merging:  # every expert on every token: 3 matmuls of 2*H*D flops each
        flops = 3 * 2 * args.hidden * args.inner * args.experts * tokens * len(layers)
    return {
        "method": args.method, "sequences": args.job_sequences, "tokens": tokens, "wall_s": wall, "cpu_s": cpu,
        "stats_s": stats_seconds, "gflops": flops / stats_seconds / 1e9 if flops else None,
        "peak_rss_gb": peak_rss_gb(), "stages": stages,
    }


def overhead(job: list[dict], variant: list[dict]) -> dict[str, float]:
    """The job's time over its variant's: fastest wall over fastest wall (the runs a shared host disturbed least),
    median over median, and median CPU seconds over median CPU seconds."""
    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    wall, other = [r["wall_s"] for r in job], [r["wall_s"] for r in variant]
    return {"fastest wall": min(wall) / min(other), "median wall": median(wall) / median(other),
            "median CPU": median([r["cpu_s"] for r in job]) / median([r["cpu_s"] for r in variant])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inner", type=int, default=128)
    parser.add_argument("--sequences", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--target", type=int, default=48)
    parser.add_argument("--method", default="ream")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--refit", help="ReamConfig.refit for this job (default: the library's default)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="another ReamConfig field for this job (repeatable; true/false, numbers, or text)")
    parser.add_argument("--versus", metavar="FIELD=VALUE",
                        help="also run this variant, alternating with the job, and print the job's overhead over it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration (peak RSS varies by ~0.1 GB)")
    parser.add_argument("--workdir")
    parser.add_argument("--job-sequences", type=int, help=argparse.SUPPRESS)  # internal: run one job
    args = parser.parse_args()
    if args.job_sequences:
        print(json.dumps(run_job(args)))
        return
    with tempfile.TemporaryDirectory(prefix="ream-bench-") as temp:
        work = Path(args.workdir or temp)
        build_source(work / "source", args.layers, args.experts, args.top_k, args.hidden, args.inner)
        rows, overheads = [], []
        variants = [("", [])] + ([(args.versus, ["--set", args.versus])] if args.versus else [])
        for sequences in args.sequences:
            base = [sys.executable, __file__, *sys.argv[1:], "--workdir", str(work), "--job-sequences", str(sequences)]
            runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
            for _ in range(args.repeat):
                for label, extra in variants:  # alternating: job, variant, job, variant, ...
                    out = subprocess.run(base + extra, check=True, capture_output=True, text=True).stdout
                    runs[label].append(json.loads(out.strip().splitlines()[-1]))
            for label, _ in variants:
                done = runs[label]
                row = dict(sorted(done, key=lambda r: r["wall_s"])[len(done) // 2])  # the median run by wall time
                row["peak_range"] = (min(r["peak_rss_gb"] for r in done), max(r["peak_rss_gb"] for r in done))
                row["label"] = label
                rows.append(row)
            if args.versus:
                overheads.append((sequences, overhead(runs[""], runs[args.versus])))
    print(f"\nbench_compress: {args.layers} layers, {args.experts} experts top-{args.top_k}, hidden {args.hidden}, "
          f"expert intermediate {args.inner}, {args.experts} -> {args.target}, float32, {args.threads} threads\n")
    if args.repeat > 1:
        print(f"median run of {args.repeat} by wall time; peak RSS as lowest - highest over the runs\n")
    print("| method | sequences x len | tokens | wall s | CPU s | statistics s | GFLOP/s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gflops = f"{r['gflops']:.0f}" if r["gflops"] else "-"
        low, high = r["peak_range"]
        peak = f"{high:.2f}" if args.repeat == 1 else f"{low:.2f} - {high:.2f}"
        method = r["method"] + (f" {r['label']}" if r["label"] else "")
        print(f"| {method} | {r['sequences']} x {args.length} | {r['tokens']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
              f"{r['stats_s']:.1f} | {gflops} | {peak} |")
    print("\nseconds per stage, all layers: " + "; ".join(
        f"{r['sequences']} x {args.length}{' ' + r['label'] if r['label'] else ''}: "
        + ", ".join(f"{k} {v:.1f}" for k, v in r.get("stages", {}).items()) for r in rows))
    for sequences, ratios in overheads:
        print(f"\nthe job over {args.versus}, {sequences} x {args.length}, {args.repeat} alternating runs each: "
              + ", ".join(f"{name} {100 * (value - 1):+.1f} %" for name, value in ratios.items()))
    print("\nreference (paper's code, same job, 2 cores): 72 s wall, 4.2 GB peak RSS")


if __name__ == "__main__":
    main()
