"""The C fast path for the common chunk (csrc/lb_json.c, ``lb_json_chunk_content``).

Its contract is a predicate over bytes: accept exactly the payloads that the
Python decoder's short path would take (``StreamDecoder.feed``: the payload
decodes, ``obj["choices"][0]["delta"]["content"]`` is a non-empty str, the
delta has one member, ``choices[0].get("finish_reason") is None``, ``choices``
has exactly one element whose ``index`` is absent, null or the int 0, so that
the general path keeps the choices of ``n > 1`` apart; and
``choices[0].get("logprobs") is None``, so the general path carries them) minus a few
shapes it leaves to Python on purpose (top-level ``error``/``usage``/
``timings``), and return the same content string. The reference is orjson (the
decoder's own parser) plus that predicate. The C side may say no when unsure —
duplicate keys or backslashed keys in the objects on the path, nesting past
64, more than 32 members on the path, integer parts past 18 digits, numbers
that could reach 1e308 — so the reverse direction (reference accepts ⇒ C
accepts) is checked only within those limits, which are computed from the raw
text by an independent tokenizer here.

Everything is checked in both directions on generated chunks (random content
over all of Unicode and every escape form, key orders, extra members,
whitespace, the other chunk shapes) and on mutated ones (byte flips, cuts,
insertions), and the C file is built standalone with strict warnings and run
under ASan/UBSan on exactly-sized buffers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llama_broker._sse import ffi, lib

try:
    import orjson

    def ref_loads(b: bytes) -> Any:
        return orjson.loads(b)

except ImportError:  # pragma: no cover - orjson is a bench/test extra

    def _no_constants(name: str) -> Any:
        raise ValueError(name)

    def _finite(text: str) -> float:
        x = float(text)
        if x in (float("inf"), float("-inf")):
            raise ValueError("number is infinity")  # as orjson
        return x

    def _check_strings(o: Any) -> None:
        # json accepts lone surrogates (\ud800); orjson rejects them.
        if isinstance(o, str):
            o.encode("utf-8")
        elif isinstance(o, list):
            for x in o:
                _check_strings(x)
        elif isinstance(o, dict):
            for k, x in o.items():
                _check_strings(k)
                _check_strings(x)

    def ref_loads(b: bytes) -> Any:
        if b.startswith(b"\xef\xbb\xbf"):
            raise ValueError("BOM")
        obj = json.loads(b.decode("utf-8"), parse_constant=_no_constants, parse_float=_finite)
        _check_strings(obj)
        return obj


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SRC = os.path.join(CSRC, "lb_json.c")

REAL = (
    b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" world"}}],'
    b'"created":1795503215,"id":"chatcmpl-PKsV","model":"/tmp/gemma.gguf",'
    b'"system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}'
)
# Other servers: OpenAI order, logprobs, extra members.
OPENAI = (
    b'{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,'
    b'"model":"gpt-4o-mini","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,'
    b'"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"service_tier":"default"}'
)

GUARD = 16


# -- the two sides -----------------------------------------------------------

def c_call(payload: bytes) -> Tuple[int, bytes]:
    """(rc, dst bytes) from the C function; dst has a guard zone that must stay intact."""
    n = len(payload)
    dst = ffi.new("unsigned char[]", n + GUARD)
    ffi.memmove(dst + n, b"\xa5" * GUARD, GUARD)
    dst_len = ffi.new("size_t *", 0xDEAD)
    rc = lib.lb_json_chunk_content(ffi.from_buffer(payload), n, dst, dst_len)
    assert ffi.buffer(dst + n, GUARD)[:] == b"\xa5" * GUARD, "wrote past dst[n]"
    assert rc in (0, 1)
    if rc == 0:
        return 0, b""
    assert 0 < dst_len[0] <= n
    return 1, ffi.buffer(dst, dst_len[0])[:]


def c_content(payload: bytes) -> Optional[str]:
    rc, out = c_call(payload)
    return out.decode("utf-8") if rc else None  # strict: C output must be valid UTF-8


_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError)


def ref_content(payload: bytes) -> Optional[str]:
    """What the decoder's short path would emit for this payload, or None."""
    try:
        obj = ref_loads(payload)
        choices = obj["choices"]
        c0 = choices[0]
        delta = c0["delta"]
        content = delta["content"]
        if not (content.__class__ is str and content and len(delta) == 1 and c0.get("finish_reason") is None):
            return None
        index = c0.get("index")
        if len(choices) != 1 or not (index is None or (index.__class__ is int and index == 0)):
            return None  # another choice, or several: the general path keeps them apart
        if c0.get("logprobs") is not None:
            return None  # log-probabilities are carried by the general path
    except _DECODE_ERRORS:
        return None
    if any(k in obj for k in ("error", "usage", "timings")):
        return None  # left to the general path on purpose
    return content


# -- the conservative limits, from the raw text ------------------------------

class _OutOfLimits(Exception):
    pass


_TOKEN = re.compile(
    r'[ \t\n\r]*(?:("(?:[^"\\]|\\.)*")|([\[\]{}:,])|(true|false|null)'
    r"|(-?(0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE]([+-]?)([0-9]+))?))",
    re.DOTALL,
)


def _raw_tree(text: str) -> Any:
    """Parse JSON text that is known valid into ("obj", [(raw key, v)]) /
    ("arr", [v]) / ("leaf", text); raise _OutOfLimits past the C limits that
    are not about the path (depth, numbers)."""
    toks = []
    pos = 0
    while True:
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            break
        pos = m.end()
        toks.append(m)
    i = 0

    def value(depth: int) -> Any:
        nonlocal i
        m = toks[i]
        i += 1
        t = m.group(0).lstrip(" \t\n\r")
        if t in ("{", "["):
            if depth + 1 > 64:
                raise _OutOfLimits("depth")
            close = "}" if t == "{" else "]"
            items: List[Any] = []
            if toks[i].group(2) == close:
                i += 1
            else:
                while True:
                    if t == "{":
                        key = toks[i].group(1)
                        i += 2  # the key and the colon
                        items.append((key, value(depth + 1)))
                    else:
                        items.append(value(depth + 1))
                    sep = toks[i].group(2)
                    i += 1
                    if sep == close:
                        break
            return ("obj" if t == "{" else "arr", items)
        if m.group(4):
            intpart, sign, exp = m.group(5), m.group(6), m.group(7)
            digits = 0 if intpart == "0" else len(intpart)
            if digits > 18 or (exp is not None and sign != "-" and digits + int(exp) > 308):
                raise _OutOfLimits("number")
        return ("leaf", t)

    return value(0)


def _path_ok(node: Any) -> bool:
    keys = [k for k, _ in node[1]]
    return len(keys) <= 32 and len(set(keys)) == len(keys) and not any("\\" in k for k in keys)


def within_limits(payload: bytes) -> bool:
    """For a payload the reference accepts: is it inside the C side's limits?"""
    try:
        top = _raw_tree(payload.decode("utf-8"))
    except _OutOfLimits:
        return False
    if top[0] != "obj" or not _path_ok(top):
        return top[0] != "obj"
    choices = [v for k, v in top[1] if k == '"choices"']
    if not choices or choices[0][0] != "arr" or not choices[0][1] or choices[0][1][0][0] != "obj":
        return True
    c0 = choices[0][1][0]
    if not _path_ok(c0):
        return False
    deltas = [v for k, v in c0[1] if k == '"delta"']
    return not (deltas and deltas[0][0] == "obj" and not _path_ok(deltas[0]))


def check(payload: bytes) -> Optional[str]:
    """Both directions of the differential property; returns the C result."""
    got = c_content(payload)
    want = ref_content(payload)
    if got is not None:
        assert want == got, (payload, got, want)
    if want is not None and within_limits(payload):
        assert got == want, (payload, got, want)
    return got


# -- generating chunks -------------------------------------------------------

SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _u(cp: int, upper: bool) -> str:
    f = "\\u%04X" if upper else "\\u%04x"
    if cp >= 0x10000:
        cp -= 0x10000
        return f % (0xD800 + (cp >> 10)) + f % (0xDC00 + (cp & 0x3FF))
    return f % cp


def enc_string(s: str, modes: List[int]) -> str:
    """A JSON string for s, each character written raw or escaped as the
    modes say (cycled): short escapes, \\uXXXX in either case, surrogate
    pairs for astral characters, "\\/" for a slash."""
    out = ['"']
    for i, ch in enumerate(s):
        mode = modes[i % len(modes)] if modes else 0
        cp = ord(ch)
        if ch in SHORT:
            out.append(SHORT[ch] if mode < 2 else _u(cp, mode == 3))
        elif cp < 0x20:
            out.append(_u(cp, mode % 2 == 1))
        elif ch == "/" and mode == 1:
            out.append("\\/")
        elif mode >= 4:
            out.append(_u(cp, mode == 5))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class Raw(str):
    """JSON text put in as is."""


class Obj(list):
    """An object as (JSON key text, value) pairs: any order, duplicates allowed."""


class Style:
    def __init__(self, item: str, colon: str, pad: str, ascii: bool) -> None:
        self.item, self.colon, self.pad, self.ascii = item, colon, pad, ascii


def dump(v: Any, style: Style) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Obj):
        inner = style.item.join(k + style.colon + dump(x, style) for k, x in v)
        return "{" + style.pad + inner + style.pad + "}"
    if isinstance(v, dict):
        return dump(Obj((json.dumps(k, ensure_ascii=style.ascii), x) for k, x in v.items()), style)
    if isinstance(v, list):
        return "[" + style.pad + style.item.join(dump(x, style) for x in v) + style.pad + "]"
    return json.dumps(v, ensure_ascii=style.ascii, allow_nan=False)


SPECIALS = '"\\/\b\f\n\r\t\x00\x01\x1f\x7f\x80\xe9\u2028\u2029\ufeff\uffff\U0001F600\U0010FFFF '
text_st = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=24),
    st.text(st.sampled_from(SPECIALS), max_size=12),
    st.sampled_from([" world", "Hello", "\n", " caf\u00e9", "\U0001F600", "\u4e2d\u6587", "{", "\\"]),
)
modes_st = st.lists(st.integers(0, 5), max_size=6)
enc_st = st.builds(enc_string, text_st, modes_st)

RAW_NUMBERS = [
    "0", "-0", "1", "-1", "0.5", "-0.0e-0", "1E+2", "1e-400", "1.5e307", "1e308", "0e308", "0e309",
    "123456789012345678", "-123456789012345678", "1234567890123456789", "1e00000000000000000001",
    "100000000000000000e291", "100000000000000000e290", "1.0000000000000000000000001",
]
leaf_st = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**18) + 1, 10**18 - 1),
    st.integers(-(10**20), 10**20),
    st.floats(-1e300, 1e300, allow_nan=False),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8"), max_size=10),
    st.builds(Raw, enc_st),
    st.builds(Raw, st.sampled_from(RAW_NUMBERS)),
)
json_st = st.recursive(
    leaf_st,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=6), kids, max_size=4),
        st.builds(lambda k, v: Obj([(k, v), (k, v)]), enc_st, kids),  # duplicate keys off the path
    ),
    max_leaves=12,
)
deep_st = st.integers(58, 68).map(lambda d: Raw("[" * d + "]" * d))
key_st = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=8).map(json.dumps),
    st.text(st.characters(categories=("L", "N", "S")), max_size=8).map(lambda k: json.dumps(k, ensure_ascii=False)),
    st.sampled_from(['"a"', '"x-extra"', '"\\u0061"', '"index"', '"object"']),
    enc_st,
)

TOP_EXTRA = [
    ('"id"', Raw('"chatcmpl-PKsV"')),
    ('"created"', Raw("1795503215")),
    ('"model"', Raw('"/tmp/gemma.gguf"')),
    ('"object"', Raw('"chat.completion.chunk"')),
    ('"system_fingerprint"', Raw('"b0-unknown"')),
]
DELTA_KINDS = ["content"] * 20 + ["role", "reasoning", "tool_calls", "null", "empty", "number", "none", "escaped_key", "dup"]
FINISH_KINDS = ["null"] * 10 + ["absent"] * 6 + ['"stop"', '"length"', "false", "0", '""', "[]"]
TOP_KINDS = ["plain"] * 24 + ["usage", "timings", "error", "no_choices", "empty_choices", "choices_obj", "dup", "escaped_choices", "not_object", "many_keys"]


@st.composite
def chunks(draw: Any) -> bytes:
    content = draw(enc_st)
    kind = draw(st.sampled_from(DELTA_KINDS))
    delta: Obj = Obj([('"content"', Raw(content))])
    if kind == "role":
        delta.append(('"role"', Raw('"assistant"')))
    elif kind == "reasoning":
        delta = Obj([('"reasoning_content"', Raw(content))])
    elif kind == "tool_calls":
        delta.append(('"tool_calls"', [{"index": 0, "function": {"arguments": "{\"a\":"}}]))
    elif kind == "null":
        delta = Obj([('"content"', None)])
    elif kind == "empty":
        delta = Obj()
    elif kind == "number":
        delta = Obj([('"content"', 5)])
    elif kind == "escaped_key":
        delta = Obj([('"\\u0063ontent"', Raw(content))])
    elif kind == "dup":
        delta.append(('"content"', Raw(draw(enc_st))))
    delta = Obj(draw(st.permutations(delta)))

    c0: Obj = Obj([('"delta"', delta), ('"index"', Raw("0"))])
    finish = draw(st.sampled_from(FINISH_KINDS))
    if finish != "absent":
        c0.append(('"finish_reason"', Raw(finish)))
    if draw(st.booleans()):
        c0.append(('"logprobs"', draw(st.one_of(st.none(), json_st))))
    c0.extend(draw(st.lists(st.tuples(key_st, json_st), max_size=2)))
    c0 = Obj(draw(st.permutations(c0)))
    choices: List[Any] = [c0] + draw(st.lists(st.one_of(json_st, st.just(c0)), max_size=2))

    top: Obj = Obj([('"choices"', choices)] + draw(st.lists(st.sampled_from(TOP_EXTRA), unique=True)))
    top.extend(draw(st.lists(st.tuples(key_st, st.one_of(json_st, json_st, json_st, deep_st)), max_size=3)))
    tk = draw(st.sampled_from(TOP_KINDS))
    if tk == "usage":
        top.append(('"usage"', {"completion_tokens": 5, "prompt_tokens": 26, "total_tokens": 31}))
    elif tk == "timings":
        top.append(('"timings"', {"prompt_n": 26, "prompt_ms": 52.3, "predicted_per_second": 106.8}))
    elif tk == "error":
        top.append(('"error"', {"code": 500, "message": "boom", "type": "server_error"}))
    elif tk == "no_choices":
        top = Obj(kv for kv in top if kv[0] != '"choices"')
    elif tk == "empty_choices":
        top = Obj((k, [] if k == '"choices"' else v) for k, v in top)
    elif tk == "choices_obj":
        top = Obj((k, {"0": c0} if k == '"choices"' else v) for k, v in top)
    elif tk == "dup":
        top.append(draw(st.sampled_from(list(top))))
    elif tk == "escaped_choices":
        top = Obj(('"\\u0063hoices"' if k == '"choices"' else k, v) for k, v in top)
    elif tk == "many_keys":
        n = draw(st.integers(28, 36))
        top.extend(('"k%d"' % i, i) for i in range(n))
    top = Obj(draw(st.permutations(top)))

    style = draw(
        st.sampled_from(
            [Style(",", ":", "", False)] * 3
            + [Style(", ", ": ", "", False), Style(",\n  ", ": ", "\n", True), Style(" ,\t", " :\r\n", " ", True)]
        )
    )
    body = dump(choices if tk == "not_object" else top, style)
    lead, trail = draw(st.sampled_from(["", "", " ", "\n", "\r\n\t "])), draw(st.sampled_from(["", "", " \n", "\t"]))
    return (lead + body + trail).encode("utf-8")


PROFILE = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- properties ----------------------------------------------------------------

@PROFILE
@given(chunks())
@example(REAL)
@example(OPENAI)
def test_differential_generated(payload: bytes) -> None:
    check(payload)


@PROFILE
@given(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40), modes_st, st.sampled_from([REAL, OPENAI]))
def test_content_roundtrip_all_unicode_and_escapes(text: str, modes: List[int], base: bytes) -> None:
    """Real chunks with any content, written with any mix of escapes, take the fast path."""
    payload = base.replace(b'" world"', enc_string(text, modes).encode()).replace(b'"Hello"', enc_string(text, modes).encode())
    assert c_content(payload) == text
    check(payload)


_BYTE = st.one_of(st.integers(0, 255), st.sampled_from(list(b'"\\{}[],:0123456789-+eE.ntfu \t\x00\x1f\x7f\x80\xbf\xc0\xc3\xe0\xed\xf0\xf4\xff')))
_MUT = st.tuples(st.sampled_from(["flip", "set", "del", "ins", "cut", "dup"]), st.integers(0, 1 << 16), _BYTE)


def mutate(payload: bytes, ops: List[Tuple[str, int, int]]) -> bytes:
    b = bytearray(payload)
    for op, at, val in ops:
        i = at % (len(b) + 1)
        if op == "ins":
            b[i:i] = bytes([val])
        elif op == "cut":
            del b[i:]
        elif not b or i == len(b):
            continue
        elif op == "flip":
            b[i] ^= 1 << (val % 8)
        elif op == "set":
            b[i] = val
        elif op == "del":
            del b[i]
        elif op == "dup":
            b[i:i] = b[i : i + 1 + val % 8]
    return bytes(b)


@PROFILE
@given(st.one_of(chunks(), st.sampled_from([REAL, OPENAI])), st.lists(_MUT, min_size=1, max_size=4))
def test_differential_mutated(payload: bytes, ops: List[Tuple[str, int, int]]) -> None:
    check(mutate(payload, ops))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_differential_random_bytes(payload: bytes) -> None:
    check(payload)
    check(REAL[:-1] + b"," + payload + b":1}")


@pytest.mark.parametrize("base", [REAL, OPENAI, b' {"choices" : [ { "delta" : { "content" : "\\u00e9\\ud83d\\ude00" } } ] } '])
def test_every_truncation_and_single_byte_deletion(base: bytes) -> None:
    assert check(base) is not None
    for i in range(len(base.rstrip())):
        assert check(base[:i]) is None, base[:i]
        check(base[:i] + base[i + 1 :])


# -- fixed cases ---------------------------------------------------------------

def chunk(content: str = '" world"', *, finish: str = "null", top_extra: str = "", c0_extra: str = "") -> bytes:
    fin = "" if finish is None else '"finish_reason":%s,' % finish
    return (
        '{"choices":[{%s"index":0%s,"delta":{"content":%s}}],"created":1795503215,'
        '"id":"chatcmpl-PKsV","model":"/tmp/gemma.gguf"%s}' % (fin, c0_extra, content, top_extra)
    ).encode("utf-8")


ACCEPT = [
    (REAL, " world"),
    (OPENAI, "Hello"),
    (chunk(finish=None), " world"),  # finish_reason absent
    (b'{"choices":[{"delta":{"content":"x"},"finish_reason":null}]}', "x"),  # delta before finish_reason
    (b' \t\r\n{ "choices" : [ { "delta" : { "content" : "x" } } ] } \n\r\t ', "x"),
    (b'{"choices":[{"index":null,"delta":{"content":"x"}}]}', "x"),
    (chunk('"\\u0000"'), "\x00"),
    (chunk('"\x7f"'), "\x7f"),
    (chunk('"\\"\\\\\\/\\b\\f\\n\\r\\t"'), '"\\/\b\f\n\r\t'),
    (chunk('"\\u00e9\\u00E9\\u4e2d\\uFFFF"'), "\u00e9\u00e9\u4e2d\uffff"),
    (chunk('"\\uD83D\\uDE00\\ud83d\\ude00\\udbff\\udfff"'), "\U0001F600\U0001F600\U0010FFFF"),
    (chunk('"\U0001F600 caf\u00e9 \u2028\u2029 \uffff \U0010FFFF"'), "\U0001F600 caf\u00e9 \u2028\u2029 \uffff \U0010FFFF"),
    (chunk(top_extra=',"n":[0,-0,1.5,-1.5e-3,1E+2,0.0e0,123456789012345678,-123456789012345678]'), " world"),
    (chunk(top_extra=',"n":[1e307,1.5e-400,1e-99999999999999999999,0e308,100000000000000000e290]'), " world"),
    (chunk(top_extra=',"n":[true,false,null,"",{},[],{"a":{"b":[null]}}]'), " world"),
    (chunk(top_extra=',"o":{"a":1,"a":2,"\\u0061":3}'), " world"),  # duplicates off the path are fine
    (chunk(c0_extra=',"logprobs":null'), " world"),
    (chunk(top_extra=',"deep":' + "[" * 63 + "]" * 63), " world"),  # depth 64 with the top level
    (chunk(c0_extra=',"deep":' + "[" * 61 + "]" * 61), " world"),  # depth 3 + 61 = 64
    (chunk(top_extra="".join(',"k%d":0' % i for i in range(32 - 4))), " world"),  # 32 top-level keys
    (b'{"choices":[{"index":-0,"delta":{"content":"x"}}]}', "x"),
]

REJECT = [
    # log-probabilities go to the general decoder, which carries them in Delta.logprobs
    (chunk(c0_extra=',"logprobs":{"content":[{"token":" world","logprob":-0.25}]}'), "logprobs not null"),
    # not the shape
    (b"", "empty"),
    (b" \n", "whitespace only"),
    (b"[DONE]", "not JSON"),
    (b"{}", "no choices"),
    (b"[]", "top-level array"),
    (b'"x"', "top-level string"),
    (b"1", "top-level number"),
    (b'{"choices":[]}', "choices empty"),
    (b'{"choices":{"0":{"delta":{"content":"x"}}}}', "choices an object"),
    (b'{"choices":"x"}', "choices a string"),
    (b'{"choices":[[{"delta":{"content":"x"}}]]}', "choices[0] an array"),
    (b'{"choices":[null,{"delta":{"content":"x"}}]}', "choices[0] null"),
    (b'{"choices":[{"finish_reason":null}]}', "no delta"),
    (b'{"choices":[{"delta":null}]}', "delta null"),
    (b'{"choices":[{"delta":[]}]}', "delta an array"),
    (b'{"choices":[{"delta":{}}]}', "delta empty"),
    (b'{"choices":[{"delta":{"content":""}}]}', "content empty"),
    (b'{"choices":[{"delta":{"content":null}}]}', "content null"),
    (b'{"choices":[{"delta":{"content":1}}]}', "content a number"),
    (b'{"choices":[{"delta":{"content":["x"]}}]}', "content an array"),
    (b'{"choices":[{"delta":{"role":"assistant","content":"x"}}]}', "delta with role"),
    (b'{"choices":[{"delta":{"content":"x","reasoning_content":"y"}}]}', "delta with reasoning"),
    (b'{"choices":[{"delta":{"content":"x","tool_calls":[]}}]}', "delta with tool_calls"),
    (b'{"choices":[{"delta":{"reasoning_content":"y"}}]}', "reasoning only"),
    (chunk(finish='"stop"'), "finish_reason stop"),
    (chunk(finish='""'), "finish_reason empty string"),
    (chunk(finish="false"), "finish_reason false"),
    (chunk(finish="0"), "finish_reason 0"),
    (chunk(finish="{}"), "finish_reason object"),
    # several choices (n > 1): the general decoder keeps them apart
    (b'{"choices":[{"delta":{"content":"x"}},{"delta":{"content":"y"}},null,{"a":[1,{}]}]}', "two choices"),
    (b'{"choices":[{"index":0,"delta":{"content":"x"}},{"index":1,"delta":{"content":"y"}}]}', "two indexed choices"),
    (b'{"choices":[{"index":1,"delta":{"content":"y"}}]}', "choice 1"),
    (b'{"choices":[{"delta":{"content":"y"},"index":2}]}', "choice 2, index last"),
    (b'{"choices":[{"index":0.0,"delta":{"content":"y"}}]}', "index a float"),
    (b'{"choices":[{"index":0e0,"delta":{"content":"y"}}]}', "index an exponent"),
    (b'{"choices":[{"index":false,"delta":{"content":"y"}}]}', "index false"),
    (b'{"choices":[{"index":"0","delta":{"content":"y"}}]}', "index a string"),
    (b'{"choices":[{"index":00,"delta":{"content":"y"}}]}', "index 00 (not JSON)"),
    # left to Python on purpose
    (chunk(top_extra=',"usage":{"total_tokens":3}'), "usage"),
    (chunk(top_extra=',"usage":null'), "usage null"),
    (chunk(top_extra=',"timings":{"prompt_n":1}'), "timings"),
    (chunk(top_extra=',"error":{"message":"x"}'), "error"),
    # duplicate or escaped keys on the path
    (chunk(top_extra=',"id":"again"'), "duplicate top-level key"),
    (b'{"choices":[],"choices":[{"delta":{"content":"x"}}]}', "duplicate choices"),
    (chunk(c0_extra=',"index":1'), "duplicate key in choices[0]"),
    (b'{"choices":[{"delta":{"content":"x"},"delta":{"content":"y"}}]}', "duplicate delta"),
    (b'{"choices":[{"delta":{"content":"x","content":"y"}}]}', "duplicate content"),
    (b'{"choices":[{"finish_reason":null,"finish_reason":null,"delta":{"content":"x"}}]}', "duplicate finish_reason"),
    (b'{"\\u0063hoices":[{"delta":{"content":"x"}}]}', "escaped choices key"),
    (b'{"choices":[{"\\u0064elta":{"content":"x"}}]}', "escaped delta key"),
    (b'{"choices":[{"delta":{"\\u0063ontent":"x"}}]}', "escaped content key"),
    (chunk(top_extra=',"a\\nb":1'), "escaped other top-level key"),
    (chunk(top_extra="".join(',"k%d":0' % i for i in range(33 - 4))), "33 top-level keys"),
    # strings
    (chunk('"a\x01b"'), "raw control character in content"),
    (chunk('"a\nb"'), "raw newline in content"),
    (chunk('"a\tb"'), "raw tab in content"),
    (chunk(top_extra=',"x":"\x1f"'), "raw control character elsewhere"),
    (chunk('"\\x41"'), "bad escape \\x"),
    (chunk('"\\U0041"'), "bad escape \\U"),
    (chunk('"\\\'"'), "bad escape \\'"),
    (chunk('"\\u12"'), "short \\u"),
    (chunk('"\\u12G4"'), "bad hex"),
    (chunk('"\\ud800"'), "lone high surrogate"),
    (chunk('"\\ud800x"'), "high surrogate then a letter"),
    (chunk('"\\udc00"'), "lone low surrogate"),
    (chunk('"\\ude00\\ud83d"'), "reversed pair"),
    (chunk('"\\ud83d\\u0041"'), "high surrogate then a non-low \\u"),
    (chunk('"\\ud83d\\ud83d"'), "two high surrogates"),
    (chunk('"\\ud83d\\n"'), "high surrogate then a short escape"),
    (chunk('"x\\"'), "escaped closing quote, unterminated"),
    (chunk(top_extra=',"x":"\\ud800"'), "lone surrogate elsewhere"),
    (chunk(top_extra=',"\\udc00":1'), "lone surrogate in a key"),
    # numbers
    (chunk(top_extra=',"n":01'), "leading zero"),
    (chunk(top_extra=',"n":1.'), "no digit after point"),
    (chunk(top_extra=',"n":.5'), "no integer part"),
    (chunk(top_extra=',"n":-'), "bare minus"),
    (chunk(top_extra=',"n":+1'), "plus sign"),
    (chunk(top_extra=',"n":1e'), "empty exponent"),
    (chunk(top_extra=',"n":1e+'), "signed empty exponent"),
    (chunk(top_extra=',"n":0x10'), "hex"),
    (chunk(top_extra=',"n":1_0'), "underscore"),
    (chunk(top_extra=',"n":NaN'), "NaN"),
    (chunk(top_extra=',"n":Infinity'), "Infinity"),
    (chunk(top_extra=',"n":-Infinity'), "-Infinity"),
    (chunk(top_extra=',"n":1234567890123456789'), "19-digit integer (conservative)"),
    (chunk(top_extra=',"n":-1234567890123456789.5'), "19-digit integer part (conservative)"),
    (chunk(top_extra=',"n":1e308'), "could reach 1e308 (conservative)"),
    (chunk(top_extra=',"n":1e400'), "infinity"),
    (chunk(top_extra=',"n":0e309'), "exponent past 308 (conservative)"),
    # structure
    (chunk(top_extra=',"deep":' + "[" * 64 + "]" * 64), "depth 65"),
    (chunk(c0_extra=',"deep":' + "[" * 62 + "]" * 62), "depth 65 under choices[0]"),
    (REAL + b"x", "trailing garbage"),
    (REAL + b"}", "trailing brace"),
    (REAL + b" {}", "second value"),
    (REAL + b"\x00", "trailing NUL"),
    (b"\xef\xbb\xbf" + REAL, "BOM"),
    (b"\x0c" + REAL, "form feed is not JSON whitespace"),
    (REAL.replace(b'"index":0,', b'"index":0,,'), "double comma"),
    (REAL.replace(b'}],', b',}],'), "trailing comma in object"),
    (REAL.replace(b'}],', b'},],'), "trailing comma in array"),
    (REAL.replace(b'"created":', b'"created"'), "missing colon"),
    (REAL.replace(b'"created":', b'created:'), "unquoted key"),
    (REAL.replace(b'"created":', b"'created':"), "single quotes"),
    (REAL.replace(b"null", b"nul"), "short literal"),
    (REAL.replace(b"null", b"Null"), "capital literal"),
    (REAL.replace(b"null", b"None"), "Python literal"),
    (REAL.replace(b"]", b"}"), "mismatched bracket"),
    (REAL.replace(b",", b" ", 1), "missing comma"),
]
# Invalid UTF-8 must be raw bytes.
BAD_UTF8 = [
    (b"\xff", "0xFF"),
    (b"\x80", "stray continuation"),
    (b"\xc3", "truncated 2-byte"),
    (b"\xc3(", "bad continuation"),
    (b"\xc0\x80", "overlong NUL"),
    (b"\xc1\xbf", "overlong 2-byte"),
    (b"\xe0\x80\x80", "overlong 3-byte"),
    (b"\xe0\x9f\xbf", "overlong 3-byte (max)"),
    (b"\xed\xa0\x80", "UTF-8 encoded surrogate"),
    (b"\xed\xbf\xbf", "UTF-8 encoded low surrogate"),
    (b"\xf0\x80\x80\x80", "overlong 4-byte"),
    (b"\xf0\x8f\xbf\xbf", "overlong 4-byte (max)"),
    (b"\xf4\x90\x80\x80", "above U+10FFFF"),
    (b"\xf5\x80\x80\x80", "F5"),
    (b"\xf0\x9f\x98", "truncated 4-byte"),
    (b"\xe2\x82", "truncated 3-byte"),
]
for _bad, _why in BAD_UTF8:
    REJECT.append((REAL.replace(b" world", b"w" + _bad + b"x"), "content: " + _why))
    REJECT.append((REAL.replace(b"/tmp/gemma.gguf", _bad + b"abcdefghijklmnop"), "model: " + _why))
    REJECT.append((REAL.replace(b'"created"', b'"cr' + _bad + b'"'), "key: " + _why))
    REJECT.append((REAL.replace(b" world", b"w" + _bad), "content end: " + _why))


@pytest.mark.parametrize("payload,want", ACCEPT, ids=[str(i) for i in range(len(ACCEPT))])
def test_accepts(payload: bytes, want: str) -> None:
    assert c_content(payload) == want
    assert ref_content(payload) == want
    assert within_limits(payload)


@pytest.mark.parametrize("payload,why", REJECT, ids=[w for _, w in REJECT])
def test_rejects(payload: bytes, why: str) -> None:
    assert c_call(payload)[0] == 0
    check(payload)


def test_conservative_rejections_are_valid_for_orjson() -> None:
    """These are rejected on purpose although the reference takes them: the
    limits really are conservative, not accidental."""
    for payload in [
        chunk(top_extra=',"n":1234567890123456789'),
        chunk(top_extra=',"n":1e308'),
        chunk(top_extra=',"id":"again"'),
        b'{"choices":[{"delta":{"\\u0063ontent":"x"}}]}',
        chunk(top_extra=',"deep":' + "[" * 64 + "]" * 64),
    ]:
        assert ref_content(payload) is not None
        assert not within_limits(payload)
        assert c_content(payload) is None


def test_null_and_empty_inputs() -> None:
    n = ffi.new("size_t *")
    dst = ffi.new("unsigned char[]", 1)
    assert lib.lb_json_chunk_content(ffi.NULL, 0, dst, n) == 0
    assert lib.lb_json_chunk_content(b"x", 0, dst, n) == 0


def test_constants_in_cdef() -> None:
    assert (lib.LB_JSON_MAX_DEPTH, lib.LB_JSON_MAX_KEYS, lib.LB_JSON_MAX_INT_DIGITS) == (64, 32, 18)


def test_long_content() -> None:
    text = ("caf\u00e9 \U0001F600 \"q\" \\ " * 5000)
    payload = REAL.replace(b'" world"', json.dumps(text).encode())
    assert c_content(payload) == text
    payload = REAL.replace(b'" world"', json.dumps(text, ensure_ascii=False).encode())
    assert c_content(payload) == text


# -- strict build and sanitizers --------------------------------------------

STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-Wconversion", "-Wshadow", "-pedantic"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]

# Reads records [u32 little-endian length][bytes] from stdin; each input goes
# into an exactly-sized malloc'd buffer (so ASan sees any read past it), dst
# into another exactly-sized one; prints "rc len hex" per input.
DRIVER = r"""
#include "lb_json.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void)
{
    unsigned char hdr[4];
    unsigned long count = 0;
    while (fread(hdr, 1, 4, stdin) == 4) {
        size_t n = (size_t)hdr[0] | (size_t)hdr[1] << 8 | (size_t)hdr[2] << 16 | (size_t)hdr[3] << 24;
        unsigned char *in = malloc(n ? n : 1), *dst = malloc(n ? n : 1);
        size_t len = 0, i;
        int rc;
        if (in == NULL || dst == NULL || fread(in, 1, n, stdin) != n)
            return 2;
        rc = lb_json_chunk_content(in, n, dst, &len);
        printf("%d", rc);
        if (rc == 1) {
            if (len > n)
                return 3;
            printf(" ");
            for (i = 0; i < len; i++)
                printf("%02x", dst[i]);
        }
        printf("\n");
        free(in);
        free(dst);
        count++;
    }
    fprintf(stderr, "%lu inputs\n", count);
    return 0;
}
"""


def _missing(what: str) -> None:
    """clang is installed by .ci/run, so under CI a missing clang fails; on a
    developer machine without it the clang variants are skipped (gcc still runs)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI installs clang and libclang-rt-14-dev: see .ci/run)")
    pytest.skip(f"{what}: install clang and libclang-rt-14-dev to run the clang variants")


def _compiler(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if name == "gcc":
            pytest.fail("gcc is needed to build the C fast path")
        _missing(f"{name} not installed")
    return path


@pytest.mark.parametrize("cc", ["gcc", "clang"])
@pytest.mark.parametrize("opt", ["-O0", "-O2"])
def test_strict_warnings(cc: str, opt: str, tmp_path: Any) -> None:
    res = subprocess.run(
        [_compiler(cc), *STRICT, opt, "-I", CSRC, "-c", SRC, "-o", str(tmp_path / "lb_json.o")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert res.returncode == 0, res.stderr


def test_header_compiles_alone(tmp_path: Any) -> None:
    src = tmp_path / "h.c"
    src.write_text('#include "lb_json.h"\nint main(void) { return LB_JSON_MAX_DEPTH == 64 ? 0 : 1; }\n')
    res = subprocess.run([_compiler("gcc"), *STRICT, "-I", CSRC, str(src), "-o", str(tmp_path / "h")], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def _sanitizer_inputs() -> List[bytes]:
    rng = random.Random(20240611)
    bases = [REAL, OPENAI] + [p for p, _ in ACCEPT] + [p for p, _ in REJECT]
    inputs = list(bases)
    for b in [REAL, OPENAI, ACCEPT[10][0], ACCEPT[11][0], ACCEPT[16][0]]:
        inputs.extend(b[:i] for i in range(len(b)))  # every prefix, exact size: any over-read shows
        inputs.extend(b[i:] for i in range(1, len(b)))
    for _ in range(3000):
        b = rng.choice(bases)
        ops = [(rng.choice(["flip", "set", "del", "ins", "cut", "dup"]), rng.randrange(1 << 16), rng.randrange(256)) for _ in range(rng.randint(1, 3))]
        inputs.append(mutate(b, ops))
    return inputs


@pytest.mark.parametrize("variant", [[], ["-DLB_JSON_NO_CTZ"]], ids=["ctz", "bytewise"])
@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_driver_under_sanitizers(cc: str, variant: List[str], tmp_path: Any) -> None:
    exe = _compiler(cc)
    drv = tmp_path / "drv.c"
    drv.write_text(DRIVER)
    out = tmp_path / "drv"
    res = subprocess.run(
        [exe, *STRICT, *variant, "-g", "-O1", *SANITIZE, "-I", CSRC, str(drv), SRC, "-o", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if res.returncode != 0 and cc == "clang" and "cannot find" in res.stderr:
        _missing("clang's sanitizer runtime is not installed: " + res.stderr.strip()[-200:])
    assert res.returncode == 0, res.stderr
    inputs = _sanitizer_inputs()
    stdin = b"".join(struct.pack("<I", len(b)) + b for b in inputs)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    run = subprocess.run([str(out)], check=False, input=stdin, capture_output=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-3000:]
    lines = run.stdout.decode().splitlines()
    assert len(lines) == len(inputs)
    accepted = 0
    for b, line in zip(inputs, lines):
        rc, out_bytes = c_call(b)  # the cffi build agrees with the sanitized one
        assert line == ("1 " + out_bytes.hex() if rc else "0"), b
        accepted += rc
    assert accepted > 50
