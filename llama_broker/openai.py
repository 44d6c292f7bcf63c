"""An OpenAI-SDK-shaped client over llama_broker's streaming path.

::

    from llama_broker.openai import OpenAI          # instead of: from openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="sk-no-key")
    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    print(resp.choices[0].message.content, resp.usage.completion_tokens)

    with client.chat.completions.create(model="m", messages=msgs, stream=True) as stream:
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="")

What is covered: ``OpenAI`` / ``AsyncOpenAI`` constructed like the SDK's
(``api_key``, ``base_url``, ``timeout``, ``max_retries``, ``default_headers``,
``default_query``, ``organization``, ``project``; ``OPENAI_API_KEY`` and
``OPENAI_BASE_URL`` are read when not given), ``chat.completions.create``,
``completions.create`` and ``models.list``, with the SDK's per-request
``extra_headers``, ``extra_query``, ``extra_body`` and ``timeout``. Every other
keyword is sent as it is (``NOT_GIVEN``/``omit`` values are dropped), so
llama.cpp's own parameters (``top_k``, ``min_p``, ``n_probs``, ``cache_prompt``,
``id_slot``, ``json_schema`` …) pass through.

Responses have the SDK's attribute shape: ``resp.choices[0].message.content``,
``resp.usage.completion_tokens``, ``chunk.choices[0].delta.content``,
``chunk.choices[0].delta.tool_calls[0].function.arguments``. Fields the server
sends beyond the SDK's (llama.cpp's ``timings``, ``reasoning_content``) are
attributes too, as with the SDK's models. ``model_dump()``, ``to_dict()``,
``to_json()`` and ``model_dump_json()`` give the data back. The objects wrap
the decoded JSON and build nested objects only when read, which is where the
SDK spends most of its time per chunk.

Non-streaming calls stream underneath (with ``stream_options.include_usage``)
and are assembled into the same object the server would have sent. A stream
is pulled from libcurl on demand (no threads); ``close()`` or leaving the
``with`` block closes the connection, which cancels the generation.
``create(stream=True)`` returns once the response status is known, so an
HTTP error is raised there, as by the SDK.

Retries follow the SDK's rules, with the same ``max_retries`` (default 2):
408, 409, 429 and 5xx answers, timeouts and connection errors are sent again;
an ``x-should-retry`` header decides when present; the wait is the server's
``retry-after-ms``/``Retry-After`` when 0 < value <= 120 s, else 0.5 s * 2**n
capped at 8 s, less up to 25 % jitter. A stream is retried only until
``create()`` returns (nothing reached the caller yet), as the SDK does; a TLS
certificate that failed verification is never retried.

Errors keep the SDK's names and attributes (``status_code``, ``code``,
``type``, ``body``, ``message``, ``response.headers``) and are also llama_broker's own:
:class:`APIStatusError` and its subclasses are ``llama_broker.APIError``,
:class:`APIConnectionError` is ``llama_broker.TransportError``,
:class:`APITimeoutError` is ``llama_broker.TimeoutError_``,
:class:`APIResponseValidationError` is ``llama_broker.ProtocolError``, and an
error reported inside a stream is an :class:`APIStreamError` (an
:class:`APIError` and a ``llama_broker.APIError``).

:class:`AsyncOpenAI` runs on llama_broker's asyncio engine (curl's socket
callbacks on the running loop, no threads); only ``models.list`` uses a
worker thread.

Nothing here imports the ``openai`` package.
"""

from __future__ import annotations

import asyncio
import copy as _copy
import json
import os
import threading
import time
from dataclasses import replace
from typing import (
    Any,
    Awaitable,
    Callable,
    ClassVar,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    TypeVar,
)
from urllib.parse import urlencode

from . import errors as _e
from .broker import Broker
from .config import ModelConfig
from .errors import BrokerError, Headers
from .native import (
    AsyncEventStream,
    ChatAccumulator,
    ChunkDecoder,
    EventStream,
    TextAccumulator,
    _perform,
    aperform,
    encode_body,
)
from .decoder import JSONBody
from .policy import sdk_retry_delay

__all__ = [
    "OpenAI",
    "AsyncOpenAI",
    "Client",
    "AsyncClient",
    "Stream",
    "AsyncStream",
    "NOT_GIVEN",
    "NotGiven",
    "BaseModel",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "ChatCompletionMessageToolCall",
    "Completion",
    "CompletionChoice",
    "CompletionUsage",
    "Model",
    "SyncPage",
    "OpenAIError",
    "APIError",
    "APIStatusError",
    "APIStreamError",
    "APIConnectionError",
    "APITimeoutError",
    "APIResponseValidationError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT_S = 600.0  # the SDK's read timeout
DEFAULT_CONNECT_TIMEOUT_S = 5.0  # the SDK's connect timeout
DEFAULT_MAX_RETRIES = 2
# The SDK has no bound on a whole request (only per phase); this stands in for "none".
_NO_TOTAL_MS = 7 * 24 * 3600 * 1000


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

    def __repr__(self) -> str:
        return f"SyncPage(data={self.data!r})"


AsyncPage = SyncPage


# =============================================================================
# errors: the SDK's names, llama_broker's tree
# =============================================================================


class _Request:
    """Where an error happened (the SDK gives an httpx request here)."""

    __slots__ = ("method", "url")

    def __init__(self, method: str, url: str) -> None:
        self.method = method
        self.url = url

    def __repr__(self) -> str:
        return f"<Request({self.method!r}, {self.url!r})>"


class _Response:
    """The error response's status, request, body and headers (the SDK gives an
    httpx response); ``headers`` is case-insensitive, as httpx's."""

    __slots__ = ("status_code", "request", "text", "headers")

    def __init__(
        self, status_code: int, request: Optional[_Request], text: str, headers: Optional[Headers] = None
    ) -> None:
        self.status_code = status_code
        self.request = request
        self.text = text
        self.headers: Headers = headers if headers is not None else Headers()

    def json(self) -> Any:
        return json.loads(self.text)

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}]>"


class OpenAIError(BrokerError):
    """Base of the SDK-named errors (a :class:`llama_broker.BrokerError`)."""


class APIError(OpenAIError):
    """The SDK's ``APIError``: ``message``, ``request``, ``body``, ``code``, ``param``, ``type``."""

    prefix = "api"

    request: Optional[_Request] = None
    body: Any = None
    code: Any = None  # the SDK's: a str (llama_broker's APIError keeps the server's value)
    param: Optional[str] = None
    type: Optional[str] = None

    def _sdk_fields(self, message: str, request: Optional[_Request], body: Any) -> None:
        Exception.__init__(self, message)
        self.message = message
        self.request = request
        self.body = body
        if isinstance(body, dict):
            code = body.get("code")
            self.code = str(code) if code is not None else None
            param = body.get("param")
            self.param = param if isinstance(param, str) else None
            etype = body.get("type")
            self.type = etype if isinstance(etype, str) else None
        else:
            self.code = self.param = self.type = None

    def __init__(self, message: str, request: Optional[_Request] = None, *, body: Any = None) -> None:
        self._sdk_fields(message, request, body)


class APIStatusError(APIError, _e.APIError):
    """An HTTP 4xx/5xx answer: ``status_code`` (also ``status``), ``response``,
    and ``message`` as the SDK words it (``Error code: 400 - …``)."""

    status_code: int
    response: _Response
    request_id: Optional[str] = None

    def __init__(
        self,
        message: str,
        *,
        response: _Response,
        body: Any,
        server_message: Optional[str] = None,
        raw: Optional[str] = None,
    ) -> None:
        self._sdk_fields(message, response.request, body)
        self.response = response
        self.status_code = response.status_code
        self.status = response.status_code
        self.request_id = None
        self.server_message = server_message if server_message is not None else message
        self.raw_body = raw

    def __str__(self) -> str:
        kind = f" ({self.type})" if self.type else ""
        return f"api: HTTP {self.status_code}{kind}: {self.server_message}"


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    pass


_STATUS_ERRORS: Dict[int, Type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


class APIStreamError(APIError, _e.APIError):
    """An error the server reported inside the event stream (the SDK raises its
    ``APIError`` there; this is one, and a ``llama_broker.APIError`` with ``status`` None)."""

    def __init__(self, message: str, request: Optional[_Request] = None, *, body: Any = None) -> None:
        self._sdk_fields(message, request, body)
        self.status = None

    def __str__(self) -> str:
        kind = f" ({self.type})" if self.type else ""
        return f"api: in stream{kind}: {self.message}"


class APIConnectionError(APIError, _e.TransportError):
    """The connection failed or broke (a ``llama_broker.TransportError``: ``curl_code``,
    ``bytes_received``, ``delivered``)."""

    prefix = "transport"

    def __init__(self, *, message: str = "Connection error.", request: Optional[_Request] = None) -> None:
        self._sdk_fields(message, request, None)
        self.curl_code: Optional[int] = None
        self.bytes_received = 0
        self.delivered = False


class APITimeoutError(APIConnectionError, _e.TimeoutError_):
    """A connect or read timeout (a ``llama_broker.TimeoutError_``)."""

    def __init__(self, request: Optional[_Request] = None, *, message: str = "Request timed out.") -> None:
        super().__init__(message=message, request=request)


class APIResponseValidationError(APIError, _e.ProtocolError):
    """The server sent something that cannot be decoded (a ``llama_broker.ProtocolError``)."""

    prefix = "protocol"

    def __init__(self, message: str, request: Optional[_Request] = None, *, status_code: int = 200) -> None:
        self._sdk_fields(message, request, None)
        self.status_code = status_code


def _error_body(raw: Optional[str]) -> Any:
    if raw is None:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.strip()
    return body.get("error", body) if isinstance(body, dict) else body


def _convert(err: BaseException, request: Optional[_Request]) -> BaseException:
    """The SDK-named error for one of llama_broker's (other exceptions unchanged)."""
    if isinstance(err, OpenAIError) or not isinstance(err, BrokerError):
        return err
    out: APIError
    if isinstance(err, _e.APIError):
        body = _error_body(err.body)
        if body is None and (err.type or err.code is not None):
            body = {"message": err.message, "type": err.type, "code": err.code}
        elif body is None and err.status is not None:
            body = ""  # the SDK's body for an empty error response is its (empty) text
        if err.status is None:
            out = APIStreamError(err.message, request, body=body if body is not None else err.message)
        else:
            status = err.status
            cls = _STATUS_ERRORS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
            msg = f"Error code: {status}" + (f" - {err.message}" if err.message else "")
            out = cls(
                msg,
                response=_Response(status, request, err.body or "", err.headers),
                body=body,
                server_message=err.message,
                raw=err.body,
            )
    elif isinstance(err, _e.TransportError):
        if isinstance(err, _e.TimeoutError_):
            out = APITimeoutError(request, message=err.message)
        else:
            out = APIConnectionError(message=err.message, request=request)
        out.curl_code = err.curl_code  # type: ignore[attr-defined]
        out.bytes_received = err.bytes_received  # type: ignore[attr-defined]
        out.delivered = err.delivered  # type: ignore[attr-defined]
    elif isinstance(err, _e.ProtocolError):
        out = APIResponseValidationError(err.message, request)
    else:  # ConfigError and other caller mistakes stay as they are
        return err
    out.__cause__ = err
    return out


# =============================================================================
# the client
# =============================================================================


class _SecretHeaders(dict):
    """Request headers whose repr masks credentials (they travel in ModelConfig.headers)."""

    _SECRET = frozenset(("authorization", "x-api-key", "api-key", "openai-organization", "openai-project"))

    def __repr__(self) -> str:
        return repr({k: ("***" if k.lower() in self._SECRET else v) for k, v in self.items()})


def _timeouts(timeout: Any) -> Tuple[int, int, Optional[int]]:
    """``(timeout_ms, connect_timeout_ms, idle_timeout_ms)`` for an SDK ``timeout``:
    seconds (every phase, as httpx: the read timeout is the time without a byte),
    ``None`` (no timeout), or an object with ``connect``/``read`` (httpx.Timeout)."""
    if timeout is None:
        return _NO_TOTAL_MS, _NO_TOTAL_MS, None
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        if timeout <= 0:
            raise _e.ConfigError(f"timeout must be positive, got {timeout!r}")
        ms = max(1, int(timeout * 1000))
        return _NO_TOTAL_MS, ms, ms
    connect = getattr(timeout, "connect", None)
    read = getattr(timeout, "read", None)
    if connect is None and read is None and not hasattr(timeout, "read"):
        raise _e.ConfigError(f"timeout must be seconds, None, or an httpx.Timeout-like object, got {timeout!r}")
    c_ms = max(1, int(connect * 1000)) if connect else _NO_TOTAL_MS
    r_ms = max(1, int(read * 1000)) if read else None
    return _NO_TOTAL_MS, c_ms, r_ms


class _Options:
    """One client's settings (shared by its resources)."""

    def __init__(
        self,
        *,
        api_key: Optional[str],
        organization: Optional[str],
        project: Optional[str],
        base_url: str,
        timeout: Any,
        max_retries: int,
        default_headers: Optional[Mapping[str, str]],
        default_query: Optional[Mapping[str, Any]],
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise _e.ConfigError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        self.api_key = api_key
        self.organization = organization
        self.project = project
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.default_headers = dict(default_headers or {})
        self.default_query = dict(default_query or {})
        headers = _SecretHeaders()
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if organization:
            headers["OpenAI-Organization"] = organization
        if project:
            headers["OpenAI-Project"] = project
        for k, v in self.default_headers.items():
            if _given(v) and v is not None:
                headers[k] = str(v)
        total, connect, idle = _timeouts(timeout)
        self.cfg = ModelConfig(
            endpoint=self.base_url,
            temperature=None,  # send only what the caller passed
            timeout_ms=total,
            connect_timeout_ms=connect,
            idle_timeout_ms=idle,
            max_retries=max_retries,
            headers=headers,
        )
        self._cfg_src: Optional[ModelConfig] = None
        self._cfg_once = self.cfg

    def url(self, path: str, extra_query: Optional[Mapping[str, Any]] = None) -> str:
        q = dict(self.default_query)
        if extra_query:
            q.update(extra_query)
        url = self.base_url + path
        return f"{url}?{urlencode(q, doseq=True)}" if q else url

    def request_cfg(self, extra_headers: Any, timeout: Any) -> ModelConfig:
        # Each attempt goes out once (max_retries 0): the SDK's retry loop
        # (_retrying) decides what is sent again, not the Broker's rule.
        cfg = self.cfg
        if cfg is not self._cfg_src:
            self._cfg_src, self._cfg_once = cfg, replace(cfg, max_retries=0)
        cfg = self._cfg_once
        if extra_headers and _given(extra_headers):
            headers = _SecretHeaders(cfg.headers)
            for k, v in extra_headers.items():
                if v is None or not _given(v):
                    headers.pop(k, None)  # the SDK's way to remove a default header
                else:
                    headers[k] = str(v)
            cfg = replace(cfg, headers=headers)
        if _given(timeout):
            total, connect, idle = _timeouts(timeout)
            cfg = replace(cfg, timeout_ms=total, connect_timeout_ms=connect, idle_timeout_ms=idle)
        return cfg


def _split(kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Any, Any, Any]:
    """Request fields and the SDK's per-request options out of ``create``'s kwargs."""
    extra_headers = kwargs.pop("extra_headers", None)
    extra_query = kwargs.pop("extra_query", None)
    extra_body = kwargs.pop("extra_body", None)
    timeout = kwargs.pop("timeout", NOT_GIVEN)
    body = {k: v for k, v in kwargs.items() if _given(v)}
    if extra_body and _given(extra_body):
        body.update(extra_body)
    return body, extra_headers, extra_query if _given(extra_query) else None, timeout


class _Prepared:
    """One create() call, ready to send."""

    __slots__ = ("kind", "cfg", "url", "data", "request", "stream")

    def __init__(self, kind: str, cfg: ModelConfig, url: str, data: bytes, request: _Request, stream: bool) -> None:
        self.kind = kind
        self.cfg = cfg
        self.url = url
        self.data = data
        self.request = request
        self.stream = stream

    def accumulator(self) -> Any:
        return ChatAccumulator() if self.kind == "chat" else TextAccumulator()

    def decoder(self, push: Callable[[Any], Any]) -> Callable[[float], ChunkDecoder]:
        strict, limit = self.cfg.strict, self.cfg.max_event_bytes
        return lambda t0: ChunkDecoder(push, strict=strict, t0=t0, max_event_bytes=limit)

    def whole(self, acc: Any, res: Any) -> BaseModel:
        raw = acc.reply(res).to_openai()
        return (ChatCompletion if self.kind == "chat" else Completion)._w(raw)

    @property
    def chunk_type(self) -> Type[BaseModel]:
        return ChatCompletionChunk if self.kind == "chat" else Completion


def _prepare(opts: _Options, kind: str, fixed: Dict[str, Any], stream: bool, kwargs: Dict[str, Any]) -> _Prepared:
    body, extra_headers, extra_query, timeout = _split(kwargs)
    cfg = opts.request_cfg(extra_headers, timeout)
    url = opts.url("/chat/completions" if kind == "chat" else "/completions", extra_query)
    out = dict(fixed)
    out.update(body)
    out.pop("stream", None)
    out["stream"] = True
    if not stream:
        out["stream_options"] = {"include_usage": True}  # the usage a non-streamed answer has
    return _Prepared(kind, cfg, url, encode_body(out, _json_default), _Request("POST", url), stream)


def _json_default(o: Any) -> Any:
    """Response objects put back into a request (``messages.append(resp.choices[0].message)``)
    go as the data the server sent, as the SDK sends its models."""
    if isinstance(o, BaseModel):
        return o._raw
    dump = getattr(o, "model_dump", None)  # another library's pydantic model
    if callable(dump):
        return dump(exclude_unset=True, mode="json")
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


class _Engine:
    """The blocking operations behind :class:`OpenAI`: one Broker per thread, so a
    client can be shared by threads as the SDK's can (a stream may be read on
    another thread than the one that opened it)."""

    def __init__(self, opts: _Options) -> None:
        self.opts = opts
        self._local = threading.local()
        self._brokers: List[Broker] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def broker(self) -> Broker:
        b = getattr(self._local, "broker", None)
        if b is None:
            with self._lock:
                if self._closed:
                    raise _e.ConfigError("this client is closed")
                b = self._local.broker = Broker()
                self._brokers.append(b)
        return b

    def _retrying(self, request: _Request, attempt: Callable[[], _T]) -> _T:
        """``attempt()`` under the SDK's retry rules; a final error is raised SDK-named."""
        retries = self.opts.max_retries
        taken = 0
        while True:
            try:
                return attempt()
            except BrokerError as err:
                delay = sdk_retry_delay(err, taken, retries)
                if delay is None:
                    raise _convert(err, request) from err
            time.sleep(delay)
            taken += 1

    def create(self, kind: str, fixed: Dict[str, Any], stream: bool, kwargs: Dict[str, Any]) -> Any:
        p = _prepare(self.opts, kind, fixed, stream, kwargs)
        if stream:

            def open_stream() -> EventStream:
                s = EventStream(self.broker, p.cfg, p.data, lambda push, t0: p.decoder(push)(t0), url=p.url)
                try:
                    s.wait_started()  # an HTTP error is raised by create(), as by the SDK
                except BaseException:
                    s.close()
                    raise
                return s

            return Stream(self._retrying(p.request, open_stream), p.chunk_type, p.request)

        def whole() -> BaseModel:
            # The reply is assembled before the caller sees any of it, so (as
            # with the SDK) even a connection broken mid-body may be retried.
            acc = p.accumulator()
            res = _perform(self.broker, p.cfg, p.data, p.decoder(acc.add), url=p.url)
            return p.whole(acc, res)

        return self._retrying(p.request, whole)

    def get_json(self, path: str, kwargs: Dict[str, Any]) -> Any:
        _, extra_headers, extra_query, timeout = _split(dict(kwargs))
        cfg = self.opts.request_cfg(extra_headers, timeout)
        url = self.opts.url(path, extra_query)
        request = _Request("GET", url)

        def get() -> Any:
            dec = JSONBody()
            _perform(self.broker, cfg, None, lambda t0: dec, url=url, method="GET", streaming=False)
            return dec.value

        return self._retrying(request, get)

    def models(self, kwargs: Dict[str, Any]) -> SyncPage:
        body = self.get_json("/models", kwargs)
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise APIResponseValidationError(f"/models answered without a data list: {str(body)[:200]!r}")
        return SyncPage([Model._w(m) if isinstance(m, dict) else m for m in body["data"]], body.get("object", "list"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            brokers, self._brokers = self._brokers, []
        for b in brokers:
            b.close()


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


# -- resources -------------------------------------------------------------------------


class _ChatCompletions:
    def __init__(self, client: "OpenAI") -> None:
        self._client = client

    def create(self, *, messages: Any, model: Any, stream: Any = False, **kwargs: Any) -> Any:
        """``POST {base_url}/chat/completions``: a :class:`ChatCompletion`, or with
        ``stream=True`` a :class:`Stream` of :class:`ChatCompletionChunk`."""
        stream = bool(stream) if _given(stream) else False
        return self._client._engine.create("chat", {"messages": messages, "model": model}, stream, kwargs)


class _Chat:
    def __init__(self, client: "OpenAI") -> None:
        self.completions = _ChatCompletions(client)


class _Completions:
    def __init__(self, client: "OpenAI") -> None:
        self._client = client

    def create(self, *, model: Any, prompt: Any, stream: Any = False, **kwargs: Any) -> Any:
        """``POST {base_url}/completions``: a :class:`Completion`, or with
        ``stream=True`` a :class:`Stream` of :class:`Completion` chunks."""
        stream = bool(stream) if _given(stream) else False
        return self._client._engine.create("text", {"model": model, "prompt": prompt}, stream, kwargs)


class _Models:
    def __init__(self, client: "OpenAI") -> None:
        self._client = client

    def list(self, **kwargs: Any) -> SyncPage:
        """``GET {base_url}/models``: a page of :class:`Model`."""
        return self._client._engine.models(kwargs)


def _client_options(
    api_key: Optional[str],
    organization: Optional[str],
    project: Optional[str],
    base_url: Optional[str],
    timeout: Any,
    max_retries: int,
    default_headers: Optional[Mapping[str, str]],
    default_query: Optional[Mapping[str, Any]],
) -> _Options:
    if api_key is None:
        api_key = os.environ.get("OPENAI_API_KEY")
    if organization is None:
        organization = os.environ.get("OPENAI_ORG_ID")
    if project is None:
        project = os.environ.get("OPENAI_PROJECT_ID")
    if base_url is None:
        base_url = os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    if not _given(timeout):
        timeout = _DefaultTimeout()
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise _e.ConfigError(f"max_retries must be an int >= 0, got {max_retries!r}")
    return _Options(
        api_key=api_key,
        organization=organization,
        project=project,
        base_url=str(base_url),
        timeout=timeout,
        max_retries=max_retries,
        default_headers=default_headers,
        default_query=default_query,
    )


class _DefaultTimeout:
    """The SDK's default: 600 s without a byte, 5 s to connect."""

    connect = DEFAULT_CONNECT_TIMEOUT_S
    read = DEFAULT_TIMEOUT_S

    def __repr__(self) -> str:
        return f"Timeout(connect={self.connect}, read={self.read})"


class OpenAI:
    """A drop-in for ``openai.OpenAI`` against llama-server (or any OpenAI-compatible
    server): ``chat.completions.create``, ``completions.create``, ``models.list``.

    Safe to share between threads, as the SDK's client is: each thread gets
    its own connections (a :class:`~llama_broker.Broker` per thread); a
    stream is read on the thread that opened it. The API key goes out as ``Authorization: Bearer …`` and is never shown in
    a repr or an error.
    """

    def __init__(
        self,
        *,
        api_key: Optional[str] = None,
        organization: Optional[str] = None,
        project: Optional[str] = None,
        base_url: Optional[str] = None,
        timeout: Any = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Optional[Mapping[str, str]] = None,
        default_query: Optional[Mapping[str, Any]] = None,
        http_client: Any = None,  # accepted for compatibility; libcurl does the I/O
        **_ignored: Any,
    ) -> None:
        self._opts = _client_options(
            api_key, organization, project, base_url, timeout, max_retries, default_headers, default_query
        )
        self._engine = _Engine(self._opts)
        self.chat = _Chat(self)
        self.completions = _Completions(self)
        self.models = _Models(self)

    # the SDK's client attributes
    @property
    def api_key(self) -> Optional[str]:
        return self._opts.api_key

    @property
    def base_url(self) -> str:
        return self._opts.base_url + "/"

    @property
    def max_retries(self) -> int:
        return self._opts.max_retries

    @property
    def timeout(self) -> Any:
        return self._opts.timeout

    @property
    def organization(self) -> Optional[str]:
        return self._opts.organization

    @property
    def project(self) -> Optional[str]:
        return self._opts.project

    def with_options(self, **kw: Any) -> "OpenAI":
        """A new client with some settings changed (the SDK's ``with_options``/``copy``)."""
        o = self._opts
        args: Dict[str, Any] = dict(
            api_key=o.api_key,
            organization=o.organization,
            project=o.project,
            base_url=o.base_url,
            timeout=o.timeout,
            max_retries=o.max_retries,
            default_headers=o.default_headers,
            default_query=o.default_query,
        )
        args.update({k: v for k, v in kw.items() if _given(v)})
        return type(self)(**args)

    copy = with_options

    def close(self) -> None:
        """Close pooled connections and open streams."""
        self._engine.close()

    def __enter__(self) -> "OpenAI":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._opts.base_url!r}, max_retries={self._opts.max_retries})"


Client = OpenAI


# -- async ------------------------------------------------------------------------------


class _AsyncChatCompletions:
    def __init__(self, client: "AsyncOpenAI") -> None:
        self._client = client

    async def create(self, *, messages: Any, model: Any, stream: Any = False, **kwargs: Any) -> Any:
        """``await``-able :meth:`OpenAI.chat.completions.create`; streams are :class:`AsyncStream`."""
        stream = bool(stream) if _given(stream) else False
        return await self._client._create("chat", {"messages": messages, "model": model}, stream, kwargs)


class _AsyncChat:
    def __init__(self, client: "AsyncOpenAI") -> None:
        self.completions = _AsyncChatCompletions(client)


class _AsyncCompletions:
    def __init__(self, client: "AsyncOpenAI") -> None:
        self._client = client

    async def create(self, *, model: Any, prompt: Any, stream: Any = False, **kwargs: Any) -> Any:
        stream = bool(stream) if _given(stream) else False
        return await self._client._create("text", {"model": model, "prompt": prompt}, stream, kwargs)


class _AsyncModels:
    def __init__(self, client: "AsyncOpenAI") -> None:
        self._client = client

    async def list(self, **kwargs: Any) -> SyncPage:
        """``GET {base_url}/models`` (in a worker thread): a page of :class:`Model`."""
        return await asyncio.to_thread(self._client._sync.models, kwargs)


class AsyncOpenAI:
    """A drop-in for ``openai.AsyncOpenAI``: ``await client.chat.completions.create(...)``;
    with ``stream=True`` an :class:`AsyncStream` (``async for``, ``async with``).

    Requests run on the Broker's asyncio engine (curl's socket callbacks on the
    running loop; no threads), one loop per client. ``models.list`` runs in a
    worker thread.
    """

    def __init__(
        self,
        *,
        api_key: Optional[str] = None,
        organization: Optional[str] = None,
        project: Optional[str] = None,
        base_url: Optional[str] = None,
        timeout: Any = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Optional[Mapping[str, str]] = None,
        default_query: Optional[Mapping[str, Any]] = None,
        http_client: Any = None,
        **_ignored: Any,
    ) -> None:
        self._opts = _client_options(
            api_key, organization, project, base_url, timeout, max_retries, default_headers, default_query
        )
        self._broker = Broker()  # its asyncio engine runs on the loop that first uses it
        self._sync = _Engine(self._opts)  # JSON endpoints (models.list), in worker threads
        self.chat = _AsyncChat(self)
        self.completions = _AsyncCompletions(self)
        self.models = _AsyncModels(self)

    api_key = OpenAI.api_key
    base_url = OpenAI.base_url
    max_retries = OpenAI.max_retries
    timeout = OpenAI.timeout
    organization = OpenAI.organization
    project = OpenAI.project

    async def _retrying(self, request: _Request, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """``await attempt()`` under the SDK's retry rules (see ``_Engine._retrying``)."""
        retries = self._opts.max_retries
        taken = 0
        while True:
            try:
                return await attempt()
            except BrokerError as err:
                delay = sdk_retry_delay(err, taken, retries)
                if delay is None:
                    raise _convert(err, request) from err
            await asyncio.sleep(delay)
            taken += 1

    async def _create(self, kind: str, fixed: Dict[str, Any], stream: bool, kwargs: Dict[str, Any]) -> Any:
        p = _prepare(self._opts, kind, fixed, stream, kwargs)
        if stream:

            async def open_stream() -> AsyncEventStream:
                s = AsyncEventStream(self._broker, p.cfg, p.data, lambda push, t0: p.decoder(push)(t0), url=p.url)
                try:
                    await s.wait_started()  # an HTTP error is raised by create(), as by the SDK
                except BaseException:
                    await s.aclose()
                    raise
                return s

            return AsyncStream(await self._retrying(p.request, open_stream), p.chunk_type, p.request)

        async def whole() -> BaseModel:
            acc = p.accumulator()
            res = await aperform(self._broker, p.cfg, p.data, p.decoder(acc.add), url=p.url)
            return p.whole(acc, res)

        return await self._retrying(p.request, whole)

    def with_options(self, **kw: Any) -> "AsyncOpenAI":
        return OpenAI.with_options(self, **kw)  # type: ignore[arg-type,return-value]

    copy = with_options

    async def close(self) -> None:
        """Close pooled connections and open streams."""
        self._broker.close()
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> "AsyncOpenAI":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._opts.base_url!r}, max_retries={self._opts.max_retries})"


AsyncClient = AsyncOpenAI
