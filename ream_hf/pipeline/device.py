"""Where each tensor of a run lives and how it gets there: the one place that knows about devices.

Layers compute on `Placement.device` (cpu or cuda:N). The rest follows from it:
- calibration hidden states are held on that device while they fit `hidden_states_budget_gb`, otherwise in
  memory-mapped files on the host (and so are a resumed run's). A pass over them goes through `Placement.feed`,
  which brings batch b + 1 to the device in a background thread while batch b is being used: pinned host memory
  and a copy stream on CUDA, so spilled and resumed batches cost no synchronous copy; batches whose file is still
  being written (`HiddenStateStore`) are waited for there;
- the statistics pass's working-set sizes (`chunk_bytes`, `routed_bytes`, `alignment_bytes`): tuned to glibc's
  malloc on the CPU, large GEMMs on a GPU;
- its GEMM dtypes (`gemm`): float32 on the CPU; on CUDA the checkpoint's own bfloat16/float16 with float32
  results (see `ream_hf.method.stats.GemmPolicy` and eval/bench_precision.py for the measured error);
- the experts' implementation in the re-forward: transformers' `grouped_mm` on CUDA for bfloat16, eager (with
  `routed_forward`, pipeline/layer.py) elsewhere;
- whether the next layer's weights are read while this one computes (`prefetch_weights`: on CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..method.stats import CHUNK_BYTES_BUDGET, FLOAT32_GEMMS, ROUTED_BYTES_BUDGET, GemmPolicy, grouped_mm

logger = logging.getLogger(__name__)

# CUDA working sets: big enough that every GEMM runs at full rate (thousands of rows), small next to the layer
CUDA_CHUNK_BYTES = 2 * 2**30  # the (rows, E*2D) float32 gate/up block of the statistics pass
CUDA_ROUTED_BYTES = 1 * 2**30  # routed pairs' hidden rows per saliency window
CUDA_ALIGNMENT_BYTES = 1 * 2**30  # a group's activations on a chunk of the alignment sample
CPU_ALIGNMENT_BYTES = 24 * 2**20  # as CHUNK_BYTES_BUDGET: under glibc's mmap threshold
CUDA_MEMORY_FRACTION = 0.1  # at most this share of the GPU for one working set


def resolve_device(name: str | torch.device, local_rank: int | None = None) -> torch.device:
    """The device a process computes on: `cuda` means this process's GPU (LOCAL_RANK under torchrun)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
        index = device.index if device.index is not None else (local_rank or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    return device


@functools.cache
def _mm_float32_results(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.mm(a, b, out_dtype=float32)` runs here for `dtype` operands (CUDA, torch >= 2.8)."""
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.cache
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM runs here for `dtype` (CUDA sm80+/sm90 depending on torch, bfloat16)."""
    try:
        rows = torch.ones(32, 16, dtype=dtype, device=device)
        weights = torch.ones(2, 16, 16, dtype=dtype, device=device).transpose(1, 2)  # (E, in, out) as used: column-major
        return grouped_mm(rows, weights, torch.tensor([16, 32], dtype=torch.int32, device=device)).shape == (32, 16)
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        return False


@functools.cache
def _warn_float32_gemms(device: torch.device, dtype: torch.dtype) -> None:
    logger.warning("statistics GEMMs in float32 on %s: the weights are %s; a bfloat16 checkpoint (or --dtype "
                   "bfloat16) runs them on tensor cores, about 15x faster", device, str(dtype).removeprefix("torch."))


def memory_bytes(device: torch.device) -> int:
    """Total memory of a device: the GPU's, or the host's RAM for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def available_bytes(device: torch.device) -> int:
    """Memory free now: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return memory_bytes(device)


@dataclass(frozen=True)
class Placement:
    """The decisions above for one compute device."""

    device: torch.device

    @classmethod
    def of(cls, device: str | torch.device) -> Placement:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(device)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    # -- working sets and GEMMs of the statistics pass ----------------------------------------------
    def _cuda_budget(self, cap: int) -> int:
        return int(min(cap, CUDA_MEMORY_FRACTION * memory_bytes(self.device)))

    @property
    def chunk_bytes(self) -> int:
        return self._cuda_budget(CUDA_CHUNK_BYTES) if self.is_cuda else CHUNK_BYTES_BUDGET

    @property
    def routed_bytes(self) -> int:
        return self._cuda_budget(CUDA_ROUTED_BYTES) if self.is_cuda else ROUTED_BYTES_BUDGET

    @property
    def alignment_bytes(self) -> int:
        return self._cuda_budget(CUDA_ALIGNMENT_BYTES) if self.is_cuda else CPU_ALIGNMENT_BYTES

    def gemm(self, weight_dtype: torch.dtype) -> GemmPolicy:
        """float32 on the CPU (exact, and the CPU has no faster GEMM that keeps float32 results). On CUDA a
        bfloat16/float16 checkpoint's own dtype: tensor-core GEMMs on the very values the checkpoint holds, with
        float32 results where torch offers them, and grouped GEMMs for saliency where they run. A float32
        checkpoint keeps float32 GEMMs everywhere (rounding its weights would change what is measured)."""
        if not self.is_cuda:
            return FLOAT32_GEMMS
        if weight_dtype not in (torch.bfloat16, torch.float16):
            _warn_float32_gemms(self.device, weight_dtype)
            return FLOAT32_GEMMS
        result = torch.float32 if _mm_float32_results(self.device, weight_dtype) else weight_dtype
        return GemmPolicy(weight_dtype, result, grouped=_grouped_mm_runs(self.device, weight_dtype))

    def experts_implementation(self, dtype: torch.dtype) -> str:
        """transformers' experts implementation for the re-forward: `grouped_mm` (one grouped GEMM per
        projection, deterministic) on CUDA where it runs, else eager (replaced on the CPU by `routed_forward`,
        pipeline/layer.py, which is bit-identical to it and faster)."""
        return "grouped_mm" if self.is_cuda and _grouped_mm_runs(self.device, dtype) else "eager"

    @property
    def prefetch_weights(self) -> bool:
        """Read the next layer's weights from disk while this one computes: on a GPU the host is idle meanwhile;
        on the CPU the read would take compute threads and a second layer of RAM."""
        return self.is_cuda

    def synchronize(self) -> None:
        """Wait for queued kernels, so stage timings measure the work and not its launch."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    # -- hidden states --------------------------------------------------------------------------------
    def resident(self, item) -> bool:
        return isinstance(item, torch.Tensor) and item.device == self.device

    def feed(self, items: Sequence) -> Iterator[torch.Tensor]:
        """items[0], items[1], ... on the device, in order. A list's next item is staged (its pending write
        waited for, pinned and copied on a side stream) in a background thread while the current one is used;
        other sequences (computed on access, e.g. MTP inputs) are read in this thread."""
        count = len(items)
        if not isinstance(items, list):
            for index in range(count):
                yield self.fetch(items[index])
            return
        if all(self.resident(item) for item in items):
            for index in range(count):
                yield items[index]
            return
        stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        with ThreadPoolExecutor(1, thread_name_prefix="ream-feed") as pool:
            staged = pool.submit(self._stage, items[0], stream) if count else None
            for index in range(count):
                ready = staged.result()
                if index + 1 < count:
                    staged = pool.submit(self._stage, items[index + 1], stream)
                yield self._finish(ready)

    def fetch(self, item) -> torch.Tensor:
        """One item on the device, now."""
        return self._finish(self._stage(item, None))

    def _stage(self, item, stream):
        if isinstance(item, Future):
            item = item.result()  # written to its spill file; the store gives back the memory-mapped tensor
        if self.resident(item) or not self.is_cuda:
            return item, None
        host = item if item.is_pinned() else item.pin_memory()
        # a new thread's current CUDA device is 0: name ours, and the side stream when staging ahead
        with torch.cuda.device(self.device), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            moved = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return moved, done

    def _finish(self, staged) -> torch.Tensor:
        tensor, done = staged
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            tensor.record_stream(current)  # allocated on the side stream, used on this one
        return tensor

