"""Writes that survive a power loss or a lost VM, not only a kill: checked by the order of operations, with
`os.fsync`, `os.replace` and `os.rename` recorded (each fsync by the path its descriptor names).

- A work folder's commit (`state.json` replaced) comes after every part it names, the hidden states of the
  generation it names, and the work folder's entries were flushed; the state's temporary file is flushed before the
  rename and the folder after it.
- The output folder's files are all flushed before the final rename, and the parent folder after it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.pipeline.work_folder import STATE_NAME


class Recorder:
    """os.fsync / os.replace / os.rename wrapped: each call recorded, in order, across threads."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple] = []
        self.states: dict[int, dict] = {}  # event index of a state.json replace -> the state it put in place
        self._lock = threading.Lock()
        fsync, replace, rename = os.fsync, os.replace, os.rename

        def record_fsync(fd):
            self._add(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return fsync(fd)

        def record_replace(src, dst, *args, **kwargs):
            state = json.loads(Path(src).read_text()) if Path(dst).name == STATE_NAME else None
            with self._lock:
                if state is not None:
                    self.states[len(self.events)] = state
                self.events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))
            return replace(src, dst, *args, **kwargs)

        def record_rename(src, dst, *args, **kwargs):
            self._add(("rename", str(Path(src).resolve()), str(Path(dst).resolve())))
            return rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", record_fsync)
        monkeypatch.setattr(os, "replace", record_replace)
        monkeypatch.setattr(os, "rename", record_rename)

    def _add(self, event: tuple) -> None:
        with self._lock:
            self.events.append(event)

    def flushed_before(self, index: int) -> set[str]:
        return {event[1] for event in self.events[:index] if event[0] == "fsync"}

    def flushed_after(self, index: int) -> list[str]:
        return [event[1] for event in self.events[index + 1:] if event[0] == "fsync"]


def test_commits_and_the_output_are_flushed_before_they_are_recorded(qwen3_source, calibration_txt, tmp_path,
                                                                    monkeypatch):
    config = ReamConfig(target_experts=8, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None,
                        num_calibration_sequences=8, sequence_length=64, batch_size=4, hidden_states_budget_gb=0,
                        max_shard_size=100_000)  # several parts per layer; hidden states on disk
    work, output = (tmp_path / "work").resolve(), (tmp_path / "out").resolve()
    recorder = Recorder(monkeypatch)
    compressor = ReamCompressor(config)
    compressor.compress(str(qwen3_source), work_dir=work)
    compressor.save_pretrained(output)
    events = recorder.events

    commits = [(i, state) for i, state in recorder.states.items() if state["finished_layers"] > 0
               and "saved" not in state]  # `mark_saved` records the output just before it moves into place
    assert [state["finished_layers"] for _, state in commits] == [1, 2], "one commit per layer"
    for index, state in commits:
        _, temp, target = events[index]
        flushed = recorder.flushed_before(index)
        assert temp in flushed, "the state's bytes before its rename"
        assert {str(work / part) for part in state["parts"]} <= flushed, "every part the commit names"
        if state["finished_layers"] == 1:  # the next layer's inputs (the last layer's outputs are not stored)
            hidden = work / "hidden-00001"
            assert str(hidden) in flushed and any(p.startswith(f"{hidden}/") for p in flushed), "its hidden states"
        assert str(work) in flushed
        assert recorder.flushed_after(index)[:1] == [str(work)], "the folder, right after the rename"
    assert len(commits[-1][1]["parts"]) > 2

    final = [i for i, event in enumerate(events) if event[0] == "rename" and event[2] == str(output)]
    assert len(final) == 1
    temp_output = Path(events[final[0]][1])
    flushed = recorder.flushed_before(final[0])
    written = sorted(p.name for p in output.iterdir())
    assert {"config.json", "ream_manifest.json", "model.safetensors.index.json"} <= set(written)
    assert [name for name in written if str(temp_output / name) not in flushed] == [], "every output file"
    assert str(temp_output) in flushed
    assert str(output.parent) in recorder.flushed_after(final[0]), "the parent folder after the rename"
