"""Every way of leaving a stream early stops the generation on a real llama-server.

An abandoned stream that keeps its connection open keeps llama-server
generating tokens nobody reads, and holds a slot. Each case below reads a few
deltas of a long generation, leaves the way a user would (``break`` and drop
the iterator, with no ``close()``, no ``with``), does nothing more with the
client, and watches ``GET /slots`` until no slot is processing. llama-server
notices a departed client about once a second.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any, Callable, Iterator

import pytest

from llama_broker import Broker
from llama_broker import native
from llama_broker.openai import AsyncOpenAI, OpenAI

pytestmark = pytest.mark.llama_server

PROMPT = [{"role": "user", "content": "Write a very long story about the sea."}]
LONG = dict(max_tokens=4000, ignore_eos=True, seed=7, temperature=0.8)
#: llama-server notices a departed client within about a second (0.2-0.9 s measured
#: here); /slots itself answers late on a loaded machine, hence the margin
STOPS_WITHIN_S = 5.0
SYNC_WAYS = ["stream", "map", "native-chat_chunks", "native-completion_chunks", "dropin-sync"]
ASYNC_WAYS = ["astream", "amap", "native-achat_chunks", "dropin-async"]


def busy(tools: Any, server: Any) -> bool:
    return any(s.get("is_processing") for s in tools.get_slots(server))


def seconds_until_idle(tools: Any, server: Any, t_left: float) -> float:
    """Poll /slots (bounded) until nothing is processing; seconds since ``t_left``."""
    for _ in range(300):  # 300 x 50 ms
        if not busy(tools, server):
            return time.monotonic() - t_left
        time.sleep(0.05)
    raise AssertionError("the generation still runs 15 s after the client left")


def read_a_few(items: Iterator[Any], has_text: Callable[[Any], bool], n: int = 5) -> None:
    """Take items until ``n`` carried text, then break (the iterator stays referenced by the caller)."""
    got = 0
    for item in items:
        got += bool(has_text(item))
        if got >= n:
            break
    assert got >= n, "the stream ended before the test could leave it"


@pytest.mark.parametrize("way", SYNC_WAYS)
def test_leaving_a_sync_stream_stops_the_generation(idle_server: Any, tools: Any, way: str) -> None:
    cfg = idle_server.config(timeout_ms=300_000)
    broker = Broker(cfg)
    client = None
    try:
        if way == "stream":
            it: Any = broker.stream(PROMPT, **LONG)
            read_a_few(it, lambda d: d.content)
        elif way == "map":
            # two requests: a short one completes first; the long one is left running
            reqs = [{"messages": PROMPT, **LONG}, {"messages": PROMPT, "max_tokens": 3}]
            it = broker.map(reqs, concurrency=2, progress=False)
            first = next(it)
            assert first.index == 1 and first.ok, first
        elif way == "native-chat_chunks":
            it = native.chat_chunks(cfg, PROMPT, broker=broker, **LONG)
            read_a_few(it, lambda c: c.get("choices") and (c["choices"][0].get("delta") or {}).get("content"))
        elif way == "native-completion_chunks":
            it = native.completion_chunks(cfg, "Once upon a time, by the sea,", broker=broker, n_predict=4000, ignore_eos=True)
            read_a_few(it, lambda c: c.get("content"))
        else:
            client = OpenAI(base_url=idle_server.endpoint + "/v1", api_key="x", max_retries=0)
            it = client.chat.completions.create(
                model="m", messages=PROMPT, stream=True, max_tokens=4000, seed=7, extra_body={"ignore_eos": True}
            )
            read_a_few(it, lambda ch: ch.choices and ch.choices[0].delta.content)
        assert busy(tools, idle_server), "the generation should still run while the stream is held"
        t_left = time.monotonic()
        del it  # leave: no close(), no with block, and nothing more on the Broker
        gc.collect()
        stopped = seconds_until_idle(tools, idle_server, t_left)
        print(f"\n{way}: generation stopped {stopped:.2f} s after the client left")
    finally:
        broker.close()
        if client is not None:
            client.close()
    assert stopped < STOPS_WITHIN_S, (way, stopped)


@pytest.mark.parametrize("way", ASYNC_WAYS)
def test_leaving_an_async_stream_stops_the_generation(idle_server: Any, tools: Any, way: str) -> None:
    cfg = idle_server.config(timeout_ms=300_000)

    async def go() -> float:
        broker = Broker(cfg)
        client = None
        try:
            if way == "astream":
                it: Any = broker.astream(PROMPT, **LONG)
                n = 0
                async for d in it:
                    n += bool(d.content)
                    if n >= 5:
                        break
            elif way == "amap":
                reqs = [{"messages": PROMPT, **LONG}, {"messages": PROMPT, "max_tokens": 3}]
                it = broker.amap(reqs, concurrency=2, progress=False)
                first = await it.__anext__()
                assert first.index == 1 and first.ok, first
            elif way == "native-achat_chunks":
                it = native.achat_chunks(cfg, PROMPT, broker=broker, **LONG)
                n = 0
                async for c in it:
                    n += bool(c.get("choices") and (c["choices"][0].get("delta") or {}).get("content"))
                    if n >= 5:
                        break
            else:
                client = AsyncOpenAI(base_url=idle_server.endpoint + "/v1", api_key="x", max_retries=0)
                it = await client.chat.completions.create(
                    model="m", messages=PROMPT, stream=True, max_tokens=4000, seed=7, extra_body={"ignore_eos": True}
                )
                n = 0
                async for ch in it:
                    n += bool(ch.choices and ch.choices[0].delta.content)
                    if n >= 5:
                        break
            assert busy(tools, idle_server), "the generation should still run while the stream is held"
            t_left = time.monotonic()
            del it
            gc.collect()
            for _ in range(300):  # the loop keeps turning while the slot is watched
                if not busy(tools, idle_server):
                    return time.monotonic() - t_left
                await asyncio.sleep(0.05)
            raise AssertionError("the generation still runs 15 s after the client left")
        finally:
            broker.close()
            if client is not None:
                await client.close()

    stopped = asyncio.run(go())
    print(f"\n{way}: generation stopped {stopped:.2f} s after the client left")
    assert stopped < STOPS_WITHIN_S, (way, stopped)
