"""The clients of the paced-stream benchmarks (``test_paced.py``).

A real llama-server writes a token, then the next one 5-30 ms later. Then
every token costs the client a wake-up (a poll return, a ``recv``, a trip
through curl and into Python) and parsing hardly counts. These clients all
stream from the stream server's pacer (``streamserver.py``: one event every
``gap_us``, a pseudo-random phase per stream) and are measured in client CPU
per token.

Every client is ``make(url, streams, params) -> PacedClient`` (``params(n)``:
the request fields for an ``n``-token reply, e.g. :func:`paced_params`; the
real llama-server benchmark passes ``max_tokens``/``ignore_eos``): the factory
builds what a program keeps between requests (handles, a Broker, an SDK client,
an event loop); ``client.run(n)`` streams ``streams`` concurrent replies of
``n`` tokens each and returns one item per stream: the reply text (checked
against the stream's SHA-256) or, for the floors, the body byte count
(checked against the body size). ``client.close()`` tears it down.

The floors are what any pycurl client must spend:

``floor: easy.perform``       one ``Curl.perform()`` with a no-op ``WRITEFUNCTION`` (1 stream)
``floor: multi per-wake``     one ``CurlMulti``: ``perform()``, then ``select()`` until a socket
                              is readable, again; no-op ``WRITEFUNCTION``s
``floor: multi coalesced``    the same loop sleeping a fixed budget (``COALESCE_MS``) between
                              ``perform()`` passes instead of waiting for a socket: the kernel
                              buffers what arrives meanwhile and one wake-up reads every socket
                              (same wall time while the budget is below the gap)
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _harness as h

#: the coalesced floor's sleep between perform() passes
COALESCE_MS = float(os.environ.get("LB_BENCH_COALESCE_MS") or 5.0)
#: bound on one client run (a stuck run fails instead of hanging the suite)
RUN_TIMEOUT_S = 600.0

#: ``params(n)``: the request fields for a reply of ``n`` tokens
Params = Callable[[int], Dict[str, Any]]


def paced_params(n: int, gap_us: int) -> Dict[str, Any]:
    """The request fields that pick a paced stream of ``n`` tokens, one every ``gap_us``."""
    return {"bench_mode": "paced", "bench_events": n, "bench_gap_us": gap_us, "bench_phase": "spread"}


def paced(gap_us: int) -> "Params":
    """``params`` for the stream server's paced streams, one token every ``gap_us``."""
    return lambda n: paced_params(n, gap_us)


def _body(n: int, params: Params) -> dict:
    return {"model": "m", "messages": h.MESSAGES, "stream": True, **params(n)}


class PacedClient:
    """``run(n)`` → one result per stream; ``kind`` is ``"text"`` or ``"bytes"``."""

    kind = "text"

    def run(self, n: int) -> List[Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- llama_broker ----------------------------------------------------------------


def _cfg(url: str):
    import llama_broker

    return llama_broker.ModelConfig(endpoint=url, model="m", timeout_ms=int(RUN_TIMEOUT_S * 1000))


class LbChatStream(PacedClient):
    """``llama_broker.chat_stream(cfg, messages, parts.append, **params)`` (1 stream)."""

    def __init__(self, url: str, streams: int, params: Params) -> None:
        import llama_broker

        assert streams == 1
        self.cfg, self.params, self.fn = _cfg(url), params, llama_broker.chat_stream

    def run(self, n: int) -> List[str]:
        parts: List[str] = []
        self.fn(self.cfg, h.MESSAGES, parts.append, **self.params(n))
        return ["".join(parts)]


class LbStream(PacedClient):
    """``with llama_broker.stream(cfg, messages, **params) as s: for d in s: ...`` (1 stream)."""

    def __init__(self, url: str, streams: int, params: Params) -> None:
        import llama_broker

        assert streams == 1
        self.cfg, self.params, self.fn = _cfg(url), params, llama_broker.stream

    def run(self, n: int) -> List[str]:
        parts: List[str] = []
        append = parts.append
        with self.fn(self.cfg, h.MESSAGES, **self.params(n)) as deltas:
            for d in deltas:
                if d.content:
                    append(d.content)
        return ["".join(parts)]


class LbMap(PacedClient):
    """``for r in Broker.map(requests, concurrency=streams)`` (one thread)."""

    def __init__(self, url: str, streams: int, params: Params, max_delay_ms: Optional[float] = None) -> None:
        import llama_broker

        self.broker = llama_broker.Broker(_cfg(url))
        self.streams, self.params = streams, params
        self.kw: Dict[str, Any] = {} if max_delay_ms is None else {"max_delay_ms": max_delay_ms}

    def run(self, n: int) -> List[str]:
        reqs = [{"messages": h.MESSAGES, **self.params(n)} for _ in range(self.streams)]
        texts = [""] * self.streams
        for r in self.broker.map(reqs, concurrency=self.streams, progress=False, **self.kw):
            if r.error is not None:
                raise r.error
            texts[r.index] = r.text
        return texts

    def close(self) -> None:
        self.broker.close()


class _Loop(PacedClient):
    """A client that runs a coroutine per ``run`` on its own event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, n: int) -> List[Any]:
        return self.loop.run_until_complete(asyncio.wait_for(self.go(n), RUN_TIMEOUT_S))

    async def go(self, n: int) -> List[Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        self.loop.close()


class LbAmap(_Loop):
    """``async for r in Broker.amap(requests, concurrency=streams)``."""

    def __init__(self, url: str, streams: int, params: Params, max_delay_ms: Optional[float] = None) -> None:
        import llama_broker

        super().__init__()
        self.broker = llama_broker.Broker(_cfg(url))
        self.streams, self.params = streams, params
        self.kw: Dict[str, Any] = {} if max_delay_ms is None else {"max_delay_ms": max_delay_ms}

    async def go(self, n: int) -> List[str]:
        reqs = [{"messages": h.MESSAGES, **self.params(n)} for _ in range(self.streams)]
        texts = [""] * self.streams
        async for r in self.broker.amap(reqs, concurrency=self.streams, progress=False, **self.kw):
            if r.error is not None:
                raise r.error
            texts[r.index] = r.text
        return texts

    def close(self) -> None:
        self.broker.close()
        super().close()


# -- OpenAI-style clients: the SDK and the drop-in, written the same way -------------


def _collect_sync(client: Any, n: int, params: Params) -> str:
    parts: List[str] = []
    with client.chat.completions.create(
        model="m", messages=h.MESSAGES, stream=True, extra_body=params(n)
    ) as stream:
        for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    parts.append(content)
    return "".join(parts)


async def _collect_async(client: Any, n: int, params: Params) -> str:
    parts: List[str] = []
    stream = await client.chat.completions.create(
        model="m", messages=h.MESSAGES, stream=True, extra_body=params(n)
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    parts.append(content)
    return "".join(parts)


class OpenAISync(PacedClient):
    """``OpenAI(...).chat.completions.create(..., stream=True)``, iterated (1 stream)."""

    def __init__(self, cls: Any, url: str, params: Params) -> None:
        self.client = cls(base_url=url + "/v1", api_key="x", max_retries=0, timeout=RUN_TIMEOUT_S)
        self.params = params

    def run(self, n: int) -> List[str]:
        return [_collect_sync(self.client, n, self.params)]

    def close(self) -> None:
        self.client.close()


class OpenAIGather(_Loop):
    """``AsyncOpenAI`` + ``asyncio.gather`` of ``streams`` streamed creates."""

    def __init__(self, cls: Any, url: str, streams: int, params: Params) -> None:
        super().__init__()
        self.client = cls(base_url=url + "/v1", api_key="x", max_retries=0, timeout=RUN_TIMEOUT_S)
        self.streams, self.params = streams, params

    async def go(self, n: int) -> List[str]:
        return list(await asyncio.gather(*(_collect_async(self.client, n, self.params) for _ in range(self.streams))))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        super().close()


def make_sdk(url: str, streams: int, params: Params) -> PacedClient:
    """The OpenAI SDK: sync ``OpenAI`` for one stream, ``AsyncOpenAI`` + gather for many."""
    import openai

    if streams == 1:
        return OpenAISync(openai.OpenAI, url, params)
    return OpenAIGather(openai.AsyncOpenAI, url, streams, params)


def make_dropin(url: str, streams: int, params: Params) -> PacedClient:
    """The drop-in (``llama_broker.openai``), written exactly as the SDK row."""
    from llama_broker import openai as dropin

    if streams == 1:
        return OpenAISync(dropin.OpenAI, url, params)
    return OpenAIGather(dropin.AsyncOpenAI, url, streams, params)


# -- the floors ------------------------------------------------------------------------


def _handle(url: str):
    import pycurl

    c = pycurl.Curl()
    c.setopt(pycurl.URL, h.chat_url(url))
    c.setopt(pycurl.HTTPHEADER, ["Content-Type: application/json", "Accept: text/event-stream"])
    c.setopt(pycurl.NOSIGNAL, 1)
    return c


class _ByteCount:
    """A no-op WRITEFUNCTION that only adds up the bytes (for the size check)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, chunk: bytes) -> None:
        self.n += len(chunk)


class EasyFloor(PacedClient):
    """``Curl.perform()`` with a no-op WRITEFUNCTION: one stream, curl's own wait loop."""

    kind = "bytes"

    def __init__(self, url: str, streams: int, params: Params) -> None:
        import json

        assert streams == 1
        self.c = _handle(url)
        self.params, self.dumps = params, json.dumps

    def run(self, n: int) -> List[int]:
        import pycurl

        count = _ByteCount()
        self.c.setopt(pycurl.POSTFIELDS, self.dumps(_body(n, self.params)))
        self.c.setopt(pycurl.WRITEFUNCTION, count)
        self.c.perform()
        status = self.c.getinfo(pycurl.RESPONSE_CODE)
        assert status == 200, f"HTTP {status}"
        return [count.n]

    def close(self) -> None:
        self.c.close()


class MultiFloor(PacedClient):
    """One ``CurlMulti`` over ``streams`` handles, no-op WRITEFUNCTIONs.

    ``sleep_s=None``: after each ``perform()``, ``select()`` on curl's sockets
    until one is readable (or curl's timeout), so the loop wakes for each
    arrival — the per-wake floor, the loop llama_broker's sync engine runs.
    ``sleep_s``: sleep that long between passes instead (the coalesced
    floor). (``select()`` sees descriptors below 1024 only; the suite keeps
    one client's connections open at a time.)
    """

    kind = "bytes"

    def __init__(self, url: str, streams: int, params: Params, sleep_s: Optional[float] = None) -> None:
        import json

        import pycurl

        self.handles = [_handle(url) for _ in range(streams)]
        self.multi = pycurl.CurlMulti()
        self.streams, self.params, self.sleep_s, self.dumps = streams, params, sleep_s, json.dumps

    def run(self, n: int) -> List[int]:
        import pycurl

        body = self.dumps(_body(n, self.params))
        counts = []
        for c in self.handles:
            count = _ByteCount()
            c.setopt(pycurl.POSTFIELDS, body)
            c.setopt(pycurl.WRITEFUNCTION, count)
            counts.append(count)
            self.multi.add_handle(c)
        multi, sleep_s = self.multi, self.sleep_s
        remaining = self.streams
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while remaining:
                multi.perform()
                while True:
                    queued, ok, failed = multi.info_read()
                    for c in ok:
                        multi.remove_handle(c)
                        remaining -= 1
                    if failed:
                        c, code, msg = failed[0]
                        raise AssertionError(f"curl error {code}: {msg}")
                    if not queued:
                        break
                if not remaining:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{remaining} streams unfinished after {RUN_TIMEOUT_S} s")
                if sleep_s is not None:
                    time.sleep(sleep_s)
                else:
                    t = multi.timeout()  # ms; -1: curl has no timer running
                    if t != 0:
                        multi.select(1.0 if t < 0 else min(t / 1000.0, 1.0))
        finally:
            for c in self.handles:
                try:
                    multi.remove_handle(c)
                except pycurl.error:
                    pass
        for c in self.handles:
            status = c.getinfo(pycurl.RESPONSE_CODE)
            assert status == 200, f"HTTP {status}"
        return [count.n for count in counts]

    def close(self) -> None:
        for c in self.handles:
            c.close()
        self.multi.close()


# -- the table of clients -----------------------------------------------------------------

FLOOR_EASY = "floor: easy.perform"
FLOOR_WAKE = "floor: multi per-wake"
FLOOR_COALESCED = "floor: multi coalesced"
SDK = "openai"

#: name -> (factory(url, streams, params), module it needs, stream counts it runs at: "one", "many" or "all";
#: "opt": all, but only when named in LB_BENCH_PACED_CLIENTS)
CLIENTS: Dict[str, Tuple[Callable[[str, int, int], PacedClient], str, str]] = {
    "llama_broker.chat_stream": (LbChatStream, "llama_broker", "one"),
    "llama_broker.stream": (LbStream, "llama_broker", "one"),
    "llama_broker.map": (LbMap, "llama_broker", "all"),
    "llama_broker.amap": (LbAmap, "llama_broker", "all"),
    "llama_broker.openai": (make_dropin, "llama_broker", "all"),
    SDK: (make_sdk, "openai", "all"),
    FLOOR_EASY: (EasyFloor, "pycurl", "one"),
    FLOOR_WAKE: (MultiFloor, "pycurl", "all"),
    FLOOR_COALESCED: (lambda u, s, q: MultiFloor(u, s, q, sleep_s=COALESCE_MS / 1000.0), "pycurl", "all"),
}
#: map/amap with a given latency budget (max_delay_ms): run only when named in LB_BENCH_PACED_CLIENTS
for _ms in (0, 2, 5, 10, 20):
    CLIENTS[f"llama_broker.map@{_ms}ms"] = (
        lambda u, s, q, _ms=_ms: LbMap(u, s, q, max_delay_ms=_ms), "llama_broker", "opt")
    CLIENTS[f"llama_broker.amap@{_ms}ms"] = (
        lambda u, s, q, _ms=_ms: LbAmap(u, s, q, max_delay_ms=_ms), "llama_broker", "opt")


def note(name: str, streams: int) -> str:
    """What the row runs, in a few words."""
    many = streams > 1
    return {
        "llama_broker.chat_stream": "chat_stream(cfg, msgs, parts.append)",
        "llama_broker.stream": "with stream(...) as s: for d in s",
        "llama_broker.map": "Broker.map, one thread",
        "llama_broker.amap": "Broker.amap",
        "llama_broker.openai": "drop-in AsyncOpenAI + gather" if many else "drop-in OpenAI",
        SDK: "AsyncOpenAI + gather" if many else "OpenAI SDK",
        FLOOR_EASY: "Curl.perform, no-op write",
        FLOOR_WAKE: "perform + select, no-op write",
        FLOOR_COALESCED: f"perform every {COALESCE_MS:g} ms (sleep), no-op write",
    }.get(name, "")
