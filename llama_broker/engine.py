"""Transfers on a CurlMulti: the engine under ``stream()``, asyncio and ``map()``.

A :class:`Transfer` is one request (with its retries) that runs on a multi
handle. Two engines drive them, sharing the bookkeeping in :class:`Engine`:

* :class:`SyncEngine` — curl's socket and timer callbacks, ``poll()`` and
  ``socket_action``, run only when the caller asks (a pulled ``DeltaStream``
  wants its next delta, ``map()`` wants its next result). No threads; safe
  to drive from several threads (they take turns).
* :class:`AsyncEngine` — curl's socket and timer callbacks wired to the
  running asyncio loop (``add_reader``/``add_writer``/``call_later``): curl
  is entered only when a socket is ready or a timer fires. No threads, no
  polling.

Retries follow the same rule as the blocking path (``policy.retry_delay``): a
transfer that delivered output is never sent again.
"""

from __future__ import annotations

import select
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import pycurl

from .config import ModelConfig
from .decoder import Decoder, StreamResult
from .errors import BrokerError, ConfigError, TimeoutError_, TransportError
from .policy import retry_delay
from .transport import Call

if TYPE_CHECKING:  # asyncio is imported by the asyncio calls only (it costs ~30 ms)
    import asyncio

__all__ = ["Transfer", "Engine", "SyncEngine", "AsyncEngine", "DEFAULT_MAX_DELAY_MS", "check_max_delay"]


DecoderFactory = Callable[[float], Decoder]

# Looked up once: the per-token paths below use them on every wake-up.
_monotonic = time.monotonic
_get_ident = threading.get_ident
_CALL_MULTI_PERFORM = pycurl.E_CALL_MULTI_PERFORM
_CSELECT_IN, _CSELECT_OUT, _CSELECT_ERR = pycurl.CSELECT_IN, pycurl.CSELECT_OUT, pycurl.CSELECT_ERR
_POLL_READ = select.POLLIN | select.POLLPRI | select.POLLHUP if hasattr(select, "poll") else 0
_POLL_WRITE = select.POLLOUT if hasattr(select, "poll") else 0
_POLL_ERR = select.POLLERR if hasattr(select, "poll") else 0
_POLL_NVAL = select.POLLNVAL if hasattr(select, "poll") else 0

#: The latency budget ``Broker.map``/``amap`` (and ``Fanout``) use by default, in ms.
DEFAULT_MAX_DELAY_MS = 10.0
#: The largest budget accepted (it delays bytes, so it must stay far below any timeout).
MAX_DELAY_LIMIT_MS = 1000.0


def check_max_delay(max_delay_ms: float) -> float:
    """Validate a latency budget ``max_delay_ms`` and return it as a float.

    With a budget, an engine lets bytes wait in the kernel: after a pass over
    the ready sockets it does not read sockets again until ``max_delay_ms``
    after that pass, then handles every ready socket in one pass (one wake-up
    for many tokens). A transfer's bytes wait at most that long; an engine
    uses the smallest budget of the transfers it runs, so a transfer with no
    budget (0, the default of the interactive calls) is never delayed.
    """
    if isinstance(max_delay_ms, bool) or not isinstance(max_delay_ms, (int, float)):
        raise ConfigError(f"max_delay_ms must be a number of milliseconds, got {max_delay_ms!r}")
    if not 0 <= max_delay_ms <= MAX_DELAY_LIMIT_MS:  # (NaN fails too)
        raise ConfigError(f"max_delay_ms must be between 0 and {MAX_DELAY_LIMIT_MS:g}, got {max_delay_ms!r}")
    return float(max_delay_ms)


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
        "redirects",
        "streaming",
        "method",
        "max_delay",
        "_last_n",
        "_last_change",
    )

    def __init__(
        self,
        cfg: ModelConfig,
        body: Optional[bytes],
        make_decoder: DecoderFactory,
        *,
        on_done: Optional[Callable[["Transfer"], None]] = None,
        retry: bool = True,
        url: Optional[str] = None,
        tag: Any = None,
        streaming: bool = True,
        max_delay_ms: float = 0.0,
        method: str = "POST",
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
        self.decoder: Optional[Decoder] = None
        self.done = False
        self.error: Optional[BaseException] = None
        self.result: Optional[StreamResult] = None
        self.on_done = on_done
        #: called after each network chunk was decoded (the asyncio wake-up)
        self.on_chunk: Optional[Callable[[], None]] = None
        self.engine: Optional["Engine"] = None
        self.tag = tag
        #: redirects followed so far (ModelConfig.follow_redirects); ``url`` is the current hop
        self.redirects = 0
        #: False for a plain JSON request (``Accept: application/json``; the
        #: decoder's ``feed_whole`` gets the body)
        self.streaming = streaming
        #: the HTTP method (a GET has no body)
        self.method = method
        #: the latency budget in seconds (see :func:`check_max_delay`); 0: every wake-up is handled at once
        self.max_delay = check_max_delay(max_delay_ms) / 1000.0
        self._last_n = -1
        self._last_change = 0.0

    def start_clock(self) -> None:
        """Count ``timeout_ms``, ``ttft_s`` and ``elapsed_s`` from now (a request
        made before it is started, such as an ``astream()`` made before its
        loop runs, starts its clock when it is actually sent)."""
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.cfg.timeout_ms / 1000.0

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
        #: the latency budget in force (s): the smallest of the running transfers' (0 if none)
        self.delay = 0.0
        self._budgets: Dict[float, int] = {}  # budget -> running transfers with it
        #: passes over ready sockets so far (a wake-up that read data)
        self.passes = 0
        self._in_curl = False  # inside socket_action (curl's callbacks): no multi call may be made

    def _socket_actions(self, ready: Sequence[Tuple[int, int]]) -> int:
        """``socket_action`` for each ready socket (curl's callbacks, the caller's
        ``on_delta`` among them, run inside: ``_in_curl``), stopping early once
        :meth:`_stopped`; returns curl's running count (-1: no call was made)."""
        m = self.multi
        running = -1
        can_stop = self._can_stop
        self._in_curl = True
        try:
            for fd, events in ready:
                while True:
                    ret, running = m.socket_action(fd, events)
                    if ret != _CALL_MULTI_PERFORM:
                        break
                if can_stop and self._stopped():
                    break
        finally:
            self._in_curl = False
        return running

    #: whether :meth:`_stopped` can ever be true (saves a call per socket when not)
    _can_stop = False

    def _stopped(self) -> bool:
        """Whether a callback closed the engine mid-pass (engines that can say so
        override it, and set ``_can_stop``)."""
        return False

    def _budget(self, delay: float, n: int) -> None:
        b = self._budgets
        k = b.get(delay, 0) + n
        if k > 0:
            b[delay] = k
        else:
            b.pop(delay, None)
        self.delay = min(b) if b else 0.0

    def set_max_host_connections(self, n: int) -> None:
        """Limit curl's connections per host to ``n`` (more requests queue in curl); 0 leaves it as it is."""
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
                handle,
                t.cfg,
                t.body,
                t.decoder,
                deadline=t.deadline,
                url=t.url,
                progress=False,
                redirects=t.redirects,
                streaming=t.streaming,
                method=t.method,
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
        self._budget(t.max_delay, 1)
        self.multi.add_handle(handle)

    def _detach(self, t: Transfer, *, reuse: bool) -> None:
        handle = t.handle
        if handle is None:
            return
        t.handle = None
        if self.active.pop(id(handle), None) is not None:
            self._budget(t.max_delay, -1)
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
        next_url: Optional[str] = None
        try:
            next_url = call.finish(curl_error)  # before the handle is reset: it reads curl's byte count
        except BaseException as err:  # noqa: BLE001 - sorted out below
            outcome = err
        self._detach(t, reuse=True)
        if next_url is not None:  # a redirect (follow_redirects): start the next hop
            t.url, t.redirects = next_url, t.redirects + 1
            try:
                self.start(t)
            except BaseException as e:  # noqa: BLE001 - handed to the transfer
                t._finish(e)
            return
        if isinstance(outcome, BrokerError):
            if not self._maybe_retry(t, outcome):
                t._finish(outcome)
            return
        t._finish(outcome)
        if outcome is not None and not isinstance(outcome, Exception):
            raise outcome  # KeyboardInterrupt from a callback: stop now

    def _maybe_retry(self, t: Transfer, err: BrokerError) -> bool:
        delay = retry_delay(t.cfg, err, t.delivered, t.attempt, t.deadline) if t.retry else None
        if delay is None:
            return False
        t.attempt += 1
        self.schedule_retry(t, delay)
        return True

    def schedule_retry(self, t: Transfer, delay: float) -> None:
        """Start ``t`` again after ``delay`` seconds (each engine times it its own way)."""
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
            if n == 0 and not handle.getinfo(pycurl.PRETRANSFER_TIME):
                # Not sent yet (queued by max_host_connections, or still
                # connecting: the connect timeout covers that): the idle clock
                # starts when the request goes on the wire.
                t._last_change = now
                continue
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
    """Drives its transfers only when :meth:`drive` is called.

    curl says which sockets to watch through its socket callback and when to
    call back through its timer callback; :meth:`drive` waits on those
    sockets with ``poll()`` (no limit on descriptor numbers, unlike
    ``select()``) and hands what is ready to ``socket_action``.

    Threads: one thread at a time runs curl (it holds the *turn*). A thread
    that wants the next delta while another one drives waits for that turn
    to end (the driver reads every socket, so it delivers that thread's data
    too); :meth:`start`, :meth:`cut` and :meth:`close` wake a waiting driver
    through a socket pair and take the next turn. So streams may be consumed
    on other threads than the one that made them, even concurrently.
    """

    #: how often the idle timeout is checked while transfers run
    WATCH_S = 0.25

    def __init__(self, acquire: Callable[[], "pycurl.Curl"], release: Callable[["pycurl.Curl"], None]) -> None:
        super().__init__(acquire, release)
        self._retries: List[Any] = []  # [retry_at, transfer]
        self._next_watch = 0.0
        self.closed = False
        # curl -> us: the sockets to watch (fd -> POLL_*) and when to call back
        self._socks: Dict[int, int] = {}
        self._timer_at: Optional[float] = None
        self._poll = select.poll() if hasattr(select, "poll") else None
        # the turn (see the class docstring); an RLock, because a finalizer
        # may run on a thread that is inside one of these sections
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._sleepers = 0  # threads in self._cv.wait() (nobody to notify: no notify_all per turn)
        self._owner: Optional[int] = None
        self._depth = 0
        self._wanted = 0  # threads waiting to start, cut or close
        self._dropped: List[Transfer] = []  # cut at the end of the current turn
        import socket  # (here: `import llama_broker` stays cheap)

        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_fd = self._wake_r.fileno()
        self._wake_poll = select.poll() if self._poll is not None else None  # the wake-up alone: a budget's wait
        if self._poll is not None and self._wake_poll is not None:
            self._poll.register(self._wake_r.fileno(), select.POLLIN)
            self._wake_poll.register(self._wake_r.fileno(), select.POLLIN)
        self._last_pass = float("-inf")  # when sockets were last read (the latency budget counts from it)
        self._busy = False  # data came within the budget: hold before waiting on sockets again
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)

    # -- curl -> us ------------------------------------------------------------
    def _on_socket(self, what: int, fd: int, multi: Any, socketp: Any) -> None:
        p = self._poll
        if what == pycurl.POLL_REMOVE:
            self._socks.pop(fd, None)
            if p is not None:
                try:
                    p.unregister(fd)
                except KeyError:
                    pass
            return
        self._socks[fd] = what
        if p is not None:
            mask = 0
            if what in (pycurl.POLL_IN, pycurl.POLL_INOUT):
                mask |= select.POLLIN | select.POLLPRI
            if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
                mask |= select.POLLOUT
            p.register(fd, mask)  # registers or modifies

    def _on_timer(self, timeout_ms: int) -> None:
        self._timer_at = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000.0

    # -- the turn ------------------------------------------------------------------
    def _enter(self, ready: Optional[Callable[[], bool]] = None, max_wait: float = 0.0) -> bool:
        """Take the turn (re-entrant). With ``ready`` (a driver): give up and
        return False when ``ready()`` becomes true or ``max_wait`` passes while
        another thread has it. Without: wake the driver and wait for the turn."""
        me = threading.get_ident()
        with self._lock:  # (the Condition's lock: `with` on it directly is one Python call less)
            if self._owner == me:
                self._depth += 1
                return True
            if ready is not None:
                deadline = _monotonic() + max_wait if self._owner is not None or self._wanted else 0.0
                while self._owner is not None or self._wanted:
                    if ready():
                        return False
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._sleep(left)
            else:
                self._wanted += 1
                try:
                    while self._owner is not None:
                        self._wake()
                        self._sleep(0.5)
                finally:
                    self._wanted -= 1
            self._owner = me
            self._depth = 1
            return True

    def _sleep(self, timeout: float) -> None:
        """Wait (lock held) for the turn to end or ``timeout`` s."""
        self._sleepers += 1
        try:
            self._cv.wait(timeout)
        finally:
            self._sleepers -= 1

    def _leave(self) -> None:
        """End the turn; cut the transfers dropped meanwhile first."""
        cv = self._lock
        with cv:
            if self._depth > 1:
                self._depth -= 1
                return
            if not self._dropped or self.closed:  # (the common case, in one step)
                self._dropped.clear()
                self._release_turn()
                return
        try:
            while True:
                with cv:  # the last check and the release are one step: see drop()
                    dropped = self._dropped
                    if not dropped or self.closed:
                        dropped.clear()
                        self._release_turn()
                        return
                    self._dropped = []
                for t in dropped:
                    Engine.cut(self, t)
        except BaseException:
            with cv:
                self._release_turn()
            raise

    def _release_turn(self) -> None:
        self._owner = None
        self._depth = 0
        if self._sleepers:
            self._cv.notify_all()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    # -- start / stop ----------------------------------------------------------------
    def start(self, t: Transfer) -> None:
        """Start ``t`` under the turn (a driving thread is woken for it); :class:`ConfigError` once closed."""
        self._enter()
        try:
            if self.closed:
                raise ConfigError("this Broker is closed")
            super().start(t)
        finally:
            self._leave()

    def cut(self, t: Transfer) -> None:
        """Stop ``t`` and close its connection, under the turn; called from inside curl, at the end
        of the current turn instead."""
        if t.done:
            return
        with self._cv:
            if self._owner == threading.get_ident() and self._in_curl:
                # called from inside curl (a finalizer, a generator closed by
                # the garbage collector): the multi handle cannot be touched now
                self._dropped.append(t)
                return
        self._enter()
        try:
            super().cut(t)
        finally:
            self._leave()

    def drop(self, t: Transfer) -> None:
        """Cut ``t`` for a finalizer: now if nobody drives, else at the end of the
        current turn (the driver, on this thread or another, is woken for it).
        Never blocks."""
        if t.done:
            return
        with self._cv:
            if self.closed:
                return
            if self._owner is not None:
                self._dropped.append(t)
                if self._owner != threading.get_ident():
                    self._wake()
                return
            self._owner = threading.get_ident()
            self._depth = 1
        try:
            Engine.cut(self, t)
        finally:
            self._leave()

    def schedule_retry(self, t: Transfer, delay: float) -> None:
        """Queue ``t`` to start again after ``delay`` seconds (:meth:`drive` starts it when due)."""
        self._retries.append([time.monotonic() + delay, t])

    def _forget_retry(self, t: Transfer) -> None:
        self._retries = [r for r in self._retries if r[1] is not t]

    def close(self) -> None:
        """End every transfer with an error saying the Broker was closed (their
        streams raise it, ``map()`` reports it) and close the multi handle."""
        self._enter()
        try:
            if self.closed:
                return
            self.closed = True
            pending = list(self.active.values()) + [r[1] for r in self._retries]
            self._retries = []
            for t in pending:
                if t.done:
                    continue
                nbytes = 0
                if t.handle is not None:
                    try:
                        nbytes = int(t.handle.getinfo(pycurl.SIZE_DOWNLOAD_T))
                    except pycurl.error:  # pragma: no cover
                        pass
                self._detach(t, reuse=False)
                t._finish(
                    TransportError(
                        f"the Broker was closed while this request was in flight ({nbytes} bytes received)",
                        bytes_received=nbytes,
                        delivered=t.delivered,
                    )
                )
            self.multi.close()
            self._socks.clear()
            self._wake_r.close()
            self._wake_w.close()
        finally:
            self._leave()

    # -- driving -------------------------------------------------------------------
    def _act(self, fd: int, events: int) -> None:
        self._act_many([(fd, events)])

    def _act_many(self, ready: List[Tuple[int, int]]) -> None:
        """``socket_action`` for each ready socket, then one :meth:`collect`."""
        running = self._socket_actions(ready)
        if running != len(self.active):  # (equal: curl finished none of them, nothing to collect)
            self.collect()

    def drive(self, ready: Callable[[], bool], max_wait: float = 1.0) -> None:
        """One turn: run curl, finish what is done, start due retries, and wait
        (at most ``max_wait`` s) for sockets unless ``ready()`` is already true.
        If another thread is driving, wait (as long) for its turn to end instead."""
        # The common case of _enter and _leave inline (a pulled stream calls
        # this once per token): nobody else holds or wants the turn.
        lock = self._lock
        with lock:
            took = self._owner is None and not self._wanted
            if took:
                self._owner = _get_ident()
                self._depth = 1
        if not took and not self._enter(ready, max_wait):
            return
        try:
            if not self.closed:
                self._turn(ready, max_wait)
        finally:
            with lock:
                done = self._depth == 1 and not self._dropped
                if done:
                    self._owner = None
                    self._depth = 0
                    if self._sleepers:
                        self._cv.notify_all()
            if not done:
                self._leave()

    def _turn(self, ready: Callable[[], bool], max_wait: float) -> None:
        # (runs once per token of a pulled stream: locals, no builtin min())
        now = _monotonic()
        timer_at = self._timer_at
        if timer_at is not None and timer_at <= now:
            self._timer_at = None
            self._act(pycurl.SOCKET_TIMEOUT, 0)
            now = _monotonic()
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
        if ready() or self._wanted:
            return
        wait = self._next_watch - now
        if max_wait < wait:
            wait = max_wait
        timer_at = self._timer_at
        if timer_at is not None and timer_at - now < wait:
            wait = timer_at - now
        if self._retries:
            wait = min(wait, min(r[0] for r in self._retries) - now)
        if wait <= 0:
            return
        delay = self.delay
        if delay > 0 and self._busy:
            hold = self._last_pass + delay - now
            if hold > 0:
                # The latency budget: let the tokens gather in the kernel; only
                # a wake-up (start, cut, close from another thread) ends it early.
                self._hold(min(hold, wait))
                return
        ready_socks = self._wait(wait)
        if ready_socks:
            if delay > 0:
                t = _monotonic()
                if not self._busy:
                    if t < self._last_pass + delay:
                        # Data within the budget: tokens come faster than it, so
                        # gather them (the next turn holds; the data waits in the kernel).
                        self._busy = True
                        return
                else:
                    # After a hold: data that was waiting keeps it busy; data we
                    # had to wait for means a sparse stream, read at once from
                    # now on, so the budget never costs it a wake-up of its own.
                    self._busy = t - now < delay / 2
                self._last_pass = t  # (only the budget reads it)
            self.passes += 1
            running = self._socket_actions(ready_socks)
            if running != len(self.active):  # (equal: curl finished none of them, nothing to collect)
                self.collect()

    def _hold(self, wait: float) -> None:
        """Sleep ``wait`` s unless woken (the sockets are not watched meanwhile)."""
        if self._wake_poll is not None:
            if self._wake_poll.poll(max(1, int(wait * 1000 + 0.999))):
                self._drain_wake()
            return
        r, _, _ = select.select([self._wake_r.fileno()], [], [], wait)  # (no poll(): Windows)
        if r:
            self._drain_wake()

    def _wait(self, wait: float) -> List[Tuple[int, int]]:
        """Wait up to ``wait`` s for curl's sockets (or a wake-up); the ready
        ones as (fd, CSELECT_* bits)."""
        wake = self._wake_fd
        out: List[Tuple[int, int]] = []
        poll = self._poll
        if poll is not None:
            ms = int(wait * 1000 + 0.999)
            for fd, rev in poll.poll(ms if ms > 1 else 1):
                if fd == wake:
                    self._drain_wake()
                    continue
                if rev & _POLL_NVAL:  # closed behind our back: stop watching it
                    poll.unregister(fd)
                    self._socks.pop(fd, None)
                    continue
                ev = 0
                if rev & _POLL_READ:
                    ev = _CSELECT_IN
                if rev & _POLL_WRITE:
                    ev |= _CSELECT_OUT
                if rev & _POLL_ERR:
                    ev |= _CSELECT_ERR
                out.append((fd, ev))
            return out
        # no poll() (Windows): select() there has no limit on descriptor numbers
        rd = [fd for fd, w in self._socks.items() if w in (pycurl.POLL_IN, pycurl.POLL_INOUT)] + [wake]
        wr = [fd for fd, w in self._socks.items() if w in (pycurl.POLL_OUT, pycurl.POLL_INOUT)]
        r, w, x = select.select(rd, wr, wr, wait)
        if wake in r:
            self._drain_wake()
        for fd in set(r) | set(w) | set(x):
            if fd == wake:
                continue
            ev = (pycurl.CSELECT_IN if fd in r else 0) | (pycurl.CSELECT_OUT if fd in w else 0)
            out.append((fd, ev | (pycurl.CSELECT_ERR if fd in x else 0)))
        return out

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # drained (would block)
            pass


class AsyncEngine(Engine):
    """Runs its transfers on an asyncio loop through curl's socket/timer callbacks.

    :meth:`close` ends every transfer it holds (running or waiting for a
    retry) with a :class:`TransportError`, so no awaiting task is left
    hanging; it works, without touching the loop, after the loop was closed.
    """

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
        self._retrying: Dict[Transfer, asyncio.TimerHandle] = {}  # transfers waiting for a retry
        #: why the engine was closed (None while open)
        self.closed: Optional[str] = None
        # Where epoll exists, curl's sockets are watched by an epoll set of
        # our own and the loop watches that one descriptor: a wake-up reads
        # every ready socket (one loop callback, however many streams), and
        # the latency budget (Engine.delay) pauses one reader, not one per
        # socket. asyncio's readers are level-triggered: while the budget
        # runs the epoll reader is removed (kept, it would fire on every loop
        # turn) and one timer per engine restores it for the next pass.
        self._ep = select.epoll() if hasattr(select, "epoll") else None
        self._ep_watched = False  # the loop has a reader on the epoll set
        # Without epoll each socket has its own reader; under a budget a
        # socket that becomes readable loses it and waits in _held.
        self._held: Dict[int, None] = {}  # fd -> None, in the order they became ready
        self._pass_handle: Optional[asyncio.Handle] = None
        self._last_pass = float("-inf")  # loop.time() of the last pass
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)

    # curl -> loop ----------------------------------------------------------------
    def _on_socket(self, what: int, fd: int, multi: Any, socketp: Any) -> None:
        if self.closed is not None or self.loop.is_closed():  # nothing to tell a dead loop
            self._fds.pop(fd, None)
            return
        loop = self.loop
        ep = self._ep
        if ep is not None:
            old_what = self._fds.pop(fd, None)
            if what == pycurl.POLL_REMOVE:
                if old_what is not None:
                    try:
                        ep.unregister(fd)
                    except OSError:  # already closed (the kernel dropped it)
                        pass
                return
            mask = (select.EPOLLIN if what in (pycurl.POLL_IN, pycurl.POLL_INOUT) else 0) | (
                select.EPOLLOUT if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT) else 0
            )
            try:
                if old_what is None:
                    ep.register(fd, mask)
                else:
                    ep.modify(fd, mask)
            except OSError:  # a descriptor number reused behind our back
                try:
                    ep.modify(fd, mask)
                except OSError:
                    ep.register(fd, mask)
            self._fds[fd] = what
            if not self._ep_watched and self._pass_handle is None:
                loop.add_reader(ep.fileno(), self._ep_ready)
                self._ep_watched = True
            return
        old = self._fds.pop(fd, None)
        if old is not None:
            if old in (pycurl.POLL_IN, pycurl.POLL_INOUT):
                loop.remove_reader(fd)
            if old in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
                loop.remove_writer(fd)
        if what == pycurl.POLL_REMOVE:
            self._held.pop(fd, None)
            return
        if what in (pycurl.POLL_IN, pycurl.POLL_INOUT):
            loop.add_reader(fd, self._readable, fd)
        if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
            loop.add_writer(fd, self._act, fd, pycurl.CSELECT_OUT)
        self._fds[fd] = what

    def _on_timer(self, timeout_ms: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if timeout_ms >= 0 and self.closed is None and not self.loop.is_closed():
            self._timer = self.loop.call_later(timeout_ms / 1000.0, self._act, pycurl.SOCKET_TIMEOUT, 0)

    # loop -> curl ----------------------------------------------------------------
    def _ep_ready(self) -> None:
        """The epoll set is readable: a pass now, or once the budget is spent."""
        if self.closed is not None:
            return
        d = self.delay
        if d > 0:
            loop = self.loop
            now = loop.time()
            at = self._last_pass + d
            if now < at:
                assert self._ep is not None
                loop.remove_reader(self._ep.fileno())
                self._ep_watched = False
                self._pass_handle = loop.call_at(at, self._ep_pass)
                return
            self._last_pass = now
        self._ep_read()

    def _ep_pass(self) -> None:
        """The budget is spent: read what is ready. While there is something,
        the next pass comes one budget later (still without a reader: busy
        streams cost one timer per budget); else watch the epoll set again."""
        self._pass_handle = None
        if self.closed is not None or self._ep is None:
            return
        loop = self.loop
        now = loop.time()
        if self._ep_read():
            self._last_pass = now  # (an empty pass is none: the budget counts from the last read)
            if self.delay > 0 and self.closed is None:
                self._pass_handle = loop.call_at(now + self.delay, self._ep_pass)
                return
        if not self._ep_watched and self.closed is None:
            loop.add_reader(self._ep.fileno(), self._ep_ready)
            self._ep_watched = True

    def _ep_read(self) -> bool:
        """One pass: every ready socket of the epoll set to curl (False: none was ready)."""
        assert self._ep is not None
        events = self._ep.poll(0)
        if not events:
            return False
        self.passes += 1
        ready = []
        for fd, ev in events:
            flags = 0
            if ev & (select.EPOLLIN | select.EPOLLPRI | select.EPOLLHUP | select.EPOLLRDHUP):
                flags |= pycurl.CSELECT_IN
            if ev & select.EPOLLOUT:
                flags |= pycurl.CSELECT_OUT
            if ev & select.EPOLLERR:
                flags |= pycurl.CSELECT_ERR
            ready.append((fd, flags))
        self._act_many(ready)
        return True

    def _readable(self, fd: int) -> None:
        """A socket's reader fired: act now, or hold it for the next pass (budget)."""
        if self.delay <= 0 and not self._held:
            self.passes += 1
            self._act_many(((fd, pycurl.CSELECT_IN),))
            return
        self.loop.remove_reader(fd)  # restored by the pass (or by curl's next socket callback)
        self._held[fd] = None
        if self._pass_handle is None:
            loop = self.loop
            at = self._last_pass + self.delay
            if at <= loop.time():  # the budget is spent: after this loop turn's other ready sockets
                self._pass_handle = loop.call_soon(self._pass)
            else:
                self._pass_handle = loop.call_at(at, self._pass)

    def _pass(self) -> None:
        """Read every held socket in one pass and watch them again."""
        self._pass_handle = None
        if self.closed is not None:
            return
        loop = self.loop
        self._last_pass = loop.time()
        self.passes += 1
        held, self._held = self._held, {}
        fds = self._fds
        for fd in held:
            if fds.get(fd) in (pycurl.POLL_IN, pycurl.POLL_INOUT):
                loop.add_reader(fd, self._readable, fd)
        self._act_many([(fd, pycurl.CSELECT_IN) for fd in held])

    def _act(self, fd: int, events: int) -> None:
        self._act_many(((fd, events),))

    def _act_many(self, ready: Sequence[Tuple[int, int]]) -> None:
        if self.closed is not None:
            return
        running = self._socket_actions(ready)
        if self.closed is not None:  # closed from a callback (an on_delta): curl is free now
            self._teardown()
            return
        if running != len(self.active):  # (equal: curl finished none of them, nothing to collect)
            self.collect()

    _can_stop = True

    def _stopped(self) -> bool:
        return self.closed is not None

    def check_open(self) -> None:
        """Raise the :class:`TransportError` of a closed engine (no-op while open)."""
        if self.closed is not None:
            raise TransportError(self.closed)

    def start(self, t: Transfer) -> None:
        """Start ``t`` (raises if the engine is closed) and the idle-timeout watch, if not running yet."""
        self.check_open()
        super().start(t)
        if self._watch is None:
            self._watch = self.loop.call_later(self.WATCH_S, self._check_idle)

    def schedule_retry(self, t: Transfer, delay: float) -> None:
        """Start ``t`` again after ``delay`` seconds through a loop timer (an error then ends ``t``)."""

        def again() -> None:
            self._retrying.pop(t, None)
            if t.done:
                return
            try:
                self.start(t)
            except BaseException as e:  # noqa: BLE001 - handed to the transfer
                t._finish(e)

        self._retrying[t] = self.loop.call_later(delay, again)

    def _forget_retry(self, t: Transfer) -> None:
        h = self._retrying.pop(t, None)
        if h is not None:
            h.cancel()

    def _check_idle(self) -> None:
        self._watch = None
        if self.closed is not None:
            return
        self.check_idle(time.monotonic())
        if self.active:
            self._watch = self.loop.call_later(self.WATCH_S, self._check_idle)

    def close(self, reason: str = "the Broker was closed") -> None:
        """Close every connection and the multi handle; end each transfer still
        running or waiting for a retry with a :class:`TransportError` naming
        ``reason`` (its ``on_done`` runs, so awaiting tasks wake up). Safe to
        call twice, from a transfer's callback, and after the loop was closed
        (the loop is then not touched)."""
        if self.closed is not None:
            return
        self.closed = reason
        alive = not self.loop.is_closed()
        if self._ep is not None:
            if alive and self._ep_watched:
                self.loop.remove_reader(self._ep.fileno())
            self._ep_watched = False
            self._ep.close()
        elif alive:
            for fd, what in list(self._fds.items()):
                if what in (pycurl.POLL_IN, pycurl.POLL_INOUT):
                    self.loop.remove_reader(fd)
                if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
                    self.loop.remove_writer(fd)
        self._fds.clear()
        self._held.clear()
        if alive:
            for h in (self._timer, self._watch, self._pass_handle, *self._retrying.values()):
                if h is not None:
                    h.cancel()
        self._timer = self._watch = None
        self._pass_handle = None
        waiting = list(self._retrying)
        self._retrying.clear()
        ended: List[Any] = []
        for t in list(self.active.values()) + waiting:
            if t.done:
                continue
            n = 0
            if t.handle is not None:
                try:
                    n = int(t.handle.getinfo(pycurl.SIZE_DOWNLOAD_T))
                except pycurl.error:  # inside curl's callbacks getinfo() is refused
                    n = 0
            err = TransportError(
                f"{reason} while this request was in flight ({n} bytes received)",
                bytes_received=n,
                delivered=t.delivered,
            )
            ended.append((t, err))
        if not self._in_curl:  # else _act() tears down once curl returns
            self._teardown()
        for t, err in ended:
            try:
                t._finish(err)
            except Exception:  # noqa: BLE001 - e.g. a waiter whose loop is gone: nobody to tell
                pass

    def _teardown(self) -> None:
        """Close every connection (the server cancels the generation) and the multi handle."""
        for t in list(self.active.values()):
            try:
                self._detach(t, reuse=False)
            except pycurl.error:  # pragma: no cover - keep closing the others
                pass
        self.active.clear()
        self.multi.close()
