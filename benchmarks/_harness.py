"""Shared pieces of the benchmark suite: settings, measurement, the clients.

Every client here is a factory ``make_*(url, mode, n) -> run`` that sets up
whatever it keeps between runs (handles, connection pools) outside the timed
region; ``run()`` performs one whole request and returns what it collected:
the reply text (checked against the stream's SHA-256) or, for the transport
floors, the body byte count (checked against the body size).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import time
from typing import Callable, List, Optional

from .streamserver import render

# -- settings ----------------------------------------------------------------

SHORT = os.environ.get("LB_BENCH_SHORT", "") not in ("", "0")
N = int(os.environ.get("LB_BENCH_EVENTS") or (20_000 if SHORT else 200_000))
#: The OpenAI SDK costs ~100x more per event: it gets a tenth of the events.
SDK_N = int(os.environ.get("LB_BENCH_SDK_EVENTS") or max(N // 10, 100))
#: The paced mode takes ~120 us per event whatever the client: a tenth of the events.
PACED_N = int(os.environ.get("LB_BENCH_PACED_EVENTS") or max(N // 10, 100))
PACE_GAP_US = int(os.environ.get("LB_BENCH_GAP_US") or 50)
ROUNDS = int(os.environ.get("LB_BENCH_ROUNDS") or (5 if SHORT else 3))
MESSAGES = [{"role": "user", "content": "Write a long story."}]
CURL = shutil.which("curl")

# -- measurement -------------------------------------------------------------


def children_cpu() -> float:
    """CPU seconds (user + system) of waited-for child processes so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(run: Callable[[], object], *, child_cpu: bool = False, cpu_offset_s: float = 0.0):
    """One run: ``(wall seconds, CPU seconds, what run returned)`` (see :func:`bench`)."""
    ru0 = children_cpu() if child_cpu else 0.0
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = run()
    t1 = time.perf_counter()
    c1 = time.process_time()
    cpu = (children_cpu() - ru0 - cpu_offset_s) if child_cpu else (c1 - c0)
    return t1 - t0, max(cpu, 0.0), out


def bench(
    benchmark,
    run: Callable[[], object],
    check: Callable[[object], None],
    *,
    client: str,
    mode: str,
    n: int,
    group: str,
    rounds: Optional[int] = None,
    child_cpu: bool = False,
    cpu_offset_s: float = 0.0,
    nbytes: Optional[int] = None,
    note: str = "",
) -> None:
    """Time ``run`` with ``benchmark.pedantic`` and record per-event numbers.

    CPU is this process's ``time.process_time()`` delta over the run (the
    stream server is another process), or with ``child_cpu`` the
    ``RUSAGE_CHILDREN`` delta (a subprocess client such as the curl CLI) minus
    ``cpu_offset_s`` (its start-up cost). ``check`` runs after the clocks stop.
    The per-event figures use the best round (noise on a shared machine only
    ever adds time); the medians are kept too.
    """
    walls: List[float] = []
    cpus: List[float] = []
    reads: List[int] = []

    def once() -> None:
        wall, cpu, out = measure(run, child_cpu=child_cpu, cpu_offset_s=cpu_offset_s)
        walls.append(wall)
        cpus.append(cpu)
        r = getattr(run, "reads", None)
        if r:
            reads.append(r[0])
        check(out)

    benchmark.group = group
    benchmark.pedantic(once, rounds=rounds or ROUNDS, iterations=1, warmup_rounds=0)
    wall, cpu = min(walls), min(cpus)
    info = benchmark.extra_info
    info.update(
        client=client,
        mode=mode,
        events=n,
        rounds=len(walls),
        wall_s_min=wall,
        wall_s_median=statistics.median(walls),
        events_per_s=n / wall if wall > 0 else 0.0,
        cpu_us_per_event=cpu / n * 1e6 if n else 0.0,
        cpu_us_per_event_median=statistics.median(cpus) / n * 1e6 if n else 0.0,
        cpu_s_min=cpu,
    )
    if reads:
        info["callbacks_per_event"] = statistics.median(reads) / n if n else 0.0
    if nbytes is not None:
        info["bytes"] = nbytes
        info["mb_per_s"] = nbytes / wall / 1e6 if wall > 0 else 0.0
    if note:
        info["note"] = note


def text_check(n: int) -> Callable[[object], None]:
    """A check that the collected text is the stream's content (by SHA-256)."""
    r = render(n)
    want = r.sha256

    def check(text: object) -> None:
        assert isinstance(text, str), f"client returned {type(text).__name__}, not str"
        got = hashlib.sha256(text.encode()).hexdigest()
        if got != want:
            i = next((k for k, (a, b) in enumerate(zip(text, r.content)) if a != b), min(len(text), len(r.content)))
            raise AssertionError(
                f"text differs from the stream's content: {len(text)} vs {len(r.content)} chars, "
                f"first difference at {i}: got {text[i:i + 40]!r}, want {r.content[i:i + 40]!r}"
            )

    return check


def size_check(n: int) -> Callable[[object], None]:
    want = len(render(n).body)

    def check(size: object) -> None:
        assert size == want, f"received {size} body bytes, want {want}"

    return check


def request_body(mode: str, n: int) -> dict:
    return {"model": "m", "messages": MESSAGES, "stream": True, **bench_params(mode, n)}


def bench_params(mode: str, n: int) -> dict:
    """The request fields that pick the stream (sent in the JSON body)."""
    p = {"bench_mode": mode, "bench_events": n}
    if mode == "paced":
        p["bench_gap_us"] = PACE_GAP_US
    return p


def chat_url(url: str) -> str:
    return url + "/v1/chat/completions"


# -- end-to-end clients --------------------------------------------------------


def make_llama_broker(url: str, mode: str, n: int) -> Callable[[], str]:
    import llama_broker

    cfg = llama_broker.ModelConfig(endpoint=url, model="m")
    chat_stream = llama_broker.chat_stream
    extra = bench_params(mode, n)

    def run() -> str:
        parts: List[str] = []
        chat_stream(cfg, MESSAGES, parts.append, **extra)
        return "".join(parts)

    return run


def make_llama_broker_chat(url: str, mode: str, n: int) -> Callable[[], str]:
    import llama_broker

    cfg = llama_broker.ModelConfig(endpoint=url, model="m")
    chat = llama_broker.chat
    extra = bench_params(mode, n)
    return lambda: chat(cfg, MESSAGES, **extra)


def make_llama_broker_stream(url: str, mode: str, n: int) -> Callable[[], str]:
    """The pulled iterator (``stream()``: CurlMulti driven on demand)."""
    import llama_broker

    cfg = llama_broker.ModelConfig(endpoint=url, model="m")
    stream = llama_broker.stream
    extra = bench_params(mode, n)

    def run() -> str:
        parts: List[str] = []
        append = parts.append
        with stream(cfg, MESSAGES, **extra) as deltas:
            for d in deltas:
                if d.content:
                    append(d.content)
        return "".join(parts)

    return run


class PyLineSplitter:
    """The pure-Python way: buffer, split on LF, take ``data: `` lines, decode JSON.

    ``write`` has pycurl's WRITEFUNCTION signature.
    """

    __slots__ = ("loads", "buf", "parts", "done", "writes")

    def __init__(self, loads: Callable[[bytes], object]) -> None:
        self.loads = loads
        self.buf = b""
        self.parts: List[str] = []
        self.done = False
        self.writes = 0

    def write(self, chunk: bytes) -> None:
        self.writes += 1
        lines = (self.buf + chunk).split(b"\n") if self.buf else chunk.split(b"\n")
        self.buf = lines.pop()
        loads = self.loads
        append = self.parts.append
        for line in lines:
            if line[:6] == b"data: ":
                payload = line[6:]
                if payload == b"[DONE]":
                    self.done = True
                    continue
                obj = loads(payload)
                choices = obj.get("choices")
                if choices:
                    content = choices[0].get("delta", {}).get("content")
                    if content:
                        append(content)


def _curl_handle(url: str, body: dict):
    import pycurl

    c = pycurl.Curl()
    c.setopt(pycurl.URL, chat_url(url))
    c.setopt(pycurl.POSTFIELDS, json.dumps(body))
    c.setopt(pycurl.HTTPHEADER, ["Content-Type: application/json", "Accept: text/event-stream"])
    c.setopt(pycurl.NOSIGNAL, 1)
    return c


def make_pycurl(loads: Callable[[bytes], object]):
    def make(url: str, mode: str, n: int) -> Callable[[], str]:
        import pycurl

        c = _curl_handle(url, request_body(mode, n))

        def run() -> str:
            sp = PyLineSplitter(loads)
            c.setopt(pycurl.WRITEFUNCTION, sp.write)
            c.perform()
            run.reads = [sp.writes]
            status = c.getinfo(pycurl.RESPONSE_CODE)
            assert status == 200, f"HTTP {status}"
            assert sp.done, "stream ended before [DONE]"
            return "".join(sp.parts)

        return run

    return make


def make_pycurl_noop(url: str, mode: str, n: int) -> Callable[[], int]:
    """Transport floor in-process: libcurl + one Python call per chunk, no parsing."""
    import pycurl

    c = _curl_handle(url, request_body(mode, n))

    def run() -> int:
        def write(chunk: bytes) -> None:
            total[0] += len(chunk)
            total[1] += 1

        total = [0, 0]
        c.setopt(pycurl.WRITEFUNCTION, write)
        c.perform()
        run.reads = [total[1]]
        return total[0]

    return run


def make_httpx_sse(url: str, mode: str, n: int) -> Callable[[], str]:
    import httpx
    from httpx_sse import connect_sse

    client = httpx.Client(timeout=300)
    body = request_body(mode, n)
    target = chat_url(url)
    loads = json.loads

    def run() -> str:
        parts: List[str] = []
        with connect_sse(client, "POST", target, json=body) as es:
            es.response.raise_for_status()
            for sse in es.iter_sse():
                if sse.data == "[DONE]":
                    break
                choices = loads(sse.data).get("choices")
                if choices:
                    content = choices[0].get("delta", {}).get("content")
                    if content:
                        parts.append(content)
        return "".join(parts)

    return run


def make_openai(url: str, mode: str, n: int) -> Callable[[], str]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    extra = bench_params(mode, n)

    def run() -> str:
        parts: List[str] = []
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True, extra_body=extra)
        for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    parts.append(content)
        return "".join(parts)

    return run


def curl_cli_args(url: str, mode: str, n: int) -> List[str]:
    assert CURL is not None
    return [
        CURL, "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}",
        "-H", "Content-Type: application/json", "-d", json.dumps(request_body(mode, n)), chat_url(url),
    ]


def make_curl_cli(url: str, mode: str, n: int) -> Callable[[], int]:
    args = curl_cli_args(url, mode, n)

    def run() -> int:
        p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
        assert p.returncode == 0, f"curl exited {p.returncode}: {p.stderr.decode(errors='replace')}"
        return int(p.stdout)

    return run


def curl_startup_cpu(url: str, tries: int = 5) -> float:
    """CPU seconds of one curl CLI run on an empty stream (its fixed cost), best of ``tries``."""
    args = curl_cli_args(url, "bulk", 0)
    best = float("inf")
    for _ in range(tries):
        r0 = children_cpu()
        subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        best = min(best, children_cpu() - r0)
    return best


# -- in-memory (no I/O) --------------------------------------------------------


def chunks_of(data: bytes, size: int = 64 * 1024) -> List[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def decode_floor(loads: Callable[[bytes], object], payloads: List[bytes]) -> Callable[[], str]:
    """Decode every payload and pick out its content: the least any client must do."""

    def run() -> str:
        parts: List[str] = []
        append = parts.append
        for p in payloads:
            choices = loads(p).get("choices")
            if choices:
                content = choices[0].get("delta", {}).get("content")
                if content:
                    append(content)
        return "".join(parts)

    return run

