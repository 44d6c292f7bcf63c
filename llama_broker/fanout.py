"""Batch fan-out: many chat requests, at most N in flight, over several servers.

:class:`Fanout` is the scheduling state shared by ``Broker.map`` (sync, on
the :class:`~llama_broker.engine.SyncEngine`) and ``Broker.amap`` (asyncio,
on the :class:`~llama_broker.engine.AsyncEngine`). Requests go to the
endpoint with the fewest outstanding requests; an endpoint that refuses the
connection, resets before the first byte or answers 503 is rested with
exponential backoff and the request goes back to the front of the queue, to
be sent elsewhere — unless it already streamed output, which is never sent
twice. Other failures end that request only: its result carries the error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Deque, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Union

from .config import ModelConfig
from .decoder import StreamDecoder, StreamResult
from .engine import AsyncEngine, Engine, SyncEngine, Transfer
from .errors import BrokerError, ConfigError, TransportError

__all__ = ["MapResult", "Fanout"]

log = logging.getLogger("llama_broker")

_RESULT_FIELDS = [f.name for f in dataclasses.fields(StreamResult)]


@dataclass
class MapResult(StreamResult):
    """One request's outcome in ``Broker.map``/``amap``.

    ``index`` is its position in the input, ``text`` the reply (the part that
    arrived, when it failed mid-way), ``error`` ``None`` on success or the
    :class:`BrokerError`, ``endpoint`` the base URL that answered (or failed
    last); the :class:`StreamResult` fields come along.
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
    __slots__ = ("cfg", "outstanding", "rest_until", "fails", "order")

    def __init__(self, cfg: ModelConfig, order: int) -> None:
        self.cfg = cfg
        self.outstanding = 0
        self.rest_until = 0.0
        self.fails = 0
        self.order = order


class _Item:
    __slots__ = ("index", "messages", "params", "attempts")

    def __init__(self, index: int, messages: Any, params: Mapping[str, Any]) -> None:
        self.index = index
        self.messages = messages
        self.params = params
        self.attempts = 0


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


def _endpoint_configs(
    endpoints: Optional[Sequence[Union[str, ModelConfig]]], cfg: Optional[ModelConfig]
) -> List[ModelConfig]:
    if not endpoints:
        if cfg is None:
            raise ConfigError("map: no endpoints and no ModelConfig")
        return [cfg]
    out = []
    for i, ep in enumerate(endpoints):
        if isinstance(ep, ModelConfig):
            out.append(ep)
        elif isinstance(ep, str):
            out.append(dataclasses.replace(cfg, endpoint=ep) if cfg is not None else ModelConfig(ep))
        else:
            raise ConfigError(f"map: endpoints[{i}] must be a URL or a ModelConfig, got {type(ep).__name__}")
    return out


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
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"map: concurrency must be a positive int, got {concurrency!r}")
        self.concurrency = concurrency
        self.eps = [_Endpoint(c, i) for i, c in enumerate(_endpoint_configs(endpoints, cfg))]
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
        if self._requeue:
            return self._requeue.popleft()
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

    def _pick(self, now: float) -> Optional[_Endpoint]:
        best = None
        n = len(self.eps)
        for k in range(n):  # least outstanding; ties go round-robin
            ep = self.eps[(self._rr + k) % n]
            if ep.rest_until > now:
                continue
            if best is None or ep.outstanding < best.outstanding:
                best = ep
        if best is not None:
            self._rr = (best.order + 1) % n
        return best

    def fill(self, engine: Engine) -> None:
        """Start requests until ``concurrency`` are in flight (or none can start)."""
        now = time.monotonic()
        while len(self._live) < self.concurrency:
            item = self._next_item()
            if item is None:
                return
            ep = self._pick(now)
            if ep is None:  # every endpoint is resting
                self._requeue.appendleft(item)
                return
            self._start(engine, item, ep)

    def _start(self, engine: Engine, item: _Item, ep: _Endpoint) -> None:
        from .broker import _encode_body

        cfg = ep.cfg
        parts: List[str] = []
        try:
            body = _encode_body(cfg, item.messages, item.params)
        except ConfigError as err:
            self._emit(MapResult(index=item.index, error=err, endpoint=cfg.base_url))
            return

        def make_decoder(t0: float) -> StreamDecoder:
            del parts[:]
            return StreamDecoder(parts.append, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes)

        t = Transfer(cfg, body, make_decoder, on_done=self._on_done, retry=False, tag=(item, ep, parts))
        item.attempts += 1
        ep.outstanding += 1
        self._live.add(t)
        try:
            engine.start(t)
        except BrokerError as err:
            self._live.discard(t)
            ep.outstanding -= 1
            self._emit(MapResult(index=item.index, error=err, endpoint=cfg.base_url))

    def _on_done(self, t: Transfer) -> None:
        from .broker import _backoff_s, _retriable

        item, ep, parts = t.tag
        self._live.discard(t)
        ep.outstanding -= 1
        err = t.error
        if err is None:
            ep.fails = 0
        elif isinstance(err, BrokerError) and _retriable(err, t.delivered) and item.attempts < self._max_attempts:
            ep.fails += 1
            delay = _backoff_s(ep.cfg, ep.fails)
            ep.rest_until = time.monotonic() + delay
            log.warning("map: request %d failed on %s (%s); endpoint rested %.2fs, request requeued", item.index, ep.cfg.base_url, err, delay)
            self._requeue.appendleft(item)
            self._wake()
            return
        res = t.result if t.result is not None else (t.decoder.result if t.decoder is not None else StreamResult())
        fields = {name: getattr(res, name) for name in _RESULT_FIELDS}
        fields["retries"] = item.attempts - 1
        self._emit(MapResult(index=item.index, text="".join(parts), error=err, endpoint=ep.cfg.base_url, **fields))

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
        return self._exhausted and not self._requeue and not self._live and not self._ready

    def _wait_hint(self) -> float:
        """Seconds until a rested endpoint may take queued work (1.0 if nothing waits)."""
        if not self._requeue:
            return 1.0
        now = time.monotonic()
        return max(0.0, min(1.0, min(ep.rest_until for ep in self.eps) - now))

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
                self.fill(engine)
                while ready:
                    yield ready.popleft()
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
