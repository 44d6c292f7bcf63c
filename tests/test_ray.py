"""llama_broker.ray: the Ray Data stage, on one local Ray instance per module.

The servers are loopback imitations in this process (tests/loopback.py) whose
replies are made from each request, so every row's text is checked against
its own input; the Ray actors reach them on 127.0.0.1. The real llama-server
runs a small chat and embeddings pass at the end.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import threading
import time
from array import array
from typing import Any, Dict, Iterator, List

import pytest

import llama_broker
from llama_broker.errors import ConfigError
from llama_broker.server import LocalServer

from loopback import DONE, LoopbackServer, Reply, Request, Stall, api_error, chunk, data, ok, raw, sse, usage_chunk

# Ray and pyarrow (the [ray] extra) are imported inside the tests: without them
# this module is still collected, so `-m "not ray"` runs need no Ray.

pytestmark = pytest.mark.ray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(llama_broker.__file__)))
#: a bound on one dataset run (a hang fails the test instead of the suite)
RUN_TIMEOUT_S = 120.0


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    """One local Ray for the module; its workers import the llama_broker under test."""
    import ray
    import ray.cloudpickle

    # the preprocess functions below travel by value (the workers cannot import this module)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the stage keeps a batch's order; this keeps the blocks'
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _take_all(ds: Any) -> List[Dict[str, Any]]:
    """Run ``ds`` in a thread with a deadline: a hang fails here."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["rows"] = ds.take_all()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(RUN_TIMEOUT_S)
    assert not t.is_alive(), f"the dataset did not finish within {RUN_TIMEOUT_S:.0f} s"
    if "error" in box:
        raise box["error"]
    return box["rows"]


def _question(row: Dict[str, Any]) -> Dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"q{row['id']}"}], "max_tokens": 8}


def _answer_tokens(content: str) -> List[str]:
    # several tokens per reply, non-ASCII and a JSON escape among them
    return ["re", ":", " ", content, " é\"", "✓"]


def _answer(content: str) -> str:
    return "".join(_answer_tokens(content))


def echo(req: Request) -> Reply:
    """A chat stream whose text is made from the request's last message."""
    body = req.json
    return ok(_answer_tokens(body["messages"][-1]["content"]), usage=True)


def _procs(**kw: Any) -> Any:
    from llama_broker.ray import build_processor

    kw.setdefault("preprocess", _question)
    kw.setdefault("concurrency", 1)
    kw.setdefault("num_cpus", 0.5)
    return build_processor(**kw)


def test_ray_imports_and_workers_run_this_llama_broker() -> None:
    import ray

    where = ray.get(ray.remote(lambda: __import__("llama_broker").__file__).remote(), timeout=60)
    assert os.path.realpath(where) == os.path.realpath(llama_broker.__file__)


def test_ten_thousand_rows_over_two_servers_exact_and_in_order() -> None:
    import pyarrow as pa
    import ray

    n = 10_000
    with LoopbackServer() as a, LoopbackServer() as b:
        a.script(echo)
        b.script(echo)
        proc = _procs(endpoints=[a.url, b.url], concurrency=2, batch_size=1000, streams_per_actor=16)
        ds = ray.data.range(n, override_num_blocks=10).map_batches(
            lambda t: t.append_column("tag", pa.array([f"t{i}" for i in t["id"].to_pylist()])), batch_format="pyarrow"
        )
        t0 = time.monotonic()
        rows = _take_all(proc(ds))
        took = time.monotonic() - t0
        assert len(rows) == n
        assert [r["id"] for r in rows] == list(range(n))  # none lost, none reordered
        for r in rows:
            i = r["id"]
            assert r["tag"] == f"t{i}"  # the input columns stay
            assert r["error"] is None, r
            assert r["generated_text"] == _answer(f"q{i}")
            assert r["finish_reason"] == "stop"
            assert r["usage"] == {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}
            assert r["timings"]["predicted_n"] == 6 and r["timings"]["prompt_ms"] == 12.5
        got = len(a.chat_requests()) + len(b.chat_requests())
        assert got == n  # one request per row, none sent twice
        assert min(len(a.chat_requests()), len(b.chat_requests())) > n // 5  # both servers did work
        sent = a.chat_requests()[0].json
        assert sent["stream"] is True and sent["max_tokens"] == 8 and sent["stream_options"] == {"include_usage": True}
    sys.stderr.write(f"\n10,000 rows in {took:.1f} s\n")


def test_a_server_killed_mid_run_loses_no_row() -> None:
    import ray

    n = 600
    with LoopbackServer() as a, LoopbackServer() as b:
        served = []
        lock = threading.Lock()

        def slow_echo(req: Request) -> Reply:
            with lock:
                served.append(1)
                if len(served) == 40:  # a's 40th request: the server dies while streams are open
                    threading.Thread(target=a.close, daemon=True).start()
            body = req.json
            toks = _answer_tokens(body["messages"][-1]["content"])
            return sse([data(e) if isinstance(e, dict) else e for e in _paced(toks, 0.01)])

        def paced_echo(req: Request) -> Reply:
            toks = _answer_tokens(req.json["messages"][-1]["content"])
            return sse([data(e) if isinstance(e, dict) else e for e in _paced(toks, 0.01)])

        a.script(slow_echo)
        b.script(paced_echo)
        proc = _procs(endpoints=[a.url, b.url], concurrency=1, batch_size=300, streams_per_actor=32)
        rows = _take_all(proc(ray.data.range(n)))
        assert [r["id"] for r in rows] == list(range(n))
        failed = [r for r in rows if r["error"] is not None]
        for r in rows:
            if r["error"] is None:
                assert r["generated_text"] == _answer(f"q{r['id']}")
        # every row was retried on b, and nothing came back twice or empty
        assert not failed, failed[:3]
        assert len(served) >= 40
        assert len(b.chat_requests()) > n - len(served)  # b took a's rows too
        assert a.outcomes.count("complete") < len(served)  # streams really were cut


def _paced(tokens: List[str], gap: float) -> List[Any]:
    out: List[Any] = [chunk({"role": "assistant", "content": None})]
    for t in tokens:
        out += [Stall(gap), chunk({"content": t})]
    out += [chunk({}, "stop"), usage_chunk(len(tokens)), DONE]
    return out


def test_non_streamed_rows_get_the_same_columns() -> None:
    import ray

    def whole(req: Request) -> Reply:
        body = req.json
        assert body["stream"] is False and "stream_options" not in body
        content = body["messages"][-1]["content"]
        if content == "q5":
            return api_error(400, "row five is refused", "invalid_request_error")
        out = {
            "id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": _answer(content)}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
            "timings": {"prompt_n": 3, "predicted_n": 6, "predicted_ms": 12.0},
        }
        return raw(200, json.dumps(out).encode(), "application/json")

    with LoopbackServer() as srv:
        srv.script(whole)
        proc = _procs(endpoints=[srv.url], batch_size=20, streams_per_actor=8, stream=False)
        rows = _take_all(proc(ray.data.range(20)))
        assert [r["id"] for r in rows] == list(range(20))
        for r in rows:
            if r["id"] == 5:
                assert "HTTP 400" in r["error"] and "row five is refused" in r["error"] and r["generated_text"] is None
                continue
            assert r["error"] is None and r["generated_text"] == _answer(f"q{r['id']}")
            assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 6
            assert r["timings"]["predicted_ms"] == 12.0 and r["timings"]["prompt_ms"] is None
        assert len(srv.chat_requests()) == 20


def test_an_invalid_row_gets_its_own_error_and_the_others_succeed() -> None:
    import ray

    def picky(req: Request) -> Reply:
        content = req.json["messages"][-1]["content"]
        if content in ("q7", "q33"):
            return api_error(400, f"the prompt of {content} is too long", "invalid_request_error")
        return echo(req)

    with LoopbackServer() as srv:
        srv.script(picky)
        proc = _procs(endpoints=[srv.url], batch_size=20, streams_per_actor=8)
        rows = _take_all(proc(ray.data.range(50)))
        assert [r["id"] for r in rows] == list(range(50))
        for r in rows:
            if r["id"] in (7, 33):
                assert r["error"].startswith("APIError: api: HTTP 400 (invalid_request_error): ")
                assert f"the prompt of q{r['id']} is too long" in r["error"]
                assert r["generated_text"] is None and r["usage"] is None and r["timings"] is None
            else:
                assert r["error"] is None and r["generated_text"] == _answer(f"q{r['id']}")
        # a 400 is final: sent once
        sent = [q.json["messages"][-1]["content"] for q in srv.chat_requests()]
        assert sent.count("q7") == 1 and len(sent) == 50

        strict = _procs(endpoints=[srv.url], batch_size=20, streams_per_actor=8, raise_on_error=True)
        with pytest.raises(Exception, match=r"HTTP 400 \(invalid_request_error\): the prompt of q(7|33) is too long"):
            _take_all(strict(ray.data.range(50)))


def test_a_batch_of_only_failures_and_rows_without_timings_keep_one_schema() -> None:
    import pyarrow as pa
    import ray
    from llama_broker.ray import output_schema

    def first_batch_fails(req: Request) -> Reply:
        i = int(req.json["messages"][-1]["content"][1:])
        if i < 10:
            return api_error(422, "nope", "invalid_request_error")
        if i < 20:
            return ok(["plain"])  # no usage chunk: usage and timings null
        return echo(req)

    with LoopbackServer() as srv:
        srv.script(first_batch_fails)
        proc = _procs(endpoints=[srv.url], batch_size=10, streams_per_actor=4)
        ds = proc(ray.data.range(40, override_num_blocks=4)).materialize()
        schema = ds.schema().base_schema
        want = output_schema("chat")
        for f in want:
            assert schema.field(f.name).type == f.type, f.name
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        assert table.num_rows == 40
        rows = table.to_pylist()
        assert all(r["error"] and "HTTP 422" in r["error"] for r in rows[:10])
        assert all(r["generated_text"] == "plain" and r["usage"] is None and r["timings"] is None for r in rows[10:20])
        assert all(r["generated_text"] == _answer(f"q{r['id']}") for r in rows[20:])
        assert len(ds.to_pandas()) == 40


def test_postprocess_maps_successes_and_failed_rows_keep_their_columns() -> None:
    import ray

    def some_fail(req: Request) -> Reply:
        if req.json["messages"][-1]["content"] == "q3":
            return api_error(400, "bad", "invalid_request_error")
        return echo(req)

    with LoopbackServer() as srv:
        srv.script(some_fail)
        proc = _procs(
            endpoints=[srv.url],
            batch_size=8,
            postprocess=lambda row: {"id": row["id"], "answer": row["generated_text"].upper()},
        )
        rows = _take_all(proc(ray.data.range(8)))
        assert [r["id"] for r in rows] == list(range(8))
        assert rows[0]["answer"] == _answer("q0").upper() and rows[0]["error"] is None
        assert rows[3]["answer"] is None and "HTTP 400" in rows[3]["error"] and rows[3]["generated_text"] is None


def _text_events(tokens: List[str]) -> List[bytes]:
    def c(text: str, finish: Any = None) -> Dict[str, Any]:
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": None}]}

    out = [data(c(t)) for t in tokens] + [data(c("", "length"))]
    usage = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 3, "completion_tokens": len(tokens), "total_tokens": 3 + len(tokens)}}
    return out + [data(usage), b"data: [DONE]\n\n"]


def test_completions_kind() -> None:
    import ray

    def complete(req: Request) -> Reply:
        return sse(_text_events(["<", req.json["prompt"], ">"]))

    with LoopbackServer() as srv:
        srv.route("/v1/completions", complete)
        proc = _procs(
            endpoints=[srv.url], kind="completions", preprocess=lambda r: {"prompt": f"p{r['id']}", "max_tokens": 3},
            batch_size=25, model="small",
        )
        rows = _take_all(proc(ray.data.range(50)))
        assert [r["generated_text"] for r in rows] == [f"<p{i}>" for i in range(50)]
        assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3 for r in rows)
        assert all(r["timings"] is None and r["error"] is None for r in rows)
        reqs = [r for r in srv.requests if r.path == "/v1/completions"]
        assert len(reqs) == 50 and reqs[0].json["model"] == "small" and reqs[0].json["stream"] is True


def _vec(text: str) -> List[float]:
    i = int(text[1:])
    return [float(i), i + 0.5, -1.25 * i, 1.0 / 3.0]


def embeddings_handler(req: Request) -> Reply:
    body = req.json
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    if len(inputs) > 1 and "bad" in inputs:
        return api_error(400, "input 'bad' is not valid", "invalid_request_error")
    if inputs == ["bad"]:
        return api_error(400, "input 'bad' is not valid", "invalid_request_error")
    items = [
        {"embedding": base64.b64encode(struct.pack("<4f", *_vec(t))).decode(), "index": k, "object": "embedding"}
        for k, t in enumerate(inputs)
    ]
    items.reverse()  # the server's order is not the inputs' order: index says
    out = {"model": "m", "object": "list", "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
           "data": items}
    return raw(200, json.dumps(out).encode(), "application/json")


def test_embeddings_kind_groups_inputs_and_a_bad_input_fails_alone() -> None:
    import pyarrow as pa
    import ray

    def text(row: Dict[str, Any]) -> Dict[str, Any]:
        return {"input": "bad" if row["id"] == 45 else f"e{row['id']}"}

    with LoopbackServer() as a, LoopbackServer() as b:
        a.route("/v1/embeddings", embeddings_handler)
        b.route("/v1/embeddings", embeddings_handler)
        proc = _procs(endpoints=[a.url, b.url], kind="embeddings", preprocess=text, batch_size=100,
                      inputs_per_request=16)
        ds = proc(ray.data.range(200, override_num_blocks=2)).materialize()
        assert ds.schema().base_schema.field("embedding").type == pa.list_(pa.float32())
        rows = ds.take_all()
        assert [r["id"] for r in rows] == list(range(200))
        for r in rows:
            if r["id"] == 45:
                assert r["embedding"] is None and "HTTP 400" in r["error"] and "input 'bad'" in r["error"]
            else:
                assert r["error"] is None
                assert list(r["embedding"]) == list(array("f", _vec(f"e{r['id']}")))
        reqs = [q for s in (a, b) for q in s.requests if q.path == "/v1/embeddings"]
        assert all(q.json["encoding_format"] == "base64" for q in reqs)
        # rows go in requests of up to 16 inputs; the refused one's rows went again one at a time, once each
        groups = [q.json["input"] for q in reqs if isinstance(q.json["input"], list)]
        singles = sorted(q.json["input"] for q in reqs if isinstance(q.json["input"], str))
        assert all(len(g) <= 16 for g in groups) and sum(len(g) for g in groups) == 200
        refused = [g for g in groups if "bad" in g]
        assert len(refused) == 1 and len(refused[0]) > 1
        assert singles == sorted(refused[0])
        assert len(a.requests) and len(b.requests)


def test_bad_settings_are_config_errors() -> None:
    from llama_broker.ray import build_processor

    with pytest.raises(ConfigError, match="kind must be one of"):
        build_processor(endpoints=["http://127.0.0.1:1"], preprocess=_question, kind="images")
    with pytest.raises(ConfigError, match="streams_per_actor must be a positive int"):
        build_processor(endpoints=["http://127.0.0.1:1"], preprocess=_question, streams_per_actor=0)
    with pytest.raises(ConfigError, match="endpoints must be a list"):
        build_processor(endpoints="http://127.0.0.1:1", preprocess=_question)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_processor(endpoints=["http://127.0.0.1:1"], preprocess=_question, no_such_setting=1)


def test_a_preprocess_without_messages_fails_its_row() -> None:
    import ray

    with LoopbackServer() as srv:
        srv.script(echo)
        proc = _procs(endpoints=[srv.url], batch_size=4,
                      preprocess=lambda r: _question(r) if r["id"] != 2 else {"prompt": "x"})
        rows = _take_all(proc(ray.data.range(4)))
        assert "ConfigError" in rows[2]["error"] and "'messages'" in rows[2]["error"]
        assert [r["error"] is None for r in rows] == [True, True, False, True]


# -- the real llama-server -------------------------------------------------------------


@pytest.mark.llama_server
def test_real_llama_server_chat(llama_server: LocalServer) -> None:
    import ray

    questions = ["What is 2 + 2?", "Name a colour.", "Say hello.", "What is the capital of France?"] * 2
    ds = ray.data.from_items([{"q": q, "n": i} for i, q in enumerate(questions)])
    proc = _procs(
        endpoints=[llama_server.endpoint], batch_size=8, streams_per_actor=4, temperature=0,
        preprocess=lambda r: {"messages": [{"role": "user", "content": r["q"]}], "max_tokens": 8},
    )
    rows = _take_all(proc(ds))
    assert [r["n"] for r in rows] == list(range(len(questions)))
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["generated_text"], r
        assert r["finish_reason"] in ("stop", "length")
        assert 0 < r["usage"]["completion_tokens"] <= 8
        assert r["timings"]["predicted_n"] == r["usage"]["completion_tokens"]


@pytest.fixture(scope="module")
def embedding_server() -> Iterator[LocalServer]:
    # one slot: with two, a text's vector depends on what shares its batch
    with LocalServer(parallel=1, ctx_per_slot=512, extra_args=["--embeddings", "--pooling", "mean"]) as srv:
        yield srv


@pytest.mark.llama_server
def test_real_llama_server_embeddings(embedding_server: LocalServer) -> None:
    import ray

    texts = ["The quick brown fox", "café 日本語", "a", "embeddings are vectors", "jumps over the lazy dog"]
    proc = _procs(
        endpoints=[embedding_server.endpoint], kind="embeddings", batch_size=5, inputs_per_request=2,
        preprocess=lambda r: {"input": r["text"], "cache_prompt": False},
    )
    rows = _take_all(proc(ray.data.from_items([{"text": t} for t in texts])))
    want = llama_broker.embed(llama_broker.ModelConfig(embedding_server.endpoint), texts, batch_size=1, cache_prompt=False)
    assert [r["text"] for r in rows] == texts
    for r, w in zip(rows, want):
        assert r["error"] is None
        assert len(r["embedding"]) == len(w) > 0
        assert max(abs(x - y) for x, y in zip(r["embedding"], w)) < 1e-4


def test_rows_queued_for_a_slot_are_not_failed_by_the_interactive_timeouts() -> None:
    # rows queue at the servers for minutes without a byte: the stage's
    # requests get batch jobs' bounds unless the caller sets their own
    from llama_broker.ray import STAGE_TIMEOUT_MS, build_processor

    proc = build_processor(endpoints=["http://127.0.0.1:1", "http://127.0.0.1:2"], preprocess=_question)
    assert [(c.timeout_ms, c.idle_timeout_ms) for c in proc.settings.endpoints] == [(STAGE_TIMEOUT_MS, None)] * 2
    assert STAGE_TIMEOUT_MS > llama_broker.ModelConfig("http://h").timeout_ms
    own = build_processor(endpoints=["http://127.0.0.1:1"], preprocess=_question, timeout_ms=5000, idle_timeout_ms=700)
    assert (own.settings.endpoints[0].timeout_ms, own.settings.endpoints[0].idle_timeout_ms) == (5000, 700)
