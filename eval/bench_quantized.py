"""FP8 block-wise sources: does compressing the FP8 checkpoint give what compressing its dequantized twin gives?

A tiny random Qwen3-MoE (hidden 160, expert intermediate 96: partial 128x128 blocks everywhere) is converted to the
FP8 block format DeepSeek-V3 / Qwen3-*-FP8 publish (`ream_hf.fixtures.fp8_block_checkpoint`); its dequantized twin
(`dequantize_checkpoint`, bfloat16) holds exactly the FP8 checkpoint's real values and is the reference. Each method
compresses the twin, the FP8 source written as FP8 (the default) and the FP8 source with --output-dtype bfloat16;
every output (an FP8 one dequantized first) is scored by the mean next-token KL(reference || output) on held-out
text. The tests (tests/test_quantized.py) run this at a smaller calibration size and assert on it. The refit is off
by default here (`--refit none`): it gives every kept expert a new down projection, which an FP8 output quantizes
afresh, so kept experts would no longer be the source's bytes; `--refit down` measures the library's default.

    python eval/bench_quantized.py [--methods reap ream] [--sequences 32] [--workdir DIR] [--refit none|down]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.fixtures import build_tiny_qwen3_moe, demo_corpus, fp8_block_checkpoint, write_demo_calibration
from ream_hf.io.dequantize import dequantize_checkpoint
from ream_hf.io.quantization import quantization_config

MODES = ("twin", "fp8", "fp8->bfloat16")  # source (and output dtype) of each compression


def build_sources(workdir: Path, seed: int = 0) -> tuple[Path, Path]:
    """(FP8 checkpoint, its dequantized bfloat16 twin)."""
    plain = build_tiny_qwen3_moe(workdir / "plain", seed=seed, hidden_size=160, moe_intermediate_size=96,
                                 num_experts=16, num_layers=2)
    fp8 = fp8_block_checkpoint(plain, workdir / "fp8")
    return fp8, dequantize_checkpoint(fp8, workdir / "twin", "bfloat16")


def compress(source: Path, calibration: Path, output: Path, method: str, *, target: int = 8, sequences: int = 32,
             length: int = 64, output_dtype: str | None = None, refit: str = "none") -> Path:
    config = ReamConfig(target_experts=target, method=method, calibration=[str(calibration)], calibration_ratios=None,
                        num_calibration_sequences=sequences, sequence_length=length, batch_size=8, group_size=4,
                        output_dtype=output_dtype, refit=refit)
    compressor = ReamCompressor(config)
    compressor.compress(str(source), work_dir=output.parent / f".{output.name}.work")
    return compressor.save_pretrained(output)


class KLScorer:
    """The reference checkpoint's next-token log-probabilities on held-out text, computed once."""

    def __init__(self, reference: Path, rows: int = 16, length: int = 64) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(reference))
        ids = tokenizer("\n".join(demo_corpus(400, seed=7)), return_tensors="pt")["input_ids"][0]
        self.ids = ids[: rows * length].view(rows, length)
        self.reference = self._log_probs(reference)

    def _log_probs(self, folder: Path) -> torch.Tensor:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=self.ids).logits.float(), dim=-1)

    def score(self, folder: Path) -> float:
        """Mean KL(reference || folder) per position; a quantized folder is dequantized (bfloat16) first."""
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if quantization_config(config) is not None:
            dequantized = folder.parent / f"{folder.name}-dequantized"
            if not dequantized.exists():
                dequantize_checkpoint(folder, dequantized, "bfloat16")
            folder = dequantized
        log_probs = self._log_probs(folder)
        return float((self.reference.exp() * (self.reference - log_probs)).sum(-1).mean())


def run(workdir: Path, methods: tuple[str, ...] = ("reap", "ream"), sequences: int = 32, length: int = 64,
        refit: str = "none") -> list[dict]:
    """One row per method: the output folder and KL of each mode."""
    workdir = Path(workdir)
    fp8, twin = build_sources(workdir)
    calibration = write_demo_calibration(workdir / "calibration.txt")
    scorer = KLScorer(twin)
    rows = []
    for method in methods:
        row = {"method": method, "fp8_source": fp8, "twin_source": twin, "folders": {}, "kl": {}}
        for mode in MODES:
            source = twin if mode == "twin" else fp8
            output_dtype = mode.split("->")[1] if "->" in mode else None
            folder = compress(source, calibration, workdir / f"{method}-{mode.replace('->', '-')}", method,
                              sequences=sequences, length=length, output_dtype=output_dtype, refit=refit)
            row["folders"][mode], row["kl"][mode] = folder, scorer.score(folder)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["reap", "ream"])
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    parser.add_argument("--length", type=int, default=64, help="calibration sequence length")
    parser.add_argument("--workdir", help="where to build (default: a new temporary folder)")
    parser.add_argument("--refit", default="none", help="ReamConfig.refit (default none: the kept experts' bytes)")
    args = parser.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ream-bench-quantized-"))
    rows = run(workdir, tuple(args.methods), args.sequences, args.length, args.refit)
    print("\n| method 16 -> 8 | KL: twin (bf16) source | FP8 source, FP8 output | FP8 source, --output-dtype bfloat16 "
          "| FP8 output / twin |")
    print("|---|---|---|---|---|")
    for row in rows:
        kl = row["kl"]
        print(f"| {row['method']} | " + " | ".join(f"{kl[mode]:.6f}" for mode in MODES) +
              f" | {kl['fp8'] / kl['twin']:.5f} |")


if __name__ == "__main__":
    main()
