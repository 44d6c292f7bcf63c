"""Retry policy, observed from the server side (how many requests it saw).

Retried: connection refused, reset before the first byte, HTTP 503.
Never retried: other statuses, timeouts, and anything after output was delivered.
Retries stay within ``timeout_ms``.
"""

from __future__ import annotations

import threading
import time

import pytest

from llama_broker import (
    APIError,
    BrokerError,
    ConnectError,
    ModelConfig,
    TimeoutError_,
    TransportError,
    chat_stream,
    stream,
)

from loopback import (
    LoopbackServer,
    Reset,
    Stall,
    Close,
    Reply,
    api_error,
    data,
    error_envelope,
    events,
    ok,
    raw,
    reset_now,
    sse,
)

MSGS = [{"role": "user", "content": "hi"}]
LOADING = api_error(503, "Loading model", "unavailable_error")


@pytest.fixture
def srv():
    with LoopbackServer() as s:
        yield s


def cfg_for(url, **kw) -> ModelConfig:
    base = dict(model="m", max_retries=2, retry_backoff_ms=20, timeout_ms=15000, idle_timeout_ms=5000)
    base.update(kw)
    return ModelConfig(url, **base)


def run(cfg):
    got = []
    try:
        return got, chat_stream(cfg, MSGS, got.append)
    except BrokerError as e:
        return got, e


# ---------------------------------------------------------- connect refused ----
def test_connect_refused_retried_then_connect_error():
    s = LoopbackServer(listen=False)  # port bound, not listening: refused
    try:
        t0 = time.monotonic()
        got, e = run(cfg_for(s.url, max_retries=2, retry_backoff_ms=200))
        dt = time.monotonic() - t0
    finally:
        s.close()
    assert isinstance(e, ConnectError), e
    assert e.delivered is False and got == []
    assert 0.25 <= dt < 5.0, dt  # it waited: there were retries with backoff


def test_connect_refused_no_retries_is_immediate():
    s = LoopbackServer(listen=False)
    try:
        t0 = time.monotonic()
        got, e = run(cfg_for(s.url, max_retries=0, retry_backoff_ms=1000))
        dt = time.monotonic() - t0
    finally:
        s.close()
    assert isinstance(e, ConnectError), e
    assert dt < 0.5, dt


def test_connect_refused_then_server_up_succeeds():
    s = LoopbackServer(listen=False)
    s.script(ok(["up"]))
    timer = threading.Timer(0.15, s.listen)
    timer.start()
    try:
        got, res = run(cfg_for(s.url, max_retries=6, retry_backoff_ms=100))
    finally:
        timer.join(5)
        s.close()
    assert not isinstance(res, BaseException), res
    assert got == ["up"]
    assert res.retries >= 1
    assert len(s.chat_requests()) == 1


# ------------------------------------------------------- before the first byte ----
def test_reset_before_first_byte_retried(srv):
    srv.script(reset_now(), ok(["ok"]))
    got, res = run(cfg_for(srv.url))
    assert not isinstance(res, BaseException), res
    assert got == ["ok"] and res.retries == 1
    r1, r2 = srv.chat_requests()
    assert r1.json == r2.json


def test_reset_before_first_byte_every_time(srv):
    srv.script(reset_now())
    got, e = run(cfg_for(srv.url, max_retries=2))
    assert isinstance(e, TransportError) and not isinstance(e, TimeoutError_), e
    assert len(srv.chat_requests()) == 3


# ------------------------------------------------------------------- HTTP 503 ----
def test_503_then_success(srv):
    srv.script(LOADING, ok(["loaded"]))
    got, res = run(cfg_for(srv.url))
    assert not isinstance(res, BaseException), res
    assert got == ["loaded"] and res.retries == 1
    assert len(srv.chat_requests()) == 2


def test_503_twice_then_success(srv):
    srv.script(LOADING, LOADING, ok(["loaded"]))
    got, res = run(cfg_for(srv.url, max_retries=2))
    assert not isinstance(res, BaseException), res
    assert got == ["loaded"] and res.retries == 2
    assert len(srv.chat_requests()) == 3


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_503_forever(srv, max_retries):
    srv.script(LOADING)
    got, e = run(cfg_for(srv.url, max_retries=max_retries))
    assert isinstance(e, APIError), e
    assert e.status == 503 and e.message == "Loading model" and e.type == "unavailable_error"
    assert len(srv.chat_requests()) == 1 + max_retries


def test_stream_iterator_retries_503(srv):
    srv.script(LOADING, ok(["a", "b"]))
    with stream(cfg_for(srv.url), MSGS) as it:
        text = "".join(d.content or "" for d in it)
    assert text == "ab"
    assert it.result.retries == 1
    assert len(srv.chat_requests()) == 2


# ------------------------------------------------------------- never retried ----
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_4xx_never_retried(srv, status):
    srv.script(api_error(status, "no", "invalid_request_error"), ok(["should not get here"]))
    got, e = run(cfg_for(srv.url, max_retries=3))
    assert isinstance(e, APIError) and e.status == status, e
    assert len(srv.chat_requests()) == 1


@pytest.mark.parametrize("status", [500, 502])
def test_other_5xx_not_retried(srv, status):
    srv.script(raw(status, b"upstream trouble"), ok(["should not get here"]))
    got, e = run(cfg_for(srv.url, max_retries=3))
    assert isinstance(e, APIError) and e.status == status, e
    assert len(srv.chat_requests()) == 1


_AFTER_OUTPUT = {
    "reset": [Reset()],
    "clean-end": [],
    "close": [Close()],
    "mid-stream-error": [data(error_envelope("the slot was cancelled", "server_error"))],
    "mid-stream-503": [data(error_envelope("Loading model", "unavailable_error", 503))],
    "idle-stall": [Stall(10)],
}


@pytest.mark.parametrize("fault", sorted(_AFTER_OUTPUT))
def test_after_output_never_retried(srv, fault):
    srv.script(sse(events(["partial", "text"])[:3] + _AFTER_OUTPUT[fault]), ok(["again"]))
    got, e = run(cfg_for(srv.url, max_retries=3, idle_timeout_ms=1000))
    assert isinstance(e, BrokerError), e
    assert got == ["partial", "text"]
    if isinstance(e, TransportError):
        assert e.delivered is True
    assert len(srv.chat_requests()) == 1


def test_timeout_before_output_not_retried(srv):
    # The server took the request and went silent: it may be generating.
    srv.script(Reply(delay=10), ok(["again"]))
    got, e = run(cfg_for(srv.url, max_retries=3, idle_timeout_ms=1000))
    assert isinstance(e, TimeoutError_), e
    assert len(srv.chat_requests()) == 1


def test_max_retries_zero_means_one_request(srv):
    srv.script(reset_now(), ok(["x"]))
    got, e = run(cfg_for(srv.url, max_retries=0))
    assert isinstance(e, TransportError), e
    assert len(srv.chat_requests()) == 1


# -------------------------------------------------------- within timeout_ms ----
def test_retries_stay_within_timeout(srv):
    srv.script(LOADING)
    t0 = time.monotonic()
    got, e = run(cfg_for(srv.url, max_retries=50, retry_backoff_ms=100, timeout_ms=1500))
    dt = time.monotonic() - t0
    assert isinstance(e, (APIError, TimeoutError_)), e
    assert dt < 2.5, dt
    assert 2 <= len(srv.chat_requests()) < 51


def test_connect_retries_stay_within_timeout():
    s = LoopbackServer(listen=False)
    try:
        t0 = time.monotonic()
        got, e = run(cfg_for(s.url, max_retries=50, retry_backoff_ms=100, timeout_ms=1200))
        dt = time.monotonic() - t0
    finally:
        s.close()
    assert isinstance(e, (ConnectError, TimeoutError_)), e
    assert dt < 2.2, dt


@pytest.mark.parametrize("path", ["chat_stream", "stream"])
def test_reset_after_bytes_but_before_output_not_retried(srv, path):
    # Headers and the role chunk arrived (the server took the request), then a
    # reset: nothing was delivered, but this is not "reset before the first
    # byte", so it is not retried; the error tells how many bytes came.
    srv.script(sse(events(["x"])[:1] + [Reset()]), ok(["again"]))
    cfg = cfg_for(srv.url, max_retries=3)
    with pytest.raises(TransportError) as ei:
        if path == "chat_stream":
            chat_stream(cfg, MSGS, lambda t: None)
        else:
            with stream(cfg, MSGS) as s:
                list(s)
    assert ei.value.delivered is False
    assert ei.value.bytes_received > 0, ei.value
    assert len(srv.chat_requests()) == 1
