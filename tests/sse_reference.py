"""A slow, obviously-correct reference for the SSE splitter, written from the spec.

WHATWG HTML, "interpreting an event stream", read over bytes (every byte the
rules look at -- CR, LF, ':', ' ', the BOM -- is ASCII or the BOM itself, so
working on bytes and decoding each value afterwards with ``'replace'`` gives
the same text as decoding first), plus:

* llama.cpp's extension: a line whose field is ``error`` acts as
  ``event: error`` followed by ``data: <value>``;
* the splitter's bounds: a line (without its line end) longer than
  ``max_event_bytes + LINE_SLACK`` fails with ``"line"``, even when the stream
  ends before the line does; an event whose joined data would be longer than
  ``max_event_bytes`` fails with ``"event"``, and so does an ``event`` or
  ``id`` value longer than ``max_event_bytes`` (``error`` sets the constant
  type ``error``, which is never too long). The line bound is checked first.

The whole stream is parsed in one go: there is no chunking here at all, which
is the point -- the C splitter fed in any chunks must give what this gives.
"""

from __future__ import annotations

import re
from typing import List, NamedTuple, Optional

__all__ = ["LINE_SLACK", "RETRY_MAX", "RefEvent", "RefResult", "parse"]

LINE_SLACK = 64
RETRY_MAX = 2**63 - 1  # the C keeps retry in a long long and saturates
BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")  # CRLF first: it is one line end


class RefEvent(NamedTuple):
    event: str
    data: str
    id: str


class RefResult(NamedTuple):
    events: List[RefEvent]  # dispatched before the end (or before the error)
    retry: Optional[int]  # last valid retry, None when none
    error: Optional[str]  # None, "line" or "event"
    pending: int  # bytes an end of stream would drop (when error is None)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def parse(stream: bytes, max_event_bytes: Optional[int] = None) -> RefResult:
    """Parse a whole stream; ``max_event_bytes=None`` means no bounds."""
    stream = bytes(stream)
    if len(stream) < len(BOM) and BOM.startswith(stream):
        # Nothing but the start of a BOM yet: it is held, not text.
        return RefResult([], None, None, len(stream))
    if stream.startswith(BOM):
        stream = stream[len(BOM) :]

    pieces = _LINE_END.split(stream)
    lines, unfinished = pieces[:-1], pieces[-1]

    events: List[RefEvent] = []
    data = b""  # the data buffer: each data line appends value + LF
    event_type = b""
    last_id = b""
    retry: Optional[int] = None
    big = max_event_bytes is not None

    def result(error: Optional[str]) -> RefResult:
        return RefResult(events, retry, error, len(unfinished) + len(data))

    for line in lines:
        if big and len(line) > max_event_bytes + LINE_SLACK:
            return result("line")
        if line == b"":
            # Dispatch.
            if data == b"":
                event_type = b""
                continue
            events.append(
                RefEvent(
                    _text(event_type) if event_type else "message",
                    _text(data[:-1]),
                    _text(last_id),
                )
            )
            data = b""
            event_type = b""
            continue
        if line.startswith(b":"):
            continue  # comment
        if b":" in line:
            name, value = line.split(b":", 1)
            if value.startswith(b" "):
                value = value[1:]
        else:
            name, value = line, b""

        if name == b"error":
            event_type = b"error"
            name = b"data"
        if name == b"data":
            if big and len(data) + len(value) > max_event_bytes:
                return result("event")
            data += value + b"\n"
        elif name == b"event":
            if big and len(value) > max_event_bytes:
                return result("event")
            event_type = value
        elif name == b"id":
            if b"\0" in value:
                continue
            if big and len(value) > max_event_bytes:
                return result("event")
            last_id = value
        elif name == b"retry":
            if value and all(c in b"0123456789" for c in value):
                retry = min(int(value), RETRY_MAX)
        # any other field is ignored

    if big and len(unfinished) > max_event_bytes + LINE_SLACK:
        return result("line")
    return result(None)
