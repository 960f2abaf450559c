"""Peak memory of streaming compression vs loading the whole model, as the number of layers grows.

Random Qwen3-MoE checkpoints of 4, 8 and 16 layers (hidden 512, 64 experts of intermediate 256, float32:
about 100 MB per layer) are compressed 64 -> 48 with REAP, each job in a fresh subprocess so its peak
RSS is its own. Streaming should stay flat as layers grow and far under the checkpoint size.

    python eval/bench_memory.py                      # 4, 8, 16 layers, streaming and in-memory
    python eval/bench_memory.py --layers 4 8 --modes streaming
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_compress import build_source, write_calibration

from ream_hf.fixtures import folder_bytes


def run_job(source: Path, calibration: Path, streaming: bool, method: str) -> dict:
    import torch

    from ream_hf import ReamCompressor, ReamConfig
    from ream_hf.pipeline.sequential import peak_rss_gb

    torch.set_num_threads(2)
    config = ReamConfig(target_experts=48, method=method, calibration=[str(calibration)], calibration_ratios=None,
                        num_calibration_sequences=32, sequence_length=256, streaming=streaming, dtype="float32")
    compressor = ReamCompressor(config)
    started = time.perf_counter()
    compressor.compress(str(source), work_dir=source.parent / f"work-{streaming}")
    compressor.save_pretrained(source.parent / f"out-{streaming}", overwrite=True)
    return {"wall_s": time.perf_counter() - started,
            "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--modes", nargs="+", default=["streaming", "in-memory"], choices=["streaming", "in-memory"])
    parser.add_argument("--method", default="reap")
    parser.add_argument("--job", nargs=3, help=argparse.SUPPRESS)  # internal: SOURCE CALIBRATION MODE
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)  # internal: FOLDER LAYERS
    args = parser.parse_args()
    if args.build:
        build_source(Path(args.build[0]), int(args.build[1]), 64, 8, 512, 256)
        return
    if args.job:
        source, calibration, mode = args.job
        print(json.dumps(run_job(Path(source), Path(calibration), mode == "streaming", args.method)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="ream-mem-") as temp:
        calibration = write_calibration(Path(temp) / "cal.jsonl", 32, 256, 512)
        for layers in args.layers:
            source = Path(temp) / f"l{layers}" / "source"
            # built in a child: the parent stays small, so no job inherits a large address space
            subprocess.run([sys.executable, __file__, "--build", str(source), str(layers)], check=True, capture_output=True)
            size = folder_bytes(source) / 2**30
            for mode in args.modes:
                command = [sys.executable, __file__, "--method", args.method, "--job", str(source), str(calibration), mode]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                rows.append({"layers": layers, "mode": mode, "checkpoint_gb": size, **json.loads(out.strip().splitlines()[-1])})
    print("\nbench_memory: random Qwen3-MoE, hidden 512, 64 experts x intermediate 256, float32, 64 -> 48 "
          f"({args.method}), 32 x 256 calibration tokens\n")
    print("| layers | checkpoint GB | mode | peak RSS GB | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['checkpoint_gb']:.2f} | {r['mode']} | {r['peak_rss_gb']:.2f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
