"""llama_broker.native: complete deltas, the rich chat form, the native endpoints.

Three layers: the decoders fed bytes split at every point (no I/O); the
same decoders behind the real transport against a small scripted HTTP server
(any path: ``/completion``, ``/v1/completions``, the JSON endpoints); and the
real llama-server, including a second one started with a chat template that
supports tool calls and reasoning (``--jinja --chat-template-file``,
``--reasoning-format deepseek``), where the small model is made to produce a
grammar-constrained tool call and a ``<think>`` block.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest

from llama_broker import APIError, ConfigError, ModelConfig, ProtocolError, TransportError
from llama_broker import chunks, replies
from llama_broker import native as nat
from llama_broker.broker import Broker
from llama_broker.decoder import Delta
from llama_broker.sse import EventSplitter
from toolcall import REASONING_REQUEST, TOOL_REQUEST, WEATHER_TOOL

# =============================================================================
# fixtures: streams as llama-server writes them
# =============================================================================

_META = {"created": 1767225600, "id": "chatcmpl-x", "model": "m", "system_fingerprint": "b1", "object": "chat.completion.chunk"}


def chunk(delta: Dict[str, Any], finish: Optional[str] = None, index: int = 0, **extra: Any) -> Dict[str, Any]:
    c: Dict[str, Any] = {"finish_reason": finish, "index": index, "delta": delta}
    if "logprobs" in extra:
        c["logprobs"] = extra.pop("logprobs")
    obj = {"choices": [c], **_META}
    obj.update(extra)
    return obj


def sse(*objs: Any) -> bytes:
    out = []
    for o in objs:
        if isinstance(o, bytes):
            out.append(o)
        else:
            out.append(b"data: " + json.dumps(o, ensure_ascii=False).encode() + b"\n\n")
    return b"".join(out)


DONE = b"data: [DONE]\n\n"
USAGE = {"completion_tokens": 9, "prompt_tokens": 20, "total_tokens": 29}
TIMINGS = {"prompt_n": 20, "prompt_ms": 10.0, "predicted_n": 9, "predicted_ms": 90.0, "predicted_per_second": 100.0}


def lp(token: str) -> Dict[str, Any]:
    return {"content": [{"id": 1, "token": token, "bytes": list(token.encode()), "logprob": -0.5, "top_logprobs": []}]}


# A stream with everything: role, reasoning, content with logprobs, two tool
# calls whose fragments interleave, finish "tool_calls", usage + timings, [DONE].
FULL = sse(
    chunk({"role": "assistant", "content": None}),
    chunk({"reasoning_content": "Let me "}),
    chunk({"reasoning_content": "think. ☃"}),
    chunk({"content": "Calling"}, logprobs=lp("Calling")),
    chunk({"content": " tools…"}, logprobs=lp(" tools…")),
    chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"city\": "}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{\"tz\": \"CET\"}"}}]}),
    chunk({}, "tool_calls"),
    {"choices": [], **_META, "usage": USAGE, "timings": TIMINGS},
    DONE,
)


def feed(decoder: Any, pieces: Sequence[bytes]) -> None:
    sp = EventSplitter()
    for p in pieces:
        decoder.feed(*sp.feed_raw(p))


def splits(body: bytes, step: int = 1) -> Iterator[List[bytes]]:
    """The body whole, in two pieces at every ``step``-th point, and byte by byte."""
    yield [body]
    for i in range(1, len(body), step):
        yield [body[:i], body[i:]]
    yield [body[i : i + 1] for i in range(len(body))]


def chat_reply(body: bytes, pieces: Optional[List[bytes]] = None, **kw: Any) -> nat.ChatReply:
    acc = nat.ChatAccumulator(**kw)
    dec = nat.ChunkDecoder(acc.add)
    feed(dec, pieces or [body])
    return acc.reply(dec.result)


# =============================================================================
# decoders and accumulators, no I/O
# =============================================================================


def check_full(r: nat.ChatReply) -> None:
    assert r.content == "Calling tools…"
    assert r.reasoning_content == "Let me think. ☃"
    assert r.finish_reason == "tool_calls"
    assert [(t.index, t.id, t.type, t.name, t.arguments) for t in r.tool_calls] == [
        (0, "call_a", "function", "get_weather", '{"city": "Paris"}'),
        (1, "call_b", "function", "get_time", '{"tz": "CET"}'),
    ]
    assert r.tool_calls[0].json_arguments() == {"city": "Paris"}
    assert [e["token"] for e in r.logprobs["content"]] == ["Calling", " tools…"]
    assert r.usage == USAGE and r.timings == TIMINGS
    assert (r.id, r.model, r.created, r.system_fingerprint) == ("chatcmpl-x", "m", 1767225600, "b1")
    assert r.result.done and r.result.finish_reason == "tool_calls"
    assert r.result.usage == USAGE and r.result.timings == TIMINGS


def test_everything_is_assembled_at_every_split_point():
    for pieces in splits(FULL, step=7):
        check_full(chat_reply(FULL, pieces))


def test_chunks_are_handed_out_whole_and_in_order():
    got: List[Dict[str, Any]] = []
    dec = nat.ChunkDecoder(got.append)
    feed(dec, [FULL])
    assert len(got) == 12 and got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert got[-1]["choices"] == [] and got[-1]["usage"] == USAGE
    assert dec.result.events == 12 and dec.result.deltas == 12 and dec.result.done
    assert dec.result.ttft_s is not None


def test_on_delta_gets_each_piece_of_the_first_choice():
    deltas: List[Delta] = []
    chat_reply(FULL, on_delta=deltas.append)
    assert [d.reasoning_content for d in deltas if d.reasoning_content] == ["Let me ", "think. ☃"]
    assert "".join(d.content for d in deltas if d.content) == "Calling tools…"
    assert sum(1 for d in deltas if d.tool_calls) == 5
    assert deltas[-1].finish_reason == "tool_calls"
    assert deltas[2].content == "Calling" and deltas[2].logprobs == lp("Calling")  # content + logprobs arrive together


def test_the_message_to_send_back():
    r = chat_reply(FULL)
    msg = r.message
    assert msg["role"] == "assistant" and msg["content"] == "Calling tools…"
    assert msg["reasoning_content"] == "Let me think. ☃"
    assert msg["tool_calls"][1] == {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}
    only_tools = chat_reply(sse(chunk({"role": "assistant", "content": None}),
                                chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}]}),
                                chunk({}, "tool_calls"), DONE))
    assert only_tools.message["content"] is None  # as llama-server sends it
    plain = chat_reply(sse(chunk({"content": "hi"}), chunk({}, "stop"), DONE))
    assert plain.message == {"role": "assistant", "content": "hi"}
    oa = plain.to_openai()
    assert oa["object"] == "chat.completion" and oa["choices"][0]["message"]["content"] == "hi"
    assert oa["choices"][0]["finish_reason"] == "stop"


def test_several_choices_are_kept_apart():
    body = sse(
        chunk({"content": "A"}, index=0), chunk({"content": "x"}, index=1),
        chunk({"content": "B"}, index=0), chunk({}, "length", index=1), chunk({}, "stop", index=0), DONE,
    )
    r = chat_reply(body)
    assert [(c.index, c.content, c.finish_reason) for c in r.choices] == [(0, "AB", "stop"), (1, "x", "length")]


@pytest.mark.parametrize("frags, want", [
    # the name sent again in every fragment is not doubled
    ([{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{\"x\""}},
      {"index": 0, "id": "a", "function": {"name": "f", "arguments": ": 1}"}}], [("a", "f", '{"x": 1}')]),
    # a name in pieces is joined
    ([{"index": 0, "id": "a", "function": {"name": "get_"}}, {"index": 0, "function": {"name": "time", "arguments": "{}"}}],
     [("a", "get_time", "{}")]),
    # no index: continue the last call, or open one for a new id
    ([{"id": "a", "function": {"name": "f", "arguments": "{"}}, {"function": {"arguments": "}"}},
      {"id": "b", "function": {"name": "g", "arguments": "{}"}}], [("a", "f", "{}"), ("b", "g", "{}")]),
    # arguments sent as an object
    ([{"index": 0, "id": "a", "function": {"name": "f", "arguments": {"k": "v"}}}], [("a", "f", '{"k": "v"}')]),
    # garbage fragments are ignored
    (["x", None, {"index": 0, "id": "a", "function": "nope"}], [("a", "", "")]),
])
def test_tool_call_fragments(frags, want):
    asm = nat.ToolCallAssembler()
    for f in frags:
        asm.add([f])
    assert [(c.id, c.name, c.arguments) for c in asm.calls] == want
    assert len(asm) == len(want)


def test_error_envelope_inside_the_stream_raises():
    for body in (
        sse(chunk({"content": "a"}), {"error": {"code": 500, "message": "boom", "type": "server_error"}}),
        sse(chunk({"content": "a"})) + b'error: {"code": 500, "message": "boom", "type": "server_error"}\n\n' + DONE,
    ):
        got: List[Any] = []
        dec = nat.ChunkDecoder(got.append)
        with pytest.raises(APIError) as ei:
            feed(dec, [body])
        assert ei.value.status is None and ei.value.message == "boom" and ei.value.type == "server_error"
        assert len(got) == 1  # what came before the error was delivered


def test_garbage_is_skipped_or_refused_when_strict():
    body = sse(b"data: {not json\n\n", b"data: [1, 2]\n\n", {"no": "choices"}, chunk({"content": "ok"}), DONE)
    got: List[Any] = []
    dec = nat.ChunkDecoder(got.append)
    feed(dec, [body])
    assert dec.result.skipped == 3 and len(got) == 1 and dec.result.done
    with pytest.raises(ProtocolError, match="not JSON"):
        feed(nat.ChunkDecoder(got.append, strict=True), [body])


def test_events_after_done_and_other_types_are_ignored():
    body = sse(chunk({"content": "a"})) + b"event: ping\ndata: {}\n\n" + DONE + sse(chunk({"content": "late"}))
    r = chat_reply(body)
    assert r.content == "a" and r.result.extra["other_events"] == 1


def test_a_server_that_did_not_stream():
    acc = nat.ChatAccumulator()
    dec = nat.ChunkDecoder(acc.add)
    dec.feed_whole(json.dumps({
        "id": "i", "object": "chat.completion", "model": "m", "created": 1,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "reasoning_content": "hm",
            "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
        "usage": USAGE,
    }).encode())
    r = acc.reply(dec.result)
    assert r.reasoning_content == "hm" and r.tool_calls[0].name == "f" and r.finish_reason == "tool_calls"
    assert r.usage == USAGE and dec.result.done
    with pytest.raises(APIError, match="nope"):
        nat.ChunkDecoder(acc.add).feed_whole(b'{"error": {"message": "nope"}}')
    with pytest.raises(ProtocolError):
        nat.ChunkDecoder(acc.add).feed_whole(b"<html>")


def test_text_completion_chunks():
    body = sse(
        {"choices": [{"text": "Once", "index": 0, "logprobs": None, "finish_reason": None}], "id": "t", "model": "m", "object": "text_completion"},
        {"choices": [{"text": " upon", "index": 0, "logprobs": lp(" upon"), "finish_reason": None}], "id": "t", "object": "text_completion"},
        {"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}], "id": "t", "usage": USAGE, "timings": TIMINGS},
        DONE,
    )
    for pieces in splits(body, step=5):
        texts: List[str] = []
        acc = nat.TextAccumulator(texts.append)
        dec = nat.ChunkDecoder(acc.add)
        feed(dec, pieces)
        r = acc.reply(dec.result)
        assert (r.text, r.finish_reason, r.usage, r.timings) == ("Once upon", "length", USAGE, TIMINGS)
        assert texts == ["Once", " upon"] and r.logprobs == lp(" upon")
        assert r.to_openai()["choices"][0]["text"] == "Once upon"


# -- llama.cpp's native /completion -------------------------------------------------

def native_ev(content: str, stop: bool = False, index: int = 0, **kw: Any) -> Dict[str, Any]:
    return {"index": index, "content": content, "tokens": [len(content)], "stop": stop, "id_slot": -1, **kw}


NATIVE = sse(
    native_ev(" I", completion_probabilities=[{"token": " I", "logprob": -1.0}]),
    native_ev(" used"),
    b": keep-alive\n\n",
    native_ev("", True, stop_type="limit", stopping_word="", model="m", timings=TIMINGS, tokens_predicted=2, tokens_evaluated=5),
)  # no [DONE]: the stream just ends


def native_reply(pieces: Sequence[bytes], n: int = 1) -> nat.NativeReply:
    acc = replies._NativeAcc(None)
    dec = nat.NativeDecoder(acc.add, n_prompts=n)
    feed(dec, pieces)
    return acc.reply(dec.result)


def test_native_stream_ends_with_stop_true_at_every_split_point():
    for pieces in splits(NATIVE, step=3):
        r = native_reply(pieces)
        assert r.content == " I used" and r.tokens == [2, 5, 0]
        assert r.result.done and r.finish_reason == "length" == r.result.finish_reason
        assert (r.stop_type, r.tokens_predicted, r.tokens_evaluated, r.model) == ("limit", 2, 5, "m")
        assert r.timings == TIMINGS and r.probs == [{"token": " I", "logprob": -1.0}]


@pytest.mark.parametrize("stop_type, finish", [("eos", "stop"), ("word", "stop"), ("limit", "length"), ("none", "stop")])
def test_native_finish_reasons(stop_type, finish):
    assert native_reply([sse(native_ev("x", True, stop_type=stop_type))]).finish_reason == finish


def test_native_several_prompts_end_after_the_last_stop():
    body = sse(native_ev("a", index=0), native_ev("b", index=1), native_ev("", True, index=0, stop_type="eos"),
               native_ev("c", index=1), native_ev("", True, index=1, stop_type="limit"))
    acc = replies._NativeAcc(None)
    dec = nat.NativeDecoder(acc.add, n_prompts=2)
    feed(dec, [body])
    r = acc.reply(dec.result)
    assert dec.result.done and [(x.index, x.content, x.finish_reason) for x in r.all] == [(0, "a", "stop"), (1, "bc", "length")]


@pytest.mark.parametrize("prompt, n", [("x", 1), ([1, 2, 3], 1), (["a", 12, "b"], 1), (["a", "b"], 2), ([[1, 2], [3]], 2), ([], 1)])
def test_how_many_prompts(prompt, n):
    assert chunks._expected_prompts(prompt) == n


def test_native_errors_and_whole_bodies():
    with pytest.raises(APIError, match="no slot"):
        feed(nat.NativeDecoder(lambda e: None), [sse(native_ev("a"), {"error": {"message": "no slot", "code": 503}})])
    acc = replies._NativeAcc(None)
    dec = nat.NativeDecoder(acc.add, n_prompts=2)
    dec.feed_whole(json.dumps([{"index": 0, "content": "x", "stop_type": "eos"}, {"index": 1, "content": "y"}]).encode())
    r = acc.reply(dec.result)
    assert dec.result.done and [x.content for x in r.all] == ["x", "y"]
    with pytest.raises(ProtocolError):
        nat.NativeDecoder(lambda e: None).feed_whole(b"[1]")


def test_bodies():
    cfg = ModelConfig("http://127.0.0.1:1", model="m", params={"top_k": 5})
    body = json.loads(nat._calls._body(cfg, {"seed": 1}, prompt="p"))
    assert body == {"model": "m", "temperature": 0.2, "top_k": 5, "seed": 1, "prompt": "p", "stream": True}
    with pytest.raises(ConfigError, match="stream"):
        nat._calls._body(cfg, {"stream": False}, prompt="p")
    with pytest.raises(ConfigError, match="'bad'"):
        nat.encode_body({"ok": 1, "bad": object()})
    assert json.loads(nat.encode_body({"t": "é\u2028"})) == {"t": "é\u2028"}
    assert nat._calls._with_usage(cfg, {})["stream_options"] == {"include_usage": True}
    assert "stream_options" not in nat._calls._with_usage(ModelConfig("http://h", params={"stream_options": {}}), {})
    assert nat._calls._with_usage(cfg, {"stream_options": {"include_usage": False}}) == {"stream_options": {"include_usage": False}}


# =============================================================================
# the transport: a scripted HTTP server answering any path
# =============================================================================

Item = Union[bytes, float]  # bytes: one chunk on the wire; float: pause (seconds)


class PathServer:
    """A tiny HTTP/1.1 server on 127.0.0.1: each request to ``path`` gets the next
    scripted reply for it (the last one repeats). A reply is ``(status,
    content_type, items)``; items are written as chunked pieces, floats pause.
    Every request is recorded; ``gone`` counts replies cut short by the client."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.scripts: Dict[str, List[Tuple[int, str, List[Item]]]] = {}
        self.requests: List[Tuple[str, str, Dict[str, str], bytes]] = []
        self.gone = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def script(self, path: str, *replies: Tuple[int, str, List[Item]]) -> "PathServer":
        self.scripts[path] = list(replies)
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = conn.recv(65536)
                if not d:
                    return
                buf += d
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _v = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            n = int(headers.get("content-length", "0"))
            while len(rest) < n:
                rest += conn.recv(65536)
            self.requests.append((method, target, headers, rest[:n]))
            path = target.split("?")[0]
            replies = self.scripts.get(path)
            if not replies:
                status, ctype, items = 404, "application/json", [b'{"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}']
            else:
                status, ctype, items = replies.pop(0) if len(replies) > 1 else replies[0]
            conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode())
            for it in items:
                if isinstance(it, float):
                    if self._stop.wait(it):
                        return
                    continue
                conn.sendall(b"%x\r\n%s\r\n" % (len(it), it))
            conn.sendall(b"0\r\n\r\n")
        except OSError:
            self.gone += 1
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def server() -> Iterator[PathServer]:
    s = PathServer()
    yield s
    s.close()


@pytest.fixture
def broker() -> Iterator[Broker]:
    with Broker() as b:
        yield b


EV = "text/event-stream"


def test_native_completion_needs_no_done(server, broker):
    server.script("/completion", (200, EV, [NATIVE[:40], NATIVE[40:]]))
    cfg = ModelConfig(server.url, temperature=None)
    pieces: List[str] = []
    r = nat.completion(cfg, "Once", broker=broker, on_content=pieces.append, n_predict=2)
    assert r.content == " I used" and pieces == [" I", " used"] and r.finish_reason == "length"
    method, target, headers, body = server.requests[0]
    assert (method, target) == ("POST", "/completion")
    assert json.loads(body) == {"n_predict": 2, "prompt": "Once", "stream": True}
    # pulled
    server.script("/completion", (200, EV, [NATIVE]))
    with nat.completion_chunks(cfg, "Once", broker=broker) as s:
        evs = list(s)
    assert [e["content"] for e in evs] == [" I", " used", ""] and s.result.done


def test_native_stream_cut_before_stop_is_an_error(server, broker):
    server.script("/completion", (200, EV, [sse(native_ev(" I"))]))
    with pytest.raises(TransportError, match="ended early") as ei:
        nat.completion(ModelConfig(server.url, max_retries=0), "x", broker=broker)
    assert ei.value.delivered


def test_text_completion_over_http(server, broker):
    body = sse({"choices": [{"text": "Hi", "index": 0, "finish_reason": None}], "id": "t"},
               {"choices": [{"text": "", "index": 0, "finish_reason": "stop"}], "id": "t", "usage": USAGE}, DONE)
    server.script("/v1/completions", (200, EV, [body]))
    cfg = ModelConfig(server.url + "/v1", model="m", temperature=None)
    r = nat.text_completion(cfg, "p", broker=broker, max_tokens=3)
    assert (r.text, r.finish_reason, r.usage) == ("Hi", "stop", USAGE)
    sent = json.loads(server.requests[0][3])
    assert sent["stream_options"] == {"include_usage": True} and sent["prompt"] == "p" and sent["model"] == "m"
    with nat.text_chunks(cfg, "p", broker=broker) as s:
        assert [c["choices"][0]["text"] for c in s] == ["Hi", ""]


def test_chat_completion_over_http_and_503_is_retried(server, broker):
    loading = (503, "application/json", [b'{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}'])
    server.script("/v1/chat/completions", loading, (200, EV, [FULL[:100], FULL[100:]]))
    cfg = ModelConfig(server.url, retry_backoff_ms=1)
    r = nat.chat_completion(cfg, [{"role": "user", "content": "hi"}], broker=broker)
    check_full(r)
    assert r.result.retries == 1 and len(server.requests) == 2
    with pytest.raises(ConfigError):
        nat.chat_completion(cfg, [], broker=broker)


def test_pulled_chunks_retry_and_error_after_delivery(server, broker):
    loading = (503, "application/json", [b'{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}'])
    broken = (200, EV, [sse(chunk({"content": "a"}), {"error": {"code": 500, "message": "boom", "type": "server_error"}})])
    server.script("/v1/chat/completions", loading, broken)
    cfg = ModelConfig(server.url, retry_backoff_ms=1)
    s = nat.chat_chunks(cfg, [{"role": "user", "content": "hi"}], broker=broker)
    assert s.next_batch()[0]["choices"][0]["delta"]["content"] == "a"
    with pytest.raises(APIError, match="boom"):
        next(s)
    assert s.finished and len(server.requests) == 2


def test_pulled_stream_close_cuts_the_connection(server, broker):
    slow: List[Item] = [sse(chunk({"content": "a"}))] + [0.05, sse(chunk({"content": "b"}))] * 100 + [DONE]
    server.script("/v1/chat/completions", (200, EV, slow))
    cfg = ModelConfig(server.url)
    with nat.chat_chunks(cfg, [{"role": "user", "content": "hi"}], broker=broker) as s:
        first = next(s)
    assert first["choices"][0]["delta"]["content"] == "a" and s.finished
    deadline = time.monotonic() + 5
    while server.gone == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.gone == 1
    # two pulled streams interleave on one thread
    server.script("/v1/chat/completions", (200, EV, [FULL]))
    s1 = nat.chat_chunks(cfg, [{"role": "user", "content": "1"}], broker=broker)
    s2 = nat.chat_chunks(cfg, [{"role": "user", "content": "2"}], broker=broker)
    a, b = list(s2), list(s1)
    assert len(a) == len(b) == 12


def test_json_endpoints(server, broker):
    server.script("/health", (200, "application/json", [b'{"status": "ok"}']))
    server.script("/props", (200, "application/json", [b'{"total_slots": 2}']))
    server.script("/slots", (501, "application/json", [b'{"error": {"code": 501, "message": "This server does not support slots endpoint.", "type": "not_supported_error"}}']))
    server.script("/v1/models", (200, "application/json", [b'{"object": "list", "data": [{"id": "m"}]}']))
    server.script("/tokenize", (200, "application/json", [b'{"tokens": [1, 2]}']))
    server.script("/detokenize", (200, "application/json", [b'{"content": "ab"}']))
    cfg = ModelConfig(server.url + "/v1/chat/completions")
    assert nat.health(cfg, broker=broker) == {"status": "ok"}
    assert nat.props(cfg, broker=broker) == {"total_slots": 2}
    with pytest.raises(APIError) as ei:
        nat.slots(cfg, broker=broker)
    assert ei.value.status == 501 and ei.value.type == "not_supported_error"
    assert nat.models(cfg, broker=broker) == [{"id": "m"}]
    assert nat.tokenize(cfg, "ab", broker=broker, add_special=True) == [1, 2]
    assert nat.detokenize(cfg, [1, 2], broker=broker) == "ab"
    sent = {r[1]: r for r in server.requests}
    assert sent["/health"][0] == "GET" and json.loads(sent["/tokenize"][3]) == {"content": "ab", "add_special": True, "with_pieces": False}
    assert json.loads(sent["/detokenize"][3]) == {"tokens": [1, 2]}
    with pytest.raises(ConfigError):
        nat.detokenize(cfg, ["a"], broker=broker)
    with pytest.raises(ConfigError):
        nat.tokenize(cfg, b"x", broker=broker)  # type: ignore[arg-type]
    # a 503 health answer is raised at once, not retried
    server.script("/health", (503, "application/json", [b'{"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}']))
    n = len(server.requests)
    with pytest.raises(APIError) as ei:
        nat.health(cfg, broker=broker)
    assert ei.value.status == 503 and len(server.requests) == n + 1
    server.script("/props", (200, "application/json", [b"[1]"]))
    with pytest.raises(ProtocolError):
        nat.props(cfg, broker=broker)


def test_async_forms(server):
    """achat_completion / acompletion / achat_chunks on the Broker's asyncio engine."""
    server.script("/v1/chat/completions", (200, EV, [FULL[:333], FULL[333:]]))
    server.script("/completion", (200, EV, [NATIVE]))
    cfg = ModelConfig(server.url, temperature=None)

    async def main() -> None:
        with Broker() as b:
            r = await nat.achat_completion(cfg, [{"role": "user", "content": "x"}], broker=b)
            check_full(r)
            n = await nat.acompletion(cfg, "Once", broker=b)
            assert n.content == " I used" and n.finish_reason == "length"
            async with nat.achat_chunks(cfg, [{"role": "user", "content": "x"}], broker=b) as s:
                got = [c async for c in s]
            assert len(got) == 12 and s.result is not None and s.result.done
            async with nat.acompletion_chunks(cfg, "Once", broker=b) as s:
                batch = await s.next_batch()
                while batch:
                    got.extend(batch)
                    batch = await s.next_batch()
            assert got[-1]["stop"] is True

    asyncio.run(main())


def test_async_stream_cancel_and_errors(server):
    slow: List[Item] = [sse(chunk({"content": "a"}))] + [0.05, sse(chunk({"content": "b"}))] * 100 + [DONE]
    server.script("/v1/chat/completions", (200, EV, slow))
    cfg = ModelConfig(server.url)

    async def main() -> None:
        with Broker() as b:
            s = nat.achat_chunks(cfg, [{"role": "user", "content": "x"}], broker=b)
            first = await s.__anext__()
            assert first["choices"][0]["delta"]["content"] == "a"
            await s.aclose()
            assert s.finished
            # a task cancelled while it waits closes its connection too
            s2 = nat.achat_chunks(cfg, [{"role": "user", "content": "x"}], broker=b)
            await s2.__anext__()
            task = asyncio.ensure_future(s2.__anext__())
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            server.script("/v1/chat/completions", (400, "application/json", [b'{"error": {"code": 400, "message": "bad", "type": "invalid_request_error"}}']))
            with pytest.raises(APIError) as ei:
                await nat.achat_completion(ModelConfig(server.url, max_retries=0), [{"role": "user", "content": "x"}], broker=b)
            assert ei.value.status == 400
            s3 = nat.achat_chunks(cfg, [{"role": "user", "content": "x"}], broker=b)
            with pytest.raises(APIError):
                await s3.wait_started()

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while server.gone < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.gone == 2


# =============================================================================
# the real llama-server
# =============================================================================

MSG = [{"role": "user", "content": "Name three colors and describe each one."}]  # longer than 12 tokens


def post(url: str, body: Dict[str, Any]) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.llama_server
def test_real_chat_completion_is_the_non_streamed_answer(idle_server):
    cfg = idle_server.config(temperature=0)
    params = dict(max_tokens=12, seed=7, logprobs=True, top_logprobs=2, cache_prompt=False)
    seen: List[Delta] = []
    r = nat.chat_completion(cfg, MSG, on_delta=seen.append, **params)
    whole = post(idle_server.endpoint + "/v1/chat/completions", {"messages": MSG, "temperature": 0, **params})
    assert r.content == whole["choices"][0]["message"]["content"] and r.content
    assert r.finish_reason == whole["choices"][0]["finish_reason"] == "length"
    assert r.usage["completion_tokens"] == whole["usage"]["completion_tokens"] == 12
    assert r.usage["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert [e["token"] for e in r.logprobs["content"]] == [e["token"] for e in whole["choices"][0]["logprobs"]["content"]]
    assert len(r.logprobs["content"]) == 12 and all(len(e["top_logprobs"]) == 2 for e in r.logprobs["content"])
    assert r.timings["predicted_n"] == 12 and r.id.startswith("chatcmpl") and r.model
    assert "".join(d.content or "" for d in seen) == r.content
    assert sum(1 for d in seen if d.logprobs) == 12


@pytest.mark.llama_server
def test_real_async_forms_agree(idle_server):
    cfg = idle_server.config(temperature=0)
    params = dict(max_tokens=6, seed=5, cache_prompt=False)
    sync = nat.chat_completion(cfg, MSG, **params)
    native = nat.completion(cfg, "Rivers run", n_predict=5, seed=5, cache_prompt=False)

    async def main():
        with Broker() as b:
            # one at a time: requests batched together on the server may decode differently
            a = await nat.achat_completion(cfg, MSG, broker=b, **params)
            n = await nat.acompletion(cfg, "Rivers run", broker=b, n_predict=5, seed=5, cache_prompt=False)
            t = await nat.atext_completion(cfg, "Rivers run", broker=b, max_tokens=5, seed=5, cache_prompt=False)
            many = await asyncio.gather(*(nat.achat_completion(cfg, MSG, broker=b, **params) for _ in range(3)))
            return a, n, t, many

    a, n, t, many = asyncio.run(main())
    assert a.content == sync.content and a.usage["completion_tokens"] == 6
    assert n.content == native.content == t.text
    assert [m.usage["completion_tokens"] for m in many] == [6, 6, 6]


@pytest.mark.llama_server
def test_real_completions_three_ways_agree(idle_server):
    """/completion (native), /v1/completions and their pulled forms give the same text."""
    cfg = idle_server.config(temperature=0)
    prompt = "The capital of France is"
    native = nat.completion(cfg, prompt, n_predict=8, seed=3, n_probs=2, cache_prompt=False)
    text = nat.text_completion(cfg, prompt, max_tokens=8, seed=3, cache_prompt=False)
    assert native.content == text.text and native.content
    assert native.finish_reason == text.finish_reason == "length" and native.stop_type == "limit"
    assert len(native.tokens) == 8 and len(native.probs) == 8
    assert nat.detokenize(cfg, native.tokens) == native.content
    assert native.timings["predicted_n"] == 8 == text.usage["completion_tokens"]
    with nat.completion_chunks(cfg, prompt, n_predict=8, seed=3, cache_prompt=False) as s:
        evs = list(s)
    assert "".join(e["content"] for e in evs) == native.content and evs[-1]["stop"] is True
    assert s.result.done and s.result.finish_reason == "length"
    with nat.text_chunks(cfg, prompt, max_tokens=8, seed=3, cache_prompt=False) as s:
        assert "".join(c["choices"][0]["text"] for c in s if c["choices"]) == text.text
    two = nat.completion(cfg, [prompt, "One, two,"], n_predict=4, seed=3, cache_prompt=False)
    assert len(two.all) == 2 and two.all[0].content == native.content[: len(two.all[0].content)]


@pytest.mark.llama_server
def test_real_json_endpoints(idle_server):
    cfg = idle_server.config()
    assert nat.health(cfg)["status"] == "ok"
    p = nat.props(cfg)
    assert p["total_slots"] == 4 and "default_generation_settings" in p
    sl = nat.slots(cfg)
    assert len(sl) == 4 and {s["id"] for s in sl} == {0, 1, 2, 3}
    ms = nat.models(cfg)
    assert ms and ms[0]["id"] and ms[0]["object"] == "model"
    toks = nat.tokenize(cfg, "Hello world, café")
    assert toks and all(isinstance(t, int) for t in toks)
    assert nat.detokenize(cfg, toks) == "Hello world, café"
    pieces = nat.tokenize(cfg, "Hello world", with_pieces=True)
    assert "".join(p["piece"] for p in pieces) == "Hello world"
    # add_special adds the model's BOS when it has one; the default model (SmolLM2) adds none.
    # (That the flag is sent is checked on the loopback server above.)
    assert nat.tokenize(cfg, "Hi", add_special=True) == nat.tokenize(cfg, "Hi")


# -- a server whose template supports tool calls and reasoning (conftest: tools_server) --


@pytest.mark.llama_server
def test_real_tool_call_is_assembled(tools_server):
    cfg = tools_server.config(temperature=None)
    req = dict(TOOL_REQUEST)
    msgs = req.pop("messages")
    frags: List[Any] = []
    r = nat.chat_completion(cfg, msgs, on_delta=lambda d: frags.extend(d.tool_calls or []), **req)
    assert r.finish_reason == "tool_calls"
    assert len(r.tool_calls) == 1
    call = r.tool_calls[0]
    assert (call.index, call.type, call.name) == (0, "function", "get_weather")
    assert call.json_arguments() == {"city": "Paris"} and call.id
    assert len(frags) > 2  # it really came in pieces
    whole = post(tools_server.endpoint + "/v1/chat/completions", {"messages": msgs, **req})
    wc = whole["choices"][0]
    assert wc["finish_reason"] == "tool_calls"
    assert [(t["function"]["name"], t["function"]["arguments"]) for t in wc["message"]["tool_calls"]] == [(call.name, call.arguments)]
    assert (wc["message"]["content"] or "") == r.content
    # the assistant message goes back into the conversation as it is
    follow = msgs + [r.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    again = nat.chat_completion(cfg, follow, tools=WEATHER_TOOL, tool_choice="none", max_tokens=4, seed=1, temperature=0)
    assert again.finish_reason in ("length", "stop") and again.usage["prompt_tokens"] > r.usage["prompt_tokens"]


@pytest.mark.llama_server
def test_real_reasoning_content(tools_server):
    cfg = tools_server.config(temperature=None)
    req = dict(REASONING_REQUEST)
    msgs = req.pop("messages")
    seen: List[Delta] = []
    r = nat.chat_completion(cfg, msgs, on_delta=seen.append, **req)
    assert r.reasoning_content == "I am thinking"
    assert r.content.startswith("Hello there") and r.finish_reason == "stop"
    assert sum(1 for d in seen if d.reasoning_content) >= 2  # streamed in pieces
    whole = post(tools_server.endpoint + "/v1/chat/completions", {"messages": msgs, **req})
    assert whole["choices"][0]["message"]["reasoning_content"] == r.reasoning_content
    assert whole["choices"][0]["message"]["content"] == r.content
