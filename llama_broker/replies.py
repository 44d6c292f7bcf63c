"""Accumulators that turn streamed chunks into whole answers, and the answers:
:class:`ChatReply`, :class:`TextReply`, :class:`NativeReply`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .decoder import Delta, StreamResult
from .chunks import _STOP_TYPES

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
        """Merge one delta's ``tool_calls`` fragments (non-dict items are ignored)."""
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
        """The first choice's ``content`` (``""`` when there is none)."""
        return self._first().content

    @property
    def reasoning_content(self) -> Optional[str]:
        """The first choice's ``reasoning_content``."""
        return self._first().reasoning_content

    @property
    def tool_calls(self) -> List[ToolCall]:
        """The first choice's ``tool_calls``."""
        return self._first().tool_calls

    @property
    def finish_reason(self) -> Optional[str]:
        """The first choice's ``finish_reason``."""
        return self._first().finish_reason

    @property
    def logprobs(self) -> Optional[Dict[str, Any]]:
        """The first choice's ``logprobs``."""
        return self._first().logprobs

    @property
    def message(self) -> Dict[str, Any]:
        """The first choice's ``message``."""
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
        """Fold one ``chat.completion.chunk`` into every choice it names, and call ``on_delta``."""
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
        """The first choice's text; ``""`` when there is none."""
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> Optional[str]:
        """The first choice's ``finish_reason``, or None."""
        return self.choices[0].finish_reason if self.choices else None

    @property
    def logprobs(self) -> Optional[Dict[str, Any]]:
        """The first choice's ``logprobs``, or None."""
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
        """Fold one ``text_completion`` chunk into every choice it names, and call ``on_text``."""
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
        """The whole answer so far (call it after the stream ended)."""
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
