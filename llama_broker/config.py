"""ModelConfig: where to send requests and how to treat them."""

from __future__ import annotations

import os
import string
import warnings
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .sse import DEFAULT_MAX_EVENT_BYTES

__all__ = ["ModelConfig", "SECRET_HEADERS", "check_header", "endpoint_configs", "mask_headers", "mask_url"]

_CHAT_PATH = "/v1/chat/completions"

#: Request headers (lower-case names) whose values are credentials: masked in
#: reprs and errors, and never sent to another origin on a redirect.
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "proxy-authorization", "api-key"})
#: The smallest bound of a plain (non-streamed) 2xx body: a JSON answer such as
#: the embeddings of many long inputs runs to hundreds of MB, while
#: ``max_event_bytes`` bounds one server-sent event.
MIN_JSON_BODY_BYTES = 512 * 1024 * 1024

# RFC 9110 token characters (a header name).
_TCHAR = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
_BREAKS = ("\r", "\n", "\0")


def mask_url(url: str) -> str:
    """``url`` with credentials embedded in it (``user:pass@``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL we can take apart: show nothing of it past the scheme
        return url.split("://", 1)[0] + "://***" if "@" in url else url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def mask_headers(headers: Mapping[str, str]) -> Dict[str, str]:
    """A copy of ``headers`` with the values of :data:`SECRET_HEADERS` as ``***``."""
    return {k: ("***" if str(k).lower() in SECRET_HEADERS else v) for k, v in headers.items()}


def check_header(name: object, value: object, where: str = "ModelConfig.headers") -> None:
    """Raise :class:`ConfigError` unless ``name`` is an HTTP token and ``value`` an
    ASCII string without CR, LF or NUL (which would end the header line early
    or inject another one). The message never shows the value."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: a header name must be a non-empty string, got {type(name).__name__}")
    for i, ch in enumerate(name):
        if ch not in _TCHAR:
            # only the part before the bad character: a whole "Name: value" line may follow it
            raise ConfigError(
                f"{where}: header name {name[:i]!r}... is not an HTTP token (character {ch!r} at position {i})"
            )
    if not isinstance(value, str):
        raise ConfigError(f"{where}: the value of header {name!r} must be a string, got {type(value).__name__}")
    if any(b in value for b in _BREAKS):
        raise ConfigError(f"{where}: the value of header {name!r} contains CR, LF or NUL")
    if not value.isascii():
        raise ConfigError(f"{where}: the value of header {name!r} has a non-ASCII character")


def _positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"ModelConfig.{name} must be a positive int, got {value!r}")


def _check_ca_bundle(cfg: "ModelConfig") -> None:
    """``ca_bundle`` must name a readable file (a path object is kept as its str)."""
    bundle = cfg.ca_bundle
    if isinstance(bundle, os.PathLike):
        bundle = os.fspath(bundle)
        object.__setattr__(cfg, "ca_bundle", bundle)
    if not isinstance(bundle, str) or not bundle:
        raise ConfigError(f"ModelConfig.ca_bundle must be the path of a PEM file, got {bundle!r}")
    if not os.path.isfile(bundle):
        raise ConfigError(f"ModelConfig.ca_bundle: no such file: {bundle!r} (give the path of the CA's PEM certificate)")
    if not os.access(bundle, os.R_OK):
        raise ConfigError(f"ModelConfig.ca_bundle: the file {bundle!r} cannot be read")


@dataclass(frozen=True)
class ModelConfig:
    """One model behind one OpenAI-compatible server (frozen; share it freely).

    ``endpoint`` is the server's base URL (``http://127.0.0.1:8080``); trailing
    slashes are stripped and ``/v1/chat/completions`` appended (an endpoint
    already ending in ``/v1`` or ``/v1/chat/completions`` is taken as it is).
    ``key_env`` names an environment variable read at request time: when it is
    set and non-empty its value goes out as ``Authorization: Bearer …``; the
    key itself is never stored here, printed or put in an error. One trailing
    newline (``\\n`` or ``\\r\\n``, as a key read from a file ends) is stripped;
    any other CR, LF or NUL (or a non-ASCII character) in the key is a
    :class:`ConfigError` (naming the variable, not the key) raised before
    anything is sent.

    ``headers`` are sent with every request: names must be HTTP tokens and
    values ASCII without CR, LF or NUL (checked here, and again when a
    request starts). ``Authorization``, ``X-Api-Key``, ``Api-Key`` and
    ``Proxy-Authorization`` are credentials: masked in the repr, and with
    ``follow_redirects`` never sent to another scheme, host or port.

    Timeouts: ``timeout_ms`` bounds the whole request, ``connect_timeout_ms``
    the connection, ``idle_timeout_ms`` (``None`` for off) the time without a
    single byte from the server (llama-server's ``:`` keep-alive pings count,
    so a long prompt does not trip it; libcurl measures it in whole seconds,
    rounded up). ``max_event_bytes`` bounds one SSE line/event,
    ``max_error_body_bytes`` the part of an error body that is kept.

    ``strict`` turns an undecodable payload into a ``ProtocolError`` instead of
    skipping and counting it. ``max_retries`` (connect refused, reset before
    the first byte, HTTP 429 and 503) retries within ``timeout_ms``, after the
    server's ``Retry-After`` or else a capped exponential backoff from
    ``retry_backoff_ms``, with jitter; a request that delivered output is
    never retried.

    ``verify`` checks the server's TLS certificate (a failure raises
    :class:`~llama_broker.errors.TLSVerifyError`, never retried); ``ca_bundle``
    is the path of a PEM file of CA certificates to trust instead of the
    system's, checked to exist here.

    ``params`` are extra body fields sent with every request (``top_k``,
    ``min_p``, ``n_probs``, ``cache_prompt``, ``id_slot``, ``json_schema``,
    ``stream_options``, …); per-call ``**params`` override them.
    """

    endpoint: str
    model: str = ""
    key_env: Optional[str] = None
    temperature: Optional[float] = 0.2
    timeout_ms: int = 60000
    connect_timeout_ms: int = 10000
    idle_timeout_ms: Optional[int] = 30000
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    max_error_body_bytes: int = 64 * 1024
    strict: bool = False
    max_retries: int = 2
    retry_backoff_ms: int = 250
    follow_redirects: bool = False
    verify: bool = True
    ca_bundle: Optional[str] = None
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or not self.endpoint.strip():
            raise ConfigError("ModelConfig.endpoint must be a non-empty URL string")
        ep = self.endpoint.strip().rstrip("/")
        if not ep.startswith(("http://", "https://")):
            raise ConfigError(f"ModelConfig.endpoint must start with http:// or https://, got {mask_url(ep)!r}")
        object.__setattr__(self, "endpoint", ep)
        if not isinstance(self.model, str):
            raise ConfigError(f"ModelConfig.model must be a str, got {self.model!r}")
        if self.key_env is not None and (not isinstance(self.key_env, str) or not self.key_env):
            raise ConfigError("ModelConfig.key_env must name an environment variable")
        if self.temperature is not None and (
            isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
        ):
            raise ConfigError(f"ModelConfig.temperature must be a number, got {self.temperature!r}")
        _positive_int("timeout_ms", self.timeout_ms)
        _positive_int("connect_timeout_ms", self.connect_timeout_ms)
        _positive_int("idle_timeout_ms", self.idle_timeout_ms, allow_none=True)
        _positive_int("max_event_bytes", self.max_event_bytes)
        _positive_int("max_error_body_bytes", self.max_error_body_bytes)
        _positive_int("retry_backoff_ms", self.retry_backoff_ms)
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigError(f"ModelConfig.max_retries must be an int >= 0, got {self.max_retries!r}")
        if not self.verify and self.ca_bundle:
            raise ConfigError("ModelConfig: ca_bundle given but verify=False")
        if self.ca_bundle is not None:
            _check_ca_bundle(self)
        if not self.verify:
            warnings.warn(
                "ModelConfig(verify=False): TLS certificates are not checked, so anyone on the "
                "path can read and alter the traffic, the API key included",
                RuntimeWarning,
                stacklevel=3,  # the caller of ModelConfig(...)
            )
        for k, v in dict(self.headers).items():
            check_header(k, v)
        if "stream" in self.params:
            raise ConfigError("ModelConfig.params: 'stream' is always true and cannot be set")

    @property
    def base_url(self) -> str:
        """The server root (``endpoint`` without any ``/v1…`` suffix)."""
        ep = self.endpoint
        for suffix in (_CHAT_PATH, "/v1"):
            if ep.endswith(suffix):
                return ep[: -len(suffix)]
        return ep

    @property
    def url(self) -> str:
        """The chat completions URL requests go to."""
        return self.base_url + _CHAT_PATH

    def api_key(self) -> Optional[str]:
        """The key from ``key_env``'s variable, or ``None`` when unset or empty.

        One trailing newline is stripped; any other CR, LF or NUL raises
        :class:`ConfigError` (naming the variable, never the key)."""
        if self.key_env is None:
            return None
        key = os.environ.get(self.key_env)
        if not key:
            return None
        if key.endswith("\n"):  # a key read from a file
            key = key[:-2] if key.endswith("\r\n") else key[:-1]
        if any(b in key for b in _BREAKS):
            raise ConfigError(
                f"ModelConfig.key_env: the API key in ${self.key_env} contains CR, LF or NUL "
                "(only one trailing newline is stripped)"
            )
        if not key.isascii():
            raise ConfigError(f"ModelConfig.key_env: the API key in ${self.key_env} has a non-ASCII character")
        return key or None

    def __repr__(self) -> str:
        # The dataclass repr, with credentials masked (headers, user:pass@ in the endpoint).
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "endpoint":
                v = mask_url(v)
            elif f.name == "headers":
                v = mask_headers(v)
            parts.append(f"{f.name}={v!r}")
        return f"ModelConfig({', '.join(parts)})"

    def body(self, messages: Any, params: Mapping[str, Any]) -> Dict[str, Any]:
        """The JSON body for one chat request (``stream`` forced on)."""
        body: Dict[str, Any] = {}
        if self.model:
            body["model"] = self.model
        if self.temperature is not None:
            body["temperature"] = self.temperature
        body.update(self.params)
        body.update(params)
        body["messages"] = messages
        body["stream"] = True
        return body


def endpoint_configs(
    endpoints: Optional[Sequence[Union[str, "ModelConfig"]]],
    cfg: Optional["ModelConfig"],
    **overrides: Any,
) -> List["ModelConfig"]:
    """The :class:`ModelConfig` of each of ``endpoints`` (a URL takes ``cfg``'s
    other settings, or the defaults with ``overrides`` when there is no
    ``cfg``); just ``[cfg]`` when no endpoints are given."""
    if not endpoints:
        if cfg is None:
            raise ConfigError("no endpoints and no ModelConfig")
        return [cfg]
    out = []
    for i, ep in enumerate(endpoints):
        if isinstance(ep, ModelConfig):
            out.append(ep)
        elif isinstance(ep, str):
            out.append(dataclasses.replace(cfg, endpoint=ep) if cfg is not None else ModelConfig(ep, **overrides))
        else:
            raise ConfigError(f"endpoints[{i}] must be a URL or a ModelConfig, got {type(ep).__name__}")
    return out
