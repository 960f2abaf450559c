"""Writing the compressed checkpoint, in the source's own tensor names, atomically.

The output is the source checkpoint with MoE expert and router tensors replaced: every other tensor
(attention, norms, embeddings, a vision tower, MTP layers left alone) is copied through bit-exact,
and expert tensors keep the source's naming (per-expert `experts.{i}.gate_proj.weight` or fused
`experts.gate_up_proj`), renumbered 0..k-1. config.json is edited as JSON so the source's keys stay.
A quantized source (io/quantization.py) is written in its own format by default: kept experts with their own
stored bytes and scales, merged ones quantized afresh; or dequantized to a chosen dtype.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..arch import (ExpertWeights, MoEFamily, MoETensorName, disk_expert_name, disk_expert_names, disk_expert_tensors,
                    fused_as_stored, parse_moe_name, set_expert_count)
from . import safetensors as st
from .names import WEIGHTS_PREFIX
from .quantization import Fp8BlockOutput, dequantized_config
from .source import SourceCheckpoint

logger = logging.getLogger(__name__)

INDEX_NAME, SINGLE_NAME = st.INDEX_NAME, st.SINGLE_NAME
NOT_COPIED = {"config.json", INDEX_NAME, "README.md", ".gitattributes"}
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
# the projections a fused expert tensor holds
FUSED_ROLES = {"gate_up_proj": ("gate", "up"), "gate_up_proj_bias": ("gate", "up"), "down_proj": ("down",),
               "down_proj_bias": ("down",)}


@dataclass
class LayerOutput:
    """What replaces one MoE layer's expert and router tensors on disk."""

    experts: ExpertWeights  # canonical, k experts
    router: dict[str, torch.Tensor]  # router tensor name ("weight", "bias", "e_score_correction_bias") -> (k, ...)
    centroids: list[int] | None = None  # the source expert output expert j stands for (its router row's source)
    # per output expert j, the projections ("gate", "up", "down") that are source expert centroids[j]'s as they are:
    # their stored tensors are copied byte for byte (a quantized source's bytes and scales); the others are written
    # afresh
    copy_stored_bytes: list[frozenset[str]] | None = None

    def copies_stored(self, j: int, roles: Iterable[str]) -> bool:
        """Whether output expert j's `roles` are all its centroid's, unchanged: written as the source stores them."""
        return self.copy_stored_bytes is not None and set(roles) <= self.copy_stored_bytes[j]


class PartWriter:
    """Writes tensor groups (a layer, or the rest) into size-capped part files, each renamed into place.

    Parts are numbered in writing order; `finalize_parts` renames them to transformers' shard names and
    writes the index. Streaming and in-memory runs write the same groups in the same order, so their
    files are byte-identical, and a resumed run continues with the next part number.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, parts: list[str] | None = None):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.parts: list[str] = list(parts or [])

    def write_group(self, items: Iterator[tuple[str, torch.Tensor]]) -> None:
        pending: dict[str, torch.Tensor] = {}
        size = 0
        for name, tensor in items:
            nbytes = tensor.numel() * tensor.element_size()
            if pending and size + nbytes > self.max_shard_bytes:
                self._flush(pending)
                pending, size = {}, 0
            pending[name] = tensor.detach().contiguous().cpu()
            size += nbytes
        if pending:
            self._flush(pending)

    def _flush(self, tensors: dict[str, torch.Tensor]) -> None:
        name = f"part-{len(self.parts):05d}.safetensors"
        temp = self.folder / (name + ".tmp")
        try:
            save_file(tensors, str(temp), metadata={"format": "pt"})
        except SafetensorError as error:
            raise as_os_error(error, temp) from None
        os.replace(temp, self.folder / name)
        self.parts.append(name)


def as_os_error(error: Exception, path: Path) -> Exception:
    """safetensors' writer reports a failed write as SafetensorError("... (os error 28) ..."): the OSError it was,
    naming `path`, so callers handle a full disk the same way whichever library wrote."""
    found = re.search(r"os error (\d+)", str(error))
    if found is None:
        return error
    code = int(found[1])
    return OSError(code, os.strerror(code), str(path))


def finalize_parts(parts_folder: Path, parts: list[str], output: Path) -> dict[str, str]:
    """Link (or copy) parts into `output` as model-0000i-of-0000n.safetensors and write the index."""
    weight_map: dict[str, str] = {}
    total = 0
    for number, part in enumerate(parts, 1):
        final = f"{WEIGHTS_PREFIX}-{number:05d}-of-{len(parts):05d}.safetensors"
        try:  # a link keeps the work folder intact until the output is in place (a failed save loses nothing)
            os.link(parts_folder / part, output / final)
        except OSError:  # another filesystem
            shutil.copy2(parts_folder / part, output / final)
        if parts_folder == output:
            os.remove(parts_folder / part)
        os.chmod(output / final, 0o644)  # safetensors writes 0600; checkpoints are meant to be shared
        for name, info in st.read_header(output / final).items():
            total += info.nbytes
            weight_map[name] = final
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (output / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return weight_map


def output_groups(source: SourceCheckpoint, trunk_prefix: str, num_layers: int,
                  drop_prefixes: tuple[str, ...] = ()) -> list[list[str]]:
    """Source tensor names per output group: each trunk layer in order, then everything else."""
    groups: list[list[str]] = [[] for _ in range(num_layers + 1)]
    for name in source.weight_map:
        if drop_prefixes and name.startswith(drop_prefixes):
            continue
        index = _trunk_layer(name, trunk_prefix)
        groups[index if index is not None and index < num_layers else num_layers].append(name)
    return groups


def _trunk_layer(name: str, trunk_prefix: str) -> int | None:
    if not name.startswith(trunk_prefix):
        return None
    head = name[len(trunk_prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


class _StoredReader:
    """The source's stored tensors by name, each shard opened once, when first needed."""

    def __init__(self, source: SourceCheckpoint) -> None:
        self.source, self.handles = source, {}

    def get(self, name: str) -> torch.Tensor:
        shard = self.source.weight_map[name]
        if shard not in self.handles:
            self.handles[shard] = st.open_shard(self.source.folder / shard)
        return self.handles[shard].get_tensor(name)

    def real(self, name: str) -> torch.Tensor:
        stored = self.source.real_tensors[name]
        if len(stored) == 1:
            return self.get(name)
        return self.source.quantization.dequantize(name, {s: self.get(s) for s in stored})


class _Encoder:
    """Output tensors of compressed layers in the source's storage: plain in the source's dtype, quantized in the
    source's format (unchanged experts with their own stored bytes and scales, others quantized afresh), or, with
    `dequantize_to`, quantized ones dequantized to that dtype."""

    def __init__(self, source: SourceCheckpoint, reader: _StoredReader, dequantize_to: torch.dtype | None) -> None:
        self.source, self.reader, self.dequantize_to = source, reader, dequantize_to
        self.fmt, self.reals, self.infos = source.quantization, source.real_tensors, source.tensor_infos

    def encode(self, out_name: str, tensor: torch.Tensor, template: str,
               copy: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """`tensor` under `out_name`, stored as the source stores `template` (the source tensor it stands for);
        `copy`: it is `template` unchanged, so the source's stored tensors are written as they are."""
        stored = self.reals[template]
        if len(stored) == 1:
            yield out_name, self.reader.get(template) if copy else tensor.to(self.infos[template].torch_dtype)
        elif self.dequantize_to is not None:
            yield out_name, (self.reader.real(template) if copy else tensor).to(self.dequantize_to)
        elif copy:
            for name, out in zip(stored, self.fmt.stored_layout(out_name)):
                yield out, self.reader.get(name)
        else:
            yield from self.fmt.quantize(out_name, tensor, self.infos).items()

    def encode_fused(self, out_name: str, tensor: torch.Tensor, output: LayerOutput) -> Iterator[tuple[str, torch.Tensor]]:
        """A fused (experts first) tensor: quantized per expert, unchanged experts' rows copied from the source."""
        stored = self.reals[out_name]
        if len(stored) == 1 or self.dequantize_to is not None:
            yield from self.encode(out_name, tensor, out_name, copy=False)
            return
        fresh = self.fmt.quantize(out_name, tensor, self.infos)
        roles = FUSED_ROLES[out_name.rpartition(".")[2]]
        for name, out in zip(stored, self.fmt.stored_layout(out_name)):
            source_tensor = None
            for j in range(tensor.shape[0]):
                if output.copies_stored(j, roles):
                    source_tensor = self.reader.get(name) if source_tensor is None else source_tensor
                    fresh[out][j] = source_tensor[output.centroids[j]]
            yield out, fresh[out]

    def layer_experts(self, family: MoEFamily, parsed: MoETensorName,
                      output: LayerOutput) -> Iterator[tuple[str, torch.Tensor]]:
        prefix = parsed.experts_prefix
        if parsed.kind == "fused":
            for out_name, tensor in disk_expert_tensors(family, prefix, output.experts, fused=True).items():
                stored = fused_as_stored(tensor, tuple(self.infos[self.reals[out_name][0]].shape))
                yield from self.encode_fused(out_name, stored, output)
            return
        for out_name, (role, j) in disk_expert_names(family, prefix, output.experts.num_experts).items():
            centroid = output.centroids[j] if output.centroids is not None else j
            template = disk_expert_name(family, prefix, centroid, role)
            copy = output.copies_stored(j, (role,))
            yield from self.encode(out_name, getattr(output.experts, role)[j], template, copy)


def output_tensors(source: SourceCheckpoint, family: MoEFamily, names: list[str], outputs: dict[str, LayerOutput],
                  dequantize_to: torch.dtype | None = None,
                  quantize: Fp8BlockOutput | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensors for a group of source names: copied as they are, or replaced for compressed layers.

    For a quantized source, `dequantize_to` None writes its own format (tensors the method leaves alone copied
    bit-exact with their scales); a dtype writes every quantized tensor dequantized to it, and no scale. `quantize`
    (a plain source, output_dtype "fp8") writes the tensors it names FP8 block-wise, each as it is emitted."""
    tensors = _stored_tensors(source, family, names, outputs, dequantize_to)
    return tensors if quantize is None else quantize.encode(tensors)


def _stored_tensors(source: SourceCheckpoint, family: MoEFamily, names: list[str], outputs: dict[str, LayerOutput],
                    dequantize_to: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """`output_tensors` in the source's own storage."""
    fmt, reals = source.quantization, source.real_tensors
    if fmt is not None and dequantize_to is None and not fmt.writes_back:
        raise ValueError(f"{fmt.quant_method} checkpoints cannot be written back in their format; pass output_dtype")
    reader = _StoredReader(source)
    encoder = _Encoder(source, reader, dequantize_to)
    emitted_layers: set[str] = set()
    try:
        for name in names:
            real = fmt.real_name(name) if fmt is not None else name
            parsed = parse_moe_name(family, real)
            output = outputs.get(parsed.layer_key) if parsed else None
            bulk = name == reals[real][0]  # the tensor a quantized real one is emitted with (its scales follow it)
            if output is None:
                if dequantize_to is None or len(reals[real]) == 1:
                    yield name, reader.get(name)
                elif bulk:
                    yield real, reader.real(real).to(dequantize_to)
            elif parsed.kind == "router":
                if bulk:
                    yield from encoder.encode(real, output.router[parsed.param], real, copy=False)
            elif parsed.layer_key not in emitted_layers:
                emitted_layers.add(parsed.layer_key)
                yield from encoder.layer_experts(family, parsed, output)
    finally:
        reader.handles.clear()


def edit_config_json(
    source_config: dict[str, Any], family: MoEFamily, num_experts: int, ream_config: dict[str, Any],
    mtp_layers: int | None = None, dequantized_dtype: str | None = None, quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The source config.json with only the expert count (and MTP count when dropped) changed and the settings
    recorded under `ream_config` (ours never as `quantization_config`: transformers and vLLM would ask for a
    plug-in). A quantized source's own `quantization_config` stays, unless the output is dequantized
    (`dequantized_dtype`), which removes it and records that dtype; `quantization` is the FP8 output's."""
    edited = json.loads(json.dumps(source_config))
    if dequantized_dtype is not None:
        edited = dequantized_config(edited, dequantized_dtype)
    if quantization is not None:
        edited["quantization_config"] = quantization
    set_expert_count(family, edited, num_experts, mtp_layers)
    edited["ream_config"] = ream_config
    return edited


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_side_files(source_folder: Path, output: Path) -> list[str]:
    """Tokenizer, generation config, chat template, custom code...: everything that is not weights or config."""
    copied = []
    for item in sorted(source_folder.iterdir()):
        if item.name.startswith(".") or item.name in NOT_COPIED or item.suffix in NOT_COPIED_SUFFIXES:
            continue
        if item.is_file():
            shutil.copy2(item, output / item.name)
            copied.append(item.name)
    return copied
