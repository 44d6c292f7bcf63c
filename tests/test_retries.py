"""Retry policy, observed from the server side (how many requests it saw).

Retried: connection refused, reset before the first byte, HTTP 429 and 503,
after the server's ``Retry-After`` when it sent one.
Never retried: other statuses, timeouts, a TLS certificate that failed
verification, and anything after output was delivered.
Retries stay within ``timeout_ms``.

``map()`` retries like ``concurrency`` workers calling ``chat()``: over a dead
or loading endpoint it ends (or recovers) as fast as the blocking path. The
OpenAI drop-in retries as the real SDK does (the SDK is the oracle).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

import llama_broker.openai as lbo

from llama_broker import (
    APIError,
    Broker,
    BrokerError,
    ConfigError,
    ConnectError,
    ModelConfig,
    TimeoutError_,
    TLSVerifyError,
    TransportError,
    chat,
    chat_stream,
    stream,
)

from loopback import (
    DONE,
    LoopbackServer,
    Reset,
    Stall,
    Close,
    Reply,
    api_error,
    chunk,
    data,
    error_envelope,
    events,
    ok,
    raw,
    reset_now,
    sse,
)
from test_hardening import tls_server  # noqa: F401 - the self-signed loopback TLS server fixture

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


@pytest.mark.parametrize("status", [409, 500, 502])
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


# ======================================================== map() backoff ====
def in_thread(fn, timeout):
    """``fn()`` on a daemon thread; fails (instead of hanging) after ``timeout`` s."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"still running after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_map(how, cfg, reqs, **kw):
    with Broker(cfg) as b:
        if how == "map":
            return list(b.map(reqs, progress=False, **kw))

        async def go():
            return [r async for r in b.amap(reqs, progress=False, **kw)]

        return asyncio.run(go())


@pytest.mark.parametrize("how", ["map", "amap"])
def test_map_over_a_refusing_endpoint_ends_each_request_in_seconds(how):
    # Every endpoint down: each request ends with its own error once its
    # retries are spent, as 8 workers calling chat() would (~1-2 s here), not
    # after endpoint rests that double on every failure of every request.
    s = LoopbackServer(listen=False)
    try:
        cfg = ModelConfig(s.url, model="m")  # the defaults: max_retries=2, retry_backoff_ms=250
        t0 = time.monotonic()
        results = in_thread(lambda: run_map(how, cfg, [{"messages": MSGS}] * 16, concurrency=8), 20)
        dt = time.monotonic() - t0
    finally:
        s.close()
    assert sorted(r.index for r in results) == list(range(16))
    for r in results:
        assert isinstance(r.error, ConnectError), r.error
        assert r.retries == 2, r.retries
    assert dt < 10, dt


@pytest.mark.parametrize("how", ["map", "amap"])
def test_map_recovers_from_a_loading_server_as_fast_as_the_blocking_path(srv, how):
    loaded_at = time.monotonic() + 1.5

    def reply(req):
        return LOADING if time.monotonic() < loaded_at else ok(["up"])

    srv.script(reply)
    cfg = cfg_for(srv.url, max_retries=10, retry_backoff_ms=250)
    results = in_thread(lambda: run_map(how, cfg, [{"messages": MSGS}] * 16, concurrency=8), 20)
    dt_after_loaded = time.monotonic() - loaded_at
    assert [r.error for r in results] == [None] * 16
    assert all(r.text == "up" for r in results)
    # chat()'s own backoff (0.25, 0.5, 1 s ... with jitter) retries within ~2 s of
    # the server being ready; map() must do no worse.
    assert dt_after_loaded < 4.0, dt_after_loaded


# ================================================================== TLS ====
def test_tls_verification_failure_is_not_retried_and_says_how_to_fix(tls_server, caplog):  # noqa: F811
    url, _, _ = tls_server
    caplog.set_level(logging.INFO, logger="llama_broker")
    t0 = time.monotonic()
    with pytest.raises(TLSVerifyError) as ei:
        chat(ModelConfig(url, max_retries=3, retry_backoff_ms=300), MSGS)
    assert time.monotonic() - t0 < 2.0
    e = ei.value
    assert isinstance(e, ConnectError) and e.curl_code == 60  # still a ConnectError for old handlers
    assert "certificate" in str(e) and "verification" in str(e) and "ca_bundle" in str(e)
    assert not [r for r in caplog.records if "retry" in r.getMessage()], caplog.text


def test_map_does_not_rest_or_resend_on_a_tls_verification_failure(tls_server, srv):  # noqa: F811
    url, _, _ = tls_server
    cfg = ModelConfig(url, max_retries=3, retry_backoff_ms=50)
    with Broker(cfg) as b:
        (r,) = list(b.map([{"messages": MSGS}], concurrency=1, endpoints=[url, srv.url], progress=False))
    assert isinstance(r.error, TLSVerifyError), r.error
    assert r.endpoint == url
    assert srv.chat_requests() == []  # not sent again elsewhere


def test_missing_ca_bundle_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="ca_bundle.*no such file"):
        ModelConfig("https://127.0.0.1:1", ca_bundle=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="ca_bundle"):
        ModelConfig("https://127.0.0.1:1", ca_bundle=str(tmp_path))  # a directory
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    assert ModelConfig("https://127.0.0.1:1", ca_bundle=pem).ca_bundle == str(pem)  # a Path is fine


# ============================================== 429, Retry-After, headers ====
def test_429_is_retried(srv):
    srv.script(api_error(429, "slow down", "rate_limit_error"), ok(["fine"]))
    got, res = run(cfg_for(srv.url))
    assert not isinstance(res, BaseException), res
    assert got == ["fine"] and res.retries == 1
    assert len(srv.chat_requests()) == 2


@pytest.mark.parametrize("path", ["chat_stream", "stream", "map"])
@pytest.mark.parametrize("header", [("Retry-After", "1"), ("retry-after-ms", "1000")])
def test_retry_after_is_honoured(srv, path, header):
    srv.script(api_error(503, "Loading model", "unavailable_error", headers=[header]), ok(["late"]))
    cfg = cfg_for(srv.url, retry_backoff_ms=20)
    t0 = time.monotonic()
    if path == "chat_stream":
        got, res = run(cfg)
        assert not isinstance(res, BaseException), res
        text = "".join(got)
    elif path == "stream":
        with stream(cfg, MSGS) as it:
            text = "".join(d.content or "" for d in it)
    else:
        (r,) = in_thread(lambda: run_map("map", cfg, [{"messages": MSGS}]), 10)
        assert r.error is None, r.error
        text = r.text
    dt = time.monotonic() - t0
    assert text == "late"
    assert 0.95 <= dt < 5, dt  # the server's 1 s, not the 20 ms backoff
    assert len(srv.chat_requests()) == 2


@pytest.mark.parametrize("path", ["chat_stream", "map"])
def test_retry_after_beyond_the_deadline_fails_now(srv, path):
    srv.script(api_error(503, "Loading model", "unavailable_error", headers=[("Retry-After", "30")]), ok(["x"]))
    cfg = cfg_for(srv.url, timeout_ms=3000, retry_backoff_ms=20)
    t0 = time.monotonic()
    if path == "chat_stream":
        got, e = run(cfg)
    else:
        (r,) = in_thread(lambda: run_map("map", cfg, [{"messages": MSGS}]), 10)
        e = r.error
    assert isinstance(e, APIError) and e.status == 503, e
    assert time.monotonic() - t0 < 1.0
    assert len(srv.chat_requests()) == 1


def test_api_error_carries_the_response_headers(srv, monkeypatch):
    monkeypatch.setenv("LB_TEST_KEY", "sk-header-secret-42")
    srv.script(api_error(429, "slow down", "rate_limit_error",
                         headers=[("Retry-After", "2"), ("X-Request-Id", "req-1"), ("X-Echo", "sk-header-secret-42")]))
    got, e = run(cfg_for(srv.url, max_retries=0, key_env="LB_TEST_KEY"))
    assert isinstance(e, APIError) and e.status == 429, e
    assert e.headers.get("retry-after") == "2" and e.headers["Retry-After"] == "2"
    assert e.headers["x-request-id"] == "req-1"
    assert e.headers["x-echo"] == "***"  # a secret echoed back is masked, as in messages


# -- the OpenAI drop-in: the real SDK is the oracle ----------------------------------------
SSE_OK = sse([data(chunk({"role": "assistant", "content": None})), data(chunk({"content": "ok"})),
              data(chunk({}, "stop")), DONE])
FAST = [("retry-after-ms", "20")]  # the SDK and the drop-in honour it: no 0.5 s waits here


def sdk_module():
    try:
        import openai
    except ImportError:  # pragma: no cover
        pytest.fail("the OpenAI SDK is needed for the drop-in comparison: pip install openai")
    return openai


def both(url, **kw):
    sdk = sdk_module()
    return [(sdk, sdk.OpenAI(base_url=url + "/v1", api_key="k", **kw)),
            (lbo, lbo.OpenAI(base_url=url + "/v1", api_key="k", **kw))]


def streamed_text(client):
    s = client.chat.completions.create(model="m", messages=MSGS, stream=True)
    return "".join((c.choices[0].delta.content or "") for c in s if c.choices)


_FIRST_FAILURES = {
    "408": api_error(408, "timeout", "timeout_error", headers=FAST),
    "409": api_error(409, "locked", "conflict_error", headers=FAST),
    "429": api_error(429, "slow down", "rate_limit_error", headers=FAST),
    "500": api_error(500, "boom", "server_error", headers=FAST),
    "502": raw(502, b"bad gateway", headers=FAST),
    "503": api_error(503, "Loading model", "unavailable_error", headers=FAST),
    "reset": reset_now(),
    "timeout": Reply(delay=3),
}


@pytest.mark.parametrize("first", sorted(_FIRST_FAILURES))
def test_dropin_retries_what_the_sdk_retries(first):
    outcomes = {}
    for which in ("sdk", "lb"):
        with LoopbackServer() as s:
            s.script(_FIRST_FAILURES[first], SSE_OK)
            (sdk, theirs), (_, ours) = both(s.url, max_retries=2, timeout=0.6)
            client = theirs if which == "sdk" else ours
            try:
                outcomes[which] = (streamed_text(client), len(s.chat_requests()))
            except Exception as e:  # noqa: BLE001 - compared below
                outcomes[which] = (type(e).__name__, len(s.chat_requests()))
            client.close()
    assert outcomes["sdk"] == ("ok", 2), outcomes  # the oracle
    assert outcomes["lb"] == outcomes["sdk"]


def test_dropin_non_streamed_create_retries_429(srv):
    srv.script(api_error(429, "slow down", "rate_limit_error", headers=FAST), SSE_OK)
    c = lbo.OpenAI(base_url=srv.url + "/v1", api_key="k")  # the SDK's default max_retries=2
    assert c.chat.completions.create(model="m", messages=MSGS).choices[0].message.content == "ok"
    assert len(srv.chat_requests()) == 2


def test_dropin_async_retries_429(srv):
    async def go():
        async with lbo.AsyncOpenAI(base_url=srv.url + "/v1", api_key="k") as c:
            r = await c.chat.completions.create(model="m", messages=MSGS)
            s = await c.chat.completions.create(model="m", messages=MSGS, stream=True)
            text = "".join([(ch.choices[0].delta.content or "") async for ch in s if ch.choices])
            return r.choices[0].message.content, text

    srv.script(api_error(429, "slow down", "rate_limit_error", headers=FAST), SSE_OK,
               api_error(429, "slow down", "rate_limit_error", headers=FAST), SSE_OK)
    assert asyncio.run(asyncio.wait_for(go(), 20)) == ("ok", "ok")
    assert len(srv.chat_requests()) == 4


def test_dropin_gives_up_after_max_retries_like_the_sdk():
    for which in ("sdk", "lb"):
        with LoopbackServer() as s:
            s.script(api_error(429, "slow down", "rate_limit_error", headers=FAST))
            (sdk, theirs), (_, ours) = both(s.url, max_retries=2)
            client, mod = (theirs, sdk) if which == "sdk" else (ours, lbo)
            with pytest.raises(mod.RateLimitError) as ei:
                streamed_text(client)
            assert len(s.chat_requests()) == 3, which
            assert ei.value.response.headers.get("Retry-After-Ms") == "20", which
            client.close()


@pytest.mark.parametrize("value, retried", [("true", True), ("false", False)])
def test_dropin_x_should_retry_header(value, retried):
    status = 400 if value == "true" else 500
    for which in ("sdk", "lb"):
        with LoopbackServer() as s:
            s.script(api_error(status, "x", "server_error", headers=FAST + [("x-should-retry", value)]), SSE_OK)
            (sdk, theirs), (_, ours) = both(s.url, max_retries=2)
            client = theirs if which == "sdk" else ours
            try:
                streamed_text(client)
            except Exception:  # noqa: BLE001 - the request count tells
                pass
            assert len(s.chat_requests()) == (2 if retried else 1), which
            client.close()


def test_dropin_honours_retry_after_seconds(srv):
    srv.script(api_error(429, "slow down", "rate_limit_error", headers=[("Retry-After", "1")]), SSE_OK)
    c = lbo.OpenAI(base_url=srv.url + "/v1", api_key="k")
    t0 = time.monotonic()
    assert streamed_text(c) == "ok"
    assert 0.95 <= time.monotonic() - t0 < 5


def test_dropin_error_response_headers_and_empty_body_like_the_sdk():
    for which in ("sdk", "lb"):
        with LoopbackServer() as s:
            s.script(raw(500, b"", headers=[("Retry-After", "2"), ("X-Request-Id", "abc")]))
            (sdk, theirs), (_, ours) = both(s.url, max_retries=0)
            client, mod = (theirs, sdk) if which == "sdk" else (ours, lbo)
            with pytest.raises(mod.InternalServerError) as ei:
                streamed_text(client)
            e = ei.value
            assert e.response.headers.get("retry-after") == "2", which
            assert e.response.headers.get("X-Request-ID") == "abc", which
            assert e.body == "", (which, e.body)
            client.close()


def test_dropin_stream_is_not_retried_after_output(srv):
    srv.script(sse([data(chunk({"content": "a"})), Stall(10)]), SSE_OK)
    c = lbo.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=2, timeout=0.5)
    seen = []
    with pytest.raises(lbo.APITimeoutError):
        for ch in c.chat.completions.create(model="m", messages=MSGS, stream=True):
            seen.append(ch.choices[0].delta.content)
    assert seen == ["a"] and len(srv.chat_requests()) == 1
