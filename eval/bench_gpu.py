"""The real pipeline on a GPU at Qwen3-30B-A3B's layer shape: seconds per layer by stage, TFLOP/s against the card's
peak, the GEMM dtypes used, and the whole 48-layer model's time extrapolated.

A random Qwen3-MoE with Qwen3-30B-A3B's layers (128 experts top-8, hidden 2048, expert 768, 32/4 attention heads of
128, bfloat16; a 512-token vocabulary, which only the embeddings see) and a few of them, saved as a checkpoint;
the paper's calibration size, 3072 x 512 random token ids written as pre-tokenised .jsonl; then `ReamCompressor`
streams it from the folder exactly as `ream-hf compress` does (work folder, background writes, weight prefetch),
128 -> 96 experts by REAM. The job's exact statistic is 6 x H x D x E x T = 1.9 PFLOP per layer (91 PFLOP for 48).

    python eval/bench_gpu.py --layers 4                          # one GPU (about 2 minutes on an H100)
    torchrun --nproc-per-node 8 eval/bench_gpu.py --layers 8     # all GPUs of a node; rank 0 reports
    python eval/bench_gpu.py --tiny                              # toy scale, runs on the CPU (checks the script)
    python eval/bench_gpu.py --peers --layers 2 --reference-repo ream --reference-path peers/transformers4 \
        --llm-compressor-path peers/llmcompressor                # the same job by every tool, side by side

--peers times ream-hf (REAM and REAP), the paper's code (reference_ream.py's way) and llm-compressor's
REAPPruningModifier on the same model, calibration tokens and target, each in a process of its own
(eval/bench_peers.py), and prints seconds per layer and peak memory as ratios against ream-hf's same method; a tool
that cannot run prints "not available: why". Their packages are pure Python beside torch: pass folders that
`pip install --target` filled (carried to the GPU machine with the run) as --reference-path / --llm-compressor-path.

Writes a JSON record with --json (default: $OUT/bench_gpu.json when OUT is set). Exits 3 if a CUDA run's
statistics GEMMs are not bfloat16 (a silent float32 fallback would be about 15x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_compress import write_calibration

# dense bf16 tensor-core peak by datasheet, TFLOP/s (no sparsity)
DATASHEET_BF16 = (("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                  ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))
FULL_LAYERS = 48  # Qwen3-30B-A3B


def say(*parts) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*parts, flush=True)


def datasheet_peak(name: str) -> float | None:
    return next((peak for key, peak in DATASHEET_BF16 if key in name), None)


def measured_peak(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    """Dense bf16 GEMM rate this card reaches here (what our GEMMs can hope for)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def shape(args) -> dict:
    if args.tiny:
        return dict(hidden=64, inner=32, experts=16, top_k=4, heads=4, kv_heads=2, head_dim=16, target=12,
                    group_size=4)
    return dict(hidden=args.hidden, inner=args.inner, experts=args.experts, top_k=args.top_k, heads=32, kv_heads=4,
                head_dim=128, target=args.target, group_size=args.group_size)


def build_source(folder: Path, s: dict, layers: int, length: int, device: torch.device) -> Path:
    """A random bfloat16 Qwen3-MoE checkpoint (+ the tiny tokenizer) with the given layer shape."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from ream_hf.fixtures import build_tiny_tokenizer, hub_style_config

    tokenizer = build_tiny_tokenizer(folder)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=3 * s["hidden"],
        moe_intermediate_size=s["inner"], num_hidden_layers=layers, num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], num_experts=s["experts"],
        num_experts_per_tok=s["top_k"], norm_topk_prob=True, max_position_embeddings=max(1024, length),
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))
    del model
    hub_style_config(folder, {"num_local_experts": "num_experts"})
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random model")
    parser.add_argument("--sequences", type=int, default=3072)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inner", type=int, default=768)
    parser.add_argument("--target", type=int, default=96)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--method", default="ream")
    parser.add_argument("--refit", help="ReamConfig.refit (default: the config's default)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch (16 x 512 = 8192 tokens)")
    parser.add_argument("--chunk", type=int, default=4096, help="token rows per statistics GEMM (capped by memory)")
    parser.add_argument("--budget-gb", type=float, default=8.0, help="hidden_states_budget_gb (0: spill to files)")
    parser.add_argument("--tiny", action="store_true", help="toy scale (64 x 64 tokens, hidden 64): runs on a CPU")
    parser.add_argument("--workdir", help="where the model, calibration and output go (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here (default: $OUT/bench_gpu.json when OUT is set)")
    parser.add_argument("--peers", action="store_true", help="time every tool on the same job (eval/bench_peers.py)")
    parser.add_argument("--reference-repo", help="--peers: a checkout of SamsungSAILMontreal/ream")
    parser.add_argument("--reference-path", help="--peers: a package folder put first on the paper's code's path "
                                                 "(transformers 4.57, huggingface_hub < 1, tokenizers 0.22)")
    parser.add_argument("--peer-list", nargs="+", help="--peers: these tools only (default: all)")
    parser.add_argument("--llm-compressor-path", help="--peers: a package folder put first on llm-compressor's path")
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.sequences, args.length, args.batch_size = min(args.layers, 3), 64, 64, 8

    from ream_hf import ReamCompressor, ReamConfig, __version__
    from ream_hf.pipeline import distributed
    from ream_hf.pipeline.device import resolve_device

    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA GPU here: run with --tiny to check the script at toy scale on the CPU", file=sys.stderr)
        return 2
    device_name = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    ranks = distributed.setup(device_name)
    device = resolve_device(device_name, ranks.local_rank)
    s = shape(args)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import transformers

    say(f"bench_gpu: {card} x {ranks.world}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"ream-hf {__version__}")
    peak = measured_peak(device) if device.type == "cuda" else None
    if peak:
        say(f"dense bf16 GEMM here: {peak:.0f} TFLOP/s measured, {datasheet_peak(card) or '?'} by datasheet")

    temp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    elif ranks.is_main:
        temp = tempfile.mkdtemp(prefix="ream-bench-gpu-")
        work = Path(temp)
    if ranks.distributed:  # every rank uses rank 0's folder
        box = [str(work) if ranks.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        work = Path(box[0])
    source, calibration = work / "source", work / "calibration.jsonl"
    started = time.perf_counter()
    if ranks.is_main:
        build_source(source, s, args.layers, args.length, device)
        write_calibration(calibration, args.sequences, args.length, 512)
    else:  # the imports rank 0 paid while building, so no rank's timed run waits for another's imports
        import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401
        import transformers.models.auto.tokenization_auto  # noqa: F401
    distributed.barrier(ranks)
    built = time.perf_counter() - started
    say(f"built {args.layers} layers of {s['experts']} experts (hidden {s['hidden']}, expert {s['inner']}, bf16) and "
        f"{args.sequences} x {args.length} calibration tokens in {built:.1f} s")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.peers:
        try:
            return run_peers(args, s, source, calibration, device_name)
        finally:
            if temp:
                shutil.rmtree(temp, ignore_errors=True)

    config = ReamConfig(
        target_experts=s["target"], method=args.method, group_size=s["group_size"], calibration=[str(calibration)],
        calibration_ratios=None, num_calibration_sequences=args.sequences, sequence_length=args.length,
        batch_size=args.batch_size, token_chunk_size=args.chunk, device=device_name,
        hidden_states_budget_gb=args.budget_gb, **({"refit": args.refit} if args.refit else {}),
    )
    compressor = ReamCompressor(config)
    started = time.perf_counter()
    compressor.compress(str(source), work_dir=work / "work")
    compressed = time.perf_counter() - started
    compressor.save_pretrained(work / "output", overwrite=True)
    saved = time.perf_counter() - started - compressed
    result = compressor.result

    tokens = result.calibration_tokens
    exact = 6 * s["hidden"] * s["inner"] * s["experts"] * tokens  # every expert on every token, per layer
    executed = (4 * s["hidden"] * s["inner"] * s["experts"] + 2 * s["hidden"] * s["inner"] * s["top_k"]) * tokens
    rows = []
    for report in result.layers:
        t = report.timings
        rows.append({"layer": report.index, "seconds": report.seconds, **{k: t.get(k, 0.0) for k in
                     ("load", "statistics", "plan", "merge", "refit", "forward")},
                     "exact_tflops": exact / t["statistics"] / 1e12, "executed_tflops": executed / t["statistics"] / 1e12})
    gemm = result.layers[0].gemm if result.layers else {}
    # the first layer pays cuBLAS/allocator warm-up, the last has no re-forward: the layers between are the model's
    steady = rows[1:-1] or rows[1:] or rows
    per_layer = statistics.mean(r["seconds"] for r in steady)
    background = result.background_write_seconds / max(1, len(rows))
    fixed = compressed - sum(r["seconds"] for r in rows) + saved
    full = fixed + FULL_LAYERS * per_layer  # per-layer wall time includes any wait for the background writes
    record = {
        "card": card, "world_size": ranks.world, "torch": torch.__version__, "transformers": transformers.__version__,
        "shape": s, "refit": config.refit, "layers": args.layers, "calibration": [args.sequences, args.length], "tokens": tokens,
        "batch_size": args.batch_size, "chunk": args.chunk, "gemm": gemm,
        "peak_tflops_measured": peak, "peak_tflops_datasheet": datasheet_peak(card),
        "exact_pflop_per_layer": exact / 1e15, "per_layer": rows, "steady_seconds_per_layer": per_layer,
        "background_write_seconds_per_layer": background, "write_wait_seconds": result.write_wait_seconds,
        "compress_seconds": compressed, "save_seconds": saved, "fixed_seconds": fixed,
        "full_model_layers": FULL_LAYERS, "full_model_minutes": full / 60,
    }
    say("\n| layer | total s | load | statistics | plan | merge | refit | re-forward | exact TFLOP/s | executed TFLOP/s |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        say(f"| {r['layer']} | {r['seconds']:.2f} | {r['load']:.2f} | {r['statistics']:.2f} | {r['plan']:.2f} | "
            f"{r['merge']:.2f} | {r['refit']:.2f} | {r['forward']:.2f} | {r['exact_tflops']:.3g} | {r['executed_tflops']:.3g} |")
    say(f"\nGEMMs: {json.dumps(gemm)}")
    steady_stats = statistics.mean(r["statistics"] for r in steady)
    say(f"statistics: {exact / steady_stats / 1e12:.3g} TFLOP/s of the exact statistic ({exact / 1e15:.3g} PFLOP per "
        f"layer), {executed / steady_stats / 1e12:.3g} TFLOP/s executed"
        + (f" = {executed / steady_stats / 1e12 / peak:.0%} of the measured peak" if peak else ""))
    say(f"background writes (hidden states, shard parts, commits): {background:.2f} thread-seconds per layer, "
        f"overlapped with compute; the compute thread waited {result.write_wait_seconds:.2f} s for them in all")
    say(f"fixed costs (calibration, skeleton, embedding, last writes, save): {fixed:.1f} s")
    say(f"whole Qwen3-30B-A3B job extrapolated: {fixed:.0f} s + {FULL_LAYERS} x {per_layer:.2f} s "
        f"= {full / 60:.1f} min on {ranks.world} x {card}")
    path = args.json or (str(Path(os.environ["OUT"]) / "bench_gpu.json") if os.environ.get("OUT") else None)
    if path and ranks.is_main:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
        say(f"wrote {path}")
    distributed.shutdown()
    if temp and ranks.is_main:
        shutil.rmtree(temp, ignore_errors=True)
    if device.type == "cuda" and not gemm.get("gate_up", "").startswith("bfloat16"):
        say(f"ERROR: the statistics GEMMs on {card} are {gemm.get('gate_up')}, not bfloat16")
        return 3
    return 0


def run_peers(args, s: dict, source: Path, calibration: Path, device_name: str) -> int:
    """Every tool of eval/bench_peers.py on the same model, tokens and target, one process each; the table."""
    import subprocess

    ids = [json.loads(line)["input_ids"] for line in calibration.read_text().splitlines()]
    tokens = calibration.with_suffix(".pt")
    torch.save({"input_ids": torch.tensor(ids, dtype=torch.long)}, tokens)  # the same ids, as the reference reads them
    from bench_peers import PEERS

    paths = {"reference:ream": args.reference_path, "llm-compressor:reap": args.llm_compressor_path}
    repo = Path(__file__).resolve().parent.parent
    rows = []
    for peer in args.peer_list or PEERS:
        command = [sys.executable, str(Path(__file__).with_name("bench_peers.py")), "--peer", peer, "--model",
                   str(source), "--jsonl", str(calibration), "--tokens", str(tokens), "--sequences",
                   str(args.sequences), "--length", str(args.length), "--target", str(s["target"]), "--group-size",
                   str(s["group_size"]), "--batch-size", str(args.batch_size), "--device", device_name,
                   "--threads", str(torch.get_num_threads())]
        if args.reference_repo:
            command += ["--reference-repo", str(Path(args.reference_repo).resolve())]
        path = [str(Path(p).resolve()) for p in (paths.get(peer),) if p] + [str(repo)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"peer": peer, "not_available": f"failed (exit {done.returncode}): {tail[:300]}"})
        else:
            rows.append(json.loads(lines[-1]))
    say(f"\n--peers: {args.layers} layers of {s['experts']} experts top-{s['top_k']} (hidden {s['hidden']}, expert "
        f"{s['inner']}), {s['experts']} -> {s['target']}, {args.sequences} x {args.length} calibration tokens, "
        f"{device_name}\n")
    say("| tool | seconds per layer | peak memory GB | time vs ream-hf | memory vs ream-hf |")
    say("|---|---|---|---|---|")
    ours = {row["peer"].split(":")[1]: row for row in rows if row["peer"].startswith("ream-hf:") and "seconds" in row}
    for row in rows:
        if "not_available" in row:
            say(f"| {row['peer']} | not available: {row['not_available']} | | | |")
            continue
        base = ours.get(row["peer"].split(":")[1])
        ratio = lambda key: f"{row[key] / base[key]:.2f} x" if base else "-"  # noqa: E731
        say(f"| {row['peer']} | {row['seconds_per_layer']:.2f} | {row['peak_bytes'] / 1e9:.2f} ({row['memory']}) | "
            f"{ratio('seconds_per_layer')} | {ratio('peak_bytes')} |")
    path = args.json or (str(Path(os.environ["OUT"]) / "bench_peers.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"shape": s, "layers": args.layers, "device": device_name, "peers": rows},
                                         indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
