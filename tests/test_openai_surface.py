"""The rest of the SDK surface of llama_broker.openai: module names,
``embeddings.create``, ``models.retrieve`` and the pages, ``with_raw_response``
/ ``with_streaming_response``, and ``chat.completions.parse``.

The oracle is the real ``openai`` package: wherever it can talk to the same
loopback server, both clients run the same calls and must give the same
attributes, ``model_dump()``, request bodies and exception classes. The real
llama-server parts are marked ``llama_server``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from typing import Any, Dict, Iterator, List, Optional

import openai  # in the [test] extra: the oracle (a missing one fails, never skips)
import pydantic
import pytest

import llama_broker
from llama_broker import openai as lbo
from llama_broker.openai import _raw
from llama_broker.server import LocalServer

from loopback import LoopbackServer, Reply, api_error, chunk, data, raw, usage_chunk, DONE

# The SDK warns when its models hold what the server sent (a base64 embedding
# in a list[float] field, a parsed object in a field typed None).
pytestmark = pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")

# =============================================================================
# a loopback llama-server imitation that answers both clients
# =============================================================================

HEADERS = (("X-Request-Id", "req-42"), ("X-Custom", "yes"))


def chat_answer(
    content: Optional[str] = '{"name": "Ada", "age": 36}',
    *,
    finish: str = "stop",
    tool_calls: Optional[List[Dict[str, Any]]] = None,
    refusal: Optional[str] = None,
) -> Any:
    """A chat reply as llama-server gives it: one JSON object for ``stream:
    false`` (the SDK's parse/create), an event stream otherwise (the drop-in)."""

    def handler(req: Any) -> Reply:
        body = req.json or {}
        message: Dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        if refusal is not None:
            message["refusal"] = refusal
        usage = {"completion_tokens": 5, "prompt_tokens": 7, "total_tokens": 12}
        if not body.get("stream"):
            whole = {
                "choices": [{"finish_reason": finish, "index": 0, "message": message}],
                "created": 1767225600, "id": "chatcmpl-loopback", "model": "m",
                "system_fingerprint": "b1-x", "object": "chat.completion", "usage": usage,
                "timings": usage_chunk(5)["timings"],  # llama-server sends them either way
            }
            return raw(200, json.dumps(whole).encode(), "application/json; charset=utf-8", HEADERS)
        events = [data(chunk({"role": "assistant", "content": None}))]
        if content is not None:
            events.append(data(chunk({"content": content})))
        if refusal is not None:
            events.append(data(chunk({"refusal": refusal})))
        for i, tc in enumerate(tool_calls or []):
            events.append(data(chunk({"tool_calls": [dict(tc, index=i)]})))
        events.append(data(chunk({}, finish)))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(data(usage_chunk(5)))
        events.append(DONE)
        return Reply(headers=(("Content-Type", "text/event-stream"),) + HEADERS, body=events)

    return handler


def _vec(k: int) -> List[float]:
    return [k + 0.1, -1.5, 1.0 / 3.0]


def embeddings_handler(req: Any) -> Reply:
    body = req.json
    inp = body["input"]
    if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
        inp = [inp]
    items = []
    for k, _ in enumerate(inp):
        v = _vec(k)
        emb: Any = v
        if body.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack("<3f", *v)).decode()
        items.append({"embedding": emb, "index": k, "object": "embedding"})
    out = {"model": body.get("model"), "object": "list", "usage": {"prompt_tokens": 3, "total_tokens": 3}, "data": items}
    return raw(200, json.dumps(out).encode(), "application/json; charset=utf-8", HEADERS)


MODELS = {"object": "list", "data": [
    {"id": "org/m:q4", "object": "model", "created": 1767225600, "owned_by": "llamacpp", "meta": {"n_params": 135}},
    {"id": "m2", "object": "model", "created": 1767225601, "owned_by": "llamacpp"},
]}


def json_reply(obj: Any) -> Any:
    return lambda req: raw(200, json.dumps(obj).encode(), "application/json; charset=utf-8", HEADERS)


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    with LoopbackServer() as s:
        s.script(chat_answer())
        s.route("/v1/embeddings", embeddings_handler)
        s.route("/v1/completions", lambda req: Reply(headers=(("Content-Type", "text/event-stream"),), body=[
            data({"id": "t", "object": "text_completion", "created": 1, "model": "m",
                  "choices": [{"text": "Hi", "index": 0, "logprobs": None, "finish_reason": "stop"}]}), DONE]))
        s.route("/v1/models", json_reply(MODELS), method="GET")
        s.route("/v1/models/org%2Fm:q4", json_reply(MODELS["data"][0]), method="GET")
        yield s


def both(url: str, **kw: Any) -> List[Any]:
    """The SDK's client and ours, built the same way."""
    kw = dict({"api_key": "sk-test", "max_retries": 0}, **kw)
    return [openai.OpenAI(base_url=url + "/v1", **kw), lbo.OpenAI(base_url=url + "/v1", **kw)]


def both_async(url: str, **kw: Any) -> List[Any]:
    kw = dict({"api_key": "sk-test", "max_retries": 0}, **kw)
    return [openai.AsyncOpenAI(base_url=url + "/v1", **kw), lbo.AsyncOpenAI(base_url=url + "/v1", **kw)]


def dump(obj: Any) -> Any:
    """``model_dump()`` without the None fields (the SDK lists every declared field)."""
    return obj.model_dump(exclude_none=True)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


# =============================================================================
# module names
# =============================================================================

#: Names code imports from ``openai`` that the drop-in has too (kept in step with the SDK).
SDK_NAMES = [
    "OpenAI", "AsyncOpenAI", "Client", "AsyncClient", "Stream", "AsyncStream", "BaseModel",
    "Timeout", "DEFAULT_TIMEOUT", "DEFAULT_MAX_RETRIES",
    "NOT_GIVEN", "NotGiven", "not_given", "Omit", "omit",
    "OpenAIError", "APIError", "APIStatusError", "APITimeoutError", "APIConnectionError",
    "APIResponseValidationError", "BadRequestError", "AuthenticationError", "PermissionDeniedError",
    "NotFoundError", "ConflictError", "UnprocessableEntityError", "RateLimitError", "InternalServerError",
    "LengthFinishReasonError", "ContentFilterFinishReasonError", "AsyncAPIResponse", "pydantic_function_tool",
]


def test_module_names_are_the_sdks():
    missing_in_sdk = [n for n in SDK_NAMES if not hasattr(openai, n)]
    missing_here = [n for n in SDK_NAMES if not hasattr(lbo, n)]
    assert not missing_in_sdk and not missing_here, (missing_in_sdk, missing_here)
    for n in SDK_NAMES:
        ours, theirs = getattr(lbo, n), getattr(openai, n)
        assert isinstance(ours, type) == isinstance(theirs, type), n
        if isinstance(theirs, type) and issubclass(theirs, BaseException):
            assert issubclass(ours, lbo.OpenAIError) and issubclass(ours, llama_broker.BrokerError), n
            assert [c.__name__ for c in theirs.__mro__ if c.__module__.startswith("openai")][:2] == [
                c.__name__ for c in ours.__mro__ if c.__module__.startswith("llama_broker.openai")][:2], n
    assert lbo.DEFAULT_MAX_RETRIES == openai.DEFAULT_MAX_RETRIES
    assert lbo.DEFAULT_TIMEOUT.as_dict() == openai.DEFAULT_TIMEOUT.as_dict()
    assert repr(lbo.NOT_GIVEN) == repr(openai.NOT_GIVEN) == repr(lbo.not_given)
    assert not lbo.omit and not lbo.NOT_GIVEN and not lbo.not_given


def test_the_new_surface_imports_neither_openai_nor_pydantic():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['openai'] = None; sys.modules['pydantic'] = None  # importing them would raise\n"
        "from llama_broker.openai import OpenAI, AsyncOpenAI, Timeout, omit, pydantic_function_tool\n"
        "from llama_broker.openai import _resources, _raw\n"
        "c = OpenAI(base_url='http://127.0.0.1:9/v1', api_key='k', timeout=Timeout(5.0))\n"
        "c.embeddings, c.models.retrieve, c.chat.completions.parse, c.with_raw_response.models\n"
        "assert _resources.response_format_param({'type': 'json_object'}) == {'type': 'json_object'}\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("args,kw", [((600.0,), {"connect": 5.0}), ((None,), {}), ((3,), {"read": None}),
                                     ((), {"connect": 1, "read": 2, "write": 3, "pool": 4}), (((1, 2),), {})])
def test_timeout_is_httpx_like(args, kw):
    ours, theirs = lbo.Timeout(*args, **kw), openai.Timeout(*args, **kw)
    assert ours.as_dict() == theirs.as_dict() and repr(ours) == repr(theirs)
    assert lbo.Timeout(ours) == ours
    with pytest.raises(ValueError):
        lbo.Timeout()
    with pytest.raises(ValueError):
        openai.Timeout()


def test_a_timeout_object_sets_the_client_timeouts_and_omit_is_not_sent(srv):
    c = lbo.OpenAI(base_url=srv.url + "/v1", api_key="k", timeout=lbo.Timeout(600.0, connect=5.0))
    assert c.timeout == lbo.Timeout(600.0, connect=5.0)
    assert (c._opts.cfg.connect_timeout_ms, c._opts.cfg.idle_timeout_ms) == (5000, 600000)
    assert lbo.OpenAI(base_url=srv.url, api_key="k").timeout == lbo.DEFAULT_TIMEOUT
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=lbo.omit,
                              top_p=openai.omit, seed=openai.not_given, timeout=lbo.Timeout(30.0))
    sent = srv.chat_requests()[-1].json
    assert "max_tokens" not in sent and "top_p" not in sent and "seed" not in sent
    c.close()


def test_the_new_errors_are_in_llama_brokers_tree():
    comp = lbo.ChatCompletion._w({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
    err = lbo.LengthFinishReasonError(completion=comp)
    assert isinstance(err, llama_broker.BrokerError) and isinstance(err, lbo.OpenAIError)
    assert err.completion is comp and "length limit" in str(err) and "completion_tokens=2" in str(err)
    theirs = openai.LengthFinishReasonError(completion=openai.types.chat.ChatCompletion.model_validate(
        {"id": "x", "choices": [], "created": 1, "model": "m", "object": "chat.completion",
         "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}))
    assert err.message.split(" - ")[0] == str(theirs).split(" - ")[0]
    cf = lbo.ContentFilterFinishReasonError()
    assert cf.completion is None and cf.message == str(openai.ContentFilterFinishReasonError())


# =============================================================================
# embeddings
# =============================================================================

INPUTS = ["one text", ["a", "b", "c"], [1, 2, 3], [[1, 2], [3]]]


@pytest.mark.parametrize("fmt", ["not-given", "float", "base64"])
@pytest.mark.parametrize("inp", INPUTS, ids=["str", "strs", "tokens", "token-lists"])
def test_embeddings_like_the_sdk(srv, fmt, inp):
    got, sent = [], []
    for client in both(srv.url):
        kw = {} if fmt == "not-given" else {"encoding_format": fmt}
        r = client.embeddings.create(model="emb", input=inp, user="u1", extra_body={"embd_normalize": 2}, **kw)
        sent.append(srv.requests[-1].json)
        got.append((type(r).__name__, type(r.data[0]).__name__, dump(r), r.usage.total_tokens, r.data[0].index))
        client.close()
    assert got[0] == got[1]
    assert sent[0] == sent[1]
    assert sent[1]["encoding_format"] == ("base64" if fmt == "not-given" else fmt)
    emb = got[1][2]["data"][0]["embedding"]
    if fmt == "base64":
        assert isinstance(emb, str)  # the caller asked for base64: the string
    else:
        assert emb[0] == pytest.approx(0.1, rel=1e-6) and all(isinstance(x, float) for x in emb)


def test_async_embeddings_like_the_sdk(srv):
    async def go() -> List[Any]:
        out = []
        for client in both_async(srv.url):
            r = await client.embeddings.create(model="emb", input=["x", "y"])
            f = await client.embeddings.create(model="emb", input="x", encoding_format="float", dimensions=3)
            out.append((dump(r), dump(f), srv.requests[-1].json))
            await client.close()
        return out

    a, b = run(go())
    assert a == b


def test_embeddings_errors_like_the_sdk(srv):
    srv.route("/v1/embeddings", json_reply({"object": "list", "model": "m", "data": [], "usage": {}}))
    outs = []
    for client in both(srv.url):
        with pytest.raises(ValueError) as e:
            client.embeddings.create(model="m", input="x")
        assert client.embeddings.create(model="m", input="x", encoding_format="float").data == []
        outs.append(str(e.value))
    assert outs[0] == outs[1] == "No embedding data received"
    srv.route("/v1/embeddings", lambda req: api_error(501, "This server does not support embeddings. Start it with `--embeddings`", "not_supported_error"))
    errs = []
    for client in both(srv.url):
        with pytest.raises(openai.APIStatusError if isinstance(client, openai.OpenAI) else lbo.APIStatusError) as e:
            client.embeddings.create(model="m", input="x")
        errs.append((type(e.value).__name__, e.value.status_code, e.value.body, e.value.type))
    assert errs[0] == errs[1] and errs[1][:2] == ("InternalServerError", 501)


# =============================================================================
# models
# =============================================================================


def test_models_retrieve_and_pages_like_the_sdk(srv):
    got = []
    for client in both(srv.url):
        m = client.models.retrieve("org/m:q4")
        page = client.models.list()
        with pytest.raises(Exception) as nf:
            client.models.retrieve("nope")
        with pytest.raises(ValueError):
            client.models.retrieve("")
        with pytest.raises(ValueError):
            client.models.retrieve("..")
        got.append(dict(
            m=(type(m).__name__, m.id, m.owned_by, dump(m)),
            page=(dump(page), page.to_dict(exclude_none=True), json.loads(page.to_json(exclude_none=True)),
                  json.loads(page.model_dump_json(exclude_none=True)), [x.id for x in page], page.has_next_page()),
            nf=(type(nf.value).__name__, nf.value.status_code),
        ))
        client.close()
    assert got[0] == got[1]
    assert got[1]["nf"] == ("NotFoundError", 404)
    assert [r.path for r in srv.requests if r.path.startswith("/v1/models/org")] == ["/v1/models/org%2Fm:q4"] * 2


def test_async_models_on_the_event_loop(srv, monkeypatch):
    async def script(client: Any) -> Any:
        listed = [m.id async for m in client.models.list()]
        page = await client.models.list()
        one = await client.models.retrieve("org/m:q4")
        with pytest.raises(Exception) as nf:
            await client.models.retrieve("nope")
        return listed, dump(page), [m.id async for m in page], dump(one), (type(nf.value).__name__, nf.value.status_code)

    async def go() -> List[Any]:
        theirs, ours = both_async(srv.url)
        a = await script(theirs)

        def no_thread(*a: Any, **k: Any) -> Any:
            raise AssertionError("the drop-in's async models calls must not use a worker thread")

        monkeypatch.setattr(asyncio, "to_thread", no_thread)
        b = await script(ours)
        assert ours._broker._async is not None  # the asyncio engine ran them
        await theirs.close()
        await ours.close()
        return [a, b]

    a, b = run(go())
    assert a == b and b[0] == ["org/m:q4", "m2"]


# =============================================================================
# with_raw_response / with_streaming_response
# =============================================================================

MSGS = [{"role": "user", "content": "Hi"}]


def _raw_facts(r: Any) -> Dict[str, Any]:
    return dict(
        status=r.status_code, rid=r.request_id, custom=r.headers.get("x-custom"), custom2=r.headers["X-CUSTOM"],
        url=str(r.url), method=r.method, req=(r.http_request.method, str(r.http_request.url)),
        retries=r.retries_taken,
    )


def test_with_raw_response_like_the_sdk(srv):
    got = []
    for client in both(srv.url):
        out: Dict[str, Any] = {}
        r = client.chat.completions.with_raw_response.create(model="m", messages=MSGS, max_tokens=5)
        out["chat"] = (_raw_facts(r), dump(r.parse()), r.parse() is r.parse(), json.loads(r.text)["choices"][0]["message"]["content"])
        r = client.with_raw_response.chat.completions.create(model="m", messages=MSGS)
        out["root"] = (_raw_facts(r), dump(r.parse()))
        r = client.chat.completions.with_raw_response.create(model="m", messages=MSGS, stream=True)
        stream = r.parse()
        out["stream"] = (_raw_facts(r), type(stream).__name__,
                         [c.choices[0].delta.content for c in stream if c.choices])
        r = client.embeddings.with_raw_response.create(model="emb", input="x", encoding_format="float")
        out["emb"] = (_raw_facts(r), dump(r.parse()), json.loads(r.text))
        r = client.models.with_raw_response.list()
        out["models"] = (_raw_facts(r), dump(r.parse()), json.loads(r.content))
        r = client.models.with_raw_response.retrieve("org/m:q4")
        out["model"] = (_raw_facts(r), dump(r.parse()))
        r = client.completions.with_raw_response.create(model="m", prompt="p", stream=True)
        out["text"] = (r.status_code, type(r.parse()).__name__)
        r.parse().close()
        with pytest.raises(Exception) as e:
            client.models.with_raw_response.retrieve("nope")
        out["error"] = (type(e.value).__name__, e.value.status_code)
        got.append(out)
        client.close()
    assert got[0] == got[1]
    assert got[1]["chat"][0]["rid"] == "req-42" and '{"name": "Ada", "age": 36}' in got[1]["stream"][2]
    assert _raw._CAPTURE.get() is None  # the capture ends with the call (and after an error)


def test_raw_response_counts_retries_like_the_sdk(srv):
    from loopback import ok

    got = []
    for client in both(srv.url, max_retries=2):
        srv.script(api_error(503, "Loading model", "unavailable_error", [("Retry-After", "0")]), chat_answer())
        r = client.chat.completions.with_raw_response.create(model="m", messages=MSGS)
        got.append((r.retries_taken, r.status_code, r.parse().choices[0].message.content))
        srv.script(ok())
    assert got[0] == got[1] == (1, 200, '{"name": "Ada", "age": 36}')


def test_async_raw_and_streaming_responses_like_the_sdk(srv):
    async def script(client: Any) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        r = await client.chat.completions.with_raw_response.create(model="m", messages=MSGS)
        out["chat"] = (_raw_facts(r), dump(r.parse()))
        r = await client.chat.completions.with_raw_response.create(model="m", messages=MSGS, stream=True)
        out["stream"] = [c.choices[0].delta.content async for c in r.parse() if c.choices]
        r = await client.models.with_raw_response.list()
        out["models"] = dump(r.parse())
        r = await client.embeddings.with_raw_response.create(model="e", input="x")
        out["emb"] = dump(r.parse())
        async with client.chat.completions.with_streaming_response.create(model="m", messages=MSGS) as s:
            out["streaming"] = (s.status_code, s.headers["x-request-id"], dump(await s.parse()))
        async with client.with_streaming_response.models.retrieve("org/m:q4") as s:
            out["streaming_model"] = dump(await s.parse())
        return out

    async def go() -> List[Any]:
        out = []
        for client in both_async(srv.url):
            out.append(await script(client))
            await client.close()
        return out

    a, b = run(go())
    assert a == b


def test_with_streaming_response_like_the_sdk(srv):
    got = []
    for client in both(srv.url):
        with client.chat.completions.with_streaming_response.create(model="m", messages=MSGS) as r:
            a = (r.status_code, r.headers.get("x-custom"), dump(r.parse()))
        with client.chat.completions.with_streaming_response.create(model="m", messages=MSGS, stream=True) as r:
            b = [c.choices[0].delta.content for c in r.parse() if c.choices]
        with client.embeddings.with_streaming_response.create(model="e", input=["x"]) as r:
            c = dump(r.parse())
        got.append((a, b, c))
        client.close()
    assert got[0] == got[1]


def test_a_decoder_may_keep_its_call_for_a_success_response(srv):
    """The transport hook under with_raw_response: a decoder with ``keeps_call``
    gets its Call (status and headers of a 2xx too); others are left alone.
    aperform runs a GET with a plain JSON body on the asyncio engine."""
    from llama_broker import Broker, ModelConfig
    from llama_broker.decoder import JSONBody

    cfg = ModelConfig(srv.url, max_retries=0)
    kept, plain = _raw._KeptJSONBody(), JSONBody()
    with Broker() as b:
        for dec in (kept, plain):
            b.perform(cfg, None, lambda t0, d=dec: d, url=srv.url + "/v1/models", method="GET", streaming=False)
        assert kept.value == plain.value == MODELS
        assert kept.call.status == 200 and kept.call.response_headers()["X-Request-Id"] == "req-42"
        assert not hasattr(plain, "call")

        async def aget() -> Any:
            dec = _raw._KeptJSONBody()
            await b.aperform(cfg, None, lambda t0: dec, url=srv.url + "/v1/models/org%2Fm:q4", method="GET", streaming=False)
            return dec

        dec = run(aget())
    assert dec.value == MODELS["data"][0] and dec.call.response_headers()["x-custom"] == "yes"
    assert [r.method for r in srv.requests[-3:]] == ["GET", "GET", "GET"]


def test_plain_calls_never_build_the_raw_decoders(srv, monkeypatch):
    """The raw capture is consulted once per request and only a raw call uses it."""

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("a plain call built a raw decoder")

    monkeypatch.setattr(_raw._Capture, "chunk_decoders", boom)
    monkeypatch.setattr(_raw._Capture, "json_body", boom)
    c = lbo.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0)
    assert c.chat.completions.create(model="m", messages=MSGS).choices[0].message.content
    assert [x.choices for x in c.chat.completions.create(model="m", messages=MSGS, stream=True)]
    assert c.embeddings.create(model="e", input="x").data and c.models.list().data
    with pytest.raises(AssertionError, match="raw decoder"):
        c.chat.completions.with_raw_response.create(model="m", messages=MSGS)
    assert _raw._CAPTURE.get() is None
    c.close()


# =============================================================================
# chat.completions.parse
# =============================================================================


class Pet(pydantic.BaseModel):
    kind: str
    legs: int = 4


class Person(pydantic.BaseModel):
    """Someone."""

    name: str
    age: int
    nickname: Optional[str] = None
    pets: List[Pet] = []
    best_pet: Optional[Pet] = pydantic.Field(default=None, description="the favourite")


class Colour(pydantic.BaseModel):
    name: str


class Weather(pydantic.BaseModel):
    city: str


STRICT_TOOL = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def _name(o: Any) -> str:
    return type(o).__name__.split("[")[0]  # the SDK's are generic: ParsedChatCompletion[Person]


def _parse_facts(r: Any) -> Dict[str, Any]:
    m = r.choices[0].message
    tcs = m.tool_calls or []
    return dict(
        types=(_name(r), _name(r.choices[0]), _name(m), [_name(t) for t in tcs], [_name(t.function) for t in tcs]),
        parsed=(type(m.parsed).__name__, m.parsed.model_dump() if hasattr(m.parsed, "model_dump") else m.parsed),
        args=[(type(t.function.parsed_arguments).__name__, t.function.parsed_arguments if isinstance(t.function.parsed_arguments, dict)
               else t.function.parsed_arguments.model_dump()) for t in tcs],
        dump=dump(r),
        # parsed is a model inside the data: every dump reaches inside it with its options
        full=r.model_dump(),
        unset=r.to_dict(),
        as_json=json.loads(r.model_dump_json()),
    )


def test_parse_sends_the_sdks_strict_schema_and_parses_like_it(srv):
    got, sent = [], []
    for client in both(srv.url):
        r = client.chat.completions.parse(model="m", messages=MSGS, response_format=Person, max_tokens=50, seed=1)
        sent.append({k: v for k, v in srv.requests[-1].json.items() if k not in ("stream", "stream_options")})
        got.append(_parse_facts(r))
        assert isinstance(r.choices[0].message.parsed, Person) and r.choices[0].message.parsed.age == 36
        client.close()
    assert sent[0] == sent[1]
    rf = sent[1]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "Person" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["additionalProperties"] is False
    assert got[0] == got[1]


@pytest.mark.parametrize("finish,error", [("length", "LengthFinishReasonError"), ("content_filter", "ContentFilterFinishReasonError")])
def test_parse_raises_on_length_and_content_filter_like_the_sdk(srv, finish, error):
    srv.script(chat_answer('{"name": "Ad', finish=finish))
    got = []
    for client in both(srv.url):
        with pytest.raises(Exception) as e:
            client.chat.completions.parse(model="m", messages=MSGS, response_format=Person)
        got.append((type(e.value).__name__, e.value.completion.choices[0].finish_reason,
                    e.value.completion.choices[0].message.content))
        assert isinstance(e.value, (openai.OpenAIError, lbo.OpenAIError))
        client.close()
    assert got[0] == got[1] and got[1][0] == error


def test_parse_dict_format_refusal_tools_and_misuse_like_the_sdk(srv):
    got = []
    for client in both(srv.url):
        out: Dict[str, Any] = {}
        srv.script(chat_answer())
        r = client.chat.completions.parse(model="m", messages=MSGS, response_format={"type": "json_object"})
        out["dict"] = (r.choices[0].message.parsed, srv.requests[-1].json["response_format"], dump(r))
        # (a refusal delta reaching message.refusal of a stream=False answer
        # belongs to the non-streamed assembly, tested with it)
        srv.script(chat_answer(None, refusal="I can't"))
        r = client.chat.completions.parse(model="m", messages=MSGS, response_format=Person)
        out["refusal"] = r.choices[0].message.parsed
        srv.script(chat_answer(None, finish="tool_calls", tool_calls=[TOOL_CALL]))
        r = client.chat.completions.parse(model="m", messages=MSGS, tools=[STRICT_TOOL])
        out["strict_tool"] = _parse_facts(r)
        fn_tool = (openai if isinstance(client, openai.OpenAI) else lbo).pydantic_function_tool(Weather, name="get_weather")
        r = client.chat.completions.parse(model="m", messages=MSGS, tools=[fn_tool])
        out["pydantic_tool"] = (_parse_facts(r), srv.requests[-1].json["tools"])
        assert isinstance(r.choices[0].message.tool_calls[0].function.parsed_arguments, Weather)
        loose = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
        for bad in ([loose], [{"type": "custom", "custom": {"name": "x"}}]):
            with pytest.raises(ValueError) as e:
                client.chat.completions.parse(model="m", messages=MSGS, tools=bad)
            out.setdefault("bad_tools", []).append(str(e.value))
        with pytest.raises(TypeError) as e:
            client.chat.completions.create(model="m", messages=MSGS, response_format=Person)
        out["create_model"] = str(e.value)
        with pytest.raises(TypeError):
            client.chat.completions.parse(model="m", messages=MSGS, response_format=int)
        got.append(out)
        client.close()
    assert got[0] == got[1]
    assert got[1]["dict"][0] is None and got[1]["refusal"] is None
    assert got[1]["strict_tool"]["args"] == [("dict", {"city": "Paris"})]


def test_beta_chat_completions_parse_like_the_sdk(srv):
    """Older SDK code calls ``client.beta.chat.completions.parse``."""
    got = []
    for client in both(srv.url):
        r = client.beta.chat.completions.parse(model="m", messages=MSGS, response_format=Person)
        got.append(_parse_facts(r))
        client.close()
    assert got[0] == got[1]


def test_async_parse_and_raw_parse_like_the_sdk(srv):
    async def go() -> List[Any]:
        out = []
        for client in both_async(srv.url):
            r = await client.beta.chat.completions.parse(model="m", messages=MSGS, response_format=Person)
            assert _parse_facts(r) == _parse_facts(await client.chat.completions.parse(model="m", messages=MSGS, response_format=Person))
            raw_r = await client.chat.completions.with_raw_response.parse(model="m", messages=MSGS, response_format=Person)
            out.append((_parse_facts(r), _parse_facts(raw_r.parse()), raw_r.status_code, raw_r.headers["x-request-id"]))
            await client.close()
        return out

    a, b = run(go())
    assert a == b


def test_parsed_attributes_are_objects_and_the_data_their_json(srv):
    """The attribute is the object, the data its JSON form (model_dump, to_json)."""
    c = lbo.OpenAI(base_url=srv.url + "/v1", api_key="k")
    r = c.chat.completions.parse(model="m", messages=MSGS, response_format=Person)
    m = r.choices[0].message
    assert m.parsed == Person(name="Ada", age=36)
    assert r.model_dump()["choices"][0]["message"]["parsed"] == {"name": "Ada", "age": 36, "nickname": None, "pets": [], "best_pet": None}
    assert json.loads(r.to_json())["choices"][0]["message"]["parsed"]["name"] == "Ada"
    c.close()


# =============================================================================
# the real llama-server
# =============================================================================


@pytest.fixture(scope="module")
def embedding_server() -> Iterator[LocalServer]:
    # one slot, no prompt cache: the same text gives the same vector to both clients
    with LocalServer(parallel=1, ctx_per_slot=512, extra_args=["--embeddings", "--pooling", "mean"]) as s:
        yield s


@pytest.mark.llama_server
def test_embeddings_equal_the_sdk_on_the_real_server(embedding_server):
    texts = ["The quick brown fox", "café 日本語"]
    got = []
    for client in both(embedding_server.endpoint):
        nocache = {"extra_body": {"cache_prompt": False}}
        d = client.embeddings.create(model="x", input=texts, **nocache)
        f = client.embeddings.create(model="x", input=texts[0], encoding_format="float", **nocache)
        b = client.embeddings.create(model="x", input=texts[1], encoding_format="base64", **nocache)
        got.append((dump(d), dump(f), dump(b)))
        client.close()
    assert got[0] == got[1]
    d, f, b = got[1]
    assert len(d["data"]) == 2 and len(d["data"][0]["embedding"]) > 16 and isinstance(b["data"][0]["embedding"], str)


@pytest.mark.llama_server
def test_models_parse_and_raw_equal_the_sdk_on_the_real_server(llama_server):
    got = []
    for client in both(llama_server.endpoint):
        out: Dict[str, Any] = {}
        page = client.models.list()
        mid = page.data[0].id
        out["list"] = [(m.id, m.object) for m in page]
        try:
            out["retrieve"] = dump(client.models.retrieve(mid))
        except Exception as e:  # noqa: BLE001 - this llama-server may not serve /models/{id}: the same error, then
            out["retrieve"] = (type(e).__name__, getattr(e, "status_code", None))
        r = client.chat.completions.parse(
            model="m", messages=[{"role": "user", "content": "Name a colour, as JSON."}],
            response_format=Colour, max_tokens=40, seed=3, temperature=0, extra_body={"cache_prompt": False})
        m = r.choices[0].message
        out["parse"] = (r.choices[0].finish_reason, m.content, type(m.parsed).__name__, m.parsed.model_dump())
        with pytest.raises(Exception) as e:  # the grammar holds the JSON open: cut at 3 tokens
            client.chat.completions.parse(
                model="m", messages=[{"role": "user", "content": "Name a colour, as JSON."}],
                response_format=Colour, max_tokens=3, seed=3, temperature=0, extra_body={"cache_prompt": False})
        # (the content cut there differs: llama-server streams less of it than it
        # puts in a whole answer; the non-streamed assembly's matter, not parse's)
        out["length"] = (type(e.value).__name__, e.value.completion.choices[0].finish_reason)
        raw_r = client.chat.completions.with_raw_response.create(
            model="m", messages=MSGS, max_tokens=4, seed=3, temperature=0, extra_body={"cache_prompt": False})
        out["raw"] = (raw_r.status_code, raw_r.parse().choices[0].message.content, "server" in raw_r.headers)
        got.append(out)
        client.close()
    assert got[0] == got[1]
    assert got[1]["parse"][0] == "stop" and isinstance(got[1]["parse"][3]["name"], str)
    assert got[1]["length"][0] == "LengthFinishReasonError"


# =============================================================================
# review fixes: large JSON answers, edits through attributes, copies
# =============================================================================


def test_an_embeddings_answer_larger_than_one_stream_event_is_received(srv):
    # 20 MB of base64 vectors: over max_event_bytes (16 MiB, one SSE event's
    # bound), which must not bound a plain JSON answer.
    vec = base64.b64encode(struct.pack("<4096f", *([0.5] * 4096))).decode()
    n = 20 * 1024 * 1024 // len(vec) + 1
    body = json.dumps({"object": "list", "model": "m", "usage": {"prompt_tokens": n, "total_tokens": n},
                       "data": [{"object": "embedding", "index": i, "embedding": vec} for i in range(n)]}).encode()
    assert len(body) > llama_broker.ModelConfig("http://h").max_event_bytes
    srv.route("/v1/embeddings", lambda req: raw(200, body, "application/json", HEADERS))
    counts = []
    for client in both(srv.url):
        r = client.embeddings.create(model="m", input=["x"] * n, encoding_format="base64")
        counts.append((len(r.data), r.data[-1].index, r.data[0].embedding == vec))
        client.close()
    assert counts[0] == counts[1] == (n, n - 1, True)


def _completion_with_tool_call() -> Dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "extra": 1},
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}


def test_edits_made_through_attributes_reach_every_dump_as_with_the_sdk():
    import copy
    import pickle

    from openai.types.chat import ChatCompletion as SDKChatCompletion

    outs = []
    for c in (SDKChatCompletion.model_validate(_completion_with_tool_call()),
              lbo.ChatCompletion._w(_completion_with_tool_call())):
        c.choices[0].message.tool_calls.pop()  # a list edited in place
        c.choices[0].message.content = "done"
        c.note = [1]
        c.note.append(2)  # an assigned extra grown in place
        outs.append((c.model_dump(), c.to_dict(), json.loads(c.model_dump_json()),
                     pickle.loads(pickle.dumps(c)).model_dump(), copy.deepcopy(c).model_dump()))
    assert outs[0] == outs[1]
    assert outs[1][0]["choices"][0]["message"]["tool_calls"] == [] and outs[1][0]["note"] == [1, 2]


def test_copies_keep_which_extra_fields_were_set_as_with_the_sdk():
    import copy

    from openai.types.chat import ChatCompletion as SDKChatCompletion

    sets = []
    for c in (SDKChatCompletion.model_validate(_completion_with_tool_call()),
              lbo.ChatCompletion._w(_completion_with_tool_call())):
        u = c.usage
        sets.append((u.model_fields_set, copy.copy(u).model_fields_set, copy.deepcopy(u).model_fields_set))
    assert sets[0] == sets[1] and "extra" in sets[1][1]


def test_a_warning_of_the_drop_in_goes_through_the_package_logger_not_stderr():
    # parse() warns about a custom tool call; before the application set up
    # logging, the warning must not reach stderr (the package's NullHandler)
    import subprocess
    import sys

    code = (
        "from llama_broker.openai import _resources, ChatCompletion\n"
        "c = ChatCompletion._w({'id': 'x', 'object': 'chat.completion', 'created': 1, 'model': 'm', 'choices': [\n"
        "  {'index': 0, 'finish_reason': 'tool_calls', 'message': {'role': 'assistant', 'content': None,\n"
        "   'tool_calls': [{'id': 'c9', 'type': 'custom', 'custom': {'name': 'x', 'input': 'y'}}]}}]})\n"
        "p = _resources.parse_completion(c, {'type': 'json_object'}, [])\n"
        "assert p.choices[0].message.tool_calls is None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == ""


def test_a_raw_stream_waits_for_headers_sent_after_the_status_line():
    # The status line, then a pause, then the headers (separate packets): the
    # raw response's headers must be the whole block, as with the SDK.
    import socket
    import threading
    import time

    events = b"".join(
        b"%x\r\n%s\r\n" % (len(e), e)
        for e in (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":'
                  b'[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n', b"data: [DONE]\n\n")
    ) + b"0\r\n\r\n"
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
                while len(rest) < length:
                    rest += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                time.sleep(0.3)
                conn.sendall(b"Content-Type: text/event-stream\r\nX-Request-Id: late-1\r\n"
                             b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + events)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    url = "http://127.0.0.1:%d" % lsock.getsockname()[1]
    try:
        got = []
        for client in both(url):
            r = client.chat.completions.with_raw_response.create(model="m", messages=MSGS, stream=True)
            got.append((r.headers.get("x-request-id"), r.headers.get("content-type")))
            assert [c.choices[0].delta.content for c in r.parse()] == ["hi"]
            client.close()
        assert got[0] == got[1] == ("late-1", "text/event-stream")
    finally:
        stop.set()
        lsock.close()
        th.join(5)



def test_the_raw_wrapper_has_no_beta_as_with_the_sdk(srv):
    # the SDK's client.with_raw_response.beta has no chat: neither has ours
    for client in both(srv.url):
        with pytest.raises(AttributeError):
            client.with_raw_response.beta.chat.completions.parse
        client.close()
