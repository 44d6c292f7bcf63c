"""Many streams at once, on one thread: ``stream()`` interleaving, asyncio
(``achat``/``achat_stream``/``astream``) and batch fan-out (``map``/``amap``).

Against :class:`ConcServer`, a small concurrent SSE server defined here.
``tests/loopback.py`` is not used: its ``listen(64)`` backlog overflows when
256 connections arrive at once (Linux drops the SYNs, curl retries them a
second later), it cannot tell how many requests were served at the same
time, and a stalled reply there only notices a departed client on its next
write. ConcServer listens with a backlog of 1024, counts open connections and
requests in flight (and their maxima), and, while a reply pauses, watches the
socket so it records the moment the client goes away (as llama-server does).

What a reply does is chosen by the request itself: the test sends extra body
fields (they pass through ``**params``), read by :func:`default_reply`:

``x_tokens``      number of content events (default 8)
``x_gap``         seconds of silence between events
``x_gate``        hold the reply until this many requests are in flight (proves concurrency)
``x_close_after`` write that many tokens, then close the connection mid-stream
``x_stall_after`` write that many tokens, then stall (``x_stall`` seconds)
``x_stall_first`` stall before the status line (seconds)
``x_status``      answer with this HTTP status and a llama-server JSON error

The reply's text is a function of the last message's content (the request's
tag), so each stream's text is distinct: :func:`text_for`.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import pytest

from llama_broker import (
    APIError,
    Broker,
    BrokerError,
    ConnectError,
    ModelConfig,
    TimeoutError_,
    TransportError,
)

CHAT_PATH = "/v1/chat/completions"
MAX_PAUSE_S = 30.0      # no stall lasts longer, whatever a request asks
IO_TIMEOUT_S = 15.0     # a silent client frees its thread
MAX_CONN_THREADS = 1024


# ============================================================== the server ====
@dataclass
class Req:
    """One request as the server saw it, and how its reply ended."""

    n: int                       # request number (arrival order)
    conn: int                    # connection number (same number: reused)
    method: str
    path: str
    headers: Dict[str, str]
    body: bytes
    t_start: float
    outcome: str = "pending"     # complete | client-gone | closed | error-status | stopped
    t_end: Optional[float] = None
    tokens_sent: int = 0
    status: int = 0

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def tag(self) -> Optional[str]:
        b = self.json
        try:
            return b["messages"][-1]["content"]
        except (TypeError, KeyError, IndexError):
            return None


@dataclass
class Pause:
    """Write nothing for ``seconds``; notice (and record) a client that leaves."""

    seconds: float


@dataclass
class Gate:
    """Wait until ``n`` requests have been in flight at once (a latch; at most ``timeout`` s)."""

    n: int
    timeout: float = 15.0


class CloseNow:
    """Close the connection here, without the chunked terminator."""


Item = Union[bytes, Pause, Gate, CloseNow]


@dataclass
class Reply:
    status: int = 200
    items: Sequence[Item] = ()          # for 200: SSE events (one chunk each) and actions
    json_body: Any = None               # for an error status
    delay: float = 0.0                  # silence before the status line (client-gone watched)


class _Gone(Exception):
    pass


class _Stop(Exception):
    pass


def tok(tag: str, k: int) -> str:
    return f"{tag}·{k} "


def text_for(tag: str, n: int) -> str:
    return "".join(tok(tag, k) for k in range(n))


def _data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _chunk(delta: Dict[str, Any], finish: Optional[str] = None) -> Dict[str, Any]:
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 1767225600, "id": "chatcmpl-conc", "model": "m", "object": "chat.completion.chunk",
    }


def sse_items(tag: str, n: int, *, gap: float = 0.0, close_after: Optional[int] = None,
              stall_after: Optional[int] = None, stall: float = 20.0, gate: Optional[int] = None) -> List[Item]:
    items: List[Item] = []
    if gate:
        items.append(Gate(gate))
    items.append(_data(_chunk({"role": "assistant", "content": None})))
    for k in range(n):
        if close_after is not None and k == close_after:
            items.append(CloseNow())
            return items
        if stall_after is not None and k == stall_after:
            items.append(Pause(stall))
        items.append(_data(_chunk({"content": tok(tag, k)})))
        if gap:
            items.append(Pause(gap))
    items.append(_data(_chunk({}, "stop")))
    items.append(b"data: [DONE]\n\n")
    return items


def error_reply(status: int, message: str = "nope", type_: str = "invalid_request_error") -> Reply:
    return Reply(status=status, json_body={"error": {"code": status, "message": message, "type": type_}})


def default_reply(req: Req) -> Reply:
    b = req.json or {}
    tag = req.tag or "?"
    if b.get("x_status"):
        st = int(b["x_status"])
        kind = {401: "authentication_error", 503: "unavailable_error", 500: "server_error"}.get(st, "invalid_request_error")
        return error_reply(st, f"scripted {st} for {tag}", kind)
    items = sse_items(
        tag, int(b.get("x_tokens", 8)), gap=float(b.get("x_gap", 0.0)),
        close_after=b.get("x_close_after"), stall_after=b.get("x_stall_after"),
        stall=float(b.get("x_stall", 20.0)), gate=b.get("x_gate"),
    )
    return Reply(items=items, delay=float(b.get("x_stall_first", 0.0)))


class ConcServer:
    """A concurrent llama-server imitation on 127.0.0.1 (see the module docstring).

    ``handler(req) -> Reply`` answers ``POST /v1/chat/completions``; every
    thread ends by itself (socket timeouts, bounded pauses, the stop event).
    """

    def __init__(self, handler: Callable[[Req], Reply] = default_reply) -> None:
        self.handler = handler
        self.requests: List[Req] = []
        self.n_conns = 0
        self.open_conns = 0
        self.max_open_conns = 0
        self.inflight = 0
        self.max_inflight = 0
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._conns: Dict[int, socket.socket] = {}
        self._threads: List[threading.Thread] = []
        self._slots = threading.BoundedSemaphore(MAX_CONN_THREADS)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1024)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._accepter = threading.Thread(target=self._accept_loop, name=f"conc-srv-{self.port}", daemon=True)
        self._accepter.start()

    # -- queries -------------------------------------------------------------
    def chat(self) -> List[Req]:
        with self._cv:
            return [r for r in self.requests if r.path.split("?")[0] == CHAT_PATH]

    def by_tag(self, tag: str) -> List[Req]:
        return [r for r in self.chat() if r.tag == tag]

    def wait_for(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def wait_idle(self, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda: self.inflight == 0, timeout)

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._accepter.join(2)
        self._sock.close()
        with self._cv:
            conns = list(self._conns.values())
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(2)

    def __enter__(self) -> "ConcServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- connections -----------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if not self._slots.acquire(timeout=IO_TIMEOUT_S):
                conn.close()
                continue
            with self._cv:
                self.n_conns += 1
                n = self.n_conns
                self.open_conns += 1
                self.max_open_conns = max(self.max_open_conns, self.open_conns)
                self._conns[n] = conn
            t = threading.Thread(target=self._serve, args=(conn, n), name=f"conc-srv-{self.port}-{n}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        try:
            conn.settimeout(IO_TIMEOUT_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray()
            for _ in range(10_000):
                req = self._read_request(conn, n, buf)
                if req is None or self._stop.is_set():
                    break
                if not self._answer(conn, req):
                    break
        except (OSError, _Gone, _Stop, ValueError):
            pass
        finally:
            with self._cv:
                self._conns.pop(n, None)
                self.open_conns -= 1
                self._cv.notify_all()
            try:
                conn.close()
            except OSError:
                pass
            self._slots.release()

    def _recv(self, conn: socket.socket, buf: bytearray) -> bool:
        try:
            b = conn.recv(65536)
        except socket.timeout:
            return False
        if not b:
            return False
        buf += b
        return True

    def _read_request(self, conn: socket.socket, n: int, buf: bytearray) -> Optional[Req]:
        while b"\r\n\r\n" not in buf:
            if len(buf) > 1 << 20 or not self._recv(conn, buf):
                return None
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        buf[:] = rest
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0") or 0)
        while len(buf) < length:
            if not self._recv(conn, buf):
                return None
        body, buf[:] = bytes(buf[:length]), buf[length:]
        req = Req(0, n, method, path, headers, body, time.monotonic())
        with self._cv:
            req.n = len(self.requests)
            self.requests.append(req)
            self._cv.notify_all()
        return req

    # -- replies ---------------------------------------------------------------
    def _answer(self, conn: socket.socket, req: Req) -> bool:
        if req.path.split("?")[0] != CHAT_PATH or req.method != "POST":
            body = b'{"status":"ok"}' if req.path == "/health" else b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}'
            self._send_plain(conn, 200 if req.path == "/health" else 404, body, keep=True)
            return True
        with self._cv:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            self._cv.notify_all()
        keep = False
        try:
            reply = self.handler(req)
            req.status = reply.status
            keep = self._write(conn, req, reply)
        except _Gone:
            req.outcome = "client-gone"
        except _Stop:
            req.outcome = "stopped"
        except OSError:
            req.outcome = "client-gone"
        finally:
            with self._cv:
                req.t_end = time.monotonic()
                self.inflight -= 1
                self._cv.notify_all()
        return keep

    def _write(self, conn: socket.socket, req: Req, r: Reply) -> bool:
        if r.delay:
            self._pause(conn, r.delay)
        if r.status != 200:
            body = json.dumps(r.json_body, separators=(",", ":")).encode()
            self._send_plain(conn, r.status, body, keep=True)
            req.outcome = "error-status"
            return True
        self._send(conn, b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")
        for item in r.items:
            if isinstance(item, bytes):
                self._send(conn, b"%x\r\n%s\r\n" % (len(item), item))
                if b'"content":"' in item:
                    req.tokens_sent += 1
            elif isinstance(item, Pause):
                self._pause(conn, item.seconds)
            elif isinstance(item, Gate):
                self.wait_for(lambda n=item.n: self.max_inflight >= n or self._stop.is_set(), item.timeout)
            elif isinstance(item, CloseNow):
                req.outcome = "closed"
                return False
        self._send(conn, b"0\r\n\r\n")
        req.outcome = "complete"
        return True

    def _send_plain(self, conn: socket.socket, status: int, body: bytes, keep: bool) -> None:
        self._send(conn, (
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nServer: llama.cpp\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode() + body)

    def _send(self, conn: socket.socket, b: bytes) -> None:
        if self._stop.is_set():
            raise _Stop
        try:
            conn.sendall(b)
        except (BrokenPipeError, ConnectionResetError, socket.timeout) as e:
            raise _Gone from e

    def _pause(self, conn: socket.socket, seconds: float) -> None:
        """Sleep, but notice within ~20 ms a client that closed its end."""
        end = time.monotonic() + min(seconds, MAX_PAUSE_S)
        poller = select.poll()
        poller.register(conn, select.POLLIN | select.POLLHUP | select.POLLERR)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            if self._stop.is_set():
                raise _Stop
            if poller.poll(max(1, int(min(left, 0.02) * 1000))):
                try:
                    peek = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    peek = b"x"
                except OSError as e:
                    raise _Gone from e
                if not peek:
                    raise _Gone
                self._stop.wait(min(left, 0.02))  # bytes of a next request: not our business now


# ============================================================== helpers =====
@pytest.fixture
def srv():
    with ConcServer() as s:
        yield s


def cfg_for(url: str, **kw: Any) -> ModelConfig:
    base: Dict[str, Any] = dict(model="m", timeout_ms=60000, idle_timeout_ms=20000, max_retries=0, retry_backoff_ms=20)
    base.update(kw)
    return ModelConfig(url, **base)


def msgs(tag: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": tag}]


def closed_port_url() -> str:
    """A base URL on which nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def foreign_threads(before: set) -> List[str]:
    """Python threads started since ``before`` that are not the test server's."""
    return [t.name for t in threading.enumerate() if t.ident not in before and not t.name.startswith("conc-srv-")]


async def async_wait(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll ``pred`` without blocking the loop (bounded)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def gone_by(srv: "ConcServer", tag: str) -> Callable[[], bool]:
    """True once the server has finished the reply for ``tag``, whatever the outcome."""
    return lambda: bool(srv.by_tag(tag)) and srv.by_tag(tag)[0].outcome != "pending"


def collect_amap(broker: Broker, reqs: List[Dict[str, Any]], **kw: Any) -> list:
    async def go() -> list:
        out = []
        async for r in broker.amap(reqs, **kw):
            out.append(r)
        return out

    return asyncio.run(go())


def collect_map(broker: Broker, reqs: List[Dict[str, Any]], **kw: Any) -> list:
    return list(broker.map(reqs, **kw))


RUNNERS = {"map": collect_map, "amap": collect_amap}


def check_all_ok(results: list, tags: List[str], n_tokens: int) -> None:
    assert sorted(r.index for r in results) == list(range(len(tags))), "every index once"
    for r in results:
        assert r.error is None, (r.index, r.error)
        assert r.text == text_for(tags[r.index], n_tokens), r.index
        assert r.finish_reason == "stop"


# ==================================================== 1. 256 at once ========
N_WIDE = 256
WIDE_TOKENS = 12


def wide_tags() -> List[str]:
    return [f"w{i:03d}" for i in range(N_WIDE)]


def check_wide_server(srv: ConcServer, tags: List[str]) -> None:
    reqs = srv.chat()
    assert len(reqs) == N_WIDE, f"{len(reqs)} requests for {N_WIDE} streams"
    assert sorted(r.tag for r in reqs) == sorted(tags), "each stream sent once"
    assert srv.max_inflight == N_WIDE, f"only {srv.max_inflight} requests were in flight at once"
    assert srv.n_conns <= N_WIDE + 4, f"{srv.n_conns} connections for {N_WIDE} requests"
    assert all(r.outcome == "complete" for r in reqs), {r.outcome for r in reqs}


def test_256_pulled_streams_on_one_thread(srv):
    tags = wide_tags()
    before = {t.ident for t in threading.enumerate()}
    with Broker(cfg_for(srv.url)) as b:
        streams = [b.stream(msgs(t), x_tokens=WIDE_TOKENS, x_gate=N_WIDE) for t in tags]
        got: List[List[str]] = [[] for _ in tags]
        live = list(range(N_WIDE))
        for _ in range(2 * WIDE_TOKENS + 5):  # bounded: one round = one next() per live stream
            still = []
            for i in live:
                try:
                    d = next(streams[i])
                except StopIteration:
                    continue
                if d.content:
                    got[i].append(d.content)
                still.append(i)
            live = still
            if not live:
                break
        assert not live, f"{len(live)} streams did not end"
        assert not foreign_threads(before), "stream() must not start threads"
        for i, t in enumerate(tags):
            assert "".join(got[i]) == text_for(t, WIDE_TOKENS), t
            assert got[i] == [tok(t, k) for k in range(WIDE_TOKENS)], t  # one delta per event, in order
            assert streams[i].result is not None and streams[i].result.finish_reason == "stop"
    check_wide_server(srv, tags)


def test_256_via_amap(srv):
    tags = wide_tags()
    reqs = [{"messages": msgs(t), "x_tokens": WIDE_TOKENS, "x_gate": N_WIDE} for t in tags]
    with Broker(cfg_for(srv.url)) as b:
        results = collect_amap(b, reqs, concurrency=N_WIDE, progress=False)
    check_all_ok(results, tags, WIDE_TOKENS)
    assert all(r.endpoint.rstrip("/") == srv.url for r in results)
    assert all(r.deltas == WIDE_TOKENS for r in results)
    check_wide_server(srv, tags)


def test_256_via_sync_map(srv):
    tags = wide_tags()
    reqs = [{"messages": msgs(t), "x_tokens": WIDE_TOKENS, "x_gate": N_WIDE} for t in tags]
    with Broker(cfg_for(srv.url)) as b:
        results = collect_map(b, reqs, concurrency=N_WIDE, progress=False)
    check_all_ok(results, tags, WIDE_TOKENS)
    check_wide_server(srv, tags)


def test_256_achat_gathered(srv):
    tags = wide_tags()
    before = {t.ident for t in threading.enumerate()}

    async def go(b: Broker) -> List[str]:
        return await asyncio.gather(*(b.achat(msgs(t), x_tokens=WIDE_TOKENS, x_gate=N_WIDE) for t in tags))

    with Broker(cfg_for(srv.url)) as b:
        texts = asyncio.run(go(b))
        assert not foreign_threads(before), "achat must not start threads"
    assert texts == [text_for(t, WIDE_TOKENS) for t in tags]
    check_wide_server(srv, tags)


# ================================================ 2. interleaved stream()s ==
def test_three_streams_round_robin_and_one_closed_early(srv):
    n = 30
    tags = ["alpha", "beta", "gamma"]
    with Broker(cfg_for(srv.url)) as b:
        streams = [b.stream(msgs(t), x_tokens=n, x_gap=0.01) for t in tags]
        got: List[List[str]] = [[] for _ in tags]
        order: List[int] = []
        ended = [False] * 3
        t_closed = None
        for _ in range(4 * n):  # bounded
            for i, s in enumerate(streams):
                if ended[i]:
                    continue
                try:
                    d = next(s)
                except StopIteration:
                    ended[i] = True
                    continue
                if d.content:
                    got[i].append(d.content)
                    order.append(i)
                if i == 1 and len(got[1]) == 5:
                    s.close()
                    t_closed = time.monotonic()
                    ended[1] = True
            if all(ended):
                break
        assert all(ended)
        # the closed stream yields nothing more, and closing it again is harmless
        with pytest.raises(StopIteration):
            next(streams[1])
        streams[1].close()
        for i in (0, 2):
            assert got[i] == [tok(tags[i], k) for k in range(n)], tags[i]
            assert streams[i].result is not None and streams[i].result.finish_reason == "stop"
        assert got[1] == [tok("beta", k) for k in range(5)]
        assert order[:6] == [0, 1, 2, 0, 1, 2], "the three streams interleave"
        # the closed one's connection is gone while the Broker lives on
        assert t_closed is not None
        assert srv.wait_for(gone_by(srv, "beta"), 3.0)

    assert srv.max_inflight == 3, "all three requests were open at once"
    (beta,) = srv.by_tag("beta")
    assert beta.outcome == "client-gone", beta.outcome
    assert beta.t_end is not None and beta.t_end - t_closed < 1.0
    assert beta.tokens_sent < n
    for t in ("alpha", "gamma"):
        (r,) = srv.by_tag(t)
        assert r.outcome == "complete" and r.tokens_sent == n


def test_stream_with_context_manager_exit_cuts_connection(srv):
    with Broker(cfg_for(srv.url)) as b:
        with b.stream(msgs("cm"), x_tokens=200, x_gap=0.01) as s:
            first = next(s)
            while not first.content:
                first = next(s)
            t0 = time.monotonic()
        assert srv.wait_for(lambda: srv.by_tag("cm")[0].outcome != "pending", 3.0)
        (r,) = srv.by_tag("cm")
        assert r.outcome == "client-gone" and r.t_end - t0 < 1.0
        # the Broker is still good for the next request
        assert b.chat(msgs("after"), x_tokens=3) == text_for("after", 3)


# ===================================================== 3. asyncio ===========
def test_astream_yields_deltas_in_order(srv):
    n = 20

    async def go(b: Broker):
        got = []
        async with b.astream(msgs("as"), x_tokens=n, x_gap=0.002) as s:
            async for d in s:
                if d.content:
                    got.append(d.content)
        return got, s.result

    with Broker(cfg_for(srv.url)) as b:
        got, res = asyncio.run(go(b))
    assert got == [tok("as", k) for k in range(n)]
    assert res is not None and res.finish_reason == "stop" and res.deltas == n


def test_astreams_interleave_with_other_coroutines(srv):
    n = 15
    ticks = [0]
    before = {t.ident for t in threading.enumerate()}

    async def ticker(stop: asyncio.Event) -> None:
        for _ in range(10_000):
            if stop.is_set():
                return
            ticks[0] += 1
            await asyncio.sleep(0.005)

    async def one(b: Broker, tag: str) -> List[str]:
        out = []
        async with b.astream(msgs(tag), x_tokens=n, x_gap=0.04) as s:
            async for d in s:
                if d.content:
                    out.append(d.content)
        return out

    async def go(b: Broker):
        stop = asyncio.Event()
        t = asyncio.create_task(ticker(stop))
        t0 = time.monotonic()
        res = await asyncio.gather(*(one(b, f"i{k}") for k in range(4)))
        wall = time.monotonic() - t0
        stop.set()
        await t
        return res, wall

    with Broker(cfg_for(srv.url)) as b:
        res, wall = asyncio.run(go(b))
        assert not foreign_threads(before), "the asyncio path must not start threads"
    for k, got in enumerate(res):
        assert got == [tok(f"i{k}", j) for j in range(n)]
    assert srv.max_inflight == 4
    # 15 events x 40 ms each: ~0.6 s when the four run together, ~2.4 s one after another
    assert wall < 1.8, f"four astreams took {wall:.2f}s: not concurrent"
    assert ticks[0] >= 0.3 * wall / 0.005, f"the loop was blocked: {ticks[0]} ticks in {wall:.2f}s"


def test_achat_stream_calls_on_delta_per_content(srv):
    pieces: List[str] = []

    async def go(b: Broker):
        return await b.achat_stream(msgs("cb"), pieces.append, x_tokens=7)

    with Broker(cfg_for(srv.url)) as b:
        res = asyncio.run(go(b))
    assert pieces == [tok("cb", k) for k in range(7)]
    assert res.finish_reason == "stop" and res.deltas == 7


@pytest.mark.parametrize("where", ["before-headers", "mid-stream"])
def test_cancelling_achat_closes_the_connection(srv, where):
    kw = {"x_stall_first": 20.0} if where == "before-headers" else {"x_stall_after": 2, "x_stall": 20.0}

    async def go(b: Broker):
        task = asyncio.create_task(b.achat(msgs("cx"), x_tokens=5, **kw))
        for _ in range(300):  # until the server has the request (<= 3 s)
            if srv.by_tag("cx"):
                break
            await asyncio.sleep(0.01)
        assert srv.by_tag("cx"), "the request never arrived"
        await asyncio.sleep(0.3)
        t_cancel = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 2.0)
        t_done = time.monotonic()
        # the server sees the client leave while the Broker and the loop live on
        await async_wait(gone_by(srv, "cx"), 3.0)
        (r,) = srv.by_tag("cx")
        outcome, t_end = r.outcome, r.t_end
        # the broker is still usable on this loop
        after = await b.achat(msgs("next"), x_tokens=3)
        return t_cancel, t_done, after, outcome, t_end

    with Broker(cfg_for(srv.url)) as b:
        t_cancel, t_done, after, outcome, t_end = asyncio.run(go(b))
    assert t_done - t_cancel < 1.0, "cancellation must be prompt"
    assert after == text_for("next", 3)
    assert outcome == "client-gone", outcome
    assert t_end - t_cancel < 2.0, f"server saw the client leave {t_end - t_cancel:.2f}s after the cancel"


def test_cancelling_a_task_iterating_astream_and_aclose(srv):
    async def reader(b: Broker, seen: List[str]) -> None:
        async with b.astream(msgs("ca"), x_tokens=500, x_gap=0.01) as s:
            async for d in s:
                if d.content:
                    seen.append(d.content)

    async def go(b: Broker):
        seen: List[str] = []
        task = asyncio.create_task(reader(b, seen))
        for _ in range(300):
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.01)
        t_cancel = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # aclose(): leaving early without cancelling anything
        s = b.astream(msgs("ac"), x_tokens=500, x_gap=0.01)
        async for d in s:
            if d.content:
                break
        t_aclose = time.monotonic()
        await s.aclose()
        await s.aclose()  # twice: harmless
        # the server sees both clients leave while the Broker and the loop live on
        await async_wait(lambda: gone_by(srv, "ca")() and gone_by(srv, "ac")(), 3.0)
        ends = {tag: (srv.by_tag(tag)[0].outcome, srv.by_tag(tag)[0].t_end) for tag in ("ca", "ac")}
        return seen, t_cancel, t_aclose, ends

    with Broker(cfg_for(srv.url)) as b:
        seen, t_cancel, t_aclose, ends = asyncio.run(go(b))
    assert len(seen) >= 3 and seen == [tok("ca", k) for k in range(len(seen))]
    for tag, t0 in (("ca", t_cancel), ("ac", t_aclose)):
        outcome, t_end = ends[tag]
        assert outcome == "client-gone" and t_end - t0 < 2.0, (tag, outcome)
        assert srv.by_tag(tag)[0].tokens_sent < 500


@pytest.mark.parametrize("status", [500, 401, 400])
def test_http_errors_surface_as_api_error_under_asyncio(srv, status):
    async def go(b: Broker):
        with pytest.raises(APIError) as e1:
            await b.achat(msgs("e1"), x_status=status)
        with pytest.raises(APIError) as e2:
            async with b.astream(msgs("e2"), x_status=status) as s:
                async for _ in s:
                    pass
        with pytest.raises(APIError) as e3:
            await b.achat_stream(msgs("e3"), lambda _c: None, x_status=status)
        return e1.value, e2.value, e3.value

    with Broker(cfg_for(srv.url, max_retries=2)) as b:
        errs = asyncio.run(go(b))
    for tag, e in zip(("e1", "e2", "e3"), errs):
        assert e.status == status
        assert e.message == f"scripted {status} for {tag}"
        assert len(srv.by_tag(tag)) == 1, "a 4xx/500 is not retried"


@pytest.mark.parametrize("where", ["mid-stream", "before-headers"])
def test_idle_timeout_under_asyncio(srv, where):
    kw = {"x_stall_first": 15.0} if where == "before-headers" else {"x_stall_after": 1, "x_stall": 15.0}
    ticks = [0]

    async def ticker() -> None:
        for _ in range(10_000):
            ticks[0] += 1
            await asyncio.sleep(0.01)

    async def go(b: Broker):
        t = asyncio.create_task(ticker())
        t0 = time.monotonic()
        try:
            with pytest.raises(TimeoutError_) as ei:
                await asyncio.wait_for(b.achat(msgs("idle"), x_tokens=4, **kw), 8.0)
        finally:
            t.cancel()
        took = time.monotonic() - t0
        await async_wait(gone_by(srv, "idle"), 3.0)  # the connection is closed, Broker still open
        return ei.value, took, srv.by_tag("idle")[0].outcome

    with Broker(cfg_for(srv.url, idle_timeout_ms=1000)) as b:
        err, took, outcome = asyncio.run(go(b))
    assert 0.9 <= took < 4.0, f"idle timeout fired after {took:.2f}s"
    assert "idle" in str(err)
    assert ticks[0] >= 0.3 * took / 0.01, "the loop was blocked while waiting"
    assert outcome == "client-gone", outcome


def test_one_broker_across_event_loops_and_sync_calls(srv):
    # asyncio.run() twice (two loops, one after the other) with sync calls in between
    async def go(b: Broker, tag: str) -> List[str]:
        return await asyncio.gather(b.achat(msgs(tag + "a"), x_tokens=3), b.achat(msgs(tag + "b"), x_tokens=3))

    with Broker(cfg_for(srv.url)) as b:
        assert asyncio.run(go(b, "L1")) == [text_for("L1a", 3), text_for("L1b", 3)]
        assert b.chat(msgs("S1"), x_tokens=2) == text_for("S1", 2)
        assert asyncio.run(go(b, "L2")) == [text_for("L2a", 3), text_for("L2b", 3)]
        with b.stream(msgs("S2"), x_tokens=2) as s:
            assert "".join(d.content or "" for d in s) == text_for("S2", 2)


def test_connect_refused_under_asyncio():
    async def go(b: Broker):
        with pytest.raises(ConnectError):
            await b.achat(msgs("x"))

    with Broker(cfg_for(closed_port_url())) as b:
        asyncio.run(go(b))


# ========================================================= 4. map / amap ====
def _answer_503_first(k: int, counter: Dict[str, int]) -> Callable[[Req], Reply]:
    lock = threading.Lock()

    def handler(req: Req) -> Reply:
        with lock:
            counter["seen"] += 1
            first = counter["seen"] <= k
            if first:
                counter["503"] += 1
        if first:
            return error_reply(503, "Loading model", "unavailable_error")
        return default_reply(req)

    return handler


@pytest.mark.parametrize("how", list(RUNNERS))
def test_map_fails_over_down_and_503_endpoints(how):
    counter = {"seen": 0, "503": 0}
    n_tok = 6
    tags = [f"m{i}" for i in range(12)]
    reqs = [{"messages": msgs(t), "x_tokens": n_tok, "x_gap": 0.005} for t in tags]
    down = closed_port_url()
    with ConcServer() as okay, ConcServer(_answer_503_first(3, counter)) as busy:
        cfg = cfg_for(okay.url, max_retries=6, retry_backoff_ms=20)
        with Broker(cfg) as b:
            results = RUNNERS[how](b, reqs, concurrency=4, endpoints=[down, okay.url, busy.url], progress=False)
        check_all_ok(results, tags, n_tok)
        for r in results:
            assert r.endpoint.rstrip("/") in (okay.url, busy.url), r.endpoint
        served = okay.chat() + busy.chat()
        n503 = counter["503"]
        assert n503 >= 1, "the 503 endpoint was never tried (no spreading)"
        assert len(served) == len(tags) + n503, "only refused/503 attempts may be repeated"
        streamed = [r.tag for r in served if r.status == 200]
        assert sorted(streamed) == sorted(tags), "no request streamed twice"
        for r in results:  # the endpoint named is the one that streamed it
            server = okay if r.endpoint.rstrip("/") == okay.url else busy
            assert [x.status for x in server.by_tag(tags[r.index])][-1:] == [200], (r.index, r.endpoint)
        assert sum(r.retries for r in results) >= n503 + 1, "refused and 503 attempts count as retries"


@pytest.mark.parametrize("how", list(RUNNERS))
def test_map_broken_stream_and_400_come_back_as_errors_not_retried(how):
    n_tok = 6
    tags = [f"b{i}" for i in range(12)]
    reqs: List[Dict[str, Any]] = [{"messages": msgs(t), "x_tokens": n_tok} for t in tags]
    reqs[5]["x_close_after"] = 3
    reqs[8]["x_status"] = 400
    with ConcServer() as a, ConcServer() as c:
        cfg = cfg_for(a.url, max_retries=4, retry_backoff_ms=20)
        with Broker(cfg) as b:
            results = RUNNERS[how](b, reqs, concurrency=3, endpoints=[a.url, c.url], progress=False)
        assert sorted(r.index for r in results) == list(range(12))
        by_index = {r.index: r for r in results}
        broken = by_index[5]
        assert isinstance(broken.error, TransportError), broken.error
        assert broken.text == text_for("b5", 3), "the partial text is kept"
        assert broken.endpoint.rstrip("/") in (a.url, c.url)
        bad = by_index[8]
        assert isinstance(bad.error, APIError) and bad.error.status == 400, bad.error
        assert bad.text == ""
        for i, r in by_index.items():
            if i not in (5, 8):
                assert r.error is None and r.text == text_for(tags[i], n_tok), i
        served = a.chat() + c.chat()
        assert len([r for r in served if r.tag == "b5"]) == 1, "a stream that delivered output is never retried"
        assert len([r for r in served if r.tag == "b8"]) == 1, "a 400 is never retried"
        assert len(served) == 12


@pytest.mark.parametrize("how", list(RUNNERS))
@pytest.mark.parametrize("conc", [1, 3])
def test_map_concurrency_is_respected(how, conc):
    tags = [f"c{i}" for i in range(10)]
    reqs = [{"messages": msgs(t), "x_tokens": 5, "x_gap": 0.02} for t in tags]
    with ConcServer() as s:
        with Broker(cfg_for(s.url)) as b:
            results = RUNNERS[how](b, reqs, concurrency=conc, progress=False)
        check_all_ok(results, tags, 5)
        assert s.max_inflight == conc, f"{s.max_inflight} in flight with concurrency={conc}"
        assert s.max_open_conns <= conc, f"{s.max_open_conns} connections with concurrency={conc}"
        assert len(s.chat()) == 10


def test_map_yields_results_as_they_complete():
    # request 0 is slow, the rest fast: 0 must not hold the others back
    reqs = [{"messages": msgs("slow"), "x_tokens": 5, "x_gap": 0.3}]
    reqs += [{"messages": msgs(f"f{i}"), "x_tokens": 2} for i in range(1, 6)]
    with ConcServer() as s, Broker(cfg_for(s.url)) as b:
        order = [r.index for r in b.map(reqs, concurrency=6, progress=False)]
    assert sorted(order) == list(range(6))
    assert order[-1] == 0, f"results in {order}: not yielded as they complete"


def test_map_takes_a_generator_and_keeps_going_past_a_bad_request():
    # a generator is accepted; a request with empty messages is an error result, the rest go on
    def gen():
        for i in range(5):
            yield {"messages": msgs(f"g{i}") if i != 2 else [], "x_tokens": 2}

    with ConcServer() as s, Broker(cfg_for(s.url)) as b:
        results = list(b.map(gen(), concurrency=2, progress=False))
    assert sorted(r.index for r in results) == list(range(5))
    for r in results:
        if r.index == 2:
            assert isinstance(r.error, BrokerError) and r.text == ""
        else:
            assert r.error is None and r.text == text_for(f"g{r.index}", 2)
    assert sorted(r.tag for r in s.chat()) == ["g0", "g1", "g3", "g4"]


@pytest.mark.parametrize("how", list(RUNNERS))
def test_leaving_map_early_cuts_the_requests_in_flight(how):
    # one fast request, three that would stream for 5 s: stop after the first result
    reqs = [{"messages": msgs("quick"), "x_tokens": 1}]
    reqs += [{"messages": msgs(f"long{i}"), "x_tokens": 100, "x_gap": 0.05} for i in range(3)]
    with ConcServer() as s, Broker(cfg_for(s.url)) as b:
        if how == "map":
            it = b.map(reqs, concurrency=4, progress=False)
            first = next(it)
            t0 = time.monotonic()
            it.close()
        else:
            async def go():
                agen = b.amap(reqs, concurrency=4, progress=False)
                async for r in agen:
                    t = time.monotonic()
                    await agen.aclose()
                    # still on the loop: the cut must not wait for the loop's end
                    await async_wait(lambda: all(gone_by(s, f"long{i}")() for i in range(3)), 3.0)
                    return r, t

            first, t0 = asyncio.run(go())
        assert first.index == 0 and first.error is None
        longs = [f"long{i}" for i in range(3)]
        assert s.wait_for(lambda: all(gone_by(s, t)() for t in longs), 3.0)
        for t in longs:
            (r,) = s.by_tag(t)
            assert r.outcome == "client-gone" and r.t_end - t0 < 2.0, (t, r.outcome)
        assert len(s.chat()) == 4
        # and the Broker goes on working
        assert b.chat(msgs("after"), x_tokens=2) == text_for("after", 2)


def test_map_result_carries_stream_result_fields():
    with ConcServer() as s, Broker(cfg_for(s.url)) as b:
        (r,) = list(b.map([{"messages": msgs("f"), "x_tokens": 4}], progress=False))
    assert r.index == 0 and r.error is None and r.text == text_for("f", 4)
    assert r.finish_reason == "stop" and r.deltas == 4 and r.events >= 6 and r.skipped == 0
    assert r.retries == 0 and r.model == "m" and r.id == "chatcmpl-conc"
    assert r.ttft_s is not None and 0 <= r.ttft_s <= r.elapsed_s
    assert r.usage is None and r.timings is None


# --------------------------------------------------------------- progress ----
@pytest.mark.parametrize("progress", [False, None])
@pytest.mark.parametrize("how", list(RUNNERS))
def test_progress_prints_nothing_when_not_a_tty(capfd, how, progress):
    reqs = [{"messages": msgs(f"p{i}"), "x_tokens": 2} for i in range(6)]
    kw = {} if progress is None else {"progress": progress}
    with ConcServer() as s, Broker(cfg_for(s.url)) as b:
        results = RUNNERS[how](b, reqs, concurrency=2, **kw)
    assert len(results) == 6
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


_TTY_SCRIPT = textwrap.dedent(
    """
    import sys
    from llama_broker import Broker, ModelConfig
    url, how, progress = sys.argv[1], sys.argv[2], sys.argv[3]
    kw = {} if progress == "default" else {"progress": progress == "True"}
    reqs = [{"messages": [{"role": "user", "content": "t%d" % i}], "x_tokens": 2, "x_gap": 0.05} for i in range(8)]
    with Broker(ModelConfig(url, model="m")) as b:
        if how == "map":
            res = list(b.map(reqs, concurrency=2, **kw))
        else:
            import asyncio
            async def go():
                return [r async for r in b.amap(reqs, concurrency=2, **kw)]
            res = asyncio.run(go())
    assert len(res) == 8 and all(r.error is None for r in res), res
    print("ok", len(res))
    """
)


def _run_on_pty(url: str, how: str, progress: str) -> "tuple[str, bytes]":
    """Run the script with stderr on a pseudo-terminal; returns (stdout, stderr bytes)."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _TTY_SCRIPT, url, how, progress],
            stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        os.close(slave)
        slave = -1
        err = bytearray()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    b = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    b = b""
                if not b:
                    break
                err += b
            elif proc.poll() is not None:
                continue  # drain what is left
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, bytes(err))
        return out.decode(), bytes(err)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


@pytest.mark.parametrize("how", list(RUNNERS))
def test_progress_bar_on_a_tty_only_unless_false(how):
    with ConcServer() as s:
        out_default, err_default = _run_on_pty(s.url, how, "default")
        out_false, err_false = _run_on_pty(s.url, how, "False")
    assert out_default.strip() == "ok 8" and out_false.strip() == "ok 8", "nothing but the script's own stdout"
    assert err_default.strip(), "no progress bar on a TTY stderr"
    assert err_false == b"", f"progress=False printed {err_false[:200]!r}"


def test_amap_and_astream_can_be_made_before_the_loop_runs() -> None:
    # Both bind to the running loop on first use, not when they are made.
    from loopback import LoopbackServer as _Loopback, ok as _ok

    msgs = [{"role": "user", "content": "hi"}]
    with _Loopback() as srv:
        srv.script(_ok(["x", "y"]))
        b = Broker(ModelConfig(srv.url))
        it = b.amap([{"messages": msgs}] * 2, concurrency=2)
        s = b.astream(msgs)

        async def main() -> tuple:
            rs = [r async for r in it]
            ds = [d.content async for d in s if d.content]
            return rs, ds

        rs, ds = asyncio.run(main())
        assert sorted(r.text for r in rs) == ["xy", "xy"] and all(r.ok for r in rs)
        assert ds == ["x", "y"]
        b.close()
