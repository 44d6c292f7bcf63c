"""Batch jobs in the OpenAI Batch file format, run locally against any number
of OpenAI-compatible servers.

Input (JSONL, one request a line)::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...]}}

``url`` is ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` or
``/v1/rerank``. Output (JSONL, one line per request, in completion order)::

    {"id": "batch_req_…", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "req_…", "body": {…chat.completion…}},
     "error": null}

A failed request's line has ``error: {"code", "message"}`` and, when the server
answered with an HTTP error, ``response`` with that status and the server's body.

* The input is validated before anything is sent (every bad line is reported
  with its number), and streamed: memory holds the set of ids and what is in
  flight, whatever the file's size.
* Results are appended as whole lines, one ``write`` each, ``fsync``'d at least
  every second and at the end. Running the same command again skips every
  ``custom_id`` already in the output (and the errors file), repairs a torn
  last line, and completes the rest.
* Ctrl-C stops sending and lets the requests in flight finish (a second
  Ctrl-C abandons them); everything complete is written and the run ends with
  :class:`BatchInterrupted` (the command exits 130).

:func:`run_batch` runs a file, :func:`iter_batch` in-memory requests,
:func:`batch_command` is ``llama-broker batch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, TextIO, Tuple, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock against a second run
    fcntl = None  # type: ignore[assignment]

from ._log import log
from .broker import Broker
from .config import ModelConfig, endpoint_configs
from .engine import DEFAULT_MAX_DELAY_MS
from .errors import APIError, ConfigError
from .jobs import KINDS, Job, JobResult, JobRunner, error_code

__all__ = [
    "BatchInputError",
    "BatchInterrupted",
    "BatchSummary",
    "batch_command",
    "add_parser",
    "iter_batch",
    "run_batch",
    "validate_file",
    "validate_request",
]


#: the body field each url needs
_REQUIRED = {
    "/v1/chat/completions": ("messages", list),
    "/v1/completions": ("prompt", None),
    "/v1/embeddings": ("input", None),
    "/v1/rerank": ("query", None),
}
#: seconds between two fsyncs of the output while lines are written
FSYNC_EVERY_S = 1.0
#: the batch default for a whole request (a long generation needs more than a chat's 60 s)
DEFAULT_TIMEOUT_S = 600.0


class BatchInputError(ConfigError):
    """The input has bad lines; ``problems`` is every ``(line_number, message)``."""

    def __init__(self, problems: List[Tuple[int, str]], source: str = "input", n_bad: Optional[int] = None) -> None:
        self.problems = problems
        self.source = source
        #: every bad line (``problems`` keeps the first 100,000)
        self.n_bad = len(problems) if n_bad is None else n_bad
        first = "; ".join(f"line {n}: {m}" for n, m in problems[:3])
        more = f" (and {self.n_bad - 3} more)" if self.n_bad > 3 else ""
        super().__init__(f"{source}: {self.n_bad} bad line(s): {first}{more}; nothing was sent")


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the run early; ``summary`` tells what was done (everything
    complete is written: run again to finish)."""

    def __init__(self, summary: "BatchSummary") -> None:
        super().__init__("batch interrupted")
        self.summary = summary


# =============================================================================
# validation
# =============================================================================


def validate_request(obj: Any) -> Optional[str]:
    """What is wrong with one parsed input line, or None."""
    if not isinstance(obj, dict):
        return f"not a JSON object (a {type(obj).__name__})"
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return "no custom_id (a non-empty string)" if cid is None else f"custom_id must be a non-empty string, got {cid!r}"
    method = obj.get("method", "POST")
    if method != "POST":
        return f"unsupported method {method!r} (only POST)"
    url = obj.get("url")
    if url not in KINDS:
        return f"unsupported url {url!r} (supported: {', '.join(KINDS)})"
    body = obj.get("body")
    if not isinstance(body, dict):
        return "body must be a JSON object"
    field, typ = _REQUIRED[url]
    if field not in body or (typ is not None and not isinstance(body[field], typ)):
        return f"body.{field} is missing or not a {typ.__name__ if typ else 'value'} (needed by {url})"
    if url == "/v1/rerank" and not isinstance(body.get("documents"), list):
        return "body.documents must be a list (needed by /v1/rerank)"
    return None


def _loads_line(raw: bytes) -> Any:
    return json.loads(raw)


def validate_file(
    path: str, on_problem: Optional[Callable[[int, str], None]] = None, *, max_kept: int = 100_000
) -> int:
    """Check every line of the input file (streamed); returns the number of
    requests. Raises :class:`BatchInputError` with every bad line (the first
    ``max_kept`` kept in ``problems``; ``on_problem(line, message)`` sees all of
    them as they are found). Blank lines are allowed and skipped."""
    seen: Set[str] = set()
    problems: List[Tuple[int, str]] = []
    n_bad = 0
    count = 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConfigError(f"cannot read the input {path!r}: {e.strerror or e}") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            msg: Optional[str]
            try:
                obj = _loads_line(raw)
            except ValueError as e:
                msg = f"not JSON ({e})"
            else:
                msg = validate_request(obj)
                if msg is None:
                    cid = obj["custom_id"]
                    if cid in seen:
                        msg = f"custom_id {cid!r} repeats an earlier line's"
                    else:
                        seen.add(cid)
            if msg is not None:
                n_bad += 1
                if len(problems) < max_kept:
                    problems.append((lineno, msg))
                if on_problem is not None:
                    on_problem(lineno, msg)
            else:
                count += 1
    if n_bad:
        raise BatchInputError(problems, source=path, n_bad=n_bad)
    return count


# =============================================================================
# output: whole lines, appended; resume
# =============================================================================


class _LineWriter:
    """Appends whole lines: one ``write`` per line, ``fsync`` at most every second."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(self.fd)
                raise ConfigError(f"{path!r} is being written by another run (it holds the file's lock)") from e
        self.last_sync = time.monotonic()
        self.dirty = False

    def write(self, line: bytes) -> None:
        view = memoryview(line)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.dirty = True
        self.maybe_sync()

    def maybe_sync(self) -> None:
        if self.dirty and time.monotonic() - self.last_sync >= FSYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False
        self.last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self.fd)
                self.fd = -1


def scan_output(path: str, done: Set[str]) -> Tuple[int, int, int]:
    """Add the custom_ids of ``path``'s lines to ``done``; cut a torn last line off.

    Returns ``(lines, failed_lines, torn_bytes_removed)``. A bad line that is
    not the last one raises :class:`BatchInputError` (the file is not ours to fix)."""
    if not os.path.exists(path):
        return 0, 0, 0
    lines = failed = 0
    good_end = 0
    bad: Optional[Tuple[int, str]] = None
    with open(path, "rb") as f:
        pos = 0
        for lineno, raw in enumerate(f, 1):
            end = pos + len(raw)
            problem: Optional[str] = None
            if bad is not None:  # a bad line followed by more: not a torn tail
                raise BatchInputError([bad], source=path)
            if not raw.endswith(b"\n"):
                problem = "torn (no line end)"
            else:
                try:
                    obj = json.loads(raw)
                except ValueError:
                    problem = "not JSON"
                else:
                    cid = obj.get("custom_id") if isinstance(obj, dict) else None
                    if not isinstance(cid, str):
                        problem = "not a batch output line (no custom_id)"
                    else:
                        done.add(cid)
                        lines += 1
                        if obj.get("error") is not None:
                            failed += 1
            if problem is not None:
                bad = (lineno, problem)
            else:
                good_end = end
            pos = end
        size = pos
    torn = size - good_end
    if torn:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        log.warning("%s: removed a torn last line (%d bytes)", path, torn)
    return lines, failed, torn


def _http_body(err: APIError) -> Any:
    raw = err.body
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


_LINE_PREFIX = "batch_req_" + uuid.uuid4().hex[:16]
_line_numbers = itertools.count()


def output_line(r: JobResult) -> Dict[str, Any]:
    """The OpenAI Batch output object for one result (``id``: unique per process
    and line, a random prefix and a counter)."""
    out: Dict[str, Any] = {"id": f"{_LINE_PREFIX}{next(_line_numbers):08x}", "custom_id": r.key}
    err = r.error
    if err is None:
        out["response"] = {"status_code": r.status or 200, "request_id": r.request_id, "body": r.body}
        out["error"] = None
        return out
    if isinstance(err, APIError) and err.status is not None:
        out["response"] = {"status_code": err.status, "request_id": r.request_id, "body": _http_body(err)}
    else:
        out["response"] = None
    out["error"] = {"code": error_code(err), "message": str(err)}
    return out


def _dumps(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


# =============================================================================
# summary and progress
# =============================================================================


class _LatencyHistogram:
    """Log-spaced buckets (2 % wide): constant memory, percentiles within 2 %."""

    _STEP = math.log(1.02)

    def __init__(self) -> None:
        self.counts: Dict[int, int] = {}
        self.n = 0

    def add(self, seconds: float) -> None:
        k = int(math.log(max(seconds, 1e-6)) / self._STEP)
        self.counts[k] = self.counts.get(k, 0) + 1
        self.n += 1

    def percentile(self, p: float) -> Optional[float]:
        if not self.n:
            return None
        want = p / 100.0 * self.n
        seen = 0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if seen >= want:
                return math.exp((k + 0.5) * self._STEP)
        return None  # pragma: no cover


@dataclasses.dataclass
class BatchSummary:
    """What a run did. ``failed_by_code`` counts failures by error code
    (``connection_error``, ``timeout``, ``http_400`` or the server's error type …)."""

    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    failed_by_code: Dict[str, int] = dataclasses.field(default_factory=dict)
    previously_failed: int = 0
    not_done: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    latency_p50_s: Optional[float] = None
    latency_p95_s: Optional[float] = None
    latency_p99_s: Optional[float] = None
    interrupted: bool = False

    @property
    def requests_per_s(self) -> float:
        """Finished requests (ok or failed) per second of ``elapsed_s``; 0.0 before any time passed."""
        return (self.ok + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens per second of ``elapsed_s``; 0.0 before any time passed."""
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 all ok, 1 some requests failed, 130 interrupted."""
        if self.interrupted:
            return 130
        return 1 if (self.failed or self.previously_failed) else 0

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a dict, plus ``requests_per_s``, ``tokens_per_s`` and ``exit_code``."""
        d = dataclasses.asdict(self)
        d["requests_per_s"] = self.requests_per_s
        d["tokens_per_s"] = self.tokens_per_s
        d["exit_code"] = self.exit_code
        return d

    def format(self) -> str:
        """A few human lines for stderr."""

        def ms(v: Optional[float]) -> str:
            return "-" if v is None else f"{v * 1000:.0f} ms"

        lines = [
            f"batch {'interrupted' if self.interrupted else 'done'}: {self.ok} ok, {self.failed} failed"
            + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.failed_by_code.items()))})" if self.failed_by_code else "")
            + f", {self.skipped} already done, {self.not_done} not done, of {self.total}"
            + (f"; {self.previously_failed} failed in an earlier run" if self.previously_failed else ""),
            f"  {self.elapsed_s:.1f} s, {self.requests_per_s:.1f} requests/s, {self.retries} retries",
            f"  tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion, {self.tokens_per_s:.1f} tokens/s",
            f"  latency: p50 {ms(self.latency_p50_s)}, p95 {ms(self.latency_p95_s)}, p99 {ms(self.latency_p99_s)}",
        ]
        if self.interrupted:
            lines.append("  run the same command again to complete the rest")
        return "\n".join(lines)


class _Stats:
    def __init__(self, total: int, skipped: int, previously_failed: int) -> None:
        self.s = BatchSummary(total=total, skipped=skipped, previously_failed=previously_failed)
        self.hist = _LatencyHistogram()
        self.t0 = time.monotonic()

    def add(self, r: JobResult) -> None:
        s = self.s
        if r.error is None:
            s.ok += 1
            usage = r.body.get("usage") if isinstance(r.body, dict) else None
            if isinstance(usage, dict):
                pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
                if isinstance(pt, int):
                    s.prompt_tokens += pt
                if isinstance(ct, int):
                    s.completion_tokens += ct
        else:
            s.failed += 1
            code = error_code(r.error)
            s.failed_by_code[code] = s.failed_by_code.get(code, 0) + 1
        s.retries += max(0, r.attempts - 1)
        self.hist.add(r.latency_s)

    def finish(self, interrupted: bool) -> BatchSummary:
        s = self.s
        s.elapsed_s = time.monotonic() - self.t0
        s.latency_p50_s = self.hist.percentile(50)
        s.latency_p95_s = self.hist.percentile(95)
        s.latency_p99_s = self.hist.percentile(99)
        s.not_done = max(0, s.total - s.skipped - s.ok - s.failed)
        s.interrupted = interrupted
        return s


class _Progress:
    """tqdm on a terminal (when installed), a log line every ``interval`` s elsewhere."""

    def __init__(self, enabled: Optional[bool], stats: _Stats, stream: TextIO, interval: float) -> None:
        self.stats = stats
        self.stream = stream
        self.interval = interval
        self.bar: Any = None
        self.on = enabled is not False
        self.last = time.monotonic()
        self.shown = 0
        if not self.on:
            return
        tty = hasattr(stream, "isatty") and stream.isatty()
        if tty and enabled is not False:
            try:
                tqdm: Any = importlib.import_module("tqdm").tqdm
            except ImportError:  # pragma: no cover - the [batch] extra is not installed
                tqdm = None
            if tqdm is not None:
                s = stats.s
                self.bar = tqdm(
                    total=s.total, initial=s.skipped, unit="req", file=stream, dynamic_ncols=True, smoothing=0.1
                )
                self.last = 0.0  # the tokens/errors part shows from the first update

    def update(self, in_flight: int, force: bool = False) -> None:
        if not self.on:
            return
        s = self.stats.s
        now = time.monotonic()
        if self.bar is not None:
            done = s.ok + s.failed
            if done > self.shown:
                self.bar.update(done - self.shown)
                self.shown = done
            if force or now - self.last >= 0.5:
                self.last = now
                el = max(now - self.stats.t0, 1e-9)
                self.bar.set_postfix_str(
                    f"{s.completion_tokens / el:.0f} tok/s, {s.failed} errors, {in_flight} in flight", refresh=False
                )
            return
        if force or now - self.last >= self.interval:
            self.last = now
            el = max(now - self.stats.t0, 1e-9)
            done = s.ok + s.failed
            rate = done / el
            left = s.total - s.skipped - done
            eta = f"{left / rate:.0f} s" if rate > 0 else "?"
            self.stream.write(
                f"batch: {s.skipped + done}/{s.total} done, {rate:.1f} req/s, "
                f"{s.completion_tokens / el:.0f} tok/s, {s.failed} errors, {in_flight} in flight, ETA {eta}\n"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.update(0, force=True)
            self.bar.close()
            self.bar = None


# =============================================================================
# running
# =============================================================================


def _file_jobs(path: str, done: Set[str]) -> Iterator[Job]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = _loads_line(raw)
            except ValueError:
                obj = None
            msg = validate_request(obj)
            if msg is not None:  # the file changed since it was validated
                raise BatchInputError([(lineno, msg)], source=path)
            if obj["custom_id"] in done:
                continue
            yield Job(obj["custom_id"], obj["url"], obj["body"])


def _endpoints(
    endpoints: Sequence[Union[str, ModelConfig]], key_env: Optional[str], timeout_s: Optional[float]
) -> List[ModelConfig]:
    if not endpoints:
        raise ConfigError("batch: at least one endpoint is needed")
    kw: Dict[str, Any] = {"temperature": None, "max_retries": 0}  # the file's bodies go out as they are
    if key_env:
        kw["key_env"] = key_env
    kw["timeout_ms"] = max(1, int((timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S) * 1000))
    return endpoint_configs(endpoints, None, **kw)


class _Interrupts:
    """SIGINT while a run is on: the first stops sending, the second abandons."""

    def __init__(self, runner: JobRunner, enabled: bool) -> None:
        self.runner = runner
        self.count = 0
        self.announced = 0
        self.old: Any = None
        self.installed = False
        if (
            enabled
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self.old = signal.signal(signal.SIGINT, self._on_sigint)
            self.installed = True

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Only flags here: the handler may run inside a curl callback or a write.
        self.count += 1
        if self.count == 1:
            self.runner.stop()
        else:
            self.runner.abandoned = True

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.old)
            self.installed = False


def run_batch(
    input_path: str,
    output_path: str,
    *,
    endpoints: Sequence[Union[str, ModelConfig]],
    concurrency: int = 8,
    key_env: Optional[str] = None,
    max_retries: int = 2,
    errors_path: Optional[str] = None,
    progress: Optional[bool] = None,
    progress_interval: float = 10.0,
    summary_path: Optional[str] = None,
    timeout_s: Optional[float] = None,
    broker: Optional[Broker] = None,
    handle_sigint: bool = True,
    log_stream: Optional[TextIO] = None,
    on_problem: Optional[Callable[[int, str], None]] = None,
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
) -> BatchSummary:
    """Run the batch file ``input_path`` into ``output_path`` (see the module docstring).

    ``endpoints`` are base URLs (or ModelConfigs); ``key_env`` names the
    environment variable with the API key; a request is tried at most
    ``len(endpoints) + max_retries`` times. With ``errors_path`` failed
    requests go there instead of the output. ``progress``: None shows a bar
    on a terminal and a log line every ``progress_interval`` s elsewhere
    (``log_stream``, default stderr), False nothing. ``summary_path`` gets the
    :class:`BatchSummary` as JSON. ``timeout_s`` bounds one request (600 s).
    ``max_delay_ms`` is the engines' latency budget (default 10 ms: tokens may
    wait that long in the kernel, so one wake-up reads every ready stream).

    Raises :class:`BatchInputError` (nothing sent, nothing written) for a bad
    file, :class:`BatchInterrupted` after Ctrl-C (``handle_sigint``, main
    thread only). Returns the :class:`BatchSummary`.
    """
    stream = log_stream if log_stream is not None else sys.stderr
    cfgs = _endpoints(endpoints, key_env, timeout_s)
    total = validate_file(input_path, on_problem)
    # The writers first: their lock keeps a second run off the same files.
    out = _open_writer(output_path)
    err_out: Optional[_LineWriter] = None
    prev_failed = 0
    try:
        err_out = _open_writer(errors_path) if errors_path else None
        done: Set[str] = set()
        for path in (output_path, errors_path):
            if not path:
                continue
            _, failed, torn = scan_output(path, done)
            prev_failed += failed
            if torn:
                stream.write(f"{path}: removed a torn last line ({torn} bytes); its request runs again\n")
        # ids in the output that are not in the input do not count as skipped
        stats = _Stats(total, _count_done(input_path, done) if done else 0, prev_failed)
        if stats.s.skipped:
            stream.write(f"resuming: {stats.s.skipped} of {total} requests already done\n")
            stream.flush()
    except BaseException:
        out.close()
        if err_out is not None:
            err_out.close()
        raise
    runner = JobRunner(
        _file_jobs(input_path, done),
        endpoints=cfgs,
        concurrency=concurrency,
        max_retries=max_retries,
        max_delay_ms=max_delay_ms,
    )
    own = broker is None
    b = broker if broker is not None else Broker(pool_size=max(32, concurrency))
    prog = _Progress(progress, stats, stream, progress_interval)
    intr = _Interrupts(runner, handle_sigint)
    summary: Optional[BatchSummary] = None

    def tick() -> None:
        out.maybe_sync()
        if err_out is not None:
            err_out.maybe_sync()
        if intr.count > intr.announced:
            intr.announced = intr.count
            msg = (
                f"\nstopping: no new requests; waiting for {runner.in_flight} in flight (Ctrl-C again to abandon them)\n"
                if intr.count == 1
                else f"\nabandoning {runner.in_flight} request(s) in flight\n"
            )
            if prog.bar is not None:
                prog.bar.write(msg.strip(), file=stream)
            else:
                stream.write(msg)
                stream.flush()
        prog.update(runner.in_flight)

    try:
        for r in runner.run_sync(b.sync_engine(), tick=tick):
            line = _dumps(output_line(r))
            (err_out if (r.error is not None and err_out is not None) else out).write(line)
            stats.add(r)
            prog.update(runner.in_flight)
        summary = stats.finish(runner.stopping)
    finally:
        intr.restore()
        prog.close()
        out.close()
        if err_out is not None:
            err_out.close()
        if own:
            b.close()
        if summary is None:  # unwinding from an exception
            summary = stats.finish(True)
        if summary_path:
            with open(summary_path, "w", encoding="utf-8") as f:
                json.dump(summary.to_dict(), f, indent=2)
                f.write("\n")
    if summary.interrupted:
        raise BatchInterrupted(summary)
    return summary


def _open_writer(path: str) -> _LineWriter:
    try:
        return _LineWriter(path)
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"cannot write {path!r}: {e.strerror or e}") from e


def _count_done(input_path: str, done: Set[str]) -> int:
    """How many of the input's requests are in ``done`` (one more streamed pass)."""
    n = 0
    with open(input_path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                obj = _loads_line(raw)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("custom_id") in done:
                n += 1
    return n


def iter_batch(
    requests: Iterable[Mapping[str, Any]],
    *,
    endpoints: Sequence[Union[str, ModelConfig]],
    concurrency: int = 8,
    key_env: Optional[str] = None,
    max_retries: int = 2,
    timeout_s: Optional[float] = None,
    broker: Optional[Broker] = None,
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
) -> Iterator[Dict[str, Any]]:
    """Run in-memory batch requests (dicts in the input line format); yields
    each output object (as :func:`run_batch` writes them) as it completes.

    A list is validated whole first (:class:`BatchInputError` with every bad
    item, numbered from 1, before anything is sent); items of any other
    iterable are checked as they are pulled, and a bad one raises then.
    """
    cfgs = _endpoints(endpoints, key_env, timeout_s)
    if isinstance(requests, Sequence):
        problems: List[Tuple[int, str]] = []
        seen: Set[str] = set()
        for i, obj in enumerate(requests, 1):
            msg = validate_request(obj)
            if msg is None:
                if obj["custom_id"] in seen:
                    msg = f"custom_id {obj['custom_id']!r} repeats an earlier item's"
                seen.add(obj["custom_id"])
            if msg is not None:
                problems.append((i, msg))
        if problems:
            raise BatchInputError(problems, source="requests")

    def jobs() -> Iterator[Job]:
        seen: Set[str] = set()
        for i, obj in enumerate(requests, 1):
            msg = validate_request(obj)
            if msg is None and obj["custom_id"] in seen:
                msg = f"custom_id {obj['custom_id']!r} repeats an earlier item's"
            if msg is not None:
                raise BatchInputError([(i, msg)], source="requests")
            seen.add(obj["custom_id"])
            yield Job(obj["custom_id"], obj["url"], obj["body"])

    runner = JobRunner(
        jobs(), endpoints=cfgs, concurrency=concurrency, max_retries=max_retries, max_delay_ms=max_delay_ms
    )
    own = broker is None
    b = broker if broker is not None else Broker(pool_size=max(32, concurrency))
    try:
        for r in runner.run_sync(b.sync_engine()):
            yield output_line(r)
    finally:
        if own:
            b.close()


# =============================================================================
# the command
# =============================================================================


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``batch`` to ``llama-broker``'s subcommands."""
    p = sub.add_parser(
        "batch",
        help="run an OpenAI Batch JSONL file against one or more servers",
        description="Run an OpenAI Batch input file (JSONL) against OpenAI-compatible servers. "
        "Running the same command again resumes: ids already in the output are skipped.",
    )
    p.add_argument("input", help="the input JSONL file ({custom_id, method, url, body} per line)")
    p.add_argument("-o", "--output", required=True, help="the output JSONL file (appended; resumed)")
    p.add_argument(
        "--endpoint",
        action="append",
        default=None,
        help="server base URL (repeat for several; default $LLAMA_BROKER_ENDPOINT)",
    )
    p.add_argument("--concurrency", "-c", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--key-env", help="environment variable holding the API key (sent as a Bearer token)")
    p.add_argument(
        "--max-retries", type=int, default=2, help="extra tries of a request after a retriable failure (default 2)"
    )
    p.add_argument("--errors", help="write failed requests here instead of the output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--summary", help="write the run's summary here as JSON")
    p.add_argument("--timeout", type=float, default=None, help=f"seconds for one request (default {DEFAULT_TIMEOUT_S:.0f})")
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines off a terminal")
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=DEFAULT_MAX_DELAY_MS,
        help=f"latency budget: tokens may wait this long so one wake-up reads every stream (default {DEFAULT_MAX_DELAY_MS:g})",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="log every retry")
    return p


def batch_command(args: argparse.Namespace, err: TextIO) -> int:
    """``llama-broker batch``: returns the exit code (0 all ok, 1 some requests
    failed, 2 invalid input or usage, 130 interrupted)."""
    logging.getLogger("llama_broker").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    endpoints = args.endpoint or ([os.environ["LLAMA_BROKER_ENDPOINT"]] if os.environ.get("LLAMA_BROKER_ENDPOINT") else [])
    if not endpoints:
        err.write("error: no --endpoint given (and $LLAMA_BROKER_ENDPOINT is not set)\n")
        return 2
    if args.concurrency < 1:
        err.write("error: --concurrency must be at least 1\n")
        return 2
    if args.max_retries < 0:
        err.write("error: --max-retries must be at least 0\n")
        return 2

    def problem(line: int, msg: str) -> None:
        err.write(f"{args.input}:{line}: {msg}\n")

    try:
        summary = run_batch(
            args.input,
            args.output,
            endpoints=endpoints,
            concurrency=args.concurrency,
            key_env=args.key_env,
            max_retries=args.max_retries,
            errors_path=args.errors,
            progress=False if args.no_progress else None,
            progress_interval=args.progress_interval,
            max_delay_ms=args.max_delay_ms,
            summary_path=args.summary,
            timeout_s=args.timeout,
            log_stream=err,
            on_problem=problem,
        )
    except BatchInputError as e:
        if e.source == args.input:  # its lines were listed as they were found
            err.write(f"error: {e.n_bad} bad line(s) in {args.input}; nothing was sent\n")
        else:
            err.write(f"error: {e.message}\n")
        err.flush()
        return 2
    except ConfigError as e:
        err.write(f"error: {e.message}\n")
        err.flush()
        return 2
    except OSError as e:  # the disk is full, the file went away …: what was written stays
        err.write(f"error: {e}\n")
        err.flush()
        return 1
    except BatchInterrupted as e:
        err.write(e.summary.format() + "\n")
        err.flush()
        return 130
    err.write(summary.format() + "\n")
    err.flush()
    return summary.exit_code

