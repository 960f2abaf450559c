"""eval/bench_gpu.py --peers in its --tiny CPU form: every tool on the same job, one process each; a tool that
cannot run here is reported as "not available: why", never with a number."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EVAL = Path(__file__).resolve().parent.parent / "eval"


@pytest.mark.slow
def test_peers_table_times_ream_hf_and_names_why_a_peer_is_missing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(EVAL.parent), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [sys.executable, str(EVAL / "bench_gpu.py"), "--tiny", "--peers", "--layers", "1", "--json", str(out),
         "--peer-list", "ream-hf:reap", "reference:ream", "llm-compressor:reap",
         "--reference-repo", str(tmp_path / "no-checkout")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["peer"]: row for row in json.loads(out.read_text())["peers"]}
    ours = rows["ream-hf:reap"]
    assert ours["layers"] == 1 and ours["seconds_per_layer"] > 0 and ours["peak_bytes"] > 2**20
    reference = rows["reference:ream"]
    assert "seconds_per_layer" not in reference and "SamsungSAILMontreal/ream" in reference["not_available"]
    assert "| reference:ream | not available: no checkout" in done.stdout
    assert "| ream-hf:reap | " in done.stdout and "| 1.00 x | 1.00 x |" in done.stdout
    llmc = rows["llm-compressor:reap"]
    if "not_available" in llmc:  # not installed in this environment: said so, with how to get it
        assert "llmcompressor" in llmc["not_available"] and f"| llm-compressor:reap | not available: " in done.stdout
    else:
        assert llmc["seconds_per_layer"] > 0
