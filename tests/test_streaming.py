"""Layer streaming: byte-identical to the in-memory path, resumable after SIGKILL at any moment, spills hidden
states."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import pytest

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.cli import main
from ream_hf.kill_points import ENV as KILL_ENV
from tests.conftest import snapshot
from tests.families import build_family_checkpoint


def same_output(a_folder, b_folder):
    """Byte-identical files, config.json and the model card included: how a run went (streamed or not, hidden states
    spilled or not) is not recorded in what it writes."""
    return snapshot(a_folder) == snapshot(b_folder)


def run(source, calibration, output, **overrides):
    kwargs = dict(target_experts=8, method="ream", group_size=4, calibration=[str(calibration)], calibration_ratios=None,
                  num_calibration_sequences=12, sequence_length=48, batch_size=4, max_shard_size=300_000)
    kwargs.update(overrides)
    compressor = ReamCompressor(ReamConfig(**kwargs))
    compressor.compress(str(source))
    compressor.save_pretrained(output)
    return compressor


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss", "qwen3_next"])
def test_streaming_equals_in_memory_byte_for_byte(family, calibration_txt, tmp_path):
    source = build_family_checkpoint(family, tmp_path / "source")
    streamed = run(source, calibration_txt, tmp_path / "streamed")
    assert streamed.result.work is None, "the work folder is removed once the output is in place"
    run(source, calibration_txt, tmp_path / "in-memory", streaming=False)
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 1, "several shards"
    assert same_output(tmp_path / "streamed", tmp_path / "in-memory")


def test_spilled_hidden_states_give_the_same_output(qwen3_source, calibration_txt, tmp_path):
    run(qwen3_source, calibration_txt, tmp_path / "memory")
    run(qwen3_source, calibration_txt, tmp_path / "spilled", hidden_states_budget_gb=0.0)
    assert same_output(tmp_path / "memory", tmp_path / "spilled")


def cli_args(source, calibration, output, work, *extra):
    return ["compress", str(source), "--target-experts", "8", "--method", "ream", "--group-size", "4",
            "--calibration", str(calibration), "--num-sequences", "8", "--sequence-length", "32", "--batch-size", "4",
            "--max-shard-size", "300000", "--output", str(output), "--work-dir", str(work), *extra]


@pytest.fixture(scope="module")
def mtp_source(tmp_path_factory):
    """GLM-4.5 with two MoE layers (the first layer is MoE: its statistics are the first work of the run) and an
    MTP layer in a second shard, as on the Hub."""
    from tests.test_mtp import add_mtp_layers

    folder = build_family_checkpoint("glm4_moe", tmp_path_factory.mktemp("glm") / "source", num_hidden_layers=2,
                                     first_k_dense_replace=0)
    return add_mtp_layers(folder)


@pytest.fixture(scope="module")
def uninterrupted(mtp_source, calibration_txt, tmp_path_factory):
    """The uninterrupted run's output for each set of extra arguments."""
    outputs = {}

    def output(extra: tuple[str, ...]):
        if extra not in outputs:
            folder = tmp_path_factory.mktemp("plain") / "out"
            assert main(cli_args(mtp_source, calibration_txt, folder, folder.parent / "work", *extra)) == 0
            outputs[extra] = snapshot(folder)
        return outputs[extra]

    return output


# (where the run kills itself (ream_hf.kill_points), extra arguments, layers its work folder has committed then)
KILLS = [
    ("work-opened", (), 0),
    ("calibration-embedded", (), 0),
    ("layer-statistics", (), 0),  # the first layer's statistics, after one batch
    ("hidden-written:1", (), 0),  # the first layer's outputs: one batch of two written
    ("layer-written:1", (), 0),  # the first layer's shard part written, its commit not made
    ("layer-written:2", (), 1),
    ("mtp-layer", (), 2),
    ("output-verified", (), 2),  # the output written and verified in its temporary folder
    ("output-verified", ("--mtp", "drop"), 2),  # no MTP layer: the last layer's outputs were never stored
    ("output-renamed", (), 2),  # the output in place, the work folder not yet removed
]


@pytest.mark.parametrize("point, extra, committed", KILLS, ids=[f"{p}{' '.join(e)}" for p, e, _ in KILLS])
def test_killed_at_any_moment_resumes_byte_identical(point, extra, committed, mtp_source, calibration_txt, tmp_path,
                                                      uninterrupted, capsys):
    """SIGKILL at each stage of a run (REAM_HF_TEST_KILL_AT), then --resume: the files equal an uninterrupted run's,
    and the work folder and every temporary folder are gone."""
    out, work = tmp_path / "out", tmp_path / "work"
    args = cli_args(mtp_source, calibration_txt, out, work, *extra)
    killed = subprocess.run([sys.executable, "-m", "ream_hf.cli", *args], capture_output=True, text=True,
                            env={**os.environ, KILL_ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert out.exists() == (point == "output-renamed"), "the output appears whole, only in its final step"
    state = json.loads((work / "state.json").read_text())
    assert state["finished_layers"] == committed, "progress is recorded by commits only"

    capsys.readouterr()
    assert main(args) == 2, "an unfinished run is not silently restarted"
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert snapshot(out) == uninterrupted(extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no work folder, lock or temporary folder left"
    if point == "layer-written:2":
        manifest = json.loads((out / "ream_manifest.json").read_text())
        assert [entry["index"] for entry in manifest["layers"]] == [0, 1, 2]  # the trunk's two, then the MTP layer


def test_every_kill_point_is_passed_and_killed_at():
    """Each name in kill_points.POINTS is a real point of the code and a stage the tests kill a run at (here, or for
    the --overwrite steps in test_bad_input.test_overwrite_killed_leaves_a_complete_output)."""
    import re
    from pathlib import Path

    import ream_hf
    from ream_hf.kill_points import POINTS

    package = Path(ream_hf.__file__).parent
    passed = {name for path in package.rglob("*.py") for name in re.findall(r'kill_point\("([a-z-]+)"\)', path.read_text())}
    assert passed == set(POINTS)
    assert {point.partition(":")[0] for point, _, _ in KILLS} | {"overwrite-moved-aside"} == set(POINTS)


def test_resume_discards_what_no_commit_names(qwen3_source, calibration_txt, tmp_path):
    """Parts and hidden states written after the last commit, and temporary files, are removed on resume."""
    from ream_hf.pipeline.work_folder import WorkFolder

    work = WorkFolder.open(tmp_path / "work", "job", resume=False)
    (work.folder / "part-00000.safetensors").write_bytes(b"committed")
    (work.folder / "hidden-00001").mkdir()
    work.commit(1, ["part-00000.safetensors"], [])
    for name in ("part-00001.safetensors", "part-00001.safetensors.tmp", "state.json.tmp"):
        (work.folder / name).write_bytes(b"after the commit")
    (work.folder / "hidden-00002").mkdir()
    (work.folder / "hidden-00002" / "000000.pt").write_bytes(b"partial")
    work.release()
    again = WorkFolder.open(tmp_path / "work", "job", resume=True)
    assert sorted(p.name for p in again.folder.iterdir()) == ["hidden-00001", "part-00000.safetensors", "run.lock",
                                                             "state.json"]
    assert again.finished_layers == 1
    again.remove()
    assert not (tmp_path / "work").exists()


def test_work_folder_of_another_job_is_refused(qwen3_source, calibration_txt, tmp_path):
    config = dict(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                  num_calibration_sequences=8, sequence_length=48)
    ReamCompressor(ReamConfig(**config)).compress(str(qwen3_source), work_dir=tmp_path / "work")  # not saved
    other = ReamCompressor(ReamConfig(**{**config, "target_experts": 6}))
    with pytest.raises(ValueError, match="different source or settings"):
        other.compress(str(qwen3_source), work_dir=tmp_path / "work", resume=True)
    with pytest.raises(ValueError, match="pass --resume"):
        ReamCompressor(ReamConfig(**config)).compress(str(qwen3_source), work_dir=tmp_path / "work")


def test_saving_twice_writes_two_complete_folders(qwen3_source, calibration_txt, tmp_path):
    """A streaming run hands each layer to its shard parts; a second save copies the first output, verified,
    instead of filling the compressed layers with the source's experts."""
    config = ReamConfig(target_experts=8, method="ream", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=48, batch_size=4, group_size=4)
    compressor = ReamCompressor(config)
    compressor.compress(str(qwen3_source))
    compressor.save_pretrained(tmp_path / "first")
    compressor.save_pretrained(tmp_path / "second")
    assert snapshot(tmp_path / "first") == snapshot(tmp_path / "second")
    with pytest.raises(ValueError, match="already"):
        compressor.save_pretrained(tmp_path / "first", overwrite=True)


def test_saving_twice_in_memory_writes_the_same_files(qwen3_source, calibration_txt, tmp_path):
    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=48, batch_size=4, streaming=False)
    compressor = ReamCompressor(config)
    compressor.compress(str(qwen3_source))
    compressor.save_pretrained(tmp_path / "first")
    compressor.save_pretrained(tmp_path / "second")
    assert snapshot(tmp_path / "first") == snapshot(tmp_path / "second")


def test_skeleton_keeps_float32_tensors_as_transformers_does(tmp_path):
    """A bfloat16 DeepSeek-V3 streamed layer by layer routes its statistics with the float32 bias transformers keeps
    (`_keep_in_fp32_modules_strict`), filled with the source's values, not a bfloat16 rounding of them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ream_hf.arch import decoder_layers, family_for_config
    from ream_hf.io.source import SourceCheckpoint
    from ream_hf.pipeline.loading import LayerLoader
    from ream_hf.pipeline.skeleton import build_skeleton
    from tests.conftest import tensors

    source = build_family_checkpoint("deepseek_v3", tmp_path / "source", dtype=torch.bfloat16)
    checkpoint = SourceCheckpoint(source)
    loader = LayerLoader(checkpoint, family_for_config(checkpoint.config), torch.device("cpu"))
    skeleton = build_skeleton(AutoConfig.from_pretrained(source), torch.bfloat16, torch.device("cpu"), loader)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    layer = decoder_layers(skeleton)[1]
    loader.fill(layer, "model.layers.1.")
    src = tensors(source)
    for key, tensor in layer.state_dict().items():
        assert tensor.dtype == reference.model.layers[1].state_dict()[key].dtype, key
    bias = layer.mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, src["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert not torch.equal(bias, bias.to(torch.bfloat16).float()), "the fixture's bias is not bfloat16-representable"
    assert layer.mlp.gate.weight.dtype == torch.bfloat16


def test_resume_may_change_the_hidden_states_budget(mtp_source, calibration_txt, tmp_path, uninterrupted, capsys):
    """The natural reaction to an OOM kill: resume with a lower --hidden-states-budget-gb. A run setting, not an output
    setting: accepted, and the output equals the uninterrupted run's byte for byte (config.json and the card do not
    record the budget)."""
    out, work = tmp_path / "out", tmp_path / "work"
    args = cli_args(mtp_source, calibration_txt, out, work)
    killed = subprocess.run([sys.executable, "-m", "ream_hf.cli", *args], capture_output=True, text=True,
                            env={**os.environ, KILL_ENV: "layer-written:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert main([*args, "--resume", "--hidden-states-budget-gb", "0"]) == 0, capsys.readouterr().err
    assert snapshot(out) == dict(uninterrupted(())), "every file byte-identical, config.json and the card included"
    assert "hidden_states_budget_gb" not in json.loads((out / "config.json").read_text())["ream_config"]


def test_resume_on_another_device_end_to_end(mtp_source, calibration_txt, tmp_path, uninterrupted, caplog):
    """A run killed on one device and resumed on another (here: its state says the first layers ran on cuda:0, the
    resume runs on the CPU) is accepted, announced in one line, and both devices are in the manifest; the output's
    tensors are the uninterrupted run's (every layer was in fact computed on this CPU)."""
    out, work = tmp_path / "out", tmp_path / "work"
    args = cli_args(mtp_source, calibration_txt, out, work)
    killed = subprocess.run([sys.executable, "-m", "ream_hf.cli", *args], capture_output=True, text=True,
                            env={**os.environ, KILL_ENV: "layer-written:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state_path = work / "state.json"
    state = json.loads(state_path.read_text())
    assert state["devices"] == ["cpu"]
    state_path.write_text(json.dumps({**state, "devices": ["cuda:0"]}))
    with caplog.at_level("WARNING"):
        assert main([*args, "--resume"]) == 0
    assert [r for r in caplog.records if "resuming on cpu a run started on cuda:0" in r.getMessage()]
    got, want = snapshot(out), dict(uninterrupted(()))
    manifests = [json.loads(files.pop("ream_manifest.json")) for files in (got, want)]
    assert manifests[0].pop("devices") == ["cuda:0", "cpu"] and "devices" not in manifests[1]
    assert manifests[0] == manifests[1]
    got.pop("README.md"), want.pop("README.md")  # the card quotes the manifest
    assert got == want, "every shard, the index and config.json byte-identical"


def test_a_replaced_source_shard_is_refused_on_resume(qwen3_source, calibration_txt, tmp_path):
    """Same names, same config, same weight map: a shard replaced between the kill and the resume is seen by its size
    and header."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = tmp_path / "source"
    shutil.copytree(qwen3_source, source)
    config = dict(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                  num_calibration_sequences=8, sequence_length=48)
    ReamCompressor(ReamConfig(**config)).compress(str(source), work_dir=tmp_path / "work")  # not saved
    shard = next(source.glob("*.safetensors"))
    save_file(load_file(shard), str(shard), metadata={"format": "pt", "retrained": "yes"})
    with pytest.raises(ValueError, match="different source or settings.*the source differs"):
        ReamCompressor(ReamConfig(**config)).compress(str(source), work_dir=tmp_path / "work", resume=True)


def test_a_finished_output_of_other_settings_is_refused_on_resume(tmp_path):
    """A work folder whose output is in place (only its removal was left) answers "already complete" to the same
    command only: other output settings are refused, naming the difference."""
    from ream_hf.pipeline.work_folder import WorkFolder

    output = tmp_path / "out"
    output.mkdir()
    (output / "ream_manifest.json").write_text("{}")
    settings = {"method": "ream", "target_experts": 8}
    work = WorkFolder.open(tmp_path / "work", "job", resume=False, settings=settings, device="cpu")
    work.mark_saved(output, hashlib.sha256(b"{}").hexdigest())
    work.release()
    assert WorkFolder.saved_output(tmp_path / "work", output, settings)
    with pytest.raises(ValueError, match="other settings \\(target_experts: 8 in the work folder, 6 now\\)"):
        WorkFolder.saved_output(tmp_path / "work", output, {**settings, "target_experts": 6})


def test_resume_on_another_device_is_announced_and_recorded(tmp_path, caplog):
    from ream_hf.pipeline.work_folder import WorkFolder

    WorkFolder.open(tmp_path / "work", "job", resume=False, device="cpu").release()
    with caplog.at_level("WARNING"):
        again = WorkFolder.open(tmp_path / "work", "job", resume=True, device="cuda:0")
    assert again.state["devices"] == ["cpu", "cuda:0"]
    assert [r.message for r in caplog.records if "resuming on cuda:0 a run started on cpu" in r.message]
    again.release()
