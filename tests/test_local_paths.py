"""No written file holds a path of the machine that wrote it: config.json's `ream_config` and `ream_manifest.json`
record calibration files by name and content digest and a local source by its folder's name, through the CLI and
transformers' `from_pretrained` alike (both reach the Hub on push), and so does the model card."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM

from ream_hf import ReamConfig
from ream_hf.cli import main as cli
from ream_hf.io.safetensors import shard_digests
from ream_hf.release.card import render_model_card


def machine_paths(*given: Path) -> set[str]:
    """Absolute paths of this machine an output could leak: the temporary folders, home, the working directory and
    the paths the run was given (as given and resolved)."""
    paths = {tempfile.gettempdir(), str(Path.home()), os.getcwd(), *map(str, given)}
    paths |= {str(Path(p).resolve()) for p in paths}
    return {p for p in paths if p not in ("/", "")}


def leaks(folder: Path, paths: set[str]) -> dict[str, str]:
    """file name -> the first machine path found in it, for every text file of `folder` (binary files skipped: the
    shards' headers are JSON and scanned too, as bytes)."""
    found = {}
    for file in sorted(folder.rglob("*")):
        if not file.is_file():
            continue
        data = file.read_bytes()
        if file.suffix == ".safetensors":
            data = data[8: 8 + int.from_bytes(data[:8], "little")]
        for path in sorted(paths, key=len, reverse=True):
            if path.encode() in data:
                found[file.name] = path
                break
    return found


def check_calibration_record(recorded: list[dict], calibration: Path) -> None:
    assert [source["path"] for source in recorded] == [calibration.name]
    assert recorded[0]["sha256"] == hashlib.sha256(calibration.read_bytes()).hexdigest()


def test_cli_output_and_card_hold_no_local_path(qwen3_source, calibration_txt, tmp_path):
    output = tmp_path / "out"
    assert cli(["compress", str(qwen3_source), "--target-experts", "8", "--method", "reap", "--calibration",
                str(calibration_txt.resolve()), "--num-sequences", "8", "--sequence-length", "64", "--batch-size",
                "4", "--output", str(output)]) == 0
    render_model_card(output, base_model="org/tiny-qwen3-moe")
    assert {"config.json", "ream_manifest.json", "README.md"} <= {p.name for p in output.iterdir()}
    assert leaks(output, machine_paths(qwen3_source, calibration_txt, tmp_path)) == {}
    check_calibration_record(json.loads((output / "config.json").read_text())["ream_config"]["calibration"],
                             calibration_txt)
    manifest = json.loads((output / "ream_manifest.json").read_text())
    assert manifest["source"] == qwen3_source.name
    assert manifest["shards"] == shard_digests(output), "every shard's digest: the evaluation cache's key"
    assert ReamConfig.from_pretrained(output).calibration[0].sha256 is not None  # the record reads back


def test_from_pretrained_output_holds_no_local_path(qwen3_source, calibration_txt, tmp_path):
    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt.resolve())],
                        calibration_ratios=None, num_calibration_sequences=8, sequence_length=64, batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(str(qwen3_source), quantization_config=config)
    output = tmp_path / "hf"
    model.save_pretrained(str(output))
    assert leaks(output, machine_paths(qwen3_source, calibration_txt, tmp_path)) == {}
    check_calibration_record(json.loads((output / "config.json").read_text())["ream_config"]["calibration"],
                             calibration_txt)
    assert model.ream_manifest["source"] == qwen3_source.name
