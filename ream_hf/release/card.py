"""The model card of a compressed checkpoint, from what its folder records.

`render_model_card` reads only the output folder (config.json with `ream_config`, `ream_manifest.json`, the
safetensors index and shard headers, `layer_report.png`, an optional `eval_results.json`), fills the Jinja template
shipped in `ream_hf/model_cards/` and writes `README.md`. Every entry point writes one: `save_pretrained` (no scores
yet), `ream-hf eval` (again, with the scores), `ream-hf push` (when the folder has none) and `compress_and_push`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..version import __version__
from ..arch import mtp_tensor_names, text_config_dict
from ..config import CONFIG_KEY, looks_local
from ..io import safetensors as st
from ..io.folders import short_bytes
from ..io.quantization import read_quantization, real_shapes
from ..io.names import HUB_CACHE_FOLDER, MANIFEST_NAME, looks_like_hub_id
from .evaluation import SCHEMA as EVAL_SCHEMA
from .evaluation.lm_eval_tasks import has_chat_template
from .report import LAYER_PLOT_NAME

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "ream_model_card.md.j2"
CARD_NAME = "README.md"
EVAL_RESULTS_NAME = "eval_results.json"
MTP_SPECULATIVE_CONFIG = '{"method":"mtp","num_speculative_tokens":1}'


@dataclass(frozen=True)
class TaskInfo:
    """How a benchmark appears in the card's table and in the Hub's `model-index`."""

    label: str
    dataset_type: str
    dataset_name: str
    metric_type: str  # the headline metric `ream_hf.release.evaluation` reports (its METRICS, lm-eval filter dropped)
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


def hub_id_for_source(source: Any) -> str | None:
    """The Hub repo id a source stands for: the id itself, or a folder in the Hub cache (`models--owner--name`)."""
    if not isinstance(source, (str, os.PathLike)):
        name = getattr(source, "name_or_path", None)
        return hub_id_for_source(name) if name else None
    path = Path(source).expanduser()
    if path.exists():
        for part in path.resolve().parts:
            if m := HUB_CACHE_FOLDER.match(part):
                return f"{m['owner']}/{m['name']}"
        return None
    return str(source) if looks_like_hub_id(source) else None


# -- reading a checkpoint folder -------------------------------------------------------------------
@dataclass(frozen=True)
class WeightsSummary:
    parameters: int
    disk_bytes: int
    names: tuple[str, ...]


def weights_summary(folder: str | os.PathLike) -> WeightsSummary:
    """Parameter count (from shard headers' shapes; a quantized tensor counts its real values, not its scales or
    packed bytes), safetensors bytes on disk and tensor names of a folder."""
    folder = Path(folder)
    names_to_shards = st.weight_map(folder)
    shards = sorted(set(names_to_shards.values()))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    infos = {name: info for shard in shards for name, info in st.read_header(folder / shard).items()}
    shapes = real_shapes(read_quantization(config, folder), infos)
    parameters = sum(math.prod(shape) for shape in shapes.values())
    disk_bytes = sum((folder / shard).stat().st_size for shard in shards)
    return WeightsSummary(parameters, disk_bytes, tuple(names_to_shards))


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
    reference = _reference_context(results.get("reference"), list(compressed))
    settings = {"settings": results.get("settings") or {}, "versions": results.get("versions") or {}}
    context = {
        "rows": rows,
        "average": average,
        "min_retention": f"{min(kept_values):.1f}" if kept_values else "—",
        "average_retention": average["retention"].rstrip("%"),
        "date": results.get("date"),
        "settings_json": json.dumps(settings, indent=2, ensure_ascii=False),
        "reference": reference,
    }
    return context, eval_results


def _reference_context(reference: dict[str, Any] | None, tasks: list[str]) -> dict[str, Any] | None:
    """Published scores (eval/regression's `reference`, e.g. the paper's), for a table of their own: measured with
    other code and settings, they are shown beside the card's scores, never mixed into them."""
    if not reference:
        return None
    original, compressed = reference.get("original") or {}, reference.get("compressed") or {}
    rows = []
    for task in dict.fromkeys([*tasks, *compressed]):
        before, after = original.get(task), compressed.get(task)
        if before is None and after is None:
            continue
        rows.append({
            "label": TASKS.get(task, TaskInfo(task, task, task, "score", "score")).label,
            "original": "—" if before is None else _percent(before),
            "compressed": "—" if after is None else _percent(after),
            "retention": f"{100.0 * after / before:.1f}%" if before and after is not None else "—",
        })
    return {"label": str(reference.get("label") or "published numbers"), "rows": rows} if rows else None


def _calibration_context(config: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    sources = config.get("calibration") or []
    ratios = config.get("calibration_ratios")
    if ratios is None:
        ratios = [1.0 / len(sources)] * len(sources) if sources else []
    total = sum(ratios) or 1.0
    rows = []
    for source, ratio in zip(sources, ratios):
        path = str(source.get("path"))
        if looks_local(path):  # by name: an output written before names were recorded may hold a local path
            path = Path(path).name
        detail = [f"name={source['name']}"] if source.get("name") else []
        if source.get("sha256"):
            detail.append(f"sha256 {source['sha256']}")
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


def original_name(source_name: str, base_model: str | None) -> str:
    """How the card names the source: its Hub id, else its folder's name."""
    return base_model or Path(source_name).name or "the original model"


def default_model_name(original: str, method: MethodInfo, experts_after: Any) -> str:
    """The name a card gives a model not yet on the Hub, from what it is (source, method, experts kept) rather than
    where it was written, so two runs of one job write byte-identical cards; `push` replaces it by the repo id."""
    experts = f"-{experts_after}E" if experts_after is not None else ""
    return f"{Path(original).name or 'model'}-{method.label.replace(' ', '-')}{experts}"


def _card_names(manifest: dict[str, Any], method: MethodInfo, base_model: str | None
                ) -> tuple[str | None, str, str]:
    """(base_model, original, default model name) as the card states them: `base_model` found from the manifest's
    source when not given. The render and `name_card_for_repo` must agree on these, so both take them from here."""
    source_name = str(manifest.get("source") or "")
    if base_model is None:
        base_model = hub_id_for_source(source_name) if source_name else None
    original = original_name(source_name, base_model)
    return base_model, original, default_model_name(original, method, manifest.get("experts_after"))


def name_card_for_repo(folder: str | os.PathLike, repo_id: str) -> bool:
    """Put `repo_id` where the card of `folder` names the model by `default_model_name` (title, usage snippets,
    evaluation command), keeping everything else in it, edits included. Returns whether the card changed."""
    folder = Path(folder)
    card_path = folder / CARD_NAME
    config = _read_json(folder / "config.json", "give a folder written by ReamCompressor.save_pretrained")
    manifest = _read_json(folder / MANIFEST_NAME, "give a folder written by ReamCompressor.save_pretrained")
    settings = config.get(CONFIG_KEY) or {}
    method = METHODS.get(str(settings.get("method", manifest.get("method"))))
    if method is None:
        return False
    default = _card_names(manifest, method, None)[2]
    text = card_path.read_text(encoding="utf-8")
    if default not in text:
        return False
    card_path.write_text(text.replace(default, repo_id), encoding="utf-8")
    logger.info("the model card of %s now names %s (it named %s)", folder, repo_id, default)
    return True


def render_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    source_dir: str | os.PathLike | None = None,
    results: dict[str, Any] | str | os.PathLike | None = None,
    repo_id: str | None = None,
    license_info: dict[str, str] | None = None,
):
    """Write `README.md` (a Hub model card) into a compressed checkpoint folder and return the `ModelCard`.

    `base_model`: the source's Hub repo id (front matter and links); default: the manifest's source when it is a
    Hub id or a Hub-cache folder, else none (the card names the source folder, without a link). `source_dir`: the
    source checkpoint folder, for its parameter count, size and license (default: the manifest's `source` when it
    is a local folder). `results`: evaluation results (dict or JSON path, schema `ream-hf eval results v1`);
    default: `eval_results.json` in `output_dir` when present. `repo_id`: where the card will live (used
    in the usage snippets). `license_info`: `{"license": ..., "license_name": ..., "license_link": ...}`
    to use instead of reading the source's. Without `repo_id` the title and usage snippets name the model
    `default_model_name` (never the folder's own name: one job writes the same bytes wherever its output goes);
    `push` puts the repo id in its place (`name_card_for_repo`).
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
    base_model, original, default_name = _card_names(manifest, method, base_model)
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
            "after_disk": short_bytes(after.disk_bytes), "before_params": None, "before_disk": None}
    if before is not None and before.parameters:
        size.update({
            "before_params": f"{before.parameters:,}", "before_params_short": _short_count(before.parameters),
            "before_disk": short_bytes(before.disk_bytes),
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
    model_name = repo_id or default_name
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
        load_id=repo_id or model_name,  # never a path of this machine: the card is published
        original=original,
        original_link=f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{original}`",
        layer_plot=LAYER_PLOT_NAME if (output / LAYER_PLOT_NAME).is_file() else None,
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
        chat_template=has_chat_template(output),
        license=license_info.get("license"),
        license_name=license_info.get("license_name"),
    )
    card.save(output / CARD_NAME)
    logger.info("wrote the model card %s", output / CARD_NAME)
    return card


