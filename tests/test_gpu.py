"""The whole pipeline on CUDA (marker `gpu`: run with `pytest -m gpu` on a machine with a GPU; deselected
everywhere else, see tests/conftest.py): streaming with the next layer's weights read ahead, bfloat16 statistics
GEMMs, the grouped_mm re-forward, hidden states held on the GPU or spilled to files and fed back through pinned
memory, a run interrupted and resumed. eval/gpu_check.sh runs it; without pytest, `python tests/test_gpu.py` runs
the same checks."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.pipeline import hidden_states, work_folder
from ream_hf.pipeline.device import Placement

try:
    import pytest
except ImportError:  # a bare GPU machine: the checks below still run as a script
    pytest = None


class Interrupted(Exception):
    pass


@contextlib.contextmanager
def stop_after_first_commit():
    """The run dies right after layer 0 is recorded as finished (in the writer thread; compress() raises)."""
    commit = work_folder.WorkFolder.commit

    def commit_then_stop(self, finished_layers, parts, entries):
        commit(self, finished_layers, parts, entries)
        if finished_layers == 1:
            raise Interrupted

    work_folder.WorkFolder.commit = commit_then_stop
    try:
        yield
    finally:
        work_folder.WorkFolder.commit = commit


def build_bf16_source(folder: Path) -> Path:
    from ream_hf.fixtures import build_tiny_qwen3_moe

    return build_tiny_qwen3_moe(folder, num_layers=3, dtype=torch.bfloat16)


def gpu_config(calibration: Path, **overrides) -> ReamConfig:
    return ReamConfig(**{**dict(target_experts=8, method="ream", group_size=4, calibration=[str(calibration)],
                                calibration_ratios=None, num_calibration_sequences=16, sequence_length=64,
                                batch_size=4, device="cuda"), **overrides})


def interrupted_then_resumed(source: Path, run: ReamConfig, work: Path, output: Path) -> ReamCompressor:
    with stop_after_first_commit():
        try:
            ReamCompressor(run).compress(str(source), work_dir=work)
        except Interrupted:
            pass
        else:
            raise AssertionError("the run was not interrupted")
    resumed = ReamCompressor(run)
    resumed.compress(str(source), work_dir=work, resume=True)
    resumed.save_pretrained(output)
    return resumed


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def groups(folder: Path) -> list:
    manifest = json.loads((folder / "ream_manifest.json").read_text())
    return [[g["members"] for g in layer["groups"]] for layer in manifest["layers"]]


def check_cuda_pipeline(source: Path, calibration: Path, workdir: Path) -> None:
    plain = ReamCompressor(gpu_config(calibration))
    plain.compress(str(source), work_dir=workdir / "w0")
    plain.save_pretrained(workdir / "plain")
    report = plain.result.layers[0]
    print("GEMMs:", report.gemm)
    print("seconds per layer:", [{k: round(v, 3) for k, v in r.timings.items()} for r in plain.result.layers])
    # bf16 operands on tensor cores (float32 results where torch >= 2.8 offers them); never float32 GEMMs
    assert report.gemm["gate_up"].startswith("bfloat16 x bfloat16 -> "), report.gemm
    assert report.gemm["saliency_down"].startswith("bfloat16 grouped_mm"), f"grouped GEMMs did not run: {report.gemm}"
    assert plain.model.config._experts_implementation == "grouped_mm", "the re-forward is not on grouped_mm"

    interrupted_then_resumed(source, gpu_config(calibration, hidden_states_budget_gb=0.0), workdir / "w1",
                             workdir / "spilled")
    interrupted_then_resumed(source, gpu_config(calibration), workdir / "w2", workdir / "resumed")
    expected = tensors(workdir / "plain")
    for other in ("spilled", "resumed"):
        assert groups(workdir / other) == groups(workdir / "plain"), other
        got = tensors(workdir / other)
        assert got.keys() == expected.keys()
        worst = max(float((got[k].float() - expected[k].float()).abs().max()) for k in expected)
        print(f"{other}: largest difference from the uninterrupted in-memory run {worst:.3g}")
        assert worst <= 1e-2, other  # bit-equal where the kernels are deterministic; bf16 rounding at most

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(workdir / "plain"), dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        logits = model(torch.arange(3, 35, device="cuda")[None]).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def check_feed(workdir: Path) -> None:
    """Batches still being written (futures) and host tensors reach the GPU, in order, through the feed."""
    placement = Placement.of("cuda")
    store = hidden_states.HiddenStateStore(workdir, in_memory=False)
    host = [torch.randn(4, 8, 16) for _ in range(5)]
    items = [store.write(1, b, t.cuda()) for b, t in enumerate(host[:3])] + host[3:]
    fed = list(placement.feed(items))
    assert all(t.device == placement.device for t in fed)
    assert all(torch.equal(t.cpu(), h) for t, h in zip(fed, host))
    store.flush()


if pytest is not None:
    pytestmark = pytest.mark.gpu

    @pytest.fixture(scope="module")
    def bf16_source(tmp_path_factory):
        return build_bf16_source(tmp_path_factory.mktemp("gpu") / "source")

    def test_cuda_pipeline_spilled_and_resumed(bf16_source, calibration_txt, tmp_path):
        check_cuda_pipeline(bf16_source, calibration_txt, tmp_path)

    def test_feed_moves_host_and_pending_batches_to_the_gpu(tmp_path):
        check_feed(tmp_path)


if __name__ == "__main__":
    from ream_hf.fixtures import write_demo_calibration

    with tempfile.TemporaryDirectory(prefix="ream-gpu-smoke-") as temp:
        root = Path(temp)
        check_feed(root / "feed")
        check_cuda_pipeline(build_bf16_source(root / "source"), write_demo_calibration(root / "calibration.txt"), root)
    print("GPU smoke test passed")
