"""The SDK's response types, lazily built over the decoded JSON, and its
``NOT_GIVEN`` sentinel."""

from __future__ import annotations

import copy as _copy
import json
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Tuple, Type, TypeVar

# =============================================================================
# sentinels
# =============================================================================


class NotGiven:
    """The SDK's "argument not given" sentinel (``NOT_GIVEN``); such arguments are not sent."""

    _instance: ClassVar[Optional["NotGiven"]] = None

    def __new__(cls) -> "NotGiven":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()


def _given(v: Any) -> bool:
    """False for this module's NOT_GIVEN and for the SDK's ``NOT_GIVEN``/``omit``
    (recognised by class name: the openai package is never imported)."""
    return v is not NOT_GIVEN and type(v).__name__ not in ("NotGiven", "Omit")


# =============================================================================
# response objects: the SDK's attribute shape over the decoded JSON
# =============================================================================

_M = TypeVar("_M", bound="BaseModel")
_T = TypeVar("_T")


class BaseModel:
    """A response object: attributes over the JSON the server sent.

    A declared field the server left out reads as ``None``; a field the
    server sent beyond the declared ones (``timings``, ``reasoning_content``)
    reads as its value; anything else raises ``AttributeError``. Nested
    objects are built on first read and kept.
    """

    __slots__ = ("_raw", "__dict__")
    #: field name → converter of the raw value (``None``: the value as it is)
    _fields: ClassVar[Dict[str, Optional[Callable[[Any], Any]]]] = {}

    def __init__(self, **data: Any) -> None:
        _set_raw(self, {k: _dump(v) for k, v in data.items()})

    @classmethod
    def _w(cls: Type[_M], raw: Dict[str, Any]) -> _M:
        o = _new(cls)
        _set_raw(o, raw)
        return o

    @classmethod
    def construct(cls: Type[_M], **data: Any) -> _M:
        return cls(**data)

    model_construct = construct

    @classmethod
    def model_validate(cls: Type[_M], obj: Mapping[str, Any]) -> _M:
        return cls._w(dict(obj))

    def __getattr__(self, name: str) -> Any:
        # Declared fields are properties (see _model); this serves the others.
        if name[:1] == "_":
            raise AttributeError(name)
        try:
            return self._raw[name]
        except (KeyError, TypeError):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._fields:
            object.__setattr__(self, name, value)  # the field's property
        else:
            self.__dict__[name] = value
            self._raw[name] = _dump(value)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._raw == other._raw  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        for k in self._raw:
            yield k, getattr(self, k)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self)})"

    def __getstate__(self) -> Dict[str, Any]:
        return {"_raw": self._raw}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        _set_raw(self, state["_raw"])

    def __copy__(self: _M) -> _M:
        return type(self)._w(dict(self._raw))

    def __deepcopy__(self: _M, memo: Dict[int, Any]) -> _M:
        return type(self)._w(_copy.deepcopy(self._raw, memo))

    @property
    def model_fields_set(self) -> set:
        return set(self._raw)

    def model_dump(self, *, exclude_none: bool = False, **_: Any) -> Dict[str, Any]:
        """A deep copy of the data as plain dicts and lists."""
        return _plain(self._raw, exclude_none)

    def to_dict(self, *, exclude_none: bool = False, **_: Any) -> Dict[str, Any]:
        return _plain(self._raw, exclude_none)

    def model_dump_json(self, *, indent: Optional[int] = None, exclude_none: bool = False, **_: Any) -> str:
        return json.dumps(_plain(self._raw, exclude_none), indent=indent, ensure_ascii=False)

    def to_json(self, *, indent: Optional[int] = 2, exclude_none: bool = False, **_: Any) -> str:
        return json.dumps(_plain(self._raw, exclude_none), indent=indent, ensure_ascii=False)


def _dump(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v._raw
    if isinstance(v, list):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v


def _plain(v: Any, exclude_none: bool) -> Any:
    if v.__class__ is dict:
        return {k: _plain(x, exclude_none) for k, x in v.items() if not (exclude_none and x is None)}
    if v.__class__ is list:
        return [_plain(x, exclude_none) for x in v]
    return v


def _one(cls: Type[BaseModel]) -> Callable[[Any], Any]:
    w = cls._w

    def conv(v: Any) -> Any:
        return w(v) if v.__class__ is dict else v

    conv.model = cls  # type: ignore[attr-defined]
    return conv


def _many(cls: Type[BaseModel]) -> Callable[[Any], Any]:
    w = cls._w

    def conv(v: Any) -> Any:
        if v.__class__ is not list:
            return v
        return [w(x) if x.__class__ is dict else x for x in v]

    conv.model = cls  # type: ignore[attr-defined]
    return conv


_new = object.__new__
_set_raw = BaseModel._raw.__set__  # type: ignore[attr-defined] # the slot, bypassing __setattr__
_MISSING = object()


def _plain_field(name: str) -> property:
    def fget(self: BaseModel) -> Any:
        return self._raw.get(name)

    def fset(self: BaseModel, value: Any) -> None:
        self._raw[name] = _dump(value)

    return property(fget, fset)


def _object_field(name: str, conv: Callable[[Any], Any]) -> property:
    def fget(self: BaseModel) -> Any:
        cache = self.__dict__
        v = cache.get(name, _MISSING)
        if v is _MISSING:
            v = self._raw.get(name)
            if v is not None:
                v = conv(v)
            cache[name] = v
        return v

    def fset(self: BaseModel, value: Any) -> None:
        self._raw[name] = _dump(value)
        self.__dict__[name] = value

    return property(fget, fset)


def _model(name: str, fields: Dict[str, Optional[Callable[[Any], Any]]], doc: str = "") -> Type[BaseModel]:
    """A response class: one property per declared field (absent: ``None``);
    nested objects are built on first read and kept."""
    ns: Dict[str, Any] = {"__slots__": (), "_fields": fields, "__doc__": doc, "__module__": __name__}
    for fname, conv in fields.items():
        ns[fname] = _plain_field(fname) if conv is None else _object_field(fname, conv)
    return type(name, (BaseModel,), ns)  # type: ignore[return-value]


# -- shared --------------------------------------------------------------------
PromptTokensDetails = _model(
    "PromptTokensDetails",
    dict.fromkeys(("audio_tokens", "cache_write_tokens", "cached_tokens", "image_tokens", "text_tokens")),
)
CompletionTokensDetails = _model(
    "CompletionTokensDetails",
    dict.fromkeys(
        (
            "accepted_prediction_tokens",
            "audio_tokens",
            "reasoning_tokens",
            "rejected_prediction_tokens",
            "text_tokens",
        )
    ),
)
CompletionUsage = _model(
    "CompletionUsage",
    {
        "completion_tokens": None,
        "prompt_tokens": None,
        "total_tokens": None,
        "completion_tokens_details": _one(CompletionTokensDetails),
        "prompt_tokens_details": _one(PromptTokensDetails),
    },
    "Token counts: ``prompt_tokens``, ``completion_tokens``, ``total_tokens``.",
)
TopLogprob = _model("TopLogprob", dict.fromkeys(("token", "bytes", "logprob")))
ChatCompletionTokenLogprob = _model(
    "ChatCompletionTokenLogprob",
    {"token": None, "bytes": None, "logprob": None, "top_logprobs": _many(TopLogprob)},
)
ChoiceLogprobs = _model(
    "ChoiceLogprobs",
    {"content": _many(ChatCompletionTokenLogprob), "refusal": _many(ChatCompletionTokenLogprob)},
)

# -- chat.completion -------------------------------------------------------------
Function = _model("Function", dict.fromkeys(("arguments", "name")))
ChatCompletionAudio = _model("ChatCompletionAudio", dict.fromkeys(("data", "expires_at", "id", "transcript")))
AnnotationURLCitation = _model("AnnotationURLCitation", dict.fromkeys(("end_index", "start_index", "title", "url")))
Annotation = _model("Annotation", {"type": None, "url_citation": _one(AnnotationURLCitation)})
FunctionCall = _model("FunctionCall", dict.fromkeys(("arguments", "name")))
ChatCompletionMessageToolCall = _model(
    "ChatCompletionMessageToolCall", {"id": None, "function": _one(Function), "type": None}
)
ChatCompletionMessage = _model(
    "ChatCompletionMessage",
    {
        "content": None,
        "refusal": None,
        "role": None,
        "annotations": _many(Annotation),
        "audio": _one(ChatCompletionAudio),
        "function_call": _one(FunctionCall),
        "tool_calls": _many(ChatCompletionMessageToolCall),
    },
    "The assistant's message: ``content``, ``tool_calls``, ``role`` (and llama-server's ``reasoning_content``).",
)
Choice = _model(
    "Choice",
    {
        "finish_reason": None,
        "index": None,
        "logprobs": _one(ChoiceLogprobs),
        "message": _one(ChatCompletionMessage),
    },
)
ChatCompletion = _model(
    "ChatCompletion",
    {
        "id": None,
        "choices": _many(Choice),
        "created": None,
        "metadata": None,
        "model": None,
        "moderation": None,
        "object": None,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": _one(CompletionUsage),
    },
    "A whole chat completion (``chat.completion``).",
)

# -- chat.completion.chunk ----------------------------------------------------------
ChoiceDeltaToolCallFunction = _model("ChoiceDeltaToolCallFunction", dict.fromkeys(("arguments", "name")))
ChoiceDeltaToolCall = _model(
    "ChoiceDeltaToolCall",
    {"index": None, "id": None, "function": _one(ChoiceDeltaToolCallFunction), "type": None},
)
ChoiceDeltaFunctionCall = _model("ChoiceDeltaFunctionCall", dict.fromkeys(("arguments", "name")))
ChoiceDeltaAudio = _model("ChoiceDeltaAudio", dict.fromkeys(("data", "expires_at", "id", "transcript")))
ChoiceDelta = _model(
    "ChoiceDelta",
    {
        "audio": _one(ChoiceDeltaAudio),
        "content": None,
        "function_call": _one(ChoiceDeltaFunctionCall),
        "refusal": None,
        "role": None,
        "tool_calls": _many(ChoiceDeltaToolCall),
    },
    "One streamed piece: ``content``, ``role``, ``tool_calls`` fragments (and ``reasoning_content``).",
)
ChunkChoice = _model(
    "ChunkChoice",
    {"delta": _one(ChoiceDelta), "finish_reason": None, "index": None, "logprobs": _one(ChoiceLogprobs)},
)
ChatCompletionChunk = _model(
    "ChatCompletionChunk",
    {
        "id": None,
        "choices": _many(ChunkChoice),
        "created": None,
        "model": None,
        "moderation": None,
        "obfuscation": None,
        "object": None,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": _one(CompletionUsage),
    },
    "One streamed chunk (``chat.completion.chunk``).",
)

# -- text_completion ------------------------------------------------------------------
Logprobs = _model("Logprobs", dict.fromkeys(("text_offset", "token_logprobs", "tokens", "top_logprobs")))
CompletionChoice = _model(
    "CompletionChoice", {"finish_reason": None, "index": None, "logprobs": _one(Logprobs), "text": None}
)
Completion = _model(
    "Completion",
    {
        "id": None,
        "choices": _many(CompletionChoice),
        "created": None,
        "model": None,
        "object": None,
        "system_fingerprint": None,
        "usage": _one(CompletionUsage),
    },
    "A ``/v1/completions`` answer or streamed chunk (``text_completion``).",
)

# -- models -----------------------------------------------------------------------------
Model = _model("Model", dict.fromkeys(("id", "created", "object", "owned_by", "shutdown_date")))


class SyncPage:
    """``models.list()``'s page: ``.data`` and iteration over :class:`Model`."""

    def __init__(self, data: List[Any], obj: str = "list") -> None:
        self.data = data
        self.object = obj

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def has_next_page(self) -> bool:
        return False

    def next_page_info(self) -> None:
        """There is never a next page (the SDK's answer for ``/models`` too)."""
        return None

    def iter_pages(self) -> Iterator["SyncPage"]:
        yield self

    def model_dump(self, *, exclude_none: bool = False, **_: Any) -> Dict[str, Any]:
        """``{"data": [...], "object": ...}`` as plain dicts and lists."""
        data = [_plain(_dump(m), exclude_none) for m in self.data]
        return {"data": data, "object": self.object}

    def to_dict(self, *, exclude_none: bool = False, **_: Any) -> Dict[str, Any]:
        return self.model_dump(exclude_none=exclude_none)

    def model_dump_json(self, *, indent: Optional[int] = None, exclude_none: bool = False, **_: Any) -> str:
        return json.dumps(self.model_dump(exclude_none=exclude_none), indent=indent, ensure_ascii=False)

    def to_json(self, *, indent: Optional[int] = 2, exclude_none: bool = False, **_: Any) -> str:
        return json.dumps(self.model_dump(exclude_none=exclude_none), indent=indent, ensure_ascii=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data={self.data!r})"


# =============================================================================
# the rest of the SDK surface: Omit, Timeout, embeddings, parsed completions, async pages
# =============================================================================


class Omit:
    """The SDK's ``omit``: a value that is not sent (like ``NOT_GIVEN``)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "omit"


omit = Omit()
#: The SDK's newer name for ``NOT_GIVEN`` (the same sentinel here).
not_given = NOT_GIVEN


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


_UNSET: Any = _Unset()


class Timeout:
    """The SDK's ``Timeout`` (httpx's): ``Timeout(600.0, connect=5.0)``,
    ``Timeout(None)``, ``Timeout(connect=…, read=…, write=…, pool=…)`` or a
    ``(connect, read, write, pool)`` tuple. The client uses ``connect`` (to
    connect) and ``read`` (the longest wait for a byte); ``write`` and
    ``pool`` are kept for equality and repr."""

    connect: Optional[float]
    read: Optional[float]
    write: Optional[float]
    pool: Optional[float]

    def __init__(
        self,
        timeout: Any = _UNSET,
        *,
        connect: Any = _UNSET,
        read: Any = _UNSET,
        write: Any = _UNSET,
        pool: Any = _UNSET,
    ) -> None:
        if isinstance(timeout, Timeout):
            if any(v is not _UNSET for v in (connect, read, write, pool)):
                raise ValueError("Timeout(Timeout(...)) takes no other argument")
            self.connect, self.read, self.write, self.pool = timeout.connect, timeout.read, timeout.write, timeout.pool
        elif isinstance(timeout, tuple):
            self.connect, self.read = timeout[0], timeout[1]
            self.write = timeout[2] if len(timeout) > 2 else None
            self.pool = timeout[3] if len(timeout) > 3 else None
        elif all(v is not _UNSET for v in (connect, read, write, pool)):
            self.connect, self.read, self.write, self.pool = connect, read, write, pool
        else:
            if timeout is _UNSET:
                raise ValueError("Timeout must either include a default, or set all four parameters explicitly.")
            self.connect = timeout if connect is _UNSET else connect
            self.read = timeout if read is _UNSET else read
            self.write = timeout if write is _UNSET else write
            self.pool = timeout if pool is _UNSET else pool

    def as_dict(self) -> Dict[str, Optional[float]]:
        return {"connect": self.connect, "read": self.read, "write": self.write, "pool": self.pool}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Timeout):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if len({self.connect, self.read, self.write, self.pool}) == 1:
            return f"Timeout(timeout={self.connect})"
        return f"Timeout(connect={self.connect}, read={self.read}, write={self.write}, pool={self.pool})"


#: The SDK's default: 600 s without a byte, 5 s to connect.
DEFAULT_TIMEOUT = Timeout(timeout=600, connect=5.0)

# -- embeddings ----------------------------------------------------------------------
Embedding = _model(
    "Embedding",
    dict.fromkeys(("embedding", "index", "object")),
    "One input's vector: ``embedding`` (floats, or the base64 string asked for), ``index``.",
)
Usage = _model("Usage", dict.fromkeys(("prompt_tokens", "total_tokens")))
CreateEmbeddingResponse = _model(
    "CreateEmbeddingResponse",
    {"data": _many(Embedding), "model": None, "object": None, "usage": _one(Usage)},
    "``embeddings.create``'s answer: ``data`` (one :class:`Embedding` per input), ``model``, ``usage``.",
)

# -- chat.completions.parse ----------------------------------------------------------------


def _as_is(v: Any) -> Any:
    return v


# ``parsed`` / ``parsed_arguments``: the data is the JSON form (what model_dump()
# gives); the attribute is the object parse() made, kept in the field's cache.
ParsedFunction = _model(
    "ParsedFunction",
    {"arguments": None, "name": None, "parsed_arguments": _as_is},
    "A tool call's function with ``parsed_arguments`` (a strict tool's arguments, decoded).",
)
ParsedFunctionToolCall = _model(
    "ParsedFunctionToolCall", {"id": None, "function": _one(ParsedFunction), "type": None}
)
ParsedChatCompletionMessage = _model(
    "ParsedChatCompletionMessage",
    dict(ChatCompletionMessage._fields, tool_calls=_many(ParsedFunctionToolCall), parsed=_as_is),
    "The assistant's message with ``parsed``: the content validated by the ``response_format`` class.",
)
ParsedChoice = _model("ParsedChoice", dict(Choice._fields, message=_one(ParsedChatCompletionMessage)))
ParsedChatCompletion = _model(
    "ParsedChatCompletion",
    dict(ChatCompletion._fields, choices=_many(ParsedChoice)),
    "``chat.completions.parse``'s answer: a :class:`ChatCompletion` whose messages have ``parsed``.",
)


class AsyncPage(SyncPage):
    """:class:`AsyncOpenAI`'s ``models.list()`` page: ``.data``, ``for`` and ``async for``."""

    async def __aiter__(self) -> Any:  # an async generator
        for item in self.data:
            yield item
