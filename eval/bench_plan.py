"""`ream-hf plan` against a measured run: seconds by stage and peak RSS, on a random Qwen3-MoE saved to disk.

The source is written shard by shard (never held whole in memory), so it can be larger than the RAM the plan is
told it has (`--ram-gb`): a streaming run. The job runs in a fresh subprocess (`--threads` torch threads) whose
resident memory a sampler thread reads from /proc every 20 ms, split into the layers' phase and the save (last
writes and the final verification); the plan is made from config.json and the index alone, as `ream-hf plan` does.

    python eval/bench_plan.py --threads 1                                   # small default job
    python eval/bench_plan.py --layers 6 --experts 64 --hidden 1024 --inner 512 --ram-gb 1.5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile")


def rss() -> dict[str, int]:
    """This process's resident bytes now: all of it, anonymous (heap, tensors) and file-backed (libraries, mmaps)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key = line.split(":", 1)[0]
            if key in STATUS_KEYS:
                out[key] = int(line.split()[1]) * 1024
    return out


class RssSampler:
    """Peak resident bytes per phase, sampled in a thread (the job's own peaks last far longer than 20 ms)."""

    def __init__(self, every: float = 0.02) -> None:
        self.every, self.phase, self.peaks = every, "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now, peak = rss(), self.peaks.setdefault(self.phase, dict.fromkeys(STATUS_KEYS, 0))
            for key, value in now.items():
                peak[key] = max(peak[key], value)
            time.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build_source(folder: Path, layers: int, experts: int, top_k: int, hidden: int, inner: int, seed: int = 0,
                 dtype: str = "float32") -> Path:
    """A random Qwen3-MoE checkpoint (and the tiny tokenizer) written one decoder layer per shard, so building it
    never needs more memory than one layer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from ream_hf.fixtures import build_tiny_tokenizer, hub_style_config

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(folder)
    torch_dtype = getattr(torch, dtype)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=inner,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype=dtype,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    groups: dict[str, dict[str, tuple]] = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        key = f"layer-{int(parts[2]):05d}" if parts[1] == "layers" else "rest"
        groups.setdefault(key, {})[name] = tuple(tensor.shape)
    generator = torch.Generator().manual_seed(seed)
    files = sorted(groups)
    weight_map, total = {}, 0
    for number, key in enumerate(files, 1):
        shard = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        tensors = {}
        for name, shape in groups[key].items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch_dtype)
            else:  # per-expert tensors as the Hub stores them
                tensors[name] = (torch.randn(shape, generator=generator) * 0.05).to(torch_dtype)
        if key != "rest":
            tensors = split_experts(tensors)
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = shard
            total += tensor.numel() * tensor.element_size()
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    config.save_pretrained(str(folder))
    hub_style_config(folder, {"num_local_experts": "num_experts"})
    return folder


def split_experts(tensors: dict) -> dict:
    """transformers' fused expert parameters (gate_up_proj E x 2D x H, down_proj E x H x D) as the Hub's per-expert
    gate/up/down weights."""
    out = {}
    for name, tensor in tensors.items():
        head, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj":
            inner = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{head}.{e}.gate_proj.weight"] = tensor[e, :inner].clone()
                out[f"{head}.{e}.up_proj.weight"] = tensor[e, inner:].clone()
        elif leaf == "down_proj":
            for e in range(tensor.shape[0]):
                out[f"{head}.{e}.down_proj.weight"] = tensor[e].clone()
        else:
            out[name] = tensor
    return out


def job_config(args: argparse.Namespace, calibration: Path):
    from ream_hf import ReamConfig

    return ReamConfig(target_experts=args.target, method=args.method, calibration=[str(calibration)],
                      calibration_ratios=None, num_calibration_sequences=args.sequences, sequence_length=args.length,
                      batch_size=args.batch_size, dtype="float32", hidden_states_budget_gb=args.budget_gb,
                      **({} if args.refit is None else {"refit": args.refit}))


def run_job(args: argparse.Namespace) -> dict:
    """The compression and save in this process, its RSS sampled by phase."""
    import torch

    torch.set_num_threads(args.threads)
    from ream_hf import ReamCompressor

    work = Path(args.workdir)
    if args.cpu_clock:
        use_thread_clock()
    baseline = rss()["VmRSS"]
    with RssSampler() as sampler:
        sampler.phase = "layers"
        compressor = ReamCompressor(job_config(args, work / "calibration.jsonl"))
        started = time.perf_counter()
        compressor.compress(str(work / "source"), work_dir=work / "work")
        compressed = time.perf_counter()
        sampler.phase = "save"
        compressor.save_pretrained(work / "output", overwrite=True)
        saved = time.perf_counter()
    stages: dict[str, float] = {}
    for report in compressor.result.layers:
        for stage, seconds in report.timings.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return {"baseline_bytes": baseline, "cpu_seconds": time.process_time(), "peaks": sampler.peaks, "compress_seconds": compressed - started,
            "save_seconds": saved - compressed, "stages": stages, "layers": len(compressor.result.layers)}


def use_thread_clock() -> None:
    """Stage timings in the compute thread's CPU seconds: the pipeline times its stages with time.perf_counter in
    the thread that runs them (torch's one intra-op thread here), so on a machine shared with other jobs this gives
    the seconds an idle core would take."""
    import types

    from ream_hf.pipeline import layer, sequential

    clock = types.SimpleNamespace(perf_counter=time.thread_time)
    layer.time = sequential.time = clock


def measure(args: argparse.Namespace) -> dict:
    """`run_job` in a fresh subprocess (its RSS is the job's alone)."""
    command = [sys.executable, __file__, *job_arguments(args), "--workdir", str(args.workdir), "--job"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def job_arguments(args: argparse.Namespace) -> list[str]:
    names = ("layers", "experts", "top_k", "hidden", "inner", "target", "method", "sequences", "length", "batch_size",
             "threads", "budget_gb")
    out = [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in names] + (["--cpu-clock"] if args.cpu_clock else [])
    return out + ([] if args.refit is None else [f"--refit={args.refit}"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inner", type=int, default=256)
    p.add_argument("--target", type=int, default=24)
    p.add_argument("--method", default="ream")
    p.add_argument("--refit", help="ReamConfig.refit (default: the method's default)")
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--budget-gb", type=float, default=8.0, help="hidden_states_budget_gb")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu-clock", action="store_true",
                   help="stages in the compute thread's CPU seconds (steady on a shared machine; needs --threads 1)")
    p.add_argument("--ram-gb", type=float, help="the RAM the plan is told this machine has (default: its own)")
    p.add_argument("--workdir", help="where the source, calibration, work folder and output go (default: temporary)")
    p.add_argument("--json", help="write plan and measurement here")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # internal: run the job, print JSON
    return p


def main() -> None:
    args = parser().parse_args()
    if args.job:
        print(json.dumps(run_job(args)))
        return
    from bench_compress import write_calibration

    from ream_hf.pipeline.job_plan import plan_job

    with tempfile.TemporaryDirectory(prefix="ream-bench-plan-") as temp:
        args.workdir = Path(args.workdir or temp)
        source = build_source(args.workdir / "source", args.layers, args.experts, args.top_k, args.hidden, args.inner)
        calibration = write_calibration(args.workdir / "calibration.jsonl", args.sequences, args.length, 512)
        plan = plan_job(source, job_config(args, calibration), threads=args.threads,
                        ram_bytes=None if args.ram_gb is None else int(args.ram_gb * 1e9))
        run = measure(args)
    peak = max(p["VmRSS"] for p in run["peaks"].values())
    measured_seconds = run["compress_seconds"] + run["save_seconds"]
    print(f"\nbench_plan: {args.layers} layers, {args.experts} experts top-{args.top_k}, hidden {args.hidden}, expert "
          f"{args.inner}, {args.experts} -> {args.target} ({args.method}), {args.sequences} x {args.length} tokens, "
          f"float32, {args.threads} thread(s); source {plan.source_bytes / 1e9:.2f} GB, plan told RAM "
          f"{plan.ram_bytes / 1e9:.2f} GB\n")
    print("| quantity | plan | measured | plan / measured |")
    print("|---|---|---|---|")
    print(f"| peak RSS GB | {plan.ram_bytes_needed / 1e9:.2f} | {peak / 1e9:.2f} | {plan.ram_bytes_needed / peak:.2f} |")
    for phase, p in run["peaks"].items():
        print(f"| peak RSS GB, {phase} (anonymous / file-backed) | | {p['VmRSS'] / 1e9:.2f} "
              f"({p['RssAnon'] / 1e9:.2f} / {p['RssFile'] / 1e9:.2f}) | |")
    print(f"| wall s | {plan.estimated_seconds:.1f} | {measured_seconds:.1f} | "
          f"{plan.estimated_seconds / measured_seconds:.2f} |")
    for stage, seconds in run["stages"].items():
        planned = plan.stage_seconds.get(stage)
        print(f"| {stage} s | {'-' if planned is None else f'{planned:.1f}'} | {seconds:.1f} | "
              f"{'-' if not planned else f'{planned / seconds:.2f}'} |")
    print(f"| save s | {plan.stage_seconds.get('save', 0):.1f} | {run['save_seconds']:.1f} | |")
    print("\nplan's rates: " + "; ".join(f"{name} {rate['value']} ({rate['source']})" for name, rate in plan.rates.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": plan.to_dict(), "run": run}, indent=1) + "\n")


if __name__ == "__main__":
    main()
