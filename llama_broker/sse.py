"""Server-sent events: a fast, bounded splitter over the C state machine.

:class:`EventSplitter` takes the bytes of an ``text/event-stream`` body in
whatever chunks the network delivers and returns the complete events of each
chunk as one list. It implements the WHATWG "interpreting an event stream"
rules, plus llama.cpp's ``error: {json}`` lines (an event of type ``error``).
It is usable on its own for any SSE endpoint::

    splitter = EventSplitter()
    for chunk in chunks:
        for ev in splitter.feed(chunk):
            print(ev.event, ev.data)
    splitter.close()
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, Union

from ._sse import ffi, lib
from .errors import ProtocolError

__all__ = ["Event", "EventSplitter", "DEFAULT_MAX_EVENT_BYTES"]

#: Default bound on one event's data (and one line): 16 MiB.
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

_N = lib.LB_SSE_FIELDS
_ERRORS = {
    lib.LB_SSE_ERR_LINE_TOO_LONG: "a line is longer than max_event_bytes ({limit} bytes)",
    lib.LB_SSE_ERR_EVENT_TOO_LONG: "an event's data is longer than max_event_bytes ({limit} bytes)",
    lib.LB_SSE_ERR_NOMEM: "out of memory while buffering an event",
    lib.LB_SSE_ERR_FAILED: "the splitter failed earlier; call reset() before feeding again",
}

Buffer = Union[bytes, bytearray, memoryview]


class Event(NamedTuple):
    """One dispatched event.

    ``event`` is the type (``"message"`` unless an ``event:`` field set it),
    ``data`` the data lines joined with LF, ``id`` the last event id (``""``
    when none was set). Invalid UTF-8 is replaced by U+FFFD.
    """

    event: str
    data: str
    id: str


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class EventSplitter:
    """Incremental SSE parser: ``feed(bytes) -> list[Event]``, ``close() -> list[Event]``.

    ``max_event_bytes`` bounds the memory held for one line or one event's
    data; going over it raises :class:`~llama_broker.errors.ProtocolError`
    (and the splitter stays failed until :meth:`reset`).
    """

    __slots__ = ("_s", "max_event_bytes", "_closed", "dropped_bytes", "fast")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if not isinstance(max_event_bytes, int) or max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be a positive int, got {max_event_bytes!r}")
        ptr = lib.lb_sse_new(max_event_bytes)
        if ptr == ffi.NULL:
            raise MemoryError("lb_sse_new failed")
        self._s = ffi.gc(ptr, lib.lb_sse_free)
        #: The content fast path's view of the last batch (see ``feed_fast``).
        self.fast = lib.lb_sse_fast_info(ptr)
        self.max_event_bytes = max_event_bytes
        self._closed = False
        #: Bytes of an unfinished line or event dropped by :meth:`close`.
        self.dropped_bytes = 0

    def feed_fast(self, chunk: Buffer) -> int:
        """Feed one chunk, extracting the content of common chat chunks in C.

        Returns the number of events in the batch. ``self.fast`` then has
        ``n_fast``, ``text``/``text_len`` (the extracted contents, UTF-8,
        concatenated) and ``marks`` (per event: its content's length in code
        points, or -1 when the event needs the general decoder: read those
        with :meth:`batch`). Used by the chat decoder's hot path.
        """
        if self._closed:
            raise ValueError("feed() after close(); call reset() to start a new stream")
        if type(chunk) is bytes:
            n = lib.lb_sse_feed_fast(self._s, chunk, len(chunk))
        else:
            buf = ffi.from_buffer("unsigned char[]", chunk)
            n = lib.lb_sse_feed_fast(self._s, buf, len(buf))
        if n < 0:
            self._raise(n)
        return int(n)

    def batch(self, n: int) -> Tuple[bytes, List[int]]:
        """``(out, records)`` of the last batch of ``n`` events (as :meth:`feed_raw`)."""
        s = self._s
        out = ffi.buffer(lib.lb_sse_out(s), lib.lb_sse_out_len(s))[:]
        return out, ffi.unpack(lib.lb_sse_records(s), n * _N)

    def _raise(self, n: int) -> None:
        raise ProtocolError(
            _ERRORS.get(n, f"splitter error {n}").format(limit=self.max_event_bytes)
            + f" (after {lib.lb_sse_bytes_fed(self._s)} bytes of stream)"
        )

    def feed_raw(self, chunk: Buffer) -> Tuple[bytes, List[int]]:
        """Feed one chunk; return ``(out, records)`` without building Events.

        ``records`` holds ``LB_SSE_FIELDS`` (6) ints per event: data offset,
        data length, type offset, type length, id offset, id length, all into
        ``out``. This is the hot path the client uses; :meth:`feed` wraps it.
        """
        if self._closed:
            raise ValueError("feed() after close(); call reset() to start a new stream")
        s = self._s
        if type(chunk) is bytes:
            n = lib.lb_sse_feed(s, chunk, len(chunk))
        else:  # zero-copy; len() of the cdata is the byte count (a memoryview's len() is not)
            buf = ffi.from_buffer("unsigned char[]", chunk)
            n = lib.lb_sse_feed(s, buf, len(buf))
        if n <= 0:
            if n == 0:
                return b"", []
            self._raise(n)
        return self.batch(n)

    def feed(self, chunk: Buffer) -> List[Event]:
        """Feed one chunk of the stream; return the events it completed, in order."""
        out, recs = self.feed_raw(chunk)
        events = []
        for i in range(0, len(recs), _N):
            d, dn, t, tn, k, kn = recs[i : i + _N]
            events.append(
                Event(
                    _text(out[t : t + tn]) if tn else "message",
                    _text(out[d : d + dn]),
                    _text(out[k : k + kn]) if kn else "",
                )
            )
        return events

    def close(self) -> List[Event]:
        """End of stream. An unfinished event is dropped (per the spec), so
        this returns ``[]``; :attr:`dropped_bytes` tells how much was dropped."""
        if not self._closed:
            self.dropped_bytes = lib.lb_sse_pending(self._s)
            self._closed = True
        return []

    def reset(self) -> None:
        """Start a new stream, keeping the allocated buffers."""
        lib.lb_sse_reset(self._s)
        self._closed = False
        self.dropped_bytes = 0

    @property
    def retry(self) -> Optional[int]:
        """The last valid ``retry:`` value in milliseconds, or ``None``."""
        r = lib.lb_sse_retry(self._s)
        return None if r < 0 else int(r)

    @property
    def pending_bytes(self) -> int:
        """Bytes held for an unfinished line or event."""
        return int(lib.lb_sse_pending(self._s))

    @property
    def bytes_fed(self) -> int:
        """Bytes fed since the start of the stream."""
        return int(lib.lb_sse_bytes_fed(self._s))

    def __repr__(self) -> str:
        return f"EventSplitter(max_event_bytes={self.max_event_bytes}, pending={self.pending_bytes})"
