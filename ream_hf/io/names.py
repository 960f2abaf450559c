"""The names checkpoint folders and the Hub go by: the weight files' prefix, our manifest, Hub repo ids and the Hub
cache's repo folders. Apart, so that modules that only recognise a folder (io/folders.py) import no reader or
writer."""

from __future__ import annotations

import os
import re
from pathlib import Path

WEIGHTS_PREFIX = "model"  # transformers and vLLM find weights only as model.safetensors / model-0000i-of-0000n...
MANIFEST_NAME = "ream_manifest.json"

# a repo's folder in the Hub cache (HF_HUB_CACHE/models--owner--name), one path part
HUB_CACHE_FOLDER = re.compile(r"^models--(?P<owner>[^/]+?)--(?P<name>[^/]+)$")


def looks_like_hub_id(model_path: str | os.PathLike) -> bool:
    """Whether a source that is not a local path reads as a Hub repo id (owner/name)."""
    text = str(model_path)
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def published_source(name: str) -> str:
    """The source as an output records it: a Hub repo id as given, a local folder by its name alone (the manifest
    reaches the Hub: no path of this machine in it)."""
    path = Path(name).expanduser()
    return path.name if path.is_absolute() or path.exists() else name
