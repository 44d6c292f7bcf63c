"""Request policy shared by every path: message checks, body encoding, retries.

This module sits beneath the engines (``broker``, ``engine`` and ``fanout``
import from it; it imports none of them), so the one retry rule and the one
body encoding are defined once.

Two retry rules live here:

* the native one (:func:`retry_delay`, every ``Broker`` path and ``map()``):
  only what is safe to send again — a refused connection, a reset before
  the first byte, HTTP 429 and 503 — never after output reached the
  caller, never a TLS verification failure; the wait is the server's
  ``Retry-After`` when it sent one, else a capped exponential backoff with
  jitter; a wait that would pass the request's deadline (``timeout_ms``)
  ends it now with the error.
* the OpenAI SDK's (:func:`sdk_retry_delay`, the ``llama_broker.openai``
  drop-in), kept as the SDK has it so that a script behaves the same with
  either client.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from ._log import log
from .config import ModelConfig
from .errors import APIError, ConfigError, ConnectError, TimeoutError_, TLSVerifyError, TransportError
from .transport import RESET_CODES

__all__ = [
    "Messages",
    "validate_messages",
    "encode_chat_body",
    "retriable",
    "backoff_s",
    "retry_after_s",
    "retry_delay",
    "sdk_should_retry",
    "sdk_retry_delay",
    "MAX_BACKOFF_S",
    "RETRY_STATUSES",
]

#: the longest backoff wait between two attempts (or an endpoint's rest in ``map()``)
MAX_BACKOFF_S = 8.0
#: HTTP statuses the native paths retry: rate limited, and llama-server's "Loading model"
RETRY_STATUSES = frozenset((429, 503))

# The OpenAI SDK's retry constants (openai/_constants.py).
SDK_INITIAL_RETRY_DELAY_S = 0.5
SDK_MAX_RETRY_DELAY_S = 8.0
SDK_MAX_RETRY_AFTER_S = 120.0


Messages = Sequence[Mapping[str, Any]]

_MISSING: Any = object()


def validate_messages(messages: Any) -> None:
    """Raise :class:`ConfigError` naming the first bad item of ``messages``."""
    if messages.__class__ is list and messages:
        # The usual request, checked without the ABC isinstance() calls (a
        # list is a Sequence, a dict a Mapping): the same rules as below.
        for m in messages:
            if m.__class__ is not dict:
                break
            role = m.get("role")
            content = m.get("content", _MISSING)
            if (
                role.__class__ is not str
                or not role
                or (content is _MISSING and not m.get("tool_calls"))
                or (content is not None and content is not _MISSING and content.__class__ not in (str, list))
            ):
                break
        else:
            return
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ConfigError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ConfigError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ConfigError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ConfigError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        if "content" not in m and not m.get("tool_calls"):
            raise ConfigError(f"messages[{i}] has no 'content'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ConfigError(
                f"messages[{i}]['content'] must be a string or a list of parts, got {type(content).__name__}"
            )


def encode_chat_body(cfg: ModelConfig, messages: Messages, params: Mapping[str, Any]) -> bytes:
    """The JSON body of one streamed chat request (``ConfigError`` naming a bad field)."""
    if "stream" in params:
        raise ConfigError("'stream' cannot be passed: llama_broker always streams")
    validate_messages(messages)
    body = cfg.body(list(messages), params)
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        for k, v in body.items():  # name the field that cannot be encoded
            try:
                json.dumps(v, ensure_ascii=False, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError, UnicodeEncodeError):
                raise ConfigError(f"request field {k!r} cannot be sent as JSON: {e}") from e
        raise ConfigError(f"the request cannot be sent as JSON: {e}") from e


def retriable(err: BaseException, delivered: bool) -> bool:
    """Safe to send again: nothing reached the caller, and the server did no work
    we would repeat (refused connection, reset before a byte, 429 or 503).
    A TLS verification failure is final: the certificate will not change."""
    if delivered:
        return False
    if isinstance(err, TLSVerifyError):
        return False
    if isinstance(err, ConnectError):
        return True
    if isinstance(err, APIError):
        return err.status in RETRY_STATUSES
    if isinstance(err, TimeoutError_):
        return False
    if isinstance(err, TransportError):
        return err.bytes_received == 0 and err.curl_code in RESET_CODES
    return False


def backoff_s(cfg: ModelConfig, attempt: int) -> float:
    """Exponential backoff from ``cfg.retry_backoff_ms`` (attempt 1 is the first
    retry) with ±50 % jitter, capped at :data:`MAX_BACKOFF_S` (or at
    ``retry_backoff_ms`` when that is larger); at the cap the jitter stays
    below it, so that clients that failed together do not come back together."""
    import random  # (here, as every import only a failure needs: `import llama_broker` stays cheap)

    base = cfg.retry_backoff_ms / 1000.0
    cap = max(MAX_BACKOFF_S, base)
    delay = base * (2.0 ** min(max(attempt, 1) - 1, 60)) * random.uniform(0.5, 1.5)
    if delay > cap:
        delay = cap * random.uniform(0.75, 1.0)
    return delay


def retry_after_s(err: BaseException) -> Optional[float]:
    """Seconds the server asked to wait before the next request, from an
    :class:`APIError`'s ``retry-after-ms`` or ``Retry-After`` header (seconds,
    or an HTTP date), as the OpenAI SDK reads them; ``None`` when there is none
    or it cannot be read. The value may be zero or negative (a past date)."""
    headers = getattr(err, "headers", None)
    if not headers:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value)
        except ValueError:
            continue
        if math.isnan(delay):
            continue
        return delay / divisor
    value = headers.get("retry-after")
    if not value:
        return None
    import email.utils  # (here: an HTTP date is rare, and email costs ~10 ms to import)

    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return float(email.utils.mktime_tz(parsed) - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def retry_delay(
    cfg: ModelConfig, err: BaseException, delivered: bool, attempt: int, deadline: float
) -> Optional[float]:
    """The native retry policy of every path: seconds to wait before attempt
    ``attempt + 1`` (logged), or None when ``err`` is final (not retriable,
    out of retries, or the wait would pass the request's deadline).

    The wait is the server's ``Retry-After`` when it gave a positive one (so a
    Retry-After longer than what is left of ``timeout_ms`` ends the request
    now, with the server's error), else :func:`backoff_s`."""
    if attempt >= cfg.max_retries or not retriable(err, delivered):
        return None
    asked = retry_after_s(err)
    delay = asked if asked is not None and asked > 0 else backoff_s(cfg, attempt + 1)
    if time.monotonic() + delay >= deadline:
        return None
    log.warning("retry %d/%d in %.2fs after: %s", attempt + 1, cfg.max_retries, delay, err)
    return delay


def sdk_should_retry(err: BaseException, delivered: bool = False) -> bool:
    """The OpenAI SDK's rule (``_should_retry``): an ``x-should-retry: true|false``
    header decides; else 408, 409, 429 and 5xx are retried, and so is every
    timeout and connection error; a ``Retry-After`` over two minutes is not
    waited for. Beyond the SDK: nothing is sent again once output reached the
    caller, nor after a TLS verification failure (it cannot pass next time)."""
    if delivered or isinstance(err, TLSVerifyError):
        return False
    if isinstance(err, APIError):
        if err.status is None:  # reported inside a stream that had started
            return False
        asked = retry_after_s(err)
        if asked is not None and asked > SDK_MAX_RETRY_AFTER_S:
            return False
        should = err.headers.get("x-should-retry")
        if should == "true":
            return True
        if should == "false":
            return False
        return err.status in (408, 409, 429) or err.status >= 500
    return isinstance(err, TransportError)


def sdk_retry_delay(err: BaseException, retries_taken: int, max_retries: int, delivered: bool = False) -> Optional[float]:
    """Seconds to wait before retry ``retries_taken + 1`` under the SDK's rules
    (``_calculate_retry_timeout``), or None when ``err`` is final: the server's
    ``retry-after-ms``/``Retry-After`` when 0 < value <= 120 s, else
    0.5 s * 2**retries_taken capped at 8 s, less up to 25 % jitter."""
    if retries_taken >= max_retries or not sdk_should_retry(err, delivered):
        return None
    asked = retry_after_s(err)
    if asked is not None and math.isfinite(asked) and 0 < asked <= SDK_MAX_RETRY_AFTER_S:
        delay = asked
    else:
        import random

        delay = min(SDK_INITIAL_RETRY_DELAY_S * 2.0 ** min(retries_taken, 1000), SDK_MAX_RETRY_DELAY_S)
        delay *= 1 - 0.25 * random.random()
    log.info("retrying request in %.2fs (retry %d of %d) after: %s", delay, retries_taken + 1, max_retries, err)
    return delay


def encode_body(body: Mapping[str, Any], default: Optional[Callable[[Any], Any]] = None) -> bytes:
    """``body`` as compact UTF-8 JSON; :class:`ConfigError` names a field that cannot be
    encoded. ``default`` (as json.dumps') turns other objects into JSON values."""
    try:
        return json.dumps(
            body, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=default
        ).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        for k, v in body.items():
            try:
                json.dumps(v, ensure_ascii=False, allow_nan=False, default=default).encode("utf-8")
            except (TypeError, ValueError, UnicodeEncodeError):
                raise ConfigError(f"request field {k!r} cannot be sent as JSON: {e}") from e
        raise ConfigError(f"the request cannot be sent as JSON: {e}") from e
