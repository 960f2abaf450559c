"""FP8 output of a bf16 source (`--output-dtype fp8`): size and KL on the trained bench model.

The model is `train_tiny_moe.py`'s Qwen3-MoE (cached; trained there if missing), saved in float32; published MoE
checkpoints are bfloat16, so the bench first writes its bfloat16 copy, the source of every row. Then, with the
same settings (REAM by default, half the experts, bench_quality's calibration mix of the three domains):

  bf16 output   compressed, written in the source's dtype
  FP8 output    compressed, written with output_dtype "fp8" (the same run's tensors, quantized as they are written)
  FP8 source    the source itself quantized by the same rule, uncompressed: what FP8 alone costs

Each output is written and verified by save_pretrained and reloaded with transformers. On a CPU transformers
dequantizes an FP8 checkpoint to bfloat16 as it loads it; the bench checks that this gives the logits of our own
bfloat16 dequantization (`ream_hf.io.dequantize`) exactly, then scores the FP8 rows as our float32 dequantization
(FP8 values times their scales, not rounded again). Scores, on held-out text neither training nor calibration saw
(float32 next-token distributions, averaged over every position of the three domains): KL(source || row) and
KL(bf16 output || row), and each row's safetensors bytes.

    python eval/bench_fp8_output.py --threads 1
    python eval/bench_fp8_output.py --method reap --ratio 0.25
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_quality as quality  # noqa: E402
import train_tiny_moe as tiny  # noqa: E402


def bf16_copy(model_dir: Path, folder: Path) -> Path:
    """The trained model's bfloat16 copy, laid out like the Hub's (config key `num_experts`)."""
    import torch

    from ream_hf.fixtures import hub_style_config

    model = tiny.load_model(model_dir).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    hub_style_config(folder, {"num_local_experts": "num_experts"})
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(folder))
    return folder


def fp8_copy(source: Path, folder: Path) -> Path:
    """The source quantized by `Fp8BlockOutput`'s rule, uncompressed (one shard, config with quantization_config)."""
    from safetensors.torch import save_file

    from ream_hf.arch import family_for_config
    from ream_hf.io.quantization import Fp8BlockOutput
    from ream_hf.io.source import SourceCheckpoint
    from ream_hf.io.writer import copy_side_files, write_json

    src = SourceCheckpoint(source)
    fp8 = Fp8BlockOutput(family_for_config(src.config), list(src.weight_map))
    folder.mkdir(parents=True)
    save_file(dict(fp8.encode(src.iter_tensors(list(src.weight_map)))), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    shapes = {name: info.shape for name, info in src.tensor_infos.items()}
    write_json(folder / "config.json", {**src.config, "quantization_config": fp8.quantization_config(shapes)})
    copy_side_files(src.folder, folder)
    return folder


def reload(folder: Path, dequantized_root: Path, check_ids):
    """The checkpoint to score, float32. An FP8 one is first loaded by transformers (which, on a CPU, dequantizes it
    to bfloat16 as it loads) and compared with our own bfloat16 dequantization on `check_ids`: the logits must be
    equal. It is then scored as our float32 dequantization: the FP8 values times their scales, unrounded."""
    import torch
    from transformers import AutoModelForCausalLM

    from ream_hf.io.dequantize import dequantize_checkpoint
    from ream_hf.io.quantization import quantization_config

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if quantization_config(config) is None:
        return tiny.load_model(folder)
    logits = []
    for checkpoint in (folder, dequantize_checkpoint(folder, dequantized_root / f"{folder.name}-bf16", "bfloat16")):
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits.append(model(input_ids=check_ids).logits)
    if not torch.equal(*logits):
        raise SystemExit(f"transformers' dequantization of {folder} differs from ours")
    return tiny.load_model(dequantize_checkpoint(folder, dequantized_root / f"{folder.name}-fp32", "float32"))


def compress(source: Path, output: Path, args, paths: dict, output_dtype: str | None) -> tuple[Path, float]:
    from ream_hf import ReamCompressor, ReamConfig

    num_experts = json.loads((source / "config.json").read_text())["num_experts"]
    config = ReamConfig(
        target_experts=round(num_experts * (1 - args.ratio)), method=args.method,
        calibration=[str(paths["calibration"][d]) for d in tiny.DOMAINS], calibration_ratios=[1 / 3] * 3,
        num_calibration_sequences=args.calibration_sequences, sequence_length=args.sequence_length, seed=42,
        batch_size=8, output_dtype=output_dtype,
    )
    started = time.perf_counter()
    compressor = ReamCompressor(config)
    compressor.compress(str(source), work_dir=output.parent / f".{output.name}.work")
    compressor.save_pretrained(output)
    return output, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model-dir", default=str(tiny.DEFAULT_OUTPUT), help="train_tiny_moe.py cache folder")
    parser.add_argument("--method", default="ream")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of experts removed")
    parser.add_argument("--calibration-sequences", type=int, default=192)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--heldout-sequences", type=int, default=24, help="per domain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", help="where to write (default: a new temporary folder)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from ream_hf.fixtures import folder_bytes

    torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = tiny.ensure_model(Path(args.model_dir))
    paths = tiny.paths(Path(args.model_dir))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ream-bench-fp8-"))
    source = bf16_copy(paths["model"], workdir / "source-bf16")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    heldout = {d: tiny.text_sequences(tokenizer, paths["heldout"][d], args.sequence_length, args.heldout_sequences)
               for d in tiny.DOMAINS}
    check_ids = heldout["code"][:2]
    folders, seconds = {"source (bf16)": source}, {}
    folders["bf16 output"], seconds["bf16 output"] = compress(source, workdir / "out-bf16", args, paths, None)
    folders["FP8 output"], seconds["FP8 output"] = compress(source, workdir / "out-fp8", args, paths, "fp8")
    folders["FP8 source (uncompressed)"] = fp8_copy(source, workdir / "source-fp8")
    models = {name: reload(folder, workdir / "dequantized", check_ids) for name, folder in folders.items()}
    against_source = quality.Scorer(models["source (bf16)"], heldout, 8)
    against_bf16 = quality.Scorer(models["bf16 output"], heldout, 8)
    bf16_bytes = folder_bytes(folders["bf16 output"])
    rows = []
    for name, model in models.items():
        scores = against_source.score(model)
        rows.append({"row": name, "bytes": folder_bytes(folders[name]), "kl_source": scores["mean_kl"],
                     "kl_bf16_output": against_bf16.score(model)["mean_kl"], "ppl": scores["ppl"],
                     "seconds": seconds.get(name)})
    experts = json.loads((folders["bf16 output"] / "config.json").read_text())["num_experts"]
    print(f"\nbench_fp8_output: tiny Qwen3-MoE ({summary['settings']['num_layers']} layers, "
          f"{summary['settings']['num_experts']} experts, trained {summary['settings']['steps']} steps), its bfloat16 "
          f"copy compressed with {args.method} to {experts} experts; calibration {args.calibration_sequences} x "
          f"{args.sequence_length} tokens (prose:code:math 1:1:1); held-out {args.heldout_sequences} x "
          f"{args.sequence_length} tokens per domain; {args.threads} thread(s); "
          f"wall {time.perf_counter() - wall:.0f}s, process CPU {time.process_time() - cpu:.0f}s\n")
    print("| | safetensors MB | / bf16 output | KL to source | KL to bf16 output | ppl prose | ppl code | ppl math "
          "| compress + save s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ppl = row["ppl"]
        print(f"| {row['row']} | {row['bytes'] / 1e6:.2f} | {row['bytes'] / bf16_bytes:.3f} | {row['kl_source']:.5f} "
              f"| {row['kl_bf16_output']:.5f} | {ppl['prose']:.2f} | {ppl['code']:.2f} | {ppl['math']:.2f} | "
              + (f"{row['seconds']:.0f}" if row["seconds"] is not None else "") + " |")


if __name__ == "__main__":
    main()
