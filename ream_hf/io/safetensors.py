"""The one safetensors reader: a folder's tensor index, shard headers (names, dtypes, shapes) and tensors.

Built on safetensors' own `safe_open`; headers are read without touching tensor data. Every error is a
ValueError naming the file, so callers can turn it into a one-line message.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import content_sha256

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 0.5}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # the safetensors dtype name ("F32", "BF16", "F8_E4M3", ...)
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape) * DTYPE_BYTES[self.dtype])

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"safetensors dtype {self.dtype} has no torch equivalent here")
        return TORCH_DTYPES[self.dtype]


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor name -> dtype and shape of one .safetensors file, without reading tensor data."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {name: TensorInfo(handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                    for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for missing or corrupt files
        raise ValueError(f"cannot read the safetensors header of {path}: {error}") from None


def read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read {index_path}: {error!r}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"cannot read {index_path}: its weight_map is not a mapping")
    return weight_map


def weight_map(folder: str | os.PathLike, shards_present: bool = True) -> dict[str, str]:
    """Tensor name -> shard file of a checkpoint folder (its index, or its single model.safetensors); refuses a
    folder without safetensors weights or (unless `shards_present` is False: still to download) with a shard its
    index names missing."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        names = read_index(index_path)
    elif (folder / SINGLE_NAME).is_file():
        names = dict.fromkeys(read_header(folder / SINGLE_NAME), SINGLE_NAME)
    else:
        raise ValueError(
            f"{folder} has no safetensors weights ({INDEX_NAME} or {SINGLE_NAME}); convert the checkpoint to "
            "safetensors first"
        )
    missing = sorted({f for f in names.values() if not (folder / f).is_file()}) if shards_present else []
    if missing:
        raise ValueError(f"{folder} is incomplete: shard {missing[0]} listed in its index is missing")
    return names


def tensor_names(folder: str | os.PathLike) -> list[str]:
    """Tensor names of a folder, leniently: its index, else the headers of whatever shards it holds (none is
    fine), for callers that only look (serving flags)."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        return list(read_index(folder / INDEX_NAME))
    return [name for shard in sorted(folder.glob("*.safetensors")) for name in read_header(shard)]


def tensor_infos(folder: str | os.PathLike, names_to_shards: dict[str, str] | None = None) -> dict[str, TensorInfo]:
    """Dtype and shape of every tensor of a checkpoint folder, each checked to be in the shard its index names."""
    folder = Path(folder)
    names_to_shards = names_to_shards if names_to_shards is not None else weight_map(folder)
    by_shard: dict[str, list[str]] = {}
    for name, shard in names_to_shards.items():
        by_shard.setdefault(shard, []).append(name)
    infos: dict[str, TensorInfo] = {}
    for shard, names in by_shard.items():
        header = read_header(folder / shard)
        for name in names:
            if name not in header:
                raise ValueError(f"tensor {name} listed in the index is not in {shard}")
            infos[name] = header[name]
    return infos


def open_shard(path: str | os.PathLike):
    """A shard opened for reading tensor data (`get_tensor`): every read of weights goes through here."""
    return safe_open(str(path), framework="pt")


def iter_tensors(folder: str | os.PathLike, names_to_shards: dict[str, str],
                 names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for `names`, grouped by shard with one shard open at a time."""
    by_shard: dict[str, list[str]] = {}
    for name in names:
        by_shard.setdefault(names_to_shards[name], []).append(name)
    for shard, shard_names in by_shard.items():
        with open_shard(Path(folder) / shard) as handle:
            for name in shard_names:
                yield name, handle.get_tensor(name)


def data_offset(path: str | os.PathLike) -> int:
    """Where a shard's tensor bytes begin: the spec allows no holes in the byte buffer, so it is the file size
    minus the tensors' bytes."""
    size = Path(path).stat().st_size
    return size - sum(info.nbytes for info in read_header(path).values())


def header_bytes(path: str | os.PathLike) -> bytes:
    """A shard's raw header (its 8-byte length and the JSON after it: names, dtypes, shapes, offsets, metadata)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"cannot read the safetensors header of {path}: the file is shorter than 8 bytes")
        (length,) = struct.unpack("<Q", head)
        body = handle.read(length)
    if len(body) < length:
        raise ValueError(f"cannot read the safetensors header of {path}: it is cut short")
    return head + body


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the digest the Hub shows for an LFS file)."""
    return content_sha256(Path(path))


def shard_digests(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every .safetensors file in `folder`, by file name: what the manifest records, so that a checkpoint
    is identified by its manifest (the evaluation cache's key) without reading its weights again."""
    return {path.name: file_sha256(path) for path in sorted(Path(folder).glob("*.safetensors"))}
