"""Scores cached per (model hash, task, settings): a model is identified by all of its bytes, through the shard digests
its manifest records (hashed whole, once, where there are none)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from ...io import safetensors as st
from ...io.names import MANIFEST_NAME

logger = logging.getLogger(__name__)


def sha256_file(path: Path, hasher=None):
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher


_HASHED_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
                      "chat_template.json", "tokenizer.json", "model.safetensors.index.json", MANIFEST_NAME)
_DIGEST_MEMO = "shard-digests.json"


def model_hash(model_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 identifying a checkpoint by every byte of it that a score depends on.

    Covers config.json, the generation/tokenizer/chat-template files, the safetensors index, `ream_manifest.json`,
    every shard's raw header (names, dtypes, shapes, offsets) and size, and every shard's content digest. A ream-hf
    output's manifest records those digests (`shards`, written with the shards), so it is identified without reading
    its weights; a folder without them (a source model) has its shards hashed whole, once: the digests are kept in
    `cache_dir` by path, size, modification time and inode. (Sampled bytes are not enough: two outputs that differ
    in one expert's rows outside the samples would share cached scores.)
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a model folder)")
    hasher = hashlib.sha256(b"ream-hf model hash v3\0")
    for name in _HASHED_SIDE_FILES:
        path = folder / name
        if path.is_file():
            hasher.update(name.encode() + b"\0")
            sha256_file(path, hasher)
    shards = sorted(folder.glob("*.safetensors"))
    digests = _recorded_digests(folder, [shard.name for shard in shards]) or _content_digests(shards, cache_dir)
    for shard in shards:
        hasher.update(f"{shard.name}\0{shard.stat().st_size}\0{digests[shard.name]}\0".encode())
        hasher.update(st.header_bytes(shard))
    return hasher.hexdigest()


def _recorded_digests(folder: Path, names: list[str]) -> dict[str, str] | None:
    """The shard digests the manifest recorded when it wrote `names`, or None (no manifest, or not for these files)."""
    try:
        recorded = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("shards")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, dict) or sorted(recorded) != names:
        return None
    return {name: str(recorded[name]) for name in names}


def _content_digests(shards: list[Path], cache_dir: str | os.PathLike | None) -> dict[str, str]:
    """Each shard's sha256, hashed whole unless `cache_dir`'s memo has it for the same path, size, mtime and inode."""
    memo_path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / _DIGEST_MEMO
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    digests, changed = {}, False
    for shard in shards:
        stat = shard.stat()
        identity = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = memo.get(str(shard.resolve()))
        if isinstance(entry, dict) and entry.get("identity") == identity and isinstance(entry.get("sha256"), str):
            digests[shard.name] = entry["sha256"]
            continue
        logger.info("hashing %s (once: kept in %s)", shard, memo_path)
        digests[shard.name] = st.file_sha256(shard)
        memo[str(shard.resolve())] = {"identity": identity, "sha256": digests[shard.name]}
        changed = True
    if changed:
        try:
            cache_write(memo_path, memo)
        except OSError as error:  # a read-only cache only costs hashing again
            logger.warning("cannot keep shard digests in %s: %s", memo_path, error)
    return digests


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


