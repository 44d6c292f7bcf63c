"""The error tree of llama_broker.

::

    BrokerError                 anything this library raises on purpose
    ├── ConfigError             bad configuration or request, found before any I/O
    ├── TransportError          connect, timeout, reset, stream ended before [DONE]
    │   ├── ConnectError        the connection could not be made (safe to retry)
    │   └── TimeoutError_       a connect, idle or total timeout fired
    ├── APIError                the server said no: HTTP status, or an error inside the stream
    └── ProtocolError           the server sent something undecodable, or an event over the limit

Backend (pycurl) errors are translated in one place, ``transport.py``, and
raised ``from`` the original. ``str(err)`` starts with ``transport: ``,
``api: ``, ``protocol: `` or ``config: ``. No message ever carries the API key.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "BrokerError",
    "ConfigError",
    "TransportError",
    "ConnectError",
    "TimeoutError_",
    "APIError",
    "ProtocolError",
]


class BrokerError(Exception):
    """Base class of every error llama_broker raises on purpose."""

    prefix = "broker"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.prefix}: {self.message}"


class ConfigError(BrokerError, ValueError):
    """A bad configuration value or request argument, found before any I/O."""

    prefix = "config"


class TransportError(BrokerError):
    """The connection failed: connect, timeout, reset, or the stream ended early.

    ``curl_code`` is libcurl's error number when curl reported it,
    ``bytes_received`` how many body bytes had arrived, and
    ``delivered`` whether any delta had reached the caller (such a request is
    never retried: the caller would see text twice).
    """

    prefix = "transport"

    def __init__(
        self,
        message: str,
        *,
        curl_code: Optional[int] = None,
        bytes_received: int = 0,
        delivered: bool = False,
    ) -> None:
        super().__init__(message)
        self.curl_code = curl_code
        self.bytes_received = bytes_received
        self.delivered = delivered


class ConnectError(TransportError):
    """The connection could not be established (refused, DNS, TLS handshake)."""


class TimeoutError_(TransportError):  # noqa: N801 - avoid shadowing the builtin
    """A connect, idle (no byte for ``idle_timeout_ms``) or total timeout fired."""


class APIError(BrokerError):
    """The server reported an error.

    ``status`` is the HTTP status, or ``None`` when the error came inside the
    event stream; ``message``, ``type`` and ``code`` are the server's own
    (from its ``{"error": {...}}`` envelope), ``body`` the raw body (bounded)
    when it was not JSON.
    """

    prefix = "api"

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        type: Optional[str] = None,  # noqa: A002 - the server's field name
        code: Optional[object] = None,
        body: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.body = body

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "in stream"
        kind = f" ({self.type})" if self.type else ""
        return f"api: {where}{kind}: {self.message}"


class ProtocolError(BrokerError):
    """The server sent bytes that cannot be decoded, or an event over ``max_event_bytes``."""

    prefix = "protocol"
