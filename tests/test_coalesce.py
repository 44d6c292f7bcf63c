"""The latency budget (``max_delay_ms``): coalesced wake-ups on paced streams.

With a budget the engines read sockets at most once per ``max_delay_ms``
(every ready one in that pass); without one (0, the default of ``stream``/
``astream``) each wake-up is handled at once, as before. Against
:class:`ConcServer` from ``test_concurrency.py`` (a token every ``x_gap``
seconds per stream).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest

from llama_broker import Broker, ConfigError, TimeoutError_
from llama_broker.engine import DEFAULT_MAX_DELAY_MS
from test_concurrency import ConcServer, cfg_for, check_all_ok, gone_by, msgs, text_for

STREAMS = 64
TOKENS = 10
GAP_S = 0.02


def _reqs(prefix: str, n: int = STREAMS, **kw: Any) -> Tuple[List[str], List[Dict[str, Any]]]:
    tags = [f"{prefix}{i:02d}" for i in range(n)]
    return tags, [{"messages": msgs(t), "x_tokens": TOKENS, "x_gap": GAP_S, **kw} for t in tags]


def _run_map(b: Broker, reqs: List[Dict[str, Any]], **kw: Any) -> Tuple[list, int, float]:
    t0 = time.monotonic()
    out = list(b.map(reqs, concurrency=len(reqs), progress=False, **kw))
    took = time.monotonic() - t0
    assert b._sync is not None
    return out, b._sync.passes, took


def _run_amap(b: Broker, reqs: List[Dict[str, Any]], **kw: Any) -> Tuple[list, int, float]:
    async def go() -> Tuple[list, int, float]:
        t0 = time.monotonic()
        out = []
        async for r in b.amap(reqs, concurrency=len(reqs), progress=False, **kw):
            out.append(r)
        took = time.monotonic() - t0
        assert b._async is not None
        return out, b._async.passes, took

    return asyncio.run(asyncio.wait_for(go(), 30.0))


RUN = {"map": _run_map, "amap": _run_amap}


@pytest.mark.parametrize("how", list(RUN))
def test_budget_bounds_the_passes_and_keeps_every_text(how):
    budget_ms = 50.0
    with ConcServer() as srv:
        tags, reqs = _reqs("c")
        with Broker(cfg_for(srv.url)) as b:
            results, passes, took = RUN[how](b, reqs, max_delay_ms=budget_ms)
        check_all_ok(results, tags, TOKENS)
        # one pass per budget at most (+1: the first pass needs no wait before it)
        assert passes <= took / (budget_ms / 1000.0) + 2, (passes, took)
        assert all(r.outcome == "complete" for r in srv.chat())

        tags0, reqs0 = _reqs("z")
        with Broker(cfg_for(srv.url)) as b:
            results0, passes0, took0 = RUN[how](b, reqs0, max_delay_ms=0)
        check_all_ok(results0, tags0, TOKENS)
        # no budget: at least one wake-up per token gap (as before)
        assert passes0 >= TOKENS, passes0
        assert passes0 > passes, (passes0, passes)


@pytest.mark.parametrize("how", list(RUN))
def test_results_come_in_completion_order_with_a_budget(how):
    """Short requests finish first, as without a budget."""
    with ConcServer() as srv:
        tags = [f"o{i}" for i in range(6)]
        reqs = [{"messages": msgs(t), "x_tokens": 2 + 6 * (i % 2), "x_gap": GAP_S} for i, t in enumerate(tags)]
        with Broker(cfg_for(srv.url)) as b:
            results, _, _ = RUN[how](b, reqs, max_delay_ms=10)
    assert sorted(r.index for r in results) == list(range(6))
    for r in results:
        assert r.error is None and r.text == text_for(tags[r.index], 2 + 6 * (r.index % 2))
    first_three = {r.index % 2 for r in results[:3]}
    assert first_three == {0}, [r.index for r in results]


def test_default_budgets():
    import inspect

    for name in ("map", "amap"):
        assert inspect.signature(getattr(Broker, name)).parameters["max_delay_ms"].default == DEFAULT_MAX_DELAY_MS
    for name in ("stream", "astream"):
        assert inspect.signature(getattr(Broker, name)).parameters["max_delay_ms"].default == 0


@pytest.mark.parametrize("bad", [-1, 1e9, float("nan"), "5", True, None])
def test_bad_budgets_are_refused(bad):
    with Broker(cfg_for("http://127.0.0.1:9")) as b:
        with pytest.raises(ConfigError, match="max_delay_ms"):
            b.map([{"messages": msgs("x")}], max_delay_ms=bad)
        with pytest.raises(ConfigError, match="max_delay_ms"):
            b.stream(msgs("x"), max_delay_ms=bad)


def test_an_interactive_stream_suspends_the_budget():
    """The smallest budget of the running transfers is the engine's: a stream
    with none is never delayed by a map running on the same Broker."""
    with ConcServer() as srv, Broker(cfg_for(srv.url)) as b:
        tags, reqs = _reqs("s", n=4)
        it = b.map(reqs, concurrency=4, progress=False, max_delay_ms=200)
        first = next(it)
        eng = b._sync
        assert eng is not None
        with b.stream(msgs("live"), x_tokens=3, x_gap=GAP_S) as s:
            assert eng.delay == 0
            assert "".join(d.content or "" for d in s) == text_for("live", 3)
        rest = list(it)
        check_all_ok([first, *rest], tags, TOKENS)
        assert eng.delay == 0  # nothing runs: no budget


def test_a_held_turn_ends_at_once_for_another_thread():
    """While map waits out a long budget, another thread's start() wakes it:
    the budget never blocks the turn for its whole length."""
    with ConcServer() as srv, Broker(cfg_for(srv.url)) as b:
        tags, reqs = _reqs("h", n=8)
        box: Dict[str, Any] = {}

        def run() -> None:
            box["results"] = list(b.map(reqs, concurrency=8, progress=False, max_delay_ms=900))

        th = threading.Thread(target=run, daemon=True)
        th.start()
        assert srv.wait_for(lambda: len(srv.chat()) == 8, 10.0)
        time.sleep(0.1)  # let the map settle into a budget wait
        t0 = time.monotonic()
        s = b.stream(msgs("other"), x_tokens=2)
        started = time.monotonic() - t0
        assert "".join(d.content or "" for d in s) == text_for("other", 2)
        th.join(30.0)
        assert not th.is_alive()
        check_all_ok(box["results"], tags, TOKENS)
        assert started < 0.6, f"start() waited {started:.2f}s for the budget"


@pytest.mark.parametrize("how", list(RUN))
def test_idle_timeout_and_errors_with_a_budget(how):
    with ConcServer() as srv:
        tags, reqs = _reqs("i", n=6)
        reqs[2]["x_stall_after"] = 2
        reqs[2]["x_stall"] = 15.0
        with Broker(cfg_for(srv.url, idle_timeout_ms=600)) as b:
            t0 = time.monotonic()
            results, _, _ = RUN[how](b, reqs, max_delay_ms=100)
            took = time.monotonic() - t0
        assert took < 5.0, took
        by = {r.index: r for r in results}
        assert isinstance(by[2].error, TimeoutError_), by[2].error
        assert by[2].text == text_for(tags[2], 2)
        for i in (0, 1, 3, 4, 5):
            assert by[i].error is None and by[i].text == text_for(tags[i], TOKENS)
        assert srv.wait_for(gone_by(srv, tags[2]), 5.0)
        assert srv.by_tag(tags[2])[0].outcome == "client-gone"


def test_cancelling_amap_with_a_budget_closes_every_connection():
    with ConcServer() as srv:
        tags, reqs = _reqs("x", n=8)
        for r in reqs:
            r["x_tokens"] = 200

        async def go(b: Broker) -> None:
            async def consume() -> None:
                async for _ in b.amap(reqs, concurrency=8, progress=False, max_delay_ms=100):
                    pass

            task = asyncio.ensure_future(consume())
            for _ in range(500):
                if len(srv.chat()) == 8 and all(r.tokens_sent >= 2 for r in srv.chat()):
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        with Broker(cfg_for(srv.url)) as b:
            asyncio.run(asyncio.wait_for(go(b), 20.0))
            for t in tags:
                assert srv.wait_for(gone_by(srv, t), 5.0), t
        assert {r.outcome for r in srv.chat()} == {"client-gone"}


@pytest.mark.parametrize("how", list(RUN))
def test_a_sparse_stream_costs_no_extra_wake_up(how, monkeypatch):
    """Tokens further apart than the budget are read as they come: the budget
    adds no wake-up of its own (no hold, no timer pass) between them."""
    from llama_broker import engine as eng_mod

    calls = {"hold": 0, "timer_pass": 0}
    hold, ep_pass = eng_mod.SyncEngine._hold, eng_mod.AsyncEngine._ep_pass

    def counting_hold(self: Any, wait: float) -> None:
        calls["hold"] += 1
        hold(self, wait)

    def counting_pass(self: Any) -> None:
        calls["timer_pass"] += 1
        ep_pass(self)

    monkeypatch.setattr(eng_mod.SyncEngine, "_hold", counting_hold)
    monkeypatch.setattr(eng_mod.AsyncEngine, "_ep_pass", counting_pass)
    n = 20
    with ConcServer() as srv, Broker(cfg_for(srv.url)) as b:
        reqs = [{"messages": msgs("sp"), "x_tokens": n, "x_gap": 0.04}]
        results, passes, _ = RUN[how](b, reqs, max_delay_ms=15)
    assert results[0].error is None and results[0].text == text_for("sp", n)
    assert passes >= n  # one pass per token: none was held back
    # (the events that come together, at the start and at the end, may be held)
    assert calls["hold"] + calls["timer_pass"] <= 6, calls


@pytest.mark.parametrize("budget_ms", [50.0, 0.0])
def test_batch_jobs_take_the_budget(budget_ms):
    """A batch job hands its results out whole, so it runs with a budget (the
    default is map's); with one, the engine's passes are bounded by it."""
    from llama_broker.batch import iter_batch

    n = 32
    tags = [f"j{i:02d}" for i in range(n)]
    lines = [
        {
            "custom_id": t,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": msgs(t), "x_tokens": TOKENS, "x_gap": GAP_S},
        }
        for t in tags
    ]
    with ConcServer() as srv, Broker(cfg_for(srv.url)) as b:
        t0 = time.monotonic()
        out = list(iter_batch(lines, endpoints=[srv.url], concurrency=n, broker=b, max_delay_ms=budget_ms))
        took = time.monotonic() - t0
        assert b._sync is not None
        passes = b._sync.passes
    texts = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in out}
    assert texts == {t: text_for(t, TOKENS) for t in tags}
    if budget_ms:
        assert passes <= took / (budget_ms / 1000.0) + 2, (passes, took)
    else:
        assert passes >= TOKENS, passes


def test_batch_default_budget_is_maps():
    import inspect

    from llama_broker.batch import iter_batch, run_batch
    from llama_broker.jobs import JobRunner

    for f in (iter_batch, run_batch, JobRunner.__init__):
        assert inspect.signature(f).parameters["max_delay_ms"].default == DEFAULT_MAX_DELAY_MS
    with pytest.raises(ConfigError):
        list(iter_batch([], endpoints=["http://127.0.0.1:9"], max_delay_ms=-1))
