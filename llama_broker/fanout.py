"""Batch fan-out: many chat requests, at most N in flight, over several servers.

:class:`Fanout` is the scheduling state shared by ``Broker.map`` (sync, on
the :class:`~llama_broker.engine.SyncEngine`) and ``Broker.amap`` (asyncio,
on the :class:`~llama_broker.engine.AsyncEngine`). Requests go to the
endpoint with the fewest outstanding requests; an endpoint that refuses the
connection, resets before the first byte or answers 429/503 is rested and the
request is sent again elsewhere — unless it already streamed output, which is
never sent twice. Other failures end that request only: its result carries
the error.

Resting and retrying follow the blocking path's policy (``policy.py``), so
``map()`` behaves like ``concurrency`` workers each calling ``chat()``:

* A request waiting for its retry keeps its slot. It goes at once to an
  endpoint that is not resting; when every endpoint rests it waits for its
  own backoff (or the server's ``Retry-After``), then goes to the endpoint
  whose rest ends first. It fails with its last error when its attempts
  (one per endpoint plus ``max_retries``) are spent, or when its next chance
  would come after its deadline (``timeout_ms`` from its first attempt).
* An endpoint's rest is the server's ``Retry-After``, else the capped,
  jittered backoff of its consecutive failures — counting one failure per
  probe: requests that were already in flight when it failed do not lengthen
  the rest. An answer ends the rest, and the requests waiting to go back to
  that endpoint go at once (a loading server is used as soon as it answers).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Deque, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Union

from ._log import log
from .config import ModelConfig, endpoint_configs, mask_url
from .decoder import StreamDecoder, StreamResult
from .engine import DEFAULT_MAX_DELAY_MS, AsyncEngine, Engine, SyncEngine, Transfer, check_max_delay
from .errors import BrokerError, ConfigError, TransportError
from .policy import backoff_s, encode_chat_body, retriable, retry_after_s

if TYPE_CHECKING:
    import asyncio

__all__ = ["MapResult", "Fanout"]


_RESULT_FIELDS = [f.name for f in dataclasses.fields(StreamResult)]


@dataclass
class MapResult(StreamResult):
    """One request's outcome in ``Broker.map``/``amap``.

    ``index`` is its position in the input, ``text`` the reply (the part that
    arrived, when it failed mid-way; the first choice's, with ``n > 1``),
    ``error`` ``None`` on success or the
    :class:`BrokerError`, ``endpoint`` the base URL that answered (or failed
    last; ``user:pass@`` in it masked as ``***@``); the :class:`StreamResult`
    fields come along.
    """

    index: int = -1
    text: str = ""
    error: Optional[BaseException] = None
    endpoint: Optional[str] = None

    @property
    def ok(self) -> bool:
        """True when the request succeeded."""
        return self.error is None


class _Endpoint:
    __slots__ = ("cfg", "outstanding", "rest_until", "fails", "order", "failed_at")

    def __init__(self, cfg: ModelConfig, order: int) -> None:
        self.cfg = cfg
        self.outstanding = 0
        self.rest_until = 0.0
        self.fails = 0  # consecutive failed probes
        self.order = order
        self.failed_at = float("-inf")  # when the last counted failure came

    def rest(self, started: float, now: float, asked: Optional[float]) -> None:
        """Rest after a failure of a request started at ``started``."""
        if started < self.failed_at:
            # It was in flight when this endpoint last failed: the same outage,
            # already counted. Only a longer Retry-After extends the rest.
            if asked is not None and asked > 0:
                self.rest_until = max(self.rest_until, now + asked)
            return
        self.fails += 1
        self.failed_at = now
        self.rest_until = now + (asked if asked is not None and asked > 0 else backoff_s(self.cfg, self.fails))


class _Item:
    __slots__ = ("index", "messages", "params", "attempts", "retry_at", "deadline", "error", "last_ep")

    def __init__(self, index: int, messages: Any, params: Mapping[str, Any]) -> None:
        self.index = index
        self.messages = messages
        self.params = params
        self.attempts = 0
        self.retry_at = 0.0  # its own backoff: before it, only to another endpoint that is not resting
        self.deadline = float("inf")  # timeout_ms from its first attempt
        self.error: Optional[BaseException] = None  # the last error, while it waits
        self.last_ep: Optional[_Endpoint] = None  # where it failed last


class _Progress:
    """A one-line progress bar on a terminal's stderr; silent elsewhere."""

    def __init__(self, enabled: Optional[bool], total: Optional[int]) -> None:
        stream = sys.stderr
        self.on = enabled is not False and hasattr(stream, "isatty") and stream.isatty()
        self.total = total
        self.t0 = time.monotonic()
        self.last = 0.0
        self.shown = False

    def update(self, done: int, failed: int, in_flight: int, *, final: bool = False) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(
            f"\r[llama_broker] {done}{of} done, {failed} failed, {in_flight} in flight, {rate:.1f}/s "
        )
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()
        self.shown = True


class Fanout:
    """The state of one ``map``/``amap`` run (see the module docstring)."""

    def __init__(
        self,
        requests: Iterable[Mapping[str, Any]],
        *,
        concurrency: int,
        endpoints: Optional[Sequence[Union[str, ModelConfig]]],
        cfg: Optional[ModelConfig],
        progress: Optional[bool],
        max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
    ) -> None:
        #: the latency budget of every request (see ``engine.check_max_delay``)
        self.max_delay_ms = check_max_delay(max_delay_ms)
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"map: concurrency must be a positive int, got {concurrency!r}")
        self.concurrency = concurrency
        self.eps = [_Endpoint(c, i) for i, c in enumerate(endpoint_configs(endpoints, cfg))]
        try:
            total: Optional[int] = len(requests)  # type: ignore[arg-type]
        except TypeError:
            total = None
        self._iter = iter(requests)
        self._next_index = 0
        self._exhausted = False
        self._requeue: Deque[_Item] = deque()
        self._ready: Deque[MapResult] = deque()
        self._live: Set[Transfer] = set()
        self._rr = 0
        self.done = 0
        self.failed = 0
        self._progress = _Progress(progress, total)
        self._wakeup: Optional["asyncio.Future[None]"] = None
        # A request may be tried once per endpoint and then max_retries more.
        self._max_attempts = len(self.eps) + max(e.cfg.max_retries for e in self.eps)

    # -- scheduling ------------------------------------------------------------------
    def _next_item(self) -> Optional[_Item]:
        while not self._exhausted:
            try:
                req = next(self._iter)
            except StopIteration:
                self._exhausted = True
                return None
            index = self._next_index
            self._next_index += 1
            if not isinstance(req, Mapping) or "messages" not in req:
                self._emit(MapResult(index=index, error=ConfigError(f"requests[{index}] must be a dict with 'messages'")))
                continue
            params = {k: v for k, v in req.items() if k != "messages"}
            return _Item(index, req["messages"], params)
        return None

    def _pick(self, now: float, item: _Item) -> Optional[_Endpoint]:
        """The endpoint for ``item`` now, or None while it must wait."""
        best = None
        n = len(self.eps)
        waiting = now < item.retry_at  # not back to where it just failed before its backoff
        for k in range(n):  # least outstanding; ties go round-robin
            ep = self.eps[(self._rr + k) % n]
            if ep.rest_until > now or (waiting and ep is item.last_ep):
                continue
            if best is None or ep.outstanding < best.outstanding:
                best = ep
        if best is None:  # every endpoint rests: the request's own backoff decides
            if waiting:
                return None
            best = min(self.eps, key=lambda e: (e.rest_until, e.outstanding, e.order))
        self._rr = (best.order + 1) % n
        return best

    def _earliest_start(self, item: _Item, now: float) -> float:
        """When ``item`` may go next (see :meth:`_pick`)."""
        t = item.retry_at
        for ep in self.eps:
            if ep is not item.last_ep and ep.rest_until < t:
                t = ep.rest_until
        return max(t, now)

    def fill(self, engine: Engine) -> None:
        """Start due retries, then new requests while fewer than ``concurrency``
        are in flight or waiting for their retry."""
        now = time.monotonic()
        for item in list(self._requeue):
            if now >= item.deadline:  # its deadline came while it waited
                self._requeue.remove(item)
                ep_url = item.last_ep.cfg.base_url if item.last_ep is not None else None
                self._emit(MapResult(index=item.index, error=item.error, endpoint=ep_url, retries=item.attempts - 1))
                continue
            ep = self._pick(now, item)
            if ep is not None:
                self._requeue.remove(item)
                self._start(engine, item, ep)
        while len(self._live) + len(self._requeue) < self.concurrency:
            new = self._next_item()
            if new is None:
                return
            ep = self._pick(now, new)
            if ep is None:  # pragma: no cover - a new request may always go
                self._requeue.append(new)
                continue
            self._start(engine, new, ep)

    def _start(self, engine: Engine, item: _Item, ep: _Endpoint) -> None:
        cfg = ep.cfg
        parts: List[str] = []
        try:
            body = encode_chat_body(cfg, item.messages, item.params)
        except ConfigError as err:
            self._emit(MapResult(index=item.index, error=err, endpoint=mask_url(cfg.base_url)))
            return

        def make_decoder(t0: float) -> StreamDecoder:
            del parts[:]
            return StreamDecoder(parts.append, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes)

        now = time.monotonic()
        if item.attempts == 0:
            item.deadline = now + cfg.timeout_ms / 1000.0
        t = Transfer(
            cfg,
            body,
            make_decoder,
            on_done=self._on_done,
            retry=False,
            tag=(item, ep, parts, now),
            max_delay_ms=self.max_delay_ms,
        )
        t.deadline = min(t.deadline, item.deadline)  # timeout_ms bounds the request, retries included
        item.attempts += 1
        ep.outstanding += 1
        self._live.add(t)
        try:
            engine.start(t)
        except BrokerError as err:
            self._live.discard(t)
            ep.outstanding -= 1
            self._emit(MapResult(index=item.index, error=err, endpoint=mask_url(cfg.base_url)))

    def _on_done(self, t: Transfer) -> None:
        item, ep, parts, started = t.tag
        self._live.discard(t)
        ep.outstanding -= 1
        err = t.error
        if err is None:
            ep.fails = 0
            ep.rest_until = 0.0  # it answers again: so may the requests waiting for it
            for waiting in self._requeue:
                if waiting.last_ep is ep:
                    waiting.retry_at = 0.0
        elif isinstance(err, BrokerError) and retriable(err, t.delivered) and item.attempts < self._max_attempts:
            now = time.monotonic()
            asked = retry_after_s(err)
            ep.rest(started, now, asked)
            wait = asked if asked is not None and asked > 0 else backoff_s(ep.cfg, item.attempts)
            item.retry_at = now + wait
            if self._earliest_start(item, now) < item.deadline:
                item.error, item.last_ep = err, ep
                log.warning(
                    "map: request %d failed on %s (%s); endpoint rested %.2fs, request requeued",
                    item.index,
                    mask_url(ep.cfg.base_url),
                    err,
                    max(0.0, ep.rest_until - now),
                )
                self._requeue.append(item)
                self._wake()
                return
            # its next chance would come after its deadline: it ends with this error
        res = t.result if t.result is not None else (t.decoder.result if t.decoder is not None else StreamResult())
        fields = {name: getattr(res, name) for name in _RESULT_FIELDS}
        fields["retries"] = item.attempts - 1
        self._emit(MapResult(index=item.index, text="".join(parts), error=err, endpoint=mask_url(ep.cfg.base_url), **fields))

    def _emit(self, r: MapResult) -> None:
        self.done += 1
        if r.error is not None:
            self.failed += 1
        self._ready.append(r)
        self._progress.update(self.done, self.failed, len(self._live))
        self._wake()

    def _wake(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def finished(self) -> bool:
        """Every request was read, sent and answered, and every result handed out."""
        return self._exhausted and not self._requeue and not self._live and not self._ready

    def _wait_hint(self) -> float:
        """Seconds until a waiting request may go (or reaches its deadline); 1.0 if none waits."""
        if not self._requeue:
            return 1.0
        now = time.monotonic()
        soonest = min(min(self._earliest_start(item, now), item.deadline) for item in self._requeue)
        return max(0.0, min(1.0, soonest - now))

    def _cut_all(self, engine: Engine) -> None:
        for t in list(self._live):
            engine.cut(t)
        self._live.clear()
        if self._progress.shown:
            self._progress.update(self.done, self.failed, 0, final=True)  # the last line, and a newline

    # -- drivers --------------------------------------------------------------------
    def run_sync(self, engine: SyncEngine) -> Iterator[MapResult]:
        """Yield results as they complete, driving ``engine`` between them."""
        ready = self._ready
        try:
            while True:
                if not engine.closed:
                    self.fill(engine)
                while ready:
                    yield ready.popleft()
                    if not engine.closed:
                        self.fill(engine)
                if self.finished:
                    return
                if engine.closed:
                    # the requests in flight came out above, each with its error
                    raise TransportError("the Broker was closed during map(): the requests not yet sent were dropped")
                engine.drive(lambda: bool(ready), max_wait=self._wait_hint())
        finally:
            self._cut_all(engine)

    async def run_async(self, get_engine: Callable[[], AsyncEngine]) -> AsyncIterator[MapResult]:
        """Async twin of :meth:`run_sync` on the running loop (bound on the
        first iteration, so the generator may be made before the loop runs)."""
        engine = get_engine()
        loop = engine.loop
        ready = self._ready
        try:
            while True:
                engine.check_open()  # Broker.close() ends the run (not one error per request left)
                self.fill(engine)
                while ready:
                    yield ready.popleft()
                    engine.check_open()
                    self.fill(engine)
                if self.finished:
                    return
                self._wakeup = fut = loop.create_future()
                timer = loop.call_later(self._wait_hint(), self._wake) if self._requeue else None
                try:
                    await fut
                finally:
                    self._wakeup = None
                    if timer is not None:
                        timer.cancel()
        finally:
            self._cut_all(engine)
