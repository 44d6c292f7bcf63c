"""llama_broker as a Ray Data stage: a dataset's rows sent to llama-servers.

:func:`build_processor` is built like Ray's own LLM processors
(``ray.data.llm.build_processor``)::

    processor = build_processor(
        endpoints=["http://10.0.0.5:8080", "http://10.0.0.6:8080"],
        preprocess=lambda row: {"messages": [{"role": "user", "content": row["question"]}], "max_tokens": 64},
        concurrency=4,              # actors
        streams_per_actor=64,       # requests in flight per actor
    )
    out = processor(ds)             # ds: a ray.data.Dataset

It is one ``map_batches`` stage on an actor pool. Each actor holds one
:class:`~llama_broker.Broker`; each batch is fanned out over the endpoints
by the batch-job scheduler (:class:`llama_broker.jobs.JobRunner`: the fewest
outstanding requests first, retries with the server's ``Retry-After``, an
endpoint that refuses or answers 503 rested) on the Broker's pulled engine,
whose latency budget (``max_delay_ms``, 50 ms here) lets one wake-up read
every stream that has data.

Every input row comes out, in order, with its input columns and (chat and
completions) ``generated_text``, ``finish_reason``, ``usage``, ``timings`` and
``error``, or (embeddings) ``embedding``, ``usage`` and ``error``. A row that
failed for good has ``error`` (its :class:`~llama_broker.BrokerError` type and
message: the HTTP status and the server's own message) and nulls elsewhere;
with ``raise_on_error=True`` the batch raises that error instead. The added
columns have fixed Arrow types (:data:`USAGE_TYPE`, :data:`TIMINGS_TYPE`), so
blocks with only failed rows, or with no timings, concatenate with the rest.

``preprocess(row)`` runs inside the actor, so the request (``messages`` of any
shape) never has to be an Arrow column. ``postprocess(row)`` runs there too, on
the rows that succeeded; a failed row skips it and keeps every column.

Needs the ``[ray]`` extra (``pip install 'llama_broker[ray]'``); ``import
llama_broker`` does not import Ray.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .broker import Broker
from .config import ModelConfig, endpoint_configs
from .embeddings import decode_embedding
from .engine import check_max_delay
from .errors import APIError, BrokerError, ConfigError, ProtocolError
from .jobs import Job, JobResult, JobRunner

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa  # type: ignore[import-untyped]
    import ray.data

__all__ = [
    "KINDS",
    "TIMINGS_TYPE",
    "USAGE_TYPE",
    "BrokerStage",
    "Processor",
    "build_processor",
    "error_text",
    "output_schema",
]

#: kind -> the path its requests go to
KINDS: Dict[str, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
#: the field of a preprocessed request that each kind needs
_REQUIRED = {"chat": "messages", "completions": "prompt", "embeddings": "input"}
#: the processor's own settings (the rest of ``**config`` goes to ModelConfig)
_STAGE_KEYS = ("max_delay_ms", "inputs_per_request", "num_cpus", "ray_remote_args", "stream")
#: the stage's latency budget: a row is handed out whole with its batch, so its
#: tokens may wait in the kernel longer than in map's interactive default (10 ms)
#: and one wake-up reads several tokens of every stream
STAGE_MAX_DELAY_MS = 50.0
#: A request's whole time limit in the stage (rows wait for server slots; see build_processor).
STAGE_TIMEOUT_MS = 600_000

_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_TIMINGS_INT = ("prompt_n", "predicted_n", "cache_n")
_TIMINGS_FLOAT = (
    "prompt_ms",
    "prompt_per_token_ms",
    "prompt_per_second",
    "predicted_ms",
    "predicted_per_token_ms",
    "predicted_per_second",
)
_TIMINGS_FIELDS = ("prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
                   "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second", "cache_n")


def _pa() -> Any:
    import pyarrow

    return pyarrow


def _usage_type() -> "pa.DataType":
    pa = _pa()
    return pa.struct([(f, pa.int64()) for f in _USAGE_FIELDS])


def _timings_type() -> "pa.DataType":
    pa = _pa()
    return pa.struct([(f, pa.int64() if f in _TIMINGS_INT else pa.float64()) for f in _TIMINGS_FIELDS])


def __getattr__(name: str) -> Any:
    # The Arrow types are made on first use: importing this module needs no pyarrow.
    if name == "USAGE_TYPE":
        return _usage_type()
    if name == "TIMINGS_TYPE":
        return _timings_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def output_schema(kind: str = "chat") -> "pa.Schema":
    """The Arrow schema of the columns a processor of ``kind`` adds to each row.

    ``usage`` is a struct of ``prompt_tokens``, ``completion_tokens`` and
    ``total_tokens`` (:data:`USAGE_TYPE`); ``timings`` a struct of llama.cpp's
    timing fields (:data:`TIMINGS_TYPE`; other fields a server sends are left
    out, a server that sends none gives null); ``embedding`` a list of float32
    (for embeddings ``usage`` is the request's, so it is set only on a row that
    had a request of its own). A failed row has null in every added column but
    ``error``.
    """
    pa = _pa()
    _check_kind(kind)
    if kind == "embeddings":
        fields = [("embedding", pa.list_(pa.float32())), ("usage", _usage_type()), ("error", pa.string())]
    else:
        fields = [
            ("generated_text", pa.string()),
            ("finish_reason", pa.string()),
            ("usage", _usage_type()),
            ("timings", _timings_type()),
            ("error", pa.string()),
        ]
    return pa.schema(fields)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")


def _int_or_none(v: Any) -> Optional[int]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return int(v)


def _float_or_none(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _usage(u: Any) -> Optional[Dict[str, Optional[int]]]:
    if not isinstance(u, dict):
        return None
    return {f: _int_or_none(u.get(f)) for f in _USAGE_FIELDS}


def _timings(t: Any) -> Optional[Dict[str, Any]]:
    if not isinstance(t, dict):
        return None
    return {f: (_int_or_none(t.get(f)) if f in _TIMINGS_INT else _float_or_none(t.get(f))) for f in _TIMINGS_FIELDS}


def error_text(err: BaseException) -> str:
    """What the ``error`` column holds: the error's type and message
    (``"APIError: api: HTTP 400 (invalid_request_error): …"``)."""
    return f"{type(err).__name__}: {err}"


@dataclasses.dataclass
class _Settings:
    """Everything an actor needs (pickled to each one)."""

    kind: str
    endpoints: List[ModelConfig]
    preprocess: Callable[[Dict[str, Any]], Mapping[str, Any]]
    postprocess: Optional[Callable[[Dict[str, Any]], Mapping[str, Any]]]
    streams_per_actor: int
    raise_on_error: bool
    max_retries: int
    max_delay_ms: float
    defaults: Dict[str, Any]
    inputs_per_request: int
    stream: bool = True


class BrokerStage:
    """The ``map_batches`` callable class behind :class:`Processor`: one per
    actor, holding one :class:`~llama_broker.Broker` for the actor's life.

    Called with a ``pyarrow.Table`` batch, it returns the same rows, in order,
    with the output columns appended (see the module docstring).
    """

    def __init__(self, settings: _Settings) -> None:
        self.s = settings
        self.path = KINDS[settings.kind]
        self.broker = Broker(pool_size=max(32, settings.streams_per_actor))

    # -- requests -------------------------------------------------------------
    def _body(self, row: Dict[str, Any]) -> Dict[str, Any]:
        req = self.s.preprocess(row)
        if not isinstance(req, Mapping):
            raise ConfigError(f"preprocess must return a dict (the request), got {type(req).__name__}")
        need = _REQUIRED[self.s.kind]
        if need not in req:
            raise ConfigError(f"preprocess returned no {need!r} (a {self.s.kind} request needs it)")
        if self.s.kind == "chat" and not isinstance(req[need], list):
            raise ConfigError(f"preprocess returned 'messages' that is a {type(req[need]).__name__}, not a list")
        body = dict(self.s.defaults)
        body.update(req)
        if self.s.kind == "embeddings":
            if "encoding_format" in body:
                raise ConfigError("embeddings: encoding_format is chosen by llama_broker (base64)")
            body["encoding_format"] = "base64"
        return body

    def _run(self, jobs: List[Job]) -> Iterator[JobResult]:
        if not jobs:
            return
        runner = JobRunner(
            iter(jobs),
            endpoints=self.s.endpoints,
            concurrency=self.s.streams_per_actor,
            max_retries=self.s.max_retries,
            max_delay_ms=self.s.max_delay_ms,
        )
        gen = runner.run_sync(self.broker.sync_engine())
        try:
            yield from gen
        finally:
            gen.close()  # cuts what is still in flight (an error raised on)

    def _fail(self, err: BaseException) -> None:
        if self.s.raise_on_error:
            raise err

    # -- one batch ------------------------------------------------------------
    def __call__(self, batch: "pa.Table") -> "pa.Table":
        """Send every row of ``batch`` and return it with the output columns."""
        pa = _pa()
        rows = batch.to_pylist()
        n = len(rows)
        errors: List[Optional[str]] = [None] * n
        bodies: List[Optional[Dict[str, Any]]] = [None] * n
        for i, row in enumerate(rows):
            try:
                bodies[i] = self._body(row)
            except BrokerError as e:
                self._fail(e)
                errors[i] = error_text(e)
        if self.s.kind == "embeddings":
            cols = self._embeddings(bodies, errors)
        else:
            cols = self._generate(bodies, errors)
        cols["error"] = errors
        schema = output_schema(self.s.kind)
        out = batch
        for field in schema:
            arr = cols[field.name]
            if not isinstance(arr, (pa.Array, pa.ChunkedArray)):
                arr = pa.array(arr, type=field.type)
            if field.name in out.column_names:  # a column of the input with our name: replaced
                out = out.set_column(out.column_names.index(field.name), field, arr)
            else:
                out = out.append_column(field, arr)
        if self.s.postprocess is not None:
            out = self._postprocess(out, errors)
        return out

    def _generate(self, bodies: List[Optional[Dict[str, Any]]], errors: List[Optional[str]]) -> Dict[str, List[Any]]:
        n = len(bodies)
        text: List[Optional[str]] = [None] * n
        finish: List[Optional[str]] = [None] * n
        usage: List[Any] = [None] * n
        timings: List[Any] = [None] * n
        jobs = [Job(i, self.path, b, stream=self.s.stream) for i, b in enumerate(bodies) if b is not None]
        chat = self.s.kind == "chat"
        for r in self._run(jobs):
            i = r.key
            if r.error is not None:
                self._fail(r.error)
                errors[i] = error_text(r.error)
                continue
            body = r.body or {}
            choices = body.get("choices") or [{}]
            c0 = choices[0] if isinstance(choices[0], dict) else {}
            if chat:
                msg = c0.get("message") or {}
                text[i] = msg.get("content") or ""
            else:
                text[i] = c0.get("text") or ""
            finish[i] = c0.get("finish_reason")
            usage[i] = _usage(body.get("usage"))
            timings[i] = _timings(body.get("timings"))
        return {"generated_text": text, "finish_reason": finish, "usage": usage, "timings": timings}

    def _embeddings(self, bodies: List[Optional[Dict[str, Any]]], errors: List[Optional[str]]) -> Dict[str, Any]:
        pa = _pa()
        n = len(bodies)
        vectors: List[Optional[bytes]] = [None] * n
        usage: List[Any] = [None] * n
        # Consecutive rows with the same parameters share a request (up to
        # inputs_per_request inputs); a request refused for good is sent again
        # one row at a time, so one bad input fails only its own row.
        groups = _group_inputs(bodies, self.s.inputs_per_request)
        refused: List[int] = []
        for idx in self._embed_pass(groups, vectors, usage, errors, split=True):
            refused.extend(idx)
        if refused:
            singles: List[Tuple[Tuple[int, ...], Dict[str, Any]]] = [((i,), _single(bodies, i)) for i in refused]
            for _ in self._embed_pass(singles, vectors, usage, errors, split=False):
                pass  # pragma: no cover - split=False yields nothing
        offsets = [0]
        mask = []
        for v in vectors:
            offsets.append(offsets[-1] + (len(v) // 4 if v is not None else 0))
            mask.append(v is None)
        data = pa.py_buffer(b"".join(v for v in vectors if v))
        values = pa.Array.from_buffers(pa.float32(), offsets[-1], [None, data])
        emb = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=pa.array(mask, pa.bool_()))
        return {"embedding": emb, "usage": usage}

    def _embed_pass(
        self,
        groups: List[Tuple[Tuple[int, ...], Dict[str, Any]]],
        vectors: List[Optional[bytes]],
        usage: List[Any],
        errors: List[Optional[str]],
        *,
        split: bool,
    ) -> Iterator[Tuple[int, ...]]:
        """Run ``groups``; fill ``vectors``/``usage``/``errors``. With ``split``, yield
        the rows of each multi-row request the server refused (4xx) instead of failing them."""
        jobs = [Job(k, self.path, body) for k, (_, body) in enumerate(groups)]
        for r in self._run(jobs):
            idx, _ = groups[r.key]
            err = r.error
            if err is None:
                try:
                    raws = _embedding_rows(r.body, len(idx))
                except ProtocolError as e:
                    err = e
                else:
                    u = _usage((r.body or {}).get("usage")) if len(idx) == 1 else None
                    for i, raw in zip(idx, raws):
                        vectors[i] = raw
                        usage[i] = u
                    continue
            if split and len(idx) > 1 and isinstance(err, APIError) and err.status is not None and 400 <= err.status < 500:
                yield idx
                continue
            self._fail(err)
            for i in idx:
                errors[i] = error_text(err)

    def _postprocess(self, out: "pa.Table", errors: List[Optional[str]]) -> "pa.Table":
        assert self.s.postprocess is not None
        pa = _pa()
        rows = out.to_pylist()
        done: List[Dict[str, Any]] = []
        for row, err in zip(rows, errors):
            if err is not None:
                done.append(row)  # a failed row keeps everything it has
                continue
            new = self.s.postprocess(row)
            if not isinstance(new, Mapping):
                raise ConfigError(f"postprocess must return a dict (the row), got {type(new).__name__}")
            new = dict(new)
            new.setdefault("error", None)
            done.append(new)
        names: Dict[str, None] = {}
        for r in done:
            for k in r:
                names.setdefault(k, None)
        known = {f.name: f.type for f in out.schema}
        arrays, fields = [], []
        for name in names:
            vals = [r.get(name) for r in done]
            typ = known.get(name)
            try:
                arr = pa.array(vals, type=typ)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                arr = pa.array(vals)  # postprocess changed the column's type
            arrays.append(arr)
            fields.append(pa.field(name, arr.type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def __del__(self) -> None:
        broker = getattr(self, "broker", None)
        if broker is not None:
            broker.close()


def _single(bodies: List[Optional[Dict[str, Any]]], i: int) -> Dict[str, Any]:
    b = bodies[i]
    assert b is not None
    return b


def _group_inputs(
    bodies: List[Optional[Dict[str, Any]]], per_request: int
) -> List[Tuple[Tuple[int, ...], Dict[str, Any]]]:
    """Consecutive rows whose requests differ only in ``input`` (a string each)
    share a request: ``[(row indexes, body), …]``."""
    groups: List[Tuple[Tuple[int, ...], Dict[str, Any]]] = []
    cur: List[int] = []
    cur_params: Any = None
    cur_inputs: List[Any] = []

    def close() -> None:
        if cur:
            body = dict(cur_params)
            body["input"] = list(cur_inputs) if len(cur) > 1 else cur_inputs[0]
            groups.append((tuple(cur), body))

    for i, b in enumerate(bodies):
        if b is None:
            continue
        params = {k: v for k, v in b.items() if k != "input"}
        single = not isinstance(b["input"], str)  # a token list or a list of texts: its own request
        if single or not cur or params != cur_params or len(cur) >= per_request:
            close()
            cur, cur_inputs, cur_params = [], [], params
        cur.append(i)
        cur_inputs.append(b["input"])
        if single:
            close()
            cur, cur_inputs = [], []
    close()
    return groups


def _embedding_rows(body: Optional[Dict[str, Any]], want: int) -> List[bytes]:
    """The float32 bytes of each input's vector, in input order."""
    data = (body or {}).get("data")
    if not isinstance(data, list) or len(data) != want or any(not isinstance(d, dict) for d in data):
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise ProtocolError(f"/v1/embeddings answered {got} embeddings for {want} inputs")
    order = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d.get("index"), int) else 0)
    return [decode_embedding(d.get("embedding")) for d in order]


class Processor:
    """A llama_broker stage for a Ray Dataset: ``processor(ds)`` returns a new
    Dataset with the output columns (lazy, as every Ray Data transform).

    Made by :func:`build_processor`; ``map_batches_kwargs`` is what the stage
    passes to ``Dataset.map_batches`` (inspect or adjust it before calling).
    """

    def __init__(self, settings: _Settings, *, concurrency: int, batch_size: int, map_batches_kwargs: Dict[str, Any]) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.map_batches_kwargs = map_batches_kwargs

    @property
    def kind(self) -> str:
        """``"chat"``, ``"completions"`` or ``"embeddings"``."""
        return self.settings.kind

    def __call__(self, ds: "ray.data.Dataset") -> "ray.data.Dataset":
        """Add the stage to ``ds`` (nothing runs until the Dataset is consumed)."""
        return ds.map_batches(BrokerStage, **self.map_batches_kwargs)

    def __repr__(self) -> str:
        return (
            f"Processor(kind={self.kind!r}, endpoints={len(self.settings.endpoints)}, concurrency={self.concurrency}, "
            f"batch_size={self.batch_size}, streams_per_actor={self.settings.streams_per_actor})"
        )


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"build_processor: {name} must be a positive int, got {v!r}")
    return v


def build_processor(
    *,
    endpoints: Sequence[Union[str, ModelConfig]],
    preprocess: Callable[[Dict[str, Any]], Mapping[str, Any]],
    postprocess: Optional[Callable[[Dict[str, Any]], Mapping[str, Any]]] = None,
    concurrency: int = 1,
    batch_size: int = 256,
    streams_per_actor: int = 32,
    kind: str = "chat",
    raise_on_error: bool = False,
    **config: Any,
) -> Processor:
    """A :class:`Processor` that sends each row of a Dataset to ``endpoints``.

    ``preprocess(row)`` returns the request: ``{"messages": [...], **params}``
    (``kind="chat"``), ``{"prompt": ..., **params}`` (``"completions"``) or
    ``{"input": text, **params}`` (``"embeddings"``; rows with the same params
    share a request of up to ``inputs_per_request`` texts, default 32).
    ``postprocess(row)``, optional, maps each successful output row.

    ``concurrency`` actors each take batches of ``batch_size`` rows and keep
    ``streams_per_actor`` requests of a batch in flight (a batch ends when its
    last row does: make it several times ``streams_per_actor``).

    ``endpoints`` are base URLs (``http://host:8080``) or ModelConfigs.
    ``**config`` holds :class:`~llama_broker.ModelConfig` fields applied to
    URL endpoints (``key_env``, ``timeout_ms`` — default 600,000 here, since
    rows queue for a server's slots —, ``idle_timeout_ms`` — default none,
    for the same reason —, ``headers``, ``max_retries`` …) and the stage's
    own settings:
    ``max_delay_ms`` (the engine's latency budget, default 50: a row is
    handed out with its whole batch, so its tokens may wait in the kernel and
    one wake-up reads several of each stream),
    ``inputs_per_request``, ``num_cpus`` (per actor), ``ray_remote_args``
    (more ``map_batches`` arguments) and ``stream`` (default True; False
    asks for each chat or text completion whole, ``stream: false``: one
    wake-up per row instead of one per few tokens, the least CPU when
    nothing is needed before a row's end, but a stalled generation is then
    caught by ``timeout_ms`` alone, not ``idle_timeout_ms``). ``model``, ``temperature`` and
    ``params`` become defaults of every request body (a preprocessed request
    overrides them).

    A row that fails for good (after ``max_retries`` more tries, default 2,
    spread over the endpoints) gets ``error``; with ``raise_on_error=True``
    its error is raised and the batch fails.
    """
    _check_kind(kind)
    if not callable(preprocess):
        raise ConfigError("build_processor: preprocess must be a function row -> request dict")
    if postprocess is not None and not callable(postprocess):
        raise ConfigError("build_processor: postprocess must be a function row -> row")
    _positive_int("concurrency", concurrency)
    _positive_int("batch_size", batch_size)
    _positive_int("streams_per_actor", streams_per_actor)
    if not endpoints or isinstance(endpoints, str):
        raise ConfigError("build_processor: endpoints must be a list of base URLs or ModelConfigs")
    stage = {k: config.pop(k) for k in _STAGE_KEYS if k in config}
    inputs_per_request = _positive_int("inputs_per_request", stage.get("inputs_per_request", 32))
    defaults: Dict[str, Any] = {}
    model = config.get("model")
    if "temperature" in config and config["temperature"] is not None:
        defaults["temperature"] = config["temperature"]
    params = config.get("params") or {}
    # The bodies go out as built here: no ModelConfig default temperature.
    config.setdefault("temperature", None)
    # A batch's rows queue at the servers (more streams than slots is the
    # point): a row may wait minutes for a slot without a byte, so the
    # interactive defaults (60 s in all, 30 s without a byte) would fail rows
    # that are only queued. As batch jobs: 10 minutes a request, no idle bound.
    config.setdefault("timeout_ms", STAGE_TIMEOUT_MS)
    config.setdefault("idle_timeout_ms", None)
    try:
        cfgs = endpoint_configs(list(endpoints), None, **config)
    except TypeError as e:  # an unknown keyword
        raise ConfigError(f"build_processor: {e}") from None
    model = model or cfgs[0].model
    if model:
        defaults["model"] = model
    defaults.update(params)
    max_retries = max(c.max_retries for c in cfgs)
    max_delay_ms = check_max_delay(stage.get("max_delay_ms", STAGE_MAX_DELAY_MS))
    settings = _Settings(
        kind=kind,
        endpoints=cfgs,
        preprocess=preprocess,
        postprocess=postprocess,
        streams_per_actor=streams_per_actor,
        raise_on_error=bool(raise_on_error),
        max_retries=max_retries,
        max_delay_ms=float(max_delay_ms),
        defaults=defaults,
        inputs_per_request=inputs_per_request,
        stream=bool(stage.get("stream", True)),
    )
    from ray.data import ActorPoolStrategy

    kwargs: Dict[str, Any] = dict(stage.get("ray_remote_args") or {})
    kwargs.update(
        batch_size=batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=ActorPoolStrategy(size=concurrency),
        fn_constructor_kwargs={"settings": settings},
    )
    if stage.get("num_cpus") is not None:
        kwargs["num_cpus"] = stage["num_cpus"]
    return Processor(settings, concurrency=concurrency, batch_size=batch_size, map_batches_kwargs=kwargs)
