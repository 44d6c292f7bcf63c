"""llama_broker's Ray Data stage against Ray's own HTTP processor, on paced streams.

Runs only when asked (``LB_BENCH_RAY=1``; a run takes 2-4 minutes here, most
of it Ray starting actors). One local Ray (``ray.init(num_cpus=2)``) and the
stream server in its own process, its answers paced like a real llama-server:
``TOKENS`` (+0..2 by row) tokens, one every ``GAP_MS``. Each client
processes the same ``ROWS``-row Dataset with ``IN_FLIGHT`` requests in flight:

``llama_broker.ray``
    ``build_processor(concurrency=1, streams_per_actor=IN_FLIGHT)``: one actor,
    its Broker streaming every request (the coalesced engine, ``max_delay_ms`` 50).
``llama_broker.ray stream=False``
    the same asking for each answer whole (``stream: false``), as Ray's does.
``ray.data.llm HTTP``
    ``ray.data.llm.HttpRequestProcessorConfig`` + ``build_processor``, Ray's
    own: aiohttp, non-streamed (the answer comes whole when its last token
    would have), one request at a time within a batch and up to 4 batches at
    once per actor, so ``IN_FLIGHT / 4`` actors of batches of ``RAY_BATCH``.
    Where ``ray.data.llm`` cannot be imported (it wants more than
    ``ray[data]``), ``aiohttp UDF (Ray's shape)`` stands in: the same
    ``map_batches`` actor stage written plainly, one aiohttp request per row,
    ``asyncio.gather`` under a semaphore (2 actors, the same requests in flight;
    ``LB_BENCH_RAY_BASELINE=aiohttp`` picks it where ``ray.data.llm`` imports).

Measured: wall time; rows/s over a window that opens at the first block out
once every actor has started (Ray's start-up, 10-50 s here, and the actors'
own start-up CPU stay out; so does the burst of blocks that comes out with
it, whose work came before) and closes at the last row; CPU seconds per row
over the same window,
of every process of the Ray instance (the driver, raylet, GCS, the actor and
task workers: read from ``/proc``, the stream server excluded) and of the
workers alone (``ray::`` processes: where the requests are made). Every row's
text is checked against its own stream. The report prints the table and the
ratio (Ray's CPU per row ÷ llama_broker's).

    LB_BENCH_RAY=1 python -m pytest benchmarks/test_ray.py -q --benchmark-json=ray.json
    python benchmarks/report.py ray.json
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from . import _harness as h
from .streamserver import ServerProcess, render

ON = os.environ.get("LB_BENCH_RAY", "") not in ("", "0")
pytestmark = pytest.mark.skipif(not ON, reason="the Ray benchmark runs when asked: LB_BENCH_RAY=1")

ROWS = int(os.environ.get("LB_BENCH_RAY_ROWS") or (600 if h.SHORT else 1500))
TOKENS = int(os.environ.get("LB_BENCH_RAY_TOKENS") or 20)
GAP_MS = int(os.environ.get("LB_BENCH_RAY_GAP_MS") or 20)
IN_FLIGHT = int(os.environ.get("LB_BENCH_RAY_IN_FLIGHT") or 32)
#: llama_broker's batch: several times the streams, so a batch's tail is short
LB_BATCH = 8 * IN_FLIGHT
#: Ray's HTTP stage sends a batch's rows one after another: small batches, 4 at once per actor
RAY_BATCH = 8
RAY_BATCHES_PER_ACTOR = 4
#: its actors: IN_FLIGHT / 4 nominally (more where it falls short of the rate; they
#: share 0.8 of the 2 CPUs so that the rest of the pipeline can be scheduled)
RAY_ACTORS = int(os.environ.get("LB_BENCH_RAY_HTTP_ACTORS") or max(1, IN_FLIGHT // RAY_BATCHES_PER_ACTOR))
RUN_TIMEOUT_S = 900.0
#: blocks that come out less than this apart belong to one burst (see run_once)
BURST_GAP_S = 0.05

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokens(i: int) -> int:
    return TOKENS + i % 3


def _params(i: int) -> Dict[str, Any]:
    return {"bench_mode": "paced", "bench_events": _tokens(i), "bench_gap_us": GAP_MS * 1000}


# -- CPU of the Ray instance, from /proc ------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def map_workers(exclude: Set[int]) -> int:
    """How many of the Ray instance's processes are ``map_batches`` actors that
    finished starting (Ray titles them ``ray::MapWorker(…)`` once created)."""
    n = 0
    for pid in ray_cpu(exclude):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                n += f.read(14) == b"ray::MapWorker"
        except OSError:
            pass
    return n


def ray_cpu(exclude: Set[int]) -> Dict[int, Tuple[float, bool]]:
    """``{pid: (cpu seconds, is a worker)}`` for this process and every
    descendant (raylet, GCS, agents, workers) but ``exclude`` and theirs.
    Workers are the ``ray::…`` processes (actors and tasks)."""
    parent: Dict[int, int] = {}
    cpu: Dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        rest = s.rsplit(b")", 1)[1].split()
        pid = int(d)
        parent[pid] = int(rest[1])
        cpu[pid] = (int(rest[11]) + int(rest[12])) / _TICK
    children: Dict[int, List[int]] = {}
    for pid, pp in parent.items():
        children.setdefault(pp, []).append(pid)
    out: Dict[int, Tuple[float, bool]] = {}
    todo = [os.getpid()]
    for _ in range(100_000):  # bounded walk
        if not todo:
            break
        pid = todo.pop()
        if pid in exclude or pid not in cpu:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                worker = f.read(5) == b"ray::"
        except OSError:
            worker = False
        out[pid] = (cpu[pid], worker)
        todo.extend(children.get(pid, ()))
    return out


def cpu_between(a: Dict[int, Tuple[float, bool]], b: Dict[int, Tuple[float, bool]]) -> Tuple[float, float]:
    """``(all, workers)`` CPU seconds spent between two :func:`ray_cpu` snapshots
    (a process new in ``b`` counts from zero; one gone by ``b`` is not counted)."""
    total = workers = 0.0
    for pid, (c, w) in b.items():
        d = c - a.get(pid, (0.0, w))[0]
        total += d
        if w:
            workers += d
    return total, workers


# -- the clients ------------------------------------------------------------------------


def lb_processor(url: str, **kw: Any) -> Tuple[Any, Callable[[Dict[str, Any]], Optional[str]]]:
    from llama_broker.ray import build_processor

    whole = kw.get("stream") is False
    proc = build_processor(
        endpoints=[url],
        preprocess=lambda row: {"messages": h.MESSAGES, **_params(row["id"]), **({"bench_whole": True} if whole else {})},
        concurrency=1,
        batch_size=LB_BATCH,
        streams_per_actor=IN_FLIGHT,
        num_cpus=0.5,
        **kw,
    )
    return proc, lambda row: row["generated_text"]


def ray_http_processor(url: str) -> Tuple[Any, Callable[[Dict[str, Any]], Optional[str]]]:
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    actors = RAY_ACTORS
    cfg = HttpRequestProcessorConfig(
        url=url + "/v1/chat/completions",
        batch_size=RAY_BATCH,
        concurrency=(actors, actors),
        # the actors, the read task (1 CPU) and the pre/postprocess tasks must fit in 2 CPUs
        http_request_stage={"num_cpus": min(0.1, 0.8 / actors)},
    )
    proc = build_processor(
        cfg,
        preprocess=lambda row: {"payload": {"model": "m", "messages": h.MESSAGES, "bench_whole": True, **_params(row["id"])}},
        postprocess=lambda row: {"id": row["id"], "text": row["http_response"]["choices"][0]["message"]["content"]},
        # the stage's tasks must fit next to the actors on 2 CPUs
        preprocess_map_kwargs={"num_cpus": 0.1},
        postprocess_map_kwargs={"num_cpus": 0.1},
    )
    return proc, lambda row: row["text"]


class AiohttpUDF:
    """Ray's HTTP stage written plainly (used when ``ray.data.llm`` does not
    import): per batch one ``aiohttp`` session, one non-streamed request per
    row, at most ``limit`` at once (``asyncio.gather`` + a semaphore)."""

    def __init__(self, url: str, limit: int) -> None:
        self.url = url + "/v1/chat/completions"
        self.limit = limit

    async def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Send the batch's rows; return their ids and texts."""
        import asyncio
        import json

        import aiohttp

        sem = asyncio.Semaphore(self.limit)
        ids = [int(i) for i in batch["id"]]

        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> str:
                body = {"model": "m", "messages": h.MESSAGES, "bench_whole": True, **_params(i)}
                async with sem:
                    async with session.post(self.url, data=json.dumps(body), headers={"Content-Type": "application/json"}) as r:
                        r.raise_for_status()
                        answer = await r.json()
                return answer["choices"][0]["message"]["content"]

            texts = await asyncio.gather(*(one(i) for i in ids))
        return {"id": batch["id"], "text": list(texts)}


def aiohttp_processor(url: str) -> Tuple[Any, Callable[[Dict[str, Any]], Optional[str]]]:
    from ray.data import ActorPoolStrategy

    # 2 actors, 4 batches at once each (Ray's default for an async UDF), IN_FLIGHT in all
    actors = 2
    limit = max(1, IN_FLIGHT // (actors * RAY_BATCHES_PER_ACTOR))

    def proc(ds: Any) -> Any:
        return ds.map_batches(
            AiohttpUDF,
            fn_constructor_kwargs={"url": url, "limit": limit},
            batch_size=max(RAY_BATCH, 2 * limit),
            compute=ActorPoolStrategy(size=actors),
            num_cpus=0.1,
        )

    return proc, lambda row: row["text"]


def _ray_llm_available() -> Optional[str]:
    if os.environ.get("LB_BENCH_RAY_BASELINE") == "aiohttp":
        return "LB_BENCH_RAY_BASELINE=aiohttp"
    try:
        import ray.data.llm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure: the plain UDF stands in
        return f"{type(e).__name__}: {e}"
    return None


# -- fixtures and the run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_srv() -> Iterator[ServerProcess]:
    """The paced stream server (its own process) and one local Ray instance."""
    import llama_broker
    import ray

    with ServerProcess(max_connections=4 * IN_FLIGHT + 64) as srv:
        for n in sorted({_tokens(i) for i in range(3)}):
            srv.warm("event", n)
        path = os.pathsep.join(
            p for p in (os.path.dirname(os.path.dirname(llama_broker.__file__)), REPO, os.environ.get("PYTHONPATH")) if p
        )
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        try:
            yield srv
        finally:
            ray.shutdown()


def run_once(srv: ServerProcess, make: Callable[[str], Any], actors: int) -> Dict[str, Any]:
    """Process ``ROWS`` rows with the processor ``make(url)`` builds (``actors``
    of them); every row's text checked; times and CPU (see the module docstring)."""
    import ray

    proc, text_of = make(srv.url)
    ds = proc(ray.data.range(ROWS, override_num_blocks=max(1, ROWS // (RAY_BATCH * 5))))
    exclude = {srv._proc.pid} if srv._proc is not None else set()
    box: Dict[str, Any] = {}

    def consume() -> None:
        try:
            c0 = ray_cpu(exclude)
            t0 = time.monotonic()
            first: Optional[Tuple[float, Dict[int, Tuple[float, bool]]]] = None
            # The window opens at a block that comes out once every actor has started
            # (their start-up, 2-3 CPU seconds each, stays out), after the burst of
            # blocks that comes out with it (a batch's rows may come as several
            # blocks; their work was done before). It closes at the last row.
            burst_rows, burst_end, in_burst, last = 0, 0.0, True, 0.0  # rows and time before the window
            seen = 0
            ids = set()
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                now = time.monotonic()
                rows = block.to_pylist()
                if first is None:
                    if map_workers(exclude) >= actors:  # the window opens after this block
                        first = (now, ray_cpu(exclude))
                        burst_rows, burst_end = seen + len(rows), now
                elif in_burst and now - last < BURST_GAP_S:
                    burst_rows += len(rows)
                    burst_end = now
                else:
                    in_burst = False
                last = now
                for row in rows:
                    i = row["id"]
                    want = render(_tokens(i)).content
                    got = text_of(row)
                    assert got == want, f"row {i}: {str(got)[:60]!r} is not its stream's text"
                    ids.add(i)
                    seen += 1
            t1 = time.monotonic()
            c1 = ray_cpu(exclude)
            assert seen == ROWS and ids == set(range(ROWS)), f"{seen} rows out of {ROWS}"
            assert first is not None, "the actors never all started before the last row"
            box.update(t0=t0, t1=t1, c0=c0, c1=c1, first=first, burst_rows=burst_rows, burst_end=burst_end)
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    th = threading.Thread(target=consume, daemon=True)
    th.start()
    th.join(RUN_TIMEOUT_S)
    assert not th.is_alive(), f"the run did not finish within {RUN_TIMEOUT_S:.0f} s"
    if "error" in box:
        raise box["error"]
    t_first, c_first = box["first"]
    steady_rows = ROWS - box["burst_rows"]  # the first burst's work was done before the window
    window = box["t1"] - box["burst_end"]
    cpu_all, cpu_workers = cpu_between(c_first, box["c1"])
    total_all, total_workers = cpu_between(box["c0"], box["c1"])
    return {
        "wall_s": box["t1"] - box["t0"],
        "startup_s": t_first - box["t0"],
        "rows_per_s": steady_rows / window if window > 0 else 0.0,
        "cpu_ms_per_row": cpu_all / steady_rows * 1e3,
        "cpu_ms_per_row_workers": cpu_workers / steady_rows * 1e3,
        "cpu_total_s": total_all,
        "cpu_total_workers_s": total_workers,
        "window_rows": steady_rows,
    }


def _bench(benchmark: Any, srv: ServerProcess, client: str, make: Callable[[str], Any], note: str, actors: int) -> None:
    results: List[Dict[str, Any]] = []
    benchmark.group = "ray data stage"
    benchmark.pedantic(lambda: results.append(run_once(srv, make, actors)), rounds=1, iterations=1, warmup_rounds=0)
    r = results[0]
    ideal = IN_FLIGHT / ((TOKENS + 1) * GAP_MS / 1000.0)
    benchmark.extra_info.update(
        ray_stage=True, client=client, rows=ROWS, in_flight=IN_FLIGHT, tokens_per_row=TOKENS + 1, gap_ms=GAP_MS,
        ideal_rows_per_s=ideal, note=note, **r,
    )
    sys.stderr.write(
        f"\n{client}: {r['rows_per_s']:.1f} rows/s (ideal {ideal:.0f}), CPU {r['cpu_ms_per_row']:.2f} ms/row "
        f"(workers {r['cpu_ms_per_row_workers']:.2f}), start-up {r['startup_s']:.1f} s\n"
    )


def test_ray_stage_llama_broker(benchmark: Any, ray_srv: ServerProcess) -> None:
    _bench(benchmark, ray_srv, "llama_broker.ray", lb_processor,
           f"1 actor × {IN_FLIGHT} streams, batches of {LB_BATCH}; streamed, max_delay_ms 50", 1)


def test_ray_stage_llama_broker_whole(benchmark: Any, ray_srv: ServerProcess) -> None:
    _bench(benchmark, ray_srv, "llama_broker.ray stream=False", lambda url: lb_processor(url, stream=False),
           f"1 actor × {IN_FLIGHT} requests, batches of {LB_BATCH}; non-streamed, as Ray's", 1)


def test_ray_stage_ray_http(benchmark: Any, ray_srv: ServerProcess) -> None:
    why = _ray_llm_available()
    actors = RAY_ACTORS
    if why is None:
        _bench(benchmark, ray_srv, "ray.data.llm HTTP", ray_http_processor,
               f"HttpRequestProcessorConfig: {actors} actors × {RAY_BATCHES_PER_ACTOR} batches of {RAY_BATCH}; non-streamed",
               actors)
    else:
        _bench(benchmark, ray_srv, "aiohttp UDF (Ray's shape)", aiohttp_processor,
               f"ray.data.llm unavailable ({why[:60]}); 2 actors × {RAY_BATCHES_PER_ACTOR} batches, gather; non-streamed",
               2)
