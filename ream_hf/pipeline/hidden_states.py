"""`HiddenStateStore`: the calibration hidden states at one layer boundary, held in memory up to a budget and
spilled to memory-mapped files beyond it, written in the background so that a run can resume from them."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

import torch

from ..kill_points import kill_point
from .background_writer import BackgroundWriter


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
