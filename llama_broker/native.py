"""Everything llama-server streams, and its native endpoints.

Decoders (they plug into :meth:`Broker.perform` like :class:`StreamDecoder`):

* :class:`ChunkDecoder` — any OpenAI-shaped event stream
  (``chat.completion.chunk``, ``text_completion``): every data event's JSON
  object goes to ``on_chunk(dict)`` as it arrives, ``[DONE]`` ends it, error
  envelopes raise :class:`APIError`.
* :class:`NativeDecoder` — llama.cpp's own ``/completion`` stream:
  ``{"content", "stop", …}`` events ending with ``"stop": true`` and no
  ``[DONE]``.

Accumulators turn those chunks into whole answers:

* :class:`ChatAccumulator` → :class:`ChatReply`: content, reasoning
  (``reasoning_content``, llama-server's ``--reasoning-format``), tool calls
  assembled from their fragments (:class:`ToolCallAssembler`), finish reason,
  logprobs, usage, timings, for every choice.
* :class:`TextAccumulator` → :class:`TextReply` (``/v1/completions``).
* :class:`NativeReply` (``/completion``).

Functions (each takes the :class:`ModelConfig` first and an optional
``broker=``; without one the thread's default :class:`Broker` is used):

* streamed through the same transport and splitter as ``chat``:
  :func:`chat_completion`, :func:`text_completion` (``/v1/completions``),
  :func:`completion` (``/completion``); pulled iterators of raw chunks:
  :func:`chat_chunks`, :func:`text_chunks`, :func:`completion_chunks`.
* asyncio (the Broker's asyncio engine, no threads): :func:`achat_completion`,
  :func:`atext_completion`, :func:`acompletion`, :func:`achat_chunks`,
  :func:`acompletion_chunks`.
* plain JSON: :func:`models` (``/v1/models``), :func:`health` (``/health``),
  :func:`props` (``/props``), :func:`slots` (``/slots``), :func:`tokenize`,
  :func:`detokenize`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

from .broker import AsyncDeltaStream, Broker, DeltaStream, default_broker, validate_messages
from .config import ModelConfig
from .decoder import JSONBody
from .decoder import json_loads as _loads  # the same JSON decoder the core uses
from .decoder import (
    Delta,
    StreamResult,
    api_error_from_body,
    fix_chunk_texts,
    lenient_payload,
    record_envelope,
    skip_payload,
    whole_body_as_chunk,
)
from .engine import Transfer
from .errors import ConfigError, ProtocolError
from .sse import DEFAULT_MAX_EVENT_BYTES, EventSplitter



__all__ = [
    "ChunkDecoder",
    "NativeDecoder",
    "ToolCall",
    "ToolCallAssembler",
    "ChatChoice",
    "ChatReply",
    "ChatAccumulator",
    "TextChoice",
    "TextReply",
    "TextAccumulator",
    "NativeReply",
    "EventStream",
    "AsyncEventStream",
    "aperform",
    "chat_completion",
    "achat_completion",
    "atext_completion",
    "acompletion",
    "achat_chunks",
    "acompletion_chunks",
    "chat_chunks",
    "text_completion",
    "text_chunks",
    "completion",
    "completion_chunks",
    "models",
    "health",
    "props",
    "slots",
    "tokenize",
    "detokenize",
    "encode_body",
]

log = logging.getLogger("llama_broker")

_N = 6  # LB_SSE_FIELDS: records per event
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError)


# =============================================================================
# decoders
# =============================================================================


class _DecoderBase:
    """What :class:`~llama_broker.transport.Call` needs: ``feed_bytes`` (with its
    own ``splitter``) or ``feed``, ``feed_whole``, ``result``."""

    __slots__ = ("strict", "result", "t0", "_warned", "splitter", "_pending")

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
                if etype != b"message":
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


# =============================================================================
# accumulators
# =============================================================================


@dataclass
class ToolCall:
    """One complete tool call, assembled from its streamed fragments."""

    index: int
    id: Optional[str] = None
    type: str = "function"
    name: str = ""
    arguments: str = ""

    def json_arguments(self) -> Any:
        """``arguments`` parsed as JSON (raises ``ValueError`` when it is not)."""
        return json.loads(self.arguments) if self.arguments else {}

    def to_dict(self) -> Dict[str, Any]:
        """The OpenAI message shape: ``{"id", "type", "function": {"name", "arguments"}}``."""
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": self.arguments},
        }


class ToolCallAssembler:
    """Joins streamed ``tool_calls`` fragments into complete :class:`ToolCall`\\ s.

    A fragment is ``{"index", "id"?, "type"?, "function": {"name"?, "arguments"?}}``.
    The first fragment of an index opens the call (id, type, name); later
    fragments append to ``function.name`` and ``function.arguments``: name
    pieces are joined (``go`` + ``go`` is ``gogo``). The one exception is a
    server that re-sends the call's header: a name equal to the whole name so
    far, in a fragment that repeats the call's ``id`` or comes after its
    arguments began, is that repeat and not doubled.
    A fragment without ``index`` goes to the call with its ``id``, opens a new
    call (after the highest index so far) for an ``id`` not seen yet, and
    otherwise continues the last call.
    """

    __slots__ = ("_calls", "_last")

    def __init__(self) -> None:
        self._calls: Dict[int, ToolCall] = {}
        self._last: Optional[int] = None

    def add(self, fragments: Sequence[Any]) -> None:
        for frag in fragments:
            if frag.__class__ is not dict:
                continue
            idx = frag.get("index")
            fid = frag.get("id")
            if not isinstance(fid, str) or not fid:
                fid = None
            if not isinstance(idx, int) or isinstance(idx, bool):
                idx = self._index_for(fid)
            call = self._calls.get(idx)
            if call is None:
                call = self._calls[idx] = ToolCall(index=idx)
            self._last = idx
            repeat_header = fid is not None and fid == call.id
            if fid and not call.id:
                call.id = fid
            ftype = frag.get("type")
            if isinstance(ftype, str) and ftype:
                call.type = ftype
            fn = frag.get("function")
            if fn.__class__ is dict:
                name = fn.get("name")
                if isinstance(name, str) and name:
                    if not (name == call.name and (repeat_header or call.arguments)):
                        call.name += name
                args = fn.get("arguments")
                if isinstance(args, str):
                    call.arguments += args
                elif args is not None:  # a server that sends an object
                    call.arguments += json.dumps(args, ensure_ascii=False)

    def _index_for(self, fid: Optional[str]) -> int:
        """The call an index-less fragment belongs to."""
        if fid is not None:
            for k, c in self._calls.items():
                if c.id == fid:
                    return k
        last = self._last
        if last is None or (fid is not None and self._calls[last].id is not None):
            return max(self._calls, default=-1) + 1  # a new call
        return last

    @property
    def calls(self) -> List[ToolCall]:
        """The calls so far, by index."""
        return [self._calls[k] for k in sorted(self._calls)]

    def __len__(self) -> int:
        return len(self._calls)


@dataclass
class ChatChoice:
    """One choice of a chat completion, whole."""

    index: int = 0
    role: str = "assistant"
    content: str = ""
    reasoning_content: Optional[str] = None
    tool_calls: List[ToolCall] = field(default_factory=list)
    finish_reason: Optional[str] = None
    logprobs: Optional[Dict[str, Any]] = None

    @property
    def message(self) -> Dict[str, Any]:
        """The assistant message to append to the conversation (OpenAI shape)."""
        msg: Dict[str, Any] = {"role": self.role or "assistant"}
        msg["content"] = None if (self.tool_calls and not self.content) else self.content
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [tc.to_dict() for tc in self.tool_calls]
        return msg


@dataclass
class ChatReply:
    """A whole chat completion: every choice, usage, timings, the stream's facts.

    ``content``, ``reasoning_content``, ``tool_calls``, ``finish_reason``,
    ``logprobs`` and ``message`` are those of the first choice.
    """

    choices: List[ChatChoice]
    id: Optional[str] = None
    model: Optional[str] = None
    created: Optional[int] = None
    system_fingerprint: Optional[str] = None
    usage: Optional[Dict[str, Any]] = None
    timings: Optional[Dict[str, Any]] = None
    result: StreamResult = field(default_factory=StreamResult)

    def _first(self) -> ChatChoice:
        return self.choices[0] if self.choices else ChatChoice()

    @property
    def content(self) -> str:
        return self._first().content

    @property
    def reasoning_content(self) -> Optional[str]:
        return self._first().reasoning_content

    @property
    def tool_calls(self) -> List[ToolCall]:
        return self._first().tool_calls

    @property
    def finish_reason(self) -> Optional[str]:
        return self._first().finish_reason

    @property
    def logprobs(self) -> Optional[Dict[str, Any]]:
        return self._first().logprobs

    @property
    def message(self) -> Dict[str, Any]:
        return self._first().message

    def to_openai(self) -> Dict[str, Any]:
        """This reply as a non-streamed ``chat.completion`` object (a dict)."""
        out: Dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": c.index,
                    "message": c.message,
                    "finish_reason": c.finish_reason,
                    "logprobs": c.logprobs,
                }
                for c in self.choices
            ],
        }
        if self.system_fingerprint is not None:
            out["system_fingerprint"] = self.system_fingerprint
        if self.usage is not None:
            out["usage"] = self.usage
        if self.timings is not None:
            out["timings"] = self.timings
        return out


class _ChoiceAcc:
    __slots__ = ("index", "role", "parts", "reasoning", "tools", "finish", "logprobs")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: Optional[str] = None
        self.parts: List[str] = []
        self.reasoning: List[str] = []
        self.tools = ToolCallAssembler()
        self.finish: Optional[str] = None
        self.logprobs: Optional[Dict[str, Any]] = None

    def add_logprobs(self, lp: Dict[str, Any]) -> None:
        if self.logprobs is None:
            self.logprobs = {}
        for k, v in lp.items():
            if isinstance(v, list):
                self.logprobs.setdefault(k, []).extend(v)
            elif v is not None or k not in self.logprobs:
                self.logprobs[k] = v


class _AccBase:
    __slots__ = ("_choices", "id", "model", "created", "system_fingerprint", "usage", "timings", "chunks")

    def __init__(self) -> None:
        self._choices: Dict[int, _ChoiceAcc] = {}
        self.id: Optional[str] = None
        self.model: Optional[str] = None
        self.created: Optional[int] = None
        self.system_fingerprint: Optional[str] = None
        self.usage: Optional[Dict[str, Any]] = None
        self.timings: Optional[Dict[str, Any]] = None
        self.chunks = 0

    def _meta(self, chunk: Dict[str, Any]) -> None:
        self.chunks += 1
        if self.id is None:
            v = chunk.get("id")
            self.id = v if isinstance(v, str) else None
            v = chunk.get("model")
            self.model = v if isinstance(v, str) else None
            v = chunk.get("created")
            self.created = v if isinstance(v, int) else None
            v = chunk.get("system_fingerprint")
            self.system_fingerprint = v if isinstance(v, str) else None
        usage = chunk.get("usage")
        if usage.__class__ is dict:
            self.usage = usage
        timings = chunk.get("timings")
        if timings.__class__ is dict:
            self.timings = timings

    def _choice(self, c: Dict[str, Any]) -> _ChoiceAcc:
        idx = c.get("index", 0)
        if not isinstance(idx, int):
            idx = 0
        acc = self._choices.get(idx)
        if acc is None:
            acc = self._choices[idx] = _ChoiceAcc(idx)
        return acc

    def _finish(self, result: Optional[StreamResult]) -> None:
        if result is not None:
            if self.usage is None:
                self.usage = result.usage
            if self.timings is None:
                self.timings = result.timings
            if self.id is None:
                self.id, self.model = result.id, result.model


class ChatAccumulator(_AccBase):
    """Builds a :class:`ChatReply` from ``chat.completion.chunk`` objects.

    Pass :meth:`add` as ``ChunkDecoder``'s ``on_chunk``. ``on_delta``, when
    given, gets a :class:`Delta` per chunk of the first choice that carries
    anything, as it arrives.
    """

    __slots__ = ("on_delta",)

    def __init__(self, on_delta: Optional[Callable[[Delta], Any]] = None) -> None:
        super().__init__()
        self.on_delta = on_delta

    def add(self, chunk: Dict[str, Any]) -> None:
        self._meta(chunk)
        choices = chunk.get("choices")
        if not choices:
            return
        for c in choices:
            acc = self._choice(c)
            delta = c.get("delta")
            if delta.__class__ is not dict:
                delta = {}
            role = delta.get("role")
            if isinstance(role, str):
                acc.role = role
            content = delta.get("content")
            if content.__class__ is str and content:
                acc.parts.append(content)
            else:
                content = None
            reasoning = delta.get("reasoning_content")
            if reasoning.__class__ is str and reasoning:
                acc.reasoning.append(reasoning)
            else:
                reasoning = None
            tool_calls = delta.get("tool_calls")
            if tool_calls.__class__ is list and tool_calls:
                acc.tools.add(tool_calls)
            else:
                tool_calls = None
            finish = c.get("finish_reason")
            if finish.__class__ is str:
                acc.finish = finish
            else:
                finish = None
            logprobs = c.get("logprobs")
            if logprobs.__class__ is dict:
                acc.add_logprobs(logprobs)
            else:
                logprobs = None
            if self.on_delta is not None and acc.index == 0:
                if content or reasoning or tool_calls or finish or logprobs:
                    self.on_delta(Delta(content, reasoning, tool_calls, finish, logprobs))

    def reply(self, result: Optional[StreamResult] = None) -> ChatReply:
        """The whole reply so far (call it after the stream ended)."""
        self._finish(result)
        choices = [
            ChatChoice(
                index=a.index,
                role=a.role or "assistant",
                content="".join(a.parts),
                reasoning_content="".join(a.reasoning) if a.reasoning else None,
                tool_calls=a.tools.calls,
                finish_reason=a.finish,
                logprobs=a.logprobs,
            )
            for _, a in sorted(self._choices.items())
        ]
        return ChatReply(
            choices=choices,
            id=self.id,
            model=self.model,
            created=self.created,
            system_fingerprint=self.system_fingerprint,
            usage=self.usage,
            timings=self.timings,
            result=result if result is not None else StreamResult(),
        )


@dataclass
class TextChoice:
    """One choice of a ``/v1/completions`` answer."""

    index: int = 0
    text: str = ""
    finish_reason: Optional[str] = None
    logprobs: Optional[Dict[str, Any]] = None


@dataclass
class TextReply:
    """A whole ``/v1/completions`` answer; ``text``/``finish_reason``/``logprobs`` are the first choice's."""

    choices: List[TextChoice]
    id: Optional[str] = None
    model: Optional[str] = None
    created: Optional[int] = None
    system_fingerprint: Optional[str] = None
    usage: Optional[Dict[str, Any]] = None
    timings: Optional[Dict[str, Any]] = None
    result: StreamResult = field(default_factory=StreamResult)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> Optional[str]:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def logprobs(self) -> Optional[Dict[str, Any]]:
        return self.choices[0].logprobs if self.choices else None

    def to_openai(self) -> Dict[str, Any]:
        """This answer as a non-streamed ``text_completion`` object (a dict)."""
        out: Dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": c.logprobs}
                for c in self.choices
            ],
        }
        if self.system_fingerprint is not None:
            out["system_fingerprint"] = self.system_fingerprint
        if self.usage is not None:
            out["usage"] = self.usage
        if self.timings is not None:
            out["timings"] = self.timings
        return out


class TextAccumulator(_AccBase):
    """Builds a :class:`TextReply` from ``text_completion`` chunks (``on_text`` gets
    the first choice's text pieces as they arrive)."""

    __slots__ = ("on_text",)

    def __init__(self, on_text: Optional[Callable[[str], Any]] = None) -> None:
        super().__init__()
        self.on_text = on_text

    def add(self, chunk: Dict[str, Any]) -> None:
        self._meta(chunk)
        for c in chunk.get("choices") or ():
            acc = self._choice(c)
            text = c.get("text")
            if text.__class__ is str and text:
                acc.parts.append(text)
                if self.on_text is not None and acc.index == 0:
                    self.on_text(text)
            finish = c.get("finish_reason")
            if finish.__class__ is str:
                acc.finish = finish
            logprobs = c.get("logprobs")
            if logprobs.__class__ is dict:
                acc.add_logprobs(logprobs)

    def reply(self, result: Optional[StreamResult] = None) -> TextReply:
        self._finish(result)
        return TextReply(
            choices=[
                TextChoice(index=a.index, text="".join(a.parts), finish_reason=a.finish, logprobs=a.logprobs)
                for _, a in sorted(self._choices.items())
            ],
            id=self.id,
            model=self.model,
            created=self.created,
            system_fingerprint=self.system_fingerprint,
            usage=self.usage,
            timings=self.timings,
            result=result if result is not None else StreamResult(),
        )


@dataclass
class NativeReply:
    """A whole ``/completion`` answer (the first prompt's; ``all`` has one per prompt).

    ``content`` is the joined text, ``tokens`` the token ids streamed with it
    (when the server sends them), ``probs`` the ``completion_probabilities``
    entries (``n_probs``), ``final`` the last event as the server sent it
    (``generation_settings``, ``prompt``, ``truncated``, ``tokens_cached`` …).
    """

    content: str = ""
    tokens: List[int] = field(default_factory=list)
    probs: List[Dict[str, Any]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_type: Optional[str] = None
    stopping_word: Optional[str] = None
    tokens_predicted: Optional[int] = None
    tokens_evaluated: Optional[int] = None
    timings: Optional[Dict[str, Any]] = None
    model: Optional[str] = None
    index: int = 0
    final: Dict[str, Any] = field(default_factory=dict)
    result: StreamResult = field(default_factory=StreamResult)
    all: List["NativeReply"] = field(default_factory=list, repr=False)


class _NativeAcc:
    __slots__ = ("on_content", "_parts", "_replies")

    def __init__(self, on_content: Optional[Callable[[str], Any]]) -> None:
        self.on_content = on_content
        self._parts: Dict[int, List[str]] = {}
        self._replies: Dict[int, NativeReply] = {}

    def add(self, ev: Dict[str, Any]) -> None:
        idx = ev.get("index", 0)
        if not isinstance(idx, int):
            idx = 0
        r = self._replies.get(idx)
        if r is None:
            r = self._replies[idx] = NativeReply(index=idx)
            self._parts[idx] = []
        content = ev.get("content")
        if isinstance(content, str) and content:
            self._parts[idx].append(content)
            if self.on_content is not None and idx == 0:
                self.on_content(content)
        toks = ev.get("tokens")
        if isinstance(toks, list):
            r.tokens.extend(toks)
        probs = ev.get("completion_probabilities")
        if isinstance(probs, list):
            r.probs.extend(probs)
        for k in ("tokens_predicted", "tokens_evaluated"):
            v = ev.get(k)
            if isinstance(v, int):
                setattr(r, k, v)
        if ev.get("stop") is True:
            r.final = ev
            st = ev.get("stop_type")
            r.stop_type = st if isinstance(st, str) else None
            r.finish_reason = _STOP_TYPES.get(st, "stop") if isinstance(st, str) else "stop"
            sw = ev.get("stopping_word")
            r.stopping_word = sw if isinstance(sw, str) else None
            t = ev.get("timings")
            r.timings = t if isinstance(t, dict) else None
            m = ev.get("model")
            r.model = m if isinstance(m, str) else None

    def reply(self, result: StreamResult) -> NativeReply:
        replies = []
        for idx in sorted(self._replies):
            r = self._replies[idx]
            r.content = "".join(self._parts[idx])
            r.result = result
            replies.append(r)
        first = replies[0] if replies else NativeReply(result=result)
        first.all = replies or [first]
        return first


# =============================================================================
# request bodies
# =============================================================================


def encode_body(body: Mapping[str, Any], default: Optional[Callable[[Any], Any]] = None) -> bytes:
    """``body`` as compact UTF-8 JSON; :class:`ConfigError` names a field that cannot be
    encoded. ``default`` (as json.dumps') turns other objects into JSON values."""
    try:
        return json.dumps(
            body, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=default
        ).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        for k, v in body.items():
            try:
                json.dumps(v, ensure_ascii=False, allow_nan=False, default=default).encode("utf-8")
            except (TypeError, ValueError, UnicodeEncodeError):
                raise ConfigError(f"request field {k!r} cannot be sent as JSON: {e}") from e
        raise ConfigError(f"the request cannot be sent as JSON: {e}") from e



def _chunk_decoders(cfg: ModelConfig, on_chunk: Callable[[Dict[str, Any]], Any]) -> Callable[[float], "ChunkDecoder"]:
    """A decoder factory (per attempt) for an OpenAI-shaped stream whose chunks go to ``on_chunk``."""
    return lambda t0: ChunkDecoder(on_chunk, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes)


def _chunk_decoders_to(cfg: ModelConfig) -> Callable[[Callable[[Dict[str, Any]], Any], float], "ChunkDecoder"]:
    """Like :func:`_chunk_decoders`, for streams that pass their own push callback."""
    return lambda push, t0: ChunkDecoder(push, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes)


def _body(cfg: ModelConfig, params: Mapping[str, Any], **fixed: Any) -> bytes:
    if "stream" in params:
        raise ConfigError("'stream' cannot be passed: llama_broker always streams")
    body: Dict[str, Any] = {}
    if cfg.model:
        body["model"] = cfg.model
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    body.update(cfg.params)
    body.update(params)
    body.update(fixed)
    body["stream"] = True
    return encode_body(body)


def _perform(
    b: Broker,
    cfg: ModelConfig,
    body: Optional[bytes],
    make_decoder: Callable[[float], Any],
    *,
    url: Optional[str] = None,
    method: str = "POST",
    streaming: bool = True,
) -> StreamResult:
    """``Broker.perform`` with any decoder (it needs ``feed``, ``feed_whole``, ``result``)."""
    return b.perform(cfg, body, make_decoder, url=url, method=method, streaming=streaming)


def _with_usage(cfg: ModelConfig, params: Dict[str, Any]) -> Dict[str, Any]:
    """Ask for the usage chunk unless the caller chose ``stream_options`` themselves."""
    if "stream_options" not in params and "stream_options" not in cfg.params:
        params = dict(params)
        params["stream_options"] = {"include_usage": True}
    return params


def _url(cfg: ModelConfig, path: str) -> str:
    return cfg.base_url + path


# =============================================================================
# blocking, streamed calls
# =============================================================================


def chat_completion(
    cfg: ModelConfig,
    messages: Sequence[Mapping[str, Any]],
    *,
    broker: Optional[Broker] = None,
    on_delta: Optional[Callable[[Delta], Any]] = None,
    **params: Any,
) -> ChatReply:
    """The whole chat completion — content, reasoning, tool calls, finish reason,
    logprobs, usage, timings — streamed underneath.

    ``on_delta``, when given, gets each :class:`Delta` of the first choice as it
    arrives. ``stream_options: {"include_usage": true}`` is sent unless you set
    ``stream_options`` yourself (here or in ``cfg.params``).
    """
    b = broker or default_broker()
    validate_messages(messages)
    body = _body(cfg, _with_usage(cfg, params), messages=list(messages))
    acc = ChatAccumulator(on_delta)
    res = _perform(b, cfg, body, _chunk_decoders(cfg, acc.add), url=cfg.url)
    return acc.reply(res)


def text_completion(
    cfg: ModelConfig,
    prompt: Any,
    *,
    broker: Optional[Broker] = None,
    on_text: Optional[Callable[[str], Any]] = None,
    **params: Any,
) -> TextReply:
    """An OpenAI-style ``/v1/completions`` answer, streamed underneath; ``on_text``
    gets the first choice's text pieces as they arrive."""
    b = broker or default_broker()
    body = _body(cfg, _with_usage(cfg, params), prompt=prompt)
    acc = TextAccumulator(on_text)
    res = _perform(
        b, cfg, body, _chunk_decoders(cfg, acc.add), url=_url(cfg, "/v1/completions")
    )
    return acc.reply(res)


def completion(
    cfg: ModelConfig,
    prompt: Any,
    *,
    broker: Optional[Broker] = None,
    on_content: Optional[Callable[[str], Any]] = None,
    **params: Any,
) -> NativeReply:
    """llama.cpp's native ``/completion``, streamed: ``prompt`` is a string, a token
    list, a mixed list, or a list of prompts. Parameters are llama.cpp's own
    (``n_predict``, ``n_probs``, ``grammar``, ``json_schema``, ``cache_prompt``,
    ``id_slot``, ``return_tokens`` …). ``on_content`` gets the first prompt's
    text pieces as they arrive."""
    b = broker or default_broker()
    body = _body(cfg, params, prompt=prompt)
    acc = _NativeAcc(on_content)
    n = _expected_prompts(prompt)
    res = _perform(
        b,
        cfg,
        body,
        lambda t0: NativeDecoder(acc.add, n_prompts=n, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes),
        url=_url(cfg, "/completion"),
    )
    return acc.reply(res)


# =============================================================================
# pulled streams of raw chunks (the core's SyncEngine / AsyncEngine)
# =============================================================================


MakeDecoder = Callable[[Callable[[Any], Any], float], Any]


def _transfer(cfg: ModelConfig, body: bytes, make_decoder: MakeDecoder, url: Optional[str], queue: Deque[Any]) -> Transfer:
    return Transfer(cfg, body, lambda t0: make_decoder(queue.append, t0), url=url)  # type: ignore[arg-type,return-value]


class EventStream(DeltaStream):
    """A pulled stream of decoded items (chunk dicts) on the Broker's
    :class:`~llama_broker.engine.SyncEngine`, driven only when asked (no threads).

    Iterate it; leave early with :meth:`close` or a ``with`` block (the
    connection is closed, which cancels the generation). Items that arrived
    before an error are all yielded before the error is raised. ``result``
    is the :class:`StreamResult` once the stream ended.

    ``make_decoder(push, t0)`` returns the decoder; it calls ``push(item)``
    for every item. Used by :func:`chat_chunks`, :func:`text_chunks`,
    :func:`completion_chunks` and the OpenAI drop-in's streams.
    """

    def __init__(
        self,
        broker: Broker,
        cfg: ModelConfig,
        body: bytes,
        make_decoder: MakeDecoder,
        *,
        url: Optional[str] = None,
    ) -> None:
        items: Deque[Any] = deque()
        t = _transfer(cfg, body, make_decoder, url, items)
        engine = broker.sync_engine()
        engine.start(t)
        super().__init__(broker, engine, t, items)

    def next_batch(self) -> List[Any]:
        """Every item available now (waiting for at least one); ``[]`` at the end."""
        q, t = self._queue, self._t
        while not q:
            if t.done:
                self._end()
                return []
            self._engine.drive(lambda: bool(q) or t.done)
        items = list(q)
        q.clear()
        return items

    def wait_started(self) -> None:
        """Drive until the response status is known to be 2xx, an item arrived, or
        the stream ended — an HTTP error is then raised here."""
        q, t = self._queue, self._t

        def started() -> bool:
            call = t.call
            status = getattr(call, "status", None) if call is not None else None
            return bool(q) or t.done or (status is not None and 200 <= status < 300)

        while not started():
            self._engine.drive(started)
        if t.done and not q:
            self._end()


class AsyncEventStream(AsyncDeltaStream):
    """An async stream of decoded items on the Broker's asyncio engine (curl's
    socket callbacks on the running loop, no threads): ``async for``,
    ``async with``, :meth:`aclose`; cancelling a waiting task closes the connection."""

    def __init__(
        self,
        broker: Broker,
        cfg: ModelConfig,
        body: bytes,
        make_decoder: MakeDecoder,
        *,
        url: Optional[str] = None,
    ) -> None:
        items: Deque[Any] = deque()
        super().__init__(broker.async_engine, _transfer(cfg, body, make_decoder, url, items), items)
        self._started()  # on the running loop now, so that HTTP errors surface at once

    async def next_batch(self) -> List[Any]:
        """Every item available now (waiting for at least one); ``[]`` at the end."""
        q, t = self._queue, self._t
        while not q:
            if t.done:
                self._end()
                return []
            await self._wait()
        items = list(q)
        q.clear()
        return items

    async def wait_started(self) -> None:
        """Wait for the first item or the end (an HTTP error is raised here)."""
        q, t = self._queue, self._t
        while not q and not t.done:
            await self._wait()
        if t.done and not q:
            self._end()


async def aperform(
    broker: Broker,
    cfg: ModelConfig,
    body: bytes,
    make_decoder: Callable[[float], Any],
    *,
    url: Optional[str] = None,
) -> StreamResult:
    """The asyncio twin of ``Broker.perform`` for a streamed POST: run one
    request (with its retries) on the running loop; cancelling closes the connection."""
    return await broker.aperform(cfg, body, make_decoder, url=url)


def chat_chunks(
    cfg: ModelConfig, messages: Sequence[Mapping[str, Any]], *, broker: Optional[Broker] = None, **params: Any
) -> EventStream:
    """A pulled stream of raw ``chat.completion.chunk`` dicts (every chunk the
    server sent: role, content, reasoning, tool-call fragments, finish, usage)."""
    b = broker or default_broker()
    validate_messages(messages)
    body = _body(cfg, params, messages=list(messages))
    return EventStream(
        b, cfg, body, _chunk_decoders_to(cfg), url=cfg.url
    )


def text_chunks(cfg: ModelConfig, prompt: Any, *, broker: Optional[Broker] = None, **params: Any) -> EventStream:
    """A pulled stream of raw ``text_completion`` chunk dicts from ``/v1/completions``."""
    b = broker or default_broker()
    body = _body(cfg, params, prompt=prompt)
    return EventStream(
        b,
        cfg,
        body,
        _chunk_decoders_to(cfg),
        url=_url(cfg, "/v1/completions"),
    )


def completion_chunks(
    cfg: ModelConfig, prompt: Any, *, broker: Optional[Broker] = None, **params: Any
) -> EventStream:
    """A pulled stream of llama.cpp's native ``/completion`` event dicts
    (``{"content", "stop", …}``; the last has ``"stop": true``)."""
    b = broker or default_broker()
    body = _body(cfg, params, prompt=prompt)
    n = _expected_prompts(prompt)
    return EventStream(
        b,
        cfg,
        body,
        lambda push, t0: NativeDecoder(push, n_prompts=n, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes),
        url=_url(cfg, "/completion"),
    )


# =============================================================================
# asyncio: the same calls on the running loop
# =============================================================================


async def achat_completion(
    cfg: ModelConfig,
    messages: Sequence[Mapping[str, Any]],
    *,
    broker: Optional[Broker] = None,
    on_delta: Optional[Callable[[Delta], Any]] = None,
    **params: Any,
) -> ChatReply:
    """Async :func:`chat_completion` (on the Broker's asyncio engine, no threads)."""
    b = broker or default_broker()
    validate_messages(messages)
    body = _body(cfg, _with_usage(cfg, params), messages=list(messages))
    acc = ChatAccumulator(on_delta)
    res = await aperform(b, cfg, body, _chunk_decoders(cfg, acc.add), url=cfg.url)
    return acc.reply(res)


async def atext_completion(
    cfg: ModelConfig,
    prompt: Any,
    *,
    broker: Optional[Broker] = None,
    on_text: Optional[Callable[[str], Any]] = None,
    **params: Any,
) -> TextReply:
    """Async :func:`text_completion`."""
    b = broker or default_broker()
    body = _body(cfg, _with_usage(cfg, params), prompt=prompt)
    acc = TextAccumulator(on_text)
    res = await aperform(
        b, cfg, body, _chunk_decoders(cfg, acc.add), url=_url(cfg, "/v1/completions")
    )
    return acc.reply(res)


async def acompletion(
    cfg: ModelConfig,
    prompt: Any,
    *,
    broker: Optional[Broker] = None,
    on_content: Optional[Callable[[str], Any]] = None,
    **params: Any,
) -> NativeReply:
    """Async :func:`completion` (llama.cpp's ``/completion``)."""
    b = broker or default_broker()
    body = _body(cfg, params, prompt=prompt)
    acc = _NativeAcc(on_content)
    n = _expected_prompts(prompt)
    res = await aperform(
        b,
        cfg,
        body,
        lambda t0: NativeDecoder(acc.add, n_prompts=n, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes),
        url=_url(cfg, "/completion"),
    )
    return acc.reply(res)


def achat_chunks(
    cfg: ModelConfig, messages: Sequence[Mapping[str, Any]], *, broker: Optional[Broker] = None, **params: Any
) -> AsyncEventStream:
    """Async :func:`chat_chunks` (call it inside the running loop)."""
    b = broker or default_broker()
    validate_messages(messages)
    body = _body(cfg, params, messages=list(messages))
    return AsyncEventStream(b, cfg, body, _chunk_decoders_to(cfg), url=cfg.url)


def acompletion_chunks(
    cfg: ModelConfig, prompt: Any, *, broker: Optional[Broker] = None, **params: Any
) -> AsyncEventStream:
    """Async :func:`completion_chunks`."""
    b = broker or default_broker()
    body = _body(cfg, params, prompt=prompt)
    n = _expected_prompts(prompt)
    return AsyncEventStream(
        b,
        cfg,
        body,
        lambda push, t0: NativeDecoder(push, n_prompts=n, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes),
        url=_url(cfg, "/completion"),
    )


# =============================================================================
# plain JSON endpoints
# =============================================================================


def _json(
    cfg: ModelConfig,
    method: str,
    path: str,
    body: Any = None,
    *,
    broker: Optional[Broker] = None,
    retries: Optional[int] = None,
) -> Any:
    b = broker or default_broker()
    if retries is not None and retries != cfg.max_retries:
        cfg = replace(cfg, max_retries=retries)
    data = encode_body(body) if body is not None else None
    dec = JSONBody()
    _perform(b, cfg, data, lambda t0: dec, url=_url(cfg, path), method=method, streaming=False)
    return dec.value


def models(cfg: ModelConfig, *, broker: Optional[Broker] = None) -> List[Dict[str, Any]]:
    """``GET /v1/models``: the list of model objects (``id``, ``owned_by``, ``meta`` …)."""
    body = _json(cfg, "GET", "/v1/models", broker=broker)
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        return body["data"]
    raise ProtocolError(f"/v1/models answered without a data list: {str(body)[:200]!r}")


def health(cfg: ModelConfig, *, broker: Optional[Broker] = None) -> Dict[str, Any]:
    """``GET /health``: ``{"status": "ok"}`` when ready. While the model loads the
    server answers 503, raised as :class:`APIError` at once (no retries)."""
    body = _json(cfg, "GET", "/health", broker=broker, retries=0)
    return body if isinstance(body, dict) else {"status": body}


def props(cfg: ModelConfig, *, broker: Optional[Broker] = None) -> Dict[str, Any]:
    """``GET /props``: the server's settings (``default_generation_settings``,
    ``total_slots``, ``chat_template``, ``model_path`` …)."""
    body = _json(cfg, "GET", "/props", broker=broker)
    if not isinstance(body, dict):
        raise ProtocolError(f"/props answered with {type(body).__name__}, not an object")
    return body


def slots(cfg: ModelConfig, *, broker: Optional[Broker] = None) -> List[Dict[str, Any]]:
    """``GET /slots``: one object per slot (``id``, ``is_processing``, ``n_ctx`` …).
    A server started with ``--no-slots`` answers 501, raised as :class:`APIError`."""
    body = _json(cfg, "GET", "/slots", broker=broker)
    if not isinstance(body, list):
        raise ProtocolError(f"/slots answered with {type(body).__name__}, not a list")
    return body


def tokenize(
    cfg: ModelConfig,
    content: str,
    *,
    add_special: bool = False,
    with_pieces: bool = False,
    broker: Optional[Broker] = None,
) -> Union[List[int], List[Dict[str, Any]]]:
    """``POST /tokenize``: the token ids of ``content`` (with ``with_pieces``,
    ``[{"id", "piece"}, …]``)."""
    if not isinstance(content, str):
        raise ConfigError(f"tokenize() takes a string, got {type(content).__name__}")
    body = _json(
        cfg,
        "POST",
        "/tokenize",
        {"content": content, "add_special": add_special, "with_pieces": with_pieces},
        broker=broker,
    )
    if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
        raise ProtocolError(f"/tokenize answered without a tokens list: {str(body)[:200]!r}")
    return body["tokens"]


def detokenize(cfg: ModelConfig, tokens: Sequence[int], *, broker: Optional[Broker] = None) -> str:
    """``POST /detokenize``: the text of ``tokens``."""
    toks = list(tokens)
    if any(not isinstance(t, int) or isinstance(t, bool) for t in toks):
        raise ConfigError("detokenize() takes a list of int token ids")
    body = _json(cfg, "POST", "/detokenize", {"tokens": toks}, broker=broker)
    if not isinstance(body, dict) or not isinstance(body.get("content"), str):
        raise ProtocolError(f"/detokenize answered without content: {str(body)[:200]!r}")
    return body["content"]
