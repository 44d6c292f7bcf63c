"""Everything llama-server streams, and its native endpoints.

Decoders (they plug into :meth:`Broker.perform` like :class:`StreamDecoder`):

* :class:`ChunkDecoder` — any OpenAI-shaped event stream
  (``chat.completion.chunk``, ``text_completion``): every data event's JSON
  object goes to ``on_chunk(dict)`` as it arrives, ``[DONE]`` ends it, error
  envelopes raise :class:`APIError`.
* :class:`NativeDecoder` — llama.cpp's own ``/completion`` stream:
  ``{"content", "stop", …}`` events ending with ``"stop": true`` and no
  ``[DONE]``.

Accumulators turn those chunks into whole answers:

* :class:`ChatAccumulator` → :class:`ChatReply`: content, reasoning
  (``reasoning_content``, llama-server's ``--reasoning-format``), tool calls
  assembled from their fragments (:class:`ToolCallAssembler`), finish reason,
  logprobs, usage, timings, for every choice.
* :class:`TextAccumulator` → :class:`TextReply` (``/v1/completions``).
* :class:`NativeReply` (``/completion``).

Functions (each takes the :class:`ModelConfig` first and an optional
``broker=``; without one the thread's default :class:`Broker` is used):

* streamed through the same transport and splitter as ``chat``:
  :func:`chat_completion`, :func:`text_completion` (``/v1/completions``),
  :func:`completion` (``/completion``); pulled iterators of raw chunks:
  :func:`chat_chunks`, :func:`text_chunks`, :func:`completion_chunks`.
* asyncio (the Broker's asyncio engine, no threads): :func:`achat_completion`,
  :func:`atext_completion`, :func:`acompletion`, :func:`achat_chunks`,
  :func:`acompletion_chunks`.
* plain JSON: :func:`models` (``/v1/models``), :func:`health` (``/health``),
  :func:`props` (``/props``), :func:`slots` (``/slots``), :func:`tokenize`,
  :func:`detokenize`.
"""

from __future__ import annotations

from ..chunks import (
    ChunkDecoder,
    NativeDecoder,
)
from ..policy import encode_body
from ..replies import (
    ChatAccumulator,
    ChatChoice,
    ChatReply,
    NativeReply,
    TextAccumulator,
    TextChoice,
    TextReply,
    ToolCall,
    ToolCallAssembler,
)
from ._calls import (
    AsyncEventStream,
    EventStream,
    achat_chunks,
    achat_completion,
    acompletion,
    acompletion_chunks,
    aperform,
    atext_completion,
    chat_chunks,
    chat_completion,
    completion,
    completion_chunks,
    text_chunks,
    text_completion,
)
from ._endpoints import (
    detokenize,
    health,
    models,
    props,
    slots,
    tokenize,
)

__all__ = [
    "ChunkDecoder",
    "NativeDecoder",
    "ToolCall",
    "ToolCallAssembler",
    "ChatChoice",
    "ChatReply",
    "ChatAccumulator",
    "TextChoice",
    "TextReply",
    "TextAccumulator",
    "NativeReply",
    "EventStream",
    "AsyncEventStream",
    "aperform",
    "chat_completion",
    "achat_completion",
    "atext_completion",
    "acompletion",
    "achat_chunks",
    "acompletion_chunks",
    "chat_chunks",
    "text_completion",
    "text_chunks",
    "completion",
    "completion_chunks",
    "models",
    "health",
    "props",
    "slots",
    "tokenize",
    "detokenize",
    "encode_body",
]
