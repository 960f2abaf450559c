"""Where the INT4 chain's KL comes from: REAM, then llm-compressor's W4A16 (examples/llmcompressor_w4a16.py).

On the tiny Qwen3-MoE of tests/test_llmcompressor_example.py (hidden 128, expert intermediate 64, 16 experts top-4,
2 layers; random, or with `--trained` first trained on demo text as `ream-hf demo`'s model is), REAM 16 -> 8 at the
test's calibration size, then the example with the test's settings on both the source and the REAM output. Each
checkpoint is scored by the mean next-token KL(source || checkpoint) on held-out text (eval/bench_quantized.py's
scorer, float32), the INT4 ones twice: dequantized by compressed-tensors then run in float32, and reloaded by
transformers' own compressed-tensors support (which loads them in bfloat16).

The example runs in `.venv-llmcompressor` (scripts/test.sh builds it; or the python in REAM_LLMCOMPRESSOR_PYTHON).

    python eval/bench_int4_chain.py [--trained] [--group-size 32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from eval.bench_quantized import KLScorer, load_model
from ream_hf import ReamCompressor, ReamConfig
from ream_hf.fixtures import build_tiny_qwen3_moe, train_on_demo_corpus, write_demo_calibration

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "llmcompressor_w4a16.py"


def int4(folder: Path, calibration: Path, group_size: int) -> Path:
    """The example's W4A16 checkpoint of `folder`, with tests/test_llmcompressor_example.py's settings."""
    python = os.environ.get("REAM_LLMCOMPRESSOR_PYTHON") or str(REPO / ".venv-llmcompressor" / "bin" / "python")
    output = folder.parent / f"{folder.name}-w4a16-g{group_size}"
    run = subprocess.run([python, str(EXAMPLE), str(folder), str(output), "--calibration", str(calibration),
                          "--num-samples", "8", "--sequence-length", "64", "--group-size", str(group_size)],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return output


def reloaded_kl(scorer: KLScorer, folder: Path) -> float:
    """KL(reference || folder) with the folder loaded by transformers as it is (INT4 decompressed on load)."""
    with torch.no_grad():
        log_probs = torch.log_softmax(load_model(folder)(input_ids=scorer.ids).logits.float(), dim=-1)
    return float((scorer.reference.exp() * (scorer.reference - log_probs)).sum(-1).mean())


def run(workdir: Path, trained: bool = False, group_size: int = 32) -> dict[str, float]:
    source = build_tiny_qwen3_moe(workdir / "source")
    if trained:
        train_on_demo_corpus(source)
    calibration = write_demo_calibration(workdir / "calibration.txt")
    config = ReamConfig(target_experts=8, method="ream", calibration=[str(calibration)], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=48, batch_size=4, group_size=4)
    compressor = ReamCompressor(config)
    compressor.compress(str(source))
    ream = compressor.save_pretrained(workdir / "ream")
    int4_source, int4_ream = int4(source, calibration, group_size), int4(ream, calibration, group_size)
    scorer = KLScorer(source)
    return {
        "source -> REAM output": scorer.score(ream),
        "source -> INT4(source)": scorer.score(int4_source),
        "source -> INT4(REAM)": scorer.score(int4_ream),
        "source -> INT4(REAM), transformers reload": reloaded_kl(scorer, int4_ream),
        "REAM -> INT4(REAM)": KLScorer(ream).score(int4_ream),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", action="store_true", help="train the tiny model on demo text first")
    parser.add_argument("--group-size", type=int, default=32, help="W4A16 group size (the test's: 32)")
    parser.add_argument("--workdir", help="where to build (default: a new temporary folder)")
    args = parser.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ream-bench-int4-"))
    rows = run(workdir, args.trained, args.group_size)
    print(f"\n| {'trained' if args.trained else 'random'} model, group {args.group_size} | KL |\n|---|---|")
    for name, kl in rows.items():
        print(f"| {name} | {kl:.4f} |")


if __name__ == "__main__":
    main()
