"""llama_broker: a fast streaming client for llama.cpp's llama-server.

Transport is pycurl; each network chunk goes to a C server-sent-events
splitter that returns all complete events at once; a small decoder turns
them into deltas. See ``chat_stream``, ``chat`` and ``stream``.
"""

from .broker import AsyncDeltaStream, Broker, DeltaStream, achat, astream, chat, chat_stream, stream
from .config import ModelConfig
from .decoder import Delta, StreamResult
from .errors import (
    APIError,
    BrokerError,
    ConfigError,
    ConnectError,
    ProtocolError,
    TimeoutError_,
    TLSVerifyError,
    TransportError,
)
from .sse import Event, EventSplitter

__version__ = "0.1.0"

# Imported on first use (``import llama_broker`` stays cheap: no asyncio, no
# native/OpenAI layers, no fan-out until they are asked for; logging, orjson
# and email wait for the first log line, payload and Retry-After date).
_LAZY = {
    "MapResult": "fanout",
    "ChatReply": "native",
    "ToolCall": "native",
    "chat_completion": "native",
    "aembed": "embeddings",
    "embed": "embeddings",
    "rerank": "embeddings",
}


def __getattr__(name: str) -> object:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'llama_broker' has no attribute {name!r}")
    value = getattr(__import__(f"{__name__}.{mod}", fromlist=[name]), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "APIError",
    "AsyncDeltaStream",
    "ChatReply",
    "ToolCall",
    "chat_completion",
    "aembed",
    "embed",
    "rerank",
    "MapResult",
    "achat",
    "astream",
    "Broker",
    "BrokerError",
    "ConfigError",
    "ConnectError",
    "Delta",
    "DeltaStream",
    "Event",
    "EventSplitter",
    "ModelConfig",
    "ProtocolError",
    "StreamResult",
    "TimeoutError_",
    "TLSVerifyError",
    "TransportError",
    "chat",
    "chat_stream",
    "stream",
]
