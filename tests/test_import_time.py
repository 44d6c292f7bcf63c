"""``import llama_broker`` stays cheap: asyncio, the native/OpenAI layers, logging,
orjson and email load on first use.

A module-set check (what ``python -X importtime`` lists), not a time check:
the time depends on the machine, the set does not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Set

import llama_broker

ROOT = str(Path(llama_broker.__file__).resolve().parent.parent)

#: never imported by `import llama_broker` (top-level packages, or llama_broker submodules)
NOT_AT_IMPORT = (
    "asyncio",
    "ssl",
    "openai",
    "httpx",
    "llama_broker.native",
    "llama_broker.openai",
    "llama_broker.server",
    "llama_broker.embeddings",
    "llama_broker.jobs",
    "llama_broker.batch",
    "llama_broker.ray",
    "ray",
    "pyarrow",
)


#: not imported by `import llama_broker` itself (a module the interpreter's start-up
#: already loaded, e.g. through a .pth file, does not count): what a request or a
#: failure needs, imported when it happens
NOT_ADDED_AT_IMPORT = (
    "logging",  # llama_broker._log: the package logger is made at the first log call
    "email",  # policy.retry_after_s: only a Retry-After HTTP date needs it
    "orjson",  # decoder: at the first payload the C fast path leaves to Python
    "uuid",  # (orjson's)
    "zoneinfo",  # (orjson's)
    "socket",  # the SyncEngine's wake-up pair, made with the engine
    "random",  # policy: backoff jitter, after a failure
    "llama_broker.fanout",  # map()/amap()/MapResult
)


def _imported(code: str) -> Set[str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONASYNCIODEBUG", None)
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    mods = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                mods.add(name)
    return mods


def test_import_llama_broker_does_not_load_asyncio_or_the_native_layer():
    mods = _imported("import llama_broker; assert llama_broker.__file__.startswith(%r)" % ROOT)
    assert "llama_broker.broker" in mods and "pycurl" in mods  # (the listing works)
    loaded = sorted(m for m in mods if any(m == n or m.startswith(n + ".") for n in NOT_AT_IMPORT))
    assert not loaded, f"`import llama_broker` imported {loaded}"


def test_lazy_names_resolve():
    code = (
        "import sys, llama_broker as lb\n"
        "from llama_broker import ChatReply, ToolCall, chat_completion\n"
        "from llama_broker.native import ChatReply as C\n"
        "from llama_broker import embed, aembed, rerank\n"
        "assert callable(embed) and callable(aembed) and callable(rerank)\n"
        "assert ChatReply is C and callable(chat_completion) and ToolCall is not None\n"
        "assert set(lb.__all__) <= set(dir(lb))\n"
        "assert all(getattr(lb, n) is not None for n in lb.__all__)\n"
        "try:\n"
        "    lb.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "assert 'llama_broker.native' in sys.modules\n"
    )
    mods = _imported(code)
    assert "llama_broker.native" in mods


def test_the_asyncio_calls_still_work_after_a_cheap_import():
    code = (
        "import asyncio, llama_broker as lb\n"
        "async def go():\n"
        "    b = lb.Broker(lb.ModelConfig('http://127.0.0.1:9', connect_timeout_ms=200, timeout_ms=500, max_retries=0))\n"
        "    try:\n"
        "        await b.achat([{'role': 'user', 'content': 'x'}])\n"
        "    except lb.BrokerError:\n"
        "        pass\n"
        "    finally:\n"
        "        b.close()\n"
        "asyncio.run(go())\n"
    )
    assert "asyncio" in _imported(code)


def test_import_llama_broker_ray_does_not_load_ray_or_pyarrow():
    # the module is pickled by reference into every actor: importing it stays cheap,
    # and Ray and pyarrow load only when a processor is built or a batch runs
    mods = _imported("import llama_broker.ray as r; assert callable(r.build_processor)")
    assert "llama_broker.ray" in mods and "llama_broker.jobs" in mods
    loaded = sorted(m for m in mods if m.split(".")[0] in ("ray", "pyarrow"))
    assert not loaded, f"`import llama_broker.ray` imported {loaded[:10]}"


def test_import_llama_broker_leaves_logging_orjson_and_email_for_later():
    at_start = _imported("pass")
    added = _imported("import llama_broker") - at_start
    assert "llama_broker.decoder" in added  # (the listing works)
    loaded = sorted(m for m in added if any(m == n or m.startswith(n + ".") for n in NOT_ADDED_AT_IMPORT))
    assert not loaded, f"`import llama_broker` imported {loaded}"


def test_the_lazy_logger_and_decoder_behave_as_eager_ones():
    # A warning logged before the application configured logging goes nowhere
    # (the package's NullHandler, attached when the logger is first used), an
    # application's own handler gets it, and the layers above get the real
    # JSON decoder.
    code = (
        "import logging, sys, llama_broker\n"
        "from llama_broker.decoder import StreamDecoder\n"
        "dec = StreamDecoder([].append)\n"
        "dec.feed_bytes(b'data: {not json\\n\\n')\n"
        "assert dec.result.skipped == 1, dec.result\n"
        "lg = logging.getLogger('llama_broker')\n"
        "assert any(type(h) is logging.NullHandler for h in lg.handlers), lg.handlers\n"
        "got = []\n"
        "class H(logging.Handler):\n"
        "    def emit(self, r): got.append(r.getMessage())\n"
        "logging.getLogger().addHandler(H())\n"
        "StreamDecoder([].append).feed_bytes(b'data: {again\\n\\n')\n"
        "assert got and 'undecodable' in got[0], got\n"
        "from llama_broker.decoder import json_loads\n"
        "try:\n"
        "    import orjson\n"
        "except ImportError:\n"
        "    orjson = None\n"
        "assert orjson is None or json_loads is orjson.loads, json_loads\n"
        "assert json_loads(b'[1]') == [1]\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == "", out.stderr  # the skipped payload's warning was not printed
