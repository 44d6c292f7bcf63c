"""End to end: each client streams the same response from the stream server.

Every server mode for every client: ``bulk`` (64 KiB writes), ``event``
(one write per event, as fast as the server goes) and ``paced`` (one write
per event with a pause after each: one event per read). Each run's text is
checked against the stream's SHA-256 (the transport floors check the body
byte count instead).
"""

from __future__ import annotations

import json

import pytest

from . import _harness as h
from .streamserver import MODES

# (name, factory, events, what run() returns, module it needs)
CLIENTS = {
    "llama_broker": (h.make_llama_broker, h.N, "text", "llama_broker"),
    "llama_broker.chat": (h.make_llama_broker_chat, h.N, "text", "llama_broker"),
    "llama_broker.stream": (h.make_llama_broker_stream, h.N, "text", "llama_broker"),
    "pycurl+orjson": (None, h.N, "text", "orjson"),
    "pycurl+json": (h.make_pycurl(json.loads), h.N, "text", "pycurl"),
    "httpx-sse+json": (h.make_httpx_sse, h.N, "text", "httpx_sse"),
    "openai": (h.make_openai, h.SDK_N, "text", "openai"),
    "pycurl no-op": (h.make_pycurl_noop, h.N, "bytes", "pycurl"),
    "curl CLI": (h.make_curl_cli, h.N, "bytes", None),
}

NOTES = {
    "openai": "N/10 events",
    "pycurl no-op": "transport floor, in process",
    "curl CLI": "transport floor, subprocess; start-up CPU subtracted",
}


def _factory(name):
    make, n, kind, needs = CLIENTS[name]
    if needs:
        mod = pytest.importorskip(needs)
        api = name.split(".")[1] if "." in name else "chat_stream"
        if needs == "llama_broker" and not hasattr(mod, api):
            pytest.skip(f"llama_broker.{api} is not there yet")
    if name == "pycurl+orjson":
        pytest.importorskip("pycurl")
        make = h.make_pycurl(mod.loads)
    if name == "curl CLI" and h.CURL is None:
        pytest.skip("no curl CLI on PATH (the pycurl no-op entry is the transport floor)")
    return make, n, kind


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("client", list(CLIENTS))
def test_stream(benchmark, srv, client, mode):
    make, n, kind = _factory(client)
    if mode == "paced":
        n = h.PACED_N
    run = make(srv.url, mode, n)
    kw = {}
    if client == "curl CLI":
        kw = dict(child_cpu=True, cpu_offset_s=h.curl_startup_cpu(srv.url))
    check = h.text_check(n) if kind == "text" else h.size_check(n)
    h.bench(
        benchmark, run, check, client=client, mode=mode, n=n, group=f"stream: {mode}",
        nbytes=len(h.render(n).body), note="" if n != h.SDK_N and client == "openai" else NOTES.get(client, ""),
        **kw,
    )


# -- paired: the one-event-per-write comparison, rounds interleaved ------------

PAIRED = ("llama_broker", "curl CLI", "pycurl no-op", "pycurl+orjson")


@pytest.mark.parametrize("mode", ["event", "paced"])
def test_paired_cpu(benchmark, srv, mode):
    """CPU per event of llama_broker vs the transport floors on the same one-event-per-write stream.

    The clients take turns within each round (the order rotating), so a noisy
    neighbour hits them alike; the ratios are per round, then the median.
    """
    n = h.N if mode == "event" else h.PACED_N
    runs = {}
    for name in PAIRED:
        make, _, kind = _factory(name)
        runs[name] = (make(srv.url, mode, n), h.text_check(n) if kind == "text" else h.size_check(n))
    offset = h.curl_startup_cpu(srv.url)
    cpu = {name: [] for name in PAIRED}
    turn = [0]

    def one_round():
        k = turn[0]
        turn[0] += 1
        for name in PAIRED[k % len(PAIRED):] + PAIRED[: k % len(PAIRED)]:
            run, check = runs[name]
            child = name == "curl CLI"
            _, c, out = h.measure(run, child_cpu=child, cpu_offset_s=offset if child else 0.0)
            check(out)
            cpu[name].append(c / n * 1e6)

    benchmark.group = f"paired: {mode}"
    benchmark.pedantic(one_round, rounds=h.ROUNDS, iterations=1, warmup_rounds=0)
    base = PAIRED[0]
    benchmark.extra_info.update(
        paired=True,
        mode=mode,
        events=n,
        rounds=turn[0],
        cpu_us_per_event={name: h.statistics.median(v) for name, v in cpu.items()},
        ratio={
            f"{base} / {name}": h.statistics.median(a / b for a, b in zip(cpu[base], cpu[name]) if b > 0)
            for name in PAIRED[1:]
        },
    )
