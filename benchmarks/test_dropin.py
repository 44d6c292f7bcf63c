"""The OpenAI drop-in (``llama_broker.openai``) against the OpenAI SDK, same stream.

``test_dropin_stream`` adds a ``llama_broker.openai`` row to the main table
(same measurement as ``test_stream.py``; the "× SDK" column compares it with
the ``openai`` row of the same mode). ``test_dropin_vs_sdk`` runs both clients
on the very same stream (same mode, same number of events), taking turns
within each round, and reports events per CPU second of each and their
per-round ratio; the target is ≥ 5× the SDK's events per CPU second.

Both clients run the same loop a user writes::

    with client.chat.completions.create(model=..., messages=..., stream=True, extra_body=...) as stream:
        for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    parts.append(content)

    python -m pytest benchmarks/test_dropin.py -q --benchmark-json=dropin.json
    python benchmarks/report.py dropin.json
"""

from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, List

import pytest

from . import _harness as h

#: The drop-in must stream at least this many times the SDK's events per CPU second.
TARGET = float(os.environ.get("LB_DROPIN_TARGET") or 5.0)


def make_dropin(url: str, mode: str, n: int) -> Callable[[], str]:
    """The drop-in, written exactly as ``_harness.make_openai`` writes the SDK."""
    from llama_broker.openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    extra = h.bench_params(mode, n)

    def run() -> str:
        parts: List[str] = []
        with client.chat.completions.create(model="m", messages=h.MESSAGES, stream=True, extra_body=extra) as stream:
            for chunk in stream:
                if chunk.choices:
                    content = chunk.choices[0].delta.content
                    if content:
                        parts.append(content)
        return "".join(parts)

    return run


def make_sdk(url: str, mode: str, n: int) -> Callable[[], str]:
    """The OpenAI SDK with the same ``with`` block (``_harness.make_openai`` iterates without it)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    extra = h.bench_params(mode, n)

    def run() -> str:
        parts: List[str] = []
        with client.chat.completions.create(model="m", messages=h.MESSAGES, stream=True, extra_body=extra) as stream:
            for chunk in stream:
                if chunk.choices:
                    content = chunk.choices[0].delta.content
                    if content:
                        parts.append(content)
        return "".join(parts)

    return run


@pytest.mark.parametrize("mode", ["bulk", "event", "paced"])
def test_dropin_stream(benchmark, srv, mode):
    n = h.PACED_N if mode == "paced" else h.N
    run = make_dropin(srv.url, mode, n)
    h.bench(benchmark, run, h.text_check(n), client="llama_broker.openai", mode=mode, n=n,
            group=f"stream: {mode}", nbytes=len(h.render(n).body), note="OpenAI drop-in")


@pytest.mark.parametrize("mode", ["bulk", "event"])
def test_dropin_vs_sdk(benchmark, srv, mode):
    """Both clients, the same stream, turns taken within each round; ratio of events per CPU second."""
    pytest.importorskip("openai")
    n = h.SDK_N
    runs = {"openai": make_sdk(srv.url, mode, n), "llama_broker.openai": make_dropin(srv.url, mode, n)}
    check = h.text_check(n)
    cpu: Dict[str, List[float]] = {k: [] for k in runs}
    turn = [0]

    def one_round() -> None:
        names = list(runs)
        if turn[0] % 2:
            names.reverse()
        turn[0] += 1
        for name in names:
            _, c, out = h.measure(runs[name])
            check(out)
            cpu[name].append(c)

    for name in runs:  # warm up: imports, connections, buffers
        check(runs[name]())
    benchmark.group = f"drop-in vs SDK: {mode}"
    benchmark.pedantic(one_round, rounds=max(h.ROUNDS, 3), iterations=1, warmup_rounds=0)
    per_s = {name: n / statistics.median(v) for name, v in cpu.items() if statistics.median(v) > 0}
    ratios = [s / d for s, d in zip(cpu["openai"], cpu["llama_broker.openai"]) if d > 0]
    ratio = statistics.median(ratios)
    benchmark.extra_info.update(
        dropin_vs_sdk=True,
        mode=mode,
        events=n,
        rounds=turn[0],
        events_per_cpu_s=per_s,
        cpu_us_per_event={name: statistics.median(v) / n * 1e6 for name, v in cpu.items()},
        ratio=ratio,
        ratios=ratios,
        target=TARGET,
    )
    print(
        f"\n[{mode}] {n} events: SDK {per_s['openai']:,.0f} events/CPU-s, "
        f"drop-in {per_s['llama_broker.openai']:,.0f} events/CPU-s: {ratio:.1f}x (target {TARGET:g}x)"
    )
    assert ratio >= TARGET, f"the drop-in streams only {ratio:.2f}x the SDK's events per CPU second (target {TARGET}x)"
