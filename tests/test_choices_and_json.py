"""Several choices (``n > 1``), chunks only the lenient ``json`` module reads,
and tool-call fragments.

* With ``n > 1`` a server interleaves the choices' chunks, each carrying its
  ``index``: ``chat``/``chat_stream``/``map`` return the first choice's text
  only, ``stream`` yields every choice's deltas with ``Delta.index``.
* A chunk that orjson refuses but ``json`` reads (a surrogate pair split over
  two chunks, NaN, 1e400) keeps its content (``strict``: ProtocolError).
* ``ToolCallAssembler`` joins name pieces and keeps calls apart by ``id``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import pytest

from llama_broker import Broker, Delta, ModelConfig, ProtocolError, chat, chat_stream, stream
from llama_broker import decoder as dec_mod
from llama_broker._sse import ffi, lib
from llama_broker.decoder import StreamDecoder
from llama_broker.native import ToolCallAssembler

from loopback import DONE, LoopbackServer, chunk, data, sse

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def srv():
    with LoopbackServer() as s:
        yield s


def cfg_for(srv: LoopbackServer, **kw: Any) -> ModelConfig:
    base: Dict[str, Any] = dict(model="m", max_retries=0, timeout_ms=15000, idle_timeout_ms=5000)
    base.update(kw)
    return ModelConfig(srv.url, **base)


def choice_chunk(index: int, delta: Dict[str, Any], finish: Optional[str] = None) -> Dict[str, Any]:
    obj = chunk(delta, finish)
    obj["choices"][0]["index"] = index
    return obj


# Two choices interleaved, as a server answers n=2: one choice per chunk.
TWO_CHOICES = [
    data(choice_chunk(0, {"role": "assistant", "content": None})),
    data(choice_chunk(1, {"role": "assistant", "content": None})),
    data(choice_chunk(0, {"content": "Hello"})),
    data(choice_chunk(1, {"content": "Bonjour"})),
    data(choice_chunk(0, {"content": " there"})),
    data(choice_chunk(1, {"content": " à"})),
    data(choice_chunk(0, {"content": "!"})),
    data(choice_chunk(1, {"content": " vous"})),
    data(choice_chunk(0, {}, "stop")),
    data(choice_chunk(1, {}, "length")),
    DONE,
]


# ------------------------------------------------------------- n > 1 ----
@pytest.mark.parametrize("pattern", ["events", "one", "bytes"])
def test_chat_returns_the_first_choice_only(srv, pattern):
    srv.script(sse(TWO_CHOICES, pattern=pattern))
    assert chat(cfg_for(srv), MSGS, n=2) == "Hello there!"


def test_chat_stream_gets_the_first_choice_only(srv):
    srv.script(sse(TWO_CHOICES))
    got: List[str] = []
    res = chat_stream(cfg_for(srv), MSGS, got.append, n=2)
    assert got == ["Hello", " there", "!"]
    assert res.finish_reason == "stop" and res.deltas == 3


@pytest.mark.parametrize("pattern", ["events", "one"])
def test_stream_yields_every_choice_with_its_index(srv, pattern):
    srv.script(sse(TWO_CHOICES, pattern=pattern))
    with stream(cfg_for(srv), MSGS, n=2) as s:
        deltas = list(s)
    text = {0: "", 1: ""}
    finish = {}
    for d in deltas:
        text[d.index] += d.content or ""
        if d.finish_reason:
            finish[d.index] = d.finish_reason
    assert text == {0: "Hello there!", 1: "Bonjour à vous"}
    assert finish == {0: "stop", 1: "length"}
    assert [d.index for d in deltas if d.content] == [0, 1, 0, 1, 0, 1]


def test_map_text_is_the_first_choice_only(srv):
    srv.script(sse(TWO_CHOICES))
    with Broker(cfg_for(srv)) as b:
        (r,) = list(b.map([{"messages": MSGS, "n": 2}], progress=False))
    assert r.ok, r.error
    assert r.text == "Hello there!"


def test_several_choices_in_one_chunk():
    both = {"choices": [
        {"index": 0, "delta": {"content": "a"}, "finish_reason": None},
        {"index": 1, "delta": {"content": "b"}, "finish_reason": None},
    ]}
    payload = b"data: " + json.dumps(both).encode() + b"\n\n" + DONE
    deltas: List[Delta] = []
    StreamDecoder(None, deltas.append).feed_bytes(payload)
    assert [(d.content, d.index) for d in deltas] == [("a", 0), ("b", 1)]
    texts: List[str] = []
    StreamDecoder(texts.append).feed_bytes(payload)
    assert texts == ["a"]


def test_delta_index_is_the_last_field_with_default_zero():
    assert Delta._fields[-1] == "index"
    assert Delta("x").index == 0
    assert Delta("x", None, None, "stop", None) == Delta(content="x", finish_reason="stop", index=0)
    assert Delta("x", index=2).index == 2
    # the fast path's Delta (built without the NamedTuple's __new__) is complete
    got: List[Delta] = []
    StreamDecoder(None, got.append).feed_bytes(data(chunk({"content": "hi"})))
    assert got == [Delta("hi")] and got[0].index == 0


# ------------------------------------------- what only json can read ----
# A JavaScript server writes an emoji split over two chunks as two lone
# surrogate escapes; NaN and 1e400 are not strict JSON either.
SPLIT_EMOJI = [
    b'data: {"choices":[{"index":0,"delta":{"content":"ok \\ud83d"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"\\ude00!"}}]}\n\n',
]
NAN_CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"nan"}}],"score":NaN}\n\n'
HUGE_CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"huge"}}],"score":1e400}\n\n'


def _stream_of(body: List[bytes]) -> List[bytes]:
    return [data(chunk({"role": "assistant", "content": None}))] + body + [data(chunk({}, "stop")), DONE]


@pytest.fixture(params=["default", "without-orjson"])
def loader(request, monkeypatch):
    """The decoder's strict loader as installed (orjson when present), and the
    json-based one it uses without orjson."""
    if request.param == "without-orjson":
        monkeypatch.setattr(dec_mod, "_loads", dec_mod._json_strict_loads)
    return request.param


@pytest.mark.parametrize("pattern", ["events", "one", "bytes"])
def test_a_surrogate_pair_split_over_two_chunks_is_rejoined(srv, loader, pattern):
    srv.script(sse(_stream_of(SPLIT_EMOJI), pattern=pattern))
    got: List[str] = []
    res = chat_stream(cfg_for(srv), MSGS, got.append)
    assert "".join(got) == "ok \U0001F600!"
    assert res.skipped == 0


@pytest.mark.parametrize("body,want", [
    ([SPLIT_EMOJI[0], data(chunk({"content": "x"}))], "ok \ufffdx"),  # the low half never came
    ([SPLIT_EMOJI[1]], "\ufffd!"),  # a low half alone
    ([SPLIT_EMOJI[0]], "ok \ufffd"),  # the stream ends on a high half
    ([b'data: {"choices":[{"index":0,"delta":{"content":"a\\udc00b\\ud800c"}}]}\n\n'], "a\ufffdb\ufffdc"),
])
def test_an_unpaired_surrogate_becomes_the_replacement_character(srv, loader, body, want):
    srv.script(sse(_stream_of(body)))
    assert chat(cfg_for(srv), MSGS) == want
    with stream(cfg_for(srv), MSGS) as s:
        assert "".join(d.content or "" for d in s) == want


@pytest.mark.parametrize("body,want", [([NAN_CHUNK], "nan"), ([HUGE_CHUNK], "huge")])
def test_nan_and_out_of_range_numbers_keep_the_content(srv, loader, body, want):
    srv.script(sse(_stream_of(body)))
    got: List[str] = []
    res = chat_stream(cfg_for(srv), MSGS, got.append)
    assert got == [want] and res.skipped == 0


def test_the_native_api_and_the_drop_in_keep_that_content_too(srv, loader):
    from llama_broker import native
    from llama_broker.openai import OpenAI

    srv.script(sse(_stream_of(SPLIT_EMOJI + [NAN_CHUNK])))
    want = "ok \U0001F600!nan"
    assert native.chat_completion(cfg_for(srv), MSGS).content == want
    client = OpenAI(base_url=srv.url + "/v1", api_key="sk-x", max_retries=0)
    assert client.chat.completions.create(model="m", messages=MSGS).choices[0].message.content == want
    got = client.chat.completions.create(model="m", messages=MSGS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == want
    with pytest.raises(ProtocolError, match="not strict JSON"):
        native.chat_completion(cfg_for(srv, strict=True), MSGS)


def test_the_split_pair_reaches_stream_deltas_of_its_choice():
    two = [
        b'data: {"choices":[{"index":1,"delta":{"content":"b\\ud83d"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
        b'data: {"choices":[{"index":1,"delta":{"content":"\\ude00"}}]}\n\n',
        DONE,
    ]
    got: List[Delta] = []
    StreamDecoder(None, got.append).feed_bytes(b"".join(two))
    assert [(d.content, d.index) for d in got] == [("b", 1), ("a", 0), ("\U0001F600", 1)]


@pytest.mark.parametrize("body", [SPLIT_EMOJI, [NAN_CHUNK], [HUGE_CHUNK]], ids=["split-emoji", "nan", "1e400"])
def test_strict_refuses_what_only_json_reads(srv, loader, body):
    srv.script(sse(_stream_of(body)))
    with pytest.raises(ProtocolError, match="not strict JSON"):
        chat(cfg_for(srv, strict=True), MSGS)


def test_the_c_fast_path_leaves_lone_surrogates_to_python():
    def c(payload: bytes) -> Optional[bytes]:
        dst = ffi.new("unsigned char[]", len(payload))
        n = ffi.new("size_t *")
        return ffi.buffer(dst, n[0])[:] if lib.lb_json_chunk_content(payload, len(payload), dst, n) else None

    for p in SPLIT_EMOJI:
        assert c(p[len(b"data: "):].strip()) is None
    assert c(b'{"choices":[{"delta":{"content":"\\ud83d\\ude00"}}]}') == "\U0001F600".encode()
    d = StreamDecoder(lambda s: None)
    d.feed_bytes(b"".join(SPLIT_EMOJI))
    assert d.splitter.fast.n_fast == 0


# ------------------------------------------------- tool-call fragments ----
def _assemble(frags: List[Dict[str, Any]]) -> List[Any]:
    asm = ToolCallAssembler()
    for f in frags:
        asm.add([f])
    return [(c.index, c.id, c.name, c.arguments) for c in asm.calls]


def test_a_name_piece_equal_to_the_name_so_far_is_joined():
    frags = [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "go"}},
        {"index": 0, "function": {"name": "go"}},
        {"index": 0, "function": {"arguments": "{}"}},
    ]
    assert _assemble(frags) == [(0, "call_1", "gogo", "{}")]
    # a server that repeats the whole header (id and name) is still not doubled
    repeat = [
        {"index": 0, "id": "call_1", "function": {"name": "go", "arguments": "{"}},
        {"index": 0, "id": "call_1", "function": {"name": "go", "arguments": "}"}},
    ]
    assert _assemble(repeat) == [(0, "call_1", "go", "{}")]


def test_an_index_less_fragment_with_a_new_id_opens_a_new_call():
    frags = [
        {"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}},
        {"index": 2, "id": "b", "function": {"name": "g", "arguments": "{}"}},
        {"id": "c", "function": {"name": "h", "arguments": "{"}},
        {"function": {"arguments": "}"}},
    ]
    assert _assemble(frags) == [(0, "a", "f", "{}"), (2, "b", "g", "{}"), (3, "c", "h", "{}")]
