"""Quantized sources: does compressing the quantized checkpoint give what compressing its dequantized twin gives?

Two published layouts, each on a tiny random model:
- `fp8`: a Qwen3-MoE (hidden 160, expert intermediate 96: partial 128x128 blocks everywhere) in the FP8 block format
  DeepSeek-V3 / Qwen3-*-FP8 publish (`ream_hf.fixtures.fp8_block_checkpoint`); its twin is our `dequantize_checkpoint`
  (bfloat16), which holds exactly the FP8 checkpoint's real values.
- `kimi-int4`: a Kimi-K2.5 / K2.6 (`kimi_k25`: DeepSeek-V3 text model, hidden 128, expert intermediate 64, under a
  MoonViT vision tower) in the compressed-tensors W4A16 format Moonshot publishes (pack-quantized INT4, symmetric,
  group 32, routed experts only, `text_config.quantization_config`), quantized by compressed-tensors' own
  model-free converter (`ream_hf.fixtures.compressed_tensors_checkpoint`); its twin is compressed-tensors' own
  dequantization (`CompressedTensorsDequantizer`, bfloat16).

Each method compresses the twin, the quantized source written back in its format (the default) and the quantized
source with --output-dtype bfloat16; every output is scored by the mean next-token KL(twin || output) on held-out
text, in float32. A quantized output is dequantized (bfloat16) first, as its twin was: an FP8 one by
`dequantize_checkpoint`, a compressed-tensors one by compressed-tensors itself (transformers' compressed-tensors
support loads it too, but in bfloat16 whatever dtype is asked for, which would score the dtype, not the
compression). The tests (tests/test_quantized.py, tests/test_compressed_tensors.py) run this at a smaller
calibration size and assert on it. The refit is off by default here (`--refit none`): it gives every kept expert a new
down projection, which a quantized output quantizes afresh, so kept experts' down projections would no longer be the source's bytes;
`--refit down` measures the library's default.

    python eval/bench_quantized.py [--source fp8|kimi-int4] [--methods reap ream] [--sequences 32] [--workdir DIR]
                                   [--refit none|down]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.fixtures import (build_tiny_kimi_k25, build_tiny_qwen3_moe, compressed_tensors_checkpoint,
                              compressed_tensors_twin, demo_corpus, fp8_block_checkpoint, kimi_int4_scheme,
                              write_demo_calibration)
from ream_hf.io.dequantize import dequantize_checkpoint
from ream_hf.io.quantization import quantization_config

MODES = ("twin", "quantized", "quantized->bfloat16")  # source (and output dtype) of each compression
SOURCES = ("fp8", "kimi-int4")


def build_sources(workdir: Path, source: str = "fp8", seed: int = 0) -> tuple[Path, Path]:
    """(quantized checkpoint, its dequantized bfloat16 twin)."""
    if source == "fp8":
        plain = build_tiny_qwen3_moe(workdir / "plain", seed=seed, hidden_size=160, moe_intermediate_size=96,
                                     num_experts=16, num_layers=2)
        quantized = fp8_block_checkpoint(plain, workdir / "fp8")
        return quantized, dequantize_checkpoint(quantized, workdir / "twin", "bfloat16")
    if source == "kimi-int4":
        plain = build_tiny_kimi_k25(workdir / "plain", seed=seed, dtype=torch.bfloat16)
        quantized = compressed_tensors_checkpoint(plain, workdir / "int4", kimi_int4_scheme(), in_text_config=True)
        return quantized, compressed_tensors_twin(quantized, workdir / "twin")
    raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")


def compress(source: Path, calibration: Path, output: Path, method: str, *, target: int = 8, sequences: int = 32,
             length: int = 64, output_dtype: str | None = None, refit: str = "none", **settings) -> Path:
    """`method` may carry ReamConfig overrides after a colon, e.g. "ream:merge=neurons"; `settings` are more."""
    method, _, overrides = method.partition(":")
    settings.update(item.split("=", 1) for item in overrides.split(",") if item)
    config = ReamConfig(target_experts=target, method=method, calibration=[str(calibration)], calibration_ratios=None,
                        num_calibration_sequences=sequences, sequence_length=length, batch_size=8, group_size=4,
                        output_dtype=output_dtype, refit=refit, **settings)
    compressor = ReamCompressor(config)
    compressor.compress(str(source), work_dir=output.parent / f".{output.name}.work")
    return compressor.save_pretrained(output)


def load_model(folder: Path, dtype: torch.dtype = torch.float32):
    """The folder's model as transformers loads it (a vision-language checkpoint through its image-text class)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    auto = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
    return auto.from_pretrained(str(folder), dtype=dtype).eval()


class KLScorer:
    """The reference checkpoint's next-token log-probabilities on held-out text, computed once."""

    def __init__(self, reference: Path, rows: int = 16, length: int = 64) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(reference))
        ids = tokenizer("\n".join(demo_corpus(400, seed=7)), return_tensors="pt")["input_ids"][0]
        self.ids = ids[: rows * length].view(rows, length)
        self.reference = self._log_probs(reference)

    def _log_probs(self, folder: Path) -> torch.Tensor:
        model = load_model(folder)
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=self.ids).logits.float(), dim=-1)

    def score(self, folder: Path) -> float:
        """Mean KL(reference || folder) per position; a quantized folder is dequantized (bfloat16) first."""
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        found = quantization_config(config)
        if found is not None:
            dequantized = folder.parent / f"{folder.name}-dequantized"
            if not dequantized.exists():
                if found.get("quant_method") == "compressed-tensors":
                    compressed_tensors_twin(folder, dequantized)
                else:
                    dequantize_checkpoint(folder, dequantized, "bfloat16")
            folder = dequantized
        log_probs = self._log_probs(folder)
        return float((self.reference.exp() * (self.reference - log_probs)).sum(-1).mean())


def run(workdir: Path, methods: tuple[str, ...] = ("reap", "ream"), sequences: int = 32, length: int = 64,
        refit: str = "none", source: str = "fp8", **settings) -> list[dict]:
    """One row per method (a method may carry overrides, see `compress`): the output folder and KL of each mode;
    `settings` are ReamConfig fields for every compression."""
    workdir = Path(workdir)
    quantized, twin = build_sources(workdir, source)
    calibration = write_demo_calibration(workdir / "calibration.txt")
    scorer = KLScorer(twin)
    rows = []
    for method in methods:
        row = {"method": method, "quantized_source": quantized, "twin_source": twin, "folders": {}, "kl": {}}
        for mode in MODES:
            output_dtype = mode.split("->")[1] if "->" in mode else None
            folder = compress(twin if mode == "twin" else quantized, calibration,
                              workdir / f"{method}-{mode.replace('->', '-')}", method, sequences=sequences,
                              length=length, output_dtype=output_dtype, refit=refit, **settings)
            row["folders"][mode], row["kl"][mode] = folder, scorer.score(folder)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="fp8", choices=SOURCES)
    parser.add_argument("--methods", nargs="+", default=["reap", "ream"])
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    parser.add_argument("--length", type=int, default=64, help="calibration sequence length")
    parser.add_argument("--workdir", help="where to build (default: a new temporary folder)")
    parser.add_argument("--refit", default="none", help="ReamConfig.refit (default none: the kept experts' bytes)")
    args = parser.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ream-bench-quantized-"))
    rows = run(workdir, tuple(args.methods), args.sequences, args.length, args.refit, args.source)
    name = {"fp8": "FP8", "kimi-int4": "INT4"}[args.source]
    print(f"\n| {args.source}: method 16 -> 8 | KL: twin (bf16) source | {name} source, {name} output | {name} source, "
          f"--output-dtype bfloat16 | {name} output / twin |")
    print("|---|---|---|---|---|")
    for row in rows:
        kl = row["kl"]
        print(f"| {row['method']} | " + " | ".join(f"{kl[mode]:.6f}" for mode in MODES) +
              f" | {kl['quantized'] / kl['twin']:.5f} |")


if __name__ == "__main__":
    main()
