"""Decoders for everything llama-server streams: OpenAI-shaped chunks
(:class:`ChunkDecoder`) and llama.cpp's own ``/completion`` (:class:`NativeDecoder`)."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

from .decoder import (
    StreamResult,
    api_error_from_body,
    fix_chunk_texts,
    lenient_payload,
    record_envelope,
    skip_payload,
    whole_body_as_chunk,
)
from .decoder import json_loads as _loads  # the same JSON decoder the core uses
from .errors import ProtocolError
from .sse import DEFAULT_MAX_EVENT_BYTES, EventSplitter


_N = 6  # LB_SSE_FIELDS: records per event
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError)


# =============================================================================
# decoders
# =============================================================================


class _DecoderBase:
    """What :class:`~llama_broker.transport.Call` needs: ``feed_bytes`` (with its
    own ``splitter``) or ``feed``, ``feed_whole``, ``result``."""

    __slots__ = ("strict", "result", "t0", "_warned", "splitter", "_pending")
    #: False: events named other than ``message``/``error`` are counted and dropped;
    #: True: their data is decoded as a ``message``'s (the OpenAI SDK's way).
    other_events_are_data = False

    def __init__(
        self, *, strict: bool = False, t0: Optional[float] = None, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    ) -> None:
        self.strict = strict
        self.result = StreamResult()
        self.t0 = time.monotonic() if t0 is None else t0
        self._warned = 0
        #: The splitter :meth:`feed_bytes` feeds (one per stream, bounded by max_event_bytes).
        self.splitter = EventSplitter(max_event_bytes)
        #: half surrogate pairs between chunks (see decoder.join_surrogates)
        self._pending: Dict[Any, str] = {}

    def feed_bytes(self, chunk: bytes) -> None:
        """Feed one network chunk of the event stream."""
        out, recs = self.splitter.feed_raw(chunk)
        if recs:
            self.feed(out, recs)

    def feed(self, out: bytes, recs: List[int]) -> None:
        """Dispatch one batch of events (see :meth:`EventSplitter.feed_raw`)."""
        res = self.result
        for i in range(0, len(recs), _N):
            if res.done:
                return
            d = recs[i]
            payload = out[d : d + recs[i + 1]]
            if recs[i + 3]:
                t = recs[i + 2]
                etype = out[t : t + recs[i + 3]]
                if etype == b"error":  # older llama-server: "error: {json}" mid-stream
                    res.events += 1
                    raw = payload.decode("utf-8", "replace")
                    try:
                        body: Any = _loads(payload)
                    except ValueError:
                        body = raw
                    raise api_error_from_body(body, None, raw)
                if etype != b"message" and not self.other_events_are_data:
                    res.extra["other_events"] = res.extra.get("other_events", 0) + 1
                    continue
            self._payload(payload)

    def _payload(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.result.done = True
            return
        lenient = False
        try:
            obj = _loads(payload)
        except ValueError:
            try:  # invalid UTF-8: replace it rather than lose the event
                obj = _loads(payload.decode("utf-8", "replace"))
            except ValueError:  # only json reads it (lone surrogates, NaN ...), or nothing does
                obj = lenient_payload(self, payload)
                if obj is None:
                    return
                lenient = True
        self._accept(obj, payload, lenient)

    def _accept(self, obj: Any, payload: bytes, lenient: bool) -> None:
        """One decoded payload: the chunk object (or another JSON value)."""
        if self._pending and not lenient and obj.__class__ is dict:  # half a surrogate pair waits for this chunk
            fix_chunk_texts(self._pending, obj)
        self.result.events += 1
        if obj.__class__ is not dict:
            self._skip(payload, "not a JSON object")
            return
        self._object(obj, payload)

    def _object(self, obj: Dict[str, Any], payload: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _skip(self, payload: bytes, why: str) -> None:
        skip_payload(self, payload, why)

    def _first_output(self) -> None:
        if self.result.ttft_s is None:
            self.result.ttft_s = time.monotonic() - self.t0


class ChunkDecoder(_DecoderBase):
    """Decodes an OpenAI-shaped event stream into its chunk objects.

    ``on_chunk(dict)`` gets every data event's JSON object (the role chunk,
    content, reasoning, tool-call fragments, the finish chunk, the usage
    chunk with ``choices: []``) in order; ``[DONE]`` ends the stream. An error
    envelope (``data: {"error": …}`` or an ``error:`` line) raises
    :class:`APIError`. ``result`` collects id, model, finish reason (of the
    last choice that finished), usage and llama.cpp's timings; ``deltas``
    counts the chunks handed out (a retry would repeat them).
    """

    __slots__ = ("on_chunk",)

    def __init__(
        self,
        on_chunk: Callable[[Dict[str, Any]], Any],
        *,
        strict: bool = False,
        t0: Optional[float] = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        super().__init__(strict=strict, t0=t0, max_event_bytes=max_event_bytes)
        self.on_chunk = on_chunk

    def feed(self, out: bytes, recs: List[int]) -> None:
        """Dispatch one batch of events. The common chunk — one choice, not
        finished, after the first — takes a short path; the rest :meth:`_object`."""
        res = self.result
        loads = _loads
        on_chunk = self.on_chunk
        for i in range(0, len(recs), _N):
            if res.done:
                return
            if recs[i + 3]:
                super().feed(out, recs[i : i + _N])
                continue
            d = recs[i]
            payload = out[d : d + recs[i + 1]]
            try:
                obj = loads(payload)
            except ValueError:
                self._payload(payload)  # [DONE], or the slow path for bad bytes
                continue
            if self._pending and obj.__class__ is dict:  # half a surrogate pair waits for this chunk
                fix_chunk_texts(self._pending, obj)
            if obj.__class__ is dict and res.ttft_s is not None and res.id is not None:
                choices = obj.get("choices")
                if choices.__class__ is list and len(choices) == 1:
                    c = choices[0]
                    if (
                        c.__class__ is dict
                        and c.get("finish_reason") is None
                        and "usage" not in obj
                        and "timings" not in obj
                        and "error" not in obj
                    ):
                        res.events += 1
                        res.deltas += 1
                        on_chunk(obj)
                        continue
            res.events += 1
            if obj.__class__ is not dict:
                self._skip(payload, "not a JSON object")
            else:
                self._object(obj, payload)

    def _object(self, obj: Dict[str, Any], payload: bytes) -> None:
        res = self.result
        has_stats = record_envelope(res, obj, payload)
        choices = obj.get("choices")
        if choices.__class__ is not list:
            if choices is not None or not has_stats:
                self._skip(payload, "no choices list")
                return
        else:
            for c in choices:
                if c.__class__ is not dict:
                    self._skip(payload, "a choice is not an object")
                    return
                finish = c.get("finish_reason")
                if finish.__class__ is str:
                    res.finish_reason = finish
                if res.ttft_s is None:
                    delta = c.get("delta")
                    if delta.__class__ is dict:
                        if delta.get("content") or delta.get("reasoning_content"):
                            self._first_output()
                    elif c.get("text"):
                        self._first_output()
        res.deltas += 1
        self.on_chunk(obj)

    def feed_whole(self, body: bytes) -> None:
        """A 2xx body that is not an event stream (a server that ignored
        ``stream: true``): a whole ``chat.completion`` or ``text_completion``
        becomes one chunk (``message`` → ``delta``)."""
        chunk = whole_body_as_chunk(body)
        self.result.events += 1
        self._object(chunk, body)
        self.result.done = True


_STOP_TYPES = {"limit": "length"}  # llama.cpp's stop_type → OpenAI finish_reason ("eos", "word" → "stop")


def _expected_prompts(prompt: Any) -> int:
    """How many results ``/completion`` streams for ``prompt`` (llama.cpp's rules:
    a string, a token list or a mixed string/token list is one prompt; a list of
    strings or lists is one prompt each)."""
    if isinstance(prompt, list) and prompt and not any(
        isinstance(p, (int, float)) and not isinstance(p, bool) for p in prompt
    ):
        return len(prompt)
    return 1


class NativeDecoder(_DecoderBase):
    """Decodes llama.cpp's native ``/completion`` stream.

    Each data event (``{"content", "tokens", "stop", "index", …}``, with
    ``completion_probabilities`` under ``n_probs``) goes to ``on_event(dict)``.
    The stream ends with ``"stop": true`` (once per prompt; ``n_prompts`` of
    them) and no ``[DONE]``. The final event's ``stop_type`` becomes
    ``result.finish_reason`` (``limit`` → ``length``, else ``stop``); its
    ``timings`` go to ``result.timings``.
    """

    __slots__ = ("on_event", "n_prompts", "_stops")

    def __init__(
        self,
        on_event: Callable[[Dict[str, Any]], Any],
        *,
        n_prompts: int = 1,
        strict: bool = False,
        t0: Optional[float] = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        super().__init__(strict=strict, t0=t0, max_event_bytes=max_event_bytes)
        self.on_event = on_event
        self.n_prompts = max(1, n_prompts)
        self._stops = 0

    def _object(self, obj: Dict[str, Any], payload: bytes) -> None:
        res = self.result
        if "error" in obj and "content" not in obj:
            raise api_error_from_body(obj, None, payload.decode("utf-8", "replace"))
        content = obj.get("content")
        if content and res.ttft_s is None:
            self._first_output()
        stop = obj.get("stop") is True
        if stop:
            stop_type = obj.get("stop_type")
            res.finish_reason = _STOP_TYPES.get(stop_type, "stop") if isinstance(stop_type, str) else "stop"
            timings = obj.get("timings")
            if timings.__class__ is dict:
                res.timings = timings
            model = obj.get("model")
            if model.__class__ is str:
                res.model = model
        res.deltas += 1
        self.on_event(obj)
        if stop:
            self._stops += 1
            if self._stops >= self.n_prompts:
                res.done = True

    def feed_whole(self, body: bytes) -> None:
        """A non-streamed ``/completion`` answer: one object, or a list (several prompts)."""
        try:
            obj = _loads(body)
        except ValueError:
            obj = None
        items = obj if isinstance(obj, list) else [obj]
        if not items or any(o.__class__ is not dict for o in items):
            raise ProtocolError(
                f"the server's /completion body cannot be decoded: {body[:200].decode('utf-8', 'replace')!r}"
            )
        for o in items:
            o = dict(o)
            o.setdefault("stop", True)
            self.result.events += 1
            self._object(o, body)
        self.result.done = True
