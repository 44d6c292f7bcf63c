"""The client against a misbehaving llama-server imitation (tests/loopback.py).

Each test scripts the server's answer, calls the public API, and states what
the caller sees: the text, the result, or the error class and its fields.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import time

import pytest

from llama_broker import (
    APIError,
    BrokerError,
    ConnectError,
    ModelConfig,
    ProtocolError,
    TimeoutError_,
    TransportError,
    chat,
    chat_stream,
    stream,
)

from loopback import (
    CHAT_PATH,
    DONE,
    PATTERNS,
    Close,
    Huge,
    LoopbackServer,
    Reset,
    Stall,
    api_error,
    data,
    error_envelope,
    events,
    ok,
    raw,
    redirect,
    reset_now,
    sse,
)

MSGS = [{"role": "user", "content": "hi"}]
KEY_ENV = "LLAMA_BROKER_LOOPBACK_KEY"
KEY = "sk-loopback-" + "7f3a9c" * 4


@pytest.fixture
def srv():
    with LoopbackServer() as s:
        yield s


def cfg_for(srv, **kw) -> ModelConfig:
    base = dict(model="m", max_retries=0, retry_backoff_ms=20, timeout_ms=15000, idle_timeout_ms=5000)
    base.update(kw)
    return ModelConfig(srv.url, **base)


def run(cfg, **params):
    """chat_stream collecting deltas; returns (got, result_or_exception)."""
    got = []
    try:
        res = chat_stream(cfg, MSGS, got.append, **params)
    except BrokerError as e:
        return got, e
    return got, res


def raises(cfg, exc_type, **params):
    got, out = run(cfg, **params)
    assert isinstance(out, exc_type), f"expected {exc_type.__name__}, got {out!r} (deltas {got!r})"
    return got, out


# ------------------------------------------------------------ good streams ----
@pytest.mark.parametrize("pattern", PATTERNS)
def test_stream_every_write_pattern(srv, pattern):
    tokens = ["Hel", "lo", ", ", "wörld", " 🦙", "\n", '"q"', "\\"]
    srv.script(ok(tokens, pattern=pattern, seed=7))
    got, res = run(cfg_for(srv))
    assert got == tokens
    assert res.finish_reason == "stop"
    assert res.deltas == len(tokens)


CONTINUE_HTML = b"HTTP/1.1 100 Continue\r\nContent-Type: text/html\r\nX-Interim: yes\r\n\r\n"


@pytest.mark.parametrize("how", ["chat_stream", "stream"])
def test_an_interim_response_does_not_lend_its_headers(srv, how):
    # curl hands a 100 Continue's header lines to the header callback too:
    # the final response's block alone decides the content type ...
    tokens = ["a", "b"]
    srv.script(dataclasses.replace(ok(tokens), interim=[CONTINUE_HTML]))
    if how == "chat_stream":
        got, res = run(cfg_for(srv))
        assert got == tokens and res.finish_reason == "stop", res
    else:
        with stream(cfg_for(srv), MSGS) as s:
            assert [d.content for d in s if d.content] == tokens
    # ... and is what an error carries.
    srv.script(dataclasses.replace(api_error(429, "slow down", "rate_limit_error", headers=[("Retry-After", "3")]),
                                   interim=[CONTINUE_HTML]))
    got, e = raises(cfg_for(srv), APIError)
    assert e.status == 429 and e.message == "slow down"
    assert e.headers.get("retry-after") == "3" and "x-interim" not in e.headers, e.headers


def test_request_shape(srv):
    cfg = cfg_for(srv, params={"top_k": 5}, headers={"X-Trace": "abc"})
    got, res = run(cfg, cache_prompt=True, n_probs=0)
    (req,) = srv.chat_requests()
    assert req.method == "POST" and req.path == CHAT_PATH
    assert req.headers["content-type"].startswith("application/json")
    assert req.headers["x-trace"] == "abc"
    body = req.json
    assert body["stream"] is True and body["messages"] == MSGS and body["model"] == "m"
    assert body["top_k"] == 5 and body["cache_prompt"] is True and body["n_probs"] == 0
    assert "authorization" not in req.headers  # no key_env: no header


def test_usage_timings_and_ids(srv):
    srv.script(ok(["a", "b", "c"], usage=True))
    got, res = run(cfg_for(srv), stream_options={"include_usage": True})
    assert "".join(got) == "abc"
    assert res.finish_reason == "stop"
    assert res.usage == {"completion_tokens": 3, "prompt_tokens": 7, "total_tokens": 10}
    assert res.timings["predicted_n"] == 3 and res.timings["prompt_n"] == 7
    assert res.timings["predicted_per_second"] == pytest.approx(75.0)
    assert res.model == "m" and res.id == "chatcmpl-loopback"
    assert res.ttft_s is not None and 0 <= res.ttft_s <= res.elapsed_s


def test_chat_returns_whole_text(srv):
    srv.script(ok(["one ", "two"]))
    assert chat(cfg_for(srv), MSGS) == "one two"


@pytest.mark.parametrize("ping", [b":\n\n", b": ping\n\n", b": \n\n"])
def test_keepalive_comments_ignored(srv, ping):
    srv.script(ok(["x", "y"], ping=ping, pattern="random", seed=1))
    got, res = run(cfg_for(srv))
    assert got == ["x", "y"] and res.finish_reason == "stop"


def test_finish_reason_without_done_is_success(srv):
    srv.script(ok(["a", "b"], done=False))
    got, res = run(cfg_for(srv))
    assert got == ["a", "b"] and res.finish_reason == "stop"


def test_finish_reason_then_connection_cut_is_success(srv):
    srv.script(sse(events(["a", "b"], done=False) + [Close()]))
    got, res = run(cfg_for(srv))
    assert got == ["a", "b"] and res.finish_reason == "stop"


def test_finish_reason_length(srv):
    srv.script(ok(["a"], finish="length"))
    got, res = run(cfg_for(srv))
    assert got == ["a"] and res.finish_reason == "length"


def test_body_delimited_by_close_not_chunked(srv):
    srv.script(sse(events(["a", "b"]), chunked=False, keep_alive=False))
    got, res = run(cfg_for(srv))
    assert got == ["a", "b"] and res.finish_reason == "stop"


@pytest.mark.parametrize("pattern", ["events", "bytes", "random"])
def test_gzip_decoded_transparently(srv, pattern):
    tokens = ["gz", "ip ", "ß", "🦙"] * 5
    srv.script(ok(tokens, gzip=True, pattern=pattern, seed=3))
    got, res = run(cfg_for(srv))
    assert got == tokens and res.finish_reason == "stop"
    (req,) = srv.chat_requests()
    # the client may have read the whole reply before the server thread records it
    assert srv.wait_replies(1, timeout=5.0)
    # The server compresses only when asked; if the client asks, it must decode.
    assert srv.compressed[0] == ("gzip" in req.headers.get("accept-encoding", ""))


def test_invalid_utf8_becomes_replacement_char(srv):
    bad = b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"a\xffb\xc3"}}]}'
    srv.script(sse(events(["x"])[:2] + [data(bad)] + events(["y"])[1:]))
    got, res = run(cfg_for(srv))
    assert "".join(got) == "xa\ufffdb\ufffdy"
    assert res.finish_reason == "stop"


def test_utf8_split_across_chunks(srv):
    tokens = ["🦙", "é", "\u2028", "\u2029", "中文"]
    srv.script(ok(tokens, pattern="bytes"))
    got, _ = run(cfg_for(srv))
    assert got == tokens


# ------------------------------------------------------ truncation, resets ----
def test_truncated_clean_end_raises_ended_early(srv):
    srv.script(sse(events(["a", "b", "c"])[:3]))  # role, a, b; then the chunked terminator
    got, e = raises(cfg_for(srv), TransportError)
    assert "ended early" in str(e)
    assert got == ["a", "b"]
    assert e.delivered is True
    assert not isinstance(e, (TimeoutError_, ConnectError))


def test_truncated_by_close_without_terminator(srv):
    srv.script(sse(events(["a", "b", "c"])[:3] + [Close()]))
    got, e = raises(cfg_for(srv), TransportError)
    assert got == ["a", "b"] and e.delivered is True


def test_truncated_close_delimited_body(srv):
    srv.script(sse(events(["a", "b"])[:2], chunked=False, keep_alive=False))
    got, e = raises(cfg_for(srv), TransportError)
    assert "ended early" in str(e) and got == ["a"]


def test_truncated_before_any_event(srv):
    srv.script(sse([]))
    got, e = raises(cfg_for(srv), TransportError)
    assert "ended early" in str(e) and got == [] and e.delivered is False


def test_reset_mid_stream(srv):
    srv.script(sse(events(["a", "b", "c"])[:3] + [Reset()]))
    got, e = raises(cfg_for(srv, max_retries=2), TransportError)
    assert got == ["a", "b"] and e.delivered is True
    assert not isinstance(e, (TimeoutError_, ConnectError))
    assert len(srv.chat_requests()) == 1


def test_reset_before_any_byte(srv):
    srv.script(reset_now())
    got, e = raises(cfg_for(srv), TransportError)
    assert got == [] and e.delivered is False


# ------------------------------------------------------------------- stalls ----
def test_idle_stall_times_out(srv):
    evs = events(["a", "b", "c"])
    srv.script(sse(evs[:3] + [Stall(10)] + evs[3:]))
    t0 = time.monotonic()
    got, e = raises(cfg_for(srv, idle_timeout_ms=1000), TimeoutError_)
    assert time.monotonic() - t0 < 4.5
    assert got == ["a", "b"]
    assert isinstance(e, TransportError)


def test_idle_stall_before_first_body_byte_times_out(srv):
    srv.script(sse([Stall(10)] + events(["a"])))  # headers sent, then silence
    t0 = time.monotonic()
    got, e = raises(cfg_for(srv, idle_timeout_ms=1000), TimeoutError_)
    assert time.monotonic() - t0 < 4.5 and got == []


def test_idle_stall_before_headers_times_out(srv):
    srv.script(dataclasses.replace(ok(["a"]), delay=10))  # request read, no answer
    t0 = time.monotonic()
    got, e = raises(cfg_for(srv, idle_timeout_ms=1000), TimeoutError_)
    assert time.monotonic() - t0 < 4.5 and got == []


def test_keepalive_pings_keep_idle_timer_alive(srv):
    # 2.5 s of ": ping" every 0.25 s, with a 1 s idle timeout: no timeout.
    evs = events(["a", "b"])
    srv.script(sse(evs[:2] + [b": ping\n\n", Stall(0.25)] * 10 + evs[2:]))
    got, res = run(cfg_for(srv, idle_timeout_ms=1000))
    assert got == ["a", "b"] and res.finish_reason == "stop"


def test_total_timeout(srv):
    evs = events(["a", "b"])
    srv.script(sse(evs[:2] + [b":\n\n", Stall(0.2)] * 40 + evs[2:]))
    t0 = time.monotonic()
    got, e = raises(cfg_for(srv, timeout_ms=1500, idle_timeout_ms=1000), TimeoutError_)
    dt = time.monotonic() - t0
    assert 1.2 <= dt < 4.0, dt
    assert got == ["a"]


# ------------------------------------------------------------- HTTP errors ----
@pytest.mark.parametrize(
    "status,message,type_",
    [
        (500, "Internal server error", "server_error"),
        (503, "Loading model", "unavailable_error"),
        (401, "Invalid API Key", "authentication_error"),
        (400, "the request exceeds the available context size", "exceed_context_size_error"),
        (404, "File Not Found", "not_found_error"),
    ],
)
def test_http_error_json(srv, status, message, type_):
    srv.script(api_error(status, message, type_))
    got, e = raises(cfg_for(srv), APIError)
    assert e.status == status and e.message == message and e.type == type_
    assert str(e).startswith("api: ")
    assert got == []
    assert len(srv.chat_requests()) == 1


def test_http_error_non_json_body(srv):
    srv.script(raw(502, b"<html><body>Bad Gateway</body></html>", "text/html"))
    got, e = raises(cfg_for(srv), APIError)
    assert e.status == 502 and "Bad Gateway" in e.message


def test_http_error_empty_body(srv):
    srv.script(raw(500, b""))
    got, e = raises(cfg_for(srv), APIError)
    assert e.status == 500


def test_huge_error_body_is_capped(srv):
    limit = 64 * 1024
    srv.script(raw(500, b"x" * (10 << 20)))
    t0 = time.monotonic()
    got, e = raises(cfg_for(srv, max_error_body_bytes=limit), APIError)
    assert time.monotonic() - t0 < 5
    assert e.status == 500
    assert len(e.body or "") <= limit
    # the message may carry a short note such as "(body truncated)"
    assert len(e.message) <= limit + 100 and e.message.startswith("xxx")
    assert len(str(e)) <= limit + 200


# --------------------------------------------------------- mid-stream errors ----
_ERR = {"code": 400, "message": "the request exceeds the available context size",
        "type": "exceed_context_size_error"}

MID_STREAM_ERRORS = {
    # (a) before PR 16109: an `error:` field line with the bare error object, then [DONE]
    "a-error-field": [b"error: " + json.dumps(_ERR).encode() + b"\n\n", DONE],
    "a-error-field-wrapped": [b"error: " + json.dumps({"error": _ERR}).encode() + b"\n\n", DONE],
    # (b) a data envelope, then [DONE]
    "b-data-then-done": [data({"error": _ERR}), DONE],
    # (c) a data envelope and the stream just ends (current llama-server)
    "c-data-then-end": [data({"error": _ERR})],
}


@pytest.mark.parametrize("form", sorted(MID_STREAM_ERRORS))
def test_mid_stream_error_forms(srv, form):
    srv.script(sse(events(["Hi"])[:2] + MID_STREAM_ERRORS[form]))
    got, e = raises(cfg_for(srv, max_retries=2), APIError)
    assert e.status is None
    assert e.message == _ERR["message"] and e.type == _ERR["type"]
    assert got == ["Hi"]
    assert len(srv.chat_requests()) == 1


def test_mid_stream_error_before_any_delta(srv):
    srv.script(sse([data({"error": _ERR})]))
    got, e = raises(cfg_for(srv), APIError)
    assert e.status is None and e.message == _ERR["message"] and got == []


# -------------------------------------------------------- malformed payloads ----
_GARBAGE = [b'data: {"choices":[{"delta":{"content":"x"\n\n', b"data: not json\n\n"]


@pytest.mark.parametrize("garbage", _GARBAGE)
def test_malformed_json_skipped(srv, garbage):
    evs = events(["a", "b"])
    srv.script(sse(evs[:2] + [garbage] + evs[2:]))
    got, res = run(cfg_for(srv))
    assert got == ["a", "b"]
    assert res.skipped == 1 and res.finish_reason == "stop"


@pytest.mark.parametrize("garbage", _GARBAGE)
def test_malformed_json_strict_raises(srv, garbage):
    evs = events(["a", "b"])
    srv.script(sse(evs[:2] + [garbage] + evs[2:]))
    got, e = raises(cfg_for(srv, strict=True), ProtocolError)
    assert got == ["a"]
    assert str(e).startswith("protocol: ")


def test_event_over_limit_raises_protocol_error(srv):
    srv.script(sse(events(["a"])[:2] + [Huge(8 << 20)] + events(["b"])[1:]))
    got, e = raises(cfg_for(srv, max_event_bytes=1 << 20), ProtocolError)
    assert got == ["a"]
    srv.wait_idle(10)
    # the client hung up instead of reading the remaining megabytes
    assert srv.outcomes == ["client-gone"]


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from llama_broker import ModelConfig, ProtocolError, chat_stream

    def peak_kib():
        try:  # VmHWM, after resetting it below: the peak of this phase only
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "VmHWM"
        except OSError:
            return "ru_maxrss"  # a high-water mark since start: growth may be hidden

    cfg = ModelConfig(sys.argv[1], max_event_bytes=1 << 20, max_retries=0, timeout_ms=60000)
    msgs = [{"role": "user", "content": "hi"}]
    chat_stream(cfg, msgs, lambda s: None)  # warm-up: imports, handle, buffers
    chat_stream(cfg, msgs, lambda s: None)
    method = reset_peak()
    before = peak_kib()
    try:
        chat_stream(cfg, msgs, lambda s: None)
        outcome = "no error"
    except ProtocolError:
        outcome = "ProtocolError"
    except Exception as e:
        outcome = repr(e)
    after = peak_kib()
    print(json.dumps({"before_kib": before, "after_kib": after, "outcome": outcome, "method": method}))
    """
)


def test_64mib_event_bounded_memory(srv):
    big = sse(events(["a"])[:2] + [Huge(64 << 20)] + events(["b"])[1:])
    srv.script(ok(["warm"]), ok(["warm"]), big)
    p = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, srv.url], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["outcome"] == "ProtocolError"
    growth_kib = out["after_kib"] - out["before_kib"]
    assert growth_kib < 2 * 1024, out  # under 2x max_event_bytes (1 MiB)
    srv.wait_idle(10)
    assert srv.outcomes[-1] == "client-gone"
    assert 1 << 20 <= srv.bytes_sent[-1] < 32 << 20  # it read past the limit, then hung up


# --------------------------------------------------------------- redirects ----
def test_redirect_not_followed_by_default(srv):
    with LoopbackServer() as other:
        srv.script(redirect(other.url + CHAT_PATH, 302))
        got, e = run(cfg_for(srv))
        assert isinstance(e, (APIError, TransportError)), e
        if isinstance(e, APIError):
            assert e.status == 302
        assert other.requests == []


@pytest.mark.parametrize("status", [302, 307, 308])
def test_redirect_followed_without_authorization(srv, monkeypatch, status):
    monkeypatch.setenv(KEY_ENV, KEY)
    with LoopbackServer() as other:
        srv.script(redirect(other.url + CHAT_PATH, status))
        other.script(ok(["moved"]))
        got, res = run(cfg_for(srv, follow_redirects=True, key_env=KEY_ENV))
        assert got == ["moved"]
        (first,) = srv.chat_requests()
        assert first.headers.get("authorization") == f"Bearer {KEY}"
        (second,) = other.chat_requests()
        assert second.method == "POST" and second.json == first.json
        assert "authorization" not in second.headers
        assert all(KEY not in v for _, v in second.raw_headers)


# --------------------------------------------------------- the key stays out ----
def _all_text(e: BaseException) -> str:
    parts = []
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args), repr(vars(e))]
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


_KEY_FAULTS = {
    "401": api_error(401, "Invalid API Key", "authentication_error"),
    "reset": sse(events(["a"])[:2] + [Reset()]),
    "ended-early": sse(events(["a"])[:2]),
    "mid-stream": sse([data(error_envelope("bad", "server_error"))]),
    "garbage-strict": sse([b"data: {nope\n\n"]),
    "stall": sse(events(["a"])[:2] + [Stall(3)]),
}


@pytest.mark.parametrize("fault", sorted(_KEY_FAULTS))
def test_key_never_in_errors(srv, monkeypatch, fault):
    monkeypatch.setenv(KEY_ENV, KEY)
    srv.script(_KEY_FAULTS[fault])
    got, e = raises(cfg_for(srv, key_env=KEY_ENV, strict=True, idle_timeout_ms=1000), BrokerError)
    assert srv.chat_requests()[0].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in _all_text(e)


def test_key_never_in_connect_error(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    s = LoopbackServer(listen=False)  # bound, not listening: connection refused
    try:
        cfg = ModelConfig(s.url, key_env=KEY_ENV, max_retries=0, timeout_ms=5000)
        with pytest.raises(ConnectError) as ei:
            chat(cfg, MSGS)
        assert KEY not in _all_text(ei.value)
    finally:
        s.close()


_ECHO = {
    "http-json": lambda auth: api_error(401, f"invalid key: {auth}", "authentication_error"),
    "http-text": lambda auth: raw(401, f"denied for {auth}".encode()),
    "in-stream": lambda auth: sse([data(error_envelope(f"slot failed for {auth}"))]),
}


@pytest.mark.parametrize("where", sorted(_ECHO))
def test_key_redacted_when_server_echoes_it(srv, monkeypatch, where):
    # A careless server (or proxy) that puts the presented credentials into its error.
    monkeypatch.setenv(KEY_ENV, KEY)
    srv.script(lambda req: _ECHO[where](req.headers.get("authorization")))
    got, e = raises(cfg_for(srv, key_env=KEY_ENV), APIError)
    assert KEY not in _all_text(e)
    assert KEY not in (e.body or "") and KEY not in e.message


# ------------------------------------------- cancellation, callbacks, reuse ----
def _slow_stream(n_fast: int, n_slow: int, gap: float = 0.2):
    evs = events([f"t{i} " for i in range(n_fast + n_slow)])
    body = evs[: 1 + n_fast]
    for ev in evs[1 + n_fast:]:
        body += [Stall(gap), ev]
    return sse(body)


def test_stream_iterator_full(srv):
    srv.script(ok(["a", "b"], usage=True))
    with stream(cfg_for(srv), MSGS) as it:
        deltas = list(it)
    assert "".join(d.content or "" for d in deltas) == "ab"
    assert deltas[-1].finish_reason == "stop" or any(d.finish_reason == "stop" for d in deltas)
    assert it.result is not None and it.result.finish_reason == "stop"
    assert it.result.usage["completion_tokens"] == 2


def test_stream_iterator_leaving_early_cancels(srv):
    srv.script(_slow_stream(2, 20))
    t0 = time.monotonic()
    got = []
    with stream(cfg_for(srv), MSGS) as it:
        for d in it:
            if d.content:
                got.append(d.content)
            if len(got) == 2:
                break
    assert time.monotonic() - t0 < 2.0
    assert got == ["t0 ", "t1 "]
    assert srv.wait_idle(5)
    assert srv.outcomes == ["client-gone"]


def test_stream_close_cancels(srv):
    srv.script(_slow_stream(1, 20))
    it = stream(cfg_for(srv), MSGS)
    first = next(d for d in it if d.content)
    it.close()
    assert first.content == "t0 "
    assert srv.wait_idle(5)
    assert srv.outcomes == ["client-gone"]


def test_stream_iterator_raises_faults(srv):
    srv.script(sse(events(["a", "b"])[:2] + [Reset()]))
    got = []
    with pytest.raises(TransportError):
        with stream(cfg_for(srv), MSGS) as it:
            for d in it:
                if d.content:
                    got.append(d.content)
    assert got == ["a"]


class Boom(Exception):
    pass


def test_on_delta_exception_propagates_and_cancels(srv):
    srv.script(_slow_stream(2, 20), ok(["after"]))
    cfg = cfg_for(srv, max_retries=2)
    seen = []

    def cb(s):
        seen.append(s)
        if len(seen) == 2:
            raise Boom("stop here")

    with pytest.raises(Boom):
        chat_stream(cfg, MSGS, cb)
    assert seen == ["t0 ", "t1 "]
    assert srv.wait_idle(5) and srv.outcomes == ["client-gone"]
    assert len(srv.chat_requests()) == 1
    assert chat(cfg, MSGS) == "after"


def test_connection_reused(srv):
    srv.script(ok(["a"]))
    cfg = cfg_for(srv)
    assert chat(cfg, MSGS) == "a"
    assert chat(cfg, MSGS) == "a"
    r1, r2 = srv.chat_requests()
    assert r1.conn == r2.conn


_RECOVERABLE = {
    "reset-mid": sse(events(["a", "b"])[:2] + [Reset()]),
    "reset-before": reset_now(),
    "ended-early": sse(events(["a"])[:2]),
    "close-mid": sse(events(["a"])[:2] + [Close()]),
    "503": api_error(503, "Loading model", "unavailable_error"),
    "mid-stream-error": sse([data(error_envelope())]),
    "huge-error-body": raw(500, b"y" * (2 << 20)),
    "event-too-big": sse(events(["a"])[:2] + [Huge(2 << 20)]),
    "garbage-strict": sse([b"data: {\n\n"]),
}


@pytest.mark.parametrize("fault", sorted(_RECOVERABLE))
def test_next_request_after_fault_succeeds(srv, fault):
    srv.script(_RECOVERABLE[fault], ok(["fine"]))
    cfg = cfg_for(srv, strict=True, max_event_bytes=1 << 20, max_error_body_bytes=4096)
    got, e = raises(cfg, BrokerError)
    assert chat(cfg, MSGS) == "fine"
