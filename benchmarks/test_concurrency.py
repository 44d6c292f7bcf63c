"""Many streams at once: aggregate events/s and client CPU per event.

``S`` concurrent streams of ``n`` content events each, from the stream server
(``streamserver.py``) in its own process, for each client:

``llama_broker.amap``   ``async for r in broker.amap(reqs, concurrency=S)``
``llama_broker.achat``  ``asyncio.gather`` of ``S`` ``broker.achat(...)``
``llama_broker.map``    ``for r in broker.map(reqs, concurrency=S)`` (sync, one thread)
``openai``              ``AsyncOpenAI`` + ``asyncio.gather`` of ``S`` streamed
                        ``chat.completions.create`` (the SDK row: "× SDK" in the report)
``pycurl multi+json``   the pure-Python way: one ``CurlMulti``, ``S`` easy handles,
                        ``perform``/``select``/``info_read`` loop, a Python line
                        splitter and ``json.loads`` per event

Shapes: 64 × 2,000 and 256 × 500 events (``LB_BENCH_SHORT=1``: 64 × 200 and
256 × 50; ``LB_BENCH_CONC="64x2000,256x500"`` to choose), each in the wire
modes of ``LB_BENCH_CONC_WIRE`` (default ``bulk,event``; see streamserver.py).
The report's "mode" is ``<wire> ×S``. Every stream's text is checked against
the stream's SHA-256 after each round.

Besides the usual fields (``_harness.bench``), ``extra_info`` holds
``streams``, ``events_per_stream``, ``peak_rss_mb`` (the most the process's
resident set grew above its size at the start of a round: ``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, else the ``ru_maxrss``
growth), and ``x_async_openai_cpu`` / ``x_async_openai_rate`` (AsyncOpenAI's
CPU µs/event over this client's, this client's events/s over AsyncOpenAI's,
same mode and run; the SDK row runs first in each mode).

The server is started here rather than through the session fixture: this
suite needs it to take 256 connections at once, so it asks the server process
for a larger connection limit and accept backlog.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from . import _harness as h
from .streamserver import ServerProcess, render

# -- settings ----------------------------------------------------------------


def _shapes() -> List[Tuple[int, int]]:
    spec = os.environ.get("LB_BENCH_CONC")
    if spec:
        out = []
        for part in spec.split(","):
            s, _, n = part.strip().lower().partition("x")
            out.append((int(s), int(n)))
        return out
    return [(64, 200), (256, 50)] if h.SHORT else [(64, 2000), (256, 500)]


SHAPES = _shapes()
WIRES = [w.strip() for w in os.environ.get("LB_BENCH_CONC_WIRE", "bulk,event").split(",") if w.strip()]
MAX_CONNECTIONS = 1024
BACKLOG = 1024
ROUND_TIMEOUT_S = 600.0

@pytest.fixture(scope="module")
def wide_srv():
    warm = sorted({f"{'bulk' if w == 'bulk' else 'event'}:{n}" for w in WIRES for _, n in SHAPES})
    with ServerProcess(max_connections=MAX_CONNECTIONS, backlog=BACKLOG, warm=warm) as s:
        yield s


# -- memory -------------------------------------------------------------------

_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakRSS:
    """Per round: how far the resident set rose above its size when the round began (MB)."""

    def __init__(self) -> None:
        self.deltas: List[float] = []
        self.how = "VmHWM"

    def wrap(self, run: Callable[[], Any]) -> Callable[[], Any]:
        def measured() -> Any:
            can_reset = _reset_peak()
            rss0 = _status_kb("VmRSS")
            max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = run()
            if can_reset and rss0 is not None:
                hwm = _status_kb("VmHWM") or 0
                self.deltas.append(max(0, hwm - rss0) / 1024)
            else:
                self.how = "ru_maxrss growth"
                self.deltas.append(max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max0) / 1024)
            return out

        reads = getattr(run, "reads", None)
        if reads is not None:
            measured.reads = reads  # type: ignore[attr-defined]
        return measured


# -- clients --------------------------------------------------------------------
# make(url, wire, streams, n) -> run; run() returns the list of texts; run.close() tears down.


def _requests(wire: str, streams: int, n: int) -> List[Dict[str, Any]]:
    return [{"messages": h.MESSAGES, **h.bench_params(wire, n)} for _ in range(streams)]


def _cfg(url: str):
    import llama_broker

    return llama_broker.ModelConfig(endpoint=url, model="m", timeout_ms=int(ROUND_TIMEOUT_S * 1000))


def make_lb_amap(url: str, wire: str, streams: int, n: int):
    import llama_broker

    broker = llama_broker.Broker(_cfg(url))
    loop = asyncio.new_event_loop()
    reqs = _requests(wire, streams, n)

    async def go() -> List[str]:
        texts: List[str] = [""] * streams
        async for r in broker.amap(reqs, concurrency=streams, progress=False):
            if r.error is not None:
                raise r.error
            texts[r.index] = r.text
        return texts

    def run() -> List[str]:
        return loop.run_until_complete(go())

    def close() -> None:
        broker.close()
        loop.close()

    run.close = close  # type: ignore[attr-defined]
    return run


def make_lb_achat(url: str, wire: str, streams: int, n: int):
    import llama_broker

    broker = llama_broker.Broker(_cfg(url))
    loop = asyncio.new_event_loop()
    extra = h.bench_params(wire, n)

    async def go() -> List[str]:
        return list(await asyncio.gather(*(broker.achat(h.MESSAGES, **extra) for _ in range(streams))))

    def run() -> List[str]:
        return loop.run_until_complete(go())

    def close() -> None:
        broker.close()
        loop.close()

    run.close = close  # type: ignore[attr-defined]
    return run


def make_lb_map(url: str, wire: str, streams: int, n: int):
    import llama_broker

    broker = llama_broker.Broker(_cfg(url))
    reqs = _requests(wire, streams, n)

    def run() -> List[str]:
        texts: List[str] = [""] * streams
        for r in broker.map(reqs, concurrency=streams, progress=False):
            if r.error is not None:
                raise r.error
            texts[r.index] = r.text
        return texts

    run.close = broker.close  # type: ignore[attr-defined]
    return run


def make_async_openai(url: str, wire: str, streams: int, n: int):
    import openai

    loop = asyncio.new_event_loop()
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=ROUND_TIMEOUT_S)
    extra = h.bench_params(wire, n)

    async def one() -> str:
        parts: List[str] = []
        stream = await client.chat.completions.create(model="m", messages=h.MESSAGES, stream=True, extra_body=extra)
        async for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    parts.append(content)
        return "".join(parts)

    async def go() -> List[str]:
        return list(await asyncio.gather(*(one() for _ in range(streams))))

    def run() -> List[str]:
        return loop.run_until_complete(go())

    def close() -> None:
        loop.run_until_complete(client.close())
        loop.close()

    run.close = close  # type: ignore[attr-defined]
    return run


def make_pycurl_multi(url: str, wire: str, streams: int, n: int):
    """The pure-Python way with many streams: one CurlMulti, a line splitter and json.loads per event."""
    import pycurl

    body = h.request_body(wire, n)
    handles = [h._curl_handle(url, body) for _ in range(streams)]
    multi = pycurl.CurlMulti()
    reads = [0]

    def run() -> List[str]:
        splitters = []
        for c in handles:
            sp = h.PyLineSplitter(json.loads)
            c.setopt(pycurl.WRITEFUNCTION, sp.write)
            splitters.append(sp)
            multi.add_handle(c)
        remaining = streams
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        try:
            while remaining:
                while True:
                    ret, _ = multi.perform()
                    if ret != pycurl.E_CALL_MULTI_PERFORM:
                        break
                while True:
                    queued, ok, failed = multi.info_read()
                    for c in ok:
                        multi.remove_handle(c)
                        remaining -= 1
                    if failed:
                        c, code, msg = failed[0]
                        raise AssertionError(f"pycurl multi: curl error {code}: {msg}")
                    if not queued:
                        break
                if remaining:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"pycurl multi: {remaining} streams unfinished after {ROUND_TIMEOUT_S}s")
                    multi.select(1.0)
        finally:
            for c in handles:
                try:
                    multi.remove_handle(c)
                except pycurl.error:
                    pass
        for c, sp in zip(handles, splitters):
            status = c.getinfo(pycurl.RESPONSE_CODE)
            assert status == 200, f"HTTP {status}"
            assert sp.done, "stream ended before [DONE]"
        reads[0] = sum(sp.writes for sp in splitters)
        return ["".join(sp.parts) for sp in splitters]

    def close() -> None:
        for c in handles:
            c.close()
        multi.close()

    run.reads = reads  # type: ignore[attr-defined]
    run.close = close  # type: ignore[attr-defined]
    return run


# (name, factory, module it needs, Broker method it needs)
CLIENTS: Dict[str, Tuple[Callable, str, Optional[str]]] = {
    "openai": (make_async_openai, "openai", None),  # first: the others' ratios need it
    "llama_broker.amap": (make_lb_amap, "llama_broker", "amap"),
    "llama_broker.achat": (make_lb_achat, "llama_broker", "achat"),
    "llama_broker.map": (make_lb_map, "llama_broker", "map"),
    "pycurl multi+json": (make_pycurl_multi, "pycurl", None),
}
NOTES = {
    "openai": "AsyncOpenAI + asyncio.gather",
    "llama_broker.achat": "asyncio.gather of achat",
    "pycurl multi+json": "pure Python: CurlMulti loop, line split, json.loads",
}

#: (mode) -> AsyncOpenAI's (cpu µs/event, events/s) in this run
_SDK: Dict[str, Tuple[float, float]] = {}


def _texts_check(streams: int, n: int) -> Callable[[object], None]:
    one = h.text_check(n)
    want = render(n).sha256

    def check(texts: object) -> None:
        assert isinstance(texts, list) and len(texts) == streams, f"{type(texts).__name__} of {len(texts) if isinstance(texts, list) else '?'}"
        for i, t in enumerate(texts):
            try:
                one(t)
            except AssertionError as e:
                raise AssertionError(f"stream {i} of {streams} (sha256 {want[:12]}…): {e}") from None

    return check


def _ids(shape: Tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("client", list(CLIENTS))
def test_concurrent(benchmark, wide_srv, client, shape, wire):
    make, needs, api = CLIENTS[client]
    mod = pytest.importorskip(needs)
    if api is not None and not hasattr(getattr(mod, "Broker", None), api):
        pytest.skip(f"llama_broker.Broker.{api} is not there yet")
    streams, n = shape
    mode = f"{wire} ×{streams}"
    total = streams * n
    run = make(wide_srv.url, wire, streams, n)
    peak = PeakRSS()
    try:
        h.bench(
            benchmark, peak.wrap(run), _texts_check(streams, n), client=client, mode=mode, n=total,
            group=f"concurrent: {wire}, {streams} streams x {n} events", nbytes=streams * len(render(n).body),
            note=NOTES.get(client, ""),
        )
    finally:
        run.close()
    info = benchmark.extra_info
    info.update(
        streams=streams,
        events_per_stream=n,
        wire=wire,
        peak_rss_mb=round(max(peak.deltas), 1) if peak.deltas else None,
        peak_rss_how=peak.how,
    )
    cpu = info.get("cpu_us_per_event_median", info["cpu_us_per_event"])
    eps = info["events_per_s"]
    if client == "openai":
        _SDK[mode] = (cpu, eps)
    sdk = _SDK.get(mode)
    if sdk is not None and cpu > 0 and sdk[1] > 0:
        info["x_async_openai_cpu"] = sdk[0] / cpu
        info["x_async_openai_rate"] = eps / sdk[1]
    if info.get("peak_rss_mb") is not None:
        rss = f"peak RSS +{info['peak_rss_mb']:.0f} MB"
        info["note"] = f"{info['note']}; {rss}" if info.get("note") else rss
