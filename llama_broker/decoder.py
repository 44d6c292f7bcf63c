"""Turn SSE payloads of an OpenAI-shaped chat stream into deltas.

One :class:`StreamDecoder` per request. ``feed(out, records)`` takes one
batch from :meth:`EventSplitter.feed_raw` (all events of one network chunk)
and dispatches it. The common llama-server chunk — one choice whose delta is
only ``content`` — takes a short path: decode, four lookups, one call. Every
other shape (role, finish_reason, reasoning, tool calls, logprobs, usage,
timings, errors, garbage) goes through :meth:`StreamDecoder._general`.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol

from ._log import log
from ._sse import ffi, lib
from .errors import APIError, ProtocolError
from .sse import DEFAULT_MAX_EVENT_BYTES, EventSplitter

__all__ = ["Delta", "JSONBody", "StreamResult", "StreamDecoder", "api_error_from_body", "json_loads"]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    x = float(text)
    if math.isinf(x):
        raise ValueError(f"number {text} is out of the double range")
    return x


# A \uD800-\uDFFF escape: a surrogate, paired or not (only a hint: checked after decoding).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# After json has decoded a string, any surrogate left in it is a lone one.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(o: Any) -> bool:
    c = o.__class__
    if c is str:
        return not o.isascii() and _LONE_SURROGATE.search(o) is not None
    if c is list:
        return any(_has_lone_surrogate(x) for x in o)
    if c is dict:
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in o.items())
    return False


def _json_strict_loads(payload: Any) -> Any:
    """``json.loads`` refusing what orjson refuses: NaN/Infinity, numbers past
    the double range, lone surrogate escapes (the lenient path takes those)."""
    obj = json.loads(payload, parse_constant=_refuse_constant, parse_float=_finite_float)
    raw = payload if payload.__class__ is bytes else str(payload).encode("utf-8", "surrogatepass")
    if _SURROGATE_ESCAPE.search(raw) is not None and _has_lone_surrogate(obj):
        raise ValueError("a lone surrogate escape")
    return obj


_REAL_LOADS: Optional[Callable[[Any], Any]] = None


def _real_loads() -> Callable[[Any], Any]:
    """The JSON decoder of every layer: orjson when installed (~3x faster than
    json on the few chunks the C fast path leaves to Python), else ``json``
    refusing what orjson refuses, so that both installs take the same paths.
    Imported on first use: orjson brings uuid, zoneinfo and platform along
    (~5-10 ms), which ``import llama_broker`` does not pay."""
    global _REAL_LOADS, _loads
    if _REAL_LOADS is None:
        try:
            from orjson import loads as real
        except ImportError:  # pragma: no cover - exercised when orjson is absent
            real = _json_strict_loads
        _REAL_LOADS = real
        if _loads is _first_loads:
            _loads = real
    return _REAL_LOADS


def _first_loads(payload: Any) -> Any:
    """``_loads`` until the first payload: it puts the real decoder in its place."""
    return _real_loads()(payload)


_loads: Callable[[Any], Any] = _first_loads


def __getattr__(name: str) -> Any:
    # ``json_loads`` (``from .decoder import json_loads``: the layers above)
    # is the real decoder, imported when first asked for.
    if name == "json_loads":
        return _real_loads()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lenient_loads(payload: bytes) -> Any:
    """What the standard ``json`` module makes of a payload the strict loader
    refused (lone surrogates stay in the strings; NaN, Infinity, 1e400 become
    floats); ``ValueError`` when it is not JSON at all."""
    try:
        return json.loads(payload)
    except ValueError:  # invalid UTF-8 (UnicodeDecodeError is a ValueError)
        return json.loads(payload.decode("utf-8", "replace"))


def _scrub(o: Any) -> Any:
    """``o`` with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    c = o.__class__
    if c is str:
        return o if o.isascii() else _LONE_SURROGATE.sub("\ufffd", o)
    if c is list:
        return [_scrub(x) for x in o]
    if c is dict:
        return {_scrub(k): _scrub(v) for k, v in o.items()}
    return o


_TEXT_FIELDS = ("content", "reasoning_content")


def join_surrogates(pending: Dict[Any, str], key: Any, s: Optional[str], end: bool) -> Optional[str]:
    """One text piece of a choice's field (``key``: (index, field)) with the
    surrogate halves fixed, ``pending`` holding the halves between pieces: a
    high surrogate held from the previous piece pairs with a low one starting
    this piece, or becomes U+FFFD; a high surrogate ending this piece is held
    for the next one (unless the choice ends here, ``end``); any other lone
    surrogate becomes U+FFFD. Returns the text, ``None`` when nothing is left."""
    pend = pending.pop(key, None)
    if pend is not None:
        if s and "\udc00" <= s[0] <= "\udfff":
            s = chr(0x10000 + ((ord(pend) - 0xD800) << 10) + (ord(s[0]) - 0xDC00)) + s[1:]
        elif s or end:
            s = "\ufffd" + (s or "")
        else:  # this piece has nothing of that field: keep waiting
            pending[key] = pend
            return s
    if s and not s.isascii():
        if not end and "\ud800" <= s[-1] <= "\udbff":
            pending[key] = s[-1]
            s = s[:-1]
        s = _LONE_SURROGATE.sub("\ufffd", s)
    return s or None


def lenient_payload(decoder: Any, payload: bytes) -> Any:
    """A payload the strict loader refused, read by the standard ``json``
    module (a lone surrogate escape, NaN/Infinity, a number past the double
    range) with every lone surrogate replaced by U+FFFD, except in the
    choices' delta texts: those are fixed in place by :func:`fix_chunk_texts`
    (a pair split over two chunks is rejoined). Returns ``None`` after
    skipping a payload that is not JSON at all; with ``decoder.strict`` any
    such payload raises :class:`ProtocolError`."""
    try:
        obj = _lenient_loads(payload)
    except ValueError:
        skip_payload(decoder, payload, "not JSON")
        return None
    if decoder.strict:
        skip_payload(
            decoder, payload, "not strict JSON: a lone surrogate escape, NaN/Infinity or a number past the double range"
        )
    if obj.__class__ is not dict:
        return _scrub(obj)
    raw = _raw_texts(obj)
    obj = _scrub(obj)
    fix_chunk_texts(decoder._pending, obj, raw)
    return obj


def fix_chunk_texts(pending: Dict[Any, str], obj: Dict[str, Any], raw_texts: Optional[Dict[Any, str]] = None) -> None:
    """Apply :func:`join_surrogates` to the delta texts of every choice of a
    chunk object, in place (``raw_texts``: from :func:`_raw_texts`, before
    the chunk was scrubbed)."""
    choices = obj.get("choices")
    if choices.__class__ is not list:
        return
    for pos, c in enumerate(choices):
        delta = c.get("delta") if c.__class__ is dict else None
        if delta.__class__ is not dict:
            continue
        index = c.get("index")
        if index.__class__ is not int or index < 0:
            index = pos
        end = c.get("finish_reason").__class__ is str
        for f in _TEXT_FIELDS:
            v = raw_texts.get((pos, f), delta.get(f)) if raw_texts else delta.get(f)
            if v is not None and v.__class__ is not str:
                continue
            new = join_surrogates(pending, (index, f), v, end)
            if new != v:
                delta[f] = new if new is not None else ""


def _raw_texts(obj: Dict[str, Any]) -> Dict[Any, str]:
    """The delta texts of a lenient chunk that hold a surrogate, by (choice
    position, field): kept raw so that a pair split over two chunks can be
    rejoined (everything else of the chunk is scrubbed)."""
    out: Dict[Any, str] = {}
    choices = obj.get("choices")
    if choices.__class__ is list:
        for pos, c in enumerate(choices):
            delta = c.get("delta") if c.__class__ is dict else None
            if delta.__class__ is dict:
                for f in _TEXT_FIELDS:
                    v = delta.get(f)
                    if v.__class__ is str and _has_lone_surrogate(v):
                        out[(pos, f)] = v
    return out



_N = 6  # LB_SSE_FIELDS
_feed_fast = lib.lb_sse_feed_fast
_unpack = ffi.unpack
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError)


class Delta(NamedTuple):
    """One streamed piece of the reply. Fields the chunk did not carry are ``None``.

    ``tool_calls`` holds the raw OpenAI tool-call fragments of this chunk
    (``index``, ``id``, ``function.name``, ``function.arguments`` pieces);
    ``logprobs`` the chunk's ``logprobs`` object (with ``n_probs``/``logprobs``).
    ``index`` is the choice the delta belongs to: always 0 unless the request
    asked for several choices (``n > 1``), whose deltas arrive interleaved.
    """

    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None
    finish_reason: Optional[str] = None
    logprobs: Optional[Dict[str, Any]] = None
    # (a field named like tuple.index() shadows that method, as OpenAI's name wants)
    index: int = 0  # type: ignore[assignment]


@dataclass
class StreamResult:
    """What one streamed request ended with (the text itself went to the caller).

    ``usage`` is the OpenAI usage object (with ``stream_options.include_usage``),
    ``timings`` llama.cpp's own (``prompt_n``, ``prompt_ms``, ``predicted_n``,
    ``predicted_ms``, ``predicted_per_second``, …). ``events`` counts data
    events, ``deltas`` the content deltas delivered, ``skipped`` the payloads
    that could not be decoded and were skipped (``strict=False``), ``retries``
    the attempts made before the one that answered. ``ttft_s`` is the time to
    the first content (or reasoning) delta, ``elapsed_s`` the whole request.
    With ``n > 1``, ``finish_reason`` is the first choice's.
    """

    finish_reason: Optional[str] = None
    usage: Optional[Dict[str, Any]] = None
    timings: Optional[Dict[str, Any]] = None
    events: int = 0
    deltas: int = 0
    skipped: int = 0
    retries: int = 0
    model: Optional[str] = None
    id: Optional[str] = None
    ttft_s: Optional[float] = None
    elapsed_s: float = 0.0
    done: bool = False
    status: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def api_error_from_body(body: Any, status: Optional[int], raw: Optional[str] = None) -> APIError:
    """An :class:`APIError` from a server error envelope (``{"error": {...}}``),
    a bare error object, a string, or anything else (then ``raw`` is the message)."""
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        message = err.get("message")
        if not isinstance(message, str):
            message = raw if raw is not None else json.dumps(err, ensure_ascii=False)[:2000]
        etype = err.get("type")
        return APIError(
            message,
            status=status,
            type=etype if isinstance(etype, str) else None,
            code=err.get("code"),
            body=raw,
        )
    if isinstance(err, str):
        return APIError(err, status=status, body=raw)
    return APIError(raw if raw is not None else repr(err)[:2000], status=status, body=raw)


def whole_body_as_chunk(body: bytes) -> Dict[str, Any]:
    """A whole (non-streamed) completion body as one stream chunk: each
    choice's ``message`` becomes its ``delta``. An error envelope raises
    :class:`APIError`; anything else that is not a completion, ProtocolError."""
    try:
        obj = _loads(body)
    except ValueError:
        try:  # lone surrogates (U+FFFD), NaN, numbers past the double range
            obj = _scrub(_lenient_loads(body))
        except ValueError:
            obj = None
    if obj.__class__ is not dict or obj.get("choices").__class__ is not list:
        if obj.__class__ is dict and "error" in obj:
            raise api_error_from_body(obj, None, body.decode("utf-8", "replace"))
        raise ProtocolError(
            "the server answered with a non-event-stream body that is not a completion: "
            f"{body[:200].decode('utf-8', 'replace')!r}"
        )
    chunk = dict(obj)
    choices = []
    for c in obj["choices"]:
        if c.__class__ is not dict:
            continue
        c = dict(c)
        if "message" in c:
            c["delta"] = c.pop("message") or {}
        choices.append(c)
    chunk["choices"] = choices
    if chunk.get("object") == "chat.completion":
        chunk["object"] = "chat.completion.chunk"
    return chunk


def record_envelope(res: StreamResult, obj: Dict[str, Any], payload: bytes) -> bool:
    """What every chunk shape carries around its choices: raise an error
    envelope as :class:`APIError`; keep the first ``id``/``model`` and any
    ``usage``/``timings`` in ``res``. True when the chunk had usage or timings."""
    if "error" in obj and obj.get("choices") is None:
        raise api_error_from_body(obj, None, payload.decode("utf-8", "replace"))
    if res.id is None and obj.get("id").__class__ is str:
        res.id = obj["id"]
        model = obj.get("model")
        res.model = model if model.__class__ is str else None
    usage = obj.get("usage")
    if usage.__class__ is dict:
        res.usage = usage
    timings = obj.get("timings")
    if timings.__class__ is dict:
        res.timings = timings
    return usage is not None or timings is not None


def skip_payload(decoder: Any, payload: bytes, why: str) -> None:
    """An undecodable payload: a ``ProtocolError`` when ``decoder.strict``, else
    counted in ``decoder.result.skipped`` and logged (the first five)."""
    res = decoder.result
    if decoder.strict:
        raise ProtocolError(
            f"undecodable stream payload ({why}) after {res.events} events: "
            f"{payload[:200].decode('utf-8', 'replace')!r}"
        )
    res.skipped += 1
    if decoder._warned < 5:
        decoder._warned += 1
        log.warning("skipped an undecodable stream payload (%s): %.200r", why, payload)


class Decoder(Protocol):
    """What a request's decoder gives the transport (StreamDecoder, the native
    and drop-in decoders, JSONBody): ``feed(*batch)`` takes one splitter batch
    of a ``text/event-stream`` body, ``feed_whole(body)`` a plain body, and
    ``result`` is what the request returns."""

    def feed(self, *batch: Any) -> Any:
        """Decode one splitter batch of an event-stream body."""
        ...

    def feed_whole(self, body: bytes) -> Any:
        """Decode a whole plain (not event-stream) body."""
        ...

    @property
    def result(self) -> Any:
        """What the request returns once the body is decoded."""
        ...


class StreamDecoder:
    """Decodes one chat stream's events and hands content to the caller.

    ``on_content(str)`` gets each non-empty content delta of the first choice
    (index 0; the other choices of an ``n > 1`` request are not mixed in).
    ``on_delta(Delta)``, when given, gets every delta of every choice that
    carries anything (content included, ``Delta.index`` telling the choice),
    and ``on_content`` is then not used.

    A payload that only the lenient standard ``json`` module reads (a lone
    surrogate escape, NaN/Infinity, a number past the double range) is a
    ``ProtocolError`` when ``strict``; otherwise it is decoded: a surrogate
    pair split over two consecutive chunks of a choice is rejoined, and a
    surrogate left unpaired becomes U+FFFD.
    """

    __slots__ = (
        "on_content",
        "on_delta",
        "strict",
        "result",
        "t0",
        "_warned",
        "splitter",
        "_emit_fast",
        "_s",
        "_fast",
        "_pending",
    )

    def __init__(
        self,
        on_content: Optional[Callable[[str], Any]],
        on_delta: Optional[Callable[[Delta], Any]] = None,
        *,
        strict: bool = False,
        t0: Optional[float] = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.on_content = on_content
        self.on_delta = on_delta
        self.strict = strict
        self.result = StreamResult()
        self.t0 = time.monotonic() if t0 is None else t0
        self._warned = 0
        #: The splitter :meth:`feed_bytes` feeds (one per stream).
        self.splitter = EventSplitter(max_event_bytes)
        self._s = self.splitter._s  # the C state, called directly on the hot path
        self._fast = self.splitter.fast
        #: (choice index, field) -> a high surrogate that ended the last piece
        self._pending: Dict[Any, str] = {}
        if on_delta is not None:
            emit_delta = on_delta
            new = tuple.__new__

            def emit_content_delta(text: str) -> Any:
                # tuple.__new__ skips the NamedTuple's Python-level __new__ (half the cost)
                return emit_delta(new(Delta, (text, None, None, None, None, 0)))

            self._emit_fast: Callable[[str], Any] = emit_content_delta
        else:
            self._emit_fast = on_content  # type: ignore[assignment]

    # -- the hot path: bytes in, one C call per network chunk ----------------
    def feed_bytes(self, chunk: bytes) -> None:
        """Feed one network chunk of the event stream.

        The C side splits it and unescapes the content of every common
        content-only chunk into one UTF-8 text; Python decodes that text once
        and hands out one slice per event. Other events (role, finish,
        usage, errors, reasoning, tool calls …) take :meth:`_general`.
        """
        res = self.result
        if res.done:
            return
        if chunk.__class__ is not bytes:
            chunk = bytes(chunk)
        n = _feed_fast(self._s, chunk, len(chunk))
        if n <= 0:
            if n == 0:
                return
            self.splitter._raise(n)
        f = self._fast
        nf = f.n_fast
        text = _unpack(f.text, f.text_len).decode() if nf else ""
        emit = self._emit_fast if not self._pending else self._emit_after_pending
        if nf == n:  # every event was a plain content chunk
            if n == 1:
                emit(text)
            else:
                pos = 0
                for m in ffi.unpack(f.marks, n):
                    end = pos + m
                    emit(text[pos:end])
                    pos = end
            res.events += n
            res.deltas += n
        else:
            marks = ffi.unpack(f.marks, n)
            out, recs = self.splitter.batch(n)
            pos = 0
            for i in range(n):
                m = marks[i]
                if m >= 0:
                    end = pos + m
                    res.events += 1
                    res.deltas += 1
                    # (an event decoded just before may have left half a surrogate pair)
                    (self._emit_fast if not self._pending else self._emit_after_pending)(text[pos:end])
                    pos = end
                    continue
                j = i * _N
                if recs[j + 3]:
                    self._typed(out, recs, j)
                else:
                    d = recs[j]
                    self._general(out[d : d + recs[j + 1]])
                if res.done:
                    break
        if nf and res.ttft_s is None:
            res.ttft_s = time.monotonic() - self.t0

    def _emit_after_pending(self, text: str) -> Any:
        """Emit a fast-path content of choice 0 after a held half surrogate pair
        (the C side never passes a lone surrogate, so the held half is unpaired)."""
        return self._emit_fast(self._join((0, "content"), text, False) or "")

    # -- one batch already split (the splitter used on its own) --------------
    def feed(self, out: bytes, recs: List[int]) -> None:
        """Dispatch one batch of events (see :meth:`EventSplitter.feed_raw`)."""
        res = self.result
        if res.done or not recs:
            return
        if self.on_delta is not None:
            self._feed_general(out, recs)
            return
        emit = self.on_content
        loads = _loads
        n_content = 0
        for i in range(0, len(recs), _N):
            if recs[i + 3]:  # a typed event: "error", or some other type
                self._typed(out, recs, i)
                if res.done:
                    break
                continue
            d = recs[i]
            payload = out[d : d + recs[i + 1]]
            try:
                obj = loads(payload)
                choices = obj["choices"]
                c0 = choices[0]
                delta = c0["delta"]
                content = delta["content"]
            except _DECODE_ERRORS:
                if self._general(payload):
                    break
                continue
            index = c0.get("index")
            if (
                content.__class__ is str
                and content
                and len(delta) == 1
                and c0.get("finish_reason") is None
                and len(choices) == 1
                and (index is None or (index.__class__ is int and index == 0))
                and not self._pending
            ):
                n_content += 1
                emit(content)  # type: ignore[misc]
            else:
                self._general(payload, obj)
        if n_content:
            res.events += n_content
            res.deltas += n_content
            if res.ttft_s is None:
                res.ttft_s = time.monotonic() - self.t0

    # -- everything else ---------------------------------------------------
    def _feed_general(self, out: bytes, recs: List[int]) -> None:
        res = self.result
        for i in range(0, len(recs), _N):
            if recs[i + 3]:
                self._typed(out, recs, i)
            else:
                d = recs[i]
                self._general(out[d : d + recs[i + 1]])
            if res.done:
                break

    def _typed(self, out: bytes, recs: List[int], i: int) -> None:
        t = recs[i + 2]
        etype = out[t : t + recs[i + 3]]
        d = recs[i]
        payload = out[d : d + recs[i + 1]]
        if etype == b"error":
            # Older llama-server: "error: {json}" mid-stream.
            self.result.events += 1
            raw = payload.decode("utf-8", "replace")
            try:
                body = _loads(payload)
            except ValueError:
                body = raw
            raise api_error_from_body(body, None, raw)
        if etype == b"message":  # an explicit "event: message" is the default type
            self._general(payload)
        else:
            self.result.extra["other_events"] = self.result.extra.get("other_events", 0) + 1

    def _general(self, payload: bytes, obj: Any = None) -> bool:
        """Decode any payload; return True when the stream is done."""
        res = self.result
        lenient = False
        if obj is None:
            if payload == b"[DONE]":
                if self._pending:
                    self._flush_pending()
                res.done = True
                return True
            try:
                obj = _loads(payload)
            except ValueError:
                try:  # invalid UTF-8: replace it (U+FFFD) rather than lose the event
                    obj = _loads(payload.decode("utf-8", "replace"))
                except ValueError:  # only json reads it (or nothing does)
                    obj = lenient_payload(self, payload)
                    if obj is None:
                        return False
                    lenient = True
        res.events += 1
        if obj.__class__ is not dict:
            return self._skip(payload, "not a JSON object")
        if self._pending and not lenient:  # half a surrogate pair waits for this chunk
            fix_chunk_texts(self._pending, obj)
        has_stats = record_envelope(res, obj, payload)
        choices = obj.get("choices")
        if choices.__class__ is not list:
            if choices is not None or not has_stats:
                return self._skip(payload, "no choices list")
            return False
        if not choices:
            return False  # the usage chunk
        # A payload is taken whole or skipped whole: check every choice first.
        for pos, c in enumerate(choices):
            if c.__class__ is not dict:
                return self._skip(payload, f"choices[{pos}] is not an object")
            delta = c.get("delta")
            if delta is not None and delta.__class__ is not dict:
                return self._skip(payload, f"choices[{pos}].delta is not an object")
            content = delta.get("content") if delta else None
            if content is not None and content.__class__ is not str:
                return self._skip(payload, "delta.content is not a string")
        for pos, c in enumerate(choices):
            self._choice(pos, c)
        return False

    def _choice(self, pos: int, c: Dict[str, Any]) -> None:
        """One choice of a decoded chunk (``pos``: its place in ``choices``)."""
        res = self.result
        index = c.get("index")
        if index.__class__ is not int or index < 0:
            index = pos
        on_delta = self.on_delta
        if on_delta is None and index != 0:
            return  # the text (on_content) is the first choice's only
        delta = c.get("delta") or {}
        content = delta.get("content")
        reasoning = delta.get("reasoning_content")
        if reasoning.__class__ is not str:
            reasoning = None
        tool_calls = delta.get("tool_calls")
        if tool_calls.__class__ is not list or not tool_calls:
            tool_calls = None
        finish = c.get("finish_reason")
        if finish.__class__ is not str:
            finish = None
        logprobs = c.get("logprobs")
        if logprobs.__class__ is not dict:
            logprobs = None
        if finish is not None and index == 0:
            res.finish_reason = finish
        if content or reasoning:
            if res.ttft_s is None:
                res.ttft_s = time.monotonic() - self.t0
        if on_delta is not None:
            if content or reasoning or tool_calls or finish or logprobs:
                if content:
                    res.deltas += 1
                on_delta(Delta(content or None, reasoning, tool_calls, finish, logprobs, index))
        elif content:
            res.deltas += 1
            self.on_content(content)  # type: ignore[misc]

    def _join(self, key: Any, s: Optional[str], end: bool) -> Optional[str]:
        return join_surrogates(self._pending, key, s, end)

    def _flush_pending(self) -> None:
        """At [DONE]: a half surrogate pair still held becomes U+FFFD."""
        pending, self._pending = self._pending, {}
        res = self.result
        for index, field in sorted(pending):
            if self.on_delta is not None:
                if field == "content":
                    res.deltas += 1
                    self.on_delta(Delta("\ufffd", index=index))
                else:
                    self.on_delta(Delta(reasoning_content="\ufffd", index=index))
            elif field == "content" and index == 0:
                res.deltas += 1
                self.on_content("\ufffd")  # type: ignore[misc]

    def _skip(self, payload: bytes, why: str) -> bool:
        skip_payload(self, payload, why)
        return False

    # -- a server that did not stream ----------------------------------------
    def feed_whole(self, body: bytes) -> None:
        """Decode a non-streamed ``chat.completion`` body (a server that ignored
        ``stream: true``) as if it had been one delta."""
        self._general(b"", whole_body_as_chunk(body))
        self.result.done = True



class JSONBody:
    """The "decoder" of a plain (non-streamed) JSON request: keeps the parsed
    body in ``value``. An empty body is ``None``, unless ``require_object``
    (then it, and anything but a JSON object, is a :class:`ProtocolError`).
    A body only the standard ``json`` module reads (NaN, lone surrogates) is
    read with it rather than refused."""

    __slots__ = ("result", "value", "require_object")

    def __init__(self, require_object: bool = False) -> None:
        self.result = StreamResult()
        self.value: Any = None
        self.require_object = require_object

    def feed(self, out: bytes, recs: List[int]) -> None:
        """Always a :class:`ProtocolError`: a JSON endpoint must not answer with an event stream."""
        raise ProtocolError("a JSON endpoint answered with an event stream")

    def feed_whole(self, body: bytes) -> None:
        """Parse ``body`` into ``value`` (see the class docstring for empty and non-object bodies)."""
        if body.strip() or self.require_object:
            try:
                try:
                    self.value = _loads(body)
                except ValueError:
                    self.value = json.loads(body)
            except ValueError as e:
                raise ProtocolError(f"the server's JSON body cannot be decoded: {body[:200]!r}") from e
            if self.require_object and self.value.__class__ is not dict:
                raise ProtocolError(f"the server's JSON body is not an object: {body[:200]!r}")
        self.result.done = True
