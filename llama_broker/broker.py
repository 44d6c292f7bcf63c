"""Broker: the one streaming path behind ``chat``, ``chat_stream`` and ``stream``.

A :class:`Broker` owns a pool of pycurl easy handles (each keeps its
keep-alive connections) and, for pulled streams, one ``CurlMulti``. Its
blocking and pulled calls may be used from several threads: a pulled stream
may be consumed on another thread than the one that made it, and threads
that pull at the same time take turns driving the multi handle. Its asyncio
calls are bound to one event loop. The module-level functions use a
per-thread default Broker, so the same thread reuses the same connections.

``chat_stream``/``chat`` run the transfer with ``easy.perform()``: curl's own
loop, with Python entered only once per network chunk. ``stream()`` drives the
multi handle only when the caller asks for the next delta, so several open
streams interleave on one thread without threads.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Deque, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import pycurl

from .config import ModelConfig
from .decoder import Delta, JSONBody, StreamDecoder, StreamResult
from .errors import BrokerError, ConfigError
from .engine import DEFAULT_MAX_DELAY_MS, AsyncEngine, DecoderFactory, SyncEngine, Transfer
from .policy import Messages, validate_messages
from .policy import encode_chat_body as _encode_body
from .policy import retry_delay as _retry_delay
from .transport import Call

if TYPE_CHECKING:  # imported where an asyncio call needs it: `import llama_broker` stays cheap
    import asyncio

    from .fanout import MapResult  # (map/amap import the fan-out on first use)

__all__ = [
    "AsyncDeltaStream",
    "Broker",
    "DeltaStream",
    "achat",
    "astream",
    "chat",
    "chat_stream",
    "stream",
    "validate_messages",
]


class Broker:
    """A long-lived client: pooled easy handles, keep-alive, a default config.

    ``cfg`` is the default :class:`ModelConfig`; each call may pass its own.
    ``max_host_connections`` caps connections per host for pulled streams
    (0: no cap). Use it as a context manager or call :meth:`close`.

    Threads may share a Broker for the blocking and pulled calls (see the
    module docstring); the asyncio calls belong to one event loop.
    """

    def __init__(
        self,
        cfg: Optional[ModelConfig] = None,
        *,
        pool_size: int = 32,
        max_host_connections: int = 0,
    ) -> None:
        self.cfg = cfg
        self.pool_size = pool_size
        self.max_host_connections = max_host_connections
        self._idle: List["pycurl.Curl"] = []
        self._sync: Optional[SyncEngine] = None
        self._async: Optional[AsyncEngine] = None  # the engine of the loop last used
        self._asyncs: List[AsyncEngine] = []  # every asyncio engine not yet closed, on any loop
        self._sync_lock = threading.Lock()  # creating the SyncEngine
        self._closed = False

    # -- handles -------------------------------------------------------------
    def _acquire(self) -> "pycurl.Curl":
        if self._closed:
            raise ConfigError("this Broker is closed")
        try:
            return self._idle.pop()  # atomic: threads may share the pool
        except IndexError:
            return pycurl.Curl()

    def _release(self, handle: "pycurl.Curl") -> None:
        if len(self._idle) < self.pool_size and not self._closed:
            self._idle.append(handle)
        else:
            handle.close()

    def _cfg(self, cfg: Optional[ModelConfig]) -> ModelConfig:
        cfg = cfg or self.cfg
        if cfg is None:
            raise ConfigError("no ModelConfig: pass cfg= or create the Broker with one")
        return cfg

    # -- blocking calls --------------------------------------------------------
    def chat_stream(
        self,
        messages: Messages,
        on_delta: Callable[[str], Any],
        *,
        cfg: Optional[ModelConfig] = None,
        **params: Any,
    ) -> StreamResult:
        """Stream a chat completion, calling ``on_delta(content)`` per content delta.

        The content is the first choice's (index 0): with ``n > 1`` the other
        choices are not mixed in (:meth:`stream` yields them all).
        Returns the :class:`StreamResult` (finish reason, usage, timings, counts).
        Raises :class:`APIError`, :class:`TransportError` (after any delivered
        deltas: they stay delivered), :class:`ProtocolError` or whatever
        ``on_delta`` raised.
        """
        cfg = self._cfg(cfg)
        body = _encode_body(cfg, messages, params)
        return self.perform(cfg, body, lambda t0: StreamDecoder(on_delta, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes))

    def chat_deltas(
        self,
        messages: Messages,
        on_delta: Callable[[Delta], Any],
        *,
        cfg: Optional[ModelConfig] = None,
        **params: Any,
    ) -> StreamResult:
        """Like :meth:`chat_stream`, but ``on_delta`` gets every :class:`Delta`
        (reasoning, tool-call fragments, finish reason, logprobs too) of every
        choice (``Delta.index``)."""
        cfg = self._cfg(cfg)
        body = _encode_body(cfg, messages, params)
        return self.perform(cfg, body, lambda t0: StreamDecoder(None, on_delta, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes))

    def chat(self, messages: Messages, *, cfg: Optional[ModelConfig] = None, **params: Any) -> str:
        """The whole reply as one string (streamed underneath, only the text kept).

        With ``n > 1`` it is the first choice's text (index 0) only."""
        parts: List[str] = []
        self.chat_stream(messages, parts.append, cfg=cfg, **params)
        return "".join(parts)

    def request_json(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        cfg: Optional[ModelConfig] = None,
    ) -> Any:
        """One non-streamed JSON request to ``cfg.base_url + path`` (``GET /health``,
        ``POST /tokenize`` …) over the same transport, errors and retries.
        Returns the decoded JSON body (``None`` for an empty one)."""
        cfg = self._cfg(cfg)
        data = None
        if body is not None:
            try:
                data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError, UnicodeEncodeError) as e:
                raise ConfigError(f"the {method} {path} body cannot be sent as JSON: {e}") from e
        whole = JSONBody()
        self.perform(cfg, data, lambda t0: whole, url=cfg.base_url + path, method=method, streaming=False)  # type: ignore[arg-type, return-value]
        return whole.value

    def perform(
        self,
        cfg: ModelConfig,
        body: Optional[bytes],
        make_decoder: DecoderFactory,
        *,
        url: Optional[str] = None,
        method: str = "POST",
        streaming: bool = True,
    ) -> Any:
        """Run one request to its end on this thread, with the retry policy.

        The public transfer API under every blocking call: ``body`` is the
        encoded request (``None`` for a GET), ``make_decoder(t0)`` builds a
        fresh decoder per attempt (it needs ``feed``, ``feed_whole`` and
        ``result``), ``url`` overrides ``cfg.url``, and ``streaming=False`` reads
        a plain (non-SSE) body. Returns the decoder's ``result``."""
        t0 = time.monotonic()
        deadline = t0 + cfg.timeout_ms / 1000.0
        attempt = 0
        redirects = 0
        while True:
            decoder = make_decoder(t0)
            handle = self._acquire()
            call: Optional[Call] = None
            next_url: Optional[str] = None
            try:
                call = Call(
                    handle,
                    cfg,
                    body,
                    decoder,
                    deadline=deadline,
                    url=url,
                    method=method,
                    streaming=streaming,
                    redirects=redirects,
                )
                curl_error: Optional[pycurl.error] = None
                try:
                    handle.perform()
                except pycurl.error as e:
                    curl_error = e
                next_url = call.finish(curl_error)
            except BrokerError as err:
                delivered = call.delivered if call is not None else False
                attempt = self._maybe_retry(cfg, err, delivered, attempt, deadline)
                continue
            finally:
                handle.reset()  # drop the Call's callbacks; the connection cache stays
                self._release(handle)
            if next_url is not None:  # a redirect (follow_redirects): the next hop
                url, redirects = next_url, redirects + 1
                continue
            res = decoder.result
            res.retries = attempt
            res.elapsed_s = time.monotonic() - t0
            return res

    def _maybe_retry(
        self, cfg: ModelConfig, err: BrokerError, delivered: bool, attempt: int, deadline: float
    ) -> int:
        """Sleep and return the next attempt number, or raise ``err``."""
        delay = _retry_delay(cfg, err, delivered, attempt, deadline)
        if delay is None:
            raise err
        time.sleep(delay)
        return attempt + 1

    # -- pulled streams (SyncEngine) --------------------------------------------
    def sync_engine(self) -> SyncEngine:
        """This Broker's pulled engine (made on first use): start
        :class:`~llama_broker.engine.Transfer` objects on it and drive them from
        any thread; it is what :meth:`stream`, :meth:`map` and batch jobs run on."""
        eng = self._sync
        if eng is None:
            with self._sync_lock:
                if self._closed:
                    raise ConfigError("this Broker is closed")
                eng = self._sync
                if eng is None:
                    eng = SyncEngine(self._acquire, self._release)
                    eng.set_max_host_connections(self.max_host_connections)
                    self._sync = eng
        return eng

    def _delta_transfer(
        self, cfg: ModelConfig, body: bytes, queue: "Deque[Delta]", max_delay_ms: float = 0.0
    ) -> Transfer:
        return Transfer(
            cfg,
            body,
            lambda t0: StreamDecoder(
                None, queue.append, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes
            ),
            max_delay_ms=max_delay_ms,
        )

    def stream(
        self, messages: Messages, *, cfg: Optional[ModelConfig] = None, max_delay_ms: float = 0.0, **params: Any
    ) -> "DeltaStream":
        """An iterator of :class:`Delta`, pulled without threads; a context manager.

        With ``n > 1`` the deltas of every choice come interleaved, as the
        server sends them; ``Delta.index`` tells them apart. The multi handle
        is driven only when the caller asks for the next delta, so several
        open streams interleave on one thread. Leaving early
        (``close()``, the ``with`` block, or dropping it) closes the
        connection, which is how llama-server cancels a generation.
        ``max_delay_ms`` (default 0: none) is a latency budget, as in :meth:`map`.
        """
        cfg = self._cfg(cfg)
        body = _encode_body(cfg, messages, params)
        queue: Deque[Delta] = deque()
        t = self._delta_transfer(cfg, body, queue, max_delay_ms)
        eng = self.sync_engine()
        eng.start(t)
        return DeltaStream(self, eng, t, queue)

    def map(
        self,
        requests: Iterable[Mapping[str, Any]],
        *,
        concurrency: int = 8,
        endpoints: Optional[Sequence[Union[str, ModelConfig]]] = None,
        progress: Optional[bool] = None,
        cfg: Optional[ModelConfig] = None,
        max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
    ) -> Iterator[MapResult]:
        """Run many chat requests, at most ``concurrency`` at once, over ``endpoints``.

        ``requests``: dicts ``{"messages": [...], **params}``. ``endpoints``:
        base URLs or ModelConfigs (default: this Broker's config). Yields a
        :class:`MapResult` per request as it completes (``.index`` is its
        position; ``.text`` the first choice's text, with ``n > 1``), going on
        past failures (``.error``). A request that fails
        before any output on a refused connection, an early reset, a 429 or a
        503 is sent to another endpoint and that endpoint is rested with a
        capped backoff (or the server's Retry-After); when every endpoint
        rests, each request waits its own backoff, as ``chat()`` would.
        A progress line is shown on a terminal's stderr unless ``progress``
        is False. One thread, no threads spawned.

        ``max_delay_ms`` is the latency budget: tokens may wait that long in
        the kernel so that one wake-up reads every stream that has data
        (several times less CPU per token with many streams; 0: every
        wake-up is handled at once). A pulled :meth:`stream` running on the
        same Broker at the same time suspends it (the smallest budget wins).
        """
        from .fanout import Fanout

        fan = Fanout(
            requests,
            concurrency=concurrency,
            endpoints=endpoints,
            cfg=cfg or self.cfg,
            progress=progress,
            max_delay_ms=max_delay_ms,
        )
        return fan.run_sync(self.sync_engine())

    # -- asyncio (AsyncEngine) ---------------------------------------------------
    def async_engine(self) -> AsyncEngine:
        """This Broker's engine on the running event loop (made on first use;
        one Broker serves one live loop at a time): :meth:`astream`,
        :meth:`amap` and :meth:`aperform` run on it."""
        import asyncio

        loop = asyncio.get_running_loop()
        eng = self._async
        if eng is None or eng.loop is not loop:
            if self._closed:
                raise ConfigError("this Broker is closed")
            if eng is not None and not eng.loop.is_closed():
                raise ConfigError("this Broker is already used by another event loop; use one Broker per loop")
            # Nothing can drive the transfers of a closed loop again (a stream
            # left open by a previous asyncio.run()): close their connections.
            for old in [e for e in self._asyncs if e.loop.is_closed()]:
                self._asyncs.remove(old)
                old.close("its event loop was closed")
            eng = self._async = AsyncEngine(loop, self._acquire, self._release)
            eng.set_max_host_connections(self.max_host_connections)
            self._asyncs.append(eng)
        return eng

    async def achat_stream(
        self,
        messages: Messages,
        on_delta: Callable[[str], Any],
        *,
        cfg: Optional[ModelConfig] = None,
        **params: Any,
    ) -> StreamResult:
        """Async :meth:`chat_stream`: ``on_delta(content)`` is called from the loop
        as content arrives. Cancelling the awaiting task closes the connection."""
        cfg = self._cfg(cfg)
        body = _encode_body(cfg, messages, params)
        return await self.aperform(
            cfg,
            body,
            lambda t0: StreamDecoder(on_delta, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes),
        )

    async def aperform(
        self,
        cfg: ModelConfig,
        body: Optional[bytes],
        make_decoder: DecoderFactory,
        *,
        url: Optional[str] = None,
        method: str = "POST",
        streaming: bool = True,
    ) -> Any:
        """The asyncio twin of :meth:`perform`: one request (with its retries) on
        the running loop; cancelling closes the connection. ``method`` and
        ``streaming=False`` (a plain JSON body) as in :meth:`perform`."""
        eng = self.async_engine()
        fut = eng.loop.create_future()

        def done(t: Transfer) -> None:
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_result(None)

        t = Transfer(cfg, body, make_decoder, on_done=done, url=url, method=method, streaming=streaming)
        eng.start(t)
        try:
            await fut
        finally:
            if not t.done:  # cancelled: cut the connection
                eng.cut(t)
        if t.error is not None:
            raise t.error
        assert t.result is not None
        return t.result

    async def achat(self, messages: Messages, *, cfg: Optional[ModelConfig] = None, **params: Any) -> str:
        """Async :meth:`chat`: the whole reply as a string."""
        parts: List[str] = []
        await self.achat_stream(messages, parts.append, cfg=cfg, **params)
        return "".join(parts)

    def astream(
        self, messages: Messages, *, cfg: Optional[ModelConfig] = None, max_delay_ms: float = 0.0, **params: Any
    ) -> "AsyncDeltaStream":
        """An async iterator of :class:`Delta` and async context manager, driven
        by curl's socket callbacks on the running loop. Leaving early
        (``aclose()``, the ``async with`` block, or ``break`` and dropping the
        stream) or cancelling closes the connection. The request is sent, and
        its timeouts start, at the first ``async for``/``async with``.
        ``max_delay_ms`` (default 0: none) is a latency budget, as in :meth:`map`."""
        cfg = self._cfg(cfg)
        body = _encode_body(cfg, messages, params)
        queue: Deque[Delta] = deque()
        t = self._delta_transfer(cfg, body, queue, max_delay_ms)
        return AsyncDeltaStream(self.async_engine, t, queue)

    def amap(
        self,
        requests: Iterable[Mapping[str, Any]],
        *,
        concurrency: int = 8,
        endpoints: Optional[Sequence[Union[str, ModelConfig]]] = None,
        progress: Optional[bool] = None,
        cfg: Optional[ModelConfig] = None,
        max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
    ) -> AsyncIterator[MapResult]:
        """Async twin of :meth:`map` (``async for r in broker.amap(...)``), with
        the same latency budget ``max_delay_ms``."""
        from .fanout import Fanout

        fan = Fanout(
            requests,
            concurrency=concurrency,
            endpoints=endpoints,
            cfg=cfg or self.cfg,
            progress=progress,
            max_delay_ms=max_delay_ms,
        )
        return fan.run_async(self.async_engine)

    def embed(self, inputs: Any, *, cfg: Optional[ModelConfig] = None, **kw: Any) -> Any:
        """Embeddings of ``inputs`` on this Broker (see :func:`llama_broker.embeddings.embed`:
        ``batch_size``, ``concurrency``, ``endpoints``, ``as_numpy``, body params)."""
        from .embeddings import embed

        return embed(cfg or self.cfg, inputs, broker=self, **kw)

    async def aembed(self, inputs: Any, *, cfg: Optional[ModelConfig] = None, **kw: Any) -> Any:
        """Async :meth:`embed` on the running loop."""
        from .embeddings import aembed

        return await aembed(cfg or self.cfg, inputs, broker=self, **kw)

    def close(self) -> None:
        """Close every pooled handle and the multi handles. Open streams are cut.

        Requests still in flight on asyncio (``achat``, ``astream``, ``amap``,
        on any loop this Broker was used on) end at once with a
        :class:`TransportError`; streams of a loop that is already closed are
        cut without touching that loop."""
        if self._closed:
            return
        self._closed = True
        if self._sync is not None:
            self._sync.close()
        asyncs, self._asyncs = self._asyncs, []
        for aeng in asyncs:
            aeng.close("the Broker was closed")
        self._sync = self._async = None
        for h in self._idle:
            h.close()
        self._idle.clear()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Broker(cfg={self.cfg!r}, idle_handles={len(self._idle)})"


class DeltaStream:
    """A pulled stream of :class:`Delta` (from :meth:`Broker.stream`).

    Iterate it; use it as a context manager or call :meth:`close` to leave
    early. ``result`` is the :class:`StreamResult` once the stream ended.
    Deltas that arrived before an error are all yielded before the error is
    raised. It may be read on another thread than the one that made it;
    dropped while open, it closes its connection; if its Broker is closed
    first, it raises a :class:`TransportError` saying so.
    """

    # queue: Deltas here; subclasses (native.EventStream) queue other decoded items
    def __init__(self, broker: Broker, engine: SyncEngine, transfer: Transfer, queue: "Deque[Any]") -> None:
        self._broker = broker
        self._engine = engine
        self._t = transfer
        self._queue = queue
        self._raised = False
        self._ready = lambda: bool(queue) or transfer.done  # (made once: __next__ runs per delta)

    @property
    def result(self) -> Optional[StreamResult]:
        """The :class:`StreamResult`, once the stream ended successfully."""
        return self._t.result

    @property
    def cfg(self) -> ModelConfig:
        """The :class:`ModelConfig` this stream's request was made with."""
        return self._t.cfg

    def __iter__(self) -> Iterator[Delta]:
        return self

    @property
    def finished(self) -> bool:
        """The stream ended (completely, with an error, or closed) and every item was read."""
        return self._t.done and not self._queue

    def _end(self) -> None:
        """At the end: raise the stream's error, once."""
        t = self._t
        if t.error is not None and not self._raised:
            self._raised = True
            raise t.error

    def __next__(self) -> Delta:
        q, t = self._queue, self._t
        while True:
            if q:
                return q.popleft()
            if t.done:
                self._end()
                raise StopIteration
            self._engine.drive(self._ready)

    def close(self) -> None:
        """Stop now: the connection is closed (the server cancels the generation)."""
        self._engine.cut(self._t)
        self._queue.clear()

    def __enter__(self) -> "DeltaStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped while open: close the connection now. A finalizer may run
        # anywhere (inside a curl callback, on another thread): the engine
        # then cuts it at the end of the turn that is running.
        t = self.__dict__.get("_t")
        eng = self.__dict__.get("_engine")
        if t is not None and eng is not None and not t.done:
            try:
                eng.drop(t)
            except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to close
                pass


class AsyncDeltaStream:
    """An async stream of :class:`Delta` (from :meth:`Broker.astream`)."""

    def __init__(self, get_engine: Callable[[], AsyncEngine], transfer: Transfer, queue: "Deque[Any]") -> None:
        # The request starts on the running loop at the first __aenter__ or
        # __anext__, so the stream may be made before the loop runs.
        self._get_engine = get_engine
        self._engine: Optional[AsyncEngine] = None
        self._t = transfer
        self._queue = queue
        self._waiter: Optional["asyncio.Future[None]"] = None
        self._raised = False
        # The engine holds the transfer while it runs: were the transfer to
        # hold this stream, a stream left with `break` would never be freed
        # (and never cut). It wakes the stream through a weak reference.
        ref = weakref.ref(self)

        def wake() -> None:
            s = ref()
            if s is not None:
                s._wake()

        transfer.on_chunk = wake
        transfer.on_done = lambda t: wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and not w.get_loop().is_closed():
            w.set_result(None)

    @property
    def result(self) -> Optional[StreamResult]:
        """The :class:`StreamResult`, once the stream ended successfully."""
        return self._t.result

    def __aiter__(self) -> "AsyncDeltaStream":
        return self

    def _started(self) -> AsyncEngine:
        eng = self._engine
        if eng is None:
            eng = self._engine = self._get_engine()
            if not self._t.done:  # (closed before it started: never sent)
                self._t.start_clock()  # timeouts and timings count from now, not from astream()
                eng.start(self._t)
        return eng

    @property
    def finished(self) -> bool:
        """The stream ended (completely, with an error, or closed) and every item was read."""
        return self._t.done and not self._queue

    def _end(self) -> None:
        """At the end: raise the stream's error, once."""
        t = self._t
        if t.error is not None and not self._raised:
            self._raised = True
            raise t.error

    async def _wait(self) -> None:
        """Wait for the next chunk or the end; cancelled, cut the connection."""
        eng = self._started()
        self._waiter = eng.loop.create_future()
        try:
            await self._waiter
        except BaseException:
            eng.cut(self._t)
            raise
        finally:
            self._waiter = None

    async def __anext__(self) -> Delta:
        q, t = self._queue, self._t
        self._started()
        while True:
            if q:
                return q.popleft()
            if t.done:
                self._end()
                raise StopAsyncIteration
            await self._wait()

    async def aclose(self) -> None:
        """Stop now: the connection is closed (the server cancels the generation)."""
        if self._engine is not None:
            self._engine.cut(self._t)
        else:
            self._t.done = True  # never started
        self._queue.clear()

    async def __aenter__(self) -> "AsyncDeltaStream":
        self._started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped while open (``break`` out of ``async for``): close the
        # connection. A finalizer may run inside a curl callback, where the
        # multi handle must not be touched: the cut runs at the loop's next turn.
        t = self.__dict__.get("_t")
        eng = self.__dict__.get("_engine")
        if t is None or eng is None or t.done:
            return
        try:
            eng.loop.call_soon_threadsafe(eng.cut, t)
        except RuntimeError:  # the loop is closed: no curl callback can be running
            try:
                eng.cut(t)
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass


# -- module-level functions over a per-thread default Broker -------------------------

_local = threading.local()


def default_broker() -> Broker:
    """This thread's default :class:`Broker` (created on first use)."""
    b = getattr(_local, "broker", None)
    if b is None:
        b = _local.broker = Broker()
    return b


def chat_stream(cfg: ModelConfig, messages: Messages, on_delta: Callable[[str], Any], **params: Any) -> StreamResult:
    """Stream a chat completion from ``cfg``'s server, calling ``on_delta(content)``
    once per non-empty content delta of the first choice (index 0; with
    ``n > 1`` the others are not mixed in) as it arrives. ``params`` are extra body
    fields (``max_tokens``, ``seed``, ``stop``, ``top_k``, ``stream_options`` …).
    Returns the :class:`StreamResult`."""
    return default_broker().chat_stream(messages, on_delta, cfg=cfg, **params)


def chat(cfg: ModelConfig, messages: Messages, **params: Any) -> str:
    """The whole reply as a string (the first choice's, with ``n > 1``); the same
    streaming path as :func:`chat_stream`."""
    return default_broker().chat(messages, cfg=cfg, **params)


def stream(cfg: ModelConfig, messages: Messages, **params: Any) -> DeltaStream:
    """A pulled iterator of :class:`Delta` of every choice (see :meth:`Broker.stream`)."""
    return default_broker().stream(messages, cfg=cfg, **params)


async def achat(cfg: ModelConfig, messages: Messages, **params: Any) -> str:
    """Async :func:`chat` on this thread's default :class:`Broker` and the running loop."""
    return await default_broker().achat(messages, cfg=cfg, **params)


def astream(cfg: ModelConfig, messages: Messages, **params: Any) -> AsyncDeltaStream:
    """Async :func:`stream` on this thread's default :class:`Broker` and the running loop."""
    return default_broker().astream(messages, cfg=cfg, **params)
