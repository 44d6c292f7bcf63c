"""Credentials stay where they belong.

* ``key_env``'s value and ``ModelConfig.headers`` cannot smuggle a header in
  (CR/LF/NUL, a name with ``:``): a ``ConfigError`` naming the variable or the
  header, never the value, before any I/O; a key read from a file loses its
  trailing newline.
* With ``follow_redirects`` no secret header (the key, ``Authorization``,
  ``X-Api-Key``, ``Api-Key``, ``Proxy-Authorization``) reaches another scheme,
  host or port; a same-origin redirect keeps them.
* Reprs, ``map()``'s log lines and ``MapResult.endpoint`` mask them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List

import pytest

from llama_broker import APIError, Broker, ConfigError, ModelConfig, TransportError, chat, stream
from llama_broker.openai import OpenAI

from loopback import CHAT_PATH, LoopbackServer, api_error, ok, redirect

MSGS = [{"role": "user", "content": "hi"}]
KEY_ENV = "LLAMA_BROKER_SECRETS_KEY"
KEY = "sk-secret-" + "5e1f" * 6
HEADER_SECRETS = {
    "Authorization": "Bearer hdr-auth-" + "a1" * 8,
    "X-Api-Key": "xkey-" + "b2" * 8,
    "Api-Key": "apikey-" + "c3" * 8,
    "Proxy-Authorization": "Basic prx-" + "d4" * 8,
}


def _secret_values() -> List[str]:
    return [KEY] + list(HEADER_SECRETS.values())


@pytest.fixture
def srv():
    with LoopbackServer() as s:
        yield s


def cfg_for(srv: LoopbackServer, **kw: Any) -> ModelConfig:
    base: Dict[str, Any] = dict(model="m", max_retries=0, timeout_ms=15000, idle_timeout_ms=5000)
    base.update(kw)
    return ModelConfig(srv.url, **base)


# ------------------------------------------------- key_env and headers ----
def test_a_key_with_a_line_break_is_refused_before_any_request(srv, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY + "\r\nX-Injected: yes")
    with pytest.raises(ConfigError) as ei:
        chat(cfg_for(srv, key_env=KEY_ENV), MSGS)
    assert KEY_ENV in str(ei.value)
    assert KEY not in str(ei.value) and "Injected" not in str(ei.value)
    assert srv.requests == []
    with pytest.raises(ConfigError):
        stream(cfg_for(srv, key_env=KEY_ENV), MSGS)
    assert srv.requests == []


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_a_key_read_from_a_file_loses_its_trailing_newline(srv, monkeypatch, tmp_path, ending):
    path = tmp_path / "key.txt"
    path.write_bytes((KEY + ending).encode())
    monkeypatch.setenv(KEY_ENV, path.read_bytes().decode())  # as a program reads it (a shell $(cat) would drop the newline)
    assert chat(cfg_for(srv, key_env=KEY_ENV), MSGS) == "Hello"
    (req,) = srv.chat_requests()
    assert req.headers["authorization"] == f"Bearer {KEY}"
    # on the wire: the key, then the line's CRLF (no stray LF, no early blank line)
    assert f"Authorization: Bearer {KEY}\r\n".encode() in req.raw_head
    assert req.raw_head.count(b"\n") == req.raw_head.count(b"\r\n")
    assert req.raw_head.endswith(b"\r\n\r\n") and req.raw_head.count(b"\r\n\r\n") == 1
    assert req.json is not None and req.json["messages"] == MSGS  # the body was read whole


def test_a_nul_in_a_header_value_is_a_config_error_at_construction(srv):
    with pytest.raises(ConfigError) as ei:
        cfg_for(srv, headers={"X-Api-Key": "abc\x00def"})
    assert "X-Api-Key" in str(ei.value) and "abc" not in str(ei.value)


@pytest.mark.parametrize("name", ["X-Trace: injected", "Authorization: Bearer " + KEY, "X Trace", "", "X-Trace\r\n"])
def test_a_header_name_must_be_an_http_token(srv, name):
    with pytest.raises(ConfigError) as ei:
        cfg_for(srv, headers={name: "v"})
    assert KEY not in str(ei.value)


def test_headers_changed_after_construction_are_checked_before_sending(srv):
    headers = {"X-Trace": "ok"}
    cfg = cfg_for(srv, headers=headers)
    headers["X-Trace"] = "a\r\nX-Injected: yes"
    with pytest.raises(ConfigError):
        chat(cfg, MSGS)
    assert srv.requests == []


def test_the_drop_in_refuses_bad_keys_and_headers_before_any_request(srv):
    base = srv.url + "/v1"
    for kw in (
        dict(api_key=KEY + "\r\nX-Injected: yes"),
        dict(api_key="sk-x", default_headers={"X-Api-Key": "a\x00b"}),
        dict(api_key="sk-x", default_headers={"X-Trace: injected": "v"}),
    ):
        with pytest.raises(ConfigError) as ei:
            OpenAI(base_url=base, **kw)
        assert KEY not in str(ei.value)
    client = OpenAI(base_url=base, api_key="sk-x")
    with pytest.raises(ConfigError):
        client.chat.completions.create(model="m", messages=MSGS, extra_headers={"X-Trace": "a\x00b"})
    assert srv.requests == []


# ---------------------------------------------------------- redirects ----
def _run(api: str, cfg: ModelConfig) -> str:
    if api == "chat":
        return chat(cfg, MSGS)
    if api == "achat":  # the asyncio engine
        async def main() -> str:
            with Broker() as b:
                return await asyncio.wait_for(b.achat(MSGS, cfg=cfg), 20)

        return asyncio.run(main())
    with stream(cfg, MSGS) as s:
        return "".join(d.content or "" for d in s)


@pytest.mark.parametrize("api", ["chat", "stream", "achat"])
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_cross_origin_redirect_carries_no_secret(srv, monkeypatch, api, status):
    monkeypatch.setenv(KEY_ENV, KEY)
    with LoopbackServer() as other:  # another port: another origin
        srv.script(redirect(other.url + CHAT_PATH, status))
        other.script(ok(["moved"]))
        cfg = cfg_for(srv, follow_redirects=True, key_env=KEY_ENV, headers={**HEADER_SECRETS, "X-Trace": "t1"})
        assert _run(api, cfg) == "moved"
        (first,) = srv.chat_requests()
        assert first.headers["x-api-key"] == HEADER_SECRETS["X-Api-Key"]
        (second,) = other.chat_requests()
        assert second.method == "POST" and second.json == first.json
        assert second.headers["x-trace"] == "t1"  # other headers do follow
        for name in ("authorization", "x-api-key", "api-key", "proxy-authorization"):
            assert name not in second.headers, name
        wire = repr(second.raw_headers) + repr(second.path)
        assert not any(sec in wire for sec in _secret_values())


@pytest.mark.parametrize("api", ["chat", "stream", "achat"])
def test_a_same_origin_redirect_keeps_the_secrets(srv, monkeypatch, api):
    monkeypatch.setenv(KEY_ENV, KEY)
    srv.script(redirect(CHAT_PATH + "?hop=2", 307), ok(["same"]))
    cfg = cfg_for(srv, follow_redirects=True, key_env=KEY_ENV, headers={"X-Api-Key": HEADER_SECRETS["X-Api-Key"]})
    assert _run(api, cfg) == "same"
    first, second = srv.chat_requests()
    assert second.path == CHAT_PATH + "?hop=2"
    for req in (first, second):
        assert req.headers["authorization"] == f"Bearer {KEY}"
        assert req.headers["x-api-key"] == HEADER_SECRETS["X-Api-Key"]


def test_a_redirect_back_to_the_configured_origin_regains_the_secrets(srv, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with LoopbackServer() as other:
        srv.script(redirect(other.url + CHAT_PATH, 302), ok(["back"]))
        other.script(redirect(srv.url + CHAT_PATH, 302))
        assert chat(cfg_for(srv, follow_redirects=True, key_env=KEY_ENV), MSGS) == "back"
        assert "authorization" not in other.chat_requests()[0].headers
        assert srv.chat_requests()[1].headers["authorization"] == f"Bearer {KEY}"


def test_redirects_are_bounded_and_not_followed_by_default(srv):
    srv.script(redirect(CHAT_PATH, 302))
    with pytest.raises(TransportError, match="too many redirects"):
        chat(cfg_for(srv, follow_redirects=True), MSGS)
    assert len(srv.chat_requests()) == 6  # the request and 5 redirects
    with pytest.raises(APIError) as ei:
        chat(cfg_for(srv), MSGS)
    assert ei.value.status == 302


# ------------------------------------------------------ reprs and logs ----
def test_model_config_repr_masks_secret_headers_and_url_credentials(srv):
    cfg = ModelConfig("http://alice:pw-" + "9z" * 6 + "@127.0.0.1:9", headers={**HEADER_SECRETS, "X-Trace": "t1"})
    text = repr(cfg)
    assert not any(sec in text for sec in _secret_values())
    assert "pw-" not in text and "alice" not in text
    assert "'X-Trace': 't1'" in text and "'X-Api-Key': '***'" in text and "***@127.0.0.1:9" in text


def test_broker_repr_masks_secrets(srv):
    cfg = ModelConfig("http://alice:pw-" + "9z" * 6 + "@127.0.0.1:9", headers=HEADER_SECRETS)
    with Broker(cfg) as b:
        text = repr(b)
    assert not any(sec in text for sec in _secret_values()) and "pw-" not in text


def _map_with_credentials(srv: LoopbackServer, password: str) -> Any:
    """map() over two user:pass@ endpoints; the first answers 503 (a warning
    line, and the request goes to the second)."""
    with LoopbackServer() as other:
        srv.script(api_error(503, "Loading model", "unavailable_error"))
        other.script(ok(["mapped"]))
        eps = [u.replace("http://", f"http://alice:{password}@") for u in (srv.url, other.url)]
        cfg = ModelConfig(eps[0], model="m", max_retries=1, retry_backoff_ms=10, timeout_ms=15000)
        with Broker(cfg) as b:
            (r,) = list(b.map([{"messages": MSGS}], endpoints=eps, progress=False))
        assert r.ok and r.text == "mapped"
        assert srv.chat_requests()[0].headers.get("authorization", "").startswith("Basic ")  # they were used
        return r, other.url


def test_map_log_lines_mask_url_credentials(srv, caplog):
    password = "pw-" + "7q" * 6
    with caplog.at_level(logging.WARNING, logger="llama_broker"):
        _map_with_credentials(srv, password)
    assert any("map: request 0 failed on http://***@127.0.0.1:" in rec.getMessage() for rec in caplog.records)
    assert password not in caplog.text and "alice" not in caplog.text


def test_map_result_endpoint_masks_url_credentials(srv):
    r, other_url = _map_with_credentials(srv, "pw-" + "8r" * 6)
    assert r.endpoint == other_url.replace("http://", "http://***@")
