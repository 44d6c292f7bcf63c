"""The resources beyond chat and text completions: ``embeddings``,
``models.retrieve``, the async ``models.list`` paginator, and
``chat.completions.parse`` (structured output over a pydantic class, which is
duck-typed: neither pydantic nor openai is imported here)."""

from __future__ import annotations

import base64
import inspect
import json
from array import array
from typing import Any, Awaitable, Callable, Dict, Generator, List, Optional, Tuple
from urllib.parse import quote

from .._log import log
from ..policy import encode_body
from ._client import _json_default, _split
from ._errors import APIResponseValidationError, ContentFilterFinishReasonError, LengthFinishReasonError, _Request
from ._raw import _RawResource, _StreamingResource, json_decoder
from ._types import (
    _Kept,
    NOT_GIVEN,
    AsyncPage,
    CreateEmbeddingResponse,
    Model,
    ParsedChatCompletion,
    _given,
    _plain,
)


# =============================================================================
# plain JSON requests (GET /models, POST /embeddings), sync and async
# =============================================================================


def _json_request(opts: Any, method: str, path: str, body: Optional[Dict[str, Any]], options: Dict[str, Any]) -> Tuple[Any, Optional[bytes], str, _Request]:
    _, extra_headers, extra_query, timeout = _split(dict(options))
    cfg = opts.request_cfg(extra_headers, timeout)
    url = opts.url(path, extra_query)
    data = encode_body(body, _json_default) if body is not None else None
    return cfg, data, url, _Request(method, url)


def json_call(client: Any, method: str, path: str, body: Optional[Dict[str, Any]], options: Dict[str, Any]) -> Any:
    """One plain JSON request on :class:`OpenAI`'s engine, under the SDK's retries."""
    eng = client._engine
    cfg, data, url, request = _json_request(client._opts, method, path, body, options)

    def attempt() -> Any:
        dec = json_decoder()
        eng.broker.perform(cfg, data, lambda t0: dec, url=url, method=method, streaming=False)
        return dec.value

    return eng._retrying(request, attempt)


async def ajson_call(client: Any, method: str, path: str, body: Optional[Dict[str, Any]], options: Dict[str, Any]) -> Any:
    """One plain JSON request on :class:`AsyncOpenAI`'s asyncio engine (no thread)."""
    cfg, data, url, request = _json_request(client._opts, method, path, body, options)

    async def attempt() -> Any:
        dec = json_decoder()
        await client._broker.aperform(cfg, data, lambda t0: dec, url=url, method=method, streaming=False)
        return dec.value

    return await client._retrying(request, attempt)


def _object(value: Any, what: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise APIResponseValidationError(f"{what} answered something other than a JSON object: {str(value)[:200]!r}")
    return value


# =============================================================================
# embeddings
# =============================================================================


def _embedding_body(
    model: Any, input: Any, dimensions: Any, encoding_format: Any, user: Any, kwargs: Dict[str, Any]
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(body, options) in the SDK's field order; without ``encoding_format`` the
    SDK asks for base64 and decodes it itself."""
    options: Dict[str, Any] = {k: kwargs.pop(k) for k in ("extra_headers", "extra_query", "timeout") if k in kwargs}
    extra_body = kwargs.pop("extra_body", None)
    body: Dict[str, Any] = {"model": model, "input": input}
    for k, v in (("user", user), ("dimensions", dimensions), ("encoding_format", encoding_format)):
        if _given(v):
            body[k] = v
    body.update({k: v for k, v in kwargs.items() if _given(v)})
    if not _given(encoding_format):
        body["encoding_format"] = "base64"
    if extra_body and _given(extra_body):
        body.update(extra_body)
    return body, options


def _embedding_response(value: Any, encoding_format: Any) -> Any:
    raw = _object(value, "/embeddings")
    if not isinstance(raw.get("data"), list):
        raise APIResponseValidationError(f"/embeddings answered without a data list: {str(raw)[:200]!r}")
    if not _given(encoding_format):
        # As the SDK: it asked for base64 on the caller's behalf, so it hands
        # back floats (float32 values, as the server computed them).
        if not raw["data"]:
            raise ValueError("No embedding data received")
        for item in raw["data"]:
            if isinstance(item, dict) and isinstance(item.get("embedding"), str):
                item["embedding"] = array("f", base64.b64decode(item["embedding"])).tolist()
    return CreateEmbeddingResponse._w(raw)


class Embeddings:
    """``client.embeddings``: ``create(model=..., input=...)`` → :class:`CreateEmbeddingResponse`."""

    _is_async = False

    def __init__(self, client: Any) -> None:
        self._client = client

    @property
    def with_raw_response(self) -> Any:
        """``embeddings.with_raw_response.create(...)``: a :class:`LegacyAPIResponse`."""
        return _RawResource(self)

    @property
    def with_streaming_response(self) -> Any:
        """``with embeddings.with_streaming_response.create(...) as r:``: the raw response in a ``with`` block."""
        return _StreamingResource(self)

    def create(
        self,
        *,
        input: Any,
        model: Any,
        dimensions: Any = NOT_GIVEN,
        encoding_format: Any = NOT_GIVEN,
        user: Any = NOT_GIVEN,
        **kwargs: Any,
    ) -> Any:
        """``POST {base_url}/embeddings``: one :class:`Embedding` per input (a
        string, a list of strings, a token list or a list of token lists).
        Without ``encoding_format`` the vectors travel as base64 and come back
        as floats; with ``"base64"`` they stay strings; with ``"float"``, lists."""
        body, options = _embedding_body(model, input, dimensions, encoding_format, user, kwargs)
        value = json_call(self._client, "POST", "/embeddings", body, options)
        return _embedding_response(value, encoding_format)


class AsyncEmbeddings(Embeddings):
    """``await client.embeddings.create(...)`` on the asyncio engine."""

    _is_async = True

    async def create(  # type: ignore[override]
        self,
        *,
        input: Any,
        model: Any,
        dimensions: Any = NOT_GIVEN,
        encoding_format: Any = NOT_GIVEN,
        user: Any = NOT_GIVEN,
        **kwargs: Any,
    ) -> Any:
        """As :meth:`Embeddings.create`, awaited."""
        body, options = _embedding_body(model, input, dimensions, encoding_format, user, kwargs)
        value = await ajson_call(self._client, "POST", "/embeddings", body, options)
        return _embedding_response(value, encoding_format)


# =============================================================================
# models
# =============================================================================


def _model_path(model: Any) -> str:
    """``/models/{model}``, the id quoted as one path segment (as the SDK does)."""
    if not model:
        raise ValueError(f"Expected a non-empty value for `model` but received {model!r}")
    seg = quote(str(model), safe="!$&'()*+,;=:@")
    if seg.lower().replace("%2e", ".") in (".", ".."):
        raise ValueError(f"Constructed path '/models/{seg}' contains dot-segment {seg!r} which is not allowed")
    return "/models/" + seg


def retrieve_model(client: Any, model: Any, options: Dict[str, Any]) -> Any:
    """``models.retrieve(model)``: ``GET /models/{model}`` as a :class:`Model`."""
    return Model._w(_object(json_call(client, "GET", _model_path(model), None, options), "/models/{id}"))


async def aretrieve_model(client: Any, model: Any, options: Dict[str, Any]) -> Any:
    """As :func:`retrieve_model`, awaited."""
    value = await ajson_call(client, "GET", _model_path(model), None, options)
    return Model._w(_object(value, "/models/{id}"))


def _page(body: Any, cls: Any) -> Any:
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise APIResponseValidationError(f"/models answered without a data list: {str(body)[:200]!r}")
    return cls([Model._w(m) if isinstance(m, dict) else m for m in body["data"]], body.get("object", "list"))


class AsyncPaginator:
    """:class:`AsyncOpenAI`'s ``models.list()``: ``await`` it for the page, or
    ``async for`` over its items (the SDK's ``AsyncPaginator``)."""

    def __init__(self, get_page: Callable[[], Awaitable[Any]]) -> None:
        self._get_page = get_page

    def __await__(self) -> Generator[Any, None, Any]:
        return self._get_page().__await__()

    async def __aiter__(self) -> Any:  # an async generator
        page = await self
        for item in page:
            yield item


def amodels_paginator(client: Any, options: Dict[str, Any]) -> AsyncPaginator:
    """:class:`AsyncOpenAI`'s ``models.list()``: ``GET /models`` as an :class:`AsyncPage`, fetched when awaited."""
    async def get() -> Any:
        return _page(await ajson_call(client, "GET", "/models", None, options), AsyncPage)

    return AsyncPaginator(get)


# =============================================================================
# chat.completions.parse
# =============================================================================


def _is_model_class(t: Any) -> bool:
    """A pydantic model class, duck-typed (pydantic is never imported here)."""
    return inspect.isclass(t) and callable(getattr(t, "model_json_schema", None)) and callable(
        getattr(t, "model_validate_json", None)
    )


def check_create_response_format(response_format: Any) -> None:
    """``create()`` refuses a model class, as the SDK does."""
    if _is_model_class(response_format):
        raise TypeError(
            "You tried to pass a `BaseModel` class to `chat.completions.create()`; "
            "You must use `chat.completions.parse()` instead"
        )


def to_strict_json_schema(cls: Any) -> Dict[str, Any]:
    """``cls.model_json_schema()`` made strict the SDK's way: every object closed
    (``additionalProperties: false``) with every property required, ``None``
    defaults dropped, single ``allOf`` merged, ``$ref`` with siblings inlined."""
    schema = cls.model_json_schema()
    return _strict(schema, schema)


def _strict(node: Any, root: Dict[str, Any]) -> Dict[str, Any]:
    if not isinstance(node, dict):
        raise TypeError(f"Expected {node} to be a dictionary")
    for key in ("$defs", "definitions"):
        defs = node.get(key)
        if isinstance(defs, dict):
            for sub in defs.values():
                _strict(sub, root)
    if node.get("type") == "object" and "additionalProperties" not in node:
        node["additionalProperties"] = False
    props = node.get("properties")
    if isinstance(props, dict):
        node["required"] = list(props)
        node["properties"] = {k: _strict(v, root) for k, v in props.items()}
    items = node.get("items")
    if isinstance(items, dict):
        node["items"] = _strict(items, root)
    any_of = node.get("anyOf")
    if isinstance(any_of, list):
        node["anyOf"] = [_strict(v, root) for v in any_of]
    all_of = node.get("allOf")
    if isinstance(all_of, list):
        if len(all_of) == 1:
            node.update(_strict(all_of[0], root))
            node.pop("allOf")
        else:
            node["allOf"] = [_strict(v, root) for v in all_of]
    if "default" in node and node["default"] is None:
        node.pop("default")
    ref = node.get("$ref")
    if ref and len(node) > 1:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise ValueError(f"Unexpected $ref format {ref!r}; Does not start with #/")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        if not isinstance(target, dict):
            raise ValueError(f"Expected `$ref: {ref}` to resolved to a dictionary but got {target}")
        node.update({**target, **node})
        node.pop("$ref")
        return _strict(node, root)
    return node


def response_format_param(response_format: Any) -> Any:
    """The request's ``response_format`` for what ``parse()`` was given: a dict
    passes through; a model class becomes a strict ``json_schema``."""
    if not _given(response_format) or isinstance(response_format, dict):
        return response_format
    if not _is_model_class(response_format):
        raise TypeError(f"Unsupported response_format type - {response_format}")
    return {
        "type": "json_schema",
        "json_schema": {
            "schema": to_strict_json_schema(response_format),
            "name": response_format.__name__,
            "strict": True,
        },
    }


def validate_tools(tools: Any) -> Any:
    """``parse()`` takes only strict function tools (the SDK's rule)."""
    if not _given(tools):
        return tools
    tools = list(tools)
    for tool in tools:
        if tool["type"] != "function":
            raise ValueError(f"Currently only `function` tool types support auto-parsing; Received `{tool['type']}`")
        if tool["function"].get("strict") is not True:
            raise ValueError(f"`{tool['function']['name']}` is not strict. Only `strict` function tools can be auto-parsed")
    return tools


def _parse_arguments(tools: List[Any], function: Any) -> Any:
    name = function.get("name")
    tool = next((t for t in tools if t.get("type") == "function" and t.get("function", {}).get("name") == name), None)
    if tool is None:
        return None
    fn: Any = tool.get("function")
    model: Any = getattr(fn, "model", None)  # the SDK's pydantic_function_tool(): a dict carrying its model
    if _is_model_class(model):
        return model.model_validate_json(function.get("arguments"))
    if not fn.get("strict"):
        return None
    return json.loads(function.get("arguments"))


def _json_form(obj: Any) -> Any:
    """A parsed value as the data holds it: a model (its dumps are its own), or the plain value."""
    return _Kept(obj) if callable(getattr(obj, "model_dump", None)) else obj


def parse_completion(completion: Any, response_format: Any, tools: Any) -> Any:
    """A :class:`ParsedChatCompletion` from a :class:`ChatCompletion`, or the
    SDK's LengthFinishReasonError / ContentFilterFinishReasonError."""
    tools = tools if _given(tools) else []
    for choice in completion.choices:
        if choice.finish_reason == "length":
            raise LengthFinishReasonError(completion=completion)
        if choice.finish_reason == "content_filter":
            raise ContentFilterFinishReasonError(completion=completion)
    rich = _given(response_format) and not isinstance(response_format, dict)
    raw = _plain(completion._raw)
    for choice in raw.get("choices") or []:
        msg = choice.get("message") or {}
        choice["message"] = msg
        kept = []
        for tc in msg.get("tool_calls") or []:
            if tc.get("type") == "function":
                parsed_args = _parse_arguments(tools, tc.get("function") or {})
                tc["function"] = dict(tc.get("function") or {}, parsed_arguments=_json_form(parsed_args))
                kept.append(tc)
            elif tc.get("type") == "custom":
                log.warning("Custom tool calls are not callable. Ignoring tool call: %s", tc.get("id"))
            else:
                kept.append(tc)
        parsed = None
        if rich and msg.get("content") and not msg.get("refusal"):
            parsed = response_format.model_validate_json(msg["content"])
        msg["parsed"] = _json_form(parsed)
        msg["tool_calls"] = kept or None
    return ParsedChatCompletion._w(raw)  # parsed/parsed_arguments read as the objects made above


def parse_kwargs(response_format: Any, tools: Any, kwargs: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """(the validated tools, ``create()``'s kwargs) for a ``parse()`` call."""
    if "stream" in kwargs:
        raise TypeError("parse() got an unexpected keyword argument 'stream'")
    tools = validate_tools(tools)
    kw = dict(kwargs)
    if _given(response_format):
        kw["response_format"] = response_format_param(response_format)
    if _given(tools):
        kw["tools"] = tools
    return tools, kw


class PydanticFunctionTool(Dict[str, Any]):
    """A tool's ``function`` dict that carries its model class (``.model``), so
    ``parse()`` can validate the call's arguments into it."""

    def __init__(self, defn: Dict[str, Any], model: Any) -> None:
        super().__init__(defn)
        self.model = model


def pydantic_function_tool(model: Any, *, name: Optional[str] = None, description: Optional[str] = None) -> Dict[str, Any]:
    """The SDK's ``pydantic_function_tool``: a strict function tool whose
    parameters are ``model``'s schema; ``parse()`` gives its calls'
    ``parsed_arguments`` as ``model`` instances."""
    if description is None:
        description = model.__doc__
    function = PydanticFunctionTool(
        {"name": name or model.__name__, "strict": True, "parameters": to_strict_json_schema(model)}, model
    )
    if description is not None:
        function["description"] = description
    return {"type": "function", "function": function}
