"""The pulled (sync) engine's lifecycle and threads, against the loopback server.

- A pulled stream dropped while open (``break``, garbage collection) closes
  its connection at once, whatever the Broker does next — also when the
  finalizer runs inside a curl callback (then at the end of that turn).
  The same for the OpenAI drop-in's ``Stream`` and ``native``'s streams.
- Waiting for sockets works with descriptor numbers over 1024 (no spin).
- The idle timeout counts only while a request is on the wire, not while it
  waits in curl's queue for a connection (``max_host_connections``).
- One Broker may be shared by threads: streams made on one thread and
  consumed on others (a web framework's thread pool) all complete.
- ``Broker.close()`` ends the requests in flight with an error that says so.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, List

import pycurl
import pytest

import llama_broker as lb
from llama_broker import native
from llama_broker import openai as lbo

from loopback import DONE, LoopbackServer, Reply, Request, Stall, chunk, data, ok, sse

MSGS = [{"role": "user", "content": "hi"}]


def paced(n: int, gap: float, token: str = "t") -> Reply:
    """A stream of ``n`` tokens, one every ``gap`` s (the first at once)."""
    body: List[Any] = [data(chunk({"role": "assistant", "content": None})), data(chunk({"content": token}))]
    for _ in range(n - 1):
        body += [Stall(gap), data(chunk({"content": token}))]
    return sse(body + [data(chunk({}, "stop")), DONE])


def wait_outcome(srv: LoopbackServer, outcome: str, timeout: float) -> bool:
    """Whether some chat reply ends with ``outcome`` within ``timeout`` s
    (outcomes are listed in the order the replies end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outcome in srv.outcomes:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    with LoopbackServer() as s:
        yield s


def cfg_for(srv: LoopbackServer, **kw: Any) -> lb.ModelConfig:
    base: dict = dict(model="m", max_retries=0, timeout_ms=20000, idle_timeout_ms=5000)
    base.update(kw)
    return lb.ModelConfig(srv.url, **base)


# -- dropped streams close their connection ----------------------------------------------


def _first_then_drop(kind: str, srv: LoopbackServer, cfg: lb.ModelConfig) -> Callable[[], str]:
    """Open a stream of ``kind``, read one item, drop it (``break``); returns
    what "the Broker's next call" is for that kind."""
    if kind == "stream":
        broker = lb.Broker(cfg)
        for _ in broker.stream(MSGS):
            break
        return lambda: broker.chat(MSGS)
    if kind == "native":
        broker = lb.Broker(cfg)
        for _ in native.chat_chunks(cfg, MSGS, broker=broker):
            break
        return lambda: broker.chat(MSGS)
    client = lbo.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)
    for _ in client.chat.completions.create(model="m", messages=MSGS, stream=True):
        break
    return lambda: client.chat.completions.create(model="m", messages=MSGS).choices[0].message.content


@pytest.mark.parametrize("then", ["nothing", "chat"])
@pytest.mark.parametrize("kind", ["stream", "native", "openai"])
def test_a_dropped_stream_closes_its_connection_within_a_second(srv: LoopbackServer, kind: str, then: str) -> None:
    # 300 tokens 20 ms apart: 6 s if nobody closes it; the server notices a
    # closed connection at its next write.
    srv.script(paced(300, 0.02), ok(["fine"]))
    next_call = _first_then_drop(kind, srv, cfg_for(srv))
    t0 = time.monotonic()
    if then == "chat":
        assert next_call() == "fine"
    assert wait_outcome(srv, "client-gone", 1.5), srv.outcomes
    assert time.monotonic() - t0 < 1.5


def test_a_stream_dropped_inside_a_curl_callback_is_closed_at_the_end_of_that_turn(srv: LoopbackServer) -> None:
    # The last reference to an open stream goes away while curl runs a
    # callback of another stream (a finalizer may run anywhere): the multi
    # handle cannot be touched then, so the cut waits for the end of that
    # turn — and happens then, though the Broker is not used again.
    cfg = cfg_for(srv)
    srv.script(paced(300, 0.02), ok(["x", "y"]))
    broker = lb.Broker(cfg)
    dropped = broker.stream(MSGS)
    next(dropped)
    holder = [dropped]
    del dropped

    def make_decoder(push: Callable[[Any], Any], t0: float) -> native.ChunkDecoder:
        def push_and_drop(item: Any) -> None:
            holder.clear()  # the dropped stream's finalizer runs here, inside curl
            push(item)

        return native.ChunkDecoder(push_and_drop, t0=t0)

    body = json.dumps({"model": "m", "messages": MSGS, "stream": True}).encode()
    s = native.EventStream(broker, cfg, body, make_decoder, url=cfg.url)
    next(s)
    assert not holder
    assert wait_outcome(srv, "client-gone", 1.5), srv.outcomes
    s.close()
    broker.close()


def test_a_stream_dropped_on_another_thread_while_this_one_drives_is_closed(srv: LoopbackServer) -> None:
    cfg = cfg_for(srv)
    srv.script(paced(300, 0.02), paced(200, 0.01, "u"))
    broker = lb.Broker(cfg)
    dropped = broker.stream(MSGS)
    next(dropped)
    box = [dropped]
    del dropped
    s = broker.stream(MSGS)
    threading.Timer(0.2, box.clear).start()  # the finalizer runs on the timer's thread
    n = sum(1 for d in s if d.content)  # this thread drives meanwhile
    assert n == 200
    assert srv.outcomes[0] == "client-gone"
    broker.close()


# -- no spin with descriptors over 1024 ------------------------------------------------------


@pytest.fixture
def many_fds() -> Iterator[List[int]]:
    """Every descriptor number up to at least 1100 in use (so the next sockets
    get numbers select() cannot watch); the soft limit raised if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1400
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {want}: cannot test descriptors over 1024")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    fds: List[int] = []
    try:
        while not fds or fds[-1] < 1100:
            fds.append(os.open(os.devnull, os.O_RDONLY))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("how", ["stream", "map"])
def test_pulled_streams_do_not_spin_with_descriptors_over_1024(srv: LoopbackServer, many_fds: List[int], how: str) -> None:
    srv.script(paced(40, 0.05))  # 2 s of tokens
    broker = lb.Broker(cfg_for(srv))
    wall0, cpu0 = time.monotonic(), time.process_time()
    if how == "stream":
        n = sum(1 for d in broker.stream(MSGS) if d.content)
        assert n == 40
    else:
        (r,) = list(broker.map([{"messages": MSGS}], progress=False))
        assert r.ok and r.text == "t" * 40
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    broker.close()
    assert wall >= 1.9
    # waiting costs nothing; a wait that returns at once burns a whole core
    assert cpu < 0.3 * wall, f"{cpu:.2f} s CPU in {wall:.2f} s"


# -- the idle clock runs only on the wire ----------------------------------------------------


@pytest.mark.parametrize("how", ["map", "stream"])
def test_requests_queued_by_max_host_connections_do_not_idle_time_out(srv: LoopbackServer, how: str) -> None:
    # Each reply takes ~1 s with a byte every 0.1 s: never idle on the wire.
    # One connection, three requests: the last waits ~2 s in curl's queue.
    srv.script(paced(10, 0.1))
    cfg = cfg_for(srv, idle_timeout_ms=500)
    with lb.Broker(cfg, max_host_connections=1) as broker:
        if how == "map":
            results = list(broker.map([{"messages": MSGS}] * 3, concurrency=3, progress=False))
            assert [r.error for r in results] == [None] * 3
            assert [r.text for r in results] == ["t" * 10] * 3
        else:
            streams = [broker.stream(MSGS) for _ in range(3)]
            texts = ["".join(d.content or "" for d in s) for s in reversed(streams)]
            assert texts == ["t" * 10] * 3
    assert len({r.conn for r in srv.chat_requests()}) == 1


def test_a_silent_server_still_idle_times_out_once_the_request_is_sent(srv: LoopbackServer) -> None:
    # The other side of the rule above: on a reused connection too, a request
    # on the wire that gets no byte times out.
    silent = Reply(delay=5.0, headers=(("Content-Type", "text/event-stream"),), body=[DONE])
    srv.script(ok(["a"]), silent)
    with lb.Broker(cfg_for(srv, idle_timeout_ms=400), max_host_connections=1) as broker:
        assert [d.content for d in broker.stream(MSGS) if d.content] == ["a"]
        t0 = time.monotonic()
        with pytest.raises(lb.TimeoutError_, match="idle timeout"):
            list(broker.stream(MSGS))
        assert time.monotonic() - t0 < 2
    assert [r.conn for r in srv.chat_requests()] == [1, 1]


# -- threads ----------------------------------------------------------------------------------


def test_streams_made_on_one_thread_and_consumed_in_a_thread_pool(srv: LoopbackServer) -> None:
    # What a web framework's streaming response does: the module-level
    # stream() is called on one thread (its default Broker), the iterator is
    # consumed in a thread pool, all at once.
    srv.script(paced(20, 0.01))
    cfg = cfg_for(srv)
    streams = [lb.stream(cfg, [{"role": "user", "content": str(i)}]) for i in range(12)]

    def consume(s: lb.DeltaStream) -> str:
        return "".join(d.content or "" for d in s)

    with ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(consume, s) for s in streams]
        texts = [f.result(timeout=30) for f in futs]
    assert texts == ["t" * 20] * 12


def test_one_broker_shared_by_threads_for_every_sync_call(srv: LoopbackServer) -> None:
    srv.script(paced(10, 0.01))
    broker = lb.Broker(cfg_for(srv))
    errors: List[BaseException] = []

    def work(i: int) -> None:
        try:
            for k in range(4):
                if (i + k) % 3 == 0:
                    assert broker.chat(MSGS) == "t" * 10
                elif (i + k) % 3 == 1:
                    with broker.stream(MSGS) as s:
                        assert "".join(d.content or "" for d in s) == "t" * 10
                else:
                    rs = list(broker.map([{"messages": MSGS}] * 2, progress=False))
                    assert [r.text for r in rs] == ["t" * 10] * 2, [r.error for r in rs]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    broker.close()


# -- Broker.close() while requests are in flight ------------------------------------------------


def test_closing_the_broker_during_map_ends_the_requests_in_flight_with_an_error(srv: LoopbackServer) -> None:
    def reply(req: Request) -> Reply:
        slow = req.json["messages"][0]["content"] != "0"
        return paced(100, 0.05) if slow else ok(["fast"])

    srv.script(reply)
    broker = lb.Broker(cfg_for(srv))
    it = broker.map([{"messages": [{"role": "user", "content": str(i)}]} for i in range(5)], concurrency=3, progress=False)
    results: List[lb.MapResult] = []
    raised: List[BaseException] = []
    t0 = time.monotonic()
    try:
        for r in it:
            results.append(r)
            if len(results) == 1:
                broker.close()
    except (lb.BrokerError, pycurl.error) as e:
        raised.append(e)
    assert time.monotonic() - t0 < 3
    assert results[0].index == 0 and results[0].ok and results[0].text == "fast"
    # the three in flight (1, 2 and 3, sent when 0 ended) each end with an
    # error that says why
    assert sorted(r.index for r in results[1:]) == [1, 2, 3]
    for r in results[1:]:
        assert isinstance(r.error, lb.BrokerError) and "closed" in str(r.error), r.error
    # one was never sent: the iteration says so
    assert len(raised) == 1 and isinstance(raised[0], lb.BrokerError) and "closed" in str(raised[0])


@pytest.mark.parametrize("where", ["same thread", "other thread"])
def test_closing_the_broker_cuts_a_pulled_stream_with_an_error(srv: LoopbackServer, where: str) -> None:
    srv.script(paced(100, 0.05))
    broker = lb.Broker(cfg_for(srv))
    s = broker.stream(MSGS)
    assert next(s).content == "t"
    t0 = time.monotonic()
    if where == "same thread":
        broker.close()
    else:
        threading.Timer(0.2, broker.close).start()  # while this thread waits in next()
    with pytest.raises(lb.BrokerError, match="closed"):
        for _ in s:
            pass
    assert time.monotonic() - t0 < 2
    assert s.result is None
    assert wait_outcome(srv, "client-gone", 2), srv.outcomes
