"""``with_raw_response`` / ``with_streaming_response``: the response's status,
headers and URL next to what ``create()`` returns.

A raw call runs the ordinary call with a capture set in a context variable.
The drop-in's decoder factories look at it once per request (never per
chunk): when it is set they make decoders that keep their transport
:class:`~llama_broker.transport.Call`, whose status line and headers the
transport collects for every response anyway. Nothing else changes on the
path, so a raw call retries, streams and fails exactly as the plain one.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import json
import time
from contextvars import ContextVar
from typing import Any, Callable, List, Optional

from ..config import mask_url
from ..decoder import JSONBody
from ..errors import ConfigError, Headers
from ..native import ChunkDecoder
from ._errors import _Request, _Response
from ._streaming import SDKChunkDecoder
from ._types import _dump

__all__ = ["LegacyAPIResponse", "AsyncAPIResponse"]


class _KeptChunkDecoder(SDKChunkDecoder):
    """The drop-in's chunk decoder, which the transport hands its Call (``keeps_call``)."""

    __slots__ = ("call",)
    keeps_call = True
    call: Any


class _KeptJSONBody(JSONBody):
    """A JSONBody that the transport hands its Call (``keeps_call``)."""

    __slots__ = ("call",)
    keeps_call = True
    call: Any


class _Capture:
    """The decoders of one raw call's attempts (the last one answered)."""

    __slots__ = ("decoders", "t0")

    def __init__(self) -> None:
        self.decoders: List[Any] = []
        self.t0 = time.monotonic()

    def chunk_decoders(self, push: Callable[[Any], Any], strict: bool, limit: int) -> Callable[[float], ChunkDecoder]:
        def make(t0: float) -> ChunkDecoder:
            dec = _KeptChunkDecoder(push, strict=strict, t0=t0, max_event_bytes=limit)
            dec.call = None
            self.decoders.append(dec)
            return dec

        return make

    def json_body(self) -> JSONBody:
        dec = _KeptJSONBody()
        dec.call = None
        self.decoders.append(dec)
        return dec

    @property
    def call(self) -> Any:
        for dec in reversed(self.decoders):
            if getattr(dec, "call", None) is not None:
                return dec.call
        return None


#: Set while a raw call runs (see the module docstring).
_CAPTURE: ContextVar[Optional[_Capture]] = ContextVar("llama_broker_openai_raw", default=None)


def json_decoder() -> JSONBody:
    """The decoder of a plain JSON request: a plain JSONBody, or one that keeps
    its Call while a raw call runs."""
    cap = _CAPTURE.get()
    return JSONBody() if cap is None else cap.json_body()


class LegacyAPIResponse:
    """What ``with_raw_response.<method>(...)`` returns (the SDK's name):
    ``status_code``, ``headers`` (case-insensitive), ``url``, ``method``,
    ``http_request``, ``request_id``, ``retries_taken``, ``elapsed``, ``text``
    and ``content`` (the body; for a non-streamed chat or text completion,
    which llama_broker receives as a stream, the JSON of the assembled
    answer) and ``parse()``: what the plain call returns (with
    ``stream=True``, the :class:`Stream`)."""

    def __init__(self, result: Any, cap: _Capture, method: str, url: str, stream: bool) -> None:
        self._result = result
        self._stream = stream
        self.elapsed = datetime.timedelta(seconds=time.monotonic() - cap.t0)
        self.retries_taken = max(0, len(cap.decoders) - 1)
        call = cap.call
        self.status_code: int = (call.status if call is not None else None) or 200
        self.headers: Headers = call.response_headers() if call is not None else Headers()
        self.method = call.method if call is not None else method
        self.url = mask_url(call.url) if call is not None else url
        self._body: Optional[bytes] = None
        if call is not None and isinstance(cap.decoders[-1], JSONBody):
            self._body = b"".join(call.body_parts)

    def parse(self, *, to: Any = None) -> Any:
        """What the plain call returns: the response object, page or Stream."""
        if to is not None:
            raise ConfigError("parse(to=...) is not supported by llama_broker's drop-in: parse() gives the SDK's type")
        return self._result

    @property
    def http_request(self) -> _Request:
        """The request's method and URL (the SDK gives an httpx request)."""
        return _Request(self.method, self.url)

    @property
    def http_response(self) -> _Response:
        """Status, request, body and headers (the SDK gives an httpx response); the body is empty for a stream."""
        return _Response(self.status_code, self.http_request, "" if self._stream else self.text, self.headers)

    @property
    def request_id(self) -> Optional[str]:
        """The ``x-request-id`` response header, or None (llama-server sends none)."""
        return self.headers.get("x-request-id")

    @property
    def http_version(self) -> str:
        """Always ``"HTTP/1.1"``."""
        return "HTTP/1.1"

    @property
    def is_closed(self) -> bool:
        """True once the body is read: always, except with ``stream=True``."""
        return not self._stream

    @property
    def content(self) -> bytes:
        """The body (see the class docstring); a :class:`ConfigError` with ``stream=True``."""
        if self._stream:
            raise ConfigError("with stream=True the body is read through parse() (the Stream)")
        if self._body is not None:
            return self._body
        return json.dumps(_dump(self._result), ensure_ascii=False).encode("utf-8")

    @property
    def text(self) -> str:
        """``content`` decoded as UTF-8 (bad bytes replaced)."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """``content`` parsed as JSON."""
        return json.loads(self.content)

    def __repr__(self) -> str:
        return f"<APIResponse [{self.status_code}] type={type(self._result).__name__}>"


class AsyncAPIResponse(LegacyAPIResponse):
    """``with_streaming_response`` on :class:`AsyncOpenAI`: as :class:`LegacyAPIResponse`,
    with ``await parse()`` (the SDK's async shape)."""

    async def parse(self, *, to: Any = None) -> Any:  # type: ignore[override]
        """What the plain call returns (see :meth:`LegacyAPIResponse.parse`)."""
        return LegacyAPIResponse.parse(self, to=to)


def _close_result(result: Any) -> None:
    close = getattr(result, "close", None)
    if callable(close) and not inspect.iscoroutinefunction(close):
        close()


def _request_of(resource: Any) -> str:
    return str(getattr(getattr(resource, "_client", None), "base_url", ""))


class _RawResource:
    """``resource.with_raw_response``: the resource's methods, returning
    :class:`LegacyAPIResponse` (``await``-able ones on :class:`AsyncOpenAI`)."""

    def __init__(self, resource: Any, response_cls: type = LegacyAPIResponse) -> None:
        self._resource = resource
        self._cls = response_cls

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name.startswith("with_"):
            raise AttributeError(name)
        fn = getattr(self._resource, name)
        if not callable(fn):
            raise AttributeError(name)
        cls = self._cls
        if getattr(self._resource, "_is_async", False):

            @functools.wraps(fn)
            async def araw(*args: Any, **kwargs: Any) -> LegacyAPIResponse:
                cap = _Capture()
                token = _CAPTURE.set(cap)
                try:
                    result = fn(*args, **kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                finally:
                    _CAPTURE.reset(token)
                return cls(result, cap, _method(name), _request_of(self._resource), bool(kwargs.get("stream")))

            return araw

        @functools.wraps(fn)
        def raw(*args: Any, **kwargs: Any) -> LegacyAPIResponse:
            cap = _Capture()
            token = _CAPTURE.set(cap)
            try:
                result = fn(*args, **kwargs)
            finally:
                _CAPTURE.reset(token)
            return cls(result, cap, _method(name), _request_of(self._resource), bool(kwargs.get("stream")))

        return raw


def _method(name: str) -> str:
    return "GET" if name in ("list", "retrieve") else "POST"


class _ResponseContext:
    """``with_streaming_response.<method>(...)``: a context manager (``with`` /
    ``async with``) whose value is the raw response; leaving it closes a stream."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call = call
        self._response: Optional[LegacyAPIResponse] = None

    def __enter__(self) -> LegacyAPIResponse:
        self._response = self._call()
        return self._response

    def __exit__(self, *exc: object) -> None:
        if self._response is not None:
            _close_result(self._response._result)

    async def __aenter__(self) -> LegacyAPIResponse:
        self._response = await self._call()
        return self._response

    async def __aexit__(self, *exc: object) -> None:
        r = self._response
        if r is not None:
            close = getattr(r._result, "close", None)
            if callable(close):
                out = close()
                if inspect.isawaitable(out):
                    await out


class _StreamingResource:
    """``resource.with_streaming_response``: methods returning a
    :class:`_ResponseContext` (the request is sent when the block is entered)."""

    def __init__(self, resource: Any) -> None:
        is_async = getattr(resource, "_is_async", False)
        self._raw = _RawResource(resource, AsyncAPIResponse if is_async else LegacyAPIResponse)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raw = getattr(self._raw, name)

        @functools.wraps(raw)
        def streaming(*args: Any, **kwargs: Any) -> _ResponseContext:
            return _ResponseContext(lambda: raw(*args, **kwargs))

        return streaming


class _RawClient:
    """``client.with_raw_response`` / ``client.with_streaming_response``: the
    client's resources (``chat.completions``, ``completions``, ``embeddings``,
    ``models``) with their raw wrappers."""

    def __init__(self, client: Any, attr: str) -> None:
        self._client = client
        self._attr = attr

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        res = getattr(self._client, name)
        if name == "chat":
            return _RawChat(res, self._attr)
        return getattr(res, self._attr)


class _RawChat:
    def __init__(self, chat: Any, attr: str) -> None:
        self.completions = getattr(chat.completions, attr)

