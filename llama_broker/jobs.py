"""Job runs: many requests of any supported kind, fanned out over endpoints,
each result kept whole.

This is the scheduler under :mod:`llama_broker.batch` (the OpenAI Batch file
format) and :func:`llama_broker.embeddings.embed`. A :class:`Job` is one
request: a path (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/rerank``) and its JSON body. :class:`JobRunner`
keeps at most ``concurrency`` of them in flight on a Broker's engine (sync
or asyncio), sends each to the endpoint with the fewest outstanding
requests, rests an endpoint that refuses connections or answers 503 (with
capped exponential backoff), and yields a :class:`JobResult` per job as it
completes.

Chat and text completions are streamed underneath (the fast path) and
assembled into the whole ``chat.completion`` / ``text_completion`` object;
embeddings and rerank are plain JSON requests. Since a result is handed out
only when it is complete, a job may be sent again even after part of its
output arrived: nothing of it reached the caller. :meth:`JobRunner.stop`
stops starting jobs (in-flight ones finish; those that would be retried are
dropped, not failed), :meth:`JobRunner.abandon` cuts them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import uuid
from collections import deque
from typing import Any, AsyncGenerator, Callable, Deque, Dict, Generator, Iterable, List, Optional, Sequence, Set

from ._log import log
from .config import ModelConfig, mask_url
from .decoder import JSONBody, StreamResult
from .engine import DEFAULT_MAX_DELAY_MS, AsyncEngine, Engine, SyncEngine, Transfer, check_max_delay
from .errors import APIError, BrokerError, ConfigError, ConnectError, ProtocolError, TimeoutError_, TLSVerifyError, TransportError
from .chunks import ChunkDecoder
from .replies import ChatAccumulator, TextAccumulator
from .policy import backoff_s, encode_body, retry_after_s


__all__ = ["Job", "JobResult", "JobRunner", "KINDS", "error_code"]


#: path -> kind: "chat" and "text" are streamed and assembled, "json" is a plain JSON request
KINDS: Dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text",
    "/v1/embeddings": "json",
    "/v1/rerank": "json",
}

#: HTTP statuses worth sending again (the server may answer differently next time)
_RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}
#: ... and those that also rest the endpoint (it is overloaded or not ready)
_REST_STATUSES = {429, 502, 503, 504}


class Job:
    """One request: ``key`` is the caller's handle for it (a custom_id, an
    index), ``path`` one of :data:`KINDS`, ``body`` its JSON body (a dict).
    ``stream=False`` sends a chat or text completion non-streamed (``stream:
    false``; the result is the server's own whole object): one wake-up per
    request instead of one per batch of tokens, for callers that need
    nothing before the end."""

    __slots__ = ("key", "path", "body", "kind", "attempts", "t0", "avoid", "stream")

    def __init__(self, key: Any, path: str, body: Dict[str, Any], *, stream: bool = True) -> None:
        kind = KINDS.get(path)
        if kind is None:
            raise ConfigError(f"unsupported path {path!r} (supported: {', '.join(KINDS)})")
        self.key = key
        self.path = path
        self.body = body
        self.kind = kind
        self.attempts = 0
        self.t0: Optional[float] = None
        #: the endpoint this job last failed on (not chosen again while another can take it)
        self.avoid: Any = None
        #: a chat/text completion is streamed underneath (False: one plain JSON answer)
        self.stream = bool(stream)


@dataclasses.dataclass
class JobResult:
    """One job's outcome.

    ``body`` is the whole response object on success (``chat.completion``,
    ``text_completion``, the embeddings list, the rerank results); ``error``
    the final :class:`BrokerError` otherwise, with ``status`` the HTTP status
    when the server answered one. ``latency_s`` runs from the first attempt's
    start to the end, retries included.
    """

    key: Any
    body: Optional[Dict[str, Any]] = None
    error: Optional[BaseException] = None
    status: Optional[int] = None
    attempts: int = 0
    latency_s: float = 0.0
    endpoint: Optional[str] = None
    request_id: str = ""

    @property
    def ok(self) -> bool:
        """True when the job succeeded."""
        return self.error is None


def error_code(err: BaseException) -> str:
    """A short, stable name for the kind of error (the summary groups by it)."""
    if isinstance(err, ConnectError):
        return "connection_error"
    if isinstance(err, TimeoutError_):
        return "timeout"
    if isinstance(err, TransportError):
        return "transport_error"
    if isinstance(err, APIError):
        if err.type:
            return err.type
        return f"http_{err.status}" if err.status is not None else "api_error"
    if isinstance(err, ProtocolError):
        return "protocol_error"
    if isinstance(err, ConfigError):
        return "invalid_request"
    return type(err).__name__


def _retry_kind(err: BaseException) -> int:
    """0: final; 1: send again; 2: send again and rest the endpoint."""
    if isinstance(err, TLSVerifyError):  # the certificate will not pass next time
        return 0
    if isinstance(err, ConnectError):
        return 2
    if isinstance(err, TimeoutError_):
        return 1
    if isinstance(err, TransportError):  # a reset or a stream cut short: nothing was handed out
        return 2 if err.bytes_received == 0 and err.curl_code is not None else 1
    if isinstance(err, APIError) and err.status is not None:
        if err.status in _REST_STATUSES:
            return 2
        return 1 if err.status in _RETRY_STATUSES else 0
    return 0


class _Endpoint:
    __slots__ = ("cfg", "json_cfg", "outstanding", "rest_until", "fails", "order")

    def __init__(self, cfg: ModelConfig, order: int) -> None:
        self.cfg = cfg
        # A non-streamed answer sends no byte until it is complete: no idle
        # timeout there (timeout_ms still bounds it; the transport gives its
        # plain body room, config.MIN_JSON_BODY_BYTES).
        self.json_cfg = dataclasses.replace(cfg, idle_timeout_ms=None)
        self.outstanding = 0
        self.rest_until = 0.0
        self.fails = 0
        self.order = order


def _with_usage(body: Dict[str, Any]) -> Dict[str, Any]:
    if "stream_options" not in body:
        body["stream_options"] = {"include_usage": True}
    return body


class JobRunner:
    """At most ``concurrency`` jobs in flight over ``endpoints`` (see the module
    docstring). A job is tried at most ``len(endpoints) + max_retries`` times.
    ``max_delay_ms`` is the latency budget of the engines (default 10 ms, as
    ``map``): data may wait that long in the kernel so one wake-up reads every
    ready socket."""

    def __init__(
        self,
        jobs: Iterable[Job],
        *,
        endpoints: Sequence[ModelConfig],
        concurrency: int,
        max_retries: int = 2,
        max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be a positive int, got {concurrency!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not endpoints:
            raise ConfigError("no endpoints")
        self.concurrency = concurrency
        #: the latency budget of every transfer (a job's result is handed out whole, so
        #: its tokens may wait in the kernel: see engine.check_max_delay)
        self.max_delay_ms = check_max_delay(max_delay_ms)
        self.eps = [_Endpoint(c, i) for i, c in enumerate(endpoints)]
        self.max_attempts = len(self.eps) + max_retries
        self._iter = iter(jobs)
        self._exhausted = False
        self._requeue: Deque[Job] = deque()
        self._ready: Deque[JobResult] = deque()
        self._live: Set[Transfer] = set()
        self._rr = 0
        self._wakeup: Optional["asyncio.Future[None]"] = None
        # request ids: a random prefix per run and a counter (a uuid per request costs more)
        self._rid = "req_" + uuid.uuid4().hex[:16]
        self._n = itertools.count()
        self.stopping = False
        self.abandoned = False
        #: jobs dropped after stop() (neither finished nor failed: run them again)
        self.dropped = 0
        self.retried = 0

    # -- control ---------------------------------------------------------------------
    def stop(self) -> None:
        """Start no more jobs; those in flight finish (safe to call from a signal handler)."""
        self.stopping = True
        self._wake()

    @property
    def in_flight(self) -> int:
        """The jobs running now (started, no result yet)."""
        return len(self._live)

    # -- scheduling ------------------------------------------------------------------
    def _next_job(self) -> Optional[Job]:
        if self.stopping:
            return None
        if self._requeue:
            return self._requeue.popleft()
        if self._exhausted:
            return None
        try:
            return next(self._iter)
        except StopIteration:
            self._exhausted = True
            return None

    def _pick(self, now: float, avoid: Any = None) -> Optional[_Endpoint]:
        best = None
        n = len(self.eps)
        for k in range(n):  # least outstanding; ties go round-robin
            ep = self.eps[(self._rr + k) % n]
            if ep.rest_until > now or ep is avoid:
                continue
            if best is None or ep.outstanding < best.outstanding:
                best = ep
        if best is None and avoid is not None and avoid.rest_until <= now:
            best = avoid  # the only endpoint that can take it
        if best is not None:
            self._rr = (best.order + 1) % n
        return best

    def fill(self, engine: Engine) -> None:
        """Start jobs until ``concurrency`` are in flight (or none can start)."""
        now = time.monotonic()
        while len(self._live) < self.concurrency:
            if all(ep.rest_until > now for ep in self.eps):  # every endpoint is resting
                return
            job = self._next_job()
            if job is None:
                return
            ep = self._pick(now, job.avoid)
            assert ep is not None
            self._start(engine, job, ep)

    def _start(self, engine: Engine, job: Job, ep: _Endpoint) -> None:
        if job.t0 is None:
            job.t0 = time.monotonic()
        kind = job.kind
        cfg = ep.cfg
        make_decoder: Callable[[float], Any]
        holder: List[Any] = [None]
        whole = kind == "json" or not job.stream
        try:
            if whole:
                cfg = ep.json_cfg
                if kind == "json":
                    data = encode_body(job.body)
                else:  # a completion asked for whole
                    body = dict(job.body)
                    body.pop("stream_options", None)
                    body["stream"] = False
                    data = encode_body(body)

                def make_decoder(t0: float) -> Any:
                    holder[0] = JSONBody(require_object=True)
                    return holder[0]

            else:
                body = dict(job.body)
                body.pop("stream", None)
                body["stream"] = True
                data = encode_body(_with_usage(body))
                acc_cls = ChatAccumulator if kind == "chat" else TextAccumulator

                def make_decoder(t0: float) -> Any:
                    acc = holder[0] = acc_cls()
                    return ChunkDecoder(acc.add, strict=cfg.strict, t0=t0, max_event_bytes=cfg.max_event_bytes)

        except ConfigError as err:
            self._emit(job, None, err, None, ep)
            return
        t = Transfer(
            cfg,
            data,
            make_decoder,
            on_done=self._on_done,
            retry=False,
            url=cfg.base_url + job.path,
            tag=(job, ep, holder),
            streaming=not whole,
            max_delay_ms=self.max_delay_ms,
        )
        job.attempts += 1
        ep.outstanding += 1
        self._live.add(t)
        try:
            engine.start(t)
        except BrokerError as err:
            self._live.discard(t)
            ep.outstanding -= 1
            self._emit(job, None, err, None, ep)

    def _on_done(self, t: Transfer) -> None:
        job, ep, holder = t.tag
        if t not in self._live:  # cut (abandoned): not a result
            return
        self._live.discard(t)
        ep.outstanding -= 1
        err = t.error
        if err is None:
            ep.fails = 0
            res = t.result if t.result is not None else StreamResult()
            acc = holder[0]
            try:
                body = acc.value if (job.kind == "json" or not job.stream) else acc.reply(res).to_openai()
            except BrokerError as e:  # pragma: no cover - decoders raise before this
                err = e
            else:
                self._emit(job, body, None, res.status or 200, ep)
                return
        kind = _retry_kind(err) if isinstance(err, BrokerError) else 0
        if kind and (self.stopping or job.attempts < self.max_attempts):
            if kind == 2:
                ep.fails += 1
                asked = retry_after_s(err)  # the server's Retry-After, else capped backoff with jitter
                delay = asked if asked is not None and asked > 0 else backoff_s(ep.cfg, ep.fails)
                ep.rest_until = time.monotonic() + delay
                log.warning("job %r failed on %s (%s); endpoint rested %.2fs", job.key, mask_url(ep.cfg.base_url), err, delay)
            else:
                log.warning("job %r failed on %s (%s); sent again", job.key, mask_url(ep.cfg.base_url), err)
            if self.stopping:
                self.dropped += 1  # not a result: a later run does it again
            else:
                self.retried += 1
                job.avoid = ep
                self._requeue.appendleft(job)
            self._wake()
            return
        status = getattr(err, "status", None)
        self._emit(job, None, err, status, ep)

    def _emit(
        self,
        job: Job,
        body: Optional[Dict[str, Any]],
        err: Optional[BaseException],
        status: Optional[int],
        ep: _Endpoint,
    ) -> None:
        t0 = job.t0 if job.t0 is not None else time.monotonic()
        self._ready.append(
            JobResult(
                key=job.key,
                body=body,
                error=err,
                status=status,
                attempts=job.attempts,
                latency_s=time.monotonic() - t0,
                endpoint=mask_url(ep.cfg.base_url),
                request_id=f"{self._rid}{next(self._n):08x}",
            )
        )
        self._wake()

    def _wake(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def finished(self) -> bool:
        """No job runs and every result was handed out, and either :meth:`stop` was called or
        every job was read and none waits for a retry."""
        if self._live or self._ready:
            return False
        return self.stopping or (self._exhausted and not self._requeue)

    def _wait_hint(self) -> float:
        """Seconds until a rested endpoint may take work (at most 0.25: the run
        also watches for stop/abandon)."""
        now = time.monotonic()
        rest = min(ep.rest_until for ep in self.eps) - now
        if rest > 0 and len(self._live) < self.concurrency:
            return max(0.0, min(0.25, rest))
        return 0.25

    def abandon(self, engine: Engine) -> None:
        """Cut every job in flight (none of them becomes a result)."""
        self.abandoned = self.stopping = True
        live = list(self._live)
        self._live.clear()
        for t in live:
            engine.cut(t)
            t.tag[1].outstanding -= 1
        self.dropped += len(live)
        self._wake()

    # -- drivers --------------------------------------------------------------------
    def run_sync(
        self, engine: SyncEngine, *, tick: Optional[Callable[[], None]] = None
    ) -> Generator[JobResult, None, None]:
        """Yield results as they complete, driving ``engine`` between them.
        ``tick()`` is called at least every 0.25 s (progress, signals)."""
        ready = self._ready
        try:
            while True:
                self.fill(engine)
                while ready:
                    yield ready.popleft()
                    self.fill(engine)
                if tick is not None:
                    tick()
                if self.abandoned:
                    self.abandon(engine)
                if self.finished:
                    return
                # a signal (Ctrl-C) ends the wait early: the engine's poll() returns on EINTR
                engine.drive(lambda: bool(ready) or self.abandoned, max_wait=self._wait_hint())
        finally:
            if self._live:
                self.abandon(engine)

    async def run_async(
        self, get_engine: Callable[[], AsyncEngine], *, tick: Optional[Callable[[], None]] = None
    ) -> AsyncGenerator[JobResult, None]:
        """Async twin of :meth:`run_sync` on the running loop."""
        engine = get_engine()
        loop = engine.loop
        ready = self._ready
        try:
            while True:
                self.fill(engine)
                while ready:
                    yield ready.popleft()
                    self.fill(engine)
                if tick is not None:
                    tick()
                if self.abandoned:
                    self.abandon(engine)
                if self.finished:
                    return
                self._wakeup = fut = loop.create_future()
                timer = loop.call_later(self._wait_hint(), self._wake)
                try:
                    await fut
                finally:
                    self._wakeup = None
                    timer.cancel()
        finally:
            if self._live:
                self.abandon(engine)
