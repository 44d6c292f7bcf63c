"""Credentials stay where they belong.

* ``key_env``'s value and ``ModelConfig.headers`` cannot smuggle a header in
  (CR/LF/NUL, a name with ``:``): a ``ConfigError`` naming the variable or the
  header, never the value, before any I/O; a key read from a file loses its
  trailing newline.
* Reprs, ``map()``'s log lines and ``MapResult.endpoint`` mask them.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import pytest

from llama_broker import Broker, ConfigError, ModelConfig, chat, stream
from llama_broker.openai import OpenAI

from loopback import LoopbackServer, api_error, ok

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


def test_map_logs_and_results_mask_url_credentials(srv, caplog):
    password = "pw-" + "7q" * 6
    with LoopbackServer() as other:
        srv.script(api_error(503, "Loading model", "unavailable_error"))
        other.script(ok(["mapped"]))
        eps = [u.replace("http://", f"http://alice:{password}@") for u in (srv.url, other.url)]
        cfg = ModelConfig(eps[0], model="m", max_retries=1, retry_backoff_ms=10, timeout_ms=15000)
        with caplog.at_level(logging.WARNING, logger="llama_broker"), Broker(cfg) as b:
            results = list(b.map([{"messages": MSGS}], endpoints=eps, progress=False))
        (r,) = results
        assert r.ok and r.text == "mapped"
        assert r.endpoint == other.url.replace("http://", "http://***@")
        assert any("map: request 0 failed" in rec.getMessage() for rec in caplog.records)
        assert password not in caplog.text and "alice" not in caplog.text
        assert srv.chat_requests()[0].headers.get("authorization", "").startswith("Basic ")  # the credentials were used
