"""The source checkpoint: a local folder or a Hub repo id, its config.json as written, and its tensor index."""

from __future__ import annotations

import copy
import functools
import glob
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import NATIVE_ARCHITECTURES, TEXT_ARCHITECTURES
from . import safetensors as st
from .names import looks_like_hub_id
from .quantization import QuantizedFormat, read_quantization, real_tensor_names

logger = logging.getLogger(__name__)

# files beside the weights that a compressed checkpoint carries on (tokenizer, chat template, generation config,
# custom code), taken from the top of a Hub repo only: sub-folders hold other formats (`original/`, GGUF, ...)
SIDE_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py", ".tiktoken")


def open_source(model_path: str | os.PathLike, revision: str | None = None) -> SourceCheckpoint:
    """A local checkpoint folder as it is, or a Hub repo id at `revision` (branch, tag or commit; default the main
    branch): its config, index and side files downloaded now, its weight shards by `SourceCheckpoint.fetch_weights`
    once every refusal is past (`HubDownload`)."""
    path = Path(model_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"source {model_path} is a file; give a model folder or a Hub repo id")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"source folder {model_path} is not readable")
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to Hub repo ids; {model_path} is a local folder")
        return SourceCheckpoint(path)
    if not looks_like_hub_id(model_path):
        raise ValueError(f"source {model_path} is neither a local folder nor a Hub repo id (owner/name)")
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1: whatever the cache holds for that revision
        try:
            folder = Path(snapshot_download(str(model_path), revision=revision))
        except Exception as error:
            raise _hub_error(str(model_path), revision, error) from None
        return SourceCheckpoint(folder, revision=folder.name)  # the cache's snapshots/<commit>
    download = HubDownload.plan(str(model_path), revision)
    folder = download.fetch(download.side_files)
    fetch_weights = (lambda: download.fetch(download.shards)) if download.shards else None
    return SourceCheckpoint(folder, revision=download.commit, fetch_weights=fetch_weights)


@dataclass
class HubDownload:
    """What compression reads from a Hub model repo, all from one commit (the one `revision` pointed to when the
    download began), into the Hub cache.

    Only the weights the index names are fetched (or the single `model.safetensors`): repos that also hold a second
    full copy (`original/`, `consolidated.safetensors`) cost no extra download; side files come from the top of the
    repo only. Progress is huggingface_hub's (per file and in total). Finished files stay in the cache, so a download
    interrupted by a crash or a kill continues with the files it lacks when run again (the file it was writing
    starts over: huggingface_hub 2.x keeps no partial file between runs), and a connection dropped mid-file is
    resumed from the bytes received (range requests, huggingface_hub's retries)."""

    repo_id: str
    revision: str | None
    commit: str
    sizes: dict[str, int]  # every file of the repo at that commit
    shards: list[str]
    side_files: list[str]  # config, index, tokenizer, chat template, generation config, custom code

    @classmethod
    def plan(cls, repo_id: str, revision: str | None = None) -> HubDownload:
        """The repo's file list and index (a few kB); refuses a repo without safetensors weights or with an
        incomplete index."""
        from huggingface_hub import HfApi, hf_hub_download

        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
            index = st.read_index(Path(hf_hub_download(repo_id, st.INDEX_NAME, revision=info.sha))) \
                if st.INDEX_NAME in sizes else None
        except Exception as error:  # the Hub raises many types, several lines long; the user needs one line
            raise _hub_error(repo_id, revision, error) from None
        where = f"{repo_id}@{revision}" if revision else repo_id
        if index is not None:
            shards = sorted(set(index.values()))
        elif st.SINGLE_NAME in sizes:
            shards = [st.SINGLE_NAME]
        else:
            raise ValueError(f"{where} has no safetensors weights ({st.INDEX_NAME} or {st.SINGLE_NAME}) at its top")
        missing = [shard for shard in shards if shard not in sizes]
        if missing:
            raise ValueError(f"{where} is incomplete: shard {missing[0]} named in its index is not in the repo")
        side = sorted(name for name in sizes if "/" not in name and name.endswith(SIDE_FILE_SUFFIXES))
        if index is None:  # a single file: its header is its index, so it comes first
            side, shards = side + shards, []
        logger.info("%s at commit %s: %d weight shards (%.2f GB) after %d other files", where, info.sha[:12],
                    len(shards), sum(sizes[name] for name in shards) / 1e9, len(side))
        return cls(repo_id, revision, info.sha, sizes, shards, side)

    def fetch(self, names: list[str]) -> Path:
        """Download `names` (what the cache lacks of them); the snapshot folder holding them."""
        from huggingface_hub import snapshot_download

        try:  # exact names, glob characters escaped: snapshot_download matches allow_patterns with fnmatch
            return Path(snapshot_download(self.repo_id, revision=self.commit,
                                          allow_patterns=[glob.escape(name) for name in names]))
        except Exception as error:
            raise _hub_error(self.repo_id, self.revision, error) from None


def _hub_error(repo_id: str, revision: str | None, error: Exception) -> ValueError:
    """One line a user can act on, from huggingface_hub's errors (several lines, the first often a bare status)."""
    from huggingface_hub import errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    known = [(errors.GatedRepoError, "the repo is gated: accept its terms on the Hub and log in (hf auth login)"),
             (errors.RepositoryNotFoundError, "no such repo, or it is private and you are not logged in"),
             (errors.RevisionNotFoundError, "no such branch, tag or commit"),
             (errors.EntryNotFoundError, "a file it lists is missing")]
    reason = next((text for kind, text in known if isinstance(error, kind)), None)
    if reason is None:
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return ValueError(f"cannot download {where} from the Hugging Face Hub: {reason}")


class SourceCheckpoint:
    """A local checkpoint folder: its config.json as written, which shard holds each tensor, and (for a quantized
    checkpoint) which stored tensors encode each real-valued one. `revision`: the Hub commit the folder was
    downloaded at (None for a local folder); `fetch_weights`: how a Hub source's weight shards are downloaded
    (`fetch_weights()`, once every refusal is past)."""

    def __init__(self, folder: str | os.PathLike, revision: str | None = None,
                 fetch_weights: Callable[[], object] | None = None) -> None:
        self.folder, self.revision, self._fetch_weights = Path(folder), revision, fetch_weights
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{self.folder} has no config.json; give a Hugging Face model folder or Hub id")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {config_path}: {error}") from None

    def transformers_config(self):
        """A new transformers config of the source (callers may edit it), as `AutoConfig.from_pretrained` reads it; a model type that is another
        architecture (`NATIVE_ARCHITECTURES`: Kimi-K2 is DeepSeek-V3) is built natively as that one from config.json,
        without its `auto_map` (remote code is not needed to run an architecture transformers ships); a
        vision-language model whose text model is compressed alone (`TEXT_ARCHITECTURES`: Kimi-K2.5's is DeepSeek-V3)
        as that architecture from its `text_config`."""
        from transformers import AutoConfig

        model_type = self.config.get("model_type")
        native = NATIVE_ARCHITECTURES.get(model_type) or TEXT_ARCHITECTURES.get(model_type)
        try:
            if native is None:
                return AutoConfig.from_pretrained(str(self.folder))
            found = self.config.get("text_config") if model_type in TEXT_ARCHITECTURES else self.config
            if not isinstance(found, dict):
                raise ValueError(f"model type {model_type} keeps its text model in text_config, which is missing")
            # a deep copy: config classes edit nested dicts (rope_scaling) in place, and self.config is written out
            settings = copy.deepcopy({k: v for k, v in found.items() if k not in ("model_type", "auto_map")})
            return AutoConfig.for_model(native, **settings)
        except Exception as error:  # transformers raises several types for unreadable configs
            raise ValueError(f"cannot read the model config in {self.folder}: {error}") from None

    def remote_code_tokenizer(self) -> str | None:
        """The custom tokenizer class the source's `auto_map` names (Kimi-K2: tokenization_kimi.TikTokenTokenizer),
        or None when transformers' own classes load its tokenizer. Running that code needs the user's consent."""
        for name in ("tokenizer_config.json", "config.json"):
            path = self.folder / name
            try:
                auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") if path.is_file() else None
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
            if entry:
                return next((c for c in entry if c), None) if isinstance(entry, (list, tuple)) else str(entry)
        return None

    def fetch_weights(self) -> None:
        """Download a Hub source's weight shards (a no-op for a local folder, or once done): called when nothing is
        left to refuse, so a refused run downloads no weights."""
        if self._fetch_weights is not None:
            self._fetch_weights()
            self._fetch_weights = None
            st.weight_map(self.folder)  # every shard the index names is there now

    @functools.cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file; read on first use so config-level errors are reported first (a Hub source's
        shards may still be to download: `fetch_weights`)."""
        return st.weight_map(self.folder, shards_present=self._fetch_weights is None)

    @functools.cached_property
    def tensor_infos(self) -> dict[str, st.TensorInfo]:
        """Dtype and shape of every tensor, from the shard headers (no tensor data read)."""
        return st.tensor_infos(self.folder, self.weight_map)

    def iter_tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for `names`, grouped by shard with one shard open at a time."""
        names = list(names)
        missing = [name for name in names if name not in self.weight_map]
        if missing:
            raise ValueError(f"{self.folder} lacks tensor {missing[0]}: the checkpoint does not match its config")
        return st.iter_tensors(self.folder, self.weight_map, names)

    @functools.cached_property
    def quantization(self) -> QuantizedFormat | None:
        """The quantized format config.json names (None: plain); unsupported formats are refused here, from
        config.json alone, before any tensor is read."""
        return read_quantization(self.config, self.folder)

    @functools.cached_property
    def real_tensors(self) -> dict[str, tuple[str, ...]]:
        """Real tensor name (as the dequantized checkpoint names it) -> the stored tensors that encode it (itself
        alone when stored plain). For a plain checkpoint, every tensor maps to itself. A quantized checkpoint's
        stored tensors are checked against its format first (headers only: scales with their weights, shapes)."""
        if self.quantization is not None:
            try:
                self.quantization.check(self.tensor_infos)
            except ValueError as error:
                raise ValueError(f"{self.folder} does not match its quantization_config: {error}") from None
        return self.real_names

    @functools.cached_property
    def real_names(self) -> dict[str, tuple[str, ...]]:
        """`real_tensors` from the index alone, unchecked (no shard header read): what refusals made before a Hub
        source's weights are fetched look at, where a quantized layer's names are not its stored ones
        (compressed-tensors' `weight_packed`)."""
        return real_tensor_names(self.quantization, self.weight_map)

    def iter_real_tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, real tensor) for real tensor `names`: plain tensors as stored, quantized ones dequantized (float32)
        as they are read. Scales are read first (they are small), then each bulk tensor once, so memory holds one
        dequantized tensor at a time."""
        fmt, reals = self.quantization, self.real_tensors
        names = list(names)
        if fmt is None:
            yield from self.iter_tensors(names)
            return
        missing = [name for name in names if name not in reals]
        if missing:
            raise ValueError(f"{self.folder} lacks tensor {missing[0]}: the checkpoint does not match its config")
        yield from self.iter_tensors([name for name in names if len(reals[name]) == 1])
        quantized = [name for name in names if len(reals[name]) > 1]
        small = dict(self.iter_tensors([s for name in quantized for s in reals[name][1:]]))
        bulk = {reals[name][0]: name for name in quantized}
        for stored, tensor in self.iter_tensors(bulk):
            real = bulk[stored]
            yield real, fmt.dequantize(real, {stored: tensor, **{s: small[s] for s in reals[real][1:]}})
