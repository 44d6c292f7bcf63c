"""The stream server's pacer (plain tests, no timing figures): right bytes, paced, many at once."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import List

import pytest

from .streamserver import StreamServer, render

GAP_US = 2000


def _post(conn: http.client.HTTPConnection, body: dict):
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def _stats(srv: StreamServer) -> dict:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@pytest.fixture
def srv():
    with StreamServer(max_connections=256) as s:
        yield s


@pytest.mark.parametrize("phase", ["spread", "aligned"])
def test_pacer_sends_the_whole_stream_paced(srv, phase):
    n = 20
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        for _ in range(2):  # the second request on the same keep-alive connection
            t0 = time.monotonic()
            r = _post(conn, {"bench_mode": "paced", "bench_events": n, "bench_gap_us": GAP_US, "bench_phase": phase})
            body = r.read()
            took = time.monotonic() - t0
            assert r.status == 200
            assert body == render(n).body
            # paced, not sent at once: the last token is due (n - 1) gaps after the first
            assert took >= (n - 1) * GAP_US / 1e6
    finally:
        conn.close()
    st = _stats(srv)
    assert st["paced_ticks"] == 2 * (n + 1)  # headers + role, then one tick per token
    assert st["paced_active"] == 0


def test_pacer_serves_many_streams_at_once(srv):
    n, streams = 10, 64
    out: List[bytes] = [b""] * streams
    errors: List[BaseException] = []

    def one(i: int) -> None:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        try:
            out[i] = _post(conn, {"bench_mode": "paced", "bench_events": n, "bench_gap_us": GAP_US}).read()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a paced stream did not finish within 60 s"
    assert not errors, errors[:3]
    assert all(b == render(n).body for b in out)
    assert _stats(srv)["paced_ticks"] == streams * (n + 1)


def test_pacer_survives_a_client_that_leaves(srv):
    s = socket.create_connection((srv.host, srv.port), timeout=10)
    body = json.dumps({"bench_mode": "paced", "bench_events": 500, "bench_gap_us": GAP_US}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    s.close()  # mid-stream
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        r = _post(conn, {"bench_mode": "paced", "bench_events": 5, "bench_gap_us": GAP_US})
        assert r.read() == render(5).body
    finally:
        conn.close()
    deadline = time.monotonic() + 10
    while _stats(srv)["paced_active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stats(srv)["paced_active"] == 0, "the abandoned stream is still in the pacer"


def test_bad_phase_is_a_400(srv):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        r = _post(conn, {"bench_mode": "paced", "bench_events": 3, "bench_gap_us": GAP_US, "bench_phase": "late"})
        assert r.status == 400
        assert "bench_phase" in json.loads(r.read())["error"]["message"]
    finally:
        conn.close()


def test_paced_whole_answer_comes_when_its_last_token_would(srv):
    # a non-streamed request to a paced stream: one JSON answer, n gaps after the request
    n = 25
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        for _ in range(2):  # keep-alive holds
            t0 = time.monotonic()
            r = _post(conn, {"bench_mode": "paced", "bench_events": n, "bench_gap_us": GAP_US, "bench_whole": True})
            body = json.loads(r.read())
            took = time.monotonic() - t0
            assert r.status == 200
            assert body["choices"][0]["message"]["content"] == render(n).content
            assert took >= n * GAP_US / 1e6 * 0.95
    finally:
        conn.close()
