"""Reading a source checkpoint and writing the compressed one, in the source's own tensor names.

The output is the source checkpoint with MoE expert and router tensors replaced: every other tensor
(attention, norms, embeddings, a vision tower, MTP layers left alone) is copied through bit-exact,
and expert tensors keep the source's naming (per-expert `experts.{i}.gate_proj.weight` or fused
`experts.gate_up_proj`), renumbered 0..k-1. config.json is edited as JSON so the source's keys stay.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import EXPERT_COUNT_KEYS, MoEFamily, text_config_dict
from .experts import ExpertWeights, fused_expert_params

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MANIFEST_NAME = "ream_manifest.json"
NOT_COPIED = {"config.json", INDEX_NAME, "README.md", ".gitattributes"}
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")

# <prefix><layer>.<block>.experts.<expert>.<proj>.<param>  |  <prefix><layer>.<block>.experts.<fused>
_PER_EXPERT = re.compile(r"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<block>\w+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.(?P<param>weight|bias)$")
_FUSED = re.compile(r"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<block>\w+)\.experts\.(?P<param>gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias)$")
_ROUTER = re.compile(r"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<block>\w+)\.(?P<router>gate|router)\.(?P<param>\w+)$")


@dataclass(frozen=True)
class MoETensorName:
    prefix: str  # e.g. "model.layers." or "model.language_model.layers." or "mtp.layers."
    layer: int
    block: str
    kind: str  # "expert" | "fused" | "router"
    expert: int | None
    proj: str | None
    param: str

    @property
    def layer_key(self) -> str:
        """Identifies the layer across trunk and MTP: prefix + index."""
        return f"{self.prefix}{self.layer}"


def parse_moe_name(family: MoEFamily, name: str) -> MoETensorName | None:
    if ".experts." in name:
        if m := _PER_EXPERT.match(name):
            if m["proj"] in family.disk_proj_names.values():
                return MoETensorName(m["prefix"], int(m["layer"]), m["block"], "expert", int(m["expert"]), m["proj"], m["param"])
            return None  # e.g. a shared expert's weights that happen to sit under "experts"
        if m := _FUSED.match(name):
            return MoETensorName(m["prefix"], int(m["layer"]), m["block"], "fused", None, None, m["param"])
        return None
    if (m := _ROUTER.match(name)) and m["router"] == family.router_attr and m["param"] in family.router_tensors:
        return MoETensorName(m["prefix"], int(m["layer"]), m["block"], "router", None, None, m["param"])
    return None


class SourceCheckpoint:
    """A local checkpoint folder: its config.json as written, and which shard holds each tensor."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{self.folder} has no config.json; give a Hugging Face model folder or Hub id")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {config_path}: {error}") from None

    @functools.cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file; read on first use so config-level errors are reported first."""
        index_path = self.folder / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as error:
                raise ValueError(f"cannot read {index_path}: {error!r}") from None
        elif (self.folder / SINGLE_NAME).is_file():
            try:
                with safe_open(self.folder / SINGLE_NAME, framework="pt") as handle:
                    weight_map = {name: SINGLE_NAME for name in handle.keys()}
            except Exception as error:  # safetensors raises its own error type for corrupt headers
                raise ValueError(f"cannot read {self.folder / SINGLE_NAME}: {error}") from None
        else:
            raise ValueError(
                f"{self.folder} has no safetensors weights ({INDEX_NAME} or {SINGLE_NAME}); convert the checkpoint "
                "to safetensors first"
            )
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise ValueError(f"{self.folder} is incomplete: shard {missing[0]} listed in its index is missing")
        return weight_map

    def iter_tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for `names`, grouped by shard with one shard open at a time."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        for shard, shard_names in by_shard.items():
            with safe_open(self.folder / shard, framework="pt") as handle:
                for name in shard_names:
                    yield name, handle.get_tensor(name)


_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class LayerOutput:
    """What replaces one MoE layer's expert and router tensors on disk."""

    experts: ExpertWeights  # canonical, k experts
    router: dict[str, torch.Tensor]  # router tensor name ("weight", "bias", "e_score_correction_bias") -> (k, ...)


def disk_expert_tensors(family: MoEFamily, source_name: MoETensorName, output: LayerOutput) -> dict[str, str | torch.Tensor]:
    """Output expert tensors for a layer, named like the source names that layer's experts."""
    base = f"{source_name.prefix}{source_name.layer}.{source_name.block}.experts."
    if source_name.kind == "fused":
        return {base + name: tensor for name, tensor in fused_expert_params(family, output.experts).items()}
    tensors: dict[str, torch.Tensor] = {}
    role_tensors = {"gate": output.experts.gate, "up": output.experts.up, "down": output.experts.down}
    for expert in range(output.experts.num_experts):
        for role, proj in family.disk_proj_names.items():
            tensors[f"{base}{expert}.{proj}.weight"] = role_tensors[role][expert]
    return tensors


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
        save_file(tensors, str(temp), metadata={"format": "pt"})
        os.replace(temp, self.folder / name)
        self.parts.append(name)


def finalize_parts(parts_folder: Path, parts: list[str], output: Path) -> dict[str, str]:
    """Link (or copy) parts into `output` as model-0000i-of-0000n.safetensors and write the index."""
    weight_map: dict[str, str] = {}
    total = 0
    for number, part in enumerate(parts, 1):
        final = f"model-{number:05d}-of-{len(parts):05d}.safetensors"
        try:  # a link keeps the work folder intact until the output is in place (a failed save loses nothing)
            os.link(parts_folder / part, output / final)
        except OSError:  # another filesystem
            shutil.copy2(parts_folder / part, output / final)
        if parts_folder == output:
            os.remove(parts_folder / part)
        os.chmod(output / final, 0o644)  # safetensors writes 0600; checkpoints are meant to be shared
        with safe_open(output / final, framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                total += math.prod(piece.get_shape()) * torch.empty(0, dtype=_DTYPES[piece.get_dtype()]).element_size()
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


def group_tensors(source: SourceCheckpoint, family: MoEFamily, names: list[str],
                  outputs: dict[str, LayerOutput]) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensors for a group of source names: copied as they are, or replaced for compressed layers."""
    emitted_layers: set[str] = set()
    handles = {shard: safe_open(source.folder / shard, framework="pt") for shard in {source.weight_map[n] for n in names}}
    try:
        for name in names:
            handle = handles[source.weight_map[name]]
            parsed = parse_moe_name(family, name)
            output = outputs.get(parsed.layer_key) if parsed else None
            if output is None:
                yield name, handle.get_tensor(name)
                continue
            dtype = _DTYPES[handle.get_slice(name).get_dtype()]
            if parsed.kind == "router":
                yield name, output.router[parsed.param].to(dtype)
            elif parsed.layer_key not in emitted_layers:
                emitted_layers.add(parsed.layer_key)
                for out_name, tensor in disk_expert_tensors(family, parsed, output).items():
                    yield out_name, tensor.to(dtype)
    finally:
        handles.clear()


def edit_config_json(
    source_config: dict[str, Any], family: MoEFamily, num_experts: int, ream_config: dict[str, Any],
    mtp_layers: int | None = None,
) -> dict[str, Any]:
    """The source config.json with only the expert count (and MTP count when dropped) changed."""
    edited = json.loads(json.dumps(source_config))
    text = text_config_dict(edited)
    changed = False
    for key in EXPERT_COUNT_KEYS:
        if key in text and text[key]:
            text[key] = num_experts
            changed = True
    if not changed:
        text[family.expert_count_keys[0]] = num_experts
    if mtp_layers is not None and family.mtp_layers_key:
        text[family.mtp_layers_key] = mtp_layers
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


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    output = Path(output_dir)
    if output.exists() and not overwrite:
        raise ValueError(f"output folder {output} already exists; choose another or pass --overwrite")
    if output.exists() and not output.is_dir():
        raise ValueError(f"output path {output} exists and is not a folder")
    return output


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder renamed into place only if the block finishes: a crash leaves no output."""
    output = check_output_dir(output_dir, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.parent / f".{output.name}.ream-tmp-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if output.exists():
        trash = output.parent / f".{output.name}.ream-old-{os.getpid()}"
        os.replace(output, trash)
        os.replace(temp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(temp, output)
