"""asyncio lifecycles: closing with requests in flight, streams left with
``break``, streams made before their loop runs, and a Broker used by several
loops one after the other.

Against the loopback server (tests/loopback.py): it records how each reply
ended (``client-gone`` when the client closed the connection) and when, so
every test states what the *server* sees, not only what the caller sees.
Every wait is bounded; a hang fails the test within seconds.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any, Callable, List

import pytest

from llama_broker import Broker, BrokerError, ModelConfig, TransportError
from llama_broker import native
from llama_broker import openai as lbo

from loopback import LoopbackServer, api_error, ok, paced

MSGS = [{"role": "user", "content": "hi"}]
LONG = 2000  # tokens of a paced reply: ~40 s, far longer than any test waits


@pytest.fixture
def srv():
    with LoopbackServer() as s:
        yield s


def cfg_for(srv: LoopbackServer, **kw: Any) -> ModelConfig:
    kw.setdefault("max_retries", 0)
    return ModelConfig(srv.url, model="m", **kw)


async def until(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll ``pred`` on the running loop (the loop keeps turning) for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# ============================================= 1. close() with requests in flight ====


def test_broker_close_ends_every_async_request_in_flight(srv):
    """achat, achat_stream, astream, amap and a request waiting for a retry all
    end promptly with a TransportError when the Broker is closed under them;
    the server sees every connection go."""

    def reply(req: Any) -> Any:
        if req.json["messages"][0]["content"] == "retry":
            return api_error(503, "Loading model", "unavailable_error")
        return paced(LONG)

    srv.script(reply)

    async def main() -> None:
        b = Broker(cfg_for(srv))
        slow_retry = cfg_for(srv, max_retries=5, retry_backoff_ms=20_000, timeout_ms=120_000)

        async def read_stream() -> None:
            async for _ in b.astream(MSGS):
                pass

        async def read_map() -> None:
            async for _ in b.amap([{"messages": MSGS}] * 2, concurrency=2, progress=False):
                pass

        tasks = [
            asyncio.create_task(b.achat(MSGS)),
            asyncio.create_task(b.achat_stream(MSGS, lambda _c: None)),
            asyncio.create_task(read_stream()),
            asyncio.create_task(read_map()),
            asyncio.create_task(b.achat([{"role": "user", "content": "retry"}], cfg=slow_retry)),
        ]
        assert await until(lambda: len(srv.chat_requests()) >= 6 and len(srv.outcomes) >= 1, 5.0)
        await asyncio.sleep(0.2)  # tokens are flowing on the five streams; the 503 one waits to retry
        t_close = time.monotonic()
        b.close()
        done, pending = await asyncio.wait(tasks, timeout=2.0)
        for t in pending:
            t.cancel()
        assert not pending, f"{len(pending)} of {len(tasks)} tasks still waiting 2 s after close()"
        for t in tasks:
            err = t.exception()
            assert isinstance(err, TransportError), repr(err)
            assert "Broker was closed" in str(err)
        assert await until(lambda: len(srv.outcomes) >= 6, 2.0), srv.outcomes
        streams = [(o, e) for o, e in zip(srv.outcomes, srv.ended_at) if o != "complete"]  # (the 503 is complete)
        assert [o for o, _ in streams] == ["client-gone"] * 5
        assert all(e - t_close < 1.0 for _, e in streams)
        with pytest.raises(BrokerError):
            await b.achat(MSGS)  # closed for good

    asyncio.run(main())


def test_broker_close_from_on_delta_ends_the_request(srv):
    """close() called from inside curl's callback (an on_delta) cannot close curl's
    handles there: the request still ends at once, the connection right after."""
    srv.script(paced(LONG, 0.01))

    async def main() -> None:
        b = Broker(cfg_for(srv))
        seen: List[str] = []

        def on_delta(c: str) -> None:
            seen.append(c)
            if len(seen) == 3:
                b.close()

        with pytest.raises(TransportError, match="Broker was closed"):
            await asyncio.wait_for(b.achat_stream(MSGS, on_delta), 2.0)
        assert await until(lambda: srv.outcomes == ["client-gone"], 1.0), srv.outcomes

    asyncio.run(main())


def test_async_openai_close_ends_requests_in_flight(srv):
    """AsyncOpenAI.close() with a create() waiting and a stream being read:
    both tasks end promptly with the SDK's APIConnectionError (a BrokerError)."""
    srv.script(paced(LONG))

    async def main() -> None:
        client = lbo.AsyncOpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)

        async def read_stream() -> None:
            s = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
            async for _ in s:
                pass

        tasks = [
            asyncio.create_task(client.chat.completions.create(model="m", messages=MSGS)),
            asyncio.create_task(read_stream()),
        ]
        assert await until(lambda: len(srv.chat_requests()) >= 2, 5.0)
        await asyncio.sleep(0.2)
        await asyncio.wait_for(client.close(), 5.0)
        done, pending = await asyncio.wait(tasks, timeout=2.0)
        for t in pending:
            t.cancel()
        assert not pending, "requests still waiting 2 s after AsyncOpenAI.close()"
        for t in tasks:
            err = t.exception()
            assert isinstance(err, lbo.APIConnectionError) and isinstance(err, BrokerError), repr(err)
        assert await until(lambda: len(srv.outcomes) >= 2, 2.0)
        assert srv.outcomes == ["client-gone", "client-gone"]

    asyncio.run(main())


# ================================= 2. a stream left with break closes its connection ====


# Each leaves a stream with `break`, drops it, and returns what the test closes at its end.


async def _leave_astream(b: Broker, srv: LoopbackServer) -> Any:
    async for d in b.astream(MSGS):
        if d.content:
            break
    return None


async def _leave_openai_stream(b: Broker, srv: LoopbackServer) -> Any:
    client = lbo.AsyncOpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)
    s = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
    async for ch in s:
        if ch.choices and ch.choices[0].delta.content:
            break
    del s
    return client


async def _leave_native_chunks(b: Broker, srv: LoopbackServer) -> Any:
    s = native.achat_chunks(cfg_for(srv), MSGS, broker=b)
    async for _ in s:
        break
    del s
    return None


async def _leave_amap(b: Broker, srv: LoopbackServer) -> Any:
    srv.script(ok(["x"]), paced(LONG))  # the first request ends at once, the second streams on
    async for _ in b.amap([{"messages": MSGS}] * 2, concurrency=2, progress=False):
        break
    return None


@pytest.mark.parametrize(
    "leave", [_leave_astream, _leave_openai_stream, _leave_native_chunks, _leave_amap],
    ids=["astream", "openai-AsyncStream", "native-achat_chunks", "amap"],
)
def test_break_out_of_an_async_stream_closes_the_connection(srv, leave):
    srv.script(paced(LONG))

    async def main() -> None:
        b = Broker(cfg_for(srv))
        client = None
        try:
            client = await leave(b, srv)
            t_left = time.monotonic()
            await asyncio.sleep(0)  # one turn of the loop
            gc.collect()
            gone = await until(lambda: "client-gone" in srv.outcomes, 1.5)
            assert gone, f"the server still streams {time.monotonic() - t_left:.1f}s after the loop was left"
            assert srv.ended_at[srv.outcomes.index("client-gone")] - t_left < 1.0
            srv.script(ok(["o", "k"]))  # the Broker stays usable
            assert await asyncio.wait_for(b.achat(MSGS), 5.0) == "ok"
        finally:
            b.close()
            if client is not None:
                await client.close()

    asyncio.run(main())


def test_aclose_and_async_with_close_the_connection(srv):
    srv.script(paced(LONG))

    async def main() -> None:
        with Broker(cfg_for(srv)) as b:
            s = b.astream(MSGS)
            await s.__anext__()
            await s.aclose()
            async with b.astream(MSGS) as s2:
                async for _ in s2:
                    break
            assert await until(lambda: srv.outcomes.count("client-gone") == 2, 1.5), srv.outcomes
            s3 = b.astream(MSGS)
            await s3.aclose()  # closed before it started: it is never sent
            assert [d async for d in s3] == []
            await asyncio.sleep(0.2)
            assert len(srv.chat_requests()) == 2

    asyncio.run(main())


# ============================== 7. a stream made before the loop runs starts its clock late ====


def test_astream_made_before_the_loop_counts_time_from_its_start(srv):
    srv.script(paced(3, 0.05, token="a"))  # ~0.15 s: more than a clock already run out allows
    with Broker(cfg_for(srv, timeout_ms=600)) as b:
        s = b.astream(MSGS)
        time.sleep(0.8)  # longer than timeout_ms, before the request is sent

        async def main() -> Any:
            t_start = time.monotonic()
            text = "".join([d.content or "" async for d in s])
            return text, time.monotonic() - t_start

        text, took = asyncio.run(main())
    assert text == "aaa"
    res = s.result
    assert res is not None and res.ttft_s is not None
    assert res.elapsed_s <= took and res.ttft_s <= took, (res.elapsed_s, res.ttft_s, took)


# ======================== 8. close() reaches streams of loops that are gone ====


class StrictLoop(asyncio.SelectorEventLoop):
    """A loop that records every use after it was closed (nothing may touch it)."""

    def __init__(self) -> None:
        super().__init__()
        self.touched: List[str] = []

    def _guard(self, name: str) -> None:
        if self.is_closed():
            self.touched.append(name)


for _name in ("add_reader", "remove_reader", "add_writer", "remove_writer", "call_soon", "call_later",
              "call_at", "call_soon_threadsafe", "create_future"):
    def _make(name: str) -> Any:
        base = getattr(asyncio.SelectorEventLoop, name)

        def method(self: StrictLoop, *a: Any, **kw: Any) -> Any:
            self._guard(name)
            return base(self, *a, **kw)

        return method

    setattr(StrictLoop, _name, _make(_name))


def _run_on(loop: StrictLoop, coro: Any) -> Any:
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _open_stream(b: Broker) -> Any:
    s = b.astream(MSGS)
    await s.__anext__()
    return s


def test_close_cuts_a_stream_left_open_on_a_closed_loop(srv):
    srv.script(paced(LONG))
    b = Broker(cfg_for(srv))
    loop = StrictLoop()
    s = _run_on(loop, _open_stream(b))  # the loop is closed; the stream is still open
    try:
        time.sleep(0.2)
        assert srv.outcomes == [], "the connection must still be open here"
        t_close = time.monotonic()
        b.close()
        assert srv.wait_replies(1, timeout=2.0), "the connection stayed open after close()"
        assert srv.outcomes == ["client-gone"] and srv.ended_at[0] - t_close < 1.0
        assert loop.touched == [], f"close() used the closed loop: {loop.touched}"

        async def drain() -> None:
            async for _ in s:
                pass

        with pytest.raises(TransportError):  # the stream ended (after the deltas already queued)
            asyncio.run(drain())
    finally:
        b.close()


def test_close_reaches_every_loop_the_broker_was_used_on(srv):
    srv.script(paced(LONG))
    b = Broker(cfg_for(srv))
    loop1, loop2 = StrictLoop(), StrictLoop()
    s1 = _run_on(loop1, _open_stream(b))  # left open by the first loop

    async def second() -> None:
        s2 = await _open_stream(b)  # a stream on the second loop, in flight
        assert await until(lambda: len(srv.chat_requests()) == 2, 2.0)
        t_close = time.monotonic()
        b.close()
        with pytest.raises(TransportError):
            async for _ in s2:
                pass
        with pytest.raises(TransportError):  # the first loop's stream ended too (queued deltas first)
            async for _ in s1:
                pass
        assert await until(lambda: len(srv.outcomes) == 2, 2.0), srv.outcomes
        assert srv.outcomes == ["client-gone", "client-gone"]
        assert all(e - t_close < 1.0 for e in srv.ended_at)

    try:
        _run_on(loop2, second())
        assert loop1.touched == [], f"the closed loop was used: {loop1.touched}"
    finally:
        b.close()


# ============================================ the same on a real llama-server ====

LONG_PROMPT = [{"role": "user", "content": "Write a very long story about the sea."}]


@pytest.mark.llama_server
@pytest.mark.parametrize("how", ["break", "broker-close"])
def test_real_server_slot_is_freed_by_break_and_by_close(idle_server: Any, tools: Any, how: str) -> None:
    """Leaving ``async for`` with break (no aclose, no async with) and closing the
    Broker under an achat both stop the generation: the slot goes idle while the
    loop goes on."""
    slot_id = 2
    cfg = idle_server.config(temperature=0.8, timeout_ms=300_000)
    params = dict(max_tokens=2000, ignore_eos=True, seed=5, id_slot=slot_id)

    async def busy() -> bool:
        return bool(tools.get_slots(idle_server)[slot_id]["is_processing"])

    async def go() -> float:
        b = Broker(cfg)
        try:
            if how == "break":
                n = 0
                async for d in b.astream(LONG_PROMPT, **params):
                    n += bool(d.content)
                    if n >= 5:
                        break
                assert await busy()
                t_left = time.monotonic()
            else:
                task = asyncio.create_task(b.achat(LONG_PROMPT, **params))
                deadline = time.monotonic() + 120
                while not await busy():
                    assert time.monotonic() < deadline and not task.done()
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                t_left = time.monotonic()
                b.close()
                with pytest.raises(TransportError):
                    await asyncio.wait_for(task, 2.0)
            for _ in range(200):  # bounded: 200 x 50 ms, the loop turning
                if not await busy():
                    return time.monotonic() - t_left
                await asyncio.sleep(0.05)
            raise AssertionError(f"slot still busy 10 s after the client left ({how})")
        finally:
            b.close()

    stopped_after = asyncio.run(go())
    assert stopped_after < 5.0, stopped_after  # the server checks for a departed client about once a second
