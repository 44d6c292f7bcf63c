"""A misbehaving llama-server imitation on 127.0.0.1, for fault tests.

Raw sockets, one thread per connection, HTTP/1.1 keep-alive. Every request is
recorded in ``srv.requests``; ``POST /v1/chat/completions`` is answered by the
next scripted :class:`Reply` (the last one repeats)::

    with LoopbackServer() as srv:
        srv.script(api_error(503, "Loading model", "unavailable_error"), ok(["Hi"]))
        ...  # request 1 gets a 503, request 2 (and later) a good stream

A reply's ``body`` is a list of byte strings (each one "event", i.e. one
write) and actions (:class:`Stall`, :class:`Reset`, :class:`Close`,
:class:`Huge`). ``pattern`` chooses how the bytes between two actions go on
the wire: ``"events"`` one chunk per item, ``"one"`` everything in one chunk,
``"random"`` seeded random split points, ``"bytes"`` one byte per chunk.

Every thread ends by itself: sockets have timeouts, stalls are bounded and
wake up when the server stops, writes stop when the client goes away.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "LoopbackServer", "Reply", "Request", "Stall", "Reset", "Close", "Huge",
    "chunk", "data", "events", "ok", "sse", "api_error", "raw", "redirect", "reset_now", "paced",
    "usage_chunk", "DONE",
    "error_envelope", "CHAT_PATH", "PATTERNS",
]

CHAT_PATH = "/v1/chat/completions"
PATTERNS = ("events", "one", "random", "bytes")
MAX_STALL_S = 30.0          # no stall lasts longer, whatever a test asks
IO_TIMEOUT_S = 10.0         # a silent or non-reading client frees its thread
MAX_REQUESTS_PER_CONN = 10000


# --------------------------------------------------------------- actions ----
@dataclass(frozen=True)
class Stall:
    """Write nothing for ``seconds`` (bounded by MAX_STALL_S, ends at stop)."""
    seconds: float


@dataclass(frozen=True)
class Reset:
    """Abort the connection with a TCP RST (SO_LINGER 0) right here."""


@dataclass(frozen=True)
class Close:
    """Close the connection right here, without the chunked terminator."""


@dataclass(frozen=True)
class Huge:
    """One ``data:`` event whose content string is ``size`` bytes, written in pieces."""
    size: int
    piece: int = 64 * 1024


Item = Union[bytes, Stall, Reset, Close, Huge]


@dataclass
class Reply:
    status: int = 200
    reason: str = ""
    headers: Sequence[Tuple[str, str]] = ()
    body: Sequence[Item] = ()
    chunked: bool = True          # False: no length, body ends when we close
    pattern: str = "events"
    seed: int = 0
    gzip: bool = False            # compress when the client accepts gzip
    keep_alive: bool = True
    delay: float = 0.0            # seconds of silence before the status line
    interim: Sequence[bytes] = ()  # raw informational responses sent first ("HTTP/1.1 100 Continue\r\n...\r\n\r\n")


@dataclass
class Request:
    method: str
    path: str
    headers: Dict[str, str]       # lower-case names
    raw_headers: List[Tuple[str, str]]
    body: bytes
    conn: int                     # connection number (same number: reused)
    raw_head: bytes = b""         # the request line and headers as they came, up to the blank line

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


# ------------------------------------------------------- event builders ----
_CREATED = 1767225600


def data(obj: Any, *, ascii: bool = False) -> bytes:
    """One ``data:`` event; ``obj`` is JSON-encoded unless it is str/bytes."""
    if isinstance(obj, bytes):
        payload = obj
    elif isinstance(obj, str):
        payload = obj.encode()
    else:
        payload = json.dumps(obj, ensure_ascii=ascii, separators=(",", ":")).encode()
    return b"data: " + payload + b"\n\n"


def chunk(delta: Dict[str, Any], finish: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    """A llama-server ``chat.completion.chunk`` object."""
    obj: Dict[str, Any] = {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": _CREATED, "id": "chatcmpl-loopback", "model": "m",
        "system_fingerprint": "b1-x", "object": "chat.completion.chunk",
    }
    obj.update(extra)
    return obj


def usage_chunk(n_tokens: int, prompt_n: int = 7) -> Dict[str, Any]:
    obj = chunk({})
    obj["choices"] = []
    obj["usage"] = {"completion_tokens": n_tokens, "prompt_tokens": prompt_n,
                    "total_tokens": n_tokens + prompt_n}
    obj["timings"] = {"prompt_n": prompt_n, "prompt_ms": 12.5, "prompt_per_second": 560.0,
                      "predicted_n": n_tokens, "predicted_ms": 40.0,
                      "predicted_per_second": n_tokens / 0.04}
    return obj


def error_envelope(message: str = "boom", type_: str = "server_error", code: int = 500) -> Dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": type_}}


DONE = b"data: [DONE]\n\n"


def events(tokens: Sequence[str], *, finish: Optional[str] = "stop", usage: bool = False,
           done: bool = True, ping: Optional[bytes] = None, ascii: bool = False) -> List[bytes]:
    """A whole llama-server stream: role chunk, one chunk per token, finish, [usage], [DONE].

    ``ping`` (e.g. ``b":\\n\\n"`` or ``b": ping\\n\\n"``) goes before every event.
    """
    out = [data(chunk({"role": "assistant", "content": None}), ascii=ascii)]
    out += [data(chunk({"content": t}), ascii=ascii) for t in tokens]
    if finish is not None:
        out.append(data(chunk({}, finish), ascii=ascii))
    if usage:
        out.append(data(usage_chunk(len(tokens)), ascii=ascii))
    if done:
        out.append(DONE)
    if ping is not None:
        out = [x for ev in out for x in (ping, ev)]
    return out


# ------------------------------------------------------- reply builders ----
_SSE_HEADERS = (("Server", "llama.cpp"), ("Content-Type", "text/event-stream"),
                ("Access-Control-Allow-Origin", ""))


def ok(tokens: Sequence[str] = ("Hel", "lo"), *, pattern: str = "events", seed: int = 0,
       gzip: bool = False, **kw: Any) -> Reply:
    """A good stream (``kw`` go to :func:`events`)."""
    return Reply(headers=_SSE_HEADERS, body=events(tokens, **kw), pattern=pattern, seed=seed, gzip=gzip)


def paced(n: int, gap: float = 0.02, token: str = "t") -> Reply:
    """A long stream paced like a real server: ``n`` tokens, ``gap`` seconds
    apart (a client that leaves is noticed at the next write or two)."""
    body: List[Item] = [data(chunk({"role": "assistant", "content": None}))]
    for _ in range(n):
        body += [Stall(gap), data(chunk({"content": token}))]
    body += [data(chunk({}, "stop")), DONE]
    return sse(body)


def sse(body: Sequence[Item], **kw: Any) -> Reply:
    """A 200 event stream with an arbitrary body."""
    return Reply(headers=_SSE_HEADERS, body=list(body), **kw)


def raw(status: int, body: bytes, content_type: str = "text/plain",
        headers: Sequence[Tuple[str, str]] = (), **kw: Any) -> Reply:
    """A plain (Content-Length) response; ``headers`` are sent too."""
    return Reply(status=status, headers=(("Content-Type", content_type),) + tuple(headers), body=[body],
                 chunked=False, **kw)


def api_error(status: int, message: str, type_: str, headers: Sequence[Tuple[str, str]] = ()) -> Reply:
    """llama-server's JSON error response (``headers``: extra ones, e.g. Retry-After)."""
    body = json.dumps(error_envelope(message, type_, status), separators=(",", ":")).encode()
    return raw(status, body, "application/json; charset=utf-8", headers)


def redirect(location: str, status: int = 302) -> Reply:
    return Reply(status=status, headers=(("Location", location), ("Content-Type", "text/plain")),
                 body=[b"moved"], chunked=False)


def reset_now() -> Reply:
    """Answer the request with a RST before any byte."""
    return Reply(body=[Reset()])


# --------------------------------------------------------------- server ----
_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect",
            308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized",
            404: "Not Found", 408: "Request Timeout", 409: "Conflict", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class _ClientGone(Exception):
    pass


class _Abort(Exception):
    pass


class LoopbackServer:
    """See the module docstring. ``listen=False`` binds the port but refuses
    connections until :meth:`listen` is called (for connect-retry tests)."""

    def __init__(self, *, listen: bool = True) -> None:
        self.requests: List[Request] = []
        self.outcomes: List[str] = []       # one per chat reply: complete/reset/closed/client-gone/stopped
        self.bytes_sent: List[int] = []     # body bytes written per chat reply
        self.compressed: List[bool] = []    # per chat reply: gzip used
        self.ended_at: List[float] = []     # per chat reply: time.monotonic() when it ended
        self._queue: List[Union[Reply, Callable[[Request], Reply]]] = [ok()]
        #: other POST paths: path -> handler(request) -> Reply (see :meth:`route`)
        self.routes: Dict[str, Callable[[Request], Reply]] = {}
        #: GET paths: path -> handler(request) -> Reply (``route(..., method="GET")``)
        self.get_routes: Dict[str, Callable[[Request], Reply]] = {}
        self._lock = threading.Condition()
        self._busy = 0
        self._stop = threading.Event()
        self._conns: Dict[int, socket.socket] = {}
        self._threads: List[threading.Thread] = []
        self._nconn = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._accepter = threading.Thread(target=self._accept_loop, name=f"loopback-{self.port}", daemon=True)
        self._listening = False
        if listen:
            self.listen()

    # -- control --------------------------------------------------------
    def listen(self) -> None:
        if not self._listening:
            self._listening = True
            self._sock.listen(64)
            self._accepter.start()

    def script(self, *replies: Union[Reply, Callable[[Request], Reply]]) -> "LoopbackServer":
        """Queue replies for the next chat requests; the last one repeats."""
        assert replies
        with self._lock:
            self._queue = list(replies)
        return self

    def route(self, path: str, handler: Callable[[Request], Reply], *, method: str = "POST") -> "LoopbackServer":
        """Answer ``POST path`` (``/v1/embeddings``, ``/v1/rerank`` …) with
        ``handler(request)``; with ``method="GET"``, ``GET path`` (``/v1/models`` …)."""
        (self.get_routes if method == "GET" else self.routes)[path] = handler
        return self

    def chat_requests(self) -> List[Request]:
        return [r for r in self.requests if r.path.split("?")[0] == CHAT_PATH]

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no reply is being written (server side finished)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def wait_replies(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until ``n`` chat replies have ended (``outcomes`` has ``n`` entries)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.outcomes) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        self._stop.set()
        if self._accepter.is_alive():
            self._accepter.join(2)
        self._sock.close()
        with self._lock:
            conns = list(self._conns.values())
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(2)

    def __enter__(self) -> "LoopbackServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- accept / request parsing ---------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._nconn += 1
            t = threading.Thread(target=self._serve, args=(conn, self._nconn), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        conn.settimeout(IO_TIMEOUT_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._conns[n] = conn
        buf = bytearray()
        try:
            for _ in range(MAX_REQUESTS_PER_CONN):
                req = self._read_request(conn, n, buf)
                if req is None or self._stop.is_set():
                    break
                if not self._answer(conn, req):
                    break
        except (OSError, _ClientGone, _Abort):
            pass
        finally:
            with self._lock:
                self._conns.pop(n, None)
            try:
                conn.close()
            except OSError:
                pass

    def _recv(self, conn: socket.socket, buf: bytearray) -> bool:
        try:
            b = conn.recv(65536)
        except socket.timeout:
            return False
        if not b:
            return False
        buf += b
        return True

    def _read_request(self, conn: socket.socket, n: int, buf: bytearray) -> Optional[Request]:
        while b"\r\n\r\n" not in buf:
            if len(buf) > 1 << 20 or not self._recv(conn, buf):
                return None
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        buf[:] = rest
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = (lines[0].split(" ", 2) + ["", ""])[:3]
        raw_headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            raw_headers.append((k.strip(), v.strip()))
        headers = {k.lower(): v for k, v in raw_headers}
        if headers.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._read_chunked(conn, buf)
        else:
            length = int(headers.get("content-length", "0") or 0)
            while len(buf) < length:
                if not self._recv(conn, buf):
                    return None
            body, buf[:] = bytes(buf[:length]), buf[length:]
        req = Request(method, path, headers, raw_headers, body, n, head + b"\r\n\r\n")
        with self._lock:
            self.requests.append(req)
        return req

    def _read_chunked(self, conn: socket.socket, buf: bytearray) -> bytes:
        body = bytearray()
        for _ in range(1 << 16):
            while b"\r\n" not in buf:
                if not self._recv(conn, buf):
                    raise _ClientGone
            line, _, rest = bytes(buf).partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            while len(rest) < size + 2:
                buf[:] = rest
                if not self._recv(conn, buf):
                    raise _ClientGone
                rest = bytes(buf)
            body += rest[:size]
            buf[:] = rest[size + 2:]
            if size == 0:
                return bytes(body)  # (no trailers expected)
        raise _ClientGone

    # -- replies ---------------------------------------------------------
    def _next_reply(self, req: Request) -> Reply:
        with self._lock:
            r = self._queue.pop(0) if len(self._queue) > 1 else self._queue[0]
        return r(req) if callable(r) else r

    def _answer(self, conn: socket.socket, req: Request) -> bool:
        """Write one response; False when the connection must end."""
        route = req.path.split("?")[0]
        if route == CHAT_PATH and req.method == "POST":
            reply = self._next_reply(req)
            with self._lock:
                self._busy += 1
            outcome, keep, sent, gz = "error", False, 0, False
            try:
                outcome, keep, sent, gz = self._write_reply(conn, req, reply)
            finally:
                with self._lock:
                    self.outcomes.append(outcome)
                    self.bytes_sent.append(sent)
                    self.compressed.append(gz)
                    self.ended_at.append(time.monotonic())
                    self._busy -= 1
                    self._lock.notify_all()
            return keep
        if route in self.routes and req.method == "POST":
            reply = self.routes[route](req)
        elif route in self.get_routes and req.method == "GET":
            reply = self.get_routes[route](req)
        elif route == "/health":
            reply = raw(200, b'{"status":"ok"}', "application/json")
        else:
            reply = api_error(404, "File Not Found", "not_found_error")
        return self._write_reply(conn, req, reply)[1]

    def _write_reply(self, conn: socket.socket, req: Request, r: Reply) -> Tuple[str, bool, int, bool]:
        gz = r.gzip and "gzip" in req.headers.get("accept-encoding", "")
        sent = [0]  # body bytes on the wire (before chunk framing)
        try:
            outcome, keep = self._write_body(conn, req, r, gz, sent)
        except (_ClientGone, OSError):
            outcome, keep = "client-gone", False
        except _Abort:
            outcome, keep = "stopped", False
        return outcome, keep, sent[0], gz

    def _write_body(self, conn: socket.socket, req: Request, r: Reply, gz: bool, sent: List[int]) -> Tuple[str, bool]:
        client_close = req.headers.get("connection", "").lower() == "close"
        keep = r.keep_alive and r.chunked and not client_close
        if r.delay and self._stop.wait(min(r.delay, MAX_STALL_S)):
            return "stopped", False
        if r.body and isinstance(r.body[0], Reset):
            _reset(conn)
            return "reset", False
        for block in r.interim:
            self._send(conn, block)
        head = [f"HTTP/1.1 {r.status} {r.reason or _REASONS.get(r.status, 'Status')}"]
        head += [f"{k}: {v}" for k, v in r.headers]
        if gz:
            head.append("Content-Encoding: gzip")
        if r.chunked:
            head.append("Transfer-Encoding: chunked")
        elif r.body and all(isinstance(x, bytes) for x in r.body) and not gz:
            head.append(f"Content-Length: {sum(len(x) for x in r.body)}")
            keep = r.keep_alive and not client_close
        head.append("Connection: keep-alive" if keep else "Connection: close")
        self._send(conn, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))

        comp = zlib.compressobj(6, zlib.DEFLATED, 31) if gz else None
        rng = random.Random(r.seed)
        pending: List[bytes] = []

        def flush() -> None:
            for piece in _split(pending, r.pattern, rng):
                self._send(conn, _frame(piece, r.chunked))
                sent[0] += len(piece)
            pending.clear()

        for item in r.body:
            if isinstance(item, bytes):
                if comp is not None:
                    item = comp.compress(item) + comp.flush(zlib.Z_SYNC_FLUSH)
                pending.append(item)
                continue
            flush()
            if isinstance(item, Stall):
                if self._stop.wait(min(item.seconds, MAX_STALL_S)):
                    return "stopped", False
            elif isinstance(item, Reset):
                _reset(conn)
                return "reset", False
            elif isinstance(item, Close):
                return "closed", False
            elif isinstance(item, Huge):
                self._write_huge(conn, item, r.chunked, sent)
        if comp is not None:
            pending.append(comp.flush())
        flush()
        if r.chunked:
            self._send(conn, b"0\r\n\r\n")
        return "complete", keep

    def _write_huge(self, conn: socket.socket, h: Huge, chunked: bool, sent: List[int]) -> None:
        head = b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"'
        tail = b'"}}],"object":"chat.completion.chunk"}\n\n'
        self._send(conn, _frame(head, chunked))
        sent[0] += len(head)
        piece, left = b"a" * h.piece, h.size
        while left > 0:
            if self._stop.is_set():
                raise _Abort
            n = min(h.piece, left)
            self._send(conn, _frame(piece[:n], chunked))
            sent[0] += n
            left -= n
        self._send(conn, _frame(tail, chunked))
        sent[0] += len(tail)

    def _send(self, conn: socket.socket, b: bytes) -> None:
        try:
            conn.sendall(b)
        except (BrokenPipeError, ConnectionResetError, socket.timeout) as e:
            raise _ClientGone from e


def _frame(b: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(b), b) if chunked else b


def _split(items: List[bytes], pattern: str, rng: random.Random) -> List[bytes]:
    items = [x for x in items if x]
    if pattern == "events":
        return items
    whole = b"".join(items)
    if not whole:
        return []
    if pattern == "one":
        return [whole]
    if pattern == "bytes":
        return [whole[i:i + 1] for i in range(len(whole))]
    if pattern == "random":
        cuts = sorted(rng.sample(range(1, len(whole)), min(len(whole) - 1, rng.randint(0, 12)))) if len(whole) > 1 else []
        bounds = [0] + cuts + [len(whole)]
        return [whole[a:b] for a, b in zip(bounds, bounds[1:])]
    raise ValueError(f"unknown pattern {pattern!r}")


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
