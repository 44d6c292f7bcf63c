"""Properties of the whole client over a real socket: whatever the content and
however the server cuts its writes, the caller gets exactly the tokens sent."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_broker import BrokerError, ModelConfig, TransportError, chat, chat_stream, stream

from loopback import PATTERNS, LoopbackServer, events, ok, sse

MSGS = [{"role": "user", "content": "hi"}]

# Characters that stress JSON escaping, SSE line handling and UTF-8 framing.
_SPECIAL_CHARS = st.sampled_from(
    ['"', "\\", "/", "\n", "\r", "\t", "\x00", "\x01", "\x1f", "\x7f", "\u0085",
     "\u2028", "\u2029", "\ufeff", "\ufffd", "é", "中", "🦙", "\U0010ffff", ":"]
)
_SPECIAL_TOKENS = st.sampled_from(["\r\n", "\n\n", "data: ", "[DONE]", "👩\u200d💻", "\\u00e9", "\r\n\r\n"])
_CHARS = st.characters(blacklist_categories=("Cs",))  # any scalar value (no lone surrogates)
_TOKEN = st.text(st.one_of(_CHARS, _SPECIAL_CHARS), max_size=6) | _SPECIAL_TOKENS
_TOKENS = st.lists(_TOKEN, max_size=20)
_WIRE = st.fixed_dictionaries(
    {
        "pattern": st.sampled_from(PATTERNS),
        "seed": st.integers(0, 2**16),
        "gzip": st.booleans(),
        "ascii": st.booleans(),
        "ping": st.sampled_from([None, b":\n\n", b": ping\n\n"]),
        "usage": st.booleans(),
    }
)

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=False,
)


@pytest.fixture(scope="module")
def srv():
    with LoopbackServer() as s:
        yield s


@pytest.fixture(scope="module")
def cfg(srv):
    return ModelConfig(srv.url, model="m", max_retries=0, timeout_ms=15000, idle_timeout_ms=5000)


@SETTINGS
@given(tokens=_TOKENS, wire=_WIRE, api=st.sampled_from(["chat_stream", "chat", "stream"]))
def test_deltas_equal_content(srv, cfg, tokens, wire, api):
    srv.script(ok(tokens, **wire))
    want = [t for t in tokens if t]
    if api == "chat_stream":
        got = []
        res = chat_stream(cfg, MSGS, got.append)
        assert got == want
        assert res.finish_reason == "stop" and res.deltas == len(want) and res.skipped == 0
    elif api == "chat":
        assert chat(cfg, MSGS) == "".join(tokens)
    else:
        with stream(cfg, MSGS) as it:
            got = [d.content for d in it if d.content]
        assert got == want
        assert it.result is not None and it.result.finish_reason == "stop"


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(tokens=st.lists(_TOKEN, min_size=1, max_size=8), data=st.data(),
       pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 999))
def test_cut_anywhere_delivers_prefix(srv, cfg, tokens, data, pattern, seed):
    """A stream cut after any event: what was sent before the cut is delivered,
    and the call fails unless the finish chunk had arrived."""
    evs = events(tokens)  # role, tokens..., finish, [DONE]
    cut = data.draw(st.integers(0, len(evs)), label="cut")
    srv.script(sse(evs[:cut], pattern=pattern, seed=seed))
    got = []
    try:
        res = chat_stream(cfg, MSGS, got.append)
        err = None
    except BrokerError as e:
        res, err = None, e
    sent_tokens = tokens[: max(0, cut - 1)]
    assert got == [t for t in sent_tokens if t]
    finished = cut >= len(tokens) + 2  # the finish_reason chunk was sent
    if finished:
        assert err is None and res.finish_reason == "stop"
    else:
        assert isinstance(err, TransportError) and "ended early" in str(err), err
