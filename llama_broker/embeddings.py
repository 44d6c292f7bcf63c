"""Embeddings and rerank, native.

:func:`embed` splits its inputs into requests of ``batch_size`` texts, fans them
out over one or more endpoints (the fewest outstanding requests first, a
failing endpoint rested: the scheduler of :mod:`llama_broker.jobs`), asks for
``encoding_format: "base64"`` and decodes each vector straight from its bytes
(little-endian float32) into an ``array('f')`` — or, with ``as_numpy=True``,
into one 2-D float32 array — so no Python float is made per element on the
way in. The order of the inputs is kept.

:func:`rerank` calls llama-server's ``/v1/rerank`` (a server started with
``--reranking`` and a reranker model): ``{"query", "documents", "top_n"}`` in,
``{"results": [{"index", "relevance_score"}, …]}`` out, best first.
"""

from __future__ import annotations

import base64
import dataclasses
import sys
from array import array
from typing import Any, Dict, List, Optional, Sequence, Union

from .broker import Broker, default_broker
from .config import ModelConfig, endpoint_configs
from .errors import ConfigError, ProtocolError
from .jobs import Job, JobRunner

__all__ = ["RerankResult", "embed", "aembed", "rerank", "decode_embedding"]

Inputs = Union[str, Sequence[Any]]
Endpoints = Optional[Sequence[Union[str, ModelConfig]]]

_EMBEDDINGS = "/v1/embeddings"
_BIG_ENDIAN = sys.byteorder == "big"


def decode_embedding(value: Any) -> bytes:
    """One ``data[i].embedding`` as little-endian float32 bytes: a base64 string
    is decoded, a list of numbers (a server that ignored ``encoding_format``)
    packed."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as e:
            raise ProtocolError(f"an embedding is not valid base64: {value[:60]!r}") from e
        if len(raw) % 4:
            raise ProtocolError(f"an embedding has {len(raw)} bytes, not a whole number of float32")
        return raw
    if isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        a = array("f", value)
        if _BIG_ENDIAN:  # pragma: no cover - little-endian hosts
            a.byteswap()
        return a.tobytes()
    raise ProtocolError(f"an embedding is neither base64 nor a list of numbers: {str(value)[:80]!r}")


def _vector(raw: bytes) -> "array[float]":
    a = array("f")
    a.frombytes(raw)
    if _BIG_ENDIAN:  # pragma: no cover
        a.byteswap()
    return a


def _plan(
    cfg: Optional[ModelConfig], inputs: Inputs, batch_size: int, endpoints: Endpoints, params: Dict[str, Any]
) -> "tuple[List[Any], List[Job], List[ModelConfig]]":
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"embed: batch_size must be a positive int, got {batch_size!r}")
    if "encoding_format" in params:
        raise ConfigError("embed: encoding_format is chosen by llama_broker (base64)")
    if "input" in params:
        raise ConfigError("embed: pass the texts as inputs, not input=")
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    for i, x in enumerate(items):
        if not isinstance(x, (str, list)):
            raise ConfigError(f"embed: inputs[{i}] must be a string (or a token list), got {type(x).__name__}")
    cfgs = endpoint_configs(endpoints, cfg)
    model = params.pop("model", None) or (cfg.model if cfg is not None else "") or cfgs[0].model
    jobs = []
    for k, start in enumerate(range(0, len(items), batch_size)):
        body: Dict[str, Any] = {}
        if model:
            body["model"] = model
        body.update(params)
        body["input"] = items[start : start + batch_size]
        body["encoding_format"] = "base64"
        jobs.append(Job(k, _EMBEDDINGS, body))
    return items, jobs, cfgs


def _collect(jobs: List[Job], bodies: Dict[int, Dict[str, Any]], as_numpy: bool) -> Any:
    raws: List[bytes] = []
    for job in jobs:
        body = bodies[job.key]
        data = body.get("data")
        want = len(job.body["input"])
        if not isinstance(data, list) or len(data) != want:
            got = len(data) if isinstance(data, list) else type(data).__name__
            raise ProtocolError(f"/v1/embeddings answered {got} embeddings for {want} inputs")
        if any(not isinstance(d, dict) for d in data):
            raise ProtocolError("/v1/embeddings answered a data item that is not an object")
        order = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d.get("index"), int) else 0)
        raws.extend(decode_embedding(d.get("embedding")) for d in order)
    if as_numpy:
        try:
            import numpy as np
        except ImportError as e:
            raise ConfigError("embed(as_numpy=True) needs numpy installed") from e
        if not raws:
            return np.zeros((0, 0), dtype=np.float32)
        dim = len(raws[0]) // 4
        if any(len(r) != dim * 4 for r in raws):
            raise ProtocolError("/v1/embeddings answered vectors of different sizes")
        return np.frombuffer(b"".join(raws), dtype="<f4").reshape(len(raws), dim)
    return [_vector(r) for r in raws]


def embed(
    cfg: Optional[ModelConfig],
    inputs: Inputs,
    *,
    batch_size: int = 64,
    concurrency: int = 4,
    endpoints: Endpoints = None,
    as_numpy: bool = False,
    broker: Optional[Broker] = None,
    **params: Any,
) -> Any:
    """Embeddings of ``inputs`` (a string or a list of any length), in order.

    Returns a list of ``array('f')`` vectors (index, iterate and compare them
    like lists; ``list(v)`` for a list), or a ``(len(inputs), dim)`` float32
    numpy array with ``as_numpy=True``. Requests carry ``batch_size`` inputs,
    ``concurrency`` of them in flight over ``endpoints`` (base URLs or
    ModelConfigs; default ``cfg``'s server). ``params`` go into every request
    body (``model``, llama-server's ``embd_normalize`` …; ``cfg.params``, the
    chat sampling fields, are not sent). The first request
    that fails for good raises its :class:`BrokerError` (retriable failures are
    sent again, to another endpoint when there is one).
    """
    items, jobs, cfgs = _plan(cfg, inputs, batch_size, endpoints, dict(params))
    if not jobs:
        return _collect([], {}, as_numpy)
    b = broker or default_broker()
    runner = JobRunner(
        iter(jobs), endpoints=cfgs, concurrency=concurrency, max_retries=max(c.max_retries for c in cfgs)
    )
    bodies: Dict[int, Dict[str, Any]] = {}
    gen = runner.run_sync(b.sync_engine())
    try:
        for r in gen:
            if r.error is not None:
                raise r.error
            assert r.body is not None
            bodies[r.key] = r.body
    finally:
        gen.close()  # cuts what is still in flight after an error
    return _collect(jobs, bodies, as_numpy)


async def aembed(
    cfg: Optional[ModelConfig],
    inputs: Inputs,
    *,
    batch_size: int = 64,
    concurrency: int = 4,
    endpoints: Endpoints = None,
    as_numpy: bool = False,
    broker: Optional[Broker] = None,
    **params: Any,
) -> Any:
    """Async :func:`embed` on the running loop (the Broker's asyncio engine, no threads)."""
    items, jobs, cfgs = _plan(cfg, inputs, batch_size, endpoints, dict(params))
    if not jobs:
        return _collect([], {}, as_numpy)
    b = broker or default_broker()
    runner = JobRunner(
        iter(jobs), endpoints=cfgs, concurrency=concurrency, max_retries=max(c.max_retries for c in cfgs)
    )
    bodies: Dict[int, Dict[str, Any]] = {}
    gen = runner.run_async(b.async_engine)
    try:
        async for r in gen:
            if r.error is not None:
                raise r.error
            assert r.body is not None
            bodies[r.key] = r.body
    finally:
        await gen.aclose()
    return _collect(jobs, bodies, as_numpy)


@dataclasses.dataclass
class RerankResult:
    """One document's score: ``index`` into the documents passed, ``document`` itself."""

    index: int
    relevance_score: float
    document: Any = None


def rerank(
    cfg: ModelConfig,
    query: str,
    documents: Sequence[Any],
    top_n: Optional[int] = None,
    *,
    broker: Optional[Broker] = None,
    **params: Any,
) -> List[RerankResult]:
    """Score ``documents`` against ``query`` with llama-server's ``/v1/rerank``;
    the best first, at most ``top_n`` of them (all when None)."""
    if not isinstance(query, str):
        raise ConfigError(f"rerank: query must be a string, got {type(query).__name__}")
    docs = list(documents)
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise ConfigError(f"rerank: top_n must be an int >= 0, got {top_n!r}")
    body: Dict[str, Any] = {}
    if cfg.model:
        body["model"] = cfg.model
    body.update(params)
    body["query"] = query
    body["documents"] = docs
    if top_n is not None:
        body["top_n"] = top_n
    b = broker or default_broker()
    # no idle timeout: the server sends nothing until every document is scored
    answer = b.request_json("POST", "/v1/rerank", body, cfg=dataclasses.replace(cfg, idle_timeout_ms=None))
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list):
        raise ProtocolError(f"/v1/rerank answered without a results list: {str(answer)[:200]!r}")
    out = []
    for item in results:
        idx = item.get("index") if isinstance(item, dict) else None
        score = item.get("relevance_score") if isinstance(item, dict) else None
        if (
            not isinstance(idx, int)
            or isinstance(idx, bool)
            or not 0 <= idx < len(docs)
            or not isinstance(score, (int, float))
            or isinstance(score, bool)
        ):
            raise ProtocolError(f"/v1/rerank answered a bad result: {str(item)[:200]!r}")
        out.append(RerankResult(idx, float(score), docs[idx]))
    out.sort(key=lambda r: -r.relevance_score)  # stable: a server that already sorted keeps its order
    if top_n is not None:
        out = out[:top_n]
    return out
