"""Model card and Hugging Face Hub upload for a compressed checkpoint.

`render_model_card` reads only what the output folder records (config.json with `ream_config`,
`ream_manifest.json`, the safetensors index and shard headers, an optional `eval_results.json`),
fills the Jinja template shipped in `ream_hf/model_cards/` and writes `README.md`. `push_folder`
uploads a folder; `compress_and_push` runs compress -> save -> (evaluate) -> card -> push.

The Hub token is resolved once (the argument, else `HF_TOKEN`, else the saved login) and is never
logged, put in a message, or written to a file; a folder that contains it is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .arch import text_config_dict
from .checkpoint import INDEX_NAME, MANIFEST_NAME, SINGLE_NAME, check_output_dir
from .config import CONFIG_KEY
from .evaluation import SCHEMA as EVAL_SCHEMA
from .evaluation import evaluate_pair
from .mtp import mtp_tensor_names
from .serve import read_safetensors_header

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "ream_model_card.md.j2"
CARD_NAME = "README.md"
EVAL_RESULTS_NAME = "eval_results.json"
# Above this, huggingface_hub 1.x's resumable `upload_large_folder` is used (2.x's `upload_folder` is itself
# resumable and multi-commit when hf_xet is installed, and has no separate large-folder call).
LARGE_FOLDER_BYTES = 5 * 10**9
MTP_SPECULATIVE_CONFIG = '{"method":"mtp","num_speculative_tokens":1}'
_TEXT_SUFFIXES = {".json", ".md", ".txt", ".jinja", ".j2", ".yaml", ".yml", ".py", ".model", ".tiktoken"}


@dataclass(frozen=True)
class TaskInfo:
    """How a benchmark appears in the card's table and in the Hub's `model-index`."""

    label: str
    dataset_type: str
    dataset_name: str
    metric_type: str  # the headline metric `ream_hf.evaluation` reports (its METRICS, lm-eval filter dropped)
    metric_label: str
    dataset_config: str | None = None
    dataset_split: str | None = None


TASKS = {
    "ifeval": TaskInfo("IFEval", "google/IFEval", "IFEval", "prompt_level_strict_acc", "prompt-level strict acc.",
                       dataset_split="train"),
    "gsm8k": TaskInfo("GSM8K", "openai/gsm8k", "GSM8K", "exact_match", "exact match (flexible extract)",
                      dataset_config="main", dataset_split="test"),
    "humaneval": TaskInfo("HumanEval", "openai/openai_humaneval", "HumanEval", "pass@1", "pass@1 (greedy)",
                          dataset_split="test"),
}


@dataclass(frozen=True)
class MethodInfo:
    label: str
    kind: str  # "merging" | "pruning"
    tag: str
    description: str


METHODS = {
    "ream": MethodInfo(
        "REAM", "merging", "ream",
        "the most salient experts (REAP saliency) become group centroids, each gathers its most similar experts "
        "(router logits and gated expert outputs), and every group is merged into one expert after aligning its "
        "members' neurons to the centroid's",
    ),
    "hc_smoe": MethodInfo(
        "HC-SMoE", "merging", "hc-smoe",
        "experts are clustered hierarchically by their average outputs and each cluster is merged into one expert",
    ),
    "m_smoe": MethodInfo(
        "M-SMoE", "merging", "m-smoe",
        "every expert that is not kept joins the most similar kept expert and the group is merged into one expert",
    ),
    "reap": MethodInfo(
        "REAP", "pruning", "reap",
        "the experts with the highest router-weighted expert activation saliency are kept, the others removed",
    ),
    "frequency": MethodInfo(
        "frequency pruning", "pruning", "frequency",
        "the experts the router selects most often on the calibration data are kept, the others removed",
    ),
}


# -- reading a checkpoint folder -------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsSummary:
    parameters: int
    disk_bytes: int
    names: tuple[str, ...]


def weights_summary(folder: str | os.PathLike) -> WeightsSummary:
    """Parameter count (from shard headers' shapes), safetensors bytes on disk and tensor names of a folder."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot read {index_path}: {error!r}") from None
        shards = list(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE_NAME).is_file():
        weight_map, shards = {}, [SINGLE_NAME]
    else:
        raise ValueError(f"{folder} has no safetensors weights ({INDEX_NAME} or {SINGLE_NAME})")
    parameters, disk_bytes, names = 0, 0, list(weight_map)
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise ValueError(f"{folder} is incomplete: shard {shard} listed in its index is missing")
        header = read_safetensors_header(path)
        parameters += sum(math.prod(info["shape"]) for info in header.values())
        disk_bytes += path.stat().st_size
        if not weight_map:
            names.extend(header)
    return WeightsSummary(parameters, disk_bytes, tuple(names))


def source_license(source_dir: str | os.PathLike | None) -> dict[str, str]:
    """`license` (+ `license_name` / `license_link` for custom licenses) of the source model.

    Read from the source folder's README.md front matter, else its config.json, else "other".
    """
    if source_dir is not None:
        folder = Path(source_dir)
        readme = folder / CARD_NAME
        if readme.is_file():
            from huggingface_hub import ModelCard

            try:
                data = ModelCard.load(readme).data
            except Exception as error:  # a hand-written README may have malformed YAML: keep going
                logger.warning("cannot read the license from %s: %s", readme, error)
            else:
                if data.license:
                    return _license_fields(data)
        config_path = folder / "config.json"
        if config_path.is_file():
            try:
                license_id = json.loads(config_path.read_text(encoding="utf-8")).get("license")
            except (OSError, ValueError):
                license_id = None
            if isinstance(license_id, str) and license_id:
                return {"license": license_id}
    return {"license": "other"}


def hub_license(repo_id: str, token: str | None = None) -> dict[str, str] | None:
    """The license fields of a Hub model's card metadata (one API call), or None when it cannot be read."""
    from huggingface_hub import HfApi

    try:
        data = HfApi(token=token).model_info(repo_id).card_data
    except Exception as error:  # offline, gated, missing: the card says "other" and the user can edit it
        logger.warning("cannot read the license of %s from the Hub: %s", repo_id, type(error).__name__)
        return None
    if data is None or not getattr(data, "license", None):
        return None
    return _license_fields(data)


def _license_fields(data: Any) -> dict[str, str]:
    """`license` (+ `license_name` / `license_link` where set) of model card metadata that has a license."""
    info = {"license": str(data.license)}
    for key in ("license_name", "license_link"):
        if getattr(data, key, None):
            info[key] = str(getattr(data, key))
    return info


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path.parent} has no {path.name}; {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def load_results(results: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """An evaluation results dict (schema `ream-hf eval results v1`), given as a dict or a JSON file."""
    if not isinstance(results, dict):
        results = _read_json(Path(results), "give an evaluation results JSON file")
    if results.get("schema") != EVAL_SCHEMA:
        raise ValueError(f"evaluation results must have schema {EVAL_SCHEMA!r}, got {results.get('schema')!r}")
    for role in ("original", "compressed"):
        scores = results.get("models", {}).get(role, {}).get("scores")
        if not isinstance(scores, dict):
            raise ValueError(f"evaluation results have no models.{role}.scores")
    return results


# -- the card ----------------------------------------------------------------------------------------
def _short_count(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _short_bytes(n: int) -> str:
    for scale, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} B"


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f}"


def _results_context(results: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    from huggingface_hub import EvalResult

    original = results["models"]["original"]["scores"]
    compressed = results["models"]["compressed"]["scores"]
    retention = results.get("retention") or {}
    rows, eval_results = [], []
    for task, score in compressed.items():
        info = TASKS.get(task, TaskInfo(task, task, task, "score", "score"))
        before = original.get(task)
        kept = retention.get(task)
        if kept is None and before:
            kept = 100.0 * score / before
        rows.append({
            "task": task, "label": info.label, "metric": info.metric_label,
            "original": "—" if before is None else _percent(before),
            "compressed": _percent(score),
            "retention": "—" if kept is None else f"{kept:.1f}%",
            "retention_value": kept,
        })
        eval_results.append(EvalResult(
            task_type="text-generation", dataset_type=info.dataset_type, dataset_name=info.dataset_name,
            dataset_config=info.dataset_config, dataset_split=info.dataset_split,
            metric_type=info.metric_type, metric_value=round(float(score), 4),
            metric_name=f"{info.label}, {info.metric_label}",
        ))
    paired = [t for t in compressed if original.get(t) is not None]
    average = {"original": "—", "compressed": "—", "retention": "—"}
    if paired:
        mean_before = sum(original[t] for t in paired) / len(paired)
        mean_after = sum(compressed[t] for t in paired) / len(paired)
        average = {"original": _percent(mean_before), "compressed": _percent(mean_after),
                   "retention": f"{100.0 * mean_after / mean_before:.1f}%" if mean_before else "—"}
    kept_values = [r["retention_value"] for r in rows if r["retention_value"] is not None]
    settings = {"settings": results.get("settings") or {}, "versions": results.get("versions") or {}}
    context = {
        "rows": rows,
        "average": average,
        "min_retention": f"{min(kept_values):.1f}" if kept_values else "—",
        "average_retention": average["retention"].rstrip("%"),
        "date": results.get("date"),
        "settings_json": json.dumps(settings, indent=2, ensure_ascii=False),
    }
    return context, eval_results


def _calibration_context(config: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    from .calibration import looks_local

    sources = config.get("calibration") or []
    ratios = config.get("calibration_ratios")
    if ratios is None:
        ratios = [1.0 / len(sources)] * len(sources) if sources else []
    total = sum(ratios) or 1.0
    rows = []
    for source, ratio in zip(sources, ratios):
        path = str(source.get("path"))
        detail = [f"name={source['name']}"] if source.get("name") else []
        if source.get("split") and source.get("split") != "train":
            detail.append(f"split={source['split']}")
        for key, values in (source.get("filter") or {}).items():
            detail.append(f"{key} in {', '.join(map(str, values))}")
        rows.append({
            "path": path,
            "link": None if looks_local(path) else f"https://huggingface.co/datasets/{path}",
            "detail": "; ".join(detail),
            "ratio": f"{ratio / total:.2f}",
        })
    measured = manifest.get("calibration") or {}
    return {
        "sources": rows,
        "sequences": config.get("num_calibration_sequences"),
        "length": config.get("sequence_length"),
        "seed": config.get("seed"),
        "measured_sequences": measured.get("sequences"),
        "measured_tokens": measured.get("tokens"),
    }


def _mtp_context(names: tuple[str, ...], text_config: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    found = mtp_tensor_names(names, int(text_config.get("num_hidden_layers", 10**9)))
    mtp = manifest.get("mtp") or {}
    mode, dropped = mtp.get("mode"), mtp.get("dropped") or []
    if found and mode == "keep":
        description = ("present but left at full width (`mtp=keep`): vLLM cannot use them for speculative decoding, "
                       "serve without `--speculative-config`")
        flag = None
    elif found:
        description = "present and compressed like the trunk; usable for speculative decoding in vLLM"
        flag = MTP_SPECULATIVE_CONFIG
    elif dropped:
        description = f"removed (`mtp=drop`: {', '.join(dropped)}); the config's MTP layer count is 0"
        flag = None
    else:
        description = "none in this checkpoint"
        flag = None
    return {"present": bool(found), "count": len(found), "mode": mode, "description": description, "vllm_flag": flag}


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            return bool(json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError):
            return False
    return False


def render_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    source_dir: str | os.PathLike | None = None,
    results: dict[str, Any] | str | os.PathLike | None = None,
    repo_id: str | None = None,
    license_info: dict[str, str] | None = None,
):
    """Write `README.md` (a Hub model card) into a compressed checkpoint folder and return the `ModelCard`.

    `base_model`: the source's Hub repo id (front matter and links). `source_dir`: the source checkpoint
    folder, for its parameter count, size and license (default: the manifest's `source` when it is a
    local folder). `results`: evaluation results (dict or JSON path, schema `ream-hf eval results v1`);
    default: `eval_results.json` in `output_dir` when present. `repo_id`: where the card will live (used
    in the usage snippets). `license_info`: `{"license": ..., "license_name": ..., "license_link": ...}`
    to use instead of reading the source's.
    """
    from huggingface_hub import ModelCard, ModelCardData

    output = Path(output_dir)
    config_json = _read_json(output / "config.json", "give a folder written by ReamCompressor.save_pretrained")
    config = config_json.get(CONFIG_KEY)
    if not isinstance(config, dict):
        raise ValueError(f"{output / 'config.json'} has no {CONFIG_KEY!r} entry; was it written by ream-hf?")
    manifest = _read_json(output / MANIFEST_NAME, "give a folder written by ReamCompressor.save_pretrained")
    method_key = str(config.get("method", manifest.get("method")))
    if method_key not in METHODS:
        raise ValueError(f"unknown method {method_key!r} in {output / 'config.json'}")
    method = METHODS[method_key]
    if results is None and (output / EVAL_RESULTS_NAME).is_file():
        results = output / EVAL_RESULTS_NAME
    results = load_results(results) if results is not None else None

    after = weights_summary(output)
    if source_dir is None:
        candidate = Path(str(manifest.get("source", "")))
        source_dir = candidate if str(candidate) and candidate.is_dir() else None
    before = None
    if source_dir is not None:
        try:
            before = weights_summary(source_dir)
        except ValueError as error:
            logger.warning("source size not measured: %s", error)
    size = {"after_params": f"{after.parameters:,}", "after_params_short": _short_count(after.parameters),
            "after_disk": _short_bytes(after.disk_bytes), "before_params": None, "before_disk": None}
    if before is not None and before.parameters:
        size.update({
            "before_params": f"{before.parameters:,}", "before_params_short": _short_count(before.parameters),
            "before_disk": _short_bytes(before.disk_bytes),
            "param_reduction": f"{100.0 * (1 - after.parameters / before.parameters):.0f}",
            "disk_reduction": f"{100.0 * (1 - after.disk_bytes / before.disk_bytes):.0f}" if before.disk_bytes else "—",
        })

    layers = manifest.get("layers") or []
    pairs = {(layer.get("experts_before"), layer.get("experts_after")) for layer in layers}
    per_layer = [] if len(pairs) <= 1 else [
        {"name": layer.get("layer"), "before": layer.get("experts_before"), "after": layer.get("experts_after")}
        for layer in layers
    ]
    text_config = text_config_dict(config_json)
    model_name = repo_id or output.resolve().name
    license_info = dict(license_info) if license_info else source_license(source_dir)

    results_context, eval_results = _results_context(results) if results is not None else (None, None)
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["moe", f"expert-{method.kind}", method.tag, "ream-hf"],
        eval_results=eval_results or None,
        model_name=model_name if eval_results else None,
        **license_info,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        base_model=base_model,
        load_id=repo_id or str(output),
        ream_hf_version=manifest.get("ream_hf_version", __version__),
        method={"key": method_key, "label": method.label, "kind": method.kind, "description": method.description},
        family=manifest.get("family", text_config.get("model_type")),
        experts_before=manifest.get("experts_before"),
        experts_after=manifest.get("experts_after"),
        moe_layers=len(layers),
        per_layer=per_layer,
        size=size,
        config=config,
        config_json=json.dumps(config, indent=2, ensure_ascii=False),
        calibration=_calibration_context(config, manifest),
        mtp=_mtp_context(after.names, text_config, manifest),
        results=results_context,
        chat_template=_has_chat_template(output),
        license=license_info.get("license"),
        license_name=license_info.get("license_name"),
    )
    card.save(output / CARD_NAME)
    logger.info("wrote the model card %s", output / CARD_NAME)
    return card


# -- pushing -----------------------------------------------------------------------------------------
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
    """Create `repo_id` if needed (a model repo) and upload `folder` to it; returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    _check_repo_id(repo_id)
    token = resolve_token(token)
    _refuse_token_in_files(folder, token)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    size = _folder_bytes(folder)
    if size > large_folder_bytes and hasattr(api, "upload_large_folder"):
        logger.info("uploading %s (%s) to %s with upload_large_folder (resumable)", folder, _short_bytes(size), repo_id)
        api.upload_large_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", private=private)
    else:
        logger.info("uploading %s (%s) to %s", folder, _short_bytes(size), repo_id)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message)
    logger.info("pushed %s", url)
    return str(url)


_HF_CACHE_FOLDER = re.compile(r"^models--(?P<owner>[^/]+?)--(?P<name>[^/]+)$")


def hub_id_for_source(source: Any) -> str | None:
    """The Hub repo id a source stands for: the id itself, or a folder in the Hub cache (`models--owner--name`)."""
    if not isinstance(source, (str, os.PathLike)):
        name = getattr(source, "name_or_path", None)
        return hub_id_for_source(name) if name else None
    path = Path(source).expanduser()
    if path.exists():
        for part in path.resolve().parts:
            if m := _HF_CACHE_FOLDER.match(part):
                return f"{m['owner']}/{m['name']}"
        return None
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text
    return None


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
) -> str:
    """Compress `source` with `compressor`, save, optionally evaluate against the source, write the card, push.

    `output_dir` keeps the checkpoint (default: a temporary folder under TMPDIR, deleted after the push: set
    TMPDIR or give `output_dir` for large models). `evaluate=True` runs `ream_hf.evaluation.evaluate_pair`
    (with `eval_kwargs`) and uploads its results as `eval_results.json`. `base_model` is the source's Hub id
    for the card; found from `source` when it is a Hub id or a Hub-cache folder. Returns the repo URL.
    """
    # everything that can be refused is refused before hours of compression
    _check_repo_id(repo_id)
    token = resolve_token(token)
    base_model = base_model or hub_id_for_source(source)
    if not base_model:
        raise ValueError(f"cannot tell the Hub id of {source!r} for the model card; pass base_model='owner/name'")
    _check_repo_id(base_model)
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)

    with tempfile.TemporaryDirectory(prefix="ream-hf-push-") as scratch:
        output = Path(output_dir) if output_dir is not None else Path(scratch) / repo_id.split("/")[-1]
        compressor.compress(source)
        compressor.save_pretrained(output, overwrite=overwrite)
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
        return push_folder(output, repo_id, private=private, token=token,
                           commit_message=f"Upload {repo_id.split('/')[-1]} ({base_model} compressed with "
                                          f"{METHODS[compressor.config.method].label}, ream-hf {__version__})")
