"""Paced streams: a token every 5 or 20 ms per stream, 1 / 64 / 256 streams at once.

The regime of a real llama-server: the client is idle between tokens and each
token costs it a wake-up. The number to read is **client CPU µs per token**
(this process's CPU time; the stream server runs in its own process, its
pacer thread sending every stream's events on schedule, see
``streamserver.py``), against the floors in the same run: ``floor:
easy.perform`` (1 stream) and ``floor: multi per-wake`` (many streams), and
against the OpenAI SDK (``× SDK``). ``floor: multi coalesced`` shows what
batching wake-ups could give. The clients are in ``_paced.py``.

One test per shape (gap, streams). Within it every client runs once per round,
the order rotating round by round, so a noisy neighbour hits them alike; the
ratios (× floor, × SDK) are taken per round, then the median. Each turn
builds the client, streams a 2-token reply per stream (imports, connections;
not measured), measures the real run and closes the client, so only one
client's connections are open at a time (``select()``-based loops see
descriptors below 1024 only). Every stream's text is checked against the stream's SHA-256
after each run (the floors: the body size).

Settings (environment): ``LB_BENCH_PACED_GAPS_MS`` (default ``5,20``),
``LB_BENCH_PACED_STREAMS`` (``1,64,256``), ``LB_BENCH_PACED_TOKENS`` (tokens
per stream for every shape; default: the ``TOKENS`` table),
``LB_BENCH_PACED_ROUNDS`` (3; short: 2), ``LB_BENCH_PACED_CLIENTS`` (a
comma-separated subset of client names), ``LB_BENCH_COALESCE_MS`` (5).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from . import _harness as h
from . import _paced as p
from .streamserver import ServerProcess, render


def _ints(var: str, default: str) -> List[int]:
    return [int(x) for x in (os.environ.get(var) or default).split(",") if x.strip()]


GAPS_MS = _ints("LB_BENCH_PACED_GAPS_MS", "5,20")
STREAMS = _ints("LB_BENCH_PACED_STREAMS", "1,64,256")
ROUNDS = int(os.environ.get("LB_BENCH_PACED_ROUNDS") or (2 if h.SHORT else 3))
ONLY = [c.strip() for c in (os.environ.get("LB_BENCH_PACED_CLIENTS") or "").split(",") if c.strip()]

#: tokens per stream by (gap ms, streams): (full, short). About 1-4 s per run in full mode.
TOKENS: Dict[Tuple[int, int], Tuple[int, int]] = {
    (5, 1): (400, 100),
    (20, 1): (200, 40),
    (5, 64): (200, 50),
    (20, 64): (100, 25),
    (5, 256): (100, 30),
    (20, 256): (50, 20),
}
#: clients run at 256 streams in short mode, at SHORT_256_GAPS_MS only (CI stays within a few minutes)
SHORT_256 = ("llama_broker.map", "llama_broker.amap", p.FLOOR_WAKE, p.FLOOR_COALESCED, p.SDK)
SHORT_256_GAPS_MS = (20,)
#: the SDK's share of the tokens by streams (it costs ~5-10x more per token and cannot keep up
#: with many streams: its runs take several times the pacing), (full, short)
SDK_SHARE = {64: (1.0, 0.5), 256: (0.5, 0.3)}
WARMUP_TOKENS = 2


def tokens(gap_ms: int, streams: int, client: str) -> int:
    env = os.environ.get("LB_BENCH_PACED_TOKENS")
    if env:
        n = int(env)
    else:
        full, short = TOKENS.get((gap_ms, streams), (max(20_000 // streams // gap_ms, 20),) * 2)
        n = short if h.SHORT else full
    if client == p.SDK and streams in SDK_SHARE:
        n = max(int(n * SDK_SHARE[streams][h.SHORT]), 5)
    return n


def clients_for(gap_ms: int, streams: int) -> List[str]:
    out = []
    for name, (_, _, where) in p.CLIENTS.items():
        if (where == "one" and streams != 1) or ((ONLY or where == "opt") and name not in ONLY):
            continue
        if h.SHORT and streams >= 256 and (name not in SHORT_256 or gap_ms not in SHORT_256_GAPS_MS):
            continue
        out.append(name)
    return out


@pytest.fixture(scope="module")
def paced_srv():
    """The stream server for this module, every stream it serves rendered ahead, room for 256+ connections."""
    ns = {tokens(g, s, c) for g, s in SHAPES for c in clients_for(g, s)} | {WARMUP_TOKENS}
    with ServerProcess(max_connections=2048, backlog=2048, warm=[f"event:{n}" for n in sorted(ns)]) as s:
        yield s


def server_stats(url: str, reset: bool = False) -> Dict[str, Any]:
    with urllib.request.urlopen(f"{url}/stats{'?reset=1' if reset else ''}", timeout=30) as r:
        return json.loads(r.read())


def _check(kind: str, streams: int, n: int) -> Callable[[Any], None]:
    one = h.text_check(n) if kind == "text" else h.size_check(n)

    def check(out: Any) -> None:
        assert isinstance(out, list) and len(out) == streams, f"got {type(out).__name__}, want {streams} results"
        for i, x in enumerate(out):
            try:
                one(x)
            except AssertionError as e:
                raise AssertionError(f"stream {i} of {streams}: {e}") from None

    return check


#: select() (pycurl's CurlMulti.select, llama_broker's sync engine) sees descriptors below this only
FD_LIMIT = 1024


def _open_fds() -> Optional[int]:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _ids(shape: Tuple[int, int]) -> str:
    return f"{shape[0]}ms-x{shape[1]}"


SHAPES = [(g, s) for g in GAPS_MS for s in STREAMS if clients_for(g, s)]


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_paced(benchmark, paced_srv, shape):
    gap_ms, streams = shape
    gap_us = gap_ms * 1000
    url = paced_srv.url
    names = clients_for(gap_ms, streams)
    makers: Dict[str, Tuple[Callable[[], p.PacedClient], int]] = {}
    skipped: Dict[str, str] = {}
    for name in names:
        make, needs, _ = p.CLIENTS[name]
        try:
            __import__(needs)
        except ImportError as e:
            skipped[name] = f"not installed: {e.name}"
            continue
        makers[name] = (lambda make=make: make(url, streams, p.paced(gap_us)), tokens(gap_ms, streams, name))
    if not makers:
        pytest.skip(f"no client runs in this shape here: {skipped or 'none chosen (short mode or LB_BENCH_PACED_CLIENTS)'}")
    order = list(makers)
    rec: Dict[str, Dict[str, List[float]]] = {name: {"cpu": [], "wall": [], "srv": [], "late": [], "late1": []} for name in order}
    turn = [0]

    def one_turn(name: str) -> None:
        make, n = makers[name]
        fds = _open_fds()
        assert fds is None or fds + streams < FD_LIMIT, f"{fds} descriptors open before {name}: select() would miss some"
        c = make()
        try:
            _check(c.kind, streams, WARMUP_TOKENS)(c.run(WARMUP_TOKENS))  # imports, connections, buffers
            check = _check(c.kind, streams, n)
            gc.collect()
            s0 = server_stats(url, reset=True)
            wall, cpu, out = h.measure(lambda: c.run(n))
            s1 = server_stats(url)
            check(out)
        finally:
            c.close()  # one client's connections open at a time
        r = rec[name]
        r["cpu"].append(cpu / (n * streams) * 1e6)
        r["wall"].append(wall)
        r["srv"].append((s1["cpu_s"] - s0["cpu_s"]) / wall if wall > 0 else 0.0)
        r["late"].append(s1["paced_late_mean_us"])
        r["late1"].append(s1["paced_late_over_1ms"] / max(s1["paced_ticks"], 1))

    def one_round() -> None:
        k = turn[0] % len(order)
        turn[0] += 1
        for name in order[k:] + order[:k]:
            one_turn(name)

    benchmark.group = f"paced: {gap_ms} ms, {streams} streams"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)

    floor = p.FLOOR_EASY if streams == 1 else p.FLOOR_WAKE
    rows: Dict[str, Dict[str, Any]] = {}
    for name in order:
        r, n = rec[name], makers[name][1]
        row: Dict[str, Any] = dict(
            tokens_per_stream=n,
            tokens=n * streams,
            cpu_us_per_token=min(r["cpu"]),
            cpu_us_per_token_median=statistics.median(r["cpu"]),
            wall_s=statistics.median(r["wall"]),
            wall_ideal_s=n * gap_ms / 1000,
            server_core=statistics.median(r["srv"]),
            pacer_late_mean_us=statistics.median(r["late"]),
            pacer_late_over_1ms=statistics.median(r["late1"]),
            note=p.note(name, streams) + (f"; {n} tokens/stream" if n != tokens(gap_ms, streams, floor) else ""),
        )
        for key, base, flip in (("x_floor", floor, False), ("x_sdk", p.SDK, True)):
            if base in rec:
                pairs = zip(rec[base]["cpu"], r["cpu"]) if flip else zip(r["cpu"], rec[base]["cpu"])
                ratios = [a / b for a, b in pairs if b > 0]
                row[key] = statistics.median(ratios) if ratios else None
        rows[name] = row
    benchmark.extra_info.update(
        paced_streams=True,
        gap_ms=gap_ms,
        streams=streams,
        tokens_per_s=streams * 1000 / gap_ms,
        rounds=turn[0],
        floor=floor,
        sdk=p.SDK,
        clients=rows,
        skipped=skipped,
    )
    lines = [f"\n[paced {gap_ms} ms × {streams}] CPU µs/token (best round), × floor ({floor}):"]
    for name, row in sorted(rows.items(), key=lambda kv: kv[1]["cpu_us_per_token"]):
        xf = row.get("x_floor")
        lines.append(f"  {name:28s} {row['cpu_us_per_token']:8.1f}  {'' if xf is None else f'{xf:.2f}x'}")
    print("\n".join(lines))
