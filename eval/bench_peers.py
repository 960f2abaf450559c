"""One tool's compression of a saved Qwen3-MoE, timed in a process of its own: seconds per MoE layer and peak memory.

eval/bench_gpu.py --peers runs this once per tool on the same model, the same calibration tokens and the same
target, and prints them side by side. Tools ("peers"):

  ream-hf:ream, ream-hf:reap   this package (ReamCompressor, streaming from the folder as `ream-hf compress` does)
  reference:ream               the paper's code (SamsungSAILMontreal/ream) as eval/reference_ream.py runs it: needs
                               its checkout (--reference-repo) and transformers 4.57 on the path (--peer-path)
  llm-compressor:reap          llm-compressor's REAPPruningModifier through `oneshot` (the sequential pipeline)

Seconds: the compression call's wall time (loading the model is left out where the tool loads it apart: the
reference and llm-compressor); per layer: over the model's MoE layers. Memory: the GPU's peak allocated bytes on
CUDA, else the process's peak resident memory (VmHWM). Prints one JSON line; a tool that cannot run here prints
{"not_available": why} and exits 0 (never a made-up number).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

PEERS = ("ream-hf:ream", "ream-hf:reap", "reference:ream", "llm-compressor:reap")


def unavailable(peer: str, reference_repo: str | None) -> str | None:
    """Why `peer` cannot run in this process's environment, or None."""
    if peer == "reference:ream":
        if not reference_repo or not (Path(reference_repo) / "ream" / "merger.py").is_file():
            return "no checkout of SamsungSAILMontreal/ream given (--reference-repo DIR with ream/merger.py)"
        import transformers

        if not transformers.__version__.startswith("4."):
            return (f"the paper's code needs transformers 4.57 (their requirements.txt); this environment has "
                    f"{transformers.__version__} (bench_gpu.py --reference-path DIR: a folder holding transformers 4.57)")
    if peer == "llm-compressor:reap":
        if importlib.util.find_spec("llmcompressor") is None:
            return "llmcompressor is not installed here (pip install --target DIR llmcompressor==0.14.0.1, then bench_gpu.py --llm-compressor-path DIR)"
        try:
            from llmcompressor.modifiers.pruning.reap import REAPPruningModifier  # noqa: F401
        except Exception as error:  # any import failure of the peer is its unavailability, said in one line
            return f"llmcompressor's REAPPruningModifier does not import here: {type(error).__name__}: {error}"
    return None


def peak_bytes(device: str) -> tuple[int, str]:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "GPU peak allocated"
    with open("/proc/self/status", encoding="ascii") as status:  # not ream_hf's helper: the reference's transformers 4
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    return peak, "process peak RSS"


def moe_layers(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config["num_hidden_layers"])  # every Qwen3-MoE layer of these benches is MoE (decoder_sparse_step 1)


def run_ream_hf(args, method: str) -> float:
    from ream_hf import ReamCompressor, ReamConfig

    config = ReamConfig(target_experts=args.target, method=method, group_size=args.group_size,
                        calibration=[str(args.jsonl)], calibration_ratios=None, num_calibration_sequences=args.sequences,
                        sequence_length=args.length, batch_size=args.batch_size, device=args.device)
    compressor = ReamCompressor(config)
    with tempfile.TemporaryDirectory(prefix="ream-peers-") as temp:
        started = time.perf_counter()
        compressor.compress(str(args.model), work_dir=Path(temp) / "work")
        return time.perf_counter() - started


def run_reference(args) -> float:
    """eval/reference_ream.py's main in this process (its Merger moves each layer to CUDA when there is one)."""
    spec = importlib.util.spec_from_file_location("reference_ream", Path(__file__).with_name("reference_ream.py"))
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    with tempfile.TemporaryDirectory(prefix="ream-peers-") as temp:
        report = Path(temp) / "report.json"
        sys.argv = ["reference_ream.py", "--reference-repo", args.reference_repo, "--model", str(args.model),
                    "--calibration", str(args.tokens), "--target-experts", str(args.target), "--method", "ream",
                    "--group-size", str(args.group_size), "--batch-size", str(args.batch_size),
                    "--threads", str(args.threads), "--output", str(Path(temp) / "out"), "--report", str(report)]
        reference.main()
        return float(json.loads(report.read_text())["seconds"])


def run_llm_compressor(args) -> float:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoModelForCausalLM

    tokens = torch.load(args.tokens)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype="auto",
                                                 device_map=args.device if args.device == "cuda" else "cpu")
    experts = int(model.config.num_experts)
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=REAPPruningModifier(sparsity=(experts - args.target) / experts),
            num_calibration_samples=tokens.shape[0], max_seq_length=tokens.shape[1], batch_size=args.batch_size,
            shuffle_calibration_samples=False, moe_calibrate_all_experts=False, pipeline="sequential")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=PEERS, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--jsonl", type=Path, required=True, help="calibration token ids, one sequence a line")
    parser.add_argument("--tokens", type=Path, required=True, help='the same ids as a torch file {"input_ids": (N, L)}')
    parser.add_argument("--sequences", type=int, required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference-repo")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    why = unavailable(args.peer, args.reference_repo)
    if why is not None:
        print(json.dumps({"peer": args.peer, "not_available": why}))
        return
    if args.peer.startswith("ream-hf:"):
        seconds = run_ream_hf(args, args.peer.split(":")[1])
    elif args.peer == "reference:ream":
        seconds = run_reference(args)
    else:
        seconds = run_llm_compressor(args)
    peak, memory = peak_bytes(args.device)
    layers = moe_layers(args.model)
    print(json.dumps({"peer": args.peer, "seconds": seconds, "layers": layers, "seconds_per_layer": seconds / layers,
                      "peak_bytes": peak, "memory": memory}))


if __name__ == "__main__":
    main()
