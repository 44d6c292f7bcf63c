"""A real consumer of the SDK, langchain-openai, run on the drop-in.

``ChatOpenAI`` takes its clients injected (``client=`` is ``chat.completions``,
``root_client=`` the client itself; the same for async), and so does
``OpenAIEmbeddings`` (``client=`` is ``embeddings``). Every check runs twice,
once with the real SDK's clients and once with llama_broker.openai's, and
the results must be equal.

langchain-openai turns a non-streamed answer into a message only when it
passes ``isinstance(response, dict | openai.BaseModel)``, which no object
that is not built by the SDK can pass (pydantic disables virtual
subclasses), so with the drop-in ``ChatOpenAI`` runs with ``streaming=True``
(``invoke``/``ainvoke`` are then served by the streamed path, which reads
every chunk through ``model_dump()``), and ``stream_usage=True`` for the
token counts. ``with_structured_output(method="function_calling")`` works
that way; the ``json_schema``/``json_mode`` methods need the SDK's own
objects (see ``test_a_non_streamed_call_needs_the_sdks_objects``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Iterator

import langchain_openai  # in the [test] extra: a missing one fails, never skips
import openai
import pydantic
import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from llama_broker import openai as lbo
from llama_broker.server import LocalServer
from loopback import LoopbackServer
from test_openai_surface import TOOL_CALL, chat_answer, embeddings_handler
from toolcall import TOOL_REQUEST

pytestmark = pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")

MODS = [openai, lbo]  # the SDK first: the oracle


class Person(pydantic.BaseModel):
    """A person."""

    name: str
    age: int


def get_weather(city: str) -> str:
    """Get the weather of a city."""
    return "sunny"


def chat_model(mod: Any, url: str, **kw: Any) -> ChatOpenAI:
    """ChatOpenAI over ``mod``'s clients (injected, as langchain-openai allows)."""
    c = mod.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    ac = mod.AsyncOpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    kw.setdefault("streaming", True)
    return ChatOpenAI(
        client=c.chat.completions, async_client=ac.chat.completions, root_client=c, root_async_client=ac,
        model="m", api_key="sk-test", stream_usage=True, **kw,
    )


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    with LoopbackServer() as s:
        s.script(chat_answer("Hello there"))
        s.route("/v1/embeddings", embeddings_handler)
        yield s


def test_langchain_openai_is_the_installed_one():
    assert langchain_openai.ChatOpenAI is ChatOpenAI


def _facts(msg: Any) -> Dict[str, Any]:
    return dict(content=msg.content, usage=msg.usage_metadata, finish=msg.response_metadata.get("finish_reason"),
                tool_calls=getattr(msg, "tool_calls", None))


def test_invoke_stream_ainvoke_astream_equal_the_sdk(srv):
    got = []
    for mod in MODS:
        llm = chat_model(mod, srv.url)
        out: Dict[str, Any] = {"invoke": _facts(llm.invoke("hi"))}
        out["stream"] = [c.content for c in llm.stream("hi")]

        async def more() -> Any:
            llm2 = chat_model(mod, srv.url)  # its async client on this loop
            a = _facts(await llm2.ainvoke("hi"))
            b = [c.content async for c in llm2.astream("hi")]
            await llm2.root_async_client.close()
            return a, b

        out["ainvoke"], out["astream"] = run(more())
        got.append(out)
    assert got[0] == got[1]
    assert got[1]["invoke"]["content"] == "Hello there" and got[1]["invoke"]["usage"]["total_tokens"] == 12
    assert "".join(got[1]["astream"]) == "Hello there"


def test_tools_and_structured_output_equal_the_sdk(srv):
    got = []
    for mod in MODS:
        out: Dict[str, Any] = {}
        srv.script(chat_answer(None, finish="tool_calls", tool_calls=[TOOL_CALL]))
        llm = chat_model(mod, srv.url)
        out["tools"] = llm.bind_tools([get_weather]).invoke("weather in Paris?").tool_calls
        sent = srv.chat_requests()[-1].json
        out["sent_tools"] = (sent["tools"], sent.get("tool_choice"))
        srv.script(chat_answer(None, finish="tool_calls", tool_calls=[
            {"id": "c1", "type": "function", "function": {"name": "Person", "arguments": '{"name": "Ada", "age": 36}'}}]))
        p = llm.with_structured_output(Person, method="function_calling").invoke("who?")
        out["structured"] = (type(p).__name__, p.model_dump())

        async def atools() -> Any:
            srv.script(chat_answer(None, finish="tool_calls", tool_calls=[TOOL_CALL]))
            llm2 = chat_model(mod, srv.url)
            r = await llm2.bind_tools([get_weather]).ainvoke("weather in Paris?")
            await llm2.root_async_client.close()
            return r.tool_calls

        out["atools"] = run(atools())
        got.append(out)
    assert got[0] == got[1]
    assert got[1]["tools"][0]["args"] == {"city": "Paris"} and got[1]["structured"] == ("Person", {"name": "Ada", "age": 36})


def test_response_headers_come_through_with_raw_response(srv):
    """``include_response_headers`` makes ChatOpenAI call ``with_raw_response``."""
    got = []
    for mod in MODS:
        msg = chat_model(mod, srv.url, include_response_headers=True).invoke("hi")
        headers = msg.response_metadata["headers"]
        got.append((headers.get("x-request-id"), headers.get("x-custom"), msg.content))
    assert got[0] == got[1] == ("req-42", "yes", "Hello there")


def test_embeddings_equal_the_sdk(srv):
    got = []
    for mod in MODS:
        c = mod.OpenAI(base_url=srv.url + "/v1", api_key="k")
        ac = mod.AsyncOpenAI(base_url=srv.url + "/v1", api_key="k")
        # no local tokenization (it would fetch tiktoken's tables): the texts go as they are
        emb = OpenAIEmbeddings(client=c.embeddings, async_client=ac.embeddings, model="e", api_key="k",
                               check_embedding_ctx_length=False)

        async def aq() -> Any:
            v = await emb.aembed_query("x")
            await ac.close()
            return v

        got.append((emb.embed_documents(["a", "b", "c"]), emb.embed_query("x"), run(aq())))
    assert got[0] == got[1]
    assert len(got[1][0]) == 3 and got[1][0][0][1] == -1.5


def test_a_non_streamed_call_needs_the_sdks_objects(srv):
    """Why the drop-in's ChatOpenAI streams: the non-streamed path refuses any
    response that is not a dict or an ``openai.BaseModel`` instance."""
    assert chat_model(openai, srv.url, streaming=False).invoke("hi").content == "Hello there"
    with pytest.raises(ValueError, match="openai.BaseModel"):
        chat_model(lbo, srv.url, streaming=False).invoke("hi")


# =============================================================================
# the real llama-server
# =============================================================================

SEEDED = dict(temperature=0, seed=5, extra_body={"cache_prompt": False})


@pytest.mark.llama_server
def test_langchain_equals_the_sdk_on_the_real_server(llama_server: LocalServer):
    got = []
    for mod in MODS:
        llm = chat_model(mod, llama_server.endpoint, max_tokens=8, **SEEDED)
        out: Dict[str, Any] = {"invoke": llm.invoke("Name a colour.").content}
        out["stream"] = "".join(c.content for c in llm.stream("Name a colour."))

        async def more() -> Any:
            llm2 = chat_model(mod, llama_server.endpoint, max_tokens=8, **SEEDED)
            a = (await llm2.ainvoke("Name a colour.")).content
            b = "".join([c.content async for c in llm2.astream("Name a colour.")])
            await llm2.root_async_client.close()
            return a, b

        out["ainvoke"], out["astream"] = run(more())
        got.append(out)
    assert got[0] == got[1]
    assert got[1]["invoke"] and got[1]["invoke"] == got[1]["stream"] == got[1]["astream"]


@pytest.mark.llama_server
def test_langchain_tool_call_equals_the_sdk_on_the_real_server(tools_server: LocalServer):
    """A real tool call (the template and grammar of tests/toolcall.py) read by bind_tools."""
    got = []
    req = dict(TOOL_REQUEST)
    for mod in MODS:
        llm = chat_model(mod, tools_server.endpoint, max_tokens=req["max_tokens"], temperature=0, seed=req["seed"])
        bound = llm.bind_tools([get_weather], tool_choice="required", stop=req["stop"])
        msg = bound.invoke([(m["role"] if m["role"] != "user" else "human", m["content"]) for m in req["messages"]])
        got.append([(tc["name"], tc["args"]) for tc in msg.tool_calls])
    assert got[0] == got[1] == [("get_weather", {"city": "Paris"})]
