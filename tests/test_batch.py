"""Batch jobs (``llama-broker batch`` / ``llama_broker.batch``) against the loopback server.

The crash tests run the command as a subprocess, kill it (SIGKILL at several
points, SIGINT once and twice), run it again and check the output holds
exactly one correct line per custom_id.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from llama_broker import Broker, ModelConfig
from llama_broker.batch import BatchInputError, iter_batch, run_batch, scan_output
from loopback import (
    Close,
    LoopbackServer,
    Reply,
    Request,
    api_error,
    chunk,
    data,
    error_envelope,
    ok,
    raw,
    reset_now,
    sse,
    usage_chunk,
    DONE,
)

REPO = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------


def _content(req: Request) -> str:
    body = req.json or {}
    msgs = body.get("messages") or [{}]
    return str(msgs[-1].get("content", ""))


def echo(delay: float = 0.0) -> Any:
    """A chat handler: the reply is ``echo:<user content>``, with usage."""

    def handler(req: Request) -> Reply:
        return dataclasses.replace(ok(["echo:", _content(req)], usage=True), delay=delay)

    return handler


def chat_line(cid: str, content: str) -> Dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": content}], "max_tokens": 8},
    }


def write_input(path: Path, n: int) -> List[str]:
    ids = [f"q{i}" for i in range(n)]
    with open(path, "w") as f:
        for i, cid in enumerate(ids):
            f.write(json.dumps(chat_line(cid, f"n{i}")) + "\n")
    return ids


def read_lines(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    blob = path.read_bytes()
    assert not blob or blob.endswith(b"\n"), "the output ends in a torn line"
    return [json.loads(x) for x in blob.splitlines()]


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def check_echo_output(path: Path, n: int) -> None:
    lines = read_lines(path)
    ids = [x["custom_id"] for x in lines]
    assert len(ids) == len(set(ids)), "a custom_id appears twice"
    assert sorted(ids) == sorted(f"q{i}" for i in range(n))
    for x in lines:
        assert x["error"] is None, x
        assert x["response"]["status_code"] == 200
        body = x["response"]["body"]
        assert body["object"] == "chat.completion"
        i = x["custom_id"][1:]
        assert body["choices"][0]["message"]["content"] == f"echo:n{i}"
        assert body["usage"]["completion_tokens"] == 2
        assert x["id"].startswith("batch_req_")


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def batch_args(inp: Path, out: Path, urls: List[str], *extra: str) -> List[str]:
    args = [sys.executable, "-m", "llama_broker", "batch", str(inp), "-o", str(out)]
    for u in urls:
        args += ["--endpoint", u]
    return args + ["--no-progress", *extra]


def popen(args: List[str]) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        args,
        cwd=str(REPO),
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_default,
    )


def run(args: List[str], timeout: float = 60) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        args, cwd=str(REPO), env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- validation ------------------------------------------------------------------------


def test_bad_file_refused_with_every_line_and_nothing_sent(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        json.dumps(chat_line("a", "x")),  # 1 ok
        "{not json",  # 2
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}),  # 3 no custom_id
        json.dumps(chat_line("a", "y")),  # 4 repeated id
        json.dumps(dict(chat_line("b", "x"), method="GET")),  # 5 bad method
        json.dumps(dict(chat_line("c", "x"), url="/v1/images")),  # 6 bad url
        "",  # 7 blank: allowed
        json.dumps(chat_line("d", "x")),  # 8 ok
        json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions"}),  # 9 no body
        "[1, 2]",  # 10 not an object
    ]
    inp.write_text("\n".join(lines) + "\n")
    with LoopbackServer() as srv:
        p = run(batch_args(inp, out, [srv.url]), timeout=30)
        assert p.returncode == 2, p.stderr
        for n in (2, 3, 4, 5, 6, 9, 10):
            assert f"in.jsonl:{n}:" in p.stderr, (n, p.stderr)
        for n in (1, 7, 8):
            assert f"in.jsonl:{n}:" not in p.stderr
        assert "nothing was sent" in p.stderr
        assert srv.requests == []
        assert not out.exists()

        with pytest.raises(BatchInputError) as ei:
            run_batch(str(inp), str(out), endpoints=[srv.url], progress=False)
        assert [n for n, _ in ei.value.problems] == [2, 3, 4, 5, 6, 9, 10]
        assert srv.requests == [] and not out.exists()


def test_iter_batch_list_validated_whole_first() -> None:
    with LoopbackServer() as srv:
        reqs = [chat_line("a", "x"), {"custom_id": "b"}, chat_line("a", "z")]
        with pytest.raises(BatchInputError) as ei:
            list(iter_batch(reqs, endpoints=[srv.url]))
        assert [n for n, _ in ei.value.problems] == [2, 3]
        assert srv.requests == []


# -- results -----------------------------------------------------------------------------


def test_run_and_resume_in_process(tmp_path: Path) -> None:
    inp, out, summ = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "s.json"
    write_input(inp, 30)
    with LoopbackServer() as srv:
        srv.script(echo())
        s = run_batch(str(inp), str(out), endpoints=[srv.url], concurrency=4, progress=False, summary_path=str(summ))
        assert (s.ok, s.failed, s.skipped, s.exit_code) == (30, 0, 0, 0)
        check_echo_output(out, 30)
        d = json.loads(summ.read_text())
        assert d["ok"] == 30 and d["completion_tokens"] == 60 and d["prompt_tokens"] == 30 * 7
        assert d["latency_p50_s"] is not None and d["latency_p99_s"] >= d["latency_p50_s"]
        # a second run sends nothing
        n_before = len(srv.chat_requests())
        s2 = run_batch(str(inp), str(out), endpoints=[srv.url], progress=False)
        assert (s2.ok, s2.skipped) == (0, 30)
        assert len(srv.chat_requests()) == n_before
        check_echo_output(out, 30)


def test_chat_body_is_the_whole_completion(tmp_path: Path) -> None:
    stream = [
        data(chunk({"role": "assistant", "content": None})),
        data(chunk({"reasoning_content": "think"})),
        data(chunk({"content": "Hi"})),
        data(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                     "function": {"name": "get", "arguments": '{"a":'}}]})),
        data(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})),
        data(chunk({}, "tool_calls")),
        data(usage_chunk(3)),
        DONE,
    ]
    with LoopbackServer() as srv:
        srv.script(sse(stream))
        [line] = list(iter_batch([chat_line("t", "x")], endpoints=[srv.url]))
        sent = srv.chat_requests()[0].json
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        assert "temperature" not in sent  # the file's body goes out as it is
    body = line["response"]["body"]
    msg = body["choices"][0]["message"]
    assert msg["content"] == "Hi" and msg["reasoning_content"] == "think" and msg["role"] == "assistant"
    assert msg["tool_calls"] == [{"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a":1}'}}]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["completion_tokens"] == 3
    assert body["timings"]["predicted_n"] == 3
    assert body["id"] == "chatcmpl-loopback" and body["model"] == "m"


def _text_stream(req: Request) -> Reply:
    prompt = (req.json or {}).get("prompt")
    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
    ev = [
        data(dict(base, choices=[{"index": 0, "text": "to ", "finish_reason": None}])),
        data(dict(base, choices=[{"index": 0, "text": str(prompt), "finish_reason": None}])),
        data(dict(base, choices=[{"index": 0, "text": "", "finish_reason": "length"}])),
        data(dict(base, choices=[], usage={"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4})),
        DONE,
    ]
    return sse(ev)


def _floats(i: int) -> List[float]:
    return [float(i), i + 0.5, -1.25 * i]


def _embeddings(req: Request) -> Reply:
    body = req.json or {}
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    b64 = body.get("encoding_format") == "base64"
    items = []
    for k, text in enumerate(inputs):
        vec = _floats(int(str(text).split("-")[-1]))
        emb: Any = base64.b64encode(struct.pack("<3f", *vec)).decode() if b64 else vec
        items.append({"embedding": emb, "index": k, "object": "embedding"})
    out = {"model": "m", "object": "list", "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
           "data": items}
    return raw(200, json.dumps(out).encode(), "application/json; charset=utf-8")


def _rerank(req: Request) -> Reply:
    body = req.json or {}
    docs = body["documents"]
    scores = [{"index": i, "relevance_score": float(len(d))} for i, d in enumerate(docs)]
    scores.sort(key=lambda r: -r["relevance_score"])
    if "top_n" in body:
        scores = scores[: body["top_n"]]
    out = {"model": "m", "object": "list", "usage": {"prompt_tokens": 5, "total_tokens": 5}, "results": scores}
    return raw(200, json.dumps(out).encode(), "application/json")


def test_completions_embeddings_rerank_lines() -> None:
    reqs = [
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "P", "max_tokens": 2}},
        {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": ["t-1", "t-2"]}},
        {"custom_id": "r", "method": "POST", "url": "/v1/rerank",
         "body": {"query": "q", "documents": ["a", "abc", "ab"], "top_n": 2}},
    ]
    with LoopbackServer() as srv:
        srv.route("/v1/completions", _text_stream).route("/v1/embeddings", _embeddings).route("/v1/rerank", _rerank)
        lines = {x["custom_id"]: x for x in iter_batch(reqs, endpoints=[srv.url], concurrency=3)}
        emb_req = [r for r in srv.requests if r.path == "/v1/embeddings"][0]
        assert emb_req.headers["accept"] == "application/json"
    c = lines["c"]["response"]["body"]
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "to P"
    assert c["choices"][0]["finish_reason"] == "length" and c["usage"]["completion_tokens"] == 2
    e = lines["e"]["response"]["body"]
    assert [d["embedding"] for d in e["data"]] == [_floats(1), _floats(2)]  # the server's body as it is
    r = lines["r"]["response"]["body"]
    assert r["results"] == [{"index": 1, "relevance_score": 3.0}, {"index": 2, "relevance_score": 2.0}]
    assert all(x["error"] is None and x["response"]["status_code"] == 200 for x in lines.values())


def _faulty(req: Request) -> Reply:
    c = _content(req)
    if c == "bad":
        return api_error(400, "the request is malformed", "invalid_request_error")
    if c == "boom":
        return api_error(500, "internal failure", "server_error")
    if c == "reset":
        return reset_now()
    if c == "midway":
        return sse([data(chunk({"role": "assistant", "content": None})), data(chunk({"content": "par"})), Close()])
    if c == "instream":
        return sse([data(chunk({"role": "assistant", "content": None})), data(error_envelope("ctx full", "exceed_context_size_error", 400))])
    if c == "notjson":
        return raw(502, b"<html>bad gateway</html>", "text/html")
    return ok(["echo:", c], usage=True)


def test_every_request_ending_in_error_has_its_line(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    kinds = ["ok", "bad", "boom", "reset", "midway", "instream", "notjson", "ok2"]
    with open(inp, "w") as f:
        for k in kinds:
            f.write(json.dumps(chat_line(k, k)) + "\n")
    with LoopbackServer() as srv:
        srv.script(_faulty)
        s = run_batch(str(inp), str(out), endpoints=[srv.url], concurrency=4, max_retries=1, progress=False)
        per = {}
        for r in srv.chat_requests():
            per[_content(r)] = per.get(_content(r), 0) + 1
    lines = {x["custom_id"]: x for x in read_lines(out)}
    assert sorted(lines) == sorted(kinds) and len(read_lines(out)) == len(kinds)
    assert s.ok == 2 and s.failed == 6 and s.exit_code == 1
    assert lines["ok"]["error"] is None and lines["ok2"]["error"] is None
    bad = lines["bad"]
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["message"] == "the request is malformed"
    assert bad["error"]["code"] == "invalid_request_error" and "malformed" in bad["error"]["message"]
    assert per["bad"] == 1  # a 400 is not sent again
    assert lines["boom"]["response"]["status_code"] == 500 and per["boom"] == 2  # 1 + max_retries (one endpoint)
    assert lines["reset"]["response"] is None and lines["reset"]["error"]["code"] in ("transport_error", "connection_error")
    assert lines["midway"]["error"]["code"] == "transport_error" and per["midway"] == 2  # retried after partial output
    assert lines["instream"]["error"]["code"] == "exceed_context_size_error" and per["instream"] == 1
    assert lines["notjson"]["response"] == {
        "status_code": 502, "request_id": lines["notjson"]["response"]["request_id"], "body": "<html>bad gateway</html>"
    }
    assert s.failed_by_code["invalid_request_error"] == 1 and sum(s.failed_by_code.values()) == 6


def test_errors_file_takes_the_failures_and_resume_reads_it(tmp_path: Path) -> None:
    inp, out, errs = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    with open(inp, "w") as f:
        for k in ["ok", "bad", "ok2"]:
            f.write(json.dumps(chat_line(k, k)) + "\n")
    with LoopbackServer() as srv:
        srv.script(_faulty)
        s = run_batch(str(inp), str(out), endpoints=[srv.url], errors_path=str(errs), progress=False)
        assert s.exit_code == 1
        assert sorted(x["custom_id"] for x in read_lines(out)) == ["ok", "ok2"]
        assert [x["custom_id"] for x in read_lines(errs)] == ["bad"]
        n = len(srv.chat_requests())
        s2 = run_batch(str(inp), str(out), endpoints=[srv.url], errors_path=str(errs), progress=False)
        assert len(srv.chat_requests()) == n and s2.skipped == 3 and s2.previously_failed == 1
        assert s2.exit_code == 1  # the output still holds a failure


def test_endpoint_down_for_part_of_the_run(tmp_path: Path) -> None:
    """B refuses connections for the first 0.4 s, then serves; A goes away at
    1.2 s (its in-flight requests are cut). Every request still ends ok."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    n = 200  # at 4 in flight and 40 ms a reply: 2 s at least, past both events
    write_input(inp, n)
    a = LoopbackServer()
    b = LoopbackServer(listen=False)
    try:
        a.script(echo(0.04))
        b.script(echo(0.04))
        timers = [threading.Timer(0.4, b.listen), threading.Timer(1.2, a.close)]
        for t in timers:
            t.start()
        s = run_batch(str(inp), str(out), endpoints=[b.url, a.url], concurrency=4, max_retries=3, progress=False)
        for t in timers:
            t.join(5)
        assert s.ok == n and s.failed == 0, s
        check_echo_output(out, n)
        assert len(a.chat_requests()) > 0 and len(b.chat_requests()) > 0
        assert "client-gone" in a.outcomes or "stopped" in a.outcomes  # A's close cut requests in flight
    finally:
        a.close()
        b.close()


def test_progress_lines_off_a_terminal(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 5)
    log = io.StringIO()
    with LoopbackServer() as srv:
        srv.script(echo(0.02))
        run_batch(str(inp), str(out), endpoints=[srv.url], concurrency=1, progress_interval=0.0, log_stream=log)
    text = log.getvalue()
    assert "batch: " in text and "5/5 done" in text and "req/s" in text and "ETA" in text


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    import tqdm  # noqa: F401 - in the [test] extra: the bar must be drawn, not skipped
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 5)
    log = _TTY()
    with LoopbackServer() as srv:
        srv.script(echo())
        run_batch(str(inp), str(out), endpoints=[srv.url], log_stream=log)
    text = log.getvalue()
    assert "5/5" in text and "req" in text and "tok/s" in text


# -- torn output ---------------------------------------------------------------------------


def test_scan_output_repairs_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = b'{"custom_id":"a","error":null}\n{"custom_id":"b","error":{"code":"x"}}\n'
    out.write_bytes(good + b'{"custom_id":"c","err')
    done: set = set()
    assert scan_output(str(out), done) == (2, 1, len(b'{"custom_id":"c","err'))
    assert done == {"a", "b"} and out.read_bytes() == good
    out.write_bytes(good + b'{"custom_id":"c","err\n')  # a whole line that is not JSON, at the end
    done.clear()
    assert scan_output(str(out), done)[0] == 2 and out.read_bytes() == good
    out.write_bytes(b"garbage\n" + good)  # not at the end: not ours to fix
    with pytest.raises(BatchInputError):
        scan_output(str(out), set())


# -- crashes (subprocess) ---------------------------------------------------------------------


@pytest.mark.parametrize("torn", [False, True], ids=["clean", "torn"])
def test_sigkill_at_random_points_then_resume(tmp_path: Path, torn: bool) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    n = 160
    write_input(inp, n)
    rng = random.Random(1234 + torn)
    kill_points = sorted(rng.sample(range(10, n - 20), 3))
    with LoopbackServer() as srv:
        srv.script(echo(0.01))
        for at in kill_points:
            p = popen(batch_args(inp, out, [srv.url], "--concurrency", "4"))
            try:
                wait_for(lambda: count_lines(out) >= at or p.poll() is not None, 60, f"{at} lines")
            finally:
                p.kill()
                p.communicate(timeout=30)
            assert p.returncode == -signal.SIGKILL, f"the run ended before the kill point {at}"
            if torn:  # the last line only half on disk
                blob = out.read_bytes()
                last_start = blob.rstrip(b"\n").rfind(b"\n") + 1
                out.write_bytes(blob[: last_start + (len(blob) - last_start) // 2])
        p2 = run(batch_args(inp, out, [srv.url], "--concurrency", "4"), timeout=60)
        assert p2.returncode == 0, p2.stderr
        assert "batch done" in p2.stderr and "resuming: " in p2.stderr
        assert ("removed a torn last line" in p2.stderr) == torn
    check_echo_output(out, n)


def test_sigint_finishes_in_flight_then_resume(tmp_path: Path) -> None:
    inp, out, summ = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "s.json"
    n = 40
    write_input(inp, n)
    with LoopbackServer() as srv:
        srv.script(echo(0.3))
        p = popen(batch_args(inp, out, [srv.url], "--concurrency", "4", "--summary", str(summ)))
        try:
            wait_for(lambda: count_lines(out) >= 4, 30, "the first results")
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 130, err
        assert "batch interrupted" in err and "latency" in err
        lines = read_lines(out)
        assert 4 <= len(lines) < n
        # in-flight requests finished and were written; nothing new was sent
        assert len(srv.chat_requests()) == len(lines)
        d = json.loads(summ.read_text())
        assert d["interrupted"] is True and d["ok"] == len(lines) and d["not_done"] == n - len(lines)
        srv.script(echo())
        p2 = run(batch_args(inp, out, [srv.url], "--concurrency", "4"), timeout=60)
        assert p2.returncode == 0, p2.stderr
    check_echo_output(out, n)


def test_second_sigint_abandons_in_flight(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    n = 30
    write_input(inp, n)

    def first_fast(req: Request) -> Reply:
        return echo(0.0 if int(_content(req)[1:]) < 8 else 20.0)(req)

    with LoopbackServer() as srv:
        srv.script(first_fast)
        p = popen(batch_args(inp, out, [srv.url], "--concurrency", "4"))
        try:
            wait_for(lambda: count_lines(out) >= 8 and len(srv.chat_requests()) >= 12, 30, "stalled requests")
            p.send_signal(signal.SIGINT)
            time.sleep(0.3)
            assert p.poll() is None  # waiting for the stalled requests
            t0 = time.monotonic()
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=15)
            assert time.monotonic() - t0 < 10
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 130, err
        assert sorted(x["custom_id"] for x in read_lines(out)) == sorted(f"q{i}" for i in range(8))
        srv.script(echo())
        p2 = run(batch_args(inp, out, [srv.url], "--concurrency", "4"), timeout=60)
        assert p2.returncode == 0, p2.stderr
    check_echo_output(out, n)


def test_cli_exit_code_1_when_some_failed(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        f.write(json.dumps(chat_line("ok", "ok")) + "\n" + json.dumps(chat_line("bad", "bad")) + "\n")
    with LoopbackServer() as srv:
        srv.script(_faulty)
        p = run(batch_args(inp, out, [srv.url]), timeout=60)
    assert p.returncode == 1, p.stderr
    assert "1 ok, 1 failed (invalid_request_error: 1)" in p.stderr
    assert len(read_lines(out)) == 2


def test_key_env_sent_and_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        f.write(json.dumps(chat_line("ok", "ok")) + "\n" + json.dumps(chat_line("bad", "bad")) + "\n")
    monkeypatch.setenv("BATCH_TEST_KEY", "sk-batch-secret-123")

    def echo_key(req: Request) -> Reply:
        if _content(req) == "bad":  # a server that echoes the key in its error
            return api_error(401, "bad key " + req.headers.get("authorization", ""), "authentication_error")
        return _faulty(req)

    with LoopbackServer() as srv:
        srv.script(echo_key)
        run_batch(str(inp), str(out), endpoints=[srv.url], key_env="BATCH_TEST_KEY", progress=False)
        assert {r.headers["authorization"] for r in srv.chat_requests()} == {"Bearer sk-batch-secret-123"}
    text = out.read_text()
    assert "sk-batch-secret-123" not in text and "***" in text


def test_every_endpoint_down_gives_error_lines(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 5)
    dead = LoopbackServer(listen=False)  # bound, refusing connections
    try:
        t0 = time.monotonic()
        s = run_batch(str(inp), str(out), endpoints=[dead.url], concurrency=5, max_retries=0, progress=False)
        assert time.monotonic() - t0 < 20
    finally:
        dead.close()
    lines = read_lines(out)
    assert sorted(x["custom_id"] for x in lines) == [f"q{i}" for i in range(5)]
    assert all(x["response"] is None and x["error"]["code"] == "connection_error" for x in lines)
    assert s.failed_by_code == {"connection_error": 5} and s.exit_code == 1


def test_iter_batch_lazy_iterable() -> None:
    def gen() -> Any:
        for i in range(6):
            yield chat_line(f"q{i}", f"n{i}")

    with LoopbackServer() as srv:
        srv.script(echo())
        got = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"]
               for x in iter_batch(gen(), endpoints=[srv.url], concurrency=2)}
        assert got == {f"q{i}": f"echo:n{i}" for i in range(6)}

        def bad() -> Any:
            yield chat_line("a", "n1")
            yield {"custom_id": "b", "url": "/nope"}

        with pytest.raises(BatchInputError) as ei:
            list(iter_batch(bad(), endpoints=[srv.url]))
        assert ei.value.problems[0][0] == 2


def test_a_second_run_on_the_same_output_is_refused(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 12)
    with LoopbackServer() as srv:
        srv.script(echo(0.2))
        p = popen(batch_args(inp, out, [srv.url], "--concurrency", "2"))
        try:
            wait_for(lambda: len(srv.chat_requests()) >= 1, 30, "the first run to start")
            p2 = run(batch_args(inp, out, [srv.url]), timeout=30)
            assert p2.returncode == 2 and "another run" in p2.stderr, p2.stderr
            p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 0
    check_echo_output(out, 12)


def test_a_job_that_failed_on_an_endpoint_goes_elsewhere() -> None:
    """A dead endpoint's probes are not all taken by the same job: with one
    try to spare, every job still succeeds on the live endpoint."""
    dead = LoopbackServer(listen=False)
    try:
        with LoopbackServer() as live:
            live.script(echo(0.05))
            reqs = [chat_line(f"q{i}", f"n{i}") for i in range(40)]
            # the dead endpoint's rest runs out at once, and it has fewer outstanding requests
            eps = [ModelConfig(dead.url, retry_backoff_ms=1), ModelConfig(live.url, retry_backoff_ms=1)]
            with Broker() as br:
                lines = list(iter_batch(reqs, endpoints=eps, concurrency=4, max_retries=0, broker=br))
    finally:
        dead.close()
    assert len(lines) == 40 and all(x["error"] is None for x in lines), [x["error"] for x in lines if x["error"]]


def test_a_429_with_retry_after_is_waited_for(tmp_path: Path) -> None:
    """The batch scheduler honours the server's Retry-After (as every native path does)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        f.write(json.dumps(chat_line("a", "a")) + "\n")
    seen: List[float] = []

    def handler(req: Request) -> Reply:
        seen.append(time.monotonic())
        if len(seen) == 1:
            return api_error(429, "slow down", "rate_limit_error", headers=[("Retry-After", "1")])
        return ok(["echo:", _content(req)], usage=True)

    with LoopbackServer() as srv:
        srv.script(handler)
        s = run_batch(str(inp), str(out), endpoints=[srv.url], max_retries=2, progress=False)
    assert s.exit_code == 0 and len(seen) == 2
    assert seen[1] - seen[0] >= 0.9, f"sent again after {seen[1] - seen[0]:.2f} s, Retry-After said 1 s"
    assert read_lines(out)[0]["response"]["body"]["choices"][0]["message"]["content"] == "echo:a"


def test_a_tls_verification_failure_is_not_sent_again() -> None:
    """A certificate that fails verification will fail again: one attempt, a clear error."""
    from llama_broker.errors import TLSVerifyError
    from llama_broker.jobs import _retry_kind

    assert _retry_kind(TLSVerifyError("certificate verify failed")) == 0
