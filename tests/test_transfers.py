"""Every way hidden states and weights reach a layer, on the CPU: spilled to files (budget 0), read back after an
interruption (resume), written in the background, the next layer's weights read ahead. Each gives the bytes of
the in-memory run, in every method, sequential or not."""

import contextlib

import pytest
import torch

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.pipeline import loading, work_folder
from ream_hf.pipeline.device import Placement
from ream_hf.pipeline.background_writer import BackgroundWriter
from ream_hf.pipeline.hidden_states import HiddenStateStore
from tests.conftest import snapshot
from tests.test_streaming import same_output

MODES = [(method, sequential) for method in ("ream", "hc_smoe", "m_smoe", "reap", "frequency")
         for sequential in (True, False)]


class Interrupted(Exception):
    pass


def config(calibration, method, sequential, **overrides):
    kwargs = dict(target_experts=8, method=method, group_size=4, sequential=sequential, calibration=[str(calibration)],
                  calibration_ratios=None, num_calibration_sequences=8, sequence_length=32, batch_size=2,
                  activation_sample_tokens=64)
    return ReamConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize("method, sequential", MODES)
def test_spilled_and_resumed_equals_in_memory(method, sequential, qwen3_source, calibration_txt, tmp_path, monkeypatch):
    """Budget 0: every generation of hidden states lives in files written in the background; the run is stopped
    right after layer 0 is committed and resumed from the files; the output is the in-memory run's, byte for byte."""
    in_memory = ReamCompressor(config(calibration_txt, method, sequential, streaming=False))
    in_memory.compress(str(qwen3_source))
    in_memory.save_pretrained(tmp_path / "memory")

    commit = work_folder.WorkFolder.commit

    def commit_then_stop(self, finished_layers, parts, entries):
        commit(self, finished_layers, parts, entries)
        if finished_layers == 1:
            raise Interrupted  # in the writer thread: everything queued after it is skipped, compress() raises

    monkeypatch.setattr(work_folder.WorkFolder, "commit", commit_then_stop)
    spilled = config(calibration_txt, method, sequential, hidden_states_budget_gb=0.0)
    with pytest.raises(Interrupted):
        ReamCompressor(spilled).compress(str(qwen3_source), work_dir=tmp_path / "work")
    assert (tmp_path / "work" / "hidden-00001").is_dir()  # the next layer's inputs, spilled
    monkeypatch.setattr(work_folder.WorkFolder, "commit", commit)
    resumed = ReamCompressor(spilled)
    resumed.compress(str(qwen3_source), work_dir=tmp_path / "work", resume=True)
    resumed.save_pretrained(tmp_path / "resumed")
    assert same_output(tmp_path / "memory", tmp_path / "resumed")


def test_weights_read_ahead_give_the_same_output(qwen3_source, calibration_txt, tmp_path, monkeypatch):
    """The GPU's weight prefetch (a background read of the next layer, taken by `fill`), forced on the CPU."""
    run = config(calibration_txt, "ream", True)
    plain = ReamCompressor(run)
    plain.compress(str(qwen3_source))
    plain.save_pretrained(tmp_path / "plain")
    claimed = []
    claim = loading.LayerLoader._claim
    monkeypatch.setattr(Placement, "prefetch_weights", property(lambda self: True))
    monkeypatch.setattr(loading.LayerLoader, "_claim", lambda self, prefix: claimed.append(prefix) or claim(self, prefix))
    ahead = ReamCompressor(run)
    ahead.compress(str(qwen3_source))
    ahead.save_pretrained(tmp_path / "ahead")
    assert snapshot(tmp_path / "plain") == snapshot(tmp_path / "ahead")
    assert "model.layers.1." in claimed


def test_background_writer_commits_after_the_writes_and_never_after_a_failure(tmp_path):
    import threading
    import time

    writer = BackgroundWriter(max_pending_bytes=1, workers=3)
    done, release = [], threading.Event()

    def slow():
        release.wait(5)
        done.append("slow write")

    writer.submit(slow)
    writer.submit(lambda: done.append("quick write"))
    commit = writer.submit(lambda: done.append("commit"), after_all=True)
    time.sleep(0.2)
    assert done == ["quick write"] and not commit.done(), "the commit waits for every write before it"
    release.set()
    writer.flush()
    assert done == ["quick write", "slow write", "commit"]

    def fail():
        raise OSError("disk full")

    writer.submit(fail)
    later = writer.submit(lambda: done.append("commit 2"), after_all=True)
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    with pytest.raises(OSError, match="disk full"):
        later.result()
    assert done[-1] == "commit", "no commit after a failed write"
    writer.close()


def test_spilled_batches_are_futures_until_written_then_memory_mapped(tmp_path):
    store = HiddenStateStore(tmp_path, in_memory=False)
    tensors = [torch.randn(2, 3, 4) for _ in range(3)]
    handles = [store.write(1, 10 + b, t) for b, t in enumerate(tensors)]
    fed = list(Placement.of("cpu").feed(handles))
    assert all(torch.equal(a, b) for a, b in zip(fed, tensors))
    store.flush()
    assert sorted(p.name for p in (tmp_path / "hidden-00001").iterdir()) == ["000010.pt", "000011.pt", "000012.pt"]
    back = store.read_batches(1, [11, 12], torch.device("cpu"))
    assert torch.equal(back[0], tensors[1]) and torch.equal(back[1], tensors[2])
    kept = HiddenStateStore(tmp_path, in_memory=True)
    assert kept.write(2, 0, tensors[0]) is tensors[0]  # held in memory: the same tensor, written in the background
    kept.flush()
    assert torch.equal(kept.read(2, 0), tensors[0])


def test_the_gpu_code_paths_run_on_the_cpu(calibration_txt, tmp_path, monkeypatch):
    """What a GPU runs, forced on the CPU where torch has it: bfloat16 statistics GEMMs (bf16 results: float32
    results need CUDA), saliency's grouped bf16 down projection, transformers' grouped_mm re-forward. The plan
    matches the float32 run's on this model, saliency within bfloat16 rounding."""
    import json

    from ream_hf.fixtures import build_tiny_qwen3_moe
    from ream_hf.method.stats import GemmPolicy
    from ream_hf.pipeline import layer

    source = build_tiny_qwen3_moe(tmp_path / "source", num_layers=3, dtype=torch.bfloat16)
    run = config(calibration_txt, "ream", True)
    exact = ReamCompressor(run)
    exact.compress(str(source))
    exact.save_pretrained(tmp_path / "exact")
    monkeypatch.setattr(Placement, "gemm", lambda self, dtype: GemmPolicy(dtype, dtype, grouped=True))
    monkeypatch.setattr(Placement, "experts_implementation", lambda self, dtype: "grouped_mm")
    monkeypatch.setattr(layer, "routed_experts", lambda family, module, device: contextlib.nullcontext())
    gpu_like = ReamCompressor(run)
    gpu_like.compress(str(source))
    gpu_like.save_pretrained(tmp_path / "gpu-like")
    assert gpu_like.model.config._experts_implementation == "grouped_mm"
    assert gpu_like.result.layers[0].gemm["saliency_down"] == "bfloat16 grouped_mm -> bfloat16"
    manifests = [json.loads((tmp_path / name / "ream_manifest.json").read_text())["layers"] for name in ("exact", "gpu-like")]
    for a, b in zip(*manifests):
        assert [g["members"] for g in a["groups"]] == [g["members"] for g in b["groups"]]
        # the default saliency p^2 ||f|| doubles p's relative rounding (the later layers' inputs differ in bf16), and an
        # expert with few routed tokens gains or loses a near-tie token between the two paths (seen: 0.080 vs 0.088
        # on one CPU, while the layer's largest is 0.48): bounded against the layer's scale, not each expert's own
        exact_saliency, gpu_saliency = torch.tensor(a["saliency"]), torch.tensor(b["saliency"])
        assert torch.allclose(exact_saliency, gpu_saliency, rtol=4e-2, atol=0.03 * float(exact_saliency.max()))
