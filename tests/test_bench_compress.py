"""eval/bench_compress.py `--versus`: the job and its variant run alternately, and the overhead it prints is the
ratio of the fastest runs, of the medians and of the median CPU seconds."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

from bench_compress import overhead  # noqa: E402


def test_overhead_compares_fastest_and_median_runs():
    job = [{"wall_s": w, "cpu_s": c} for w, c in ((12.0, 20.0), (10.0, 18.0), (30.0, 22.0))]
    variant = [{"wall_s": w, "cpu_s": c} for w, c in ((8.0, 16.0), (9.0, 15.0), (11.0, 30.0), (20.0, 17.0))]
    ratios = overhead(job, variant)
    assert ratios["fastest wall"] == 10.0 / 8.0
    assert ratios["median wall"] == 12.0 / 10.0  # the variant's even count: the mean of its middle two
    assert ratios["median CPU"] == 20.0 / 16.5


def test_versus_runs_the_variant_alternately_and_prints_the_overhead(tmp_path):
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "eval" / "bench_compress.py"), "--layers", "1",
         "--experts", "8", "--target", "6", "--top-k", "2", "--hidden", "32", "--inner", "16", "--group-size", "2",
         "--sequences", "4", "--length", "32", "--repeat", "2", "--threads", "1", "--versus", "refit=none",
         "--workdir", str(tmp_path)],
        check=True, capture_output=True, text=True).stdout
    assert "| ream refit=none | 4 x 32 |" in out and "| ream | 4 x 32 |" in out
    assert "4 x 32 refit=none: statistics" in out and "refit " in out.split("4 x 32 refit=none")[0]
    line = next(text for text in out.splitlines() if text.startswith("the job over refit=none"))
    assert "2 alternating runs each" in line and "fastest wall" in line and "median CPU" in line
