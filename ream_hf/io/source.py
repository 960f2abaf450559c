"""The source checkpoint: a local folder or a Hub repo id, its config.json as written, and its tensor index."""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..arch import NATIVE_ARCHITECTURES
from . import safetensors as st

HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "*.tiktoken"]


def resolve_source(model_path: str | os.PathLike) -> Path:
    """A local folder as is; anything else is taken as a Hub repo id and downloaded (weights as safetensors)."""
    path = Path(model_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"source {model_path} is a file; give a model folder or a Hub repo id")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"source folder {model_path} is not readable")
        return path
    if str(model_path).startswith((".", "/", "~")) or str(model_path).count("/") != 1:
        raise ValueError(f"source {model_path} is neither a local folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model_path), allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as error:  # the hub raises many types; the user needs one line
        raise ValueError(f"cannot download {model_path} from the Hugging Face Hub: {error}") from None


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

    def transformers_config(self):
        """A new transformers config of the source (callers may edit it), as `AutoConfig.from_pretrained` reads it; a model type that is another
        architecture (`NATIVE_ARCHITECTURES`: Kimi-K2 is DeepSeek-V3) is built natively as that one from config.json,
        without its `auto_map` (remote code is not needed to run an architecture transformers ships)."""
        from transformers import AutoConfig

        native = NATIVE_ARCHITECTURES.get(self.config.get("model_type"))
        try:
            if native is None:
                return AutoConfig.from_pretrained(str(self.folder))
            # a deep copy: config classes edit nested dicts (rope_scaling) in place, and self.config is written out
            settings = copy.deepcopy({k: v for k, v in self.config.items() if k not in ("model_type", "auto_map")})
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

    @functools.cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file; read on first use so config-level errors are reported first."""
        return st.weight_map(self.folder)

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
