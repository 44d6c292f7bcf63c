"""``python -m llama_broker`` as a subprocess, against the session's real llama-server."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import pytest

import llama_broker
from llama_broker.server import LocalServer

REPO = Path(__file__).resolve().parent.parent
# The children import the llama_broker this process imported (the checkout in
# the dev loop, the installed wheel under `make test`).
PKG_PARENT = Path(llama_broker.__file__).resolve().parent.parent


def _env(**extra: str) -> "dict[str, str]":
    env = dict(os.environ)
    env.pop("LLAMA_BROKER_ENDPOINT", None)
    env["PYTHONPATH"] = str(PKG_PARENT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _sigint_default() -> None:
    # A child started from a background job inherits SIGINT ignored, and
    # Python then keeps it ignored; a terminal's Ctrl-C is what we imitate.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(args: List[str], timeout: float = 120, **env: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-m", "llama_broker", *args],
        cwd=str(REPO),
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def popen_cli(args: List[str], **env: str) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(
        [sys.executable, "-m", "llama_broker", *args],
        cwd=str(REPO),
        env=_env(**env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_sigint_default,
    )


def read_some(fd: int, timeout: float, until: Optional[bytes] = None) -> bytes:
    """Read from ``fd`` until something (or ``until``) arrived, or fail after ``timeout``."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"nothing within {timeout} s; got {data!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"EOF; got {data!r}")
            data += chunk
            if until is None or until in data:
                return data


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.llama_server
def test_chat_streams_text_and_prints_summary(llama_server: LocalServer) -> None:
    proc = run_cli(
        ["chat", "Say hello.", "--endpoint", llama_server.endpoint,
         "--max-tokens", "16", "--seed", "3", "--temperature", "0"]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "Traceback" not in proc.stderr
    summary = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"\d+ tokens", summary), summary
    assert "tok/s" in summary and "ttft" in summary, summary


@pytest.mark.llama_server
def test_chat_endpoint_from_env_and_system(llama_server: LocalServer) -> None:
    proc = run_cli(
        ["chat", "Say hello.", "--system", "You are terse.", "--max-tokens", "8", "-q"],
        LLAMA_BROKER_ENDPOINT=llama_server.endpoint,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert proc.stderr == ""  # --quiet, and no local server was started


@pytest.mark.llama_server
def test_chat_json_lines(llama_server: LocalServer) -> None:
    proc = run_cli(
        ["chat", "Say hello.", "--endpoint", llama_server.endpoint,
         "--max-tokens", "12", "--seed", "3", "--json"]
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    objs = [json.loads(line) for line in lines]  # every line is JSON
    assert all(isinstance(o, dict) for o in objs)
    assert any(o.get("content") for o in objs)
    assert any(o.get("finish_reason") in ("stop", "length") for o in objs)
    last = objs[-1]
    assert last["done"] is True
    assert last["usage"]["completion_tokens"] > 0
    assert last["timings"]["predicted_n"] == last["usage"]["completion_tokens"]
    text = "".join(o.get("content", "") for o in objs[:-1])
    assert text.strip()


@pytest.mark.llama_server
def test_chat_sigint_cancels_cleanly(llama_server: LocalServer, tools: Any) -> None:
    tools.wait_idle(llama_server, timeout=30)
    proc = popen_cli(
        ["chat", "Write a very long story.", "--endpoint", llama_server.endpoint,
         "--max-tokens", "2000", "-p", "ignore_eos=true", "-p", "id_slot=1"]
    )
    try:
        assert proc.stdout is not None
        first = read_some(proc.stdout.fileno(), timeout=60)
        assert first
        assert tools.get_slots(llama_server)[1]["is_processing"]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=20)
        t_exit = time.monotonic()
        _, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.decode("utf-8", "replace")
    assert rc == 130, stderr
    assert "Traceback" not in stderr, stderr
    # the connection was closed: the server stops generating promptly
    tools.wait_idle(llama_server, timeout=5)
    assert time.monotonic() - t_exit < 5


@pytest.mark.llama_server
def test_serve_prints_endpoint_and_stops_on_sigint(tools: Any) -> None:
    proc = popen_cli(["serve", "--parallel", "1", "--ctx-per-slot", "512", "--", "--metrics"])
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out = read_some(proc.stdout.fileno(), timeout=120, until=b"\n").decode()
        endpoint = out.strip().splitlines()[0]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", endpoint), out
        status, body = tools.http_get(endpoint + "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert tools.http_get(endpoint + "/metrics")[0] == 200  # extra args reach the server
        err_start = read_some(proc.stderr.fileno(), timeout=10, until=b"Ctrl-C").decode()
        m = re.search(r"pid (\d+)", err_start)
        assert m, err_start
        server_pid = int(m.group(1))
        assert _pid_alive(server_pid)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        _, err_rest = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err_start + err_rest.decode("utf-8", "replace")
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert not _pid_alive(server_pid)
    with pytest.raises(OSError):
        tools.http_get(endpoint + "/health", timeout=2)


def test_chat_bad_endpoint_exits_1() -> None:
    port = _closed_port()
    proc = run_cli(["chat", "hi", "--endpoint", f"http://127.0.0.1:{port}", "--max-tokens", "4"], timeout=60)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert re.search(r"^error: transport: ", proc.stderr, re.M), proc.stderr


@pytest.mark.llama_server
def test_chat_wrong_key_never_printed(llama_server_keyed: LocalServer) -> None:
    secret = "s3cr3t-wrong-key-value"
    proc = run_cli(
        ["chat", "hi", "--endpoint", llama_server_keyed.endpoint, "--key-env", "LB_CLI_KEY", "--max-tokens", "4"],
        LB_CLI_KEY=secret,
    )
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"^error: api: HTTP 401", proc.stderr, re.M), proc.stderr
    assert secret not in proc.stdout + proc.stderr


def test_usage_errors_exit_2() -> None:
    proc = run_cli(["chat"], timeout=60)  # no prompt argument, empty stdin
    assert proc.returncode == 2
    assert "prompt" in proc.stderr
    proc = run_cli(["frobnicate"], timeout=60)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


@pytest.mark.llama_server
def test_chat_without_endpoint_starts_and_stops_a_local_server() -> None:
    # `make demo`'s command: the default model is a chat model that answers,
    # not a base model echoing the prompt with template tokens
    proc = run_cli(["chat", "What is the capital of France? Answer in one sentence.",
                    "--max-tokens", "64", "--temperature", "0"])
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, proc.stdout
    assert not re.search(r"<\|im_(start|end)\|>|<(start|end)_of_turn>|<bos>", proc.stdout), proc.stdout
    assert "starting local llama-server" in proc.stderr
    assert "tok/s" in proc.stderr


# -- doctor, fetch-model, --version ------------------------------------------------


@pytest.mark.llama_server
def test_doctor_reports_binary_model_cache_and_versions(llama_server: LocalServer) -> None:
    # the session server is up: the binary is there and the model is fetched
    proc = run_cli(["doctor"], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = dict(
        re.split(r"\s{2,}", line, maxsplit=1) for line in proc.stdout.splitlines() if re.search(r"\S\s{2,}\S", line)
    )
    assert rows["llama_broker"].startswith(llama_broker.__version__ + " at ")
    assert str(PKG_PARENT / "llama_broker") in rows["llama_broker"]
    assert "_sse" in rows["C extension"] and "abi3" in rows["C extension"]
    assert "libcurl/" in rows["pycurl"]
    assert llama_server.binary_path and llama_server.binary_path in rows["llama-server"]
    assert re.search(r"version: \d+", rows["llama-server"]), rows["llama-server"]
    assert "smollm2-135m" in rows["model"] and "sha256 ok" in rows["model"], rows["model"]
    assert "llama_broker" in rows["cache"]
    assert proc.stdout.rstrip().endswith("ok")


def test_doctor_names_what_is_missing(tmp_path: Path) -> None:
    proc = run_cli(
        ["doctor"], timeout=60,
        LLAMA_SERVER=str(tmp_path / "no-llama-server"), LLAMA_MODEL=str(tmp_path / "no.gguf"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^llama-server\s+NOT FOUND", out, re.M), out
    assert re.search(r"^model\s+.*no\.gguf \(from \$LLAMA_MODEL\): NOT FOUND", out, re.M), out
    assert re.search(r"^cache\s+" + re.escape(str(tmp_path / "cache" / "llama_broker")), out, re.M), out
    assert "problems:" in out and "LLAMA_SERVER" in out
    assert "Traceback" not in proc.stderr


def test_doctor_says_when_the_model_is_not_fetched_yet(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = run_cli(["doctor"], timeout=60, **env)
    assert re.search(r"^model\s+smollm2-135m \(the default\): not fetched yet: 98 MB .*fetch-model", proc.stdout, re.M), proc.stdout
    assert not (tmp_path / "cache" / "llama_broker" / "models").exists()  # doctor fetches nothing


def test_version_flag_and_unknown_model_name() -> None:
    proc = run_cli(["--version"], timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"llama_broker {llama_broker.__version__}"
    proc = run_cli(["fetch-model", "no-such-model"], timeout=60)
    assert proc.returncode == 2 and "unknown model 'no-such-model'" in proc.stderr
