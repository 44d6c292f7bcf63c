"""Wire fixtures for the drop-in's differential suite (test_openai_differential.py).

Each :class:`Case` is what one server answers to one request, written from
the wire formats: OpenAI's own streams and bodies, every shape llama-server
sends (current and older builds), and odd-but-legal servers. A case has the
streamed form (SSE events) and, where the comparison needs one, the
non-streamed JSON body the same server gives for the same request.

The pairing for ``stream=False``: the SDK sends ``stream: false`` and gets the
non-streamed body; the drop-in always streams underneath (``stream: true``
with ``stream_options.include_usage``) and gets the equivalent stream, that
is the events that server sends for that same answer, usage chunk included
because the drop-in asks for it. The replay handler below answers by what the
request asks, as the server would, so the two clients see one server's two
honest answers to their two requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from loopback import DONE, Reply, Request, data, raw, sse

CREATED = 1767225600

# =============================================================================
# OpenAI-shaped streams (api.openai.com)
# =============================================================================


def oai_chunk(
    delta: Dict[str, Any],
    finish: Optional[str] = None,
    *,
    index: int = 0,
    logprobs: Any = None,
    usage_null: bool = False,
) -> Dict[str, Any]:
    """One OpenAI ``chat.completion.chunk``: every choice carries ``logprobs``
    (null when not asked), every chunk ``service_tier``, ``system_fingerprint``
    and ``obfuscation``; ``usage: null`` on each chunk when usage was asked."""
    obj: Dict[str, Any] = {
        "id": "chatcmpl-oai",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_0123",
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        "obfuscation": "x1y2",
    }
    if usage_null:
        obj["usage"] = None
    return obj


def oai_usage(completion: int, prompt: int = 9) -> Dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def oai_usage_chunk(completion: int) -> Dict[str, Any]:
    obj = oai_chunk({})
    obj["choices"] = []
    obj["usage"] = oai_usage(completion)
    return obj


def oai_body(
    messages: Sequence[Dict[str, Any]],
    finishes: Sequence[str],
    completion: int,
    logprobs: Sequence[Any] = (),
) -> Dict[str, Any]:
    """OpenAI's non-streamed ``chat.completion``."""
    return {
        "id": "chatcmpl-oai",
        "object": "chat.completion",
        "created": CREATED,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": i,
                "message": dict({"role": "assistant", "refusal": None, "annotations": []}, **m),
                "logprobs": logprobs[i] if i < len(logprobs) else None,
                "finish_reason": finishes[i],
            }
            for i, m in enumerate(messages)
        ],
        "usage": oai_usage(completion),
        "service_tier": "default",
        "system_fingerprint": "fp_0123",
    }


def oai_logprob(token: str, lp: float) -> Dict[str, Any]:
    b = list(token.encode())
    return {"token": token, "logprob": lp, "bytes": b, "top_logprobs": [{"token": token, "logprob": lp, "bytes": b}]}


# =============================================================================
# llama-server shapes
# =============================================================================

TIMINGS = {
    "cache_n": 0,
    "prompt_n": 9,
    "prompt_ms": 12.5,
    "prompt_per_token_ms": 1.38,
    "prompt_per_second": 720.0,
    "predicted_n": 3,
    "predicted_ms": 40.25,
    "predicted_per_token_ms": 13.4,
    "predicted_per_second": 74.5,
}


def ls_chunk(delta: Optional[Dict[str, Any]], finish: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    """llama-server's ``chat.completion.chunk`` (no ``logprobs`` key unless asked;
    ``delta=None`` leaves the key out, as an odd server might)."""
    choice: Dict[str, Any] = {"finish_reason": finish, "index": 0}
    if delta is not None:
        choice["delta"] = delta
    obj: Dict[str, Any] = {
        "choices": [choice],
        "created": CREATED,
        "id": "chatcmpl-ls",
        "model": "smollm2",
        "system_fingerprint": "b6500-abcdef",
        "object": "chat.completion.chunk",
    }
    obj.update(extra)
    return obj


def ls_usage(completion: int, prompt: int = 9) -> Dict[str, Any]:
    return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": completion + prompt}


def ls_usage_chunk(completion: int) -> Dict[str, Any]:
    obj = ls_chunk({})
    obj["choices"] = []
    obj["usage"] = ls_usage(completion)
    obj["timings"] = dict(TIMINGS, predicted_n=completion)
    return obj


def ls_body(message: Dict[str, Any], finish: str, completion: int, **choice_extra: Any) -> Dict[str, Any]:
    """llama-server's non-streamed ``chat.completion`` (to_json_oaicompat_chat)."""
    choice = {"finish_reason": finish, "index": 0, "message": dict({"role": "assistant"}, **message)}
    choice.update(choice_extra)
    return {
        "choices": [choice],
        "created": CREATED,
        "model": "smollm2",
        "system_fingerprint": "b6500-abcdef",
        "object": "chat.completion",
        "usage": ls_usage(completion),
        "id": "chatcmpl-ls",
        "timings": dict(TIMINGS, predicted_n=completion),
    }


def ls_logprob(token: str, lp: float, tid: int) -> Dict[str, Any]:
    """llama-server's logprob entry: ``id`` (token id) and ``bytes`` beside the OpenAI fields."""
    b = list(token.encode())
    return {
        "id": tid,
        "token": token,
        "bytes": b,
        "logprob": lp,
        "top_logprobs": [{"id": tid, "token": token, "bytes": b, "logprob": lp}],
    }


# =============================================================================
# cases
# =============================================================================


@dataclass
class Case:
    """One server answer. ``events(usage)`` is the stream (``usage``: the request
    asked for ``stream_options.include_usage``); ``body`` the non-streamed JSON
    for the same answer, or None where only streaming is compared.
    ``departures`` names the documented departures this case shows in the
    ``stream=False`` comparison (paths like ``choices.0.message.annotations``)."""

    name: str
    events: Callable[[bool], List[bytes]]
    body: Optional[Dict[str, Any]] = None
    departures: Dict[str, str] = field(default_factory=dict)
    text: bool = False  # a /v1/completions case


def _stream(items: Sequence[Any], usage_items: Sequence[Any] = (), done: bool = True) -> Callable[[bool], List[bytes]]:
    def events(usage: bool) -> List[bytes]:
        out = [x if isinstance(x, bytes) else data(x) for x in items]
        if usage:
            out += [x if isinstance(x, bytes) else data(x) for x in usage_items]
        if done:
            out.append(DONE)
        return out

    return events


ANNOTATIONS = {"choices.{i}.message.annotations": "annotations: [] is only in OpenAI's non-streamed body"}


def _oai_ann(n: int = 1) -> Dict[str, str]:
    return {k.format(i=i): v for i in range(n) for k, v in ANNOTATIONS.items()}


def _oai_content() -> Case:
    toks = ["Hel", "lo", " there", "!"]
    items = [oai_chunk({"role": "assistant", "content": "", "refusal": None})]
    items += [oai_chunk({"content": t}) for t in toks]
    items.append(oai_chunk({}, "stop"))

    def events(usage: bool) -> List[bytes]:
        src = [dict(x, usage=None) for x in items] if usage else items
        return _stream(src, [oai_usage_chunk(len(toks))])(usage)

    return Case("oai-content", events, oai_body([{"content": "".join(toks)}], ["stop"], len(toks)), _oai_ann())


def _oai_n2() -> Case:
    items = []
    for i in (0, 1):
        items.append(oai_chunk({"role": "assistant", "content": "", "refusal": None}, index=i))
    items += [oai_chunk({"content": "A"}, index=0), oai_chunk({"content": "B"}, index=1)]
    items += [oai_chunk({"content": "a"}, index=0), oai_chunk({"content": "b"}, index=1)]
    items += [oai_chunk({}, "stop", index=0), oai_chunk({}, "length", index=1)]
    body = oai_body([{"content": "Aa"}, {"content": "Bb"}], ["stop", "length"], 4)
    return Case("oai-n2", _stream(items, [oai_usage_chunk(4)]), body, _oai_ann(2))


def _oai_refusal() -> Case:
    items = [oai_chunk({"role": "assistant", "content": None, "refusal": ""})]
    items += [oai_chunk({"refusal": t}) for t in ("I'm sorry,", " I can't", " help with that.")]
    items.append(oai_chunk({}, "stop"))
    body = oai_body([{"content": None, "refusal": "I'm sorry, I can't help with that."}], ["stop"], 3)
    return Case("oai-refusal", _stream(items, [oai_usage_chunk(3)]), body, _oai_ann())


def _oai_logprobs() -> Case:
    lps = [oai_logprob("Hi", -0.25), oai_logprob("!", -1.5)]
    items = [oai_chunk({"role": "assistant", "content": "", "refusal": None}, logprobs={"content": [], "refusal": []})]
    items += [oai_chunk({"content": lp["token"]}, logprobs={"content": [lp], "refusal": None}) for lp in lps]
    items.append(oai_chunk({}, "stop"))
    body = oai_body([{"content": "Hi!"}], ["stop"], 2, [{"content": lps, "refusal": None}])
    return Case("oai-logprobs", _stream(items, [oai_usage_chunk(2)]), body, _oai_ann())


def _oai_tools(n: int) -> Case:
    calls = [("call_a", "get_weather", '{"city": "Paris"}'), ("call_b", "get_time", '{"tz": "CET"}')][:n]
    items = [oai_chunk({"role": "assistant", "content": None, "refusal": None})]
    for i, (cid, name, args) in enumerate(calls):
        items.append(
            oai_chunk({"tool_calls": [{"index": i, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}]})
        )
        for piece in (args[:5], args[5:]):
            items.append(oai_chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    items.append(oai_chunk({}, "tool_calls"))
    msg = {
        "content": None,
        "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}} for cid, name, args in calls
        ],
    }
    return Case(f"oai-tools-{n}", _stream(items, [oai_usage_chunk(12)]), oai_body([msg], ["tool_calls"], 12), _oai_ann())


def _oai_json_object() -> Case:
    toks = ['{"', "answer", '":', " 42", "}"]
    items = [oai_chunk({"role": "assistant", "content": "", "refusal": None})]
    items += [oai_chunk({"content": t}) for t in toks]
    items.append(oai_chunk({}, "stop"))
    body = oai_body([{"content": "".join(toks)}], ["stop"], 5)
    return Case("oai-json-object", _stream(items, [oai_usage_chunk(5)]), body, _oai_ann())


def _oai_length() -> Case:
    items = [oai_chunk({"role": "assistant", "content": "", "refusal": None}), oai_chunk({"content": "Once upon"})]
    items.append(oai_chunk({}, "length"))
    return Case("oai-length", _stream(items, [oai_usage_chunk(2)]), oai_body([{"content": "Once upon"}], ["length"], 2), _oai_ann())


def _ls_content() -> Case:
    toks = ["Hel", "lo"]
    items = [ls_chunk({"role": "assistant", "content": None})] + [ls_chunk({"content": t}) for t in toks]
    items.append(ls_chunk({}, "stop"))
    return Case("ls-content", _stream(items, [ls_usage_chunk(2)]), ls_body({"content": "Hello"}, "stop", 2))


def _ls_timings_in_finish() -> Case:
    """A recent build: ``timings`` ride on the finish chunk too."""
    items = [ls_chunk({"role": "assistant", "content": None}), ls_chunk({"content": "Yes"})]
    items.append(ls_chunk({}, "stop", timings=dict(TIMINGS, predicted_n=1)))
    return Case("ls-timings-finish", _stream(items, [ls_usage_chunk(1)]), ls_body({"content": "Yes"}, "stop", 1))


def _ls_old_usage() -> Case:
    """An older build: usage inside the finish chunk, no separate usage chunk."""
    items = [ls_chunk({"role": "assistant", "content": None}), ls_chunk({"content": "Ok"})]
    items.append(ls_chunk({}, "stop", usage=ls_usage(1), timings=dict(TIMINGS, predicted_n=1)))
    return Case("ls-old-usage", _stream(items), ls_body({"content": "Ok"}, "stop", 1))


def _ls_reasoning() -> Case:
    items = [ls_chunk({"role": "assistant", "content": None})]
    items += [ls_chunk({"reasoning_content": t}) for t in ("Let me", " think.")]
    items += [ls_chunk({"content": t}) for t in ("4", ".")]
    items.append(ls_chunk({}, "stop"))
    body = ls_body({"content": "4.", "reasoning_content": "Let me think."}, "stop", 4)
    return Case("ls-reasoning", _stream(items, [ls_usage_chunk(4)]), body)


def _ls_tools() -> Case:
    """llama-server's tool-call deltas: id, type and name first, arguments in pieces;
    the non-streamed message has ``content: null`` (to_json_oaicompat)."""
    items = [ls_chunk({"role": "assistant", "content": None})]
    items.append(
        ls_chunk({"tool_calls": [{"index": 0, "id": "abc123", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})
    )
    for piece in ('{"city":', ' "Paris"}'):
        items.append(ls_chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    items.append(ls_chunk({}, "tool_calls"))
    msg = {
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}, "id": "abc123"}],
    }
    return Case("ls-tools", _stream(items, [ls_usage_chunk(9)]), ls_body(msg, "tool_calls", 9))


def _ls_logprobs() -> Case:
    lps = [ls_logprob("Hi", -0.5, 17), ls_logprob("\u00e9", -2.0, 233)]
    items = [ls_chunk({"role": "assistant", "content": None})]
    items += [dict(ls_chunk({"content": lp["token"]}), choices=[{"finish_reason": None, "index": 0, "delta": {"content": lp["token"]}, "logprobs": {"content": [lp]}}]) for lp in lps]
    items.append(ls_chunk({}, "stop"))
    body = ls_body({"content": "Hi\u00e9"}, "stop", 2, logprobs={"content": lps})
    return Case("ls-logprobs", _stream(items, [ls_usage_chunk(2)]), body)


def _ls_empty() -> Case:
    """Nothing generated: llama-server's non-streamed message has ``content: ""``."""
    items = [ls_chunk({"role": "assistant", "content": None}), ls_chunk({}, "stop")]
    return Case("ls-empty", _stream(items, [ls_usage_chunk(0)]), ls_body({"content": ""}, "stop", 0))


def _text_chunk(text: str, finish: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    obj = {
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "created": CREATED,
        "model": "smollm2",
        "system_fingerprint": "b6500-abcdef",
        "object": "text_completion",
        "id": "cmpl-ls",
    }
    obj.update(extra)
    return obj


def _ls_text() -> Case:
    items = [_text_chunk("Once"), _text_chunk(" upon"), _text_chunk("", "length", timings=dict(TIMINGS, predicted_n=2))]
    usage_chunk = dict(_text_chunk(""), choices=[], usage=ls_usage(2))
    body = dict(_text_chunk("Once upon", "length"), usage=ls_usage(2), timings=dict(TIMINGS, predicted_n=2))
    return Case("ls-text", _stream(items, [usage_chunk]), body, text=True)


# -- odd but legal --------------------------------------------------------------------


def _odd_no_delta() -> Case:
    items = [ls_chunk({"role": "assistant", "content": None}), ls_chunk({"content": "x"}), ls_chunk(None, "stop")]
    return Case("odd-no-delta", _stream(items))


def _odd_no_index() -> Case:
    items = [ls_chunk({"role": "assistant", "content": None})]
    items.append(ls_chunk({"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}))
    items.append(ls_chunk({}, "tool_calls"))
    return Case("odd-no-index", _stream(items))


def _odd_strings() -> Case:
    """Numbers sent as strings, floats as ints, bools for ints."""
    items = [ls_chunk({"role": "assistant", "content": None}, created=str(CREATED))]
    lp = {"token": "a", "logprob": -1, "bytes": ["97"], "top_logprobs": [{"token": "a", "logprob": "-1", "bytes": None}]}
    items.append(
        dict(ls_chunk({"content": "a"}), choices=[{"index": "0", "finish_reason": None, "delta": {"content": "a", "tool_calls": [{"index": "0", "function": {"name": "f"}}]}, "logprobs": {"content": [lp]}}])
    )
    items.append(
        ls_chunk(
            {},
            "stop",
            usage={"completion_tokens": "1", "prompt_tokens": 2.0, "total_tokens": "3", "prompt_tokens_details": {"cached_tokens": True}},
        )
    )
    items.append(ls_chunk({}, None, usage={"completion_tokens": "x", "prompt_tokens": "2", "total_tokens": 3}))
    return Case("odd-strings", _stream(items))


def _odd_extra() -> Case:
    items = [ls_chunk({"role": "assistant", "content": None, "x_extra": {"a": None}}, x_top=[1, None], nothing=None)]
    items.append(ls_chunk({"content": 5, "refusal": 3}, "weird", service_tier="odd"))
    items.append(ls_chunk({"role": "robot", "function_call": {"name": "f"}, "audio": {"id": "a", "expires_at": "9"}}))
    items.append({"choices": None, "id": None})
    items.append({})
    return Case("odd-extra", _stream(items))


def _odd_event_names() -> Case:
    """``event: delta`` names: the SDK passes their data through."""
    items = [
        b"event: delta\n" + data(ls_chunk({"role": "assistant", "content": None})),
        b"event: message\n" + data(ls_chunk({"content": "hi"})),
        b"event: delta\nid: 7\n" + data(ls_chunk({}, "stop")),
    ]
    return Case("odd-event-names", _stream(items))


def _odd_values() -> Case:
    """JSON data that is not an object: the SDK yields it as it is."""
    items = [ls_chunk({"role": "assistant", "content": None}), b"data: 5\n\n", b"data: null\n\n", b'data: ["a"]\n\n', b'data: "s"\n\n', ls_chunk({}, "stop")]
    return Case("odd-values", _stream(items))


def _odd_error_falsy() -> Case:
    """An ``error`` key that is empty is no error for the SDK: the chunk passes."""
    items = [ls_chunk({"content": "a"}, error=None), dict(ls_chunk({}, "stop"), error="")]
    return Case("odd-error-falsy", _stream(items))


CASES: List[Case] = [
    _oai_content(),
    _oai_n2(),
    _oai_refusal(),
    _oai_logprobs(),
    _oai_tools(1),
    _oai_tools(2),
    _oai_json_object(),
    _oai_length(),
    _ls_content(),
    _ls_timings_in_finish(),
    _ls_old_usage(),
    _ls_reasoning(),
    _ls_tools(),
    _ls_logprobs(),
    _ls_empty(),
    _ls_text(),
    _odd_no_delta(),
    _odd_no_index(),
    _odd_strings(),
    _odd_extra(),
    _odd_event_names(),
    _odd_values(),
    _odd_error_falsy(),
]
BY_NAME = {c.name: c for c in CASES}

# =============================================================================
# errors
# =============================================================================

ERROR_STATUSES = (400, 401, 403, 404, 409, 422, 429, 500, 503)
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable_error",
}
#: a test device, not a llama-server header: retries wait 1 ms instead of the SDK's backoff
FAST_RETRY = (("retry-after-ms", "1"),)


def error_reply(status: int, kind: str, headers: Sequence[Any] = FAST_RETRY) -> Reply:
    """An HTTP error: ``kind`` ``json`` (llama-server's envelope), ``text`` or ``empty``."""
    if kind == "json":
        body = json.dumps({"error": {"code": status, "message": f"boom {status}", "type": _TYPES[status]}}).encode()
        return raw(status, body, "application/json; charset=utf-8", headers)
    if kind == "text":
        return raw(status, f"Upstream said no ({status})".encode(), "text/plain", headers)
    return raw(status, b"", "text/plain", headers)


MID_STREAM_ERROR = {"error": {"code": 500, "message": "context shift is disabled", "type": "server_error"}}


def mid_stream_error_events() -> List[bytes]:
    """The current llama-server: an error after generation started, and the stream just ends."""
    return [data(ls_chunk({"role": "assistant", "content": None})), data(ls_chunk({"content": "partial"})), data(MID_STREAM_ERROR)]


def mid_stream_error_body() -> Reply:
    """What the same server answers to the same request without streaming: HTTP 500, the same envelope."""
    return raw(500, json.dumps(MID_STREAM_ERROR).encode(), "application/json; charset=utf-8", FAST_RETRY)


# =============================================================================
# the replay handler
# =============================================================================


def wants_usage(req: Request) -> bool:
    body = req.json if isinstance(req.json, dict) else {}
    opts = body.get("stream_options")
    return bool(body.get("stream")) and isinstance(opts, dict) and bool(opts.get("include_usage"))


def replay(case: Case) -> Callable[[Request], Reply]:
    """Answer each request as the case's server would: the stream to a
    ``stream: true`` request (with the usage chunk when asked), the body otherwise."""

    def handler(req: Request) -> Reply:
        body = req.json if isinstance(req.json, dict) else {}
        if body.get("stream"):
            return sse(case.events(wants_usage(req)))
        assert case.body is not None, f"{case.name} has no non-streamed body"
        return raw(200, json.dumps(case.body, ensure_ascii=False).encode(), "application/json")

    return handler
