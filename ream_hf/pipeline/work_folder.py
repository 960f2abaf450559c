"""The work folder of a run: the job's fingerprint, and `WorkFolder`, which holds finished layers' shard parts, the
next layer's inputs and the manifest so far, so that a run continues after a crash.

A work folder is keyed by a fingerprint of the source and the settings; its progress is recorded only by commits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..io.folders import acquire_lock, fsync_file, fsync_folder, fsync_tree, release_lock, write_durably
from ..io.names import MANIFEST_NAME
from ..io.safetensors import header_bytes
from ..io.source import SourceCheckpoint
from ..kill_points import kill_point
from .hidden_states import HiddenStateStore

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"
LOCK_NAME = "run.lock"
FORMAT = "ream-hf work folder v1"


def fingerprint(source: SourceCheckpoint, settings: dict[str, Any]) -> str:
    """Identifies a job: the source (its Hub commit, config and tensor index; a local folder's shard sizes and
    headers too) and every setting that changes the output."""
    digest = hashlib.sha256()
    if source.revision is not None:  # the same config and index at another commit may hold other weights
        digest.update(f"revision {source.revision}".encode())
    digest.update(json.dumps(source.config, sort_keys=True).encode())
    digest.update(json.dumps(sorted(source.weight_map.items())).encode())
    if source.revision is None:  # a local folder: each shard's size and header, so that a replaced one is seen
        for shard in sorted(set(source.weight_map.values())):
            path = source.folder / shard
            digest.update(f"{shard} {path.stat().st_size} ".encode())
            digest.update(hashlib.sha256(header_bytes(path)).digest())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def difference(recorded: dict[str, Any] | None, given: dict[str, Any] | None) -> str:
    """"; NAME: RECORDED here, GIVEN now" for the first setting that differs, or "" (nothing recorded, or none)."""
    if not recorded or given is None:
        return ""
    for name in sorted(set(recorded) | set(given)):
        if json.dumps(recorded.get(name), sort_keys=True, default=str) != \
                json.dumps(given.get(name), sort_keys=True, default=str):
            return f"; {name}: {recorded.get(name)!r} in the work folder, {given.get(name)!r} now"
    return ""


class WorkFolder:
    """What a run needs to continue: finished layers' shard parts, the next layer's inputs, the manifest so far.

    It identifies itself from the moment it exists: `open` takes its lock and writes its state file (the job's
    fingerprint, zero finished layers) before anything else, so a run killed at any later moment leaves a folder
    that `resume` accepts. Progress is recorded only by `commit`, after everything it names is written; on resume
    whatever no commit names (a part or hidden states written after the last commit, temporary files) is discarded.
    """

    def __init__(self, folder: Path, job: str) -> None:
        self.folder, self.job = Path(folder), job
        self.state: dict[str, Any] = {"format": FORMAT, "job": job, "finished_layers": 0, "parts": [], "layers": [],
                                      "created": time.time()}
        self._flushed: set[str] = set()  # parts already flushed to disk by an earlier commit

    @staticmethod
    def check(folder: str | os.PathLike) -> None:
        """Refuse, before any work, a work folder path that is a file or a folder holding something else (its
        removal at the end would delete that)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"work folder {folder} is a file; choose another work folder")
        if folder.is_dir() and not (folder / STATE_NAME).is_file():
            foreign = sorted(p.name for p in folder.iterdir() if p.name not in (LOCK_NAME, STATE_NAME + ".tmp"))
            if foreign:
                raise ValueError(f"work folder {folder} exists and is not a ream-hf work folder (it holds {foreign[0]}); "
                                 "choose another")

    @classmethod
    def open(cls, folder: Path, job: str, resume: bool, settings: dict[str, Any] | None = None,
             device: str | None = None) -> WorkFolder:
        """Lock and identify the work folder of `job` (`settings`: the output settings it was keyed on, kept to name a
        difference; `device`: where this run computes, recorded beside the devices of earlier runs of the job)."""
        folder = Path(folder)
        cls.check(folder)
        folder.mkdir(parents=True, exist_ok=True)
        acquire_lock(folder / LOCK_NAME, f"work folder {folder}")
        work = cls(folder, job)
        work.state.update(settings=settings, devices=[device] if device else [])
        try:
            if (folder / STATE_NAME).is_file():
                work._continue(resume, settings, device)
            else:
                if resume:
                    logger.info("nothing to resume in %s: starting", folder)
                work._write_state()
        except BaseException:
            release_lock(folder / LOCK_NAME)
            raise
        kill_point("work-opened")
        return work

    @staticmethod
    def read_state(folder: Path) -> dict[str, Any] | None:
        """The state file of a work folder, or None where there is none."""
        path = Path(folder) / STATE_NAME
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {path} ({error}); delete the work folder {folder} to start over") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"work folder {folder} was written by another version of ream-hf; delete it to start over")
        return state

    def _continue(self, resume: bool, settings: dict[str, Any] | None = None, device: str | None = None) -> None:
        state = self.read_state(self.folder)
        done = state.get("finished_layers")
        if state.get("job") != self.job:
            detail = difference(state.get("settings"), settings)
            if not detail and state.get("settings") and settings is not None:
                detail = "; the source differs"
            raise ValueError(
                f"found an unfinished run of a different source or settings in {self.folder} ({done} layers done"
                f"{detail}); resume needs the same source and output settings "
                "(only the hidden-states budget, work dir, threads and device may change): run that command again "
                "with --resume, or delete that folder to start over"
            )
        if not resume:
            raise ValueError(
                f"found an unfinished run of this job in {self.folder} ({done} layers done); pass --resume "
                "(Python: resume=True) to continue it, or delete that folder to start over"
            )
        self.state = state
        devices = state.setdefault("devices", [])
        if device and devices and device not in devices:
            logger.warning("resuming on %s a run started on %s: the remaining layers' float rounding may differ from "
                           "an uninterrupted run's (both devices are recorded in the manifest)", device, devices[-1])
        if device and device not in devices:
            devices.append(device)
        self._discard_uncommitted()
        logger.info("resuming after layer %d from %s", done, self.folder)

    def _discard_uncommitted(self) -> None:
        keep = {STATE_NAME, LOCK_NAME, *self.state["parts"]}
        if self.finished_layers:
            keep.add(HiddenStateStore.generation_name(self.finished_layers))
        for item in sorted(self.folder.iterdir()):
            if item.name in keep or not item.name.startswith(("part-", "hidden-", STATE_NAME)):
                continue
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()
            logger.info("discarded %s: written after the last commit", item)

    def _write_state(self) -> None:
        write_durably(self.folder / STATE_NAME, json.dumps(self.state, indent=1))

    @property
    def finished_layers(self) -> int:
        return int(self.state["finished_layers"])

    def commit(self, finished_layers: int, parts: list[str], layer_entries: list[dict]) -> None:
        """Atomically and durably record progress. Everything it names was written before and is flushed to disk
        first (the parts no earlier commit flushed, the hidden states of generation `finished_layers`, the folder's
        entries): after a power loss the state never names bytes that did not reach the disk."""
        for name in parts:
            if name not in self._flushed:
                fsync_file(self.folder / name)
                self._flushed.add(name)
        hidden = self.folder / HiddenStateStore.generation_name(finished_layers)
        if hidden.is_dir():
            fsync_tree(hidden)
        fsync_folder(self.folder)
        # copies: the caller's lists grow on (the MTP layers' entries) and must not leak into a later state write
        self.state.update(finished_layers=finished_layers, parts=list(parts), layers=list(layer_entries))
        self._write_state()

    def mark_saved(self, output: Path, manifest_digest: str) -> None:
        """Record, just before the output is moved into place, which output this job wrote: a run killed between
        that move and the removal of this folder is then recognised as complete (`saved_output`)."""
        self.state["saved"] = {"output": str(Path(output).resolve()), "manifest_sha256": manifest_digest}
        self._write_state()

    @classmethod
    def saved_output(cls, folder: Path, output: Path, settings: dict[str, Any] | None = None) -> bool:
        """Whether the work folder records that its job wrote `output`, and `output` is that very folder (its
        manifest's digest matches): only the removal of the work folder was left to do. Given the output settings
        of the command at hand, a job of other settings is refused, naming the difference."""
        if not Path(folder).is_dir():
            return False
        state = cls.read_state(folder)
        saved = (state or {}).get("saved")
        if not saved or saved.get("output") != str(Path(output).resolve()):
            return False
        manifest = Path(output) / MANIFEST_NAME
        if not (manifest.is_file() and hashlib.sha256(manifest.read_bytes()).hexdigest() == saved.get("manifest_sha256")):
            return False
        changed = difference(state.get("settings"), settings)
        if changed:
            raise ValueError(f"{output} was written by a run of other settings ({changed.lstrip('; ')}): it is not "
                             "this command's output; choose another --output, or --overwrite without --resume")
        return True

    @classmethod
    def open_saved(cls, folder: Path) -> WorkFolder:
        """The work folder of a job whose output is in place (`saved_output`), locked: only its removal is left."""
        folder = Path(folder)
        acquire_lock(folder / LOCK_NAME, f"work folder {folder}")
        state = cls.read_state(folder)
        work = cls(folder, state["job"])
        work.state = state
        return work

    def release(self) -> None:
        release_lock(self.folder / LOCK_NAME)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.release()


def default_work_root() -> Path:
    return Path(os.environ.get("REAM_HF_WORK_DIR", Path.home() / ".cache" / "ream-hf" / "work"))
