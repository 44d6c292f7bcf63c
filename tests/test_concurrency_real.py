"""Fan-out and asyncio against a REAL llama-server (4 slots; see conftest.py).

``map``/``amap`` over the 4-slot server, and cancellation of an ``astream``
seen from the server's side (``GET /slots``). Replies are kept short: the
tiny model makes tens of tokens/s per slot on 2 shared cores.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Dict, List

import pytest

from llama_broker import Broker
from llama_broker.server import LocalServer

pytestmark = pytest.mark.llama_server

QUESTIONS = [
    "Name a colour.", "Name a fruit.", "Name an animal.", "Name a country.",
    "Name a planet.", "Name a metal.", "Name a tree.", "Name a river.",
    "Name a month.", "Name a flower.", "Name a bird.", "Name a city.",
    "Name a sport.", "Name a vegetable.", "Name a tool.", "Name a drink.",
]


def _requests(n: int, **params: Any) -> List[Dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": 16, "seed": i, **params}
        for i in range(n)
    ]


def _check(results: list, n: int, server: LocalServer) -> None:
    assert sorted(r.index for r in results) == list(range(n)), "every index once"
    for r in results:
        assert r.error is None, (r.index, r.error)
        assert r.text.strip(), f"request {r.index}: empty answer"
        assert r.finish_reason in ("stop", "length"), (r.index, r.finish_reason)
        assert r.deltas >= 1 and r.elapsed_s > 0
        assert r.endpoint.rstrip("/") == server.endpoint


class _SlotWatcher:
    """Polls ``GET /slots`` from a thread (bounded) and keeps the most slots seen busy at once."""

    def __init__(self, server: LocalServer, tools: Any) -> None:
        self.server, self.tools = server, tools
        self.max_busy = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(6000):  # <= 5 min at 50 ms
            if self._stop.is_set():
                return
            try:
                busy = sum(1 for s in self.tools.get_slots(self.server) if s.get("is_processing"))
            except (OSError, AssertionError):
                busy = 0
            self.max_busy = max(self.max_busy, busy)
            self._stop.wait(0.05)

    def __enter__(self) -> "_SlotWatcher":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join(10)


def test_map_16_over_4_slots(idle_server: LocalServer, tools: Any) -> None:
    cfg = idle_server.config(temperature=0.7, timeout_ms=300_000)
    with Broker(cfg) as b, _SlotWatcher(idle_server, tools) as w:
        results = list(b.map(_requests(16), concurrency=4, progress=False))
    _check(results, 16, idle_server)
    assert 2 <= w.max_busy <= 4, f"{w.max_busy} slot(s) busy at once with concurrency=4"
    tools.wait_idle(idle_server, timeout=10.0)


def test_amap_8(idle_server: LocalServer) -> None:
    cfg = idle_server.config(temperature=0.7, timeout_ms=300_000)

    async def go(b: Broker) -> list:
        return [r async for r in b.amap(_requests(8), concurrency=4, progress=False)]

    with Broker(cfg) as b:
        results = asyncio.run(go(b))
    _check(results, 8, idle_server)


LONG = [{"role": "user", "content": "Write a very long story about the sea."}]


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_leaving_astream_early_frees_the_slot(idle_server: LocalServer, tools: Any, how: str) -> None:
    max_tokens = 2000
    slot_id = 1
    cfg = idle_server.config(temperature=0.8, timeout_ms=300_000)
    state: Dict[str, Any] = {}

    async def reader(b: Broker, seen: List[str], started: asyncio.Event, close_now: asyncio.Event) -> None:
        async with b.astream(LONG, max_tokens=max_tokens, ignore_eos=True, seed=3, id_slot=slot_id) as s:
            async for d in s:
                if d.content:
                    seen.append(d.content)
                if len(seen) >= 5:
                    started.set()
                    await close_now.wait()  # (the cancel case is cancelled here)
                    if how == "aclose":
                        await s.aclose()
                        state["after_aclose"] = [x async for x in s]  # nothing more
                        return

    async def go(b: Broker) -> None:
        seen: List[str] = []
        started, close_now = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(reader(b, seen, started, close_now))
        await asyncio.wait_for(started.wait(), 120.0)
        slot = tools.get_slots(idle_server)[slot_id]
        assert slot["is_processing"], slot
        state["decoded_open"] = slot["next_token"][0]["n_decoded"]
        if how == "cancel":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            close_now.set()
            await asyncio.wait_for(task, 10.0)
        state["t_closed"] = time.monotonic()
        state["seen"] = len(seen)

    with Broker(cfg) as b:
        asyncio.run(go(b))
    if how == "aclose":
        assert state["after_aclose"] == []
    last_decoded = state["decoded_open"]
    for _ in range(400):  # bounded: 400 x 50 ms
        slot = tools.get_slots(idle_server)[slot_id]
        if not slot["is_processing"]:
            break
        last_decoded = slot["next_token"][0]["n_decoded"]
        time.sleep(0.05)
    stopped_after = time.monotonic() - state["t_closed"]
    assert not slot["is_processing"], f"slot still busy {stopped_after:.1f}s after the client left: {slot}"
    # the server checks for a departed client about once a second
    assert stopped_after < 5.0, stopped_after
    assert last_decoded < max_tokens // 2, (last_decoded, stopped_after)
