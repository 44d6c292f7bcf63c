"""``OpenAI`` and ``AsyncOpenAI``, their options, and their resources
(``chat.completions``, ``completions``, ``models``)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple, Type, TypeVar
from urllib.parse import urlencode

from .. import errors as _e
from ..broker import Broker
from ..config import ModelConfig
from ..errors import BrokerError
from ..native import AsyncEventStream, ChatAccumulator, ChunkDecoder, EventStream, TextAccumulator
from ..policy import encode_body
from ..policy import sdk_retry_delay
from ._errors import APIResponseValidationError, _convert, _Request
from ._raw import _CAPTURE, _RawClient, _RawResource, _StreamingResource, json_decoder
from ._streaming import AsyncStream, SDKChunkDecoder, Stream
from ._types import DEFAULT_TIMEOUT, NOT_GIVEN, BaseModel, ChatCompletion, ChatCompletionChunk, Completion, Model, SyncPage, _given

_T = TypeVar("_T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT_S = 600.0  # the SDK's read timeout
DEFAULT_CONNECT_TIMEOUT_S = 5.0  # the SDK's connect timeout
DEFAULT_MAX_RETRIES = 2
# The SDK has no bound on a whole request (only per phase); this stands in for "none".
_NO_TOTAL_MS = 7 * 24 * 3600 * 1000

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
        # (the config, that config sent once): one tuple, swapped whole, so a
        # thread never pairs a new config with the old one's retries
        self._cfg_once: Tuple[ModelConfig, ModelConfig] = (self.cfg, replace(self.cfg, max_retries=0))

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
        once = self._cfg_once
        if once[0] is not cfg:
            once = self._cfg_once = (cfg, replace(cfg, max_retries=0))
        cfg = once[1]
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

    def accumulator(self) -> "_Whole":
        return _Whole(self.kind)

    def decoder(self, push: Callable[[Any], Any]) -> Callable[[float], ChunkDecoder]:
        strict, limit = self.cfg.strict, self.cfg.max_event_bytes
        cap = _CAPTURE.get()  # a with_raw_response call: decoders that keep their response
        if cap is not None:
            return cap.chunk_decoders(push, strict, limit)
        return lambda t0: SDKChunkDecoder(push, strict=strict, t0=t0, max_event_bytes=limit)

    def whole(self, acc: "_Whole", res: Any) -> BaseModel:
        return (ChatCompletion if self.kind == "chat" else Completion)._w(acc.whole(res))

    @property
    def chunk_type(self) -> Type[BaseModel]:
        return ChatCompletionChunk if self.kind == "chat" else Completion


class _Whole:
    """A ``stream=False`` answer assembled from the stream underneath, shaped as
    the server's non-streamed body: the accumulated reply, plus what only the
    chunks tell (OpenAI's ``refusal`` and ``logprobs: null``, its ``service_tier``)."""

    __slots__ = ("kind", "acc", "refusal", "logprobs", "lp_null", "service_tier")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.acc: Any = ChatAccumulator() if kind == "chat" else TextAccumulator()
        self.refusal: Dict[int, List[str]] = {}  # choice index → refusal pieces (a delta had the key)
        self.logprobs: set = set()  # choice indexes whose chunks had a logprobs key
        self.lp_null: set = set()  # (choice index, logprobs key) a chunk sent as null
        self.service_tier: Any = _ABSENT

    def add(self, chunk: Any) -> None:
        if chunk.__class__ is not dict:  # a non-object data line: nothing to assemble
            return
        self.acc.add(chunk)
        if "service_tier" in chunk:
            self.service_tier = chunk["service_tier"]
        choices = chunk.get("choices")
        if choices.__class__ is not list:
            return
        for c in choices:
            if c.__class__ is not dict:
                continue
            idx = c.get("index", 0)
            if not isinstance(idx, int):
                idx = 0  # as the accumulator counts it
            if "logprobs" in c:
                self.logprobs.add(idx)
                lp = c["logprobs"]
                if lp.__class__ is dict:
                    self.lp_null.update((idx, k) for k, v in lp.items() if v is None)
            d = c.get("delta")
            if d.__class__ is dict and "refusal" in d:
                parts = self.refusal.setdefault(idx, [])
                if d["refusal"].__class__ is str:
                    parts.append(d["refusal"])

    def whole(self, res: Any) -> Dict[str, Any]:
        raw = self.acc.reply(res).to_openai()
        if self.service_tier is not _ABSENT:
            raw["service_tier"] = self.service_tier
        for c in raw["choices"]:
            idx = c["index"]
            lp = c.get("logprobs")
            if idx not in self.logprobs and lp is None:
                del c["logprobs"]  # llama-server sends the key only when asked for logprobs
            elif lp.__class__ is dict:
                for k, v in lp.items():  # no tokens, and the chunks said null (OpenAI's refusal list)
                    if v == [] and (idx, k) in self.lp_null:
                        lp[k] = None
            msg = c.get("message")
            parts = self.refusal.get(idx)
            if msg is not None and parts is not None:
                refusal = "".join(parts) or None
                msg["refusal"] = refusal
                if refusal and not msg.get("content"):
                    msg["content"] = None  # a refusal has no content, as in OpenAI's body
        return raw


_ABSENT = object()


def _as_status_500(err: _e.APIError) -> _e.APIError:
    """An error reported inside the stream of a ``stream=False`` call: the server
    answers the same failure to a non-streamed request with HTTP 500 and the
    same envelope, so the SDK raises InternalServerError (and retries it)."""
    return _e.APIError(err.message, status=500, type=err.type, code=err.code, body=err.body)


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
        return o.model_dump(exclude_unset=True, mode="json")  # as the SDK sends its models
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
                    # An HTTP error is raised by create(), as by the SDK; a raw
                    # call also waits for the whole header block it hands out.
                    s.wait_started(whole_headers=_CAPTURE.get() is not None)
                except BaseException:
                    s.close()
                    raise
                return s

            return Stream(self._retrying(p.request, open_stream), p.chunk_type, p.request)

        def whole() -> BaseModel:
            # The reply is assembled before the caller sees any of it, so (as
            # with the SDK) even a connection broken mid-body may be retried.
            acc = p.accumulator()
            try:
                res = self.broker.perform(p.cfg, p.data, p.decoder(acc.add), url=p.url)
            except _e.APIError as err:
                if err.status is not None:
                    raise
                raise _as_status_500(err) from err
            return p.whole(acc, res)

        return self._retrying(p.request, whole)

    def get_json(self, path: str, kwargs: Dict[str, Any]) -> Any:
        _, extra_headers, extra_query, timeout = _split(dict(kwargs))
        cfg = self.opts.request_cfg(extra_headers, timeout)
        url = self.opts.url(path, extra_query)
        request = _Request("GET", url)

        def get() -> Any:
            dec = json_decoder()
            self.broker.perform(cfg, None, lambda t0: dec, url=url, method="GET", streaming=False)
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


# -- resources -------------------------------------------------------------------------


class _RawMixin:
    """``with_raw_response`` / ``with_streaming_response`` on a resource (see ``_raw.py``)."""

    _is_async = False

    @property
    def with_raw_response(self) -> Any:
        return _RawResource(self)

    @property
    def with_streaming_response(self) -> Any:
        return _StreamingResource(self)


class _ChatCompletions(_RawMixin):
    def __init__(self, client: "OpenAI") -> None:
        self._client = client

    def create(self, *, messages: Any, model: Any, stream: Any = False, **kwargs: Any) -> Any:
        """``POST {base_url}/chat/completions``: a :class:`ChatCompletion`, or with
        ``stream=True`` a :class:`Stream` of :class:`ChatCompletionChunk`."""
        stream = bool(stream) if _given(stream) else False
        if "response_format" in kwargs:
            _res.check_create_response_format(kwargs["response_format"])
        return self._client._engine.create("chat", {"messages": messages, "model": model}, stream, kwargs)

    def parse(self, *, messages: Any, model: Any, response_format: Any = NOT_GIVEN, tools: Any = NOT_GIVEN, **kwargs: Any) -> Any:
        """Structured output: ``response_format`` a pydantic model class (sent as a
        strict ``json_schema``) → a :class:`ParsedChatCompletion` whose
        ``choices[i].message.parsed`` is the validated object; strict function
        ``tools`` get ``parsed_arguments``. A dict ``response_format`` is sent as it is."""
        tools, kw = _res.parse_kwargs(response_format, tools, kwargs)
        completion = self.create(messages=messages, model=model, stream=False, **kw)
        return _res.parse_completion(completion, response_format, tools)


class _Chat:
    def __init__(self, client: "OpenAI") -> None:
        self.completions = _ChatCompletions(client)


class _Completions(_RawMixin):
    def __init__(self, client: "OpenAI") -> None:
        self._client = client

    def create(self, *, model: Any, prompt: Any, stream: Any = False, **kwargs: Any) -> Any:
        """``POST {base_url}/completions``: a :class:`Completion`, or with
        ``stream=True`` a :class:`Stream` of :class:`Completion` chunks."""
        stream = bool(stream) if _given(stream) else False
        return self._client._engine.create("text", {"model": model, "prompt": prompt}, stream, kwargs)


class _Models(_RawMixin):
    def __init__(self, client: "OpenAI") -> None:
        self._client = client

    def list(self, **kwargs: Any) -> SyncPage:
        """``GET {base_url}/models``: a page of :class:`Model`."""
        return self._client._engine.models(kwargs)

    def retrieve(self, model: str, **kwargs: Any) -> Any:
        """``GET {base_url}/models/{model}``: one :class:`Model` (``NotFoundError`` if unknown)."""
        return _res.retrieve_model(self._client, model, kwargs)


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
        timeout = DEFAULT_TIMEOUT
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


class _Beta:
    """``client.beta.chat.completions``: where older SDK code calls ``parse()``
    (the same resource as ``client.chat.completions``)."""

    def __init__(self, client: Any) -> None:
        self.chat = client.chat


class OpenAI:
    """A drop-in for ``openai.OpenAI`` against llama-server (or any OpenAI-compatible
    server): ``chat.completions.create``/``parse``, ``completions.create``,
    ``embeddings.create``, ``models.list``/``retrieve``, and ``with_raw_response``.

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
        self.embeddings = _res.Embeddings(self)
        self.beta = _Beta(self)

    @property
    def with_raw_response(self) -> Any:
        """``client.with_raw_response.chat.completions.create(...)`` and the like."""
        return _RawClient(self, "with_raw_response")

    @property
    def with_streaming_response(self) -> Any:
        """``with client.with_streaming_response.chat.completions.create(...) as r:`` and the like: the raw
        response as a context manager; the request is sent when the block is entered."""
        return _RawClient(self, "with_streaming_response")

    # the SDK's client attributes
    @property
    def api_key(self) -> Optional[str]:
        """The API key in use (the SDK's ``client.api_key``), or None."""
        return self._opts.api_key

    @property
    def base_url(self) -> str:
        """The API base URL with a trailing ``/``, as the SDK's ``client.base_url`` prints."""
        return self._opts.base_url + "/"

    @property
    def max_retries(self) -> int:
        """Retries after a failed attempt (the SDK's ``client.max_retries``)."""
        return self._opts.max_retries

    @property
    def timeout(self) -> Any:
        """The ``timeout`` the client was given (seconds, None or a Timeout), as the SDK's ``client.timeout``."""
        return self._opts.timeout

    @property
    def organization(self) -> Optional[str]:
        """The organization (the SDK's ``client.organization``), or None."""
        return self._opts.organization

    @property
    def project(self) -> Optional[str]:
        """The project (the SDK's ``client.project``), or None."""
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


class _AsyncChatCompletions(_RawMixin):
    _is_async = True

    def __init__(self, client: "AsyncOpenAI") -> None:
        self._client = client

    async def create(self, *, messages: Any, model: Any, stream: Any = False, **kwargs: Any) -> Any:
        """``await``-able :meth:`OpenAI.chat.completions.create`; streams are :class:`AsyncStream`."""
        stream = bool(stream) if _given(stream) else False
        if "response_format" in kwargs:
            _res.check_create_response_format(kwargs["response_format"])
        return await self._client._create("chat", {"messages": messages, "model": model}, stream, kwargs)

    async def parse(
        self, *, messages: Any, model: Any, response_format: Any = NOT_GIVEN, tools: Any = NOT_GIVEN, **kwargs: Any
    ) -> Any:
        """``await``-able :meth:`OpenAI.chat.completions.parse`."""
        tools, kw = _res.parse_kwargs(response_format, tools, kwargs)
        completion = await self.create(messages=messages, model=model, stream=False, **kw)
        return _res.parse_completion(completion, response_format, tools)


class _AsyncChat:
    def __init__(self, client: "AsyncOpenAI") -> None:
        self.completions = _AsyncChatCompletions(client)


class _AsyncCompletions(_RawMixin):
    _is_async = True

    def __init__(self, client: "AsyncOpenAI") -> None:
        self._client = client

    async def create(self, *, model: Any, prompt: Any, stream: Any = False, **kwargs: Any) -> Any:
        stream = bool(stream) if _given(stream) else False
        return await self._client._create("text", {"model": model, "prompt": prompt}, stream, kwargs)


class _AsyncModels(_RawMixin):
    _is_async = True

    def __init__(self, client: "AsyncOpenAI") -> None:
        self._client = client

    def list(self, **kwargs: Any) -> Any:
        """``GET {base_url}/models`` on the asyncio engine: ``await`` it for the page
        of :class:`Model`, or ``async for`` over the models (the SDK's AsyncPaginator)."""
        return _res.amodels_paginator(self._client, kwargs)

    async def retrieve(self, model: str, **kwargs: Any) -> Any:
        """``GET {base_url}/models/{model}``: one :class:`Model`."""
        return await _res.aretrieve_model(self._client, model, kwargs)


class AsyncOpenAI:
    """A drop-in for ``openai.AsyncOpenAI``: ``await client.chat.completions.create(...)``;
    with ``stream=True`` an :class:`AsyncStream` (``async for``, ``async with``).

    Requests run on the Broker's asyncio engine (curl's socket callbacks on the
    running loop; no threads), one loop per client: ``models`` and
    ``embeddings`` too.
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
        self.chat = _AsyncChat(self)
        self.completions = _AsyncCompletions(self)
        self.models = _AsyncModels(self)
        self.embeddings = _res.AsyncEmbeddings(self)
        self.beta = _Beta(self)

    with_raw_response = OpenAI.with_raw_response
    with_streaming_response = OpenAI.with_streaming_response

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
            try:
                res = await self._broker.aperform(p.cfg, p.data, p.decoder(acc.add), url=p.url)
            except _e.APIError as err:
                if err.status is not None:
                    raise
                raise _as_status_500(err) from err
            return p.whole(acc, res)

        return await self._retrying(p.request, whole)

    def with_options(self, **kw: Any) -> "AsyncOpenAI":
        """A new client with some settings changed (the SDK's ``with_options``/``copy``)."""
        return OpenAI.with_options(self, **kw)  # type: ignore[arg-type,return-value]

    copy = with_options

    async def close(self) -> None:
        """Close pooled connections and open streams."""
        self._broker.close()

    async def __aenter__(self) -> "AsyncOpenAI":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._opts.base_url!r}, max_retries={self._opts.max_retries})"


AsyncClient = AsyncOpenAI


# The resources beyond chat/completions (embeddings, models.retrieve, parse);
# imported last: they use this module's helpers.
from . import _resources as _res  # noqa: E402
