"""llama-server's plain JSON endpoints: models, health, props, slots, tokenize, detokenize."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Union

from ..broker import Broker, default_broker
from ..config import ModelConfig
from ..decoder import JSONBody
from ..errors import ConfigError, ProtocolError
from ..policy import encode_body
from ._calls import _url

# =============================================================================
# plain JSON endpoints
# =============================================================================


def _json(
    cfg: ModelConfig,
    method: str,
    path: str,
    body: Any = None,
    *,
    broker: Optional[Broker] = None,
    retries: Optional[int] = None,
) -> Any:
    b = broker or default_broker()
    if retries is not None and retries != cfg.max_retries:
        cfg = replace(cfg, max_retries=retries)
    data = encode_body(body) if body is not None else None
    dec = JSONBody()
    b.perform(cfg, data, lambda t0: dec, url=_url(cfg, path), method=method, streaming=False)
    return dec.value


def models(cfg: ModelConfig, *, broker: Optional[Broker] = None) -> List[Dict[str, Any]]:
    """``GET /v1/models``: the list of model objects (``id``, ``owned_by``, ``meta`` …)."""
    body = _json(cfg, "GET", "/v1/models", broker=broker)
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        return body["data"]
    raise ProtocolError(f"/v1/models answered without a data list: {str(body)[:200]!r}")


def health(cfg: ModelConfig, *, broker: Optional[Broker] = None) -> Dict[str, Any]:
    """``GET /health``: ``{"status": "ok"}`` when ready. While the model loads the
    server answers 503, raised as :class:`APIError` at once (no retries)."""
    body = _json(cfg, "GET", "/health", broker=broker, retries=0)
    return body if isinstance(body, dict) else {"status": body}


def props(cfg: ModelConfig, *, broker: Optional[Broker] = None) -> Dict[str, Any]:
    """``GET /props``: the server's settings (``default_generation_settings``,
    ``total_slots``, ``chat_template``, ``model_path`` …)."""
    body = _json(cfg, "GET", "/props", broker=broker)
    if not isinstance(body, dict):
        raise ProtocolError(f"/props answered with {type(body).__name__}, not an object")
    return body


def slots(cfg: ModelConfig, *, broker: Optional[Broker] = None) -> List[Dict[str, Any]]:
    """``GET /slots``: one object per slot (``id``, ``is_processing``, ``n_ctx`` …).
    A server started with ``--no-slots`` answers 501, raised as :class:`APIError`."""
    body = _json(cfg, "GET", "/slots", broker=broker)
    if not isinstance(body, list):
        raise ProtocolError(f"/slots answered with {type(body).__name__}, not a list")
    return body


def tokenize(
    cfg: ModelConfig,
    content: str,
    *,
    add_special: bool = False,
    with_pieces: bool = False,
    broker: Optional[Broker] = None,
) -> Union[List[int], List[Dict[str, Any]]]:
    """``POST /tokenize``: the token ids of ``content`` (with ``with_pieces``,
    ``[{"id", "piece"}, …]``)."""
    if not isinstance(content, str):
        raise ConfigError(f"tokenize() takes a string, got {type(content).__name__}")
    body = _json(
        cfg,
        "POST",
        "/tokenize",
        {"content": content, "add_special": add_special, "with_pieces": with_pieces},
        broker=broker,
    )
    if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
        raise ProtocolError(f"/tokenize answered without a tokens list: {str(body)[:200]!r}")
    return body["tokens"]


def detokenize(cfg: ModelConfig, tokens: Sequence[int], *, broker: Optional[Broker] = None) -> str:
    """``POST /detokenize``: the text of ``tokens``."""
    toks = list(tokens)
    if any(not isinstance(t, int) or isinstance(t, bool) for t in toks):
        raise ConfigError("detokenize() takes a list of int token ids")
    body = _json(cfg, "POST", "/detokenize", {"tokens": toks}, broker=broker)
    if not isinstance(body, dict) or not isinstance(body.get("content"), str):
        raise ProtocolError(f"/detokenize answered without content: {str(body)[:200]!r}")
    return body["content"]
