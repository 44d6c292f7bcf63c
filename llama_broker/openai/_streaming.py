"""``Stream`` and ``AsyncStream``: the chunks of one streamed response."""

from __future__ import annotations

from typing import Any, Type

from ..errors import BrokerError
from ..native import AsyncEventStream, EventStream
from ._errors import _convert, _Request, _Response
from ._types import BaseModel

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
            return self._wrap(q.popleft())
        try:
            chunk: Any = ev.__next__()  # a chunk dict (EventStream queues chunks, not Deltas)
            return self._wrap(chunk)
        except BrokerError as err:
            raise _convert(err, self._request) from err

    @property
    def result(self) -> Any:
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
            return self._wrap(q.popleft())
        try:
            chunk: Any = await ev.__anext__()  # a chunk dict (see Stream.__next__)
            return self._wrap(chunk)
        except BrokerError as err:
            raise _convert(err, self._request) from err

    @property
    def result(self) -> Any:
        return self._events.result

    async def close(self) -> None:
        """Close the connection (the server stops generating)."""
        await self._events.aclose()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
