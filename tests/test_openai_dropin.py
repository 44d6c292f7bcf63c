"""llama_broker.openai: a drop-in for code written against the OpenAI SDK.

The proof: the same small scripts run once with ``openai.OpenAI`` (the real
SDK, a test dependency) and once with ``llama_broker.openai.OpenAI`` against
the real llama-server with seeded, temperature-0 requests, and every field
the scripts read must be equal. Tool calling is proven the same way on a
llama-server started with a tool-calling chat template, where the small
model produces a grammar-constrained tool call (``tool_choice: "required"``);
a loopback-served tool-call stream covers the fragment shapes the model
does not produce (two calls interleaved). Errors are compared by class name
and the attributes SDK users read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
import socket
import time
from typing import Any, Dict, List

import pytest

import llama_broker
from llama_broker import errors as lb_errors
from llama_broker import openai as lbo

from loopback import DONE, LoopbackServer, Reply, Stall, api_error, chunk, data, usage_chunk
from toolcall import REASONING_REQUEST, TOOL_REQUEST

KEY = "sk-secret-test-key-0123456789"


@pytest.fixture(scope="module")
def sdk():
    """The real OpenAI SDK (``pip install openai``: a test dependency, never a runtime one)."""
    try:
        import openai
    except ImportError:  # pragma: no cover
        pytest.fail("the OpenAI SDK is needed for the drop-in comparison: pip install openai")
    return openai


def clients(sdk: Any, base_url: str, **kw: Any):
    """(the SDK's client, ours), built the same way."""
    return sdk.OpenAI(base_url=base_url, **kw), lbo.OpenAI(base_url=base_url, **kw)


def test_nothing_imports_the_openai_package():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['openai'] = None  # importing it would raise\n"
        "from llama_broker.openai import OpenAI, AsyncOpenAI\n"
        "import llama_broker.native\n"
        "c = OpenAI(base_url='http://127.0.0.1:9/v1', api_key='k')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# =============================================================================
# response objects
# =============================================================================

RAW_CHUNK = {
    "id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m",
    "choices": [{"index": 0, "finish_reason": None, "delta": {
        "content": "hi", "reasoning_content": "hm",
        "tool_calls": [{"index": 0, "id": "t", "type": "function", "function": {"name": "f", "arguments": "{"}}]}}],
    "timings": {"predicted_n": 3},
}


def test_objects_have_the_sdk_shape():
    ch = lbo.ChatCompletionChunk._w(json.loads(json.dumps(RAW_CHUNK)))
    c0 = ch.choices[0]
    assert type(ch).__name__ == "ChatCompletionChunk" and type(c0.delta).__name__ == "ChoiceDelta"
    assert (ch.id, ch.created, ch.model, ch.object) == ("c1", 5, "m", "chat.completion.chunk")
    assert c0.delta.content == "hi" and c0.delta.role is None and c0.delta.refusal is None  # declared, absent: None
    assert ch.usage is None and ch.system_fingerprint is None and c0.logprobs is None
    assert c0.delta.reasoning_content == "hm" and ch.timings == {"predicted_n": 3}  # extra fields: attributes
    tc = c0.delta.tool_calls[0]
    assert (tc.index, tc.id, tc.type, tc.function.name, tc.function.arguments) == (0, "t", "function", "f", "{")
    with pytest.raises(AttributeError):
        ch.no_such_field  # noqa: B018
    assert ch.choices is ch.choices  # nested objects are built once
    assert getattr(c0.delta, "audio", "x") is None and getattr(c0.delta, "nope", "x") == "x"
    dumped = ch.model_dump(exclude_unset=True)
    assert dumped == RAW_CHUNK and dumped is not ch._raw
    assert ch.to_dict() == RAW_CHUNK and json.loads(ch.to_json()) == RAW_CHUNK
    full = ch.model_dump()  # the SDK's field set: declared fields the server left out are None
    assert full["usage"] is None and full["choices"][0]["delta"]["role"] is None == full["choices"][0]["logprobs"]
    assert json.loads(ch.model_dump_json()) == full
    assert "ChatCompletionChunk(id='c1'" in repr(ch)
    assert pickle.loads(pickle.dumps(ch)) == ch
    c0.delta.content = "changed"
    assert c0.delta.content == "changed" and ch.model_dump()["choices"][0]["delta"]["content"] == "changed"
    msg = lbo.ChatCompletionMessage(role="assistant", content="x")
    assert msg.content == "x" and msg.tool_calls is None and msg.to_dict() == {"role": "assistant", "content": "x"}
    assert dict(msg)["role"] == "assistant" and dict(msg)["refusal"] is None
    assert lbo.CompletionUsage.model_validate({"prompt_tokens": 1}).prompt_tokens == 1


def test_every_sdk_field_is_declared(sdk):
    """Walk the SDK's response models: each field is declared on ours (a missing
    field reads as None, as in the SDK), and nested models are built as objects."""
    import typing

    from openai.types import Completion, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    def nested(annotation: Any) -> List[type]:
        out, todo = [], [annotation]
        while todo:
            a = todo.pop()
            args = typing.get_args(a)
            if args:
                todo.extend(args)
            elif isinstance(a, type) and hasattr(a, "model_fields"):
                out.append(a)
        return out

    def walk(theirs: type, ours: type, path: str) -> None:
        for name, f in theirs.model_fields.items():
            assert name in ours._fields, f"{path}.{name}"
            models = nested(f.annotation)
            conv = ours._fields[name]
            if models and name != "moderation":  # moderation: OpenAI-only, kept as plain data
                assert conv is not None and hasattr(conv, "model"), f"{path}.{name} is not built as an object"
                if len(models) == 1:
                    walk(models[0], conv.model, f"{path}.{name}")

    for theirs, ours in ((ChatCompletion, lbo.ChatCompletion), (ChatCompletionChunk, lbo.ChatCompletionChunk),
                         (Completion, lbo.Completion), (Model, lbo.Model)):
        walk(theirs, ours, theirs.__name__)


def test_error_tree():
    assert issubclass(lbo.OpenAIError, llama_broker.BrokerError)
    for cls in (lbo.BadRequestError, lbo.AuthenticationError, lbo.PermissionDeniedError, lbo.NotFoundError,
                lbo.ConflictError, lbo.UnprocessableEntityError, lbo.RateLimitError, lbo.InternalServerError):
        assert issubclass(cls, lbo.APIStatusError) and issubclass(cls, llama_broker.APIError)
    assert issubclass(lbo.APIStatusError, lbo.APIError)
    assert issubclass(lbo.APIStreamError, lbo.APIError) and issubclass(lbo.APIStreamError, llama_broker.APIError)
    assert issubclass(lbo.APIConnectionError, lbo.APIError) and issubclass(lbo.APIConnectionError, llama_broker.TransportError)
    assert not issubclass(lbo.APIConnectionError, llama_broker.APIError)
    assert issubclass(lbo.APITimeoutError, lbo.APIConnectionError) and issubclass(lbo.APITimeoutError, llama_broker.TimeoutError_)
    assert issubclass(lbo.APIResponseValidationError, llama_broker.ProtocolError)


@pytest.mark.parametrize("status, cls", [
    (400, "BadRequestError"), (401, "AuthenticationError"), (403, "PermissionDeniedError"),
    (404, "NotFoundError"), (409, "ConflictError"), (422, "UnprocessableEntityError"),
    (429, "RateLimitError"), (500, "InternalServerError"), (503, "InternalServerError"), (418, "APIStatusError"),
])
def test_status_errors_are_converted(status, cls):
    raw = json.dumps({"error": {"code": status, "message": "nope", "type": "some_error"}})
    err = lb_errors.APIError("nope", status=status, type="some_error", code=status, body=raw)
    out = lbo._convert(err, lbo._Request("POST", "http://h/v1/chat/completions"))
    assert type(out).__name__ == cls and out.__cause__ is err
    assert (out.status_code, out.status, out.code, out.type) == (status, status, str(status), "some_error")
    assert out.body == {"code": status, "message": "nope", "type": "some_error"}
    assert out.message == f"Error code: {status} - nope" and str(out) == f"api: HTTP {status} (some_error): nope"
    assert out.response.status_code == status and out.response.json() == json.loads(raw)
    assert out.request.url.endswith("/chat/completions")


def test_other_errors_are_converted():
    req = lbo._Request("POST", "u")
    s = lbo._convert(lb_errors.APIError("boom", type="server_error", code=500, body='{"error": {"message": "boom", "code": 500}}'), req)
    assert type(s) is lbo.APIStreamError and s.message == "boom" and s.status is None and str(s).startswith("api: in stream")
    t = lbo._convert(lb_errors.TimeoutError_("idle timeout: …", curl_code=28, bytes_received=5, delivered=True), req)
    assert type(t) is lbo.APITimeoutError and (t.curl_code, t.bytes_received, t.delivered) == (28, 5, True)
    assert str(t).startswith("transport: idle timeout")
    c = lbo._convert(lb_errors.ConnectError("could not connect", curl_code=7), req)
    assert type(c) is lbo.APIConnectionError and str(c).startswith("transport: ")
    p = lbo._convert(lb_errors.ProtocolError("garbage"), req)
    assert type(p) is lbo.APIResponseValidationError and str(p) == "protocol: garbage"
    cfg_err = lb_errors.ConfigError("bad")
    assert lbo._convert(cfg_err, req) is cfg_err
    boom = RuntimeError("x")
    assert lbo._convert(boom, req) is boom


def test_the_key_is_never_shown(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    c = lbo.OpenAI(base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=2)
    assert c.api_key == KEY  # as the SDK exposes it
    assert KEY not in repr(c) and KEY not in repr(c._opts.cfg) and KEY not in repr(c._engine.broker)
    with pytest.raises(lbo.APIConnectionError) as ei:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert KEY not in str(ei.value) and KEY not in repr(ei.value)
    assert lbo.AsyncOpenAI(base_url="http://h/v1").api_key == KEY


def test_client_settings():
    c = lbo.OpenAI(base_url="http://h:1/v1/", api_key="k", timeout=3.5, max_retries=4)
    assert c.base_url == "http://h:1/v1/" and c.max_retries == 4 and c.timeout == 3.5
    cfg = c._opts.cfg
    assert (cfg.temperature, cfg.max_retries, cfg.connect_timeout_ms, cfg.idle_timeout_ms) == (None, 4, 3500, 3500)
    d = lbo.OpenAI(base_url="http://h:1/v1", api_key="k")
    assert (d._opts.cfg.connect_timeout_ms, d._opts.cfg.idle_timeout_ms) == (5000, 600000)  # the SDK's defaults
    n = lbo.OpenAI(base_url="http://h:1/v1", api_key="k", timeout=None)
    assert n._opts.cfg.idle_timeout_ms is None

    class Timeout:  # httpx.Timeout's shape
        connect, read = 2.0, 30.0

    t = c.with_options(timeout=Timeout(), max_retries=0)
    assert (t._opts.cfg.connect_timeout_ms, t._opts.cfg.idle_timeout_ms, t.max_retries) == (2000, 30000, 0)
    assert t.api_key == "k" and t.base_url == c.base_url
    with pytest.raises(llama_broker.ConfigError):
        lbo.OpenAI(base_url="ftp://h", api_key="k")
    with pytest.raises(llama_broker.ConfigError):
        lbo.OpenAI(base_url="http://h", api_key="k", max_retries=-1)


# =============================================================================
# against a loopback server: requests, tool-call streams, errors, cancellation
# =============================================================================


@pytest.fixture
def loop():
    with LoopbackServer() as srv:
        yield srv


def test_requests_are_what_the_sdk_sends(loop, sdk):
    """The same create() calls send the same JSON fields and headers (``stream``
    aside: llama_broker always streams)."""
    loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=[
        data(chunk({"role": "assistant", "content": None})), data(chunk({"content": "x"})),
        data(chunk({}, "stop")), DONE]))
    theirs, ours = clients(sdk, loop.url + "/v1", api_key=KEY, max_retries=0, organization="org-1",
                           default_query={"dq": "1"}, default_headers={"X-Default": "d"})
    for client, not_given in ((theirs, sdk.NOT_GIVEN), (ours, lbo.NOT_GIVEN)):
        with client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "é"}], stream=True, max_tokens=3, seed=1,
            top_p=not_given, extra_body={"top_k": 5, "cache_prompt": False}, extra_headers={"X-Extra": "1"},
            extra_query={"q": "2"},
        ) as s:
            assert [c.choices[0].delta.content for c in s if c.choices] == [None, "x", None]
        for not_given_sdk in (sdk.NOT_GIVEN,):  # the SDK's own sentinel is understood too
            with client.chat.completions.create(model="m", messages=[{"role": "user", "content": "é"}],
                                                stream=True, temperature=not_given_sdk) as s:
                list(s)
    reqs = loop.chat_requests()
    assert len(reqs) == 4
    (t1, t2), (o1, o2) = reqs[:2], reqs[2:]
    for t, o in ((t1, o1), (t2, o2)):
        assert t.path == o.path
        assert t.json == o.json
        for h in ("authorization", "openai-organization", "x-default", "content-type"):
            assert t.headers.get(h) == o.headers.get(h), h
    assert o1.path.startswith("/v1/chat/completions?") and "q=2" in o1.path and "dq=1" in o1.path
    assert o1.headers["x-extra"] == "1" and o1.headers["authorization"] == f"Bearer {KEY}"
    assert o1.json == {"messages": [{"role": "user", "content": "é"}], "model": "m", "stream": True,
                       "max_tokens": 3, "seed": 1, "top_k": 5, "cache_prompt": False}
    assert "temperature" not in o2.json  # never sent unless passed


def test_response_objects_go_back_into_requests(loop, sdk):
    """``messages.append(resp.choices[0].message)`` works, as with the SDK."""
    loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=TOOL_STREAM))
    sent = []
    for client in clients(sdk, loop.url + "/v1", api_key="k", max_retries=0):
        msgs: List[Any] = [{"role": "user", "content": "x"}]
        with client.chat.completions.create(model="m", messages=msgs, stream=True) as s:
            chunks = list(s)
        msgs.append(chunks[3].choices[0].delta)  # any response object
        with client.chat.completions.create(model="m", messages=msgs, stream=True) as s:
            list(s)
        sent.append(loop.chat_requests()[-1].json["messages"][1])
    assert sent[0] == sent[1] == {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                                  "function": {"name": "get_weather", "arguments": ""}}]}


def test_non_streaming_asks_for_usage(loop):
    loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=[
        data(chunk({"role": "assistant", "content": None})), data(chunk({"content": "Hi"})),
        data(chunk({}, "stop")), data(usage_chunk(1)), DONE]))
    c = lbo.OpenAI(base_url=loop.url + "/v1", api_key="k")
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=False)
    assert loop.chat_requests()[0].json["stream_options"] == {"include_usage": True}
    assert (r.object, r.id, r.model, r.created, r.system_fingerprint) == ("chat.completion", "chatcmpl-loopback", "m", 1767225600, "b1-x")
    assert r.choices[0].message.content == "Hi" and r.usage.total_tokens == 8 and r.timings["predicted_n"] == 1
    assert r.choices[0].message.tool_calls is None and r.choices[0].logprobs is None


# Two interleaved tool calls, reasoning first, then usage: shapes the small model does not produce.
TOOL_STREAM = [
    data(chunk({"role": "assistant", "content": None})),
    data(chunk({"reasoning_content": "Two "})), data(chunk({"reasoning_content": "calls."})),
    data(chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})),
    data(chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\""}}]})),
    data(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": \"Paris\"}"}}]})),
    data(chunk({"tool_calls": [{"index": 1, "function": {"arguments": ": \"CET\"}"}}]})),
    data(chunk({}, "tool_calls")),
    data(usage_chunk(12)),
    DONE,
]


def tool_stream_script(client: Any) -> Dict[str, Any]:
    """What SDK code reads from a streamed tool call: fragments, assembled calls, finish, usage."""
    calls: Dict[int, Dict[str, Any]] = {}
    frags, finish, usage, reasoning = [], None, None, []
    with client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True,
                                        tools=[{"type": "function", "function": {"name": "get_weather"}}],
                                        stream_options={"include_usage": True}) as stream:
        for ch in stream:
            if ch.usage:
                usage = (ch.usage.prompt_tokens, ch.usage.completion_tokens, ch.usage.total_tokens)
            for c in ch.choices:
                if getattr(c.delta, "reasoning_content", None):
                    reasoning.append(c.delta.reasoning_content)
                for tc in c.delta.tool_calls or []:
                    frags.append((tc.index, tc.id, tc.type, tc.function.name, tc.function.arguments))
                    call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                    call["id"] = call["id"] or tc.id
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
                finish = c.finish_reason or finish
    return {"frags": frags, "calls": calls, "finish": finish, "usage": usage, "reasoning": reasoning,
            "args": {i: json.loads(c["arguments"]) for i, c in calls.items()}}


def test_loopback_tool_call_stream_reads_the_same(loop, sdk):
    loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=TOOL_STREAM))
    theirs, ours = clients(sdk, loop.url + "/v1", api_key="k", max_retries=0)
    a, b = tool_stream_script(theirs), tool_stream_script(ours)
    assert a == b
    assert b["finish"] == "tool_calls" and b["args"] == {0: {"city": "Paris"}, 1: {"tz": "CET"}}
    assert b["calls"][1]["id"] == "call_b" and b["reasoning"] == ["Two ", "calls."] and b["usage"] == (7, 12, 19)


def error_fields(e: BaseException) -> Dict[str, Any]:
    return {k: getattr(e, k, None) for k in ("status_code", "code", "type", "message", "body", "param")} | {"cls": type(e).__name__}


@pytest.mark.parametrize("status, type_", [(400, "invalid_request_error"), (401, "authentication_error"),
                                           (404, "not_found_error"), (500, "server_error")])
def test_http_errors_read_the_same(loop, sdk, status, type_):
    loop.script(api_error(status, "It went wrong", type_))
    got = []
    for client in clients(sdk, loop.url + "/v1", api_key="k", max_retries=0):
        for stream in (False, True):
            with pytest.raises(Exception) as ei:  # noqa: PT011 - compared below
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=stream)
            got.append(error_fields(ei.value))
            assert isinstance(ei.value, (sdk.APIStatusError, lbo.APIStatusError))
    assert got[0] == got[1] == got[2] == got[3]
    assert got[2]["status_code"] == status


def test_errors_inside_the_stream_read_the_same(loop, sdk):
    body = [data(chunk({"role": "assistant", "content": None})), data(chunk({"content": "a"})),
            data({"error": {"code": 500, "message": "slot crashed", "type": "server_error"}})]
    loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=body))
    got = []
    for client, mod in zip(clients(sdk, loop.url + "/v1", api_key="k", max_retries=0), (sdk, lbo)):
        seen = []
        with pytest.raises(mod.APIError) as ei:
            for ch in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True):
                seen.append(ch.choices[0].delta.content)
        assert not isinstance(ei.value, mod.APIStatusError)
        got.append((seen, ei.value.message, ei.value.body, ei.value.code, ei.value.type))
    assert got[0] == got[1] and got[1][0] == [None, "a"]


def test_connection_errors_and_timeouts(loop, sdk):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    for client, mod in zip(clients(sdk, f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0), (sdk, lbo)):
        with pytest.raises(mod.APIConnectionError) as ei:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert not isinstance(ei.value, mod.APITimeoutError)
    # a server that stops writing: the read timeout fires, in both, mid-stream
    loop.script(Reply(headers=(("Content-Type", "text/event-stream"),),
                      body=[data(chunk({"content": "a"})), Stall(8), DONE]))
    for client, mod in zip(clients(sdk, loop.url + "/v1", api_key="k", max_retries=0, timeout=1.0), (sdk, lbo)):
        t0 = time.monotonic()
        seen = []
        with pytest.raises(mod.APITimeoutError):
            for ch in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True):
                seen.append(ch.choices[0].delta.content)
        assert seen == ["a"] and time.monotonic() - t0 < 6


def test_503_is_retried_then_answers(loop):
    loop.script(api_error(503, "Loading model", "unavailable_error"), Reply(
        headers=(("Content-Type", "text/event-stream"),),
        body=[data(chunk({"content": "ok"})), data(chunk({}, "stop")), DONE]))
    c = lbo.OpenAI(base_url=loop.url + "/v1", api_key="k", max_retries=2)
    c._opts.cfg = dataclasses.replace(c._opts.cfg, retry_backoff_ms=1)  # no need to wait here
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert r.choices[0].message.content == "ok" and len(loop.chat_requests()) == 2
    loop.script(api_error(503, "Loading model", "unavailable_error"))
    with pytest.raises(lbo.InternalServerError) as ei:
        lbo.OpenAI(base_url=loop.url + "/v1", api_key="k", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    assert ei.value.status_code == 503


def test_close_cuts_the_stream(loop):
    body = [data(chunk({"content": "a"}))] + [x for _ in range(200) for x in (Stall(0.02), data(chunk({"content": "b"})))] + [DONE]
    loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=body))
    c = lbo.OpenAI(base_url=loop.url + "/v1", api_key="k")
    with c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True) as s:
        first = next(s)
    assert first.choices[0].delta.content == "a"
    assert loop.wait_idle(5) and loop.outcomes == ["client-gone"]
    assert list(s) == []  # closed: nothing more


def test_one_client_shared_by_threads(loop):
    """As with the SDK, threads may share a client (each gets its own connections)."""
    from concurrent.futures import ThreadPoolExecutor

    loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=[
        data(chunk({"role": "assistant", "content": None})), data(chunk({"content": "o"})),
        data(chunk({"content": "k"})), data(chunk({}, "stop")), data(usage_chunk(2)), DONE]))
    c = lbo.OpenAI(base_url=loop.url + "/v1", api_key="k")

    def one(i: int) -> str:
        if i % 2:
            r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}])
            return r.choices[0].message.content
        with c.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}], stream=True) as s:
            return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(one, range(40))) == ["ok"] * 40
    assert len(c._engine._brokers) >= 2
    c.close()
    with pytest.raises(llama_broker.ConfigError):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


def test_async_client_over_loopback(loop, sdk):
    """AsyncOpenAI: the tool-call stream, an in-stream error, an HTTP error at create(),
    a read timeout, and a cancelled task that closes its connection."""
    base = loop.url + "/v1"

    async def script(client: Any, mod: Any) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=TOOL_STREAM))
        frags = []
        async with await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                        stream=True) as s:
            async for ch in s:
                for c in ch.choices:
                    for tc in c.delta.tool_calls or []:
                        frags.append((tc.index, tc.id, tc.function.name, tc.function.arguments))
        out["frags"] = frags
        loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=[
            data(chunk({"content": "a"})), data({"error": {"code": 500, "message": "slot crashed", "type": "server_error"}})]))
        s = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        try:
            async for _ in s:
                pass
        except mod.APIError as e:
            out["stream_error"] = (isinstance(e, mod.APIStatusError), e.message, e.body)
        loop.script(api_error(400, "bad thing", "invalid_request_error"))
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        except mod.BadRequestError as e:
            out["create_error"] = error_fields(e)
        loop.script(Reply(headers=(("Content-Type", "text/event-stream"),), body=[data(chunk({"content": "a"})), Stall(8), DONE]))
        fast = client.with_options(timeout=1.0)
        try:
            await fast.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        except mod.APITimeoutError as e:
            out["timeout"] = type(e).__name__
        return out

    async def both():
        theirs = sdk.AsyncOpenAI(base_url=base, api_key="k", max_retries=0)
        ours = lbo.AsyncOpenAI(base_url=base, api_key="k", max_retries=0)
        a = await script(theirs, sdk)
        b = await script(ours, lbo)
        # cancelling a task that waits on the stream closes the connection
        n_gone = loop.outcomes.count("client-gone")
        loop.script(Reply(headers=(("Content-Type", "text/event-stream"),),
                          body=[data(chunk({"content": "a"})), Stall(0.5)]
                          + [x for _ in range(100) for x in (Stall(0.02), data(chunk({"content": "b"})))] + [DONE]))
        s = await ours.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        assert (await s.__anext__()).choices[0].delta.content == "a"
        task = asyncio.ensure_future(s.__anext__())
        await asyncio.sleep(0.05)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await theirs.close()
        await ours.close()
        deadline = time.monotonic() + 5
        while loop.outcomes.count("client-gone") == n_gone and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert loop.outcomes.count("client-gone") == n_gone + 1
        return a, b

    a, b = asyncio.run(both())
    assert a == b
    assert len(b["frags"]) == 4 and b["stream_error"][1] == "slot crashed" and b["create_error"]["status_code"] == 400
    assert b["timeout"] == "APITimeoutError"


def test_completions_and_models_over_loopback(sdk):
    from test_native import PathServer

    srv = PathServer()
    try:
        body = (b'data: {"choices":[{"text":"Hi","index":0,"logprobs":null,"finish_reason":null}],"id":"t","object":"text_completion","created":1,"model":"m"}\n\n'
                b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"id":"t","object":"text_completion","created":1,"model":"m","usage":{"completion_tokens":1,"prompt_tokens":2,"total_tokens":3}}\n\n'
                b"data: [DONE]\n\n")
        srv.script("/v1/completions", (200, "text/event-stream", [body]))
        srv.script("/v1/models", (200, "application/json", [b'{"object":"list","data":[{"id":"m","object":"model","created":1,"owned_by":"llamacpp"}]}']))
        got = []
        for client in clients(sdk, srv.url + "/v1", api_key="k", max_retries=0):
            with client.completions.create(model="m", prompt="p", stream=True, max_tokens=1) as s:
                chunks = [(c.object, c.choices[0].text, c.choices[0].finish_reason, c.usage and c.usage.total_tokens) for c in s]
            page = client.models.list()
            got.append((chunks, [(m.id, m.object, m.owned_by, m.created) for m in page], [m.id for m in page.data]))
        assert got[0] == got[1]
        ours_req = srv.requests[-2]
        assert ours_req[1] == "/v1/completions" and json.loads(ours_req[3])["prompt"] == "p"
    finally:
        srv.close()


# =============================================================================
# the proof: the same script, the real SDK and the drop-in, a real llama-server
# =============================================================================

MSG = [{"role": "user", "content": "Write a haiku about rivers."}]
SEEDED = dict(seed=11, temperature=0, extra_body={"cache_prompt": False})


def chat_script(client: Any, mod: Any) -> Dict[str, Any]:
    """A small program written against the SDK; returns every field it reads."""
    out: Dict[str, Any] = {}
    r = client.chat.completions.create(model="gemma", messages=MSG, max_tokens=10, **SEEDED)
    c0, u = r.choices[0], r.usage
    out["chat"] = dict(
        object=r.object, model=r.model, id=(type(r.id).__name__, r.id.startswith("chatcmpl")),
        created=type(r.created).__name__, n=len(r.choices), index=c0.index, finish=c0.finish_reason,
        role=c0.message.role, content=c0.message.content, tool_calls=c0.message.tool_calls,
        refusal=c0.message.refusal, logprobs=c0.logprobs, fingerprint=r.system_fingerprint,
        usage=(u.prompt_tokens, u.completion_tokens, u.total_tokens),
        timings=(r.timings["predicted_n"], r.timings["prompt_n"]),
    )
    chunks = []
    ids = set()
    stream = client.chat.completions.create(model="gemma", messages=MSG, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **SEEDED)
    with stream:
        for ch in stream:
            ids.add(ch.id)
            row: List[Any] = [ch.object, ch.model, len(ch.choices)]
            if ch.choices:
                c = ch.choices[0]
                row += [c.index, c.delta.role, c.delta.content, c.delta.tool_calls, c.finish_reason, c.logprobs]
            if ch.usage:
                row += [ch.usage.completion_tokens, ch.usage.total_tokens]
            chunks.append(row)
    out["stream"] = chunks
    out["stream_ids"] = len(ids)
    out["streamed_equals_whole"] = "".join(r[5] or "" for r in chunks if len(r) > 5) == r.choices[0].message.content
    lp = client.chat.completions.create(model="gemma", messages=MSG, max_tokens=4, logprobs=True, top_logprobs=2, **SEEDED)
    out["logprobs"] = [(t.token, t.logprob, t.bytes, [(x.token, x.logprob) for x in t.top_logprobs])
                       for t in lp.choices[0].logprobs.content]
    with client.chat.completions.create(model="gemma", messages=MSG, max_tokens=3, stream=True, logprobs=True, **SEEDED) as s:
        out["stream_logprobs"] = [[t.token for t in ch.choices[0].logprobs.content] for ch in s
                                  if ch.choices and ch.choices[0].logprobs]
    long = client.chat.completions.create(model="gemma", messages=MSG, max_tokens=200, stream=True, **SEEDED)
    it = iter(long)
    out["first_two"] = [next(it).choices[0].delta.role, next(it).choices[0].delta.content]
    long.close()
    t = client.completions.create(model="gemma", prompt="Rivers run", max_tokens=6, **SEEDED)
    tc = t.choices[0]
    out["text"] = (t.object, t.model, tc.text, tc.index, tc.finish_reason, tc.logprobs,
                   t.usage.prompt_tokens, t.usage.completion_tokens, t.usage.total_tokens)
    with client.completions.create(model="gemma", prompt="Rivers run", max_tokens=6, stream=True, **SEEDED) as s:
        out["text_stream"] = [(c.object, [(x.text, x.finish_reason, x.index) for x in c.choices]) for c in s]
    out["models"] = [(m.id, m.object, m.owned_by, type(m.created).__name__) for m in client.models.list()]
    for stream_flag in (False, True):
        try:
            client.chat.completions.create(model="gemma", messages="not a list", stream=stream_flag)
        except mod.BadRequestError as e:
            out[f"error_{stream_flag}"] = (type(e).__name__, e.status_code, e.code, e.type, e.message, e.body,
                                           isinstance(e, mod.APIStatusError), isinstance(e, mod.APIError))
    return out


@pytest.mark.llama_server
def test_the_same_script_reads_the_same_fields(idle_server, sdk):
    base = idle_server.endpoint + "/v1"
    theirs, ours = clients(sdk, base, api_key="sk-no-key-required")
    a = chat_script(theirs, sdk)
    b = chat_script(ours, lbo)
    for k in a:
        assert a[k] == b[k], k
    assert a == b
    assert b["chat"]["finish"] == "length" and b["chat"]["usage"][1] == 10 and b["streamed_equals_whole"]
    assert b["stream"][0][4] == "assistant" and b["stream"][-1][2] == 0  # role chunk first, usage chunk last
    assert len(b["logprobs"]) == 4 and b["error_True"][1] == 400 and b["stream_ids"] == 1


def tool_script(client: Any) -> Dict[str, Any]:
    req = dict(TOOL_REQUEST)
    r = client.chat.completions.create(model="gemma", **req)
    m = r.choices[0].message
    out: Dict[str, Any] = {
        "finish": r.choices[0].finish_reason, "role": m.role, "content": m.content,
        "calls": [(tc.type, tc.function.name, tc.function.arguments, isinstance(tc.id, str) and len(tc.id) > 0)
                  for tc in m.tool_calls],
        "usage": r.usage.completion_tokens,
    }
    frags, finish, ids = [], None, set()
    with client.chat.completions.create(model="gemma", stream=True, **req) as s:
        for ch in s:
            for c in ch.choices:
                for tc in c.delta.tool_calls or []:
                    frags.append((tc.index, tc.type, tc.function.name, tc.function.arguments))
                    if tc.id:
                        ids.add(tc.id)
                finish = c.finish_reason or finish
    out.update(frags=frags, stream_finish=finish, stream_ids=len(ids))
    return out


@pytest.mark.llama_server
def test_tool_calling_reads_the_same(tools_server, sdk):
    """A grammar-constrained tool call from the real small model, both clients."""
    theirs, ours = clients(sdk, tools_server.endpoint + "/v1", api_key="x")
    a, b = tool_script(theirs), tool_script(ours)
    assert a == b
    assert b["finish"] == b["stream_finish"] == "tool_calls"
    assert [c[:3] for c in b["calls"]] == [("function", "get_weather", '{"city": "Paris"}')] and b["calls"][0][3]
    assert len(b["frags"]) > 2 and b["stream_ids"] == 1
    assert "".join(f[3] or "" for f in b["frags"]) == '{"city": "Paris"}'


@pytest.mark.llama_server
def test_reasoning_reads_the_same(tools_server, sdk):
    got = []
    for client in clients(sdk, tools_server.endpoint + "/v1", api_key="x"):
        r = client.chat.completions.create(model="gemma", **REASONING_REQUEST)
        m = r.choices[0].message
        pieces = []
        with client.chat.completions.create(model="gemma", stream=True, **REASONING_REQUEST) as s:
            for ch in s:
                if ch.choices:
                    pieces.append((getattr(ch.choices[0].delta, "reasoning_content", None), ch.choices[0].delta.content))
        got.append((m.content, getattr(m, "reasoning_content", None), pieces))
    assert got[0] == got[1]
    assert got[1][1] == "I am thinking" and "".join(p[0] or "" for p in got[1][2]) == "I am thinking"


@pytest.mark.llama_server
def test_wrong_key_reads_the_same(llama_server_keyed, tools, sdk):
    base = llama_server_keyed.endpoint + "/v1"
    got = []
    for client, mod in zip(clients(sdk, base, api_key="wrong", max_retries=0), (sdk, lbo)):
        with pytest.raises(mod.AuthenticationError) as ei:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        got.append(error_fields(ei.value))
    assert got[0] == got[1] and got[1]["status_code"] == 401
    ok = lbo.OpenAI(base_url=base, api_key=tools.api_key)
    r = ok.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.usage.completion_tokens == 2


# -- async ---------------------------------------------------------------------------------


async def async_script(client: Any, mod: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    r = await client.chat.completions.create(model="gemma", messages=MSG, max_tokens=8, **SEEDED)
    out["chat"] = (r.object, r.choices[0].message.content, r.choices[0].finish_reason,
                   r.usage.prompt_tokens, r.usage.completion_tokens)
    stream = await client.chat.completions.create(model="gemma", messages=MSG, max_tokens=8, stream=True,
                                                  stream_options={"include_usage": True}, **SEEDED)
    async with stream:
        out["stream"] = [(len(ch.choices), ch.choices[0].delta.content if ch.choices else None,
                          ch.choices[0].finish_reason if ch.choices else None, ch.usage and ch.usage.total_tokens)
                         async for ch in stream]
    early = await client.chat.completions.create(model="gemma", messages=MSG, max_tokens=200, stream=True, **SEEDED)
    async for ch in early:
        out["early"] = ch.choices[0].delta.role
        break
    await early.close()
    t = await client.completions.create(model="gemma", prompt="Rivers run", max_tokens=5, **SEEDED)
    out["text"] = (t.choices[0].text, t.choices[0].finish_reason, t.usage.total_tokens)
    many = await asyncio.gather(*(client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": f"Count to {i}"}], max_tokens=4, **SEEDED) for i in range(3)))
    out["many"] = [(m.choices[0].finish_reason, m.usage.completion_tokens) for m in many]  # batched: text may vary
    out["models"] = [m.id for m in (await client.models.list()).data]
    try:
        await client.chat.completions.create(model="gemma", messages="bad", stream=True)
    except mod.BadRequestError as e:
        out["error"] = (type(e).__name__, e.status_code, e.code, e.type, e.message, e.body)
    return out


@pytest.mark.llama_server
def test_async_script_reads_the_same(idle_server, sdk):
    base = idle_server.endpoint + "/v1"

    async def both():
        theirs = sdk.AsyncOpenAI(base_url=base, api_key="x")
        ours = lbo.AsyncOpenAI(base_url=base, api_key="x")
        a = await async_script(theirs, sdk)
        b = await async_script(ours, lbo)
        await theirs.close()
        await ours.close()
        return a, b

    a, b = asyncio.run(both())
    assert a == b
    assert b["chat"][2] == "length" and b["stream"][-1][3] == b["chat"][3] + b["chat"][4] and b["error"][1] == 400
