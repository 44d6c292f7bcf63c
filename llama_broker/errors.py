"""The error tree of llama_broker.

::

    BrokerError                 anything this library raises on purpose
    ├── ConfigError             bad configuration or request, found before any I/O
    ├── TransportError          connect, timeout, reset, stream ended before [DONE]
    │   ├── ConnectError        the connection could not be made (safe to retry)
    │   │   └── TLSVerifyError  the server's certificate failed verification (never retried)
    │   └── TimeoutError_       a connect, idle or total timeout fired
    ├── APIError                the server said no: HTTP status, or an error inside the stream
    └── ProtocolError           the server sent something undecodable, or an event over the limit

Backend (pycurl) errors are translated in one place, ``transport.py``, and
raised ``from`` the original. ``str(err)`` starts with ``transport: ``,
``api: ``, ``protocol: `` or ``config: ``. No message ever carries the API key.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

__all__ = [
    "Headers",
    "BrokerError",
    "ConfigError",
    "TransportError",
    "ConnectError",
    "TLSVerifyError",
    "TimeoutError_",
    "APIError",
    "ProtocolError",
]


class Headers(Mapping[str, str]):
    """A response's headers: a read-only mapping whose names are case-insensitive.

    Names are kept lower-cased (iteration yields ``"retry-after"``), lookups
    take any case (``h["Retry-After"]``, ``h.get("retry-after")``); a header
    sent more than once reads as its values joined with ``", "``.
    """

    __slots__ = ("_d",)

    def __init__(self, items: Union[Mapping[str, str], Iterable[Tuple[str, str]]] = ()) -> None:
        d: Dict[str, str] = {}
        pairs = items.items() if isinstance(items, Mapping) else items
        for k, v in pairs:
            k = k.lower()
            d[k] = f"{d[k]}, {v}" if k in d else v
        self._d = d

    def __getitem__(self, name: str) -> str:
        if not isinstance(name, str):
            raise KeyError(name)
        return self._d[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, Mapping):
            return self._d == {str(k).lower(): v for k, v in other.items()}
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Headers({self._d!r})"


_NO_HEADERS = Headers()


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


class TLSVerifyError(ConnectError):
    """TLS was refused on our side: the server's certificate failed verification
    (unknown issuer, self-signed, wrong host name, expired) or the CA bundle
    could not be used. Retrying cannot help, so it is never retried; the
    message says how to trust the server (``ModelConfig(ca_bundle=...)``)."""


class TimeoutError_(TransportError):  # noqa: N801 - avoid shadowing the builtin
    """A connect, idle (no byte for ``idle_timeout_ms``) or total timeout fired."""


class APIError(BrokerError):
    """The server reported an error.

    ``status`` is the HTTP status, or ``None`` when the error came inside the
    event stream; ``message``, ``type`` and ``code`` are the server's own
    (from its ``{"error": {...}}`` envelope), ``body`` the raw body (bounded)
    when it was not JSON. ``headers`` are the error response's headers as a
    case-insensitive :class:`Headers` mapping (``err.headers.get("retry-after")``);
    empty for an error reported inside the stream.
    """

    prefix = "api"
    headers: Headers = _NO_HEADERS

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        type: Optional[str] = None,  # noqa: A002 - the server's field name
        code: Optional[object] = None,
        body: Optional[str] = None,
        headers: Optional[Union[Mapping[str, str], Iterable[Tuple[str, str]]]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.body = body
        if headers is not None:
            self.headers = headers if isinstance(headers, Headers) else Headers(headers)

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "in stream"
        kind = f" ({self.type})" if self.type else ""
        return f"api: {where}{kind}: {self.message}"


class ProtocolError(BrokerError):
    """The server sent bytes that cannot be decoded, or an event over ``max_event_bytes``."""

    prefix = "protocol"
