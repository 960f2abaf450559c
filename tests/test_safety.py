"""Data safety beyond the bad-input table: a failed write (full disk, quota, permission) ends in one line and the
same command with --resume finishes byte-identically; locks name their holder and outlive no dead run; leftovers of
an interrupted --overwrite are recovered; non-finite weights are caught as they are loaded."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ream_hf.cli import main
from ream_hf.io import folders
from ream_hf.pipeline import background_writer, hidden_states, loading, work_folder
from tests.conftest import snapshot


def cli_args(source, calibration, output, *extra):
    return ["compress", str(source), "--target-experts", "8", "--method", "ream", "--group-size", "4", "--calibration",
            str(calibration), "--num-sequences", "8", "--sequence-length", "32", "--batch-size", "4",
            "--max-shard-size", "200000", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def reference(qwen3_source, calibration_txt, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "out"
    assert main(cli_args(qwen3_source, calibration_txt, output)) == 0
    return snapshot(output)


def fail_on_call(n: int, code: int, real, path_of):
    """A stand-in for `real` whose n-th call raises OSError(code) naming `path_of(args)`; the others pass through."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(code, os.strerror(code), str(path_of(args)))
        return real(*args, **kwargs)

    return wrapper


def inject(where: str, monkeypatch) -> str:
    """Make one write of a run fail; returns a fragment of the path the error line must name."""
    import ream_hf.io.checkpoint_writer as checkpoint_writer
    import ream_hf.io.writer as writer

    if where == "shard part":  # safetensors' own error type, as it reports a full disk
        from safetensors import SafetensorError

        real = writer.save_file
        calls = []

        def save_file(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(*args, **kwargs)

        monkeypatch.setattr(writer, "save_file", save_file)
        return "part-00001.safetensors.tmp"
    if where == "hidden states":
        def opener(file, mode="r", *args, **kwargs):
            if "hidden-" in str(file) and "w" in mode:
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(file))
            return builtins.open(file, mode, *args, **kwargs)

        real_save = torch.save

        def torch_save(obj, file, *args, **kwargs):  # torch's writer on a full quota: a RuntimeError without errno
            if isinstance(file, (str, os.PathLike)) and "hidden-" in str(file):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 0 vs 64")
            return real_save(obj, file, *args, **kwargs)

        monkeypatch.setattr(hidden_states, "open", opener, raising=False)
        monkeypatch.setattr(torch, "save", torch_save)
        return "hidden-00001"
    if where == "commit":  # the third state write: the second layer's commit
        real = work_folder.WorkFolder._write_state
        monkeypatch.setattr(work_folder.WorkFolder, "_write_state",
                            fail_on_call(3, errno.ENOSPC, real, lambda args: args[0].folder / "state.json.tmp"))
        return "state.json.tmp"
    assert where == "side files"  # the final save
    monkeypatch.setattr(checkpoint_writer, "copy_side_files", fail_on_call(
        1, errno.EACCES, checkpoint_writer.copy_side_files, lambda args: args[1] / "tokenizer.json"))
    return "tokenizer.json"


@pytest.mark.parametrize("where, message", [("shard part", "no space left on the device"),
                                            ("hidden states", "disk quota exceeded"),
                                            ("commit", "no space left on the device"),
                                            ("side files", "permission denied")])
def test_failed_write_then_resume_is_byte_identical(where, message, qwen3_source, calibration_txt, tmp_path, reference,
                                                     monkeypatch, capsys):
    out, work = tmp_path / "out", tmp_path / ".out.ream-work"
    with monkeypatch.context() as patch:
        path = inject(where, patch)
        capsys.readouterr()
        assert main(cli_args(qwen3_source, calibration_txt, out)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: cannot write ") and path in lines[-1] and message in lines[-1], lines[-1]
    assert "the run needs about" in lines[-1] and "free there now" in lines[-1] and "--resume" in lines[-1]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert not out.exists(), "no partial output folder"
    assert json.loads((work / "state.json").read_text())["format"] == work_folder.FORMAT, "a resumable work folder"

    assert main(cli_args(qwen3_source, calibration_txt, out, "--resume")) == 0, capsys.readouterr().err
    assert snapshot(out) == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_space_needed_is_the_plans(qwen3_source, calibration_txt, tmp_path, monkeypatch, capsys):
    """The failed write's line states what `ream-hf plan` computes: the output, and two generations of hidden states
    in the work folder."""
    from ream_hf.config import ReamConfig
    from ream_hf.io.folders import short_bytes
    from ream_hf.pipeline.job_plan import plan_job

    config = ReamConfig(target_experts=8, method="ream", group_size=4, calibration=[str(calibration_txt)],
                        calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=32, batch_size=4, max_shard_size=200000)
    plan = plan_job(str(qwen3_source), config)
    inject("side files", monkeypatch)
    capsys.readouterr()
    assert main(cli_args(qwen3_source, calibration_txt, tmp_path / "out")) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    total = plan.output_bytes + 2 * plan.hidden_states_bytes
    assert f"the run needs about {short_bytes(total)} ({short_bytes(plan.output_bytes)} for the compressed checkpoint, " \
           f"{short_bytes(2 * plan.hidden_states_bytes)} for calibration hidden states" in line, line


def test_the_first_failed_write_is_what_surfaces(tmp_path):
    """Background writes fail in any order: a commit skipped because a later-submitted write failed is not what the
    run reports (a RuntimeError would end in a traceback); the full disk is. `drain` waits without raising."""
    import threading

    writer = background_writer.BackgroundWriter(workers=3)
    release = threading.Event()
    writer.submit(lambda: release.wait(5))  # a slow write
    skipped = writer.submit(lambda: None, after_all=True)  # a commit, waiting for the slow write

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "hidden-00002" / "000001.tmp"))

    failed = writer.submit(full)
    with pytest.raises(OSError):
        failed.result(5)
    release.set()
    with pytest.raises(RuntimeError, match="skipped"):
        skipped.result(5)
    with pytest.raises(OSError) as raised:
        writer.flush()
    assert raised.value.errno == errno.ENOSPC and "000001.tmp" in raised.value.filename

    writer.drain()  # the run ends on that error: wait for what is left, raise nothing more
    writer.flush()
    writer.close()


# -- locks ------------------------------------------------------------------------------------------------------
def test_a_second_run_on_the_work_folder_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom ream_hf.pipeline.work_folder import WorkFolder\n"
                               f"WorkFolder.open({str(tmp_path / 'work')!r}, 'job', False)\nprint('held', flush=True)\n"
                               "sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"in use by another ream-hf run \(pid {holder.pid} on host \S+, started "
                                             r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)"):
            work_folder.WorkFolder.open(tmp_path / "work", "job", resume=True)
    finally:
        holder.communicate("\n")
    # its process is gone: the lock died with it, the record it left is taken over
    work = work_folder.WorkFolder.open(tmp_path / "work", "job", resume=True)
    assert json.loads((tmp_path / "work" / "run.lock").read_text())["pid"] == os.getpid()
    work.remove()
    assert not (tmp_path / "work").exists()


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock = tmp_path / ".out.ream-lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}))
    with folders.run_lock(lock, "output folder out"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with folders.run_lock(lock, "output folder out"):  # re-entrant in this process
            pass
        assert lock.exists()
    assert not lock.exists(), "removed on release"
    assert f"is no longer running (pid {int(dead.stdout)}" in caplog.text


# -- leftovers of an interrupted --overwrite ------------------------------------------------------------------------
def test_leftovers_are_recovered(tmp_path, caplog):
    out = tmp_path / "out"
    aside = tmp_path / ".out.ream-old-123"
    aside.mkdir()
    (aside / "ream_manifest.json").write_text("old")
    (tmp_path / ".out.ream-tmp-123").mkdir()
    folders.check_output_dir(out, overwrite=True)  # no output: the one moved aside is put back
    assert (out / "ream_manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "restored" in caplog.text and "interrupted --overwrite" in caplog.text

    (tmp_path / ".out.ream-old-456").mkdir()  # the output is in place: a folder aside is the replaced one
    folders.check_output_dir(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "ream_manifest.json").read_text() == "old"


def test_atomic_exchange_keeps_a_complete_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ream_manifest.json").write_text("old")
    with folders.atomic_output_dir(out, overwrite=True) as temp:
        (temp / "ream_manifest.json").write_text("new")
        assert (out / "ream_manifest.json").read_text() == "old", "the old folder stays until the new one is whole"
    assert (out / "ream_manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError), folders.atomic_output_dir(out, overwrite=True) as temp:
        (temp / "ream_manifest.json").write_text("broken")
        raise RuntimeError("a failure while writing")
    assert (out / "ream_manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- non-finite weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_finite(dtype):
    tensor = torch.randn(64, 32).to(dtype)
    loading.check_finite("w", tensor, "shard")
    loading.check_finite("ids", torch.arange(10), "shard")  # integers hold neither
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = tensor.clone()
        broken[7, 3] = bad
        with pytest.raises(ValueError, match=r"^source tensor w \(shard\) has 1 NaN or infinite value\(s\) out of 2048"):
            loading.check_finite("w", broken, "shard")
    fp8 = torch.randn(8, 8).to(torch.float8_e4m3fn)
    loading.check_finite("w8", fp8, "shard")
    fp8[0, 0] = float("nan")
    with pytest.raises(ValueError, match="w8"):
        loading.check_finite("w8", fp8, "shard")


def test_a_nan_read_ahead_is_refused_when_its_layer_is_filled(qwen3_source, calibration_txt, tmp_path, monkeypatch,
                                                              capsys):
    """The GPU path reads the next layer's weights in a background thread while this one computes: they are checked
    there, as they are read, and the bad tensor is named when the layer it belongs to is filled, before its
    statistics; the finished layer before it is kept for --resume."""
    import threading

    from safetensors.torch import load_file, save_file

    from ream_hf.pipeline.device import Placement

    source = tmp_path / "source"
    shutil.copytree(qwen3_source, source)
    tensors = load_file(source / "model.safetensors")
    bad = "model.layers.1.mlp.experts.2.down_proj.weight"
    tensors[bad].view(-1)[5] = float("nan")
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(Placement, "prefetch_weights", property(lambda self: True))
    checked_in = {}
    check = loading.check_finite

    def spy(name, tensor, where):
        checked_in[name] = threading.current_thread().name
        check(name, tensor, where)

    monkeypatch.setattr(loading, "check_finite", spy)
    capsys.readouterr()
    assert main(cli_args(source, calibration_txt, tmp_path / "out")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: source tensor {bad} (model.safetensors) has 1 NaN or infinite value(s)"), line
    assert "(1 finished layers are kept in" in line and "--resume" in line
    assert checked_in[bad].startswith("ream-prefetch"), "checked in the reading thread"
    assert checked_in["model.layers.0.mlp.experts.2.down_proj.weight"] == threading.current_thread().name
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / ".out.ream-work" / "state.json").read_text())["finished_layers"] == 1


def test_hub_source_cache_folder_is_protected(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert folders.source_folders("me/tiny") == [((tmp_path / "hub" / "models--me--tiny").resolve(), True)]
    snapshot_dir = tmp_path / "hub" / "models--me--tiny" / "snapshots" / "abc"
    snapshot_dir.mkdir(parents=True)
    found = dict(folders.source_folders(snapshot_dir))
    assert found == {snapshot_dir.resolve(): True, (tmp_path / "hub" / "models--me--tiny").resolve(): True}
    folders.check_paths(snapshot_dir, output=tmp_path / "out", work=tmp_path / ".out.ream-work")
    with pytest.raises(ValueError, match="lies inside"):
        folders.check_paths(snapshot_dir, output=tmp_path / "hub" / "models--me--tiny" / "blobs" / "out")
    with pytest.raises(ValueError, match="contains"):
        folders.check_paths("me/tiny", work=tmp_path / "hub")
