"""Batch jobs and embeddings: client CPU against the OpenAI SDK, and memory.

``test_batch_chat``      ``run_batch`` over R short chat requests (16 content
                         events each, streamed underneath) vs the usual SDK
                         script: ``AsyncOpenAI`` + ``asyncio.Semaphore(C)``,
                         non-streamed ``chat.completions.create`` per line, a
                         JSONL line written per result. R = 20,000
                         (``LB_BENCH_SHORT=1``: 2,000), C = 32.
``test_embed``           ``embed`` of T texts in requests of 64 (4 in flight),
                         as ``array('f')`` vectors and as one numpy array, vs
                         ``AsyncOpenAI`` embeddings of the same batches with the
                         same concurrency. T = 10,000 (short: 2,000), 384 dims.
``test_batch_memory``    ``llama-broker batch`` as a subprocess over an L-line
                         input and over L/10 lines: its peak RSS
                         (``VmHWM``), which must grow only by the set of
                         ids (< 400 bytes a line). L = 1,000,000 (short: 100,000).

The per-"event" figures of the report are per request here (chat) or per text
(embeddings). Every run's output is checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from . import _harness as h
from .streamserver import render

REPO = Path(__file__).resolve().parent.parent

R = int(os.environ.get("LB_BENCH_BATCH_REQUESTS") or (2_000 if h.SHORT else 20_000))
C = 32
EVENTS = 16
T = int(os.environ.get("LB_BENCH_EMBED_TEXTS") or (2_000 if h.SHORT else 10_000))
EMBED_BATCH = 64
EMBED_CONC = 4
DIM = 384
L = int(os.environ.get("LB_BENCH_BATCH_LINES") or (100_000 if h.SHORT else 1_000_000))


def _write_chat_input(path: Path, n: int, events: int = EVENTS) -> None:
    with open(path, "w") as f:
        for i in range(n):
            body = {"model": "m", "messages": h.MESSAGES, "bench_mode": "event", "bench_events": events}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            f.write("\n")


def _check_chat_output(path: Path, n: int, *, sdk: bool = False) -> None:
    want = render(EVENTS).content
    ids = set()
    with open(path, "rb") as f:
        for k, raw in enumerate(f):
            obj = json.loads(raw)
            ids.add(obj["custom_id"])
            if k < 50:
                assert obj["response"]["body"]["choices"][0]["message"]["content"] == want
    assert len(ids) == n


@pytest.fixture(scope="module")
def chat_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("batch") / "in.jsonl"
    _write_chat_input(p, R)
    return p


def test_batch_chat_llama_broker(benchmark: Any, srv: Any, chat_input: Path, tmp_path: Path) -> None:
    from llama_broker.batch import run_batch

    outs: List[Path] = []

    def run() -> Path:
        out = tmp_path / f"out{len(outs)}.jsonl"
        outs.append(out)
        s = run_batch(str(chat_input), str(out), endpoints=[srv.url], concurrency=C, progress=False)
        assert s.ok == R, s
        return out

    h.bench(
        benchmark, run, lambda out: _check_chat_output(out, R), client="llama_broker batch", mode=f"chat ×{C}",
        n=R, group="batch: chat requests", rounds=1, note=f"{R} requests of {EVENTS} events; per request",
    )


def test_batch_chat_openai_sdk(benchmark: Any, srv: Any, chat_input: Path, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    outs: List[Path] = []

    async def script(out: Path) -> None:
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        sem = asyncio.Semaphore(C)
        with open(chat_input) as f:
            lines = [json.loads(x) for x in f]
        with open(out, "w") as w:

            async def one(line: Dict[str, Any]) -> None:
                body = dict(line["body"])
                extra = {"bench_mode": body.pop("bench_mode"), "bench_events": body.pop("bench_events"), "bench_whole": True}
                async with sem:
                    resp = await client.chat.completions.create(**body, extra_body=extra)
                w.write(json.dumps({"custom_id": line["custom_id"],
                                    "response": {"status_code": 200, "body": resp.model_dump()}}) + "\n")

            await asyncio.gather(*(one(x) for x in lines))
        await client.close()

    def run() -> Path:
        out = tmp_path / f"sdk{len(outs)}.jsonl"
        outs.append(out)
        asyncio.run(script(out))
        return out

    h.bench(
        benchmark, run, lambda out: _check_chat_output(out, R, sdk=True), client="openai AsyncOpenAI+Semaphore",
        mode=f"chat ×{C}", n=R, group="batch: chat requests", rounds=1,
        note=f"{R} non-streamed requests; per request",
    )


TEXTS = [f"text number {i}: the quick brown fox" for i in range(T)]


def _check_vectors(vecs: Any) -> None:
    assert len(vecs) == T and len(vecs[0]) == DIM


def test_embed_llama_broker(benchmark: Any, srv: Any) -> None:
    from llama_broker import Broker, ModelConfig

    br = Broker()
    cfg = ModelConfig(srv.url)

    def run() -> Any:
        return br.embed(TEXTS, cfg=cfg, batch_size=EMBED_BATCH, concurrency=EMBED_CONC, bench_dim=DIM)

    h.bench(benchmark, run, _check_vectors, client="llama_broker embed", mode="base64→array", n=T,
            group="embeddings", note="per text")
    br.close()


def test_embed_llama_broker_numpy(benchmark: Any, srv: Any) -> None:
    pytest.importorskip("numpy")
    from llama_broker import Broker, ModelConfig

    br = Broker()
    cfg = ModelConfig(srv.url)

    def run() -> Any:
        return br.embed(TEXTS, cfg=cfg, batch_size=EMBED_BATCH, concurrency=EMBED_CONC, as_numpy=True, bench_dim=DIM)

    h.bench(benchmark, run, _check_vectors, client="llama_broker embed", mode="base64→numpy", n=T,
            group="embeddings", note="per text")
    br.close()


def test_embed_openai_sdk(benchmark: Any, srv: Any) -> None:
    openai = pytest.importorskip("openai")
    from llama_broker import ModelConfig, embed

    async def script() -> List[List[float]]:
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        sem = asyncio.Semaphore(EMBED_CONC)

        async def one(batch: List[str]) -> List[List[float]]:
            async with sem:
                r = await client.embeddings.create(model="m", input=batch, extra_body={"bench_dim": DIM})
            return [d.embedding for d in r.data]

        parts = await asyncio.gather(*(one(TEXTS[i : i + EMBED_BATCH]) for i in range(0, T, EMBED_BATCH)))
        await client.close()
        return [v for p in parts for v in p]

    def run() -> Any:
        return asyncio.run(script())

    def check(vecs: Any) -> None:
        _check_vectors(vecs)
        ours = embed(ModelConfig(srv.url), TEXTS[:100], batch_size=EMBED_BATCH, bench_dim=DIM)
        assert [list(v) for v in ours] == vecs[:100]

    h.bench(benchmark, run, check, client="openai AsyncOpenAI", mode="base64", n=T, group="embeddings",
            note="per text")


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (pytest).
_CHILD = r"""
import sys
from llama_broker.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    hwm = [l.split()[1] for l in f if l.startswith("VmHWM:")][0]
sys.stderr.write("MAXRSS_KB %s\n" % hwm)
sys.exit(code)
"""


def _peak_rss_kb(srv: Any, lines: int, tmp: Path) -> "tuple[int, float]":
    inp, out = tmp / f"in{lines}.jsonl", tmp / f"out{lines}.jsonl"
    _write_chat_input(inp, lines, events=2)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, "batch", str(inp), "-o", str(out), "--endpoint", srv.url,
         "--concurrency", str(C), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    wall = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out, "rb") as f:
        assert sum(1 for _ in f) == lines
    kb = int(p.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0])
    os.unlink(inp)
    os.unlink(out)
    return kb, wall


def test_batch_memory(benchmark: Any, srv: Any) -> None:
    small = max(L // 10, 1000)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        kb_small, wall_small = _peak_rss_kb(srv, small, tmp)
        results: Dict[str, Any] = {}

        def run() -> Any:
            results["big"] = _peak_rss_kb(srv, L, tmp)
            return results["big"]

        benchmark.group = "batch: memory"
        benchmark.pedantic(run, rounds=1, iterations=1)
    kb_big, wall_big = results["big"]
    per_line = (kb_big - kb_small) * 1024 / (L - small)
    benchmark.extra_info.update(
        client="llama-broker batch", mode="peak RSS", events=L, lines=L, lines_small=small,
        peak_rss_mb=kb_big / 1024, peak_rss_mb_small=kb_small / 1024, bytes_per_line=per_line,
        requests_per_s=L / wall_big, note="growth between the two runs / extra lines (the set of ids)",
    )
    sys.stderr.write(
        f"\nbatch memory: {small} lines peak {kb_small / 1024:.1f} MB, {L} lines peak {kb_big / 1024:.1f} MB "
        f"({per_line:.0f} bytes/line), {L / wall_big:.0f} requests/s\n"
    )
    assert per_line < 400, f"peak RSS grows {per_line:.0f} bytes per input line"
