"""Every bad input, one row each: a non-zero exit, one `error:` line and no traceback, the source folder
byte-identical, and no output folder left behind. Rows refused before any work also run under `no_work_started`
(no weight tensor or calibration text read); rows whose fault is in the data itself (a NaN weight, an
out-of-vocabulary token id) or in the disk are found as the data is read or written.

Then the overwrite-while-killed cases: `--overwrite` killed with SIGKILL at each step of the replacement leaves a
complete output folder (the old or the new), and the next run cleans up what the kill left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ream_hf.cli import main
from ream_hf.kill_points import ENV as KILL_ENV
from ream_hf.pipeline import job_plan as plan_module
from tests.conftest import snapshot


def run_cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def dense_model(folder):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    Qwen3ForCausalLM(config).save_pretrained(str(folder))
    return folder


@dataclass
class Case:
    args: list  # the `compress` arguments after the source (default: the shared tiny Qwen3-MoE)
    message: str  # a fragment of the one error line
    code: int = 2  # 2: bad input; 1: a failed write
    reads: bool = False  # the fault is in data that must be read to find it: no "nothing read" guard
    source: Path | None = None  # the source, when not the shared one (its bytes are compared too)
    source_arg: str | None = None  # the source as given, when not a folder (a Hub id)
    keeps_work: bool = False  # a resumable work folder stays (finished layers, a failed write)
    patches: list = field(default_factory=list)  # (object, attribute, value) to monkeypatch for the run


@dataclass
class Ctx:
    source: Path
    calibration: Path
    tmp: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch
    holder: subprocess.Popen | None = None

    def copy_source(self, folder: Path | None = None) -> Path:
        folder = folder or self.tmp / "src-copy"
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.source, folder)
        return folder

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


def target(*extra):
    return ["--target-experts", "8", *extra]


def corrupt(ctx: Ctx, tensor: str, value: float) -> Path:
    """A copy of the source with one element of `tensor` set to `value` (NaN, inf)."""
    folder = ctx.copy_source()
    tensors = load_file(folder / "model.safetensors")
    tensors[tensor].view(-1)[3] = value
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def held_elsewhere(ctx: Ctx, lock_file: Path) -> subprocess.Popen:
    """Another process holding `lock_file`, as a running compression holds its output folder's lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom ream_hf.io.folders import acquire_lock, release_lock\n"
                               f"acquire_lock({str(lock_file)!r}, 'x')\nprint('held', flush=True)\n"
                               f"sys.stdin.readline()\nrelease_lock({str(lock_file)!r})"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert holder.stdout.readline().strip() == "held"
    return holder


def unfinished_run(ctx: Ctx) -> Case:
    """A run interrupted (Ctrl-C) after the work folder was created; the same command again without --resume."""
    import ream_hf.pipeline.sequential as sequential

    def interrupt(name):
        if name == "layer-written":
            raise KeyboardInterrupt

    args = target("--output", ctx.out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sequential, "kill_point", interrupt)
        assert main([str(a) for a in ["compress", ctx.source, "--calibration", ctx.calibration, "--num-sequences", 8,
                                       "--sequence-length", 32, *args]]) == 130
    return Case(args, "found an unfinished run of this job", keeps_work=True)


def hub_cache_source(ctx: Ctx) -> Case:
    snapshot_dir = ctx.copy_source(ctx.tmp / "hub" / "models--me--tiny" / "snapshots" / "0123abc")
    return Case(target("--output", ctx.tmp / "hub" / "models--me--tiny" / "out"), "lies inside the source model's",
                source=snapshot_dir)


def hub_id_source(ctx: Ctx) -> Case:
    from huggingface_hub import constants

    ctx.monkeypatch.setattr(constants, "HF_HUB_CACHE", str(ctx.tmp / "cache"))
    return Case(target("--output", ctx.tmp / "cache" / "models--me--tiny" / "out"), "lies inside the source model's",
                source_arg="me/tiny")


def symlinked_blobs(ctx: Ctx) -> Case:
    """A source whose weight file is a symlink into another folder (as a Hub snapshot's are into blobs/)."""
    blobs, source = ctx.tmp / "blobs", ctx.copy_source()
    blobs.mkdir()
    (source / "model.safetensors").rename(blobs / "0f3a")
    (source / "model.safetensors").symlink_to(blobs / "0f3a")
    return Case(target("--output", blobs, "--overwrite"), "contains the source model's files", source=source)


def symlink_to_source(ctx: Ctx) -> Case:
    (ctx.tmp / "link").symlink_to(ctx.source)
    return Case(target("--output", ctx.tmp / "link", "--overwrite"), "is the source model's folder")


def locked_output(ctx: Ctx) -> Case:
    holder = ctx.holder = held_elsewhere(ctx, ctx.tmp / ".out.ream-lock")
    return Case(target("--output", ctx.out), f"in use by another ream-hf run (pid {holder.pid} on host")


def locked_work_folder(ctx: Ctx) -> Case:
    (ctx.tmp / ".out.ream-work").mkdir()
    holder = ctx.holder = held_elsewhere(ctx, ctx.tmp / ".out.ream-work" / "run.lock")
    return Case(target("--output", ctx.out), f"work folder {ctx.tmp / '.out.ream-work'} is in use by another ream-hf "
                f"run (pid {holder.pid} on host", keeps_work=True)


def out_of_vocabulary(ids: list) -> Callable[[Ctx], Case]:
    def make(ctx: Ctx) -> Case:
        rows = [{"input_ids": list(range(3, 40))} for _ in range(7)] + [{"input_ids": ids}]
        path = ctx.write("ids.jsonl", "\n".join(json.dumps(r) for r in rows))
        return Case(target("--calibration", path, "--output", ctx.out), "ids.jsonl:", reads=True)
    return make


def full_disk(ctx: Ctx) -> Case:
    """The shard part of the first layer cannot be written: safetensors reports ENOSPC in its own error type."""
    import ream_hf.io.writer as writer
    from safetensors import SafetensorError

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return Case(target("--output", ctx.out), "no space left on the device; the run needs about", code=1, reads=True,
                keeps_work=True, patches=[(writer, "save_file", no_space)])


def unwritable_manifest(ctx: Ctx) -> Case:
    import ream_hf.io.checkpoint_writer as checkpoint_writer

    real = checkpoint_writer.write_json

    def refuse(path, data):
        if path.name == "ream_manifest.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path, data)

    return Case(target("--output", ctx.out), "permission denied", code=1, reads=True, keeps_work=True,
                patches=[(checkpoint_writer, "write_json", refuse)])


def output_exists(content: str | None, *extra) -> Callable[[Ctx], Case]:
    def make(ctx: Ctx) -> Case:
        if content is None:
            ctx.out.write_text("a file")
        else:
            ctx.out.mkdir()
            if content:
                (ctx.out / "notes.txt").write_text(content)
        message = {None: "exists and is not a folder", "": "already exists"}.get(content, "ream-hf did not write")
        return Case(target("--output", ctx.out, *extra), message)
    return make


def simple(args_of: Callable[[Ctx], list], message: str, **kw) -> Callable[[Ctx], Case]:
    return lambda ctx: Case(args_of(ctx), message, **kw)


def bad_source(kind: str) -> Callable[[Ctx], Case]:
    def make(ctx: Ctx) -> Case:
        source = ctx.tmp / "src"
        if kind == "a file":
            source.write_text("x")
        elif kind != "missing":
            source.mkdir()
        if kind in ("broken config", "no weights", "missing shard"):
            (source / "config.json").write_text("{not json" if kind == "broken config" else
                                                json.dumps({"model_type": "qwen3_moe", "num_experts": 16}))
        if kind == "missing shard":
            (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors"}}))
        message = {"missing": "neither a local folder", "no config": "no config.json", "broken config": "cannot read",
                   "no weights": "no safetensors weights", "missing shard": "is incomplete", "a file": "is a file"}[kind]
        return Case(target("--output", ctx.out), message, source=source)
    return make


def unknown_moe(ctx: Ctx) -> Case:
    folder = ctx.tmp / "strange"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "fancy_moe", "num_experts": 8,
                                                    "num_experts_per_tok": 2}))
    (folder / "model.safetensors").write_bytes(b"")
    return Case(target("--output", ctx.out), "unsupported MoE architecture 'fancy_moe'", source=folder)


def identity_experts(ctx: Ctx) -> Case:
    """LongCat-Flash's zero-computation experts: refused, naming the family and what the method lacks."""
    from transformers import LongcatFlashConfig

    folder = ctx.tmp / "longcat"
    folder.mkdir()
    LongcatFlashConfig(num_layers=2, n_routed_experts=8, zero_expert_num=2).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    return Case(target("--output", ctx.out), "LongCat-Flash routes tokens to zero-computation (identity) experts",
                source=folder)


def work_folder_of_another_job(ctx: Ctx) -> Case:
    from ream_hf.pipeline.work_folder import WorkFolder

    WorkFolder.open(ctx.tmp / "work", "another-job", resume=False).release()
    return Case(target("--output", ctx.out, "--work-dir", ctx.tmp / "work"), "different source or settings")


# name -> row; each builds its files in the row's own temporary folder
ROWS: dict[str, Callable[[Ctx], Case]] = {
    # where the output and the work folder go (#13.1): the source is never written
    "output is the source (--overwrite)": simple(lambda c: target("--output", c.source, "--overwrite"),
                                                 "is the source model's folder"),
    "output is the source's parent (--overwrite)": simple(lambda c: target("--output", c.source.parent, "--overwrite"),
                                                          "contains the source model's files"),
    "output inside the source": simple(lambda c: target("--output", c.source / "out"), "lies inside the source"),
    "output is a symlink to the source": symlink_to_source,
    "output inside a Hub snapshot's cache folder": hub_cache_source,
    "output inside a Hub id's cache folder (before download)": hub_id_source,
    "output is the folder the source's files link into": symlinked_blobs,
    "work folder inside the source": simple(lambda c: target("--output", c.out, "--work-dir", c.source / "w"),
                                            "w lies inside the source model's folder"),
    "work folder is the output folder": simple(lambda c: target("--output", c.out, "--work-dir", c.out), "overlap"),
    "work folder is a file": lambda c: Case(target("--output", c.out, "--work-dir", c.write("w", "x")), "is a file"),
    "work folder holds other files": lambda c: Case(
        target("--output", c.out, "--work-dir", c.write("wf/notes.txt", "x").parent), "not a ream-hf work folder"),
    "existing output without --overwrite": output_exists(""),
    "--overwrite of a folder ream-hf did not write": output_exists("my notes", "--overwrite"),
    "output is a file": output_exists(None, "--overwrite"),
    "output under a file": lambda c: Case(target("--output", c.write("f", "x") / "out"), "is a file, not a folder"),
    # one run per output and work folder (#13.2, #14)
    "output folder in use by another run": locked_output,
    "work folder in use by another run": locked_work_folder,
    "unfinished run of this job without --resume": unfinished_run,
    "work folder of another job": work_folder_of_another_job,
    "--resume without streaming": simple(lambda c: target("--output", c.out, "--resume", "--no-streaming"),
                                         "resume needs streaming"),
    # inputs checked where they enter (#13.3)
    "NaN in an expert weight": lambda c: Case(target("--output", c.out), "model.layers.0.mlp.experts.3.gate_proj.weight",
                                              reads=True, source=corrupt(c, "model.layers.0.mlp.experts.3.gate_proj.weight",
                                                                         float("nan"))),
    "NaN in an expert weight (--no-streaming)": lambda c: Case(
        target("--output", c.out, "--no-streaming"), "model.layers.0.mlp.experts.gate_up_proj (as loaded) has 1 NaN",
        reads=True, source=corrupt(c, "model.layers.0.mlp.experts.5.up_proj.weight", float("nan"))),
    "infinity in a later layer's attention": lambda c: Case(
        target("--output", c.out), "model.layers.1.self_attn.q_proj.weight (model.safetensors) has 1 NaN or infinite",
        reads=True, keeps_work=True, source=corrupt(c, "model.layers.1.self_attn.q_proj.weight", float("-inf"))),
    "token id beyond the vocabulary": out_of_vocabulary([5, 6, 100000]),
    "negative token id": out_of_vocabulary([5, -1]),
    "token ids that are not integers": out_of_vocabulary(["5", "6"]),
    "calibration ratios summing to 1.2": lambda c: Case(target(
        "--calibration", c.write("a.txt", "a"), "--calibration", c.write("b.txt", "b"), "--calibration-ratios", "0.5",
        "0.7", "--output", c.out), "sum to 1.2, not 1"),
    "one ratio for two sources": lambda c: Case(target(
        "--calibration", c.write("a.txt", "a"), "--calibration", c.write("b.txt", "b"), "--calibration-ratios", "1",
        "--output", c.out), "one ratio per source"),
    "ratios without --calibration": lambda c: Case(["--target-experts", "8", "--calibration-ratios", "1", "--output",
                                                    c.out], "--calibration-ratios needs"),
    "calibration file missing": lambda c: Case(target("--calibration", c.tmp / "nope.txt", "--output", c.out),
                                               "does not exist"),
    "calibration file empty": lambda c: Case(target("--calibration", c.write("e.txt", ""), "--output", c.out),
                                             "is empty"),
    "calibration file of another format": lambda c: Case(target("--calibration", c.write("c.csv", "a,b"), "--output",
                                                                c.out), "must be .txt or .jsonl"),
    "calibration with no usable sequence": lambda c: Case(target(
        "--calibration", c.write("s.jsonl", json.dumps({"text": "too short"})), "--output", c.out),
        "calibration data is empty", reads=True),
    "calibration line that is not JSON": lambda c: Case(target(
        "--calibration", c.write("j.jsonl", '{"text": "fine"}\n{oops'), "--output", c.out), "j.jsonl:2 is not valid "
        "JSON", reads=True),
    # settings
    "target equals the experts": simple(lambda c: ["--target-experts", "16", "--output", c.out],
                                        "equals the model's 16 experts"),
    "target above the experts": simple(lambda c: ["--target-experts", "17", "--output", c.out],
                                       "more than the model's 16 experts"),
    "target below top-k": simple(lambda c: ["--target-experts", "3", "--output", c.out], "below the router's top-k (4)"),
    "both target and ratio": simple(lambda c: target("--compression-ratio", "0.5", "--output", c.out),
                                    "exactly one of"),
    "neither target nor ratio": simple(lambda c: ["--output", c.out], "exactly one of"),
    "compression ratio above 1": simple(lambda c: ["--compression-ratio", "1.5", "--output", c.out],
                                        "compression_ratio must be in (0, 1)"),
    "negative group size": simple(lambda c: target("--group-size", "-2", "--output", c.out), "group_size"),
    "no calibration sequences": simple(lambda c: target("--num-sequences", "0", "--output", c.out),
                                       "num_calibration_sequences must be a positive integer"),
    "zero shard size": simple(lambda c: target("--max-shard-size", "0", "--output", c.out), "max_shard_size"),
    "negative hidden-state budget": simple(lambda c: target("--hidden-states-budget-gb", "-1", "--output", c.out),
                                           "hidden_states_budget_gb"),
    "a layer larger than the device (the plan's fit check)": lambda c: Case(
        target("--output", c.out), "cannot fit cpu (0.00 GB): its largest layer is",
        patches=[(plan_module, "memory_bytes", lambda device: 1_000_000)]),  # a 1 MB device
    "unknown device": simple(lambda c: target("--device", "abacus", "--output", c.out), "not a torch device"),
    "missing GPU": simple(lambda c: target("--device", "cuda:99", "--output", c.out), "cuda:99"),
    # the source
    "source missing": bad_source("missing"),
    "source without config.json": bad_source("no config"),
    "source with a broken config.json": bad_source("broken config"),
    "source without weights": bad_source("no weights"),
    "source missing a shard": bad_source("missing shard"),
    "source is a file": bad_source("a file"),
    "dense (non-MoE) source": lambda c: Case(target("--output", c.out), "not a Mixture-of-Experts model",
                                             source=dense_model(c.tmp / "dense")),
    "unknown MoE architecture": unknown_moe,
    "identity experts (LongCat-Flash)": identity_experts,
    # the disk (#13.4)
    "disk full while writing a layer": full_disk,
    "permission denied writing the output": unwritable_manifest,
}


def state_of(path: Path):
    """What a path holds: None (nothing), a file's bytes, or a folder's files."""
    return snapshot(path) if path.is_dir() else path.read_bytes() if path.exists() else None


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, qwen3_source, calibration_txt, tmp_path, capsys, monkeypatch, request):
    ctx = Ctx(qwen3_source, calibration_txt, tmp_path, tmp_path / "out", monkeypatch)
    case = ROWS[name](ctx)
    source = case.source or qwen3_source
    output = Path(str(case.args[case.args.index("--output") + 1]))
    source_before, output_before = state_of(source), state_of(output)
    for owner, attribute, value in case.patches:
        monkeypatch.setattr(owner, attribute, value)
    if not case.reads:
        request.getfixturevalue("no_work_started")
    own_calibration = "--calibration" in case.args or "--calibration-ratios" in case.args
    args = ["compress", case.source_arg or source, *([] if own_calibration else ["--calibration", calibration_txt]),
            "--num-sequences", "8", "--sequence-length", "32", *case.args]
    try:
        code, err = run_cli(args, capsys)
    finally:
        if ctx.holder is not None:
            ctx.holder.communicate("\n")

    lines = err.strip().splitlines()
    assert code == case.code, err[-3000:]
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err[-3000:]
    assert case.message in lines[-1], lines[-1]
    assert state_of(source) == source_before, "the source is byte-identical"
    assert state_of(output) == output_before, "no output folder left behind (an existing one left as it was)"
    if output.parent.is_dir():
        leftovers = sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))
        assert leftovers == ([f".{output.name}.ream-work"] if case.keeps_work else []), \
            "no temporary folder or lock; a work folder only where it holds work to resume"


def test_the_guard_catches_weight_reads_on_the_streaming_path(qwen3_source, calibration_txt, tmp_path, no_weight_reads):
    """The guard itself can fail: a valid streaming run reads weights and trips it (no from_pretrained involved)."""
    from ream_hf import ReamCompressor, ReamConfig

    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=4, sequence_length=32)
    with pytest.raises(AssertionError, match="a weight tensor was read"):
        ReamCompressor(config).compress(str(qwen3_source))


def test_the_guard_catches_weight_reads_on_the_in_memory_path(qwen3_source, calibration_txt, no_weight_reads):
    """...and on the in-memory path, whose weights transformers reads."""
    from ream_hf import ReamCompressor, ReamConfig

    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=4, sequence_length=32, streaming=False)
    with pytest.raises(AssertionError, match="model weights were loaded"):
        ReamCompressor(config).compress(str(qwen3_source))


@pytest.fixture(scope="module")
def deepseek_source(tmp_path_factory):
    """DeepSeek-V3: 16 experts in n_group=4 routing groups, topk_group=2, top-4."""
    from tests.families import build_family_checkpoint

    return build_family_checkpoint("deepseek_v3", tmp_path_factory.mktemp("deepseek") / "source")


PLAN_CASES = {  # refused from the config alone, not after a layer's statistics
    "groups cannot hold the experts": ("qwen3", ["--target-experts", "4", "--method", "ream", "--group-size", "2"],
                                       "4 groups of at most group_size=2 cannot hold 16 experts"),
    "target across routing groups": ("deepseek", ["--target-experts", "6"], "not divisible by n_group=4"),
    "too few per routing group": ("deepseek", ["--target-experts", "4"], "too few for top-4"),
    "group size within routing groups": ("deepseek", ["--target-experts", "8", "--method", "ream", "--group-size", "1"],
                                         "cannot hold 16 experts"),
    "resume without streaming": ("qwen3", ["--target-experts", "8", "--resume", "--no-streaming"], "resume needs streaming"),
}


@pytest.mark.parametrize("name", list(PLAN_CASES))
def test_impossible_plans_are_refused_before_work(name, qwen3_source, deepseek_source, calibration_txt, tmp_path, capsys,
                                                  no_work_started):
    which, extra, message = PLAN_CASES[name]
    source = qwen3_source if which == "qwen3" else deepseek_source
    code, err = run_cli(["compress", str(source), "--calibration", str(calibration_txt), "--output",
                         str(tmp_path / "out"), *extra], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_unfinished_or_foreign_work_folder_is_refused_before_work(qwen3_source, calibration_txt, tmp_path, capsys,
                                                                  no_work_started):
    from ream_hf.pipeline.work_folder import WorkFolder

    WorkFolder.open(tmp_path / "work", "another-job", resume=False).commit(1, [], [])
    args = ["compress", str(qwen3_source), "--target-experts", "8", "--calibration", str(calibration_txt),
            "--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    code, err = run_cli(args, capsys)
    assert code == 2 and "found an unfinished run" in err and "--resume" in err
    code, err = run_cli([*args, "--resume"], capsys)
    assert code == 2 and "different source or settings" in err


# -- --overwrite killed at every step of the replacement --------------------------------------------------------
def compress_args(source, calibration, output, target_experts, *extra):
    return ["compress", str(source), "--target-experts", str(target_experts), "--method", "reap", "--calibration",
            str(calibration), "--num-sequences", "8", "--sequence-length", "32", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def old_and_new(qwen3_source, calibration_txt, tmp_path_factory):
    """An earlier output (8 experts) and what the --overwrite run (6 experts) writes when not interrupted."""
    folder = tmp_path_factory.mktemp("overwrite")
    assert main(compress_args(qwen3_source, calibration_txt, folder / "old", 8)) == 0
    assert main(compress_args(qwen3_source, calibration_txt, folder / "new", 6)) == 0
    return folder / "old", folder / "new"


# the fallback without an atomic exchange: the same replacement in two renames
NO_EXCHANGE = ("import sys\nimport ream_hf.io.folders as folders\nfolders.exchange_paths = lambda a, b: False\n"
               "from ream_hf.cli import main\nsys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("point, exchange, complete", [
    ("output-verified", True, "old"),  # new folder written and verified, not yet swapped in
    ("output-renamed", True, "new"),  # swapped in atomically, the old one not yet deleted
    ("overwrite-moved-aside", False, "old"),  # no exchange: old renamed aside, new not yet renamed in
])
def test_overwrite_killed_leaves_a_complete_output(point, exchange, complete, qwen3_source, calibration_txt, tmp_path,
                                                   old_and_new, capsys):
    from ream_hf.io.folders import check_output_dir

    old, new = old_and_new
    out = tmp_path / "out"
    shutil.copytree(old, out)
    source_before = snapshot(qwen3_source)
    args = compress_args(qwen3_source, calibration_txt, out, 6, "--overwrite")
    command = [sys.executable, "-m", "ream_hf.cli"] if exchange else [sys.executable, "-c", NO_EXCHANGE]
    killed = subprocess.run([*command, *args], capture_output=True, text=True, env={**os.environ, KILL_ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    if point == "overwrite-moved-aside":  # the one moment without a folder at `out`: the old one is whole beside it
        assert not out.exists()
        aside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.ream-old-")]
        assert len(aside) == 1 and snapshot(aside[0]) == snapshot(old)
        check_output_dir(out, overwrite=True)  # any next run on this output puts it back first
    assert snapshot(out) == snapshot(old if complete == "old" else new), f"a complete {complete} output"
    assert snapshot(qwen3_source) == source_before

    assert main([*args, "--resume"]) == 0, capsys.readouterr().err  # finishes the replacement (or is already done)
    assert snapshot(out) == snapshot(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no work folder, lock or temporary folder left"
