"""The streamed calls (blocking, pulled and asyncio) over the Broker's public
transfer API."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

from ..broker import AsyncDeltaStream, Broker, DeltaStream, default_broker, validate_messages
from ..config import ModelConfig
from ..decoder import Delta, StreamResult
from ..engine import Transfer
from ..errors import ConfigError
from ..policy import encode_body
from ..chunks import ChunkDecoder, NativeDecoder, _expected_prompts
from ..replies import ChatAccumulator, ChatReply, NativeReply, TextAccumulator, TextReply, _NativeAcc

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
    res = b.perform(cfg, body, _chunk_decoders(cfg, acc.add), url=cfg.url)
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
    res = b.perform(cfg, body, _chunk_decoders(cfg, acc.add), url=_url(cfg, "/v1/completions")
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
    res = b.perform(cfg,
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

    def wait_started(self, *, whole_headers: bool = False) -> None:
        """Drive until the response status is known to be 2xx, an item arrived, or
        the stream ended — an HTTP error is then raised here. ``whole_headers``:
        wait for the end of the response's header block too (a server may send
        the status line and its headers in separate packets)."""
        q, t = self._queue, self._t

        def started() -> bool:
            call = t.call
            status = getattr(call, "status", None) if call is not None else None
            if bool(q) or t.done:
                return True
            if status is None or not 200 <= status < 300:
                return False
            return not whole_headers or (call is not None and call.headers_complete)

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
