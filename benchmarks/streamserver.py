"""A loopback server that streams llama-server-shaped chat completion chunks.

Built for the benchmarks: raw sockets, one thread per connection (bounded),
``127.0.0.1`` on an ephemeral port, HTTP/1.1 keep-alive, chunked transfer.
It answers ``POST /v1/chat/completions`` (so the OpenAI SDK works with
``base_url=url + "/v1"``) with a stream of ``n`` content events::

    data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],...}
    data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"<token>"}}],...}   (n times)
    data: {"choices":[{"finish_reason":"stop","index":0,"delta":{}}],...}
    data: [DONE]

Tokens are a deterministic mix of words, punctuation, raw non-ASCII, ``\\uXXXX``
escaped non-ASCII and JSON escapes (``\\"``, ``\\n``, ``\\\\``, ``\\t``); the joined
tokens are :attr:`Rendered.content`, so a client's text can be checked by hash
(:attr:`Rendered.sha256`, also sent as the ``X-Bench-Content-Sha256`` header).

The stream is chosen by the request: JSON body fields ``bench_mode`` and
``bench_events`` (the OpenAI SDK passes them with ``extra_body``), or query
parameters ``mode`` and ``n`` (which win). Modes:

``bulk``
    the pre-rendered body, written in 64 KiB chunked-encoding pieces.
``event``
    one chunked write (one ``send``) per event, ``TCP_NODELAY`` on, as fast
    as the server can write (a client that falls behind reads several
    events at once).
``paced``
    like ``event``, one event every ``bench_gap_us`` (query ``gap_us``,
    default 50): a client that keeps up gets one event per read, as from a
    real llama-server. Below 1 ms the connection's thread sleeps after each
    write (Python's sleep adds ~70 us). From 1 ms up (the real regime: a
    token every 5-30 ms) the stream goes to the *pacer*: one thread that
    sends every paced stream's events on an absolute schedule (no drift),
    non-blocking, so hundreds of concurrent streams cost it one wake-up per
    due time, not a thread wake-up per event. ``bench_phase`` (query
    ``phase``) places the stream's ticks: ``spread`` (default: each stream
    starts at its own pseudo-random offset within the gap, so tokens of
    different streams arrive at different times, as from independent
    servers) or ``aligned`` (every stream ticks on one clock grid, as the
    slots of one llama-server that decodes them in a batch).

Responses are rendered once per ``(mode, n)`` and cached (a few at a time), so
serving costs the server little CPU. ``GET /warm?mode=…&n=…`` renders ahead of
time; ``GET /health`` answers ``{"status":"ok"}``; ``GET /stats`` (``?reset=1``
to zero the counters) the server process's CPU seconds and the pacer's
counters: events sent, how late they went out (mean, max, how many over
1 ms), streams in flight. A body with ``"bench_whole": true`` gets the whole
``chat.completion`` as JSON instead of a stream (in ``paced`` mode from 1 ms
up, sent when its last token would have been: ``n`` gaps after the request); ``POST /v1/embeddings``
answers a deterministic vector per input (``bench_dim`` floats), base64 when
asked.

Run it in its own process so that client CPU is measured alone::

    with ServerProcess() as srv:        # python benchmarks/streamserver.py
        srv.warm("bulk", 200_000)
        ... srv.url ...

or in-process (tests, debugging): ``with StreamServer() as srv: ...``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import heapq
import itertools
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections import OrderedDict
from functools import lru_cache
from typing import Sequence, Dict, List, Optional, Tuple

__all__ = [
    "MODES",
    "Rendered",
    "render",
    "tokens",
    "StreamServer",
    "ServerProcess",
]

MODES = ("bulk", "event", "paced")
DEFAULT_GAP_US = 50
MAX_GAP_US = 1_000_000
#: paced streams with a gap from here up go to the pacer thread (below: a sleep per write)
PACER_MIN_GAP_US = 1000
PHASES = ("spread", "aligned")
PIECE = 64 * 1024  # bulk write size
MAX_EVENTS = 5_000_000
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
MAX_CONNECTIONS = 64
CACHE_ENTRIES = 8
IDLE_TIMEOUT_S = 60.0

_HEAD = '{"choices":[{"finish_reason":'
_TAIL = (
    ',"created":1732000000,"id":"chatcmpl-abc123","model":"gemma-3-270m",'
    '"system_fingerprint":"b1234-abcdef","object":"chat.completion.chunk"}'
)
ROLE_PAYLOAD = (_HEAD + 'null,"index":0,"delta":{"role":"assistant","content":null}}]' + _TAIL).encode()
FINISH_PAYLOAD = (_HEAD + '"stop","index":0,"delta":{}}]' + _TAIL).encode()
DONE_EVENT = b"data: [DONE]\n\n"

# Token pools. Picked by a fixed LCG so every process renders the same stream.
_WORDS = (
    " the quick brown fox jumps over lazy dog and a model token stream server of to in is"
    " that it with for as on was llama broker fast Python chunk event byte reply prompt"
).split(" ")[1:]
_WORDS = [" " + w for w in _WORDS] + ["The", "It", "A", "We"]
_PUNCT = [".", ",", "!", "?", ":", ";", " -", " (", ")", "'s", "\u2019"]
_NON_ASCII = [" café", " naïve", " 日本語", " —", " 🙂", " über", " Ωmega", "…", " señor", " Zürich"]
_ESCAPED = [" é", " résumé", " 東京", " ß", " π"]  # sent as \\uXXXX (ensure_ascii)
_JSON_ESC = ['"', "\n", "\n\n", "\\", "\t", ' "quoted"', " C:\\path", "\r\n"]


def tokens(n: int) -> List[Tuple[str, bool]]:
    """``n`` deterministic ``(token, ascii_escaped)`` pairs."""
    out = []
    state = 20241124
    for _ in range(n):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        r = state >> 8
        k = r % 100
        if k < 70:
            out.append((_WORDS[r // 100 % len(_WORDS)], False))
        elif k < 82:
            out.append((_PUNCT[r // 100 % len(_PUNCT)], False))
        elif k < 92:
            out.append((_NON_ASCII[r // 100 % len(_NON_ASCII)], False))
        elif k < 95:
            out.append((_ESCAPED[r // 100 % len(_ESCAPED)], True))
        else:
            out.append((_JSON_ESC[r // 100 % len(_JSON_ESC)], False))
    return out


class Rendered:
    """One rendered stream of ``n`` content events.

    ``payloads``: the JSON of every data event (role, n contents, finish; not
    ``[DONE]``). ``events``: every SSE event as bytes, ``[DONE]`` included.
    ``body``: the SSE body (all events joined). ``content``/``sha256``: the
    text a client must collect.
    """

    __slots__ = ("n", "payloads", "events", "body", "content", "sha256")

    def __init__(self, n: int) -> None:
        if not 0 <= n <= MAX_EVENTS:
            raise ValueError(f"n must be in 0..{MAX_EVENTS}")
        self.n = n
        toks = tokens(n)
        pre = _HEAD + 'null,"index":0,"delta":{"content":'
        post = "}}]" + _TAIL
        cache: Dict[Tuple[str, bool], bytes] = {}
        payloads = [ROLE_PAYLOAD]
        for t in toks:
            p = cache.get(t)
            if p is None:
                p = cache[t] = (pre + json.dumps(t[0], ensure_ascii=t[1]) + post).encode()
            payloads.append(p)
        payloads.append(FINISH_PAYLOAD)
        self.payloads = payloads
        self.events = [b"data: " + p + b"\n\n" for p in payloads] + [DONE_EVENT]
        self.body = b"".join(self.events)
        self.content = "".join(t for t, _ in toks)
        self.sha256 = hashlib.sha256(self.content.encode()).hexdigest()


@lru_cache(maxsize=4)
def render(n: int) -> Rendered:
    """The stream of ``n`` content events (cached per process)."""
    return Rendered(n)


def _chunk(piece: bytes) -> bytes:
    return b"%x\r\n" % len(piece) + piece + b"\r\n"


class _Response:
    """Pre-framed response: header bytes and the list of writes."""

    __slots__ = ("head", "writes", "info")

    def __init__(self, mode: str, n: int) -> None:
        r = render(n)
        if mode == "bulk":
            body = r.body
            writes = [_chunk(body[i : i + PIECE]) for i in range(0, len(body), PIECE)]
        else:
            writes = [_chunk(e) for e in r.events]
        writes.append(b"0\r\n\r\n")
        self.writes = writes
        self.info = {"mode": mode, "events": n, "body_bytes": len(r.body), "sha256": r.sha256}
        self.head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n"
            "Transfer-Encoding: chunked\r\n"
            "Server: llama_broker-bench\r\n"
            f"X-Bench-Writes: {mode}\r\n"
            f"X-Bench-Events: {n}\r\n"
            f"X-Bench-Body-Bytes: {len(r.body)}\r\n"
            f"X-Bench-Content-Sha256: {r.sha256}\r\n"
        ).encode()


def _ticks(head: bytes, writes: List[bytes]) -> List[bytes]:
    """A paced response as one ``send`` per tick.

    ``writes`` are ``[role, content × n, finish, [DONE], terminating chunk]``
    (already chunk-framed). Tick 0 is the headers and the role event, tick
    ``k`` the ``k``-th content event; the last content tick also carries the
    finish event, ``[DONE]`` and the terminating chunk, as llama-server sends
    them right after the last token. So a client that keeps up wakes ``n + 1``
    times for ``n`` tokens.
    """
    n = len(writes) - 4
    if n <= 0:
        return [head + b"".join(writes)]
    ticks = [head + writes[0]] + writes[1 : 1 + n]
    ticks[-1] = ticks[-1] + b"".join(writes[1 + n :])
    return ticks


class _PacedStream:
    """One stream in the pacer's hands: its ticks, its schedule, its connection."""

    __slots__ = ("conn", "ticks", "k", "t0", "base", "gap", "pending", "done", "error", "cancelled")

    def __init__(self, conn: socket.socket, ticks: List[bytes], t0: float, base: float, gap: float) -> None:
        self.conn = conn
        self.ticks = ticks
        self.k = 0  # the next tick to send
        self.t0 = t0  # tick 0 (headers + role) is due then
        self.base = base  # tick 1 (the first token) is due then; tick k at base + (k - 1) * gap
        self.gap = gap
        self.pending = b""  # the part of a tick the socket did not take yet
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self.cancelled = False

    def due(self, k: int) -> float:
        return self.t0 if k == 0 else self.base + (k - 1) * self.gap


class _Pacer:
    """One thread that sends the ticks of every paced stream when they are due.

    A heap of ``(due time, seq, stream)``; the thread sleeps on a condition
    until the earliest due time (or a new stream), sends every due tick with a
    non-blocking ``send``, and pushes each stream back with its next due time.
    The schedule is absolute (tick ``k`` is due at ``base + (k-1)·gap``), so a
    late tick does not shift the ones after it. A socket that does not take a
    whole tick (a client that stopped reading) is retried every millisecond,
    the other streams unaffected.
    """

    RETRY_S = 0.001

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, _PacedStream]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._active = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters (the streams in flight stay)."""
        self.sent = 0
        self.late_sum = 0.0
        self.late_max = 0.0
        self.late_over_1ms = 0
        self.wakeups = 0

    def stats(self) -> dict:
        return {
            "paced_ticks": self.sent,
            "paced_wakeups": self.wakeups,
            "paced_late_mean_us": self.late_sum / self.sent * 1e6 if self.sent else 0.0,
            "paced_late_max_us": self.late_max * 1e6,
            "paced_late_over_1ms": self.late_over_1ms,
            "paced_active": self._active,
        }

    def add(self, st: _PacedStream) -> None:
        with self._cond:
            if self._closed:
                raise OSError("the pacer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="streamserver-pacer", daemon=True)
                self._thread.start()
            self._active += 1
            heapq.heappush(self._heap, (st.due(0), next(self._seq), st))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for _, _, st in self._heap:
                st.error = OSError("server closed")
                st.done.set()
            self._heap.clear()
            self._cond.notify()

    def _finish(self, st: _PacedStream) -> None:
        with self._cond:
            self._active -= 1
        st.done.set()

    def _run(self) -> None:
        heap, cond, seq = self._heap, self._cond, self._seq
        while True:
            with cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        break
                    cond.wait(heap[0][0] - now if heap else None)
                due = []
                while heap and heap[0][0] <= now:
                    due.append(heapq.heappop(heap))
            self.wakeups += 1
            again = []
            for when, _, st in due:
                nxt = self._step(st, when)
                if nxt is not None:
                    again.append((nxt, next(seq), st))
            if again:
                with cond:
                    for item in again:
                        heapq.heappush(heap, item)

    def _step(self, st: _PacedStream, when: float) -> Optional[float]:
        """Send ``st``'s due tick (or the rest of it); its next due time, or None when it is over."""
        if st.cancelled:
            self._finish(st)
            return None
        if st.pending:
            data = st.pending
        else:
            data = st.ticks[st.k]
            late = time.monotonic() - when
            self.sent += 1
            self.late_sum += late
            if late > self.late_max:
                self.late_max = late
            if late > 0.001:
                self.late_over_1ms += 1
        try:
            sent = st.conn.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:  # the client went away
            st.error = e
            self._finish(st)
            return None
        if sent < len(data):
            st.pending = data[sent:]
            return time.monotonic() + self.RETRY_S
        st.pending = b""
        st.k += 1
        if st.k >= len(st.ticks):
            self._finish(st)
            return None
        return st.due(st.k)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large"}


class StreamServer:
    """The server, in this process (a daemon accept thread + one thread per connection)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, max_connections: int = MAX_CONNECTIONS, backlog: int = 128
    ) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(backlog)
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._slots = threading.BoundedSemaphore(max_connections)
        self._cache: "OrderedDict[Tuple[str, int], _Response]" = OrderedDict()
        self._cache_lock = threading.Lock()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._pacer = _Pacer()
        self._streams = itertools.count()  # paced streams started (their phase)
        self.requests = 0

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "StreamServer":
        self._thread = threading.Thread(target=self.serve_forever, name="streamserver", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self._pacer.close()
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "StreamServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_forever(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            self._slots.acquire()
            t = threading.Thread(target=self._serve_conn, args=(conn,), daemon=True)
            t.start()

    # -- responses ---------------------------------------------------------
    def response(self, mode: str, n: int) -> _Response:
        """The cached pre-framed response for ``(mode, n)`` (rendered on first use)."""
        if mode not in MODES:
            raise _BadRequest(400, f"bench_mode must be one of {MODES}, got {mode!r}")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_EVENTS:
            raise _BadRequest(400, f"bench_events must be an int in 0..{MAX_EVENTS}, got {n!r}")
        key = ("bulk" if mode == "bulk" else "event", n)  # paced shares event's writes
        with self._cache_lock:  # render under the lock: one render per key
            resp = self._cache.get(key)
            if resp is None:
                resp = self._cache[key] = _Response(key[0], n)
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            return resp

    # -- one connection ----------------------------------------------------
    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(IDLE_TIMEOUT_S)
            buf = b""
            while not self._closed:
                req, buf = self._read_request(conn, buf)
                if req is None:
                    return
                keep = self._handle(conn, *req)
                if not keep:
                    return
        except (OSError, ConnectionError):
            pass  # client went away (or timed out): nothing to report
        finally:
            try:
                conn.close()
            finally:
                self._slots.release()

    def _read_request(self, conn: socket.socket, buf: bytes):
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEADER_BYTES:
                self._send_error(conn, 431, "request headers too large")
                return None, b""
            data = conn.recv(65536)
            if not data:
                return None, b""
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            self._send_error(conn, 400, "bad request line")
            return None, b""
        headers = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if not sep:
                self._send_error(conn, 400, "bad header line")
                return None, b""
            headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._send_error(conn, 411, "chunked request bodies are not supported")
            return None, b""
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self._send_error(conn, 413, "bad or too large Content-Length")
            return None, b""
        if length and headers.get("expect", "").lower() == "100-continue" and len(rest) < length:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(rest) < length:
            data = conn.recv(65536)
            if not data:
                return None, b""
            rest += data
        body, buf = rest[:length], rest[length:]
        keep = version.upper() == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return (method.upper(), target, body, keep), buf

    def _handle(self, conn: socket.socket, method: str, target: str, body: bytes, keep: bool) -> bool:
        self.requests += 1
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query))
        path = url.path.rstrip("/")
        try:
            if path == "/health":
                return self._send_json(conn, 200, {"status": "ok"}, keep)
            if path == "/stats":
                if query.get("reset", "0") not in ("", "0"):
                    self._pacer.reset()
                stats = {"cpu_s": time.process_time(), "threads": threading.active_count(), **self._pacer.stats()}
                return self._send_json(conn, 200, stats, keep)
            if path == "/warm":
                resp = self.response(query.get("mode", "bulk"), _int(query.get("n", "1000")))
                return self._send_json(conn, 200, resp.info, keep)
            if path in ("/v1/embeddings", "/embeddings") and method == "POST":
                return self._embeddings(conn, body, keep)
            if path not in ("/v1/chat/completions", "/chat/completions"):
                raise _BadRequest(404, f"no route for {path!r}")
            if method != "POST":
                raise _BadRequest(405, "use POST")
            try:
                req = json.loads(body) if body else {}
            except ValueError:
                raise _BadRequest(400, "body is not JSON") from None
            if not isinstance(req, dict):
                raise _BadRequest(400, "body is not a JSON object")
            mode = query.get("mode", req.get("bench_mode", "bulk"))
            n = _int(query["n"]) if "n" in query else req.get("bench_events", 1000)
            resp = self.response(mode, n)
            gap = _int(query["gap_us"]) if "gap_us" in query else req.get("bench_gap_us", DEFAULT_GAP_US)
            phase = query.get("phase", req.get("bench_phase", "spread"))
            if mode != "paced":
                gap = 0
            elif isinstance(gap, bool) or not isinstance(gap, int) or not 0 <= gap <= MAX_GAP_US:
                raise _BadRequest(400, f"bench_gap_us must be an int in 0..{MAX_GAP_US}, got {gap!r}")
            if phase not in PHASES:
                raise _BadRequest(400, f"bench_phase must be one of {PHASES}, got {phase!r}")
        except _BadRequest as e:
            self._send_error(conn, e.status, e.message, keep)
            return keep
        if req.get("bench_whole") is True:  # a whole chat.completion (for a non-streamed create)
            if gap >= PACER_MIN_GAP_US:  # paced: sent whole when the last token would have been
                return self._paced_whole(conn, n, gap / 1e6, keep)
            return self._send_json(conn, 200, _whole_chat(n), keep)
        head = resp.head + (b"Connection: keep-alive\r\n\r\n" if keep else b"Connection: close\r\n\r\n")
        if gap >= PACER_MIN_GAP_US:
            return self._paced(conn, head, resp, gap / 1e6, phase) and keep
        conn.sendall(head)
        send = conn.sendall
        if gap:
            pause = gap / 1e6
            for w in resp.writes:
                send(w)
                time.sleep(pause)
        else:
            for w in resp.writes:
                send(w)
        return keep

    def _paced(self, conn: socket.socket, head: bytes, resp: _Response, gap: float, phase: str) -> bool:
        """Hand the stream to the pacer and wait until it is sent; False if the connection is unusable."""
        t0 = time.monotonic()
        if phase == "aligned":  # the first token on the next multiple of the gap: one grid for all streams
            base = (int(t0 / gap) + 1) * gap
        else:  # a low-discrepancy offset within the gap: streams started together tick apart
            base = t0 + (next(self._streams) * 0.6180339887498949) % 1.0 * gap
        st = _PacedStream(conn, _ticks(head, resp.writes), t0, base, gap)
        conn.setblocking(False)
        try:
            self._pacer.add(st)
        except OSError:
            return False
        # bounded: the schedule's length plus the idle timeout for a client that stopped reading
        finished = st.done.wait(timeout=len(st.ticks) * gap + IDLE_TIMEOUT_S)
        if not finished:
            st.cancelled = True
            return False
        conn.settimeout(IDLE_TIMEOUT_S)
        return st.error is None

    def _paced_whole(self, conn: socket.socket, n: int, gap: float, keep: bool) -> bool:
        """A non-streamed answer paced like a real server: the whole ``chat.completion``
        goes out in one write when its ``n`` tokens would have been generated (the pacer
        sends it, so a thousand waiting answers cost no thread wake-ups)."""
        data = json.dumps(_whole_chat(n)).encode()
        whole = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode() + data
        due = time.monotonic() + n * gap
        st = _PacedStream(conn, [whole], due, due, gap)
        conn.setblocking(False)
        try:
            self._pacer.add(st)
        except OSError:
            return False
        if not st.done.wait(timeout=n * gap + IDLE_TIMEOUT_S):
            st.cancelled = True
            return False
        conn.settimeout(IDLE_TIMEOUT_S)
        return st.error is None and keep

    def _send_json(self, conn: socket.socket, status: int, obj: object, keep: bool = False) -> bool:
        data = json.dumps(obj).encode()
        conn.sendall(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode()
            + data
        )
        return keep

    def _send_error(self, conn: socket.socket, status: int, message: str, keep: bool = False) -> None:
        err = {"error": {"code": status, "message": message, "type": "invalid_request_error"}}
        self._send_json(conn, status, err, keep)


    def _embeddings(self, conn: socket.socket, body: bytes, keep: bool) -> bool:
        """``POST /v1/embeddings``: a deterministic float32 vector per input text
        (``bench_dim`` floats, default 384), base64 when asked, as llama-server."""
        try:
            req = json.loads(body)
            inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
            dim = int(req.get("bench_dim", 384))
        except (ValueError, KeyError, TypeError):
            self._send_error(conn, 400, "bad embeddings request", keep)
            return keep
        base = _embedding_base(dim)
        b64 = req.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            k = zlib.crc32(str(text).encode()) % dim * 4
            raw = base[k:] + base[:k]
            emb = base64.b64encode(raw).decode() if b64 else list(struct.unpack(f"<{dim}f", raw))
            data.append({"embedding": emb, "index": i, "object": "embedding"})
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return self._send_json(conn, 200, {"model": "m", "object": "list", "usage": usage, "data": data}, keep)


@lru_cache(maxsize=4)
def _embedding_base(dim: int) -> bytes:
    return struct.pack(f"<{dim}f", *[((i * 7919) % 1000) / 1000.0 - 0.5 for i in range(dim)])


@lru_cache(maxsize=4)
def _whole_chat(n: int) -> dict:
    return {
        "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1732000000, "model": "gemma-3-270m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": render(n).content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8},
    }


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise _BadRequest(400, f"not an int: {s!r}") from None


class ServerProcess:
    """The server in a child process (``python streamserver.py``), so its CPU is not the client's."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS, backlog: int = 128, warm: Sequence[str] = ()) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self.url = ""
        self._args = ["--max-connections", str(max_connections), "--backlog", str(backlog)]
        for spec in warm:  # "MODE:N", rendered before the URL is printed
            self._args += ["--warm", spec]

    def start(self) -> "ServerProcess":
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--port", "0", *self._args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.stop()
            raise RuntimeError(f"stream server did not start: {line!r}")
        self.url = line
        return self

    def warm(self, mode: str, n: int) -> dict:
        """Render ``(mode, n)`` in the server ahead of time; returns its info."""
        q = urllib.parse.urlencode({"mode": mode, "n": n})
        with urllib.request.urlopen(f"{self.url}/warm?{q}", timeout=300) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        p, self._proc = self._proc, None
        if p is None:
            return
        try:
            if p.stdin:
                p.stdin.close()  # the child exits when its stdin closes
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        finally:
            if p.stdout:
                p.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="connections served at once")
    ap.add_argument("--backlog", type=int, default=128, help="the listen() accept backlog")
    ap.add_argument("--warm", action="append", default=[], metavar="MODE:N",
                    help="render this stream before printing the URL (repeatable)")
    args = ap.parse_args(argv)
    srv = StreamServer(port=args.port, max_connections=args.max_connections, backlog=args.backlog)
    for spec in args.warm:
        mode, _, n = spec.partition(":")
        srv.response(mode, int(n))
    srv.start()
    print(srv.url, flush=True)
    try:
        sys.stdin.read()  # run until stdin closes (the parent exits or stops us)
    except KeyboardInterrupt:
        pass
    srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
