import json
from pathlib import Path

import pytest

from ream_hf.demo import build_tiny_qwen3_moe, demo_corpus, write_demo_calibration


@pytest.fixture(autouse=True)
def isolated_work_dir(tmp_path_factory, monkeypatch):
    """Each test streams through its own work root: no unfinished run of one test is found by another."""
    monkeypatch.setenv("REAM_HF_WORK_DIR", str(tmp_path_factory.mktemp("work")))


@pytest.fixture(scope="session")
def qwen3_source(tmp_path_factory) -> Path:
    """A tiny random Qwen3-MoE (16 experts, top-4, 2 layers) with tokenizer; never modified by tests."""
    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3") / "source")


@pytest.fixture(scope="session")
def calibration_txt(tmp_path_factory) -> Path:
    return write_demo_calibration(tmp_path_factory.mktemp("cal") / "calibration.txt")


@pytest.fixture(scope="session")
def ragged_calibration(tmp_path_factory) -> Path:
    """Pre-tokenised rows of different lengths: batches carry padding that statistics must ignore."""
    path = tmp_path_factory.mktemp("cal") / "ragged.jsonl"
    rows = [{"input_ids": [(7 * i + 3 * j) % 500 + 3 for j in range(20 + 5 * (i % 4))]} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


__all__ = ["demo_corpus", "snapshot"]
