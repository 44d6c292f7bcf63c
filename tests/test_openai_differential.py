"""The drop-in against the SDK as the oracle: the same server bytes go to
``openai.OpenAI`` / ``openai.AsyncOpenAI`` and to ``llama_broker.openai``, and
everything a program can read must be equal: every declared attribute (the
SDK object's fields walked recursively, the same path read on ours),
``model_dump`` in its variants, ``to_dict``, ``to_json`` and
``model_dump_json`` (parsed), ``repr``, ``model_fields_set``; for errors the
class name, ``status_code``, ``message``, ``body``, ``code``, ``type``,
``param``, and the number of requests the server saw (retries).

A difference is allowed only where the module docstring of
``llama_broker.openai`` lists it as a departure; each allowed one is named
here with the departure it belongs to (see ``DEPARTURES``).
"""

from __future__ import annotations

import asyncio
import json
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama_broker.openai as lbo
from llama_broker.openai import _types as lbt

import openai_fixtures as fx
from loopback import LoopbackServer, Reply, Stall, data, raw, sse

import openai  # the oracle: a test dependency ([test] extra), never a runtime one
import openai.types
import openai.types.chat
import pydantic

MSGS = [{"role": "user", "content": "Hi"}]
ASYNC_TIMEOUT_S = 30.0

#: Differences the module docstring lists, by the phrase it uses there.
DEPARTURES = {
    "error-line": "An ``error:`` line (older llama-server)",
    "cut": "A stream cut before any finish",
    "ignored-stream": "A server that ignored ``stream``",
    "stream-error-class": "subclass of the SDK-named :class:`APIError`",
    "not-json": "A data line that is not JSON raises",
    "annotations": "non-streamed ``annotations: []``",
}


def test_departures_are_documented():
    doc = " ".join((lbo.__doc__ or "").split())
    for key, phrase in DEPARTURES.items():
        assert phrase in doc, f"departure {key!r} is not in the module docstring"


# =============================================================================
# comparing
# =============================================================================

_MISSING = object()


def _strict(v: Any) -> str:
    """A JSON text that tells 1 from 1.0 from True (dict order ignored)."""
    return json.dumps(v, sort_keys=True, ensure_ascii=False, default=repr)


def walk(s: Any, o: Any, path: str, diffs: List[Tuple[str, Any, Any]]) -> None:
    """Read every declared field of the SDK object ``s`` (and its extra fields)
    and the same attribute of ours, recursively."""
    if isinstance(s, pydantic.BaseModel):
        if not isinstance(o, lbo.BaseModel):
            diffs.append((path, type(s).__name__, type(o).__name__))
            return
        if type(s).__name__ != type(o).__name__:
            diffs.append((path + ".__class__", type(s).__name__, type(o).__name__))
        names = list(type(s).model_fields) + list(s.model_extra or {})
        for n in names:
            walk(getattr(s, n), getattr(o, n, _MISSING), f"{path}.{n}", diffs)
        ours = [k for k, _ in o]
        if ours != names:
            diffs.append((path + ".__iter__", names, ours))
        if s.model_fields_set != o.model_fields_set:
            diffs.append((path + ".model_fields_set", s.model_fields_set, o.model_fields_set))
        return
    if isinstance(s, list):
        if not isinstance(o, list) or len(o) != len(s):
            diffs.append((path, s, o))
            return
        for i, (a, b) in enumerate(zip(s, o)):
            walk(a, b, f"{path}.{i}", diffs)
        return
    if isinstance(s, dict):
        if not isinstance(o, dict) or set(s) != set(o):
            diffs.append((path, s, o))
            return
        for k in s:
            walk(s[k], o[k], f"{path}.{k}", diffs)
        return
    if _strict(s) != _strict(o):
        diffs.append((path, s, o))


DUMPS: List[Tuple[str, Dict[str, Any]]] = [
    ("model_dump", {}),
    ("model_dump", {"mode": "json"}),
    ("model_dump", {"exclude_none": True}),
    ("model_dump", {"exclude_unset": True}),
    ("model_dump", {"exclude_defaults": True}),
    ("model_dump", {"exclude_unset": True, "exclude_none": True}),
    ("model_dump", {"by_alias": True}),
    ("to_dict", {}),
    ("to_dict", {"exclude_unset": False}),
    ("to_dict", {"exclude_none": True}),
    ("to_dict", {"mode": "json", "use_api_names": False}),
    ("to_json", {}),
    ("to_json", {"exclude_unset": False, "indent": None}),
    ("model_dump_json", {}),
    ("model_dump_json", {"exclude_unset": True}),
    ("model_dump_json", {"indent": 2, "exclude_none": True}),
]


def _drop(d: Any, path: str) -> None:
    """Remove ``a.0.b`` from a dump (an allowed departure)."""
    parts = path.split(".")
    for p in parts[:-1]:
        if isinstance(d, list):
            d = d[int(p)] if int(p) < len(d) else None
        elif isinstance(d, dict):
            d = d.get(p)
        if d is None:
            return
    if isinstance(d, dict):
        d.pop(parts[-1], None)


def compare(s: Any, o: Any, where: str, allowed: Optional[Dict[str, str]] = None) -> None:
    """Assert ``o`` (ours) reads and dumps as ``s`` (the SDK's), except at ``allowed`` paths."""
    allowed = allowed or {}
    diffs: List[Tuple[str, Any, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic's serializer warnings for odd values
        if not isinstance(s, pydantic.BaseModel):  # a raw value the SDK yields as it is
            assert _strict(s) == _strict(o), f"{where}: {s!r} != {o!r}"
            return
        walk(s, o, "", diffs)
        for meth, kw in DUMPS:
            a, b = getattr(s, meth)(**kw), getattr(o, meth)(**kw)
            if isinstance(a, str):
                a, b = json.loads(a), json.loads(b)
            for p in allowed:
                _drop(a, p)
                _drop(b, p)
            if _strict(a) != _strict(b):
                diffs.append((f"{meth}({kw})", a, b))
        if not allowed and repr(s) != repr(o):
            diffs.append(("repr", repr(s), repr(o)))
    diffs = [d for d in diffs if not any(d[0] == "." + p or d[0].startswith("." + p + ".") for p in allowed)]
    diffs = [d for d in diffs if not (d[0].endswith((".__iter__", ".model_fields_set")) and _only_allowed(d, allowed))]
    assert not diffs, f"{where}: " + "\n".join(f"{p}: SDK {a!r:.300} != ours {b!r:.300}" for p, a, b in diffs[:4])


def _only_allowed(d: Tuple[str, Any, Any], allowed: Dict[str, str]) -> bool:
    """An __iter__/model_fields_set difference that is only an allowed field."""
    base = d[0].rsplit(".", 1)[0]
    names = {p.rsplit(".", 1)[1] for p in allowed if "." + p.rsplit(".", 1)[0] == base}
    return bool(names) and set(d[1]) ^ set(d[2]) <= names


def error_facts(e: BaseException) -> Dict[str, Any]:
    return {
        "class": type(e).__name__,
        "status_code": getattr(e, "status_code", None),
        "message": getattr(e, "message", None),
        "body": getattr(e, "body", None),
        "code": getattr(e, "code", None),
        "type": getattr(e, "type", None),
        "param": getattr(e, "param", None),
    }


def compare_errors(s: BaseException, o: BaseException, where: str, same_class: bool = True) -> None:
    a, b = error_facts(s), error_facts(o)
    if not same_class:  # a documented departure: ours is a subclass of the SDK-named class
        assert isinstance(o, getattr(lbo, type(s).__name__)), f"{where}: {type(o).__name__} is not a {a['class']}"
        a.pop("class"), b.pop("class")
    assert a == b, f"{where}: SDK {a} != ours {b}"


# =============================================================================
# running both clients on one server
# =============================================================================


def _make(kind: str, url: str, *, is_async: bool, **kw: Any) -> Any:
    mod = openai if kind == "sdk" else lbo
    cls = mod.AsyncOpenAI if is_async else mod.OpenAI
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 10.0)
    return cls(base_url=url + "/v1", api_key="sk-test", **kw)


def _call(client: Any, text: bool, stream: bool, extra: Dict[str, Any]) -> Any:
    if text:
        return client.completions.create(model="m", prompt="Once", stream=stream, **extra)
    return client.chat.completions.create(model="m", messages=MSGS, stream=stream, **extra)


def run_sync(kind: str, url: str, *, text: bool = False, stream: bool, extra: Optional[Dict[str, Any]] = None, **kw: Any) -> Tuple[Any, Optional[BaseException]]:
    """(result, error): a list of chunks (those before an error) or the whole object."""
    client = _make(kind, url, is_async=False, **kw)
    got: List[Any] = []
    try:
        res = _call(client, text, stream, extra or {})
        if not stream:
            return res, None
        with res:
            for c in res:
                got.append(c)
        return got, None
    except Exception as e:  # noqa: BLE001 - compared below
        return got, e
    finally:
        client.close()


def run_async(kind: str, url: str, *, text: bool = False, stream: bool, extra: Optional[Dict[str, Any]] = None, **kw: Any) -> Tuple[Any, Optional[BaseException]]:
    async def go() -> Tuple[Any, Optional[BaseException]]:
        client = _make(kind, url, is_async=True, **kw)
        got: List[Any] = []
        try:
            res = await _call(client, text, stream, extra or {})
            if not stream:
                return res, None
            async with res:
                async for c in res:
                    got.append(c)
            return got, None
        except Exception as e:  # noqa: BLE001
            return got, e
        finally:
            await client.close()

    return asyncio.run(asyncio.wait_for(go(), ASYNC_TIMEOUT_S))


RUNNERS = {"sync": run_sync, "async": run_async}


def serve(srv: LoopbackServer, handler: Callable[[Any], Reply], text: bool = False) -> None:
    if text:
        srv.route("/v1/completions", handler)
    else:
        srv.script(handler)


def compare_streams(s: List[Any], o: List[Any], where: str) -> None:
    assert len(s) == len(o), f"{where}: SDK yielded {len(s)} chunks, ours {len(o)}"
    for i, (a, b) in enumerate(zip(s, o)):
        compare(a, b, f"{where} chunk {i}")


# =============================================================================
# the fixtures, streamed and not, sync and async
# =============================================================================


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("case", fx.CASES, ids=lambda c: c.name)
def test_stream_equal(case: fx.Case, mode: str):
    with LoopbackServer() as srv:
        serve(srv, fx.replay(case), case.text)
        run = RUNNERS[mode]
        s, se = run("sdk", srv.url, text=case.text, stream=True)
        o, oe = run("ours", srv.url, text=case.text, stream=True)
    assert se is None and oe is None, (se, oe)
    compare_streams(s, o, f"{case.name}/{mode}")


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("case", [c for c in fx.CASES if c.body is not None], ids=lambda c: c.name)
def test_whole_equal(case: fx.Case, mode: str):
    """``stream=False``: the SDK reads the server's non-streamed body, ours
    assembles the same server's stream (see openai_fixtures' docstring)."""
    with LoopbackServer() as srv:
        serve(srv, fx.replay(case), case.text)
        run = RUNNERS[mode]
        s, se = run("sdk", srv.url, text=case.text, stream=False)
        o, oe = run("ours", srv.url, text=case.text, stream=False)
        seen = [r.json for r in srv.requests]
    assert se is None and oe is None, (se, oe)
    assert seen[0].get("stream") in (None, False) and seen[1]["stream"] is True  # the pairing
    compare(s, o, f"{case.name}/{mode}", case.departures)


def _both_stream(body: List[Any]) -> Tuple[List[Any], List[Any]]:
    out = {}
    for who in ("sdk", "ours"):
        with LoopbackServer() as srv:
            srv.script(sse(body))
            res, err = run_sync(who, srv.url, stream=True)
            assert err is None, err
            out[who] = res
    return out["sdk"], out["ours"]


def test_dump_has_every_field():
    """Difference 1: ``model_dump()`` has every declared field (None when not
    sent), as LangChain reads it; ``exclude_unset`` gives what was sent, extras included."""
    s, o = _both_stream(fx.BY_NAME["ls-content"].events(True))
    d = o[1].model_dump()
    assert d["choices"][0]["delta"]["role"] is None and d["usage"] is None and d["choices"][0]["logprobs"] is None
    assert d == s[1].model_dump() and json.loads(o[1].model_dump_json()) == json.loads(s[1].model_dump_json())
    last = o[-1].model_dump(exclude_unset=True)
    assert last == s[-1].model_dump(exclude_unset=True) and "timings" in last and "obfuscation" not in last
    assert o[-1].to_dict() == s[-1].to_dict() and json.loads(o[-1].to_json()) == json.loads(s[-1].to_json())


def test_event_names_pass_data():
    """Difference 4: ``event: delta`` events are chunks, as the SDK yields them."""
    s, o = _both_stream(fx.BY_NAME["odd-event-names"].events(False))
    assert len(s) == len(o) == 3
    compare_streams(s, o, "event names")


def test_ints_as_strings_coerced():
    """Difference 5: declared ints sent as strings are coerced where the SDK
    coerces (optional fields, validated subtrees: ``usage``), kept where it does not."""
    s, o = _both_stream(fx.BY_NAME["odd-strings"].events(False))
    assert o[2].usage.total_tokens == s[2].usage.total_tokens == 3
    assert o[2].usage.prompt_tokens_details.cached_tokens == 1
    assert o[3].usage.prompt_tokens == s[3].usage.prompt_tokens == "2"  # usage did not validate: as sent
    assert o[0].created == s[0].created == str(fx.CREATED)  # a required int is constructed: as sent
    assert o[1].choices[0].logprobs.content[0].logprob == -1.0  # a required float: the int becomes a float
    compare_streams(s, o, "strings")


def test_missing_delta_and_index_dump():
    """Difference 6: a chunk without ``delta`` and a fragment without ``index``
    dump those keys as None (``choice["delta"]``, ``tool_call["index"]`` read)."""
    s, o = _both_stream(fx.BY_NAME["odd-no-delta"].events(False))
    assert o[-1].model_dump()["choices"][0]["delta"] is None and o[-1].choices[0].delta is None
    compare_streams(s, o, "no delta")
    s, o = _both_stream(fx.BY_NAME["odd-no-index"].events(False))
    assert o[1].model_dump()["choices"][0]["delta"]["tool_calls"][0]["index"] is None
    compare_streams(s, o, "no index")


def test_tool_call_message_content_is_none():
    """Difference 2's decided case: a tool-call reply's ``content`` is None and an
    empty reply's is ``""``, as llama-server's non-streamed body has them."""
    for name, want in (("ls-tools", None), ("ls-empty", "")):
        with LoopbackServer() as srv:
            serve(srv, fx.replay(fx.BY_NAME[name]))
            s, _ = run_sync("sdk", srv.url, stream=False)
            o, _ = run_sync("ours", srv.url, stream=False)
        assert s.choices[0].message.content == o.choices[0].message.content == want, name


def test_refusal_survives_stream_false():
    """Difference 2: the refusal text reaches ``message.refusal`` and content is None, as in OpenAI's body."""
    case = fx.BY_NAME["oai-refusal"]
    with LoopbackServer() as srv:
        serve(srv, fx.replay(case))
        o, oe = run_sync("ours", srv.url, stream=False)
    assert oe is None
    msg = o.choices[0].message
    assert msg.refusal == "I'm sorry, I can't help with that." and msg.content is None


def test_message_sent_back_is_the_same():
    """``messages.append(resp.choices[0].message)``: the next request carries the
    same assistant message from both clients (tool-call reply: ``content`` None)."""
    bodies = {}
    for name in ("ls-tools", "oai-refusal", "ls-content"):
        case = fx.BY_NAME[name]
        for kind in ("sdk", "ours"):
            with LoopbackServer() as srv:
                serve(srv, fx.replay(case))
                client = _make(kind, srv.url, is_async=False)
                r = client.chat.completions.create(model="m", messages=MSGS)
                client.chat.completions.create(model="m", messages=MSGS + [r.choices[0].message])
                client.close()
                bodies[kind] = srv.requests[-1].json["messages"][-1]
        allowed = {"annotations"} if name.startswith("oai") else set()
        a = {k: v for k, v in bodies["sdk"].items() if k not in allowed}
        assert a == bodies["ours"], (name, bodies)


# =============================================================================
# errors
# =============================================================================


@pytest.mark.parametrize("kind", ["json", "text", "empty"])
@pytest.mark.parametrize("status", fx.ERROR_STATUSES)
def test_http_errors_equal(status: int, kind: str):
    """Every status, three body kinds, streamed and not, sync and async; retries
    as the SDK's (409, 429 and 5xx are sent again: 3 requests with max_retries=2)."""
    for mode in ("sync", "async"):
        for stream in (False, True):
            counts = {}
            errs = {}
            for who in ("sdk", "ours"):
                with LoopbackServer() as srv:
                    srv.script(fx.error_reply(status, kind))
                    _, errs[who] = RUNNERS[mode](who, srv.url, stream=stream, max_retries=2)
                    counts[who] = len(srv.chat_requests())
            where = f"{status}/{kind}/{mode}/stream={stream}"
            assert errs["sdk"] is not None and errs["ours"] is not None, where
            compare_errors(errs["sdk"], errs["ours"], where)
            assert counts["sdk"] == counts["ours"] == (3 if status in (409, 429) or status >= 500 else 1), (where, counts)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_error_after_start_stream_false(mode: str):
    """Difference 3: with ``stream=False`` an error after generation started is
    the SDK's InternalServerError (500), retried as a 500 is; the SDK gets the
    server's non-streamed answer to it (HTTP 500 with the same envelope)."""
    errs, counts = {}, {}

    def handler(req: Any) -> Reply:
        if req.json.get("stream"):
            return sse(fx.mid_stream_error_events())
        return fx.mid_stream_error_body()

    for who in ("sdk", "ours"):
        with LoopbackServer() as srv:
            srv.script(handler)
            _, errs[who] = RUNNERS[mode](who, srv.url, stream=False, max_retries=2)
            counts[who] = len(srv.chat_requests())
    compare_errors(errs["sdk"], errs["ours"], mode)
    assert isinstance(errs["ours"], lbo.InternalServerError) and errs["ours"].status_code == 500
    assert counts["sdk"] == counts["ours"] == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    "error", [fx.MID_STREAM_ERROR, {"error": {"code": 500}}, {"error": "boom"}, {"error": {"message": ""}, "choices": []}],
    ids=["envelope", "no-message", "string", "empty-message"],
)
def test_error_in_stream_equal(mode: str, error: Dict[str, Any]):
    """``stream=True``: the chunks before the error, then the SDK's APIError (ours:
    APIStreamError, a subclass, documented); a falsy ``error`` is no error."""
    body = fx.mid_stream_error_events()[:-1] + [data(error)]
    out = {}
    for who in ("sdk", "ours"):
        with LoopbackServer() as srv:
            srv.script(sse(body))
            out[who] = RUNNERS[mode](who, srv.url, stream=True)
    (s, se), (o, oe) = out["sdk"], out["ours"]
    compare_streams(s, o, mode)
    assert type(se).__name__ == "APIError" and type(oe).__name__ == "APIStreamError"
    compare_errors(se, oe, mode, same_class=False)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    "payload", [b"data: {not json\n\n", b"data: {\"a\": 1\n\n", b"data: nan-ish\n\n"], ids=["brace", "cut", "word"]
)
def test_data_not_json_raises(mode: str, payload: bytes):
    """Difference 4: a data line that is not JSON raises, as the SDK's does (the
    SDK's json.JSONDecodeError; ours is one too, and an APIResponseValidationError)."""
    body = [data(fx.ls_chunk({"role": "assistant", "content": None})), payload, data(fx.ls_chunk({}, "stop")), fx.DONE]
    out = {}
    for who in ("sdk", "ours"):
        with LoopbackServer() as srv:
            srv.script(sse(body))
            out[who] = RUNNERS[mode](who, srv.url, stream=True)
    (s, se), (o, oe) = out["sdk"], out["ours"]
    compare_streams(s, o, mode)
    assert isinstance(se, json.JSONDecodeError) and isinstance(oe, json.JSONDecodeError)
    assert type(se).__name__ == type(oe).__name__ and str(se) == str(oe)
    assert isinstance(oe, lbo.APIResponseValidationError)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("stream", [False, True])
def test_timeouts_equal(stream: bool, mode: str):
    """No status line within the timeout: APITimeoutError from both, after the same retries."""
    out, counts = {}, {}
    for who in ("sdk", "ours"):
        with LoopbackServer() as srv:
            srv.script(Reply(delay=3.0, headers=(("Content-Type", "application/json"),), body=[b"{}"], chunked=False))
            out[who] = RUNNERS[mode](who, srv.url, stream=stream, timeout=0.3, max_retries=1)
            counts[who] = len(srv.chat_requests())
    compare_errors(out["sdk"][1], out["ours"][1], f"timeout stream={stream}")
    assert counts["sdk"] == counts["ours"] == 2


def test_timeout_mid_stream_equal():
    """The server goes silent mid-stream: the chunks so far, then APITimeoutError."""
    body = [data(fx.ls_chunk({"role": "assistant", "content": None})), data(fx.ls_chunk({"content": "a"})), Stall(3.0)]
    out = {}
    for who in ("sdk", "ours"):
        with LoopbackServer() as srv:
            srv.script(sse(body))
            out[who] = run_sync(who, srv.url, stream=True, timeout=0.4)
    (s, se), (o, oe) = out["sdk"], out["ours"]
    compare_streams(s, o, "stall")
    compare_errors(se, oe, "stall")


def test_retries_with_backoff_count():
    """The SDK's own backoff (no retry-after header): both send 2 requests for one 503."""
    counts, errs = {}, {}
    for who in ("sdk", "ours"):
        with LoopbackServer() as srv:
            srv.script(fx.error_reply(503, "json", headers=()), fx.replay(fx.BY_NAME["ls-content"]))
            res, errs[who] = run_sync(who, srv.url, stream=False, max_retries=1)
            counts[who] = len(srv.chat_requests())
            assert errs[who] is None and res.choices[0].message.content == "Hello"
    assert counts["sdk"] == counts["ours"] == 2


# =============================================================================
# generated chunks
# =============================================================================

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)
_num_str = st.sampled_from(["0", "2", " 3 ", "-1", "2.0", "2.5", "1e3", "abc", "", "1_000", "true"])
_scalar = st.one_of(st.none(), st.integers(-3, 300), _num_str, _text, st.booleans(), st.floats(-5, 5, allow_nan=False))


def _maybe(d: Dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Dicts with a random subset of ``d``'s keys (absent vs None both occur)."""
    return st.fixed_dictionaries({}, optional=d)


_function = _maybe({"name": st.one_of(st.none(), _text), "arguments": st.one_of(st.none(), _text, st.integers(0, 3))})
_tool_call = _maybe(
    {
        "index": st.one_of(st.integers(0, 2), _num_str, st.none()),
        "id": st.one_of(st.none(), _text),
        "type": st.sampled_from(["function", "custom", None]),
        "function": st.one_of(st.none(), _function),
    }
)
_top = _maybe({"token": st.one_of(_text, st.integers(0, 3)), "logprob": st.one_of(st.integers(-3, 0), st.floats(-3, 0), _num_str), "bytes": st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 255), _num_str), max_size=3))})
_lp = st.one_of(
    _top,
    st.builds(lambda t, tops: dict(t, top_logprobs=tops), _top, st.lists(_top, max_size=2)),
)
_delta = _maybe(
    {
        "role": st.sampled_from(["assistant", "user", "robot", None]),
        "content": st.one_of(st.none(), _text, st.integers(0, 3)),
        "refusal": st.one_of(st.none(), _text),
        "reasoning_content": _text,
        "tool_calls": st.one_of(st.none(), st.lists(_tool_call, max_size=2)),
        "function_call": st.one_of(st.none(), _function),
    }
)
_usage = _maybe(
    {
        "completion_tokens": _scalar,
        "prompt_tokens": _scalar,
        "total_tokens": _scalar,
        "prompt_tokens_details": st.one_of(st.none(), _maybe({"cached_tokens": _scalar})),
        "completion_tokens_details": st.one_of(st.none(), _maybe({"reasoning_tokens": _scalar})),
    }
)
_choice = _maybe(
    {
        "index": st.one_of(st.integers(0, 2), _num_str, st.none()),
        "delta": st.one_of(st.none(), _delta),
        "finish_reason": st.sampled_from(["stop", "length", "tool_calls", "odd", None]),
        "logprobs": st.one_of(st.none(), _maybe({"content": st.one_of(st.none(), st.lists(_lp, max_size=2)), "refusal": st.none()})),
    }
)
_chunk = _maybe(
    {
        "id": st.one_of(st.none(), _text, st.integers(0, 9)),
        "object": st.sampled_from(["chat.completion.chunk", "other"]),
        "created": _scalar,
        "model": st.one_of(st.none(), _text),
        "choices": st.one_of(st.none(), st.lists(_choice, max_size=2)),
        "system_fingerprint": st.one_of(st.none(), _text),
        "service_tier": st.sampled_from(["default", "odd", None]),
        "usage": st.one_of(st.none(), _usage),
        "timings": st.one_of(st.none(), _maybe({"predicted_n": _scalar, "x": st.none()})),
    }
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_chunk, min_size=1, max_size=4))
def test_generated_chunks_equal(chunks: List[Dict[str, Any]]):
    """Chunk sequences with random fields, built as the SDK's Stream builds them
    (``ChatCompletionChunk.construct(**data)``) and as ours does; every chunk is
    read after the one before, as a stream consumer does."""
    for i, c in enumerate(chunks):
        s = openai.types.chat.ChatCompletionChunk.construct(**json.loads(json.dumps(c)))
        o = lbt.ChatCompletionChunk._w(json.loads(json.dumps(c)))
        compare(s, o, f"chunk {i}: {c!r}")


_msg_tool = _maybe(
    {
        "id": st.one_of(st.none(), _text),
        "type": st.sampled_from(["function", "custom", "other", None]),
        "function": st.one_of(st.none(), _function),
        "custom": st.one_of(st.none(), _maybe({"name": _text, "input": st.one_of(_text, st.integers(0, 2))})),
    }
)
_message = _maybe(
    {
        "role": st.sampled_from(["assistant", "tool", None]),
        "content": st.one_of(st.none(), _text),
        "refusal": st.one_of(st.none(), _text),
        "reasoning_content": _text,
        "tool_calls": st.one_of(st.none(), st.lists(st.one_of(_msg_tool, st.integers(0, 2)), max_size=3)),
        "annotations": st.one_of(st.none(), st.lists(_maybe({"type": st.just("url_citation"), "url_citation": _maybe({"url": _text, "start_index": _scalar, "end_index": _scalar, "title": _text})}), max_size=2)),
        "audio": st.one_of(st.none(), _maybe({"id": _text, "data": _text, "expires_at": _scalar, "transcript": _text})),
        "function_call": st.one_of(st.none(), _function),
    }
)
_whole_choice = _maybe(
    {
        "index": st.one_of(st.integers(0, 2), _num_str),
        "message": st.one_of(st.none(), _message),
        "finish_reason": st.sampled_from(["stop", "length", "tool_calls", None]),
        "logprobs": st.one_of(st.none(), _maybe({"content": st.one_of(st.none(), st.lists(_lp, max_size=2))})),
    }
)
_completion = _maybe(
    {
        "id": st.one_of(st.none(), _text),
        "object": st.sampled_from(["chat.completion", "text_completion"]),
        "created": _scalar,
        "model": _text,
        "choices": st.one_of(st.none(), st.lists(_whole_choice, max_size=2)),
        "metadata": st.one_of(st.none(), st.dictionaries(_text, st.one_of(_text, st.integers(0, 2), st.none()), max_size=2)),
        "usage": st.one_of(st.none(), _usage),
        "timings": st.one_of(st.none(), _maybe({"predicted_n": _scalar})),
    }
)
_text_choice = _maybe(
    {
        "index": st.one_of(st.integers(0, 2), _num_str),
        "text": st.one_of(st.none(), _text, st.integers(0, 2)),
        "finish_reason": st.sampled_from(["stop", "length", None]),
        "logprobs": st.one_of(
            st.none(),
            _maybe(
                {
                    "tokens": st.lists(st.one_of(_text, st.integers(0, 2)), max_size=2),
                    "token_logprobs": st.lists(st.one_of(st.integers(-2, 0), st.floats(-2, 0), _num_str, st.none()), max_size=2),
                    "text_offset": st.lists(st.one_of(st.integers(0, 9), _num_str), max_size=2),
                    "top_logprobs": st.lists(st.dictionaries(_text, st.one_of(st.integers(-2, 0), _num_str), max_size=2), max_size=2),
                }
            ),
        ),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_completion, st.lists(_text_choice, max_size=2))
def test_generated_whole_bodies_equal(body: Dict[str, Any], text_choices: List[Dict[str, Any]]):
    """Whole answers (``chat.completion``, ``text_completion``) with random fields:
    the SDK's object built from the body and ours over the same JSON."""
    s = openai.types.chat.ChatCompletion.construct(**json.loads(json.dumps(body)))
    o = lbt.ChatCompletion._w(json.loads(json.dumps(body)))
    compare(s, o, f"chat.completion {body!r}")
    text = dict(body, choices=text_choices)
    s = openai.types.Completion.construct(**json.loads(json.dumps(text)))
    o = lbt.Completion._w(json.loads(json.dumps(text)))
    compare(s, o, f"text_completion {text!r}")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(_chunk.filter(lambda c: not c.get("error")), min_size=1, max_size=4))
def test_generated_streams_equal(chunks: List[Dict[str, Any]]):
    """The same, end to end: the generated chunks served to both clients."""
    body = [data(c) for c in chunks] + [fx.DONE]
    with LoopbackServer() as srv:
        srv.script(sse(body))
        s, se = run_sync("sdk", srv.url, stream=True)
        o, oe = run_sync("ours", srv.url, stream=True)
    assert se is None and oe is None, (se, oe)
    compare_streams(s, o, "generated")


# =============================================================================
# departures, pinned
# =============================================================================


def test_departure_error_line_raises():
    """An ``error:`` line (older llama-server) raises; the SDK ignores the field."""
    body = [data(fx.ls_chunk({"content": "a"})), b'error: {"code":500,"message":"oops","type":"server_error"}\n\n', fx.DONE]
    with LoopbackServer() as srv:
        srv.script(sse(body))
        s, se = run_sync("sdk", srv.url, stream=True)
        o, oe = run_sync("ours", srv.url, stream=True)
    assert se is None and len(s) == 1
    assert isinstance(oe, lbo.APIStreamError) and oe.message == "oops" and len(o) == 1


def test_departure_cut_stream_raises():
    """A stream cut before any finish (no [DONE], no finish_reason) raises; the SDK ends silently."""
    body = [data(fx.ls_chunk({"content": "a"}))]
    with LoopbackServer() as srv:
        srv.script(sse(body))
        s, se = run_sync("sdk", srv.url, stream=True)
        o, oe = run_sync("ours", srv.url, stream=True)
    assert se is None and len(s) == len(o) == 1
    assert isinstance(oe, lbo.APIConnectionError)


def test_departure_server_ignored_stream():
    """A server that answers ``stream: true`` with a whole JSON body still works for ours."""
    case = fx.BY_NAME["ls-content"]
    with LoopbackServer() as srv:
        srv.script(lambda req: raw(200, json.dumps(case.body).encode(), "application/json"))
        o, oe = run_sync("ours", srv.url, stream=False)
    assert oe is None and o.choices[0].message.content == "Hello" and o.usage.total_tokens == 11


# =============================================================================
# the real llama-server (the fixtures' shapes, checked)
# =============================================================================

#: what differs between two answers of a real server: the request's id and time, its timings
_PER_REQUEST = {"id": "per request", "created": "per request", "timings": "per request"}
REAL_REQUEST = dict(temperature=0, seed=7, max_tokens=6, logprobs=True, top_logprobs=2, extra_body={"cache_prompt": False})


def _real_pair(url: str, stream: bool, text: bool = False) -> Tuple[Any, Any]:
    extra = dict(REAL_REQUEST)
    if text:  # /v1/completions: logprobs is a count there
        extra.update(logprobs=2)
        del extra["top_logprobs"]
    out = []
    for kind in ("sdk", "ours"):
        res, err = run_sync(kind, url, text=text, stream=stream, extra=extra, timeout=120.0)
        assert err is None, err
        out.append(res)
    return out[0], out[1]


@pytest.mark.llama_server
@pytest.mark.parametrize("text", [False, True], ids=["chat", "completions"])
def test_real_server_whole_equal(idle_server, text):
    """``stream=False`` on the real server: the SDK reads its non-streamed body,
    ours assembles its stream; equal but for what differs per request."""
    s, o = _real_pair(idle_server.endpoint, stream=False, text=text)
    compare(s, o, "real whole", _PER_REQUEST)
    assert o.choices[0].logprobs and o.usage.completion_tokens == 6


@pytest.mark.llama_server
@pytest.mark.parametrize("text", [False, True], ids=["chat", "completions"])
def test_real_server_stream_equal(idle_server, text):
    s, o = _real_pair(idle_server.endpoint, stream=True, text=text)
    assert len(s) == len(o) > 3
    for i, (a, b) in enumerate(zip(s, o)):
        compare(a, b, f"real chunk {i}", _PER_REQUEST)
