"""Without I/O: JSON decoding alone, the SSE splitter alone, the Python hot paths.

All over the same stream the end-to-end benchmarks receive (its ``N`` content
events plus role, finish and ``[DONE]``), held in memory and fed either in
64 KiB chunks (mode ``memory``, like the bulk stream) or one event per chunk
(mode ``memory-event``: what a WRITEFUNCTION gets from llama-server, since
libcurl hands over each chunked-encoding chunk separately).
"""

from __future__ import annotations

import json

import pytest

from . import _harness as h

_FIELDS = 6


@pytest.fixture(scope="module")
def stream():
    return h.render(h.N)


@pytest.mark.parametrize("decoder", ["orjson.loads", "json.loads"])
def test_decode_floor(benchmark, stream, decoder):
    loads = pytest.importorskip("orjson").loads if decoder == "orjson.loads" else json.loads
    run = h.decode_floor(loads, stream.payloads)
    h.bench(benchmark, run, h.text_check(h.N), client=decoder, mode="memory", n=h.N, group="memory",
            nbytes=sum(len(p) for p in stream.payloads), note="decode + pick content, no I/O")


CHUNKINGS = {"memory": "64 KiB chunks", "memory-event": "1 event per chunk"}


@pytest.fixture(scope="module", params=list(CHUNKINGS))
def chunked(request, stream):
    mode = request.param
    chunks = h.chunks_of(stream.body) if mode == "memory" else list(stream.events)
    return mode, chunks


def _splitter():
    sse = pytest.importorskip("llama_broker.sse")
    return sse.EventSplitter


def _count_check(want):
    def check(got):
        assert got == want, f"{got} events, want {want}"

    return check


def _bench(benchmark, run, check, client, mode, stream, note):
    h.bench(benchmark, run, check, client=client, mode=mode, n=h.N, group=mode, nbytes=len(stream.body),
            note=f"{note}; {CHUNKINGS[mode]}")


def test_splitter_feed_raw(benchmark, stream, chunked):
    EventSplitter = _splitter()
    mode, chunks = chunked

    def run():
        sp = EventSplitter()
        n = 0
        for ch in chunks:
            n += len(sp.feed_raw(ch)[1])
        return n // _FIELDS

    _bench(benchmark, run, _count_check(len(stream.events)), "EventSplitter.feed_raw", mode, stream, "no decode")


def test_splitter_feed(benchmark, stream, chunked):
    EventSplitter = _splitter()
    mode, chunks = chunked

    def run():
        sp = EventSplitter()
        n = 0
        for ch in chunks:
            n += len(sp.feed(ch))
        return n

    _bench(benchmark, run, _count_check(len(stream.events)), "EventSplitter.feed", mode, stream, "Event objects")


def test_splitter_orjson(benchmark, stream, chunked):
    """The C splitter plus orjson, written plainly (no llama_broker decoder)."""
    EventSplitter = _splitter()
    loads = pytest.importorskip("orjson").loads
    mode, chunks = chunked

    def run():
        sp = EventSplitter()
        parts = []
        append = parts.append
        for ch in chunks:
            out, recs = sp.feed_raw(ch)
            for i in range(0, len(recs), _FIELDS):
                d = recs[i]
                payload = out[d : d + recs[i + 1]]
                if payload == b"[DONE]":
                    continue
                choices = loads(payload).get("choices")
                if choices:
                    content = choices[0].get("delta", {}).get("content")
                    if content:
                        append(content)
        return "".join(parts)

    _bench(benchmark, run, h.text_check(h.N), "feed_raw+orjson", mode, stream, "C splitter + decode")


def test_pylines_orjson(benchmark, stream, chunked):
    """The pure-Python line splitter plus orjson (the pycurl+orjson client's callback)."""
    loads = pytest.importorskip("orjson").loads
    mode, chunks = chunked

    def run():
        sp = h.PyLineSplitter(loads)
        for ch in chunks:
            sp.write(ch)
        assert sp.done
        return "".join(sp.parts)

    _bench(benchmark, run, h.text_check(h.N), "py-lines+orjson", mode, stream, "Python splitter + decode")


def test_broker_hot_path(benchmark, stream, chunked):
    """llama_broker's per-chunk work without curl: ``StreamDecoder.feed_bytes(chunk)``
    (one C call splits and extracts the content; Python slices one text)."""
    from llama_broker.decoder import StreamDecoder

    mode, chunks = chunked

    def run():
        parts = []
        feed = StreamDecoder(parts.append).feed_bytes
        for ch in chunks:
            feed(ch)
        return "".join(parts)

    _bench(benchmark, run, h.text_check(h.N), "llama_broker hot path", mode, stream, "StreamDecoder.feed_bytes(chunk)")


def test_general_decoder_path(benchmark, stream, chunked):
    """The general decoder without the C content fast path, for comparison:
    ``StreamDecoder.feed(*EventSplitter.feed_raw(chunk))`` (orjson per event)."""
    from llama_broker.decoder import StreamDecoder

    EventSplitter = _splitter()
    mode, chunks = chunked

    def run():
        parts = []
        decoder = StreamDecoder(parts.append)
        sp = EventSplitter()
        feed, feed_raw = decoder.feed, sp.feed_raw
        for ch in chunks:
            feed(*feed_raw(ch))
        return "".join(parts)

    _bench(benchmark, run, h.text_check(h.N), "llama_broker general path", mode, stream,
           "StreamDecoder.feed(*feed_raw(chunk)), no C fast path")
