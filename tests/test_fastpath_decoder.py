"""The C content fast path (feed_bytes) against the general Python decoder.

For any stream of chat chunks — plain content chunks (any Unicode, every JSON
escape, surrogate pairs, ASCII-escaped or raw), mixed with role, reasoning,
tool-call, finish, usage, malformed and typed events — split at any points,
``StreamDecoder.feed_bytes`` (C extraction, one text per chunk) must deliver
exactly what ``StreamDecoder.feed`` (orjson/json per event) delivers, in the
same order, with the same counts.
"""

from __future__ import annotations

import json
import random
from typing import Any, List

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_broker.decoder import StreamDecoder
from llama_broker.sse import EventSplitter

BASE = {"created": 1, "id": "chatcmpl-x", "model": "m", "system_fingerprint": "b1-x", "object": "chat.completion.chunk"}

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),  # lone surrogates cannot be encoded as UTF-8
    min_size=0,
    max_size=12,
)


@st.composite
def chunk(draw: Any) -> bytes:
    kind = draw(st.sampled_from(
        ["content"] * 6
        + ["role", "finish", "usage", "reasoning", "tool", "bad", "typed", "ping", "logprobs", "choice1", "two_choices"]
    ))
    if kind == "ping":
        return b": ping\n\n"
    if kind == "typed":
        return b"event: other\ndata: {}\n\n"
    if kind == "bad":
        return b"data: " + draw(st.sampled_from([b"{nope", b"42", b'{"choices":[1]}', b'{"x":1}'])) + b"\n\n"
    c0: dict = {"finish_reason": None, "index": 0}
    top: dict = dict(BASE)
    if kind == "content":
        c0["delta"] = {"content": draw(text)}
    elif kind == "role":
        c0["delta"] = {"role": "assistant", "content": None}
    elif kind == "finish":
        c0["delta"] = {}
        c0["finish_reason"] = "stop"
    elif kind == "reasoning":
        c0["delta"] = {"reasoning_content": draw(text)}
    elif kind == "tool":
        c0["delta"] = {"tool_calls": [{"index": 0, "function": {"arguments": draw(text)}}]}
    elif kind == "logprobs":
        c0["delta"] = {"content": draw(text)}
        c0["logprobs"] = {"content": [{"token": "t", "logprob": -0.5}]}
    if kind in ("choice1", "two_choices"):  # n > 1: the general path keeps the choices apart
        c0["delta"] = {"content": draw(text)}
        c1 = {"finish_reason": None, "index": 1, "delta": {"content": draw(text)}}
        top["choices"] = [c1] if kind == "choice1" else [c0, c1]
    elif kind == "usage":
        top["choices"] = []
        top["usage"] = {"completion_tokens": 3}
    else:
        keys = list(c0)
        random.Random(draw(st.integers(0, 99))).shuffle(keys)
        top["choices"] = [{k: c0[k] for k in keys}]
    tkeys = list(top)
    random.Random(draw(st.integers(0, 99))).shuffle(tkeys)
    top = {k: top[k] for k in tkeys}
    raw = json.dumps(top, ensure_ascii=draw(st.booleans()), separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    return b"data: " + raw.encode("utf-8") + b"\n\n"


def _general(stream: bytes, deltas: bool) -> tuple:
    got: List[Any] = []
    dec = StreamDecoder(None if deltas else got.append, got.append if deltas else None)
    dec.feed(*EventSplitter().feed_raw(stream))
    r = dec.result
    return got, (r.events, r.deltas, r.skipped, r.finish_reason, r.usage, r.done, r.extra)


def _fast(pieces: List[bytes], deltas: bool) -> tuple:
    got: List[Any] = []
    dec = StreamDecoder(None if deltas else got.append, got.append if deltas else None)
    for p in pieces:
        dec.feed_bytes(p)
    r = dec.result
    return got, (r.events, r.deltas, r.skipped, r.finish_reason, r.usage, r.done, r.extra)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chunk(), min_size=1, max_size=25), st.booleans(), st.booleans(), st.data())
def test_fast_path_equals_general_decoder(chunks: List[bytes], done: bool, deltas: bool, data: Any) -> None:
    stream = b"".join(chunks) + (b"data: [DONE]\n\n" if done else b"")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces, last = [], 0
    for c in cuts + [len(stream)]:
        pieces.append(stream[last:c])
        last = c
    assert _fast(pieces, deltas) == _general(stream, deltas)


def test_every_escape_and_surrogate_pair_through_the_fast_path() -> None:
    content = 'q"\\/\b\f\n\r\t\x00\x1f é € \U0001F600 \u2028\u2029 <|>'
    for ensure_ascii in (True, False):
        payload = json.dumps({"choices": [{"delta": {"content": content}}]}, ensure_ascii=ensure_ascii)
        stream = ("data: " + payload + "\n\n").encode() * 3
        got: List[str] = []
        dec = StreamDecoder(got.append)
        dec.feed_bytes(stream)
        assert got == [content] * 3
        assert dec.splitter.fast.n_fast == 3  # really taken by the C path


def test_fast_path_is_taken_for_real_llama_server_chunks() -> None:
    one = (
        b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" world"}}],'
        b'"created":1795503215,"id":"chatcmpl-PKsV","model":"/tmp/gemma.gguf",'
        b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}\n\n'
    )
    got: List[str] = []
    dec = StreamDecoder(got.append)
    dec.feed_bytes(one)
    assert got == [" world"] and dec.splitter.fast.n_fast == 1 and dec.result.deltas == 1
