"""``Stream`` and ``AsyncStream``: the chunks of one streamed response."""

from __future__ import annotations

import json
from typing import Any, Dict, Type

from ..chunks import ChunkDecoder
from .. import errors as _e
from ..decoder import json_loads
from ..errors import BrokerError
from ..native import AsyncEventStream, EventStream
from ._errors import JSONDecodeError, _convert, _Request, _Response
from ._types import BaseModel

# -- decoding ----------------------------------------------------------------------


class SDKChunkDecoder(ChunkDecoder):
    """The chunk decoder with the SDK's stream rules: events of any name carry
    data (``event: delta``); a data line that is not JSON raises
    :class:`JSONDecodeError`; any JSON value is a chunk (a non-object is
    yielded as it is); an object with a truthy ``error`` raises, a falsy one
    passes; ``[DONE]`` (as a prefix) ends the stream. An ``error`` event
    (llama-server's ``error:`` line) raises, as llama_broker's decoders do."""

    __slots__ = ()
    other_events_are_data = True

    def _payload(self, payload: bytes) -> None:
        if payload.startswith(b"[DONE]"):
            self.result.done = True
            return
        try:
            obj = json_loads(payload)
        except ValueError:
            text = payload.decode("utf-8", "replace")
            try:
                json.loads(text)
            except ValueError as e:
                err = e if isinstance(e, json.JSONDecodeError) else json.JSONDecodeError(str(e), text, 0)
                raise JSONDecodeError(err.msg, err.doc, err.pos) from None
            super()._payload(payload)  # what json reads and orjson does not: the lenient path
            return
        self._accept(obj, payload, False)  # parsed once (the common case)

    def _skip(self, payload: bytes, why: str) -> None:
        # Not an object: the SDK yields the value as it is.
        self.result.deltas += 1
        self.on_chunk(json.loads(payload.decode("utf-8", "replace")))

    def _object(self, obj: Dict[str, Any], payload: bytes) -> None:
        if "error" in obj:
            if obj["error"]:
                raise _stream_error(obj["error"], payload)
            # A falsy error is no error for the SDK: the chunk goes on as it
            # came; llama_broker's bookkeeping reads it without the key.
            on_chunk = self.on_chunk
            self.on_chunk = lambda _: on_chunk(obj)
            try:
                self._object({k: v for k, v in obj.items() if k != "error"}, payload)
            finally:
                self.on_chunk = on_chunk
            return
        if obj.get("choices").__class__ is list:
            super()._object(obj, payload)
        else:  # no choices list: passed on all the same (the SDK builds it)
            self.result.deltas += 1
            self.on_chunk(obj)


def _stream_error(error: Any, payload: bytes) -> _e.APIError:
    """The SDK's in-stream error: the error's ``message`` when it is a non-empty
    string, else "An error occurred during streaming"; the body is the error."""
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        message = "An error occurred during streaming"
    etype = error.get("type") if isinstance(error, dict) else None
    return _e.APIError(
        message,
        type=etype if isinstance(etype, str) else None,
        code=error.get("code") if isinstance(error, dict) else None,
        body=payload.decode("utf-8", "replace"),
    )


# -- streams -----------------------------------------------------------------------


class Stream:
    """The chunks of one streamed response; an iterator and a context manager.

    ``close()`` (or leaving the ``with`` block) closes the connection, which
    cancels the generation. ``result`` is llama_broker's
    :class:`~llama_broker.StreamResult` once the stream ended.
    """

    def __init__(self, events: EventStream, cast: Type[BaseModel], request: _Request) -> None:
        self._events = events
        self._wrap = cast._w
        self._request = request
        self.response = _Response(200, request, "")

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Any:
        ev = self._events
        q = ev._queue
        if q:
            c = q.popleft()
            return self._wrap(c) if c.__class__ is dict else c  # a non-object goes as it came (as the SDK's)
        try:
            chunk: Any = ev.__next__()  # a chunk dict (EventStream queues chunks, not Deltas)
            return self._wrap(chunk) if chunk.__class__ is dict else chunk
        except BrokerError as err:
            raise _convert(err, self._request) from err

    @property
    def result(self) -> Any:
        """llama_broker's :class:`StreamResult` (usage, timings, ``ttft_s``) once the stream ended; not in the SDK."""
        return self._events.result

    def close(self) -> None:
        """Close the connection (the server stops generating)."""
        self._events.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream:
    """The chunks of one streamed response for :class:`AsyncOpenAI`: an async
    iterator and async context manager (``await stream.close()``), driven by
    curl's socket callbacks on the running loop."""

    def __init__(self, events: AsyncEventStream, cast: Type[BaseModel], request: _Request) -> None:
        self._events = events
        self._wrap = cast._w
        self._request = request
        self.response = _Response(200, request, "")

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Any:
        ev = self._events
        q = ev._queue
        if q:
            c = q.popleft()
            return self._wrap(c) if c.__class__ is dict else c
        try:
            chunk: Any = await ev.__anext__()  # a chunk dict (see Stream.__next__)
            return self._wrap(chunk) if chunk.__class__ is dict else chunk
        except BrokerError as err:
            raise _convert(err, self._request) from err

    @property
    def result(self) -> Any:
        """As :attr:`Stream.result`."""
        return self._events.result

    async def close(self) -> None:
        """Close the connection (the server stops generating)."""
        await self._events.aclose()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
