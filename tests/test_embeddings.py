"""embed / aembed / rerank: the loopback server for shapes and faults, the real
llama-server (``--embeddings --pooling mean``) against the ``openai`` SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from array import array
from typing import Any, Iterator, List

import pytest

from llama_broker import Broker, ModelConfig, embed, rerank
from llama_broker.embeddings import aembed, decode_embedding
from llama_broker.errors import APIError, ConfigError, ProtocolError
from llama_broker.server import LocalServer
from loopback import LoopbackServer, Reply, Request, api_error, raw


def _vec(text: str) -> List[float]:
    i = int(text.split("-")[-1])
    return [float(i), i + 0.5, -1.25 * i, 1.0 / 3.0]


def embeddings_handler(*, b64: bool = True, shuffle: bool = False) -> Any:
    def handler(req: Request) -> Reply:
        body = req.json or {}
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        items = []
        for k, text in enumerate(inputs):
            v = _vec(text)
            emb: Any = v
            if b64 and body.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            items.append({"embedding": emb, "index": k, "object": "embedding"})
        if shuffle:
            items.reverse()
        out = {"model": "m", "object": "list", "usage": {"prompt_tokens": 1, "total_tokens": 1}, "data": items}
        return raw(200, json.dumps(out).encode(), "application/json")

    return handler


def f32(v: List[float]) -> List[float]:
    return list(array("f", v))


def test_embed_order_batches_and_base64() -> None:
    texts = [f"t-{i}" for i in range(23)]
    with LoopbackServer() as a, LoopbackServer() as b:
        a.route("/v1/embeddings", embeddings_handler())
        b.route("/v1/embeddings", embeddings_handler(shuffle=True))
        cfg = ModelConfig(a.url, model="emb")
        with Broker() as br:
            vecs = br.embed(texts, cfg=cfg, batch_size=5, concurrency=3, endpoints=[a.url, b.url])
        reqs = [r for s in (a, b) for r in s.requests if r.path == "/v1/embeddings"]
    assert len(reqs) == 5  # ceil(23 / 5)
    assert all(r.json["encoding_format"] == "base64" and r.json["model"] == "emb" for r in reqs)
    assert sorted(len(r.json["input"]) for r in reqs) == [3, 5, 5, 5, 5]
    assert a.requests and b.requests  # fanned out
    assert all(isinstance(v, array) and v.typecode == "f" for v in vecs)
    assert [list(v) for v in vecs] == [f32(_vec(t)) for t in texts]


def test_embed_one_string_numpy_and_empty() -> None:
    import numpy as np  # in the [test] extra
    with LoopbackServer() as srv:
        srv.route("/v1/embeddings", embeddings_handler())
        cfg = ModelConfig(srv.url)
        [v] = embed(cfg, "t-7")
        assert list(v) == f32(_vec("t-7"))
        m = embed(cfg, [f"t-{i}" for i in range(9)], batch_size=4, as_numpy=True)
        assert m.shape == (9, 4) and m.dtype == np.float32
        assert m.tolist() == [f32(_vec(f"t-{i}")) for i in range(9)]
        assert embed(cfg, []) == []
        n = len(srv.requests)
        with pytest.raises(ConfigError):
            embed(cfg, ["t-1"], encoding_format="float")
        assert len(srv.requests) == n


def test_embed_server_ignoring_base64_still_decodes() -> None:
    with LoopbackServer() as srv:
        srv.route("/v1/embeddings", embeddings_handler(b64=False))
        vecs = embed(ModelConfig(srv.url), ["t-1", "t-2"])
    assert [list(v) for v in vecs] == [f32(_vec("t-1")), f32(_vec("t-2"))]


def test_embed_errors_raise() -> None:
    with LoopbackServer() as srv:
        srv.route("/v1/embeddings", lambda req: api_error(400, "input too long", "invalid_request_error"))
        with pytest.raises(APIError) as ei:
            embed(ModelConfig(srv.url), ["t-1", "t-2", "t-3"], batch_size=1)
        assert ei.value.status == 400 and "input too long" in str(ei.value)
        srv.route("/v1/embeddings", lambda req: raw(200, b'{"data": [{"embedding": "***", "index": 0}]}', "application/json"))
        with pytest.raises(ProtocolError):
            embed(ModelConfig(srv.url), ["t-1"])
        srv.route("/v1/embeddings", lambda req: raw(200, b'{"data": []}', "application/json"))
        with pytest.raises(ProtocolError, match="0 embeddings for 1 inputs"):
            embed(ModelConfig(srv.url), ["t-1"])


def test_embed_retries_a_503_on_the_other_endpoint() -> None:
    with LoopbackServer() as a, LoopbackServer() as b:
        a.route("/v1/embeddings", lambda req: api_error(503, "Loading model", "unavailable_error"))
        b.route("/v1/embeddings", embeddings_handler())
        vecs = embed(ModelConfig(a.url), [f"t-{i}" for i in range(6)], batch_size=2, endpoints=[a.url, b.url])
    assert [list(v) for v in vecs] == [f32(_vec(f"t-{i}")) for i in range(6)]


def test_aembed() -> None:
    async def go() -> Any:
        with LoopbackServer() as srv:
            srv.route("/v1/embeddings", embeddings_handler())
            with Broker(ModelConfig(srv.url)) as br:
                return await asyncio.wait_for(br.aembed([f"t-{i}" for i in range(10)], batch_size=3), 20)

    vecs = asyncio.run(go())
    assert [list(v) for v in vecs] == [f32(_vec(f"t-{i}")) for i in range(10)]


def test_decode_embedding_rejects_odd_sizes() -> None:
    assert decode_embedding(base64.b64encode(struct.pack("<2f", 1.0, 2.0)).decode()) == struct.pack("<2f", 1.0, 2.0)
    with pytest.raises(ProtocolError):
        decode_embedding(base64.b64encode(b"abc").decode())
    with pytest.raises(ProtocolError):
        decode_embedding({"x": 1})


def _rerank_handler(req: Request) -> Reply:
    body = req.json or {}
    scores = [{"index": i, "relevance_score": float(len(d))} for i, d in enumerate(body["documents"])]
    scores.sort(key=lambda r: -r["relevance_score"])
    scores = scores[: body.get("top_n", len(scores))]
    out = {"model": "m", "object": "list", "usage": {"prompt_tokens": 3, "total_tokens": 3}, "results": scores}
    return raw(200, json.dumps(out).encode(), "application/json")


def test_rerank_request_and_results() -> None:
    docs = ["a", "abcd", "ab", "abc"]
    with LoopbackServer() as srv:
        srv.route("/v1/rerank", _rerank_handler)
        cfg = ModelConfig(srv.url, model="rr")
        res = rerank(cfg, "query", docs, top_n=2)
        all_ = rerank(cfg, "query", docs)
        sent = [r.json for r in srv.requests if r.path == "/v1/rerank"]
    assert sent[0] == {"model": "rr", "query": "query", "documents": docs, "top_n": 2}
    assert "top_n" not in sent[1]
    assert [(r.index, r.relevance_score, r.document) for r in res] == [(1, 4.0, "abcd"), (3, 3.0, "abc")]
    assert [r.index for r in all_] == [1, 3, 2, 0]


def test_rerank_unsorted_server_is_sorted_and_cut() -> None:
    def unsorted(req: Request) -> Reply:
        docs = (req.json or {})["documents"]
        out = {"results": [{"index": i, "relevance_score": float(len(d))} for i, d in enumerate(docs)]}
        return raw(200, json.dumps(out).encode(), "application/json")

    with LoopbackServer() as srv:
        srv.route("/v1/rerank", unsorted)
        res = rerank(ModelConfig(srv.url), "q", ["aa", "a", "aaa"], top_n=2)
        assert [r.index for r in res] == [2, 0]
        srv.route("/v1/rerank", lambda req: raw(200, b'{"results": [{"index": 9, "relevance_score": 1}]}', "application/json"))
        with pytest.raises(ProtocolError):
            rerank(ModelConfig(srv.url), "q", ["a"])


# -- the real llama-server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding_server() -> Iterator[LocalServer]:
    # One slot: with two, this llama-server gives the same text different
    # vectors depending on what shares its batch (seen up to 0.2 apart), so no
    # two clients could agree; with one slot and no prompt cache it is exact.
    with LocalServer(parallel=1, ctx_per_slot=512, extra_args=["--embeddings", "--pooling", "mean"]) as srv:
        yield srv


@pytest.mark.llama_server
def test_embeddings_equal_the_sdk_on_the_real_server(embedding_server: LocalServer) -> None:
    import openai  # in the [test] extra: the oracle
    texts = ["The quick brown fox", "jumps over the lazy dog", "café 日本語", "a", "embeddings are vectors"] * 3
    cfg = embedding_server.config()
    nocache = {"cache_prompt": False}
    client = openai.OpenAI(base_url=embedding_server.endpoint + "/v1", api_key="none", max_retries=0)
    try:
        sdk = client.embeddings.create(model="x", input=texts, extra_body=nocache)
    finally:
        client.close()
    theirs = [d.embedding for d in sorted(sdk.data, key=lambda d: d.index)]
    # other request sizes than the SDK's one request, two in flight: the same vectors
    ours = embed(cfg, texts, batch_size=4, concurrency=2, **nocache)
    assert len(ours) == len(theirs) == len(texts)
    assert len(ours[0]) > 16
    assert [list(v) for v in ours] == theirs
    import numpy as np  # in the [test] extra
    m = embed(cfg, texts, batch_size=7, as_numpy=True, **nocache)
    assert m.shape == (len(texts), len(ours[0])) and m.dtype == np.float32
    assert m.tolist() == theirs


def _slow_embeddings(delay: float) -> Any:
    inner = embeddings_handler()

    def handler(req: Request) -> Reply:
        import dataclasses

        return dataclasses.replace(inner(req), delay=delay)

    return handler


def test_idle_timeout_on_an_engine_json_request_is_a_timeout() -> None:
    """A plain JSON request on the engines that hears nothing for idle_timeout_ms
    fails with TimeoutError_ (it was reported as an undecodable empty body)."""
    from llama_broker.engine import Transfer
    from llama_broker.errors import TimeoutError_
    from llama_broker.decoder import JSONBody

    with LoopbackServer() as srv:
        srv.route("/v1/embeddings", _slow_embeddings(3.0))
        cfg = ModelConfig(srv.url, idle_timeout_ms=1000, max_retries=0)
        with Broker() as br:
            eng = br.sync_engine()
            t = Transfer(cfg, b'{"input": ["t-1"]}', lambda t0: JSONBody(require_object=True), url=srv.url + "/v1/embeddings",
                         streaming=False, retry=False)
            eng.start(t)
            deadline = __import__("time").monotonic() + 10
            while not t.done and __import__("time").monotonic() < deadline:
                eng.drive(lambda: t.done, max_wait=0.1)
        assert t.done
        assert isinstance(t.error, TimeoutError_), repr(t.error)


def test_embed_waits_past_the_idle_timeout_for_a_slow_answer() -> None:
    """A non-streamed answer sends no byte until it is ready: embed and rerank do
    not apply the idle timeout (the whole-request timeout still bounds them)."""
    with LoopbackServer() as srv:
        srv.route("/v1/embeddings", _slow_embeddings(2.2))
        srv.route("/v1/rerank", lambda req: __import__("dataclasses").replace(_rerank_handler(req), delay=2.2))
        cfg = ModelConfig(srv.url, idle_timeout_ms=1000, timeout_ms=20000, max_retries=0)
        vecs = embed(cfg, ["t-1", "t-2"])
        assert [list(v) for v in vecs] == [f32(_vec("t-1")), f32(_vec("t-2"))]
        assert [r.index for r in rerank(cfg, "q", ["a", "abc"])] == [1, 0]
