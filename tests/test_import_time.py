"""``import llama_broker`` stays cheap: asyncio and the native/OpenAI layers load on first use.

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
