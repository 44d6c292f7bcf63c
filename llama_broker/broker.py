"""Broker: the one streaming path behind ``chat``, ``chat_stream`` and ``stream``.

A :class:`Broker` owns a pool of pycurl easy handles (each keeps its
keep-alive connections) and, for pulled streams, one ``CurlMulti``. It is
not thread-safe: use one per thread. The module-level functions use a
per-thread default Broker, so the same thread reuses the same connections.

``chat_stream``/``chat`` run the transfer with ``easy.perform()``: curl's own
loop, with Python entered only once per network chunk. ``stream()`` drives the
multi handle only when the caller asks for the next delta, so several open
streams interleave on one thread without threads.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Sequence

import pycurl

from .config import ModelConfig
from .decoder import Delta, StreamDecoder, StreamResult
from .errors import APIError, BrokerError, ConfigError, ConnectError, ProtocolError, TimeoutError_, TransportError
from .transport import _RESET_CODES, Call

__all__ = ["Broker", "DeltaStream", "chat", "chat_stream", "stream", "validate_messages"]

log = logging.getLogger("llama_broker")

Messages = Sequence[Mapping[str, Any]]


def validate_messages(messages: Any) -> None:
    """Raise :class:`ConfigError` naming the first bad item of ``messages``."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ConfigError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ConfigError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ConfigError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ConfigError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        if "content" not in m and not m.get("tool_calls"):
            raise ConfigError(f"messages[{i}] has no 'content'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ConfigError(
                f"messages[{i}]['content'] must be a string or a list of parts, got {type(content).__name__}"
            )


def _encode_body(cfg: ModelConfig, messages: Messages, params: Mapping[str, Any]) -> bytes:
    if "stream" in params:
        raise ConfigError("'stream' cannot be passed: llama_broker always streams")
    validate_messages(messages)
    body = cfg.body(list(messages), params)
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        for k, v in body.items():  # name the field that cannot be encoded
            try:
                json.dumps(v, ensure_ascii=False, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError, UnicodeEncodeError):
                raise ConfigError(f"request field {k!r} cannot be sent as JSON: {e}") from e
        raise ConfigError(f"the request cannot be sent as JSON: {e}") from e


def _retriable(err: BaseException, delivered: bool) -> bool:
    """Safe to send again: nothing reached the caller, and the server did no work
    we would repeat (refused connection, reset before a byte, 503 loading)."""
    if delivered:
        return False
    if isinstance(err, ConnectError):
        return True
    if isinstance(err, APIError):
        return err.status == 503
    if isinstance(err, TimeoutError_):
        return False
    if isinstance(err, TransportError):
        return err.bytes_received == 0 and err.curl_code in _RESET_CODES
    return False


def _backoff_s(cfg: ModelConfig, attempt: int) -> float:
    """Exponential backoff with jitter (attempt 1 is the first retry)."""
    return cfg.retry_backoff_ms / 1000.0 * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


class Broker:
    """A long-lived client: pooled easy handles, keep-alive, a default config.

    ``cfg`` is the default :class:`ModelConfig`; each call may pass its own.
    ``max_host_connections`` caps connections per host for pulled streams
    (0: no cap). Use it as a context manager or call :meth:`close`.
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
        self._multi: Optional["pycurl.CurlMulti"] = None
        self._streams: Dict[int, "weakref.ReferenceType[DeltaStream]"] = {}
        self._waiting: List["weakref.ReferenceType[DeltaStream]"] = []
        self._orphans: List["pycurl.Curl"] = []  # handles of streams dropped while open
        self._closed = False

    # -- handles -------------------------------------------------------------
    def _acquire(self) -> "pycurl.Curl":
        if self._closed:
            raise ConfigError("this Broker is closed")
        return self._idle.pop() if self._idle else pycurl.Curl()

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

        Returns the :class:`StreamResult` (finish reason, usage, timings, counts).
        Raises :class:`APIError`, :class:`TransportError` (after any delivered
        deltas: they stay delivered), :class:`ProtocolError` or whatever
        ``on_delta`` raised.
        """
        cfg = self._cfg(cfg)
        body = _encode_body(cfg, messages, params)
        return self._perform(cfg, body, lambda t0: StreamDecoder(on_delta, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes))

    def chat_deltas(
        self,
        messages: Messages,
        on_delta: Callable[[Delta], Any],
        *,
        cfg: Optional[ModelConfig] = None,
        **params: Any,
    ) -> StreamResult:
        """Like :meth:`chat_stream`, but ``on_delta`` gets every :class:`Delta`
        (reasoning, tool-call fragments, finish reason, logprobs too)."""
        cfg = self._cfg(cfg)
        body = _encode_body(cfg, messages, params)
        return self._perform(cfg, body, lambda t0: StreamDecoder(None, on_delta, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes))

    def chat(self, messages: Messages, *, cfg: Optional[ModelConfig] = None, **params: Any) -> str:
        """The whole reply as one string (streamed underneath, only the text kept)."""
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
        whole = _WholeBody()
        self._perform(cfg, data, lambda t0: whole, url=cfg.base_url + path, method=method, streaming=False)  # type: ignore[arg-type, return-value]
        return whole.value

    def _perform(
        self,
        cfg: ModelConfig,
        body: Optional[bytes],
        make_decoder: Callable[[float], StreamDecoder],
        *,
        url: Optional[str] = None,
        method: str = "POST",
        streaming: bool = True,
    ) -> StreamResult:
        t0 = time.monotonic()
        deadline = t0 + cfg.timeout_ms / 1000.0
        attempt = 0
        while True:
            decoder = make_decoder(t0)
            handle = self._acquire()
            call: Optional[Call] = None
            try:
                call = Call(
                    handle, cfg, body, decoder, deadline=deadline, url=url, method=method, streaming=streaming
                )
                curl_error: Optional[pycurl.error] = None
                try:
                    handle.perform()
                except pycurl.error as e:
                    curl_error = e
                call.finish(curl_error)
            except BrokerError as err:
                delivered = call.delivered if call is not None else False
                attempt = self._maybe_retry(cfg, err, delivered, attempt, deadline)
                continue
            finally:
                handle.setopt(pycurl.WRITEFUNCTION, _discard)  # drop the Call's references
                self._release(handle)
            res = decoder.result
            res.retries = attempt
            res.elapsed_s = time.monotonic() - t0
            return res

    def _maybe_retry(
        self, cfg: ModelConfig, err: BrokerError, delivered: bool, attempt: int, deadline: float
    ) -> int:
        """Sleep and return the next attempt number, or raise ``err``."""
        if attempt >= cfg.max_retries or not _retriable(err, delivered):
            raise err
        attempt += 1
        delay = _backoff_s(cfg, attempt)
        if time.monotonic() + delay >= deadline:
            raise err
        log.warning("retry %d/%d in %.2fs after: %s", attempt, cfg.max_retries, delay, err)
        time.sleep(delay)
        return attempt

    # -- pulled streams ----------------------------------------------------------
    def stream(self, messages: Messages, *, cfg: Optional[ModelConfig] = None, **params: Any) -> "DeltaStream":
        """An iterator of :class:`Delta`, pulled without threads; a context manager.

        Leaving it early (``close()``, the ``with`` block, or dropping it) closes
        the connection, which is how llama-server cancels a generation.
        """
        cfg = self._cfg(cfg)
        body = _encode_body(cfg, messages, params)
        s = DeltaStream(self, cfg, body)
        self._start(s)
        return s

    def _get_multi(self) -> "pycurl.CurlMulti":
        if self._multi is None:
            m = pycurl.CurlMulti()
            if self.max_host_connections:
                m.setopt(pycurl.M_MAX_HOST_CONNECTIONS, self.max_host_connections)
            self._multi = m
        return self._multi

    def _start(self, s: "DeltaStream") -> None:
        if self._orphans:
            self._cut_orphans()
        handle = self._acquire()
        s._decoder = StreamDecoder(
            None, s._queue.append, strict=s.cfg.strict, t0=s._t0, max_event_bytes=s.cfg.max_event_bytes
        )
        try:
            s._call = Call(handle, s.cfg, s._body, s._decoder, deadline=s._deadline)
        except BaseException:
            self._release(handle)
            raise
        s._handle = handle
        self._streams[id(handle)] = weakref.ref(s)
        self._get_multi().add_handle(handle)

    def _detach(self, s: "DeltaStream", *, reuse: bool) -> None:
        handle = s._handle
        if handle is None:
            return
        s._handle = None
        self._streams.pop(id(handle), None)
        if self._multi is not None:
            self._multi.remove_handle(handle)
        handle.setopt(pycurl.WRITEFUNCTION, _discard)
        if reuse:
            self._release(handle)
        else:
            handle.close()  # a transfer cut short: its connection must go

    def _cut_orphans(self) -> None:
        """Close the connections of streams that were dropped while open."""
        while self._orphans:
            handle = self._orphans.pop()
            self._streams.pop(id(handle), None)
            if self._multi is not None:
                self._multi.remove_handle(handle)
            handle.close()

    def _drive(self, waiter: "DeltaStream") -> None:
        """Run transfers until ``waiter`` has a delta or is finished (one wait at most)."""
        m = self._get_multi()
        if self._orphans:
            self._cut_orphans()
        while True:
            ret, _ = m.perform()
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        while True:
            queued, ok_list, err_list = m.info_read()
            for h in ok_list:
                self._finished(h, None)
            for h, code, text in err_list:
                self._finished(h, pycurl.error(code, text))
            if not queued:
                break
        now = time.monotonic()
        next_retry = None
        for ref in list(self._waiting):
            s = ref()
            if s is None or s._finished:
                self._waiting.remove(ref)
            elif s._retry_at <= now:
                self._waiting.remove(ref)
                try:
                    self._start(s)
                except BaseException as e:
                    s._fail(e)
            else:
                next_retry = s._retry_at if next_retry is None else min(next_retry, s._retry_at)
        if waiter._queue or waiter._finished:
            return
        timeout_ms = m.timeout()
        wait = 1.0 if timeout_ms < 0 else min(timeout_ms / 1000.0, 1.0)
        if next_retry is not None:
            wait = min(wait, max(0.0, next_retry - now))
        if waiter._handle is None and next_retry is not None:
            time.sleep(wait)  # only a retry is pending: nothing to select on
        elif wait > 0:
            m.select(wait)

    def _finished(self, handle: "pycurl.Curl", curl_error: Optional[pycurl.error]) -> None:
        ref = self._streams.get(id(handle))
        s = ref() if ref is not None else None
        if s is None:  # its stream was dropped; just recycle the handle
            if handle in self._orphans:
                self._orphans.remove(handle)
            self._streams.pop(id(handle), None)
            if self._multi is not None:
                self._multi.remove_handle(handle)
            self._release(handle)
            return
        call = s._call
        self._detach(s, reuse=True)
        try:
            call.finish(curl_error)
        except BrokerError as err:
            if s._attempt < s.cfg.max_retries and _retriable(err, call.delivered):
                delay = _backoff_s(s.cfg, s._attempt + 1)
                if time.monotonic() + delay < s._deadline:
                    s._attempt += 1
                    log.warning("retry %d/%d in %.2fs after: %s", s._attempt, s.cfg.max_retries, delay, err)
                    s._retry_at = time.monotonic() + delay
                    self._waiting.append(weakref.ref(s))
                    return
            s._fail(err)
            return
        except BaseException as err:  # KeyboardInterrupt from a callback: stop now
            s._fail(err)
            raise
        res = s._decoder.result
        res.retries = s._attempt
        res.elapsed_s = time.monotonic() - s._t0
        s.result = res
        s._finished = True

    def close(self) -> None:
        """Close every pooled handle and the multi handle. Open streams are cut."""
        if self._closed:
            return
        self._cut_orphans()
        for ref in list(self._streams.values()):
            s = ref()
            if s is not None:
                s.close()
        self._closed = True
        for h in self._idle:
            h.close()
        self._idle.clear()
        if self._multi is not None:
            self._multi.close()
            self._multi = None

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Broker(cfg={self.cfg!r}, idle_handles={len(self._idle)}, open_streams={len(self._streams)})"


class _WholeBody:
    """The "decoder" of a non-streamed JSON request: keeps the parsed body."""

    def __init__(self) -> None:
        self.result = StreamResult()
        self.value: Any = None

    def feed(self, out: bytes, recs: List[int]) -> None:  # pragma: no cover - never streaming
        raise AssertionError("a JSON request got an event stream")

    def feed_whole(self, body: bytes) -> None:
        try:
            self.value = json.loads(body) if body.strip() else None
        except ValueError as e:
            raise ProtocolError(f"the server's JSON body cannot be decoded: {body[:200]!r}") from e
        self.result.done = True


def _discard(chunk: bytes) -> int:
    return 0


class DeltaStream:
    """A pulled stream of :class:`Delta` (from :meth:`Broker.stream`).

    Iterate it; use it as a context manager or call :meth:`close` to leave
    early. ``result`` is the :class:`StreamResult` once the stream ended.
    Deltas that arrived before an error are all yielded before the error is
    raised.
    """

    def __init__(self, broker: Broker, cfg: ModelConfig, body: bytes) -> None:
        self.cfg = cfg
        self.result: Optional[StreamResult] = None
        self._broker = broker
        self._body = body
        self._queue: Deque[Delta] = deque()
        self._t0 = time.monotonic()
        self._deadline = self._t0 + cfg.timeout_ms / 1000.0
        self._attempt = 0
        self._retry_at = 0.0
        self._finished = False
        self._error: Optional[BaseException] = None
        self._handle: Optional["pycurl.Curl"] = None
        self._call: Optional[Call] = None
        self._decoder: StreamDecoder

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        q = self._queue
        while True:
            if q:
                return q.popleft()
            if self._finished:
                err = self._error
                if err is not None:
                    self._error = None
                    raise err
                raise StopIteration
            self._broker._drive(self)

    def _fail(self, err: BaseException) -> None:
        self._error = err
        self._finished = True

    def close(self) -> None:
        """Stop now: the connection is closed (the server cancels the generation)."""
        if not self._finished:
            self._finished = True
            self._broker._detach(self, reuse=False)
        self._queue.clear()

    def __enter__(self) -> "DeltaStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A finalizer may run inside a curl callback (garbage collection can
        # happen anywhere), where the multi handle must not be touched: hand
        # the handle to the Broker, which cuts it at its next turn.
        handle = self.__dict__.get("_handle")
        if handle is not None and not self._finished:
            self._broker._orphans.append(handle)


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
    once per non-empty content delta as it arrives. ``params`` are extra body
    fields (``max_tokens``, ``seed``, ``stop``, ``top_k``, ``stream_options`` …).
    Returns the :class:`StreamResult`."""
    return default_broker().chat_stream(messages, on_delta, cfg=cfg, **params)


def chat(cfg: ModelConfig, messages: Messages, **params: Any) -> str:
    """The whole reply as a string; the same streaming path as :func:`chat_stream`."""
    return default_broker().chat(messages, cfg=cfg, **params)


def stream(cfg: ModelConfig, messages: Messages, **params: Any) -> DeltaStream:
    """A pulled iterator of :class:`Delta` (see :meth:`Broker.stream`)."""
    return default_broker().stream(messages, cfg=cfg, **params)
