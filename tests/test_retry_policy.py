"""The retry rules themselves (llama_broker.policy), without a network.

The native rule (every Broker path and ``map()``): refused connection, reset
before a byte, 429 and 503 are retried; the wait is the server's Retry-After,
else a capped, jittered exponential backoff; a wait past the deadline ends the
request now. The drop-in follows the OpenAI SDK's rule (``sdk_*``).
"""

from __future__ import annotations

import email.utils
import time

import pytest

from llama_broker import APIError, ConnectError, ModelConfig, ProtocolError, TimeoutError_, TransportError
from llama_broker.errors import Headers, TLSVerifyError
from llama_broker.policy import (
    MAX_BACKOFF_S,
    backoff_s,
    retriable,
    retry_after_s,
    retry_delay,
    sdk_retry_delay,
    sdk_should_retry,
)

CFG = ModelConfig("http://127.0.0.1:9", retry_backoff_ms=250, max_retries=100)


def status_error(status, headers=()):
    return APIError("no", status=status, headers=headers)


# -- backoff ----------------------------------------------------------------------------
def test_backoff_grows_then_is_capped_with_jitter():
    for attempt, lo, hi in [(1, 0.125, 0.375), (2, 0.25, 0.75), (3, 0.5, 1.5)]:
        for _ in range(50):
            assert lo <= backoff_s(CFG, attempt) <= hi
    late = [backoff_s(CFG, n) for n in (20, 40, 200, 10_000) for _ in range(50)]
    assert max(late) <= MAX_BACKOFF_S  # no rest of hours after many failures
    assert min(late) >= 0.75 * MAX_BACKOFF_S
    assert len(set(late)) > 10  # jittered, also at the cap


def test_backoff_cap_never_below_the_configured_base():
    cfg = ModelConfig("http://127.0.0.1:9", retry_backoff_ms=20_000)
    assert 0.75 * 20 <= backoff_s(cfg, 50) <= 20


# -- Retry-After -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"Retry-After-Ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # ms first, as the SDK
        ({"retry-after-ms": "x", "retry-after": "3"}, 3.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_header_forms(headers, expected):
    assert retry_after_s(status_error(503, headers)) == expected


def test_retry_after_http_date():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    got = retry_after_s(status_error(429, {"Retry-After": when}))
    assert got is not None and 27 <= got <= 31


def test_headers_are_case_insensitive():
    h = Headers([("Retry-After", "2"), ("X-A", "1"), ("x-a", "2")])
    assert h["retry-after"] == h["RETRY-AFTER"] == h.get("Retry-After") == "2"
    assert "Retry-after" in h and list(h) == ["retry-after", "x-a"] and h["X-A"] == "1, 2"
    assert APIError("in stream").headers == {}


# -- the native rule --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "err, expected",
    [
        (status_error(429), True),
        (status_error(503), True),
        (status_error(500), False),
        (status_error(409), False),
        (ConnectError("refused", curl_code=7), True),
        (TLSVerifyError("certificate", curl_code=60), False),
        (TimeoutError_("t", curl_code=28), False),
        (TransportError("reset", curl_code=56, bytes_received=0), True),
        (TransportError("reset", curl_code=56, bytes_received=10), False),
        (ProtocolError("bad"), False),
    ],
)
def test_native_retriable(err, expected):
    assert retriable(err, delivered=False) is expected
    assert retriable(err, delivered=True) is False  # never after output reached the caller


def test_native_delay_is_the_servers_retry_after():
    far = time.monotonic() + 60
    d = retry_delay(CFG, status_error(503, {"Retry-After": "2"}), False, 0, far)
    assert d == 2.0
    d = retry_delay(CFG, status_error(429, {"retry-after-ms": "700"}), False, 0, far)
    assert d == 0.7


def test_native_retry_after_past_the_deadline_ends_now():
    near = time.monotonic() + 1.0
    assert retry_delay(CFG, status_error(503, {"Retry-After": "5"}), False, 0, near) is None
    # without the header the short backoff fits
    assert retry_delay(CFG, status_error(503), False, 0, near) is not None


def test_native_out_of_retries():
    cfg = ModelConfig("http://127.0.0.1:9", max_retries=2)
    assert retry_delay(cfg, status_error(503), False, 2, time.monotonic() + 60) is None


# -- the SDK's rule (the drop-in) -------------------------------------------------------------
@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_sdk_retries_these_statuses(status):
    assert sdk_should_retry(status_error(status)) is True


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_sdk_does_not_retry_these_statuses(status):
    assert sdk_should_retry(status_error(status)) is False


def test_sdk_x_should_retry_header_decides():
    assert sdk_should_retry(status_error(400, {"x-should-retry": "true"})) is True
    assert sdk_should_retry(status_error(500, {"X-Should-Retry": "false"})) is False


def test_sdk_transport_errors_and_exceptions():
    assert sdk_should_retry(TimeoutError_("read timeout", curl_code=28)) is True
    assert sdk_should_retry(ConnectError("refused", curl_code=7)) is True
    assert sdk_should_retry(TransportError("reset", curl_code=56, bytes_received=100)) is True
    assert sdk_should_retry(TLSVerifyError("certificate", curl_code=60)) is False
    assert sdk_should_retry(ConnectError("refused"), delivered=True) is False
    assert sdk_should_retry(APIError("in stream", status=None)) is False
    assert sdk_should_retry(ProtocolError("bad")) is False
    assert sdk_should_retry(status_error(429, {"Retry-After": "121"})) is False  # too long to wait


def test_sdk_delay_exponential_capped_with_jitter():
    for n, full in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (50, 8.0)]:
        for _ in range(30):
            d = sdk_retry_delay(status_error(500), n, 100)
            assert d is not None and 0.75 * full <= d <= full, (n, d)
    assert sdk_retry_delay(status_error(500), 2, 2) is None  # retries spent


@pytest.mark.parametrize(
    "headers, expected",
    [({"retry-after": "3"}, 3.0), ({"retry-after-ms": "20"}, 0.02), ({"retry-after": "120"}, 120.0)],
)
def test_sdk_delay_honours_retry_after(headers, expected):
    assert sdk_retry_delay(status_error(429, headers), 0, 2) == expected


@pytest.mark.parametrize("value", ["0", "-1"])
def test_sdk_delay_falls_back_to_backoff(value):
    d = sdk_retry_delay(status_error(429, {"retry-after": value}), 0, 2)
    assert d is not None and 0.375 <= d <= 0.5
