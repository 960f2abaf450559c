"""`ream-hf plan`'s peak RAM against a measured run: a small streaming job in a fresh process whose resident memory
a sampler thread reads (eval/bench_plan.py), within 30 % of the plan's figure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EVAL = Path(__file__).resolve().parent.parent / "eval"
sys.path.insert(0, str(EVAL))


@pytest.mark.slow
def test_plan_peak_ram_is_within_30_percent_of_a_measured_run(tmp_path):
    import bench_plan
    from bench_compress import write_calibration

    from ream_hf.pipeline.job_plan import plan_job

    args = bench_plan.parser().parse_args(["--layers", "2", "--experts", "32", "--top-k", "4", "--hidden", "512",
                                           "--inner", "256", "--target", "24", "--sequences", "8", "--length", "32",
                                           "--workdir", str(tmp_path)])
    source = bench_plan.build_source(tmp_path / "source", args.layers, args.experts, args.top_k, args.hidden, args.inner)
    calibration = write_calibration(tmp_path / "calibration.jsonl", args.sequences, args.length, 512)
    plan = plan_job(source, bench_plan.job_config(args, calibration), threads=1)
    env = {**os.environ, "PYTHONPATH": str(EVAL.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EVAL / "bench_plan.py"), *bench_plan.job_arguments(args),
                           "--workdir", str(tmp_path), "--job"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    measured = max(peak["VmRSS"] for peak in run["peaks"].values())
    assert (tmp_path / "output" / "config.json").is_file()  # the job ran to its verified output
    assert abs(plan.ram_bytes_needed - measured) <= 0.3 * measured, (plan.ram_parts, run["peaks"])
