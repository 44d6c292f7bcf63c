"""The decoder on real llama-server chunk shapes, without I/O."""

from __future__ import annotations

import json
from typing import Any, List

import pytest

from llama_broker import APIError, Delta, ProtocolError
from llama_broker.decoder import StreamDecoder, api_error_from_body
from llama_broker.sse import EventSplitter

# Shapes copied from a real llama-server (this build) with stream_options.include_usage.
ROLE = {
    "choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}],
    "created": 1795503215,
    "id": "chatcmpl-PKsV",
    "model": "/tmp/gemma.gguf",
    "system_fingerprint": "b0-unknown",
    "object": "chat.completion.chunk",
}


def content_chunk(text: str, **delta: Any) -> dict:
    d = {"content": text} if text is not None else {}
    d.update(delta)
    return {**ROLE, "choices": [{"finish_reason": None, "index": 0, "delta": d}]}


FINISH = {**ROLE, "choices": [{"finish_reason": "length", "index": 0, "delta": {}}]}
USAGE = {
    **ROLE,
    "choices": [],
    "usage": {"completion_tokens": 5, "prompt_tokens": 26, "total_tokens": 31},
    "timings": {"prompt_n": 26, "prompt_ms": 52.3, "predicted_n": 5, "predicted_ms": 37.4, "predicted_per_second": 106.8},
}


def sse(*objs: Any) -> bytes:
    out = []
    for o in objs:
        out.append(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n")
    return b"".join(out)


def run(stream: bytes, *, deltas: bool = False, strict: bool = False, chunk: int = 0):
    got: List[Any] = []
    dec = StreamDecoder(None if deltas else got.append, got.append if deltas else None, strict=strict)
    sp = EventSplitter()
    pieces = [stream] if not chunk else [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    for p in pieces:
        dec.feed(*sp.feed_raw(p))
    return got, dec.result


FULL = sse(ROLE, content_chunk("Say"), content_chunk(" hi"), content_chunk(" caf\u00e9 \U0001F600"), FINISH, USAGE, b"[DONE]")


@pytest.mark.parametrize("chunk", [0, 1, 7, 64])
def test_content_usage_timings_and_done(chunk: int) -> None:
    got, res = run(FULL, chunk=chunk)
    assert got == ["Say", " hi", " caf\u00e9 \U0001F600"]
    assert res.done and res.finish_reason == "length"
    assert res.usage == USAGE["usage"] and res.timings == USAGE["timings"]
    assert res.deltas == 3 and res.skipped == 0
    assert res.id == "chatcmpl-PKsV" and res.model == "/tmp/gemma.gguf"
    assert res.ttft_s is not None


def test_delta_mode_carries_everything() -> None:
    tool = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}
    stream = sse(
        ROLE,
        content_chunk(None, reasoning_content="think"),
        content_chunk("x"),
        content_chunk(None, tool_calls=[tool]),
        {**ROLE, "choices": [{"finish_reason": None, "index": 0, "delta": {"content": "y"}, "logprobs": {"content": [{"token": "y", "logprob": -0.1}]}}]},
        {**ROLE, "choices": [{"finish_reason": "tool_calls", "index": 0, "delta": {}}]},
        b"[DONE]",
    )
    got, res = run(stream, deltas=True)
    assert got[0] == Delta(reasoning_content="think")
    assert got[1] == Delta(content="x")
    assert got[2] == Delta(tool_calls=[tool])
    assert got[3].content == "y" and got[3].logprobs == {"content": [{"token": "y", "logprob": -0.1}]}
    assert got[4] == Delta(finish_reason="tool_calls")
    assert res.finish_reason == "tool_calls" and res.deltas == 2


def test_events_after_done_are_ignored() -> None:
    got, res = run(sse(content_chunk("a"), b"[DONE]", content_chunk("b")))
    assert got == ["a"] and res.done


@pytest.mark.parametrize(
    "stream",
    [
        # llama-server before 2025-09: "error: {json}" then data: [DONE]
        b'error: {"code":500,"message":"boom","type":"server_error"}\n\ndata: [DONE]\n\n',
        # data envelope, then [DONE]
        sse({"error": {"code": 500, "message": "boom", "type": "server_error"}}, b"[DONE]"),
        # data envelope, and the stream just ends (current servers)
        sse({"error": {"code": 500, "message": "boom", "type": "server_error"}}),
    ],
)
def test_three_mid_stream_error_forms(stream: bytes) -> None:
    with pytest.raises(APIError) as ei:
        run(sse(content_chunk("part")) + stream)
    err = ei.value
    assert err.status is None and err.message == "boom" and err.type == "server_error" and err.code == 500
    assert str(err) == "api: in stream (server_error): boom"


def test_malformed_payload_is_skipped_and_counted() -> None:
    got, res = run(sse(content_chunk("a"), b"{not json", b"42", b'{"x":1}', content_chunk("b"), FINISH))
    assert got == ["a", "b"]
    assert res.skipped == 3 and res.finish_reason == "length"


def test_strict_turns_malformed_into_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        run(sse(content_chunk("a"), b"{not json"), strict=True)


def test_invalid_utf8_becomes_replacement_character() -> None:
    payload = json.dumps(content_chunk("AB")).encode().replace(b"AB", b"A\xffB")
    got, res = run(sse(payload, FINISH))
    assert got == ["A\ufffdB"] and res.skipped == 0


def test_wrong_types_are_skipped_not_crashing() -> None:
    bad = [
        {**ROLE, "choices": "x"},
        {**ROLE, "choices": [1]},
        {**ROLE, "choices": [{"delta": "x"}]},
        {**ROLE, "choices": [{"delta": {"content": 5}}]},
    ]
    got, res = run(sse(*bad, content_chunk("ok"), FINISH))
    assert got == ["ok"] and res.skipped == 4


def test_empty_content_and_role_chunks_emit_nothing() -> None:
    got, res = run(sse(ROLE, content_chunk(""), FINISH))
    assert got == [] and res.deltas == 0 and res.finish_reason == "length"


def test_other_event_types_are_counted_not_decoded() -> None:
    got, res = run(b"event: ping\ndata: {}\n\n" + b"event: message\n" + sse(content_chunk("m")))
    assert got == ["m"] and res.extra["other_events"] == 1


def test_non_streamed_completion_body() -> None:
    body = json.dumps(
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "stop"}],
            "usage": {"completion_tokens": 1},
            "id": "x",
            "model": "m",
        }
    ).encode()
    got: List[str] = []
    dec = StreamDecoder(got.append)
    dec.feed_whole(body)
    assert got == ["whole"] and dec.result.finish_reason == "stop" and dec.result.done
    assert dec.result.usage == {"completion_tokens": 1}


def test_api_error_from_body_shapes() -> None:
    e = api_error_from_body({"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}, 401)
    assert (e.status, e.message, e.type, e.code) == (401, "Invalid API Key", "authentication_error", 401)
    assert api_error_from_body({"error": "plain"}, 500).message == "plain"
    assert api_error_from_body([1, 2], 500, raw="[1, 2]").message == "[1, 2]"


def test_user_callback_exception_propagates_unchanged() -> None:
    class Boom(Exception):
        pass

    def on(c: str) -> None:
        raise Boom(c)

    dec = StreamDecoder(on)
    with pytest.raises(Boom):
        dec.feed(*EventSplitter().feed_raw(sse(content_chunk("a"))))
