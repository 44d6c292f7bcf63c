"""JobRunner with ``Job(stream=False)``: a chat or text completion asked for whole."""

from __future__ import annotations

import json

import llama_broker
from llama_broker.jobs import Job, JobRunner

from loopback import LoopbackServer, Request, Reply, api_error, raw


def _whole(req: Request) -> Reply:
    body = req.json
    if body["messages"][0]["content"] == "bad":
        return api_error(400, "bad prompt", "invalid_request_error")
    out = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "A" + body["messages"][0]["content"]},
                        "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    return raw(200, json.dumps(out).encode(), "application/json")


def test_a_whole_job_sends_stream_false_and_yields_the_servers_object() -> None:
    with LoopbackServer() as srv, llama_broker.Broker() as b:
        srv.script(_whole)
        jobs = [Job(i, "/v1/chat/completions", {"messages": [{"role": "user", "content": c}], "stream_options": {}},
                    stream=False) for i, c in enumerate(["x", "bad", "y"])]
        runner = JobRunner(iter(jobs), endpoints=[llama_broker.ModelConfig(srv.url)], concurrency=2)
        results = {r.key: r for r in runner.run_sync(b.sync_engine())}
        sent = [r.json for r in srv.chat_requests()]
        assert all(s["stream"] is False and "stream_options" not in s for s in sent)
        assert results[0].body["choices"][0]["message"]["content"] == "Ax"
        assert results[2].body["usage"]["total_tokens"] == 2
        assert results[1].status == 400 and "bad prompt" in str(results[1].error)
        assert len(sent) == 3  # the 400 is final


def test_jobs_stream_by_default() -> None:
    assert Job(0, "/v1/chat/completions", {"messages": []}).stream is True
