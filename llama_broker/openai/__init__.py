"""An OpenAI-SDK-shaped client over llama_broker's streaming path.

::

    from llama_broker.openai import OpenAI          # instead of: from openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="sk-no-key")
    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    print(resp.choices[0].message.content, resp.usage.completion_tokens)

    with client.chat.completions.create(model="m", messages=msgs, stream=True) as stream:
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="")

What is covered: ``OpenAI`` / ``AsyncOpenAI`` constructed like the SDK's
(``api_key``, ``base_url``, ``timeout``, ``max_retries``, ``default_headers``,
``default_query``, ``organization``, ``project``; ``OPENAI_API_KEY`` and
``OPENAI_BASE_URL`` are read when not given; ``timeout`` seconds or a
:class:`Timeout`), ``chat.completions.create``, ``completions.create``,
``embeddings.create``, ``models.list`` and ``models.retrieve``, with the SDK's
per-request ``extra_headers``, ``extra_query``, ``extra_body`` and
``timeout``. Every other
keyword is sent as it is (``NOT_GIVEN``/``omit`` values are dropped), so
llama.cpp's own parameters (``top_k``, ``min_p``, ``n_probs``, ``cache_prompt``,
``id_slot``, ``json_schema`` …) pass through.

Responses have the SDK's attribute shape: ``resp.choices[0].message.content``,
``resp.usage.completion_tokens``, ``chunk.choices[0].delta.content``,
``chunk.choices[0].delta.tool_calls[0].function.arguments``. Fields the server
sends beyond the SDK's (llama.cpp's ``timings``, ``reasoning_content``) are
attributes too, as with the SDK's models. Each type declares the SDK's field
set: a field the server left out reads as ``None`` and dumps as ``None``
(``model_dump()``, ``model_dump_json()``), ``exclude_unset``/``exclude_none``/
``exclude_defaults`` drop what the SDK's drop, and ``to_dict()``/``to_json()``
give only what the server sent, as the SDK's. Values are coerced as the
SDK's are: an optional field is validated in pydantic's lax mode (``"2"`` ->
2 for an int; kept as sent when that fails), a required float turns an int
into a float, other required fields keep what was sent. The objects wrap the
decoded JSON and build nested objects (and coerce) only when read or dumped,
which is where the SDK spends most of its time per chunk.

The stream follows the SDK's rules: an event of any name carries data (an
``event: delta`` chunk is yielded), a data value that is not an object is
yielded as it is, an object with a truthy ``error`` raises, and a data line
that is not JSON raises.

``embeddings.create`` takes a string, a list of strings, a token list or a
list of token lists; without ``encoding_format`` the vectors travel as
base64 and are handed back as floats (as the SDK does), with ``"base64"`` the
strings stay. ``models.retrieve(id)`` quotes the id as one path segment; an
unknown model is a :class:`NotFoundError`. Pages have ``.data``, iteration and
``model_dump()``/``to_dict()``/``to_json()``; on :class:`AsyncOpenAI`,
``models.list()`` is an :class:`AsyncPaginator` (``await`` it, or ``async for``).

``chat.completions.parse(response_format=SomeModel, ...)`` duck-types a
pydantic class: it sends ``{"type": "json_schema", "json_schema": {"name",
"schema", "strict": True}}`` with the schema made strict the SDK's way, and
returns a :class:`ParsedChatCompletion` whose ``message.parsed`` is
``SomeModel.model_validate_json(content)``; a dict ``response_format`` is sent
as it is (``parsed`` None); strict function tools (and
:func:`pydantic_function_tool`) get ``parsed_arguments``; a ``length`` or
``content_filter`` finish raises :class:`LengthFinishReasonError` /
:class:`ContentFilterFinishReasonError`, as the SDK does. Older code's
``client.beta.chat.completions.parse`` is the same call.

``<resource>.with_raw_response.<method>(...)`` (and ``client.with_raw_response``)
returns a :class:`LegacyAPIResponse`: ``status_code``, ``headers``
(case-insensitive), ``url``, ``method``, ``http_request``, ``request_id``,
``retries_taken``, ``text``/``content``, and ``parse()`` for what the plain
call returns (with ``stream=True``, the :class:`Stream`). A non-streamed chat
or text answer is received as a stream, so its headers are the stream's
(``text/event-stream``) and its ``text`` the JSON of the assembled answer.
``with_streaming_response`` gives the same object from a ``with``/``async
with`` block (``await parse()`` on :class:`AsyncOpenAI`).

Non-streaming calls stream underneath (with ``stream_options.include_usage``)
and are assembled into the object the server sends to a non-streamed
request: ``content`` is the joined text, ``None`` for a tool-call or refusal
message and ``""`` when nothing was generated (as llama-server and OpenAI
send them), ``refusal`` and ``logprobs`` appear when the chunks carried them.
An error reported inside that stream is the SDK's :class:`InternalServerError`
(``status_code`` 500, retried as a 500 is), since the same server answers the
non-streamed request with HTTP 500 and the same error. A stream
is pulled from libcurl on demand (no threads); ``close()`` or leaving the
``with`` block closes the connection, which cancels the generation.
``create(stream=True)`` returns once the response status is known, so an
HTTP error is raised there, as by the SDK.

Retries follow the SDK's rules, with the same ``max_retries`` (default 2):
408, 409, 429 and 5xx answers, timeouts and connection errors are sent again;
an ``x-should-retry`` header decides when present; the wait is the server's
``retry-after-ms``/``Retry-After`` when 0 < value <= 120 s, else 0.5 s * 2**n
capped at 8 s, less up to 25 % jitter. A stream is retried only until
``create()`` returns (nothing reached the caller yet), as the SDK does; a TLS
certificate that failed verification is never retried.

Errors keep the SDK's names and attributes (``status_code``, ``code``,
``type``, ``body``, ``message``, ``response.headers``) and are also llama_broker's own:
:class:`APIStatusError` and its subclasses are ``llama_broker.APIError``,
:class:`APIConnectionError` is ``llama_broker.TransportError``,
:class:`APITimeoutError` is ``llama_broker.TimeoutError_``,
:class:`APIResponseValidationError` is ``llama_broker.ProtocolError``, and an
error reported inside a stream is an :class:`APIStreamError` (an
:class:`APIError` and a ``llama_broker.APIError``).

:class:`AsyncOpenAI` runs on llama_broker's asyncio engine (curl's socket
callbacks on the running loop, no threads), the models and embeddings calls
too.

Departures from the SDK (everything else reads, dumps and raises as the SDK
does; tests/test_openai_differential.py compares the two on the same bytes):

- An ``error:`` line (older llama-server), or any event named ``error``,
  raises :class:`APIStreamError`; the SDK ignores the ``error`` field.
- A stream cut before any finish (no ``[DONE]``, no ``finish_reason``) raises
  :class:`APIConnectionError` instead of ending silently.
- A server that ignored ``stream`` (a whole JSON body) still works: its answer
  is the one chunk of the stream, or the whole reply.
- An error inside a ``stream=True`` stream is an :class:`APIStreamError`, a
  subclass of the SDK-named :class:`APIError` (the SDK raises ``APIError``
  itself); ``message``, ``body``, ``code``, ``type`` are the SDK's.
- A data line that is not JSON raises ``_errors.JSONDecodeError``: a
  ``json.JSONDecodeError`` with the SDK's name and text, and an
  :class:`APIResponseValidationError`. Invalid UTF-8 in a data line is
  replaced by U+FFFD (the SDK raises ``UnicodeDecodeError``).
- A ``stream=False`` answer is assembled from the stream, so keys a server puts
  only in its non-streamed body are absent: OpenAI's non-streamed
  ``annotations: []`` (it reads as ``None``).
- ``moderation`` (OpenAI's own) is kept as the data sent, not built as objects.
- ``model_validate`` and the constructors build without validating (as
  ``construct``); ``include``/``exclude`` of the dumps apply to top-level
  fields; no pydantic serializer warnings are emitted for odd values.
- :class:`APITimeoutError` and :class:`APIConnectionError` carry the SDK's
  ``message``; ``str()`` of them says what happened in llama_broker's words.

Nothing here imports the ``openai`` or ``pydantic`` package.
"""

from ._client import (
    DEFAULT_BASE_URL,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    AsyncClient,
    AsyncOpenAI,
    Client,
    OpenAI,
)
from ._errors import (
    APIConnectionError,
    ContentFilterFinishReasonError,
    LengthFinishReasonError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APIStreamError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    OpenAIError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from ._errors import _convert, _Request, _Response  # noqa: F401  (the tests check the translation)
from ._raw import AsyncAPIResponse, LegacyAPIResponse
from ._resources import AsyncPaginator, pydantic_function_tool
from ._streaming import AsyncStream, Stream
from ._types import (
    DEFAULT_TIMEOUT,
    NOT_GIVEN,
    AsyncPage,
    BaseModel,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    Completion,
    CompletionChoice,
    CompletionUsage,
    CreateEmbeddingResponse,
    Embedding,
    Model,
    NotGiven,
    Omit,
    ParsedChatCompletion,
    ParsedChatCompletionMessage,
    ParsedChoice,
    ParsedFunction,
    ParsedFunctionToolCall,
    SyncPage,
    Timeout,
    not_given,
    omit,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "AsyncPage",
    "OpenAI",
    "AsyncOpenAI",
    "Client",
    "AsyncClient",
    "Stream",
    "AsyncStream",
    "NOT_GIVEN",
    "NotGiven",
    "not_given",
    "Omit",
    "omit",
    "Timeout",
    "DEFAULT_TIMEOUT",
    "LegacyAPIResponse",
    "AsyncAPIResponse",
    "AsyncPaginator",
    "pydantic_function_tool",
    "CreateEmbeddingResponse",
    "Embedding",
    "ParsedChatCompletion",
    "ParsedChatCompletionMessage",
    "ParsedChoice",
    "ParsedFunction",
    "ParsedFunctionToolCall",
    "LengthFinishReasonError",
    "ContentFilterFinishReasonError",
    "BaseModel",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "ChatCompletionMessageToolCall",
    "Completion",
    "CompletionChoice",
    "CompletionUsage",
    "Model",
    "SyncPage",
    "OpenAIError",
    "APIError",
    "APIStatusError",
    "APIStreamError",
    "APIConnectionError",
    "APITimeoutError",
    "APIResponseValidationError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
]
