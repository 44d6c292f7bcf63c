"""ModelConfig and request validation: bad input fails before any I/O."""

from __future__ import annotations

import json

import pytest

import llama_broker
from llama_broker import ConfigError, ModelConfig
from llama_broker.broker import _encode_body, validate_messages

# A port nothing listens on: if validation let a request through, it would
# fail with a TransportError instead of the ConfigError asserted below.
DEAD = "http://127.0.0.1:9"


def test_endpoint_forms() -> None:
    for ep in ["http://h:1", "http://h:1/", "http://h:1//", "http://h:1/v1", "http://h:1/v1/chat/completions"]:
        cfg = ModelConfig(ep)
        assert cfg.url == "http://h:1/v1/chat/completions", ep
        assert cfg.base_url == "http://h:1"


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"endpoint": ""}, "endpoint"),
        ({"endpoint": "ftp://x"}, "endpoint"),
        ({"endpoint": "http://x", "timeout_ms": 0}, "timeout_ms"),
        ({"endpoint": "http://x", "idle_timeout_ms": -1}, "idle_timeout_ms"),
        ({"endpoint": "http://x", "max_event_bytes": True}, "max_event_bytes"),
        ({"endpoint": "http://x", "max_retries": -1}, "max_retries"),
        ({"endpoint": "http://x", "temperature": "hot"}, "temperature"),
        ({"endpoint": "http://x", "headers": {"X": "a\r\nInjected: 1"}}, "headers"),
        ({"endpoint": "http://x", "params": {"stream": False}}, "stream"),
    ],
)
def test_bad_config_names_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kw)


@pytest.mark.parametrize(
    "messages, where",
    [
        ("hello", "list"),
        ([], "empty"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\]"),
        ([{"content": "a"}], r"messages\[0\]\['role'\]"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\]"),
    ],
)
def test_bad_messages_name_the_item_and_do_no_io(messages: object, where: str) -> None:
    cfg = ModelConfig(DEAD, max_retries=0)
    with pytest.raises(ConfigError, match=where):
        llama_broker.chat(cfg, messages)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=where):
        validate_messages(messages)


def test_tool_call_message_without_content_is_valid() -> None:
    validate_messages([{"role": "assistant", "tool_calls": [{"id": "1"}]}, {"role": "tool", "content": "x"}])


def test_body_is_json_with_stream_forced_and_params_passed_through() -> None:
    cfg = ModelConfig(DEAD, model="m", temperature=0.5, params={"top_k": 5, "cache_prompt": True})
    body = json.loads(_encode_body(cfg, [{"role": "user", "content": 'q"\u2028é'}], {"top_k": 7, "n_probs": 2}))
    assert body == {
        "model": "m",
        "temperature": 0.5,
        "top_k": 7,
        "cache_prompt": True,
        "n_probs": 2,
        "messages": [{"role": "user", "content": 'q"\u2028é'}],
        "stream": True,
    }


def test_stream_param_and_unencodable_params_are_config_errors() -> None:
    cfg = ModelConfig(DEAD)
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ConfigError, match="stream"):
        _encode_body(cfg, msgs, {"stream": False})
    with pytest.raises(ConfigError, match="'json_schema'"):
        _encode_body(cfg, msgs, {"json_schema": object()})
    with pytest.raises(ConfigError, match="'seed'"):
        _encode_body(cfg, msgs, {"seed": float("nan")})
    with pytest.raises(ConfigError, match="'messages'"):
        _encode_body(cfg, [{"role": "user", "content": "\ud800"}], {})


def test_key_is_read_from_env_and_never_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LB_TEST_KEY", "sk-secret-value")
    cfg = ModelConfig(DEAD, key_env="LB_TEST_KEY")
    assert cfg.api_key() == "sk-secret-value"
    assert "sk-secret-value" not in repr(cfg)
    monkeypatch.setenv("LB_TEST_KEY", "")
    assert cfg.api_key() is None
    monkeypatch.delenv("LB_TEST_KEY")
    assert cfg.api_key() is None


def test_public_names() -> None:
    for name in ["ModelConfig", "chat", "chat_stream", "stream", "Broker", "Delta", "StreamResult", "EventSplitter", "Event"]:
        assert hasattr(llama_broker, name)
    err = llama_broker.APIError("m", status=400)
    assert isinstance(err, llama_broker.BrokerError) and str(err).startswith("api: ")
    assert str(llama_broker.TransportError("x")).startswith("transport: ")
    assert issubclass(llama_broker.ConnectError, llama_broker.TransportError)
    assert issubclass(llama_broker.TimeoutError_, llama_broker.TransportError)
