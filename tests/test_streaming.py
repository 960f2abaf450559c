"""Layer streaming: byte-identical to the in-memory path, resumable after SIGKILL, spills hidden states."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ream_hf import ReamCompressor, ReamConfig
from tests.conftest import snapshot
from tests.families import build_family_checkpoint


EXECUTION_FIELDS = ("streaming", "hidden_states_budget_gb")


def same_output(a_folder, b_folder):
    """Byte-identical files; config.json may differ only in the recorded execution settings."""
    a, b = snapshot(a_folder), snapshot(b_folder)
    configs = []
    for files in (a, b):
        config = json.loads(files.pop("config.json"))
        for field in EXECUTION_FIELDS:
            config["ream_config"].pop(field)
        configs.append(config)
    return a == b and configs[0] == configs[1]


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


KILLER = textwrap.dedent("""
    import os, signal, sys
    import ream_hf.pipeline.streaming as streaming
    original = streaming.WorkFolder.commit
    def commit(self, finished_layers, parts, entries):
        original(self, finished_layers, parts, entries)
        if finished_layers == int(os.environ["KILL_AFTER_LAYERS"]):
            os.kill(os.getpid(), signal.SIGKILL)
    streaming.WorkFolder.commit = commit
    from ream_hf.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def cli_args(source, calibration, output, work):
    return ["compress", str(source), "--target-experts", "8", "--method", "ream", "--group-size", "4",
            "--calibration", str(calibration), "--num-sequences", "12", "--sequence-length", "48", "--batch-size", "4",
            "--max-shard-size", "300000", "--output", str(output), "--work-dir", str(work)]


def test_resume_after_sigkill_is_byte_identical(calibration_txt, tmp_path):
    source = build_family_checkpoint("glm4_moe", tmp_path / "source", num_hidden_layers=4)
    env = {**os.environ, "KILL_AFTER_LAYERS": "2"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *cli_args(source, calibration_txt, tmp_path / "out",
                                                                      tmp_path / "work")], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists(), "a killed run leaves no output folder"
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["finished_layers"] == 2 and len(state["layers"]) == 1  # layer 0 is dense

    again = subprocess.run([sys.executable, "-c", KILLER, *cli_args(source, calibration_txt, tmp_path / "out",
                                                                     tmp_path / "work")],
                           env={**env, "KILL_AFTER_LAYERS": "-1"}, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr, "an unfinished run is not silently restarted"
    resumed = subprocess.run([sys.executable, "-c", KILLER, *cli_args(source, calibration_txt, tmp_path / "out",
                                                                       tmp_path / "work"), "--resume"],
                             env={**env, "KILL_AFTER_LAYERS": "-1"}, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "work").exists()

    plain = subprocess.run([sys.executable, "-m", "ream_hf.cli", *cli_args(source, calibration_txt, tmp_path / "plain",
                                                                           tmp_path / "work2")],
                           capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "plain")
    manifest = json.loads((tmp_path / "out" / "ream_manifest.json").read_text())
    assert [entry["index"] for entry in manifest["layers"]] == [1, 2, 3]


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
    from ream_hf.pipeline.streaming import LayerLoader, build_skeleton
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
