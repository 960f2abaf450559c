"""Compressing models larger than RAM: one decoder layer in memory at a time, resumable.

The model is built on the meta device; embeddings and rotary tables are materialised for the
calibration pass, then each decoder layer is filled from the source shards (only its own tensors),
compressed, written out and dropped back to meta. Hidden states between layers stay in memory up to a
budget and spill to memory-mapped files beyond it. A work folder keyed by a fingerprint of the source
and the settings holds everything needed to continue after a crash.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import (FUSED_PARAMS, MoEFamily, config_mtp_prefixes, disk_expert_names, in_memory_key,
                    read_expert_weights)
from ..io.folders import acquire_lock, release_lock
from ..io.source import SourceCheckpoint
from ..io.names import MANIFEST_NAME
from ..kill_points import kill_point
from .device import Placement

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"
LOCK_NAME = "run.lock"
FORMAT = "ream-hf work folder v1"
WRITER_PENDING_BYTES = 2 * 2**30  # BackgroundWriter's default bound on host copies waiting for the disk


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    """Refuse a source weight holding NaN or infinity, in one line naming it, before any statistics use it.

    Called on each tensor right after it is read, while it is still in cache: one fused min/max pass (`aminmax`
    propagates NaN and returns +-inf as they are), no temporary the size of the tensor; the count of bad values is
    taken only on failure. (A NaN otherwise surfaces as an SVD LinAlgError after the whole statistics pass.)"""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if tensor.element_size() == 1:  # float8: aminmax has no kernel for it
        tensor = tensor.to(torch.float16)
    low, high = torch.aminmax(tensor)
    if math.isfinite(float(low)) and math.isfinite(float(high)):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise ValueError(f"source tensor {name} ({where}) has {bad} NaN or infinite value(s) out of {tensor.numel()}: "
                     "the checkpoint is damaged; download it again or repair that tensor")


class LayerLoader:
    """Fills meta-device modules (a trunk decoder layer, an MTP layer, the embeddings) from the source's
    safetensors shards: only the module's own tensors are read, experts straight into their fused parameters."""

    def __init__(self, source: SourceCheckpoint, family: MoEFamily, device: torch.device, *,
                 prefetch: bool = False) -> None:
        self.source, self.family, self.device = source, family, torch.device(device)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ream-prefetch") if prefetch else None
        self._ahead: tuple[str, Future] | None = None  # (disk prefix, its tensors by name), read in the background

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Real tensors by name: quantized ones dequantized as they are read, each checked for NaN/inf."""
        return dict(self._tensors(names))

    def _checked(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The source's real tensors (quantized ones dequantized), each checked for NaN/inf as it arrives
        (`check_finite`): every tensor a layer is filled with passes here, read now or ahead (`prefetch`)."""
        for name, tensor in self.source.iter_real_tensors(names):
            check_finite(name, tensor, self.source.weight_map.get(name, "dequantized"))
            yield name, tensor

    def stored(self, names) -> set[str]:
        """The stored tensors that hold real tensors `names` (their scales included)."""
        reals = self.source.real_tensors
        return {stored for name in names for stored in reals[name]}

    def prefetch(self, disk_prefix: str) -> None:
        """Start reading every source tensor under `disk_prefix` (the next layer's) in a background thread, pinned
        for the copy to a GPU; `fill` with that prefix takes them from there. One layer ahead at most: a prefetch
        replaces the one before it. A no-op unless the loader was made with prefetch=True, and for a quantized
        source (its layer, dequantized to float32, would take four times its stored size in pinned memory).
        Each tensor is checked for NaN/inf in that thread; a bad one is raised by the `fill` that claims the layer."""
        if self._reader is None or self.source.quantization is not None:
            return
        self._ahead = None
        names = [name for name in self.source.real_tensors if name.startswith(disk_prefix)]
        pin = self.device.type == "cuda"
        self._ahead = (disk_prefix, self._reader.submit(
            lambda: {name: tensor.pin_memory() if pin else tensor for name, tensor in self._checked(names)}))

    def _tensors(self, names: Iterable[str], ahead: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, real tensor) for `names`: from `ahead` (a prefetched layer, emptied as it is used, checked as it
        was read) or read and checked now."""
        names = list(names)
        rest = [name for name in names if ahead is None or name not in ahead]
        for name in names:
            if ahead is not None and name in ahead:
                yield name, ahead.pop(name)
        yield from self._checked(rest)

    def _claim(self, disk_prefix: str) -> dict[str, torch.Tensor] | None:
        """The prefetched tensors if they are `disk_prefix`'s (waiting for the read to finish), else None."""
        if self._ahead is None or self._ahead[0] != disk_prefix:
            return None
        _, pending = self._ahead
        self._ahead = None
        return pending.result()

    def fill(self, module: nn.Module, disk_prefix: str) -> set[str]:
        """Materialise `module` (on meta) on the loader's device from the tensors named `disk_prefix + key`, experts
        fused as in memory, quantized tensors dequantized; returns the on-disk names read (scales included)."""
        computed = {name for name, _ in module.named_buffers()} - set(module.state_dict())
        if computed:  # to_empty would leave them uninitialised: nothing on disk says what they hold
            raise ValueError(f"cannot fill {type(module).__name__} from {disk_prefix}*: its buffer "
                             f"{sorted(computed)[0]} is computed at construction, not stored")
        module.to_empty(device=self.device)
        state = module.state_dict()
        wanted: dict[str, str] = {}
        fused: set[str] = set()  # experts modules whose fused parameters are per-expert tensors on disk
        for key in state:
            disk_key = in_memory_key(self.family, key)
            head, _, leaf = key.rpartition(".")
            if head.endswith(self.family.experts_attr) and leaf in FUSED_PARAMS \
                    and disk_prefix + disk_key not in self.source.real_tensors:  # fused on disk too: GPT-OSS
                fused.add(head)
            else:
                wanted[key] = disk_prefix + disk_key
        key_of = {name: key for key, name in wanted.items()}
        ahead = self._claim(disk_prefix)
        with torch.no_grad():
            for name, tensor in self._tensors(key_of, ahead):
                state[key_of[name]].copy_(tensor.to(state[key_of[name]].dtype))
        read = self.stored(wanted.values())
        for head in sorted(fused):
            read |= self._fill_experts(module.get_submodule(head), disk_prefix + in_memory_key(self.family, head) + ".",
                                       ahead)
        return read

    def _fill_experts(self, experts_module: nn.Module, disk_experts_prefix: str,
                      ahead: dict[str, torch.Tensor] | None = None) -> set[str]:
        """Per-expert disk tensors copied one at a time into the fused parameters, through their canonical views
        (`read_expert_weights`): no stacked or concatenated copy of the layer is ever made."""
        views = read_expert_weights(self.family, experts_module)
        names = disk_expert_names(self.family, disk_experts_prefix, views.num_experts)
        with torch.no_grad():
            for name, tensor in self._tensors(names, ahead):
                role, expert = names[name]
                getattr(views, role)[expert].copy_(tensor)
        return self.stored(names)

    @staticmethod
    def release(module: nn.Module) -> None:
        module.to("meta")


def text_model(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers, the final norm and the embeddings (the text tower of a VLM)."""
    base = getattr(model, "model", model)
    if not hasattr(base, "layers") and hasattr(base, "language_model"):
        base = base.language_model
    return base


def final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(text_model(model), "norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__}")
    return norm


def fp32_tensors(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """Which tensors transformers keeps in float32 when it loads `model` in `dtype` (None: none of them).

    `from_pretrained` does (`_keep_in_fp32_modules_strict` in bfloat16 and float16, e.g. DeepSeek-V3's and GLM-4.5's
    `e_score_correction_bias`; `_keep_in_fp32_modules` in float16 only), `from_config` does not: the streaming
    skeleton and the MTP layers must, or a bfloat16 model routes with a rounded bias and writes rounded rows. The
    patterns are matched as transformers matches them (`*` any run, searched in the state-dict key)."""
    patterns = list(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in sorted(set(patterns))))


def keep_fp32(module: nn.Module, pattern: re.Pattern | None, prefix: str = "") -> None:
    """Turn `module`'s parameters and buffers whose key (`prefix` + name) matches `pattern` to float32 (on meta
    too: the loader then fills them with the source's values, uncast)."""
    if pattern is None:
        return
    persistent = set(module.state_dict())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.dtype == torch.float32 or not tensor.is_floating_point() or not pattern.search(prefix + name):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if isinstance(tensor, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(tensor.detach().float(), requires_grad=tensor.requires_grad))
        else:
            owner.register_buffer(leaf, tensor.float(), persistent=name in persistent)


def build_skeleton(hf_config, dtype, device: torch.device, loader: LayerLoader):
    """The model on meta with embeddings, rotary tables and the final norm real: enough to embed calibration
    tokens and, after the last layer, to feed MTP layers the normed trunk output. Tensors transformers keeps in
    float32 (`fp32_tensors`) are float32 here too."""
    from transformers import AutoModelForCausalLM

    implementation = Placement.of(device).experts_implementation(dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, experts_implementation=implementation)
    keep_fp32(model, fp32_tensors(model, dtype))
    base = model.model
    embed = base.get_input_embeddings()
    mtp = config_mtp_prefixes(loader.source.config, loader.source.weight_map)
    embed_name = next(n for n in loader.source.weight_map
                      if n.endswith("embed_tokens.weight") and not (mtp and n.startswith(mtp)))
    loader.fill(embed, embed_name[: -len("weight")])
    norm_prefix = embed_name[: -len("embed_tokens.weight")] + "norm."  # the trunk's final norm sits beside it
    if f"{norm_prefix}weight" in loader.source.weight_map:
        loader.fill(final_norm(model), norm_prefix)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:  # its tables are non-persistent buffers computed at construction
        with torch.device(device):
            base.rotary_emb = type(rotary)(config=rotary.config)
    return model


def fingerprint(source: SourceCheckpoint, settings: dict[str, Any]) -> str:
    """Identifies a job: the source (its Hub commit, config and tensor index) and every setting that changes the
    output."""
    digest = hashlib.sha256()
    if source.revision is not None:  # the same config and index at another commit may hold other weights
        digest.update(f"revision {source.revision}".encode())
    digest.update(json.dumps(source.config, sort_keys=True).encode())
    digest.update(json.dumps(sorted(source.weight_map.items())).encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


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
    def open(cls, folder: Path, job: str, resume: bool) -> WorkFolder:
        folder = Path(folder)
        cls.check(folder)
        folder.mkdir(parents=True, exist_ok=True)
        acquire_lock(folder / LOCK_NAME, f"work folder {folder}")
        work = cls(folder, job)
        try:
            if (folder / STATE_NAME).is_file():
                work._continue(resume)
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

    def _continue(self, resume: bool) -> None:
        state = self.read_state(self.folder)
        done = state.get("finished_layers")
        if state.get("job") != self.job:
            raise ValueError(
                f"found an unfinished run of a different source or settings in {self.folder} ({done} layers done); "
                "resume needs the same source and ReamConfig: run that command again with --resume, or delete that "
                "folder to start over"
            )
        if not resume:
            raise ValueError(
                f"found an unfinished run of this job in {self.folder} ({done} layers done); pass --resume "
                "(Python: resume=True) to continue it, or delete that folder to start over"
            )
        self.state = state
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
        temp = self.folder / (STATE_NAME + ".tmp")
        temp.write_text(json.dumps(self.state, indent=1), encoding="utf-8")
        os.replace(temp, self.folder / STATE_NAME)

    @property
    def finished_layers(self) -> int:
        return int(self.state["finished_layers"])

    def commit(self, finished_layers: int, parts: list[str], layer_entries: list[dict]) -> None:
        """Atomically record progress; everything it names was written before."""
        # copies: the caller's lists grow on (the MTP layers' entries) and must not leak into a later state write
        self.state.update(finished_layers=finished_layers, parts=list(parts), layers=list(layer_entries))
        self._write_state()

    def mark_saved(self, output: Path, manifest_digest: str) -> None:
        """Record, just before the output is moved into place, which output this job wrote: a run killed between
        that move and the removal of this folder is then recognised as complete (`saved_output`)."""
        self.state["saved"] = {"output": str(Path(output).resolve()), "manifest_sha256": manifest_digest}
        self._write_state()

    @classmethod
    def saved_output(cls, folder: Path, output: Path) -> bool:
        """Whether the work folder records that its job wrote `output`, and `output` is that very folder (its
        manifest's digest matches): only the removal of the work folder was left to do."""
        if not Path(folder).is_dir():
            return False
        state = cls.read_state(folder)
        saved = (state or {}).get("saved")
        if not saved or saved.get("output") != str(Path(output).resolve()):
            return False
        manifest = Path(output) / MANIFEST_NAME
        return manifest.is_file() and hashlib.sha256(manifest.read_bytes()).hexdigest() == saved.get("manifest_sha256")

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


class BackgroundWriter:
    """Threads that write files while the compute thread goes on, so a GPU never waits for the disk. Writes run
    in parallel (`workers`), except those submitted with `after_all=True` (a commit), which start once everything
    submitted before them is done. At most `max_pending_bytes` of submitted data wait at once (a submit beyond
    that waits for the oldest). A failed write is raised by the next `submit` or `flush` (the first failure, e.g.
    the OSError of a full disk, whichever write noticed it), and no later commit runs: nothing may be recorded as
    done after something it depends on failed."""

    def __init__(self, max_pending_bytes: int = WRITER_PENDING_BYTES, workers: int = 4) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ream-writer")
        self._pending: collections.deque[tuple[Future, int]] = collections.deque()
        self._pending_bytes = 0
        self._error: BaseException | None = None  # the first failure
        self._lock = threading.Lock()
        self.max_pending_bytes = max_pending_bytes
        self.busy_seconds = 0.0  # the writes' own time, summed over threads
        self.waited_seconds = 0.0  # the submitting thread's time blocked on the bound and in flush

    def _run(self, task: Callable[[], Any], earlier: list[Future]) -> Any:
        try:
            for future in earlier:  # submitted (so dequeued by a worker) before this one: no deadlock
                future.result()
            if self._error is not None:
                raise RuntimeError("skipped: an earlier background write failed")
            started = time.perf_counter()
            try:
                return task()
            finally:
                with self._lock:
                    self.busy_seconds += time.perf_counter() - started
        except BaseException as error:
            with self._lock:
                self._error = self._error or error
            raise

    def submit(self, task: Callable[[], Any], nbytes: int = 0, after_all: bool = False) -> Future:
        self._retire(lambda: self._pending and self._pending_bytes + nbytes > self.max_pending_bytes)
        earlier = [future for future, _ in self._pending] if after_all else []
        future = self._pool.submit(self._run, task, earlier)
        self._pending.append((future, nbytes))
        self._pending_bytes += nbytes
        return future

    def flush(self) -> None:
        """Wait for every submitted write."""
        self._retire(lambda: self._pending)

    def _retire(self, keep_waiting: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            self._retire_pending(keep_waiting)
        finally:
            self.waited_seconds += time.perf_counter() - started

    def _retire_pending(self, keep_waiting: Callable[[], Any]) -> None:
        while self._pending and (self._pending[0][0].done() or keep_waiting()):
            future, nbytes = self._pending[0]
            try:
                future.result()
            except BaseException:
                if self._error is not None:  # set before any future fails: the cause, not a write skipped for it
                    raise self._error from None
                raise
            finally:
                self._pending.popleft()
                self._pending_bytes -= nbytes

    def drain(self) -> None:
        """Wait for every submitted write without raising their failures: for a run ending on an error of its own,
        so that nothing writes into the work folder after it (a commit submitted before the error still lands)."""
        started = time.perf_counter()
        wait([future for future, _ in self._pending])
        self._pending.clear()
        self._pending_bytes = 0
        self.waited_seconds += time.perf_counter() - started

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def host_copy(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start copying a tensor to host memory without waiting: on CUDA into pinned memory, queued on the current
    stream after the kernels that produce it; returns what waits for the copy (to call from a writer thread)."""
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return lambda: tensor.contiguous()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> torch.Tensor:
        done.synchronize()
        return host

    return wait


def save_with_python_io(value: torch.Tensor, temp: Path) -> None:
    """torch.save through Python's file I/O: slower than torch's writer, but a failure is the OSError naming `temp`."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    try:
        with open(temp, "wb") as handle:
            handle.write(buffer.getbuffer())
    except OSError as error:  # a failed write() names no file
        raise OSError(error.errno, error.strerror, str(temp)) from None


class HiddenStateStore:
    """Calibration hidden states at one layer boundary, one file per batch (named by the batch's global number,
    so every rank of a distributed run writes its own batches into the same folder).

    Files make a run resumable; above the memory budget they are also the storage, read back memory-mapped one
    batch at a time, so RAM holds one batch instead of all of them. Files are written by a `BackgroundWriter`:
    `write` returns at once with the tensor itself (held in memory) or a Future of its memory-mapped file
    (spilled), which `Placement.feed` waits for; `flush` waits for all of them.
    """

    def __init__(self, folder: Path, in_memory: bool, writer: BackgroundWriter | None = None) -> None:
        self.folder, self.in_memory = Path(folder), in_memory
        self.writer = writer if writer is not None else BackgroundWriter()

    @staticmethod
    def generation_name(generation: int) -> str:
        return f"hidden-{generation:05d}"

    def path(self, generation: int, batch: int) -> Path:
        return self.folder / self.generation_name(generation) / f"{batch:06d}.pt"

    def write(self, generation: int, batch: int, tensor: torch.Tensor) -> torch.Tensor | Future:
        path = self.path(generation, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        host = host_copy(tensor)

        def save() -> torch.Tensor | None:
            value, temp = host(), path.with_suffix(".tmp")
            try:
                # torch's own file writer: C++ without the GIL, so the compute thread keeps launching work (serialising
                # into a BytesIO first halved the write rate and slowed a GPU's re-forward 3.7x, eval/bench_gpu.py)
                torch.save(value, temp)
            except RuntimeError:
                # it reports a failed write (full disk, quota, permission) without errno: write again with Python's
                # file I/O, which either succeeds or raises the OSError (ENOSPC, EDQUOT, EACCES) storage_errors reports
                save_with_python_io(value, temp)
            os.replace(temp, path)
            kill_point("hidden-written")
            return None if self.in_memory else self.read(generation, batch)

        future = self.writer.submit(save, tensor.numel() * tensor.element_size())
        return tensor if self.in_memory else future

    def flush(self) -> None:
        self.writer.flush()

    def read(self, generation: int, batch: int) -> torch.Tensor:
        return torch.load(self.path(generation, batch), mmap=True, weights_only=True)

    def read_batches(self, generation: int, batches: Iterable[int], device: torch.device) -> list[torch.Tensor]:
        """A resumed run's hidden states: on `device` when held in memory, else memory-mapped (fed to the device
        batch by batch)."""
        tensors = [self.read(generation, b) for b in batches]
        return [t.to(device, copy=True) for t in tensors] if self.in_memory else tensors

    def drop_before(self, generation: int) -> None:
        for old in self.folder.glob("hidden-*"):
            if int(old.name.split("-")[1]) < generation:
                shutil.rmtree(old, ignore_errors=True)
