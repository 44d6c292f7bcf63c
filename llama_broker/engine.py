"""Transfers on a CurlMulti: the engine under ``stream()``, asyncio and ``map()``.

A :class:`Transfer` is one request (with its retries) that runs on a multi
handle. Two engines drive them, sharing the bookkeeping in :class:`Engine`:

* :class:`SyncEngine` — ``multi.perform()`` + ``select()``, run only when the
  caller asks (a pulled ``DeltaStream`` wants its next delta, ``map()`` wants
  its next result). No threads.
* :class:`AsyncEngine` — curl's socket and timer callbacks wired to the
  running asyncio loop (``add_reader``/``add_writer``/``call_later``): curl
  is entered only when a socket is ready or a timer fires. No threads, no
  polling.

Retries follow the same rule as the blocking path (``broker._retriable``): a
transfer that delivered output is never sent again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Dict, List, Optional

import pycurl

from .config import ModelConfig
from .decoder import StreamDecoder, StreamResult
from .errors import BrokerError, TimeoutError_
from .transport import Call

__all__ = ["Transfer", "Engine", "SyncEngine", "AsyncEngine"]


DecoderFactory = Callable[[float], StreamDecoder]


class Transfer:
    """One request on an engine: its body, its current attempt, its outcome.

    ``on_done(transfer)`` is called once, when ``done`` becomes true (success:
    ``result`` is set; failure: ``error``). ``retry`` off leaves retrying to
    the caller (``map()`` retries on another endpoint instead).
    """

    __slots__ = (
        "cfg",
        "body",
        "url",
        "make_decoder",
        "t0",
        "deadline",
        "attempt",
        "retry",
        "handle",
        "call",
        "decoder",
        "done",
        "error",
        "result",
        "on_done",
        "on_chunk",
        "engine",
        "tag",
        "streaming",
        "_last_n",
        "_last_change",
    )

    def __init__(
        self,
        cfg: ModelConfig,
        body: bytes,
        make_decoder: DecoderFactory,
        *,
        on_done: Optional[Callable[["Transfer"], None]] = None,
        retry: bool = True,
        url: Optional[str] = None,
        tag: Any = None,
        streaming: bool = True,
    ) -> None:
        self.cfg = cfg
        self.body = body
        self.url = url
        self.make_decoder = make_decoder
        self.t0 = time.monotonic()
        self.deadline = self.t0 + cfg.timeout_ms / 1000.0
        self.attempt = 0
        self.retry = retry
        self.handle: Optional["pycurl.Curl"] = None
        self.call: Optional[Call] = None
        self.decoder: Optional[StreamDecoder] = None
        self.done = False
        self.error: Optional[BaseException] = None
        self.result: Optional[StreamResult] = None
        self.on_done = on_done
        #: called after each network chunk was decoded (the asyncio wake-up)
        self.on_chunk: Optional[Callable[[], None]] = None
        self.engine: Optional["Engine"] = None
        self.tag = tag
        #: False for a plain JSON request (``Accept: application/json``; the
        #: decoder's ``feed_whole`` gets the body)
        self.streaming = streaming
        self._last_n = -1
        self._last_change = 0.0

    @property
    def delivered(self) -> bool:
        """Whether any output reached the caller (never retried then)."""
        return self.call is not None and self.call.delivered

    def _finish(self, error: Optional[BaseException]) -> None:
        self.done = True
        self.error = error
        if error is None and self.decoder is not None:
            res = self.decoder.result
            res.retries = self.attempt
            res.elapsed_s = time.monotonic() - self.t0
            self.result = res
        cb = self.on_done
        if cb is not None:
            cb(self)


class Engine:
    """Bookkeeping shared by both engines: handles in, outcomes out."""

    def __init__(self, acquire: Callable[[], "pycurl.Curl"], release: Callable[["pycurl.Curl"], None]) -> None:
        self._acquire = acquire
        self._release = release
        self.multi = pycurl.CurlMulti()
        self.active: Dict[int, Transfer] = {}  # id(handle) -> transfer

    def set_max_host_connections(self, n: int) -> None:
        if n:
            self.multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, n)

    # -- start / stop ----------------------------------------------------------
    def start(self, t: Transfer) -> None:
        """Start (or restart, for a retry) ``t`` on this engine."""
        t.engine = self
        handle = self._acquire()
        try:
            t.decoder = t.make_decoder(t.t0)
            t.call = Call(
                handle, t.cfg, t.body, t.decoder, deadline=t.deadline, url=t.url, progress=False, streaming=t.streaming
            )
        except BaseException:
            self._release(handle)
            raise
        if t.on_chunk is not None:
            feed, wake = t.call._feed, t.on_chunk

            def feed_and_wake(chunk: bytes) -> None:
                feed(chunk)
                wake()

            t.call._feed = feed_and_wake
        t.handle = handle
        t._last_n = -1
        t._last_change = time.monotonic()
        self.active[id(handle)] = t
        self.multi.add_handle(handle)

    def _detach(self, t: Transfer, *, reuse: bool) -> None:
        handle = t.handle
        if handle is None:
            return
        t.handle = None
        self.active.pop(id(handle), None)
        self.multi.remove_handle(handle)
        if reuse:
            handle.reset()  # drops the Call's callbacks; keeps the connection cache
            self._release(handle)
        else:
            handle.close()  # a transfer cut short: its connection must go

    def cut(self, t: Transfer) -> None:
        """Stop ``t`` now and close its connection (the server cancels)."""
        if not t.done:
            self._detach(t, reuse=False)
            t.done = True
            self._forget_retry(t)

    def _forget_retry(self, t: Transfer) -> None:
        """Drop a pending retry of ``t`` (engines that keep a list override)."""

    # -- outcomes ------------------------------------------------------------------
    def collect(self) -> None:
        """Finish every transfer curl reports as done."""
        m = self.multi
        while True:
            queued, ok_list, err_list = m.info_read()
            for h in ok_list:
                self._complete(h, None)
            for h, code, text in err_list:
                self._complete(h, pycurl.error(code, text))
            if not queued:
                break

    def _complete(self, handle: "pycurl.Curl", curl_error: Optional[pycurl.error]) -> None:
        t = self.active.get(id(handle))
        if t is None:  # pragma: no cover - a handle we no longer track
            self.multi.remove_handle(handle)
            self._release(handle)
            return
        call = t.call
        assert call is not None
        outcome: Optional[BaseException] = None
        try:
            call.finish(curl_error)  # before the handle is reset: it reads curl's byte count
        except BaseException as err:  # noqa: BLE001 - sorted out below
            outcome = err
        self._detach(t, reuse=True)
        if isinstance(outcome, BrokerError):
            if not self._maybe_retry(t, outcome):
                t._finish(outcome)
            return
        t._finish(outcome)
        if outcome is not None and not isinstance(outcome, Exception):
            raise outcome  # KeyboardInterrupt from a callback: stop now

    def _maybe_retry(self, t: Transfer, err: BrokerError) -> bool:
        from .broker import _retry_delay  # one retry policy for every path

        delay = _retry_delay(t.cfg, err, t.delivered, t.attempt, t.deadline) if t.retry else None
        if delay is None:
            return False
        t.attempt += 1
        self.schedule_retry(t, delay)
        return True

    def schedule_retry(self, t: Transfer, delay: float) -> None:
        raise NotImplementedError

    def check_idle(self, now: float) -> None:
        """Time out transfers that received no byte for their idle_timeout_ms.

        The engines run a transfer only when its socket or a timer fires, so a
        silent server never reaches curl's progress callback (which times the
        gap in the blocking path): both engines call this a few times a
        second instead, reading each transfer's byte count from curl."""
        for t in list(self.active.values()):
            call, handle = t.call, t.handle
            if call is None or handle is None or call.idle_s is None:
                continue
            n = handle.getinfo(pycurl.SIZE_DOWNLOAD_T) + handle.getinfo(pycurl.HEADER_SIZE)
            if n != t._last_n:
                t._last_n = n
                t._last_change = now
            elif now - t._last_change >= call.idle_s:
                call.idle_fired = True
                error: BrokerError = TimeoutError_("idle timeout")
                try:
                    call.finish(None)  # raises the TimeoutError_, with curl's byte count
                except BrokerError as err:
                    error = err
                self._detach(t, reuse=False)
                t._finish(error)

    def close(self) -> None:
        """Cut every transfer and close the multi handle."""
        for t in list(self.active.values()):
            self.cut(t)
        self.multi.close()


class SyncEngine(Engine):
    """Drives its transfers only when :meth:`drive` is called."""

    #: how often the idle timeout is checked while transfers run
    WATCH_S = 0.25

    def __init__(self, acquire: Callable[[], "pycurl.Curl"], release: Callable[["pycurl.Curl"], None]) -> None:
        super().__init__(acquire, release)
        self._retries: List[Any] = []  # [retry_at, transfer]
        self._running = 0
        self._next_watch = 0.0

    def start(self, t: Transfer) -> None:
        super().start(t)
        self._running += 1  # so that drive() reads curl's messages when it ends

    def schedule_retry(self, t: Transfer, delay: float) -> None:
        self._retries.append([time.monotonic() + delay, t])

    def _forget_retry(self, t: Transfer) -> None:
        self._retries = [r for r in self._retries if r[1] is not t]

    def drive(self, ready: Callable[[], bool], max_wait: float = 1.0) -> None:
        """One turn: run curl, finish what is done, start due retries, and wait
        (at most ``max_wait`` s) for sockets unless ``ready()`` is already true."""
        m = self.multi
        while True:
            ret, running = m.perform()
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        if running != self._running:  # some transfer ended: read curl's messages
            self.collect()
            self._running = len(self.active)
        now = time.monotonic()
        if now >= self._next_watch:
            self._next_watch = now + self.WATCH_S
            self.check_idle(now)
        if self._retries:
            due = [r for r in self._retries if r[0] <= now]
            if due:
                self._retries = [r for r in self._retries if r[0] > now]
                for _, t in due:
                    if t.done:
                        continue
                    try:
                        self.start(t)
                    except BaseException as e:  # noqa: BLE001 - handed to the transfer
                        t._finish(e)
        if ready():
            return
        wait = max_wait
        timeout_ms = m.timeout()
        if timeout_ms >= 0:
            wait = min(wait, timeout_ms / 1000.0)
        if self._retries:
            wait = min(wait, max(0.0, min(r[0] for r in self._retries) - now))
        wait = min(wait, max(0.0, self._next_watch - now))
        if wait <= 0:
            return
        if self.active:
            m.select(wait)
        else:
            time.sleep(wait)  # nothing to select on (only retries or rests pending)


class AsyncEngine(Engine):
    """Runs its transfers on an asyncio loop through curl's socket/timer callbacks."""

    #: how often stalled transfers are checked for the idle timeout
    WATCH_S = 0.25

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        acquire: Callable[[], "pycurl.Curl"],
        release: Callable[["pycurl.Curl"], None],
    ) -> None:
        super().__init__(acquire, release)
        self.loop = loop
        self._fds: Dict[int, int] = {}
        self._timer: Optional[asyncio.TimerHandle] = None
        self._watch: Optional[asyncio.TimerHandle] = None
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)

    # curl -> loop ----------------------------------------------------------------
    def _on_socket(self, what: int, fd: int, multi: Any, socketp: Any) -> None:
        loop = self.loop
        old = self._fds.pop(fd, None)
        if old is not None:
            if old in (pycurl.POLL_IN, pycurl.POLL_INOUT):
                loop.remove_reader(fd)
            if old in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
                loop.remove_writer(fd)
        if what == pycurl.POLL_REMOVE:
            return
        if what in (pycurl.POLL_IN, pycurl.POLL_INOUT):
            loop.add_reader(fd, self._act, fd, pycurl.CSELECT_IN)
        if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
            loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
        self._fds[fd] = what

    def _on_timer(self, timeout_ms: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if timeout_ms >= 0:
            self._timer = self.loop.call_later(timeout_ms / 1000.0, self._act, pycurl.SOCKET_TIMEOUT, 0)

    # loop -> curl ----------------------------------------------------------------
    def _act(self, fd: int, events: int) -> None:
        m = self.multi
        while True:
            ret, _ = m.socket_action(fd, events)
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        self.collect()

    def start(self, t: Transfer) -> None:
        super().start(t)
        if self._watch is None:
            self._watch = self.loop.call_later(self.WATCH_S, self._check_idle)

    def schedule_retry(self, t: Transfer, delay: float) -> None:
        def again() -> None:
            if t.done:
                return
            try:
                self.start(t)
            except BaseException as e:  # noqa: BLE001 - handed to the transfer
                t._finish(e)

        self.loop.call_later(delay, again)

    def _check_idle(self) -> None:
        self._watch = None
        self.check_idle(time.monotonic())
        if self.active:
            self._watch = self.loop.call_later(self.WATCH_S, self._check_idle)

    def close(self) -> None:
        for fd, what in list(self._fds.items()):
            if what in (pycurl.POLL_IN, pycurl.POLL_INOUT):
                self.loop.remove_reader(fd)
            if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
                self.loop.remove_writer(fd)
        self._fds.clear()
        for h in (self._timer, self._watch):
            if h is not None:
                h.cancel()
        super().close()

