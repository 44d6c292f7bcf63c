"""Request policy shared by every path: message checks, body encoding, retries.

This module sits beneath the engines (``broker``, ``engine`` and ``fanout``
import from it; it imports none of them), so the one retry rule and the one
body encoding are defined once.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any, Mapping, Optional, Sequence

from .config import ModelConfig
from .errors import APIError, ConfigError, ConnectError, TimeoutError_, TransportError
from .transport import RESET_CODES

__all__ = [
    "Messages",
    "validate_messages",
    "encode_chat_body",
    "retriable",
    "backoff_s",
    "retry_delay",
]

log = logging.getLogger("llama_broker")

Messages = Sequence[Mapping[str, Any]]


def validate_messages(messages: Any) -> None:
    """Raise :class:`ConfigError` naming the first bad item of ``messages``."""
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
    we would repeat (refused connection, reset before a byte, 503 loading)."""
    if delivered:
        return False
    if isinstance(err, ConnectError):
        return True
    if isinstance(err, APIError):
        return err.status == 503
    if isinstance(err, TimeoutError_):
        return False
    if isinstance(err, TransportError):
        return err.bytes_received == 0 and err.curl_code in RESET_CODES
    return False


def backoff_s(cfg: ModelConfig, attempt: int) -> float:
    """Exponential backoff with jitter (attempt 1 is the first retry)."""
    return cfg.retry_backoff_ms / 1000.0 * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def retry_delay(
    cfg: ModelConfig, err: BaseException, delivered: bool, attempt: int, deadline: float
) -> Optional[float]:
    """The one retry policy of every path: seconds to wait before attempt
    ``attempt + 1`` (logged), or None when ``err`` is final (not retriable,
    out of retries, or the wait would pass the request's deadline)."""
    if attempt >= cfg.max_retries or not retriable(err, delivered):
        return None
    delay = backoff_s(cfg, attempt + 1)
    if time.monotonic() + delay >= deadline:
        return None
    log.warning("retry %d/%d in %.2fs after: %s", attempt + 1, cfg.max_retries, delay, err)
    return delay
