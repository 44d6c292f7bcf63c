"""Client CPU per token on a real llama-server (the bundled model), 1 and 4 streams.

Runs only when asked: ``LB_BENCH_REAL=1`` (and it carries the ``llama_server``
marker). The server is started through :class:`llama_broker.server.LocalServer`
with the default model (SmolLM2-135M-Instruct unless ``$LLAMA_MODEL``) and 4 slots;
when asked, a missing server or model fails the test, it is not skipped.

Every reply is ``LB_BENCH_REAL_TOKENS`` tokens (default 250; short: 100):
``max_tokens`` plus ``ignore_eos: true`` so generation never stops early, and
``temperature: 0`` with a fixed seed. After each run the server's own count
(``llamacpp:tokens_predicted_total`` on ``/metrics``, the server runs with
``--metrics``) must have grown by exactly streams × tokens, and every reply
must be non-empty; with one stream it must equal a reference reply
(``llama_broker.chat``, same request, before the rounds). The requests turn
the prompt cache off (``cache_prompt: false``): a cached prompt changes the
arithmetic and, past the end-of-sequence token where the choice is close, the
greedy reply. Slots decoded in one batch are not repeatable bit for bit
either, so the 4-stream replies are checked by the token count alone.
``LB_BENCH_REAL_SAME_TEXT=0`` relaxes the 1-stream check to non-empty, for a
build or model whose greedy replies are not repeatable.

Clients (the same code as ``_paced.py``), turns taken within each round:

1 stream:  ``openai`` (the SDK), ``llama_broker.openai`` (the drop-in),
           ``llama_broker.chat_stream``, ``llama_broker.stream``, ``llama_broker.map``
4 streams: ``openai`` (AsyncOpenAI + gather), ``llama_broker.openai``
           (drop-in AsyncOpenAI + gather), ``llama_broker.map``, ``llama_broker.amap``

    LB_BENCH_REAL=1 python -m pytest benchmarks/test_real.py -q --benchmark-json=real.json
    python benchmarks/report.py real.json
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any, Dict, List

import pytest

from . import _harness as h
from . import _paced as p

pytestmark = pytest.mark.llama_server

REAL = os.environ.get("LB_BENCH_REAL", "") not in ("", "0")
TOKENS = int(os.environ.get("LB_BENCH_REAL_TOKENS") or (100 if h.SHORT else 250))
ROUNDS = int(os.environ.get("LB_BENCH_REAL_ROUNDS") or 2)
SAME_TEXT = os.environ.get("LB_BENCH_REAL_SAME_TEXT", "1") not in ("", "0")
PARALLEL = 4
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]

CLIENTS_1 = ("openai", "llama_broker.openai", "llama_broker.chat_stream", "llama_broker.stream", "llama_broker.map")
CLIENTS_4 = ("openai", "llama_broker.openai", "llama_broker.map", "llama_broker.amap")


def real_params(n: int) -> Dict[str, Any]:
    """Exactly ``n`` generated tokens, greedy."""
    # no prompt cache: a cached prompt changes the arithmetic, and so the greedy reply
    return {"max_tokens": n, "n_predict": n, "ignore_eos": True, "temperature": 0, "seed": 42, "top_k": 1,
            "cache_prompt": False}


@pytest.fixture(scope="module")
def llama():
    if not REAL:
        pytest.skip("the real llama-server benchmark runs only with LB_BENCH_REAL=1")
    from llama_broker.server import LocalServer

    with LocalServer(parallel=PARALLEL, extra_args=["--metrics"]) as srv:
        yield srv


def predicted_total(srv) -> float:
    """The server's count of generated tokens so far (``/metrics``)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(srv.endpoint + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("llamacpp:tokens_predicted_total "):
                return float(line.split()[1])
    raise AssertionError("llama-server's /metrics has no llamacpp:tokens_predicted_total")


def wait_predicted(srv, want: float, timeout: float = 10.0) -> float:
    """The count once it reaches ``want`` (it is updated as a slot finishes), or what it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicted_total(srv)
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(llama) -> str:
    """The greedy reply every client must get (unless LB_BENCH_REAL_SAME_TEXT=0)."""
    import llama_broker

    cfg = llama.config(model="m", timeout_ms=int(p.RUN_TIMEOUT_S * 1000))
    text = llama_broker.chat(cfg, PROMPT, **real_params(TOKENS))
    assert text, "llama-server returned an empty reply"
    return text


@pytest.mark.parametrize("streams", [1, PARALLEL])
def test_real_server(benchmark, llama, reference, monkeypatch, streams):
    monkeypatch.setattr(h, "MESSAGES", PROMPT)  # the clients send h.MESSAGES
    names = CLIENTS_1 if streams == 1 else CLIENTS_4
    clients: Dict[str, p.PacedClient] = {}
    skipped: Dict[str, str] = {}

    def check(out: Any) -> None:
        assert isinstance(out, list) and len(out) == streams, f"want {streams} replies, got {out!r:.200}"
        for i, text in enumerate(out):
            assert isinstance(text, str) and text, f"stream {i}: empty reply"
            if SAME_TEXT and streams == 1:
                assert text == reference, (
                    f"stream {i}: the reply differs from the reference ({len(text)} vs {len(reference)} chars; "
                    f"LB_BENCH_REAL_SAME_TEXT=0 to accept it): {text[:80]!r} vs {reference[:80]!r}"
                )

    rec: Dict[str, Dict[str, List[float]]] = {}
    turn = [0]
    try:
        for name in names:
            make, needs, _ = p.CLIENTS[name]
            try:
                __import__(needs)
            except ImportError as e:
                skipped[name] = f"not installed: {e.name}"
                continue
            clients[name] = make(llama.endpoint, streams, real_params)
            rec[name] = {"cpu": [], "wall": []}
        for c in clients.values():  # imports, connections
            c.run(4)
        order = list(clients)

        def one_round() -> None:
            k = turn[0] % len(order)
            turn[0] += 1
            for name in order[k:] + order[:k]:
                gc.collect()
                before = predicted_total(llama)
                wall, cpu, out = h.measure(lambda: clients[name].run(TOKENS))
                check(out)
                got = wait_predicted(llama, before + TOKENS * streams) - before
                assert got == TOKENS * streams, f"{name}: the server generated {got:g} tokens, want {TOKENS * streams}"
                rec[name]["cpu"].append(cpu / (TOKENS * streams) * 1e6)
                rec[name]["wall"].append(wall)

        benchmark.group = f"real llama-server: {streams} streams"
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    finally:
        for c in clients.values():
            c.close()

    rows: Dict[str, Dict[str, Any]] = {}
    for name in order:
        r = rec[name]
        ratios = [s / c for s, c in zip(rec["openai"]["cpu"], r["cpu"]) if c > 0] if "openai" in rec else []
        rows[name] = dict(
            tokens=TOKENS * streams,
            cpu_us_per_token=min(r["cpu"]),
            cpu_us_per_token_median=statistics.median(r["cpu"]),
            wall_s=statistics.median(r["wall"]),
            x_sdk=statistics.median(ratios) if ratios else None,
            note=p.note(name, streams),
        )
    benchmark.extra_info.update(real_server=True, streams=streams, tokens_per_stream=TOKENS, rounds=turn[0],
                                clients=rows, skipped=skipped)
    print(f"\n[real llama-server × {streams}] CPU µs/token (median round):")
    for name, row in sorted(rows.items(), key=lambda kv: kv[1]["cpu_us_per_token_median"]):
        print(f"  {name:28s} {row['cpu_us_per_token_median']:8.1f}")
