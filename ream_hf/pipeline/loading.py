"""Reading a module's weights from the source shards: `LayerLoader` (one layer at a time, prefetched one ahead) and
the NaN/inf check every tensor it reads passes.

Models larger than RAM are compressed one decoder layer in memory at a time: the model is built on the meta device
(`skeleton.py`), each decoder layer is filled from the source shards by the loader (only its own tensors), compressed,
written out and dropped back to meta.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ..arch import FUSED_PARAMS, MoEFamily, disk_expert_names, fused_as_stored, in_memory_key, read_expert_weights
from ..io.source import SourceCheckpoint


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
                if key_of[name].rpartition(".")[2] in FUSED_PARAMS:  # fused on disk, maybe transposed
                    tensor = fused_as_stored(tensor, tuple(state[key_of[name]].shape))
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
