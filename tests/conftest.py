import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ream_hf.fixtures import build_tiny_qwen3_moe, write_demo_calibration

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: they run only when `-m` names them (`pytest -m gpu`), and are deselected
    otherwise (CI, `./scripts/test.sh`, `-m "not vllm"`)."""
    if "gpu" in (config.getoption("markexpr") or "").replace("not gpu", ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(autouse=True)
def isolated_work_dir(tmp_path_factory, monkeypatch):
    """Each test streams through its own work root: no unfinished run of one test is found by another."""
    monkeypatch.setenv("REAM_HF_WORK_DIR", str(tmp_path_factory.mktemp("work")))


def _refuse(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} before the input was checked")
    return fail


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fails the test if any weight tensor is read. Every tensor read of ream-hf goes through
    `ream_hf.io.safetensors.open_shard`; every load of transformers (the in-memory path, and
    `from_pretrained(..., quantization_config=ReamConfig(...))`, whose refusals come before it) through
    `PreTrainedModel._load_pretrained_model`."""
    from transformers import PreTrainedModel

    import ream_hf.io.safetensors as st

    monkeypatch.setattr(st, "open_shard", _refuse("a weight tensor was read"))
    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", staticmethod(_refuse("model weights were loaded")))


@pytest.fixture
def no_work_started(no_weight_reads, monkeypatch):
    """Fails the test if any weight tensor or calibration text is read: refusals must come before any work."""
    import ream_hf.pipeline.calibration as calibration

    monkeypatch.setattr(calibration, "_source_sequences", _refuse("calibration data was read"))


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



def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, all shards."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


EXPERT_WEIGHT = re.compile(r"(.+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def expert_abs_sums(folder: Path) -> dict[tuple[str, int], tuple[float, float]]:
    """(layer key, expert) -> (sum|gate_proj|+sum|up_proj|, sum|down_proj|) of the per-expert tensors on disk,
    the numbers vLLM's probes report per loaded expert (w13, w2)."""
    sums: dict[tuple[str, int], list[float]] = {}
    for name, tensor in tensors(folder).items():
        if match := EXPERT_WEIGHT.match(name):
            sums.setdefault((match[1], int(match[2])), [0.0, 0.0])[match[3] == "down_proj"] += \
                float(tensor.abs().double().sum())
    return {key: (w13, w2) for key, (w13, w2) in sums.items()}


def run_vllm_script(script: str, folder: Path, prompts: list[list[int]], max_tokens: int, workdir: Path, *,
                    name: str = "vllm_out", dtype: str = "float32", extra: dict | None = None) -> dict:
    """Run tests/`script` (vllm_generate.py, vllm_mtp_probe.py) on `folder` in a subprocess; its JSON result."""
    prompts_json, out_json = workdir / "prompts.json", workdir / f"{name}.json"
    prompts_json.write_text(json.dumps(prompts))
    command = [sys.executable, str(TESTS / script), str(folder), str(prompts_json), str(out_json), "--dtype", dtype,
               "--max-tokens", str(max_tokens)]
    if extra:
        command += ["--extra", json.dumps(extra)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{script} failed ({run.returncode}):\n{run.stderr[-4000:]}"
    return json.loads(out_json.read_text())
