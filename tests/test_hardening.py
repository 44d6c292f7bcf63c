"""Hardening: Ctrl-C, TLS, and no leaks over many streams.

- KeyboardInterrupt inside ``on_delta`` or while waiting on a stalled server
  closes the connection, is re-raised, and leaves the Broker usable.
- TLS is verified by default; ``ca_bundle`` trusts a given CA; ``verify=False``
  works only when asked for, with a warning.
- 10,000 sequential streams and 1,000 cancelled streams leave RSS and open
  file descriptors flat (measured in a child process, so the loopback
  server's own bookkeeping is not counted).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from typing import Iterator, List

import pytest

import llama_broker as lb
from loopback import LoopbackServer, Stall, events, ok, sse

HERE = os.path.dirname(os.path.abspath(__file__))
MSGS = [{"role": "user", "content": "hi"}]


# -- KeyboardInterrupt ------------------------------------------------------------


def test_keyboard_interrupt_in_on_delta_closes_and_leaves_broker_usable() -> None:
    with LoopbackServer() as srv:
        # after a pause the server writes on: a closed connection shows as client-gone
        srv.script(sse(events(["a", "b"], done=False) + [Stall(0.5)] + events(["c"] * 50)), ok(["fine"]))
        cfg = lb.ModelConfig(srv.url, max_retries=0)
        broker = lb.Broker(cfg)

        def on_delta(text: str) -> None:
            raise KeyboardInterrupt

        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            broker.chat_stream(MSGS, on_delta)
        assert time.monotonic() - t0 < 3  # did not wait for the stall to end
        assert srv.wait_idle(5)
        assert srv.outcomes[0] == "client-gone"  # the connection was closed
        assert broker.chat(MSGS) == "fine"  # the same Broker still works
        broker.close()


_SIGINT_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    # A process started in the background (nohup, some CI runners) inherits
    # SIGINT as ignored; Ctrl-C is what this child tests, so take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {here!r})
    import llama_broker as lb
    from loopback import LoopbackServer, Stall, events, ok, sse

    out = {{}}
    with LoopbackServer() as srv:
        srv.script(sse(events(["a"], done=False) + [Stall(3)] + events(["b"] * 50)), ok(["after"]))
        cfg = lb.ModelConfig(srv.url, max_retries=0, idle_timeout_ms=None, timeout_ms=60000)
        broker = lb.Broker(cfg)
        threading.Timer(0.7, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        got = []
        try:
            if {mode!r} == "chat_stream":
                broker.chat_stream([{{"role": "user", "content": "x"}}], got.append)
            else:
                with broker.stream([{{"role": "user", "content": "x"}}]) as s:
                    for d in s:
                        got.append(d.content)
            out["raised"] = None
        except KeyboardInterrupt:
            out["raised"] = "KeyboardInterrupt"
        out["seconds"] = time.monotonic() - t0
        out["got"] = [g for g in got if g]
        srv.wait_idle(5)
        out["outcome"] = srv.outcomes[0] if srv.outcomes else None
        out["after"] = broker.chat([{{"role": "user", "content": "x"}}])
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("mode", ["chat_stream", "stream"])
def test_ctrl_c_while_waiting_on_a_stalled_server(mode: str) -> None:
    # In a child process: a real SIGINT, delivered while curl waits for bytes.
    code = _SIGINT_CHILD.format(here=HERE, mode=mode)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["raised"] == "KeyboardInterrupt"
    assert out["seconds"] < 2.5, out  # not the 3 s stall, not a timeout
    assert out["got"] == ["a"]  # what arrived before was delivered
    assert out["outcome"] == "client-gone"  # the connection was closed
    assert out["after"] == "after"  # and the Broker still works
    assert "Traceback" not in proc.stderr


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl command line tool")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    body = b"".join(events(["se", "cure"]))
    seen: List[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    th = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    th.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", str(cert), seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_tls_is_verified_by_default(tls_server: tuple) -> None:
    url, _, _ = tls_server
    with pytest.raises(lb.ConnectError) as ei:
        lb.chat(lb.ModelConfig(url, max_retries=0), MSGS)
    assert ei.value.curl_code == 60  # CURLE_PEER_FAILED_VERIFICATION
    assert "certificate" in str(ei.value).lower()


def test_tls_ca_bundle_trusts_the_given_ca(tls_server: tuple) -> None:
    url, cert, _ = tls_server
    assert lb.chat(lb.ModelConfig(url, ca_bundle=cert), MSGS) == "secure"


def test_tls_verify_off_only_on_request_and_with_a_warning(tls_server: tuple) -> None:
    url, _, _ = tls_server
    with pytest.warns(RuntimeWarning, match="TLS certificates are not checked"):
        cfg = lb.ModelConfig(url, verify=False)
    assert lb.chat(cfg, MSGS) == "secure"
    with pytest.raises(lb.ConfigError, match="ca_bundle"):
        lb.ModelConfig(url, verify=False, ca_bundle="/x.pem")


# -- no leaks ----------------------------------------------------------------------------

_LEAK_CHILD = textwrap.dedent(
    """
    import json, os, sys, gc
    import llama_broker as lb
    url = sys.argv[1]
    cfg = lb.ModelConfig(url, max_retries=0)
    msgs = [{"role": "user", "content": "x"}]

    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    def fds():
        return len(os.listdir("/proc/self/fd"))

    broker = lb.Broker(cfg)

    def sequential(n):
        for _ in range(n):
            assert broker.chat(msgs) == "Hello" + "!" * 40

    def cancelled(n):
        for _ in range(n):
            s = broker.stream(msgs)
            next(s)  # one delta, then leave: the connection is cut
            s.close()

    out = {}
    sequential(500); cancelled(100); gc.collect()      # warm up: pools, caches
    r0, f0 = rss_kb(), fds()
    sequential(10000); gc.collect()
    r1, f1 = rss_kb(), fds()
    cancelled(1000); gc.collect()
    r2, f2 = rss_kb(), fds()
    out.update(rss0=r0, rss1=r1, rss2=r2, fd0=f0, fd1=f1, fd2=f2)
    print(json.dumps(out))
    """
)


def test_10000_streams_and_1000_cancelled_streams_leave_rss_and_fds_flat() -> None:
    with LoopbackServer() as srv:
        srv.script(ok(["Hel", "lo"] + ["!"] * 40))
        proc = subprocess.run(
            [sys.executable, "-c", _LEAK_CHILD, srv.url], capture_output=True, text=True, timeout=600
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Flat: a leaked easy handle, splitter or socket per stream would add
    # megabytes (10,000 × a few hundred bytes at the very least) and fds.
    assert out["rss1"] - out["rss0"] < 2048, out  # KiB
    assert out["rss2"] - out["rss0"] < 2048, out
    # a few keep-alive connections may come and go (pools are bounded); a leak
    # would be one fd per stream
    assert out["fd1"] <= out["fd0"] + 8, out
    assert out["fd2"] <= out["fd0"] + 8, out


_BIG_STREAM_CHILD = textwrap.dedent(
    """
    import json, sys
    import llama_broker as lb

    def hwm_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

    cfg = lb.ModelConfig(sys.argv[1], max_retries=0, timeout_ms=300000)
    msgs = [{"role": "user", "content": "x"}]
    lb.chat(cfg, msgs)  # warm up: imports, handles, buffers
    base = hwm_kb()
    n = [0]
    def on_delta(text):
        n[0] += 1
    res = lb.chat_stream(cfg, msgs, on_delta)
    print(json.dumps({"base": base, "peak": hwm_kb(), "deltas": n[0], "finish": res.finish_reason}))
    """
)


def test_a_200000_event_stream_is_not_buffered() -> None:
    # chat_stream keeps nothing per event: the peak RSS of the client after a
    # 200,000-event (~45 MB) stream stays within a few MB of where it started.
    n = 200_000
    with LoopbackServer() as srv:
        srv.script(ok(["warm"]), ok(["tok"] * n, pattern="one"))  # the warm-up gets the short one
        proc = subprocess.run(
            [sys.executable, "-c", _BIG_STREAM_CHILD, srv.url], capture_output=True, text=True, timeout=600
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["deltas"] == n and out["finish"] == "stop"
    assert out["peak"] - out["base"] < 4096, out  # KiB
