"""Scores cached per (model hash, task, settings): a model is identified cheaply, never by hashing whole weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from ...io import safetensors as st

logger = logging.getLogger(__name__)


def sha256_file(path: Path, hasher=None):
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher


_HASHED_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
                      "chat_template.json", "tokenizer.json", "model.safetensors.index.json")
_SAMPLES_PER_SHARD = 16
_SAMPLE_BYTES = 64 << 10


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 identifying a checkpoint cheaply (never the whole weights).

    Covers config.json, the generation/tokenizer/chat-template files, the safetensors index and every
    shard's header (names, dtypes, shapes), plus 16 evenly spaced 64 KiB samples of each shard's
    data: two compressions with the same shapes (e.g. REAM and REAP at the same expert count) have
    identical headers, and the samples tell them apart for at most 1 MiB read per shard.
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a model folder)")
    hasher = hashlib.sha256(b"ream-hf model hash v2\0")
    for name in _HASHED_SIDE_FILES:
        path = folder / name
        if path.is_file():
            hasher.update(name.encode() + b"\0")
            sha256_file(path, hasher)
    for shard in sorted(folder.glob("*.safetensors")):
        hasher.update(shard.name.encode() + b"\0")
        size = shard.stat().st_size
        hasher.update(str(size).encode() + b"\0")
        header = {name: [info.dtype, list(info.shape)] for name, info in st.read_header(shard).items()}
        hasher.update(json.dumps(header, sort_keys=True).encode())
        start = st.data_offset(shard)
        span = size - start
        if span > 0:
            step = max(span // _SAMPLES_PER_SHARD, 1)
            with open(shard, "rb") as handle:
                for offset in range(start, size, step)[:_SAMPLES_PER_SHARD]:
                    handle.seek(offset)
                    hasher.update(handle.read(_SAMPLE_BYTES))
    return hasher.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("REAM_HF_EVAL_CACHE") or Path.home() / ".cache" / "ream-hf" / "eval")


def cache_key(model_digest: str, task: str, task_settings: Mapping[str, Any]) -> str:
    blob = json.dumps({"model": model_digest, "task": task, "settings": task_settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(cache_dir: Path, model_digest: str, task: str, key: str) -> Path:
    return cache_dir / model_digest[:16] / f"{task}-{key[:24]}.json"


def cache_read(path: Path, key: str) -> dict | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if entry.get("key") == key and isinstance(entry.get("score"), (int, float)) else None


def cache_write(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


