"""The C splitter builds cleanly with strict warnings and passes its C driver
(tests/c/test_lb_sse.c) under AddressSanitizer and UndefinedBehaviorSanitizer."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SRC = os.path.join(CSRC, "lb_sse.c")
JSON_SRC = os.path.join(CSRC, "lb_json.c")  # the content fast path lb_sse.c calls
DRIVER = os.path.join(ROOT, "tests", "c", "test_lb_sse.c")

STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-Wconversion", "-Wshadow", "-pedantic"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _missing(what: str) -> None:
    """gcc is always required. clang is installed by .ci/run, so under CI a
    missing clang fails; on a developer machine without it, the clang
    variants are skipped with this reason (the gcc ones still run)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI installs clang and libclang-rt-14-dev: see .ci/run)")
    pytest.skip(f"{what}: install clang and libclang-rt-14-dev to run the clang variants")


def _compiler(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if name == "gcc":
            pytest.fail("gcc is needed to build the C splitter")
        _missing(f"{name} not installed")
    return path


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    return res


@pytest.mark.parametrize("src", [SRC, JSON_SRC], ids=["lb_sse", "lb_json"])
@pytest.mark.parametrize("cc", ["gcc", "clang"])
@pytest.mark.parametrize("opt", ["-O0", "-O2"])
def test_strict_warnings(cc, opt, src, tmp_path):
    exe = _compiler(cc)
    res = _run([exe, *STRICT, opt, "-I", CSRC, "-c", src, "-o", str(tmp_path / "out.o")])
    assert res.returncode == 0, res.stderr


def test_header_compiles_alone(tmp_path):
    exe = _compiler("gcc")
    src = tmp_path / "h.c"
    src.write_text('#include "lb_sse.h"\nint main(void) { return LB_SSE_FIELDS == 6 ? 0 : 1; }\n')
    res = _run([exe, *STRICT, "-I", CSRC, str(src), "-o", str(tmp_path / "h")])
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_c_driver_under_sanitizers(cc, tmp_path):
    exe = _compiler(cc)
    out = tmp_path / "test_lb_sse"
    res = _run([exe, *STRICT, "-g", "-O1", *SANITIZE, "-I", CSRC, DRIVER, SRC, JSON_SRC, "-o", str(out)])
    if res.returncode != 0 and cc == "clang" and "cannot find" in res.stderr:
        _missing("clang's sanitizer runtime is not installed: " + res.stderr.strip()[-200:])
    assert res.returncode == 0, res.stderr
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    run = _run([str(out)], env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "checks passed" in run.stdout


def test_feed_null_empty_chunk(tmp_path):
    exe = _compiler("clang")
    src = tmp_path / "null0.c"
    src.write_text(
        '#include "lb_sse.h"\n'
        "int main(void) {\n"
        "    lb_sse *s = lb_sse_new(16);\n"
        "    long n = s ? lb_sse_feed(s, 0, 0) : -9;\n"
        "    lb_sse_free(s);\n"
        "    return n == 0 ? 0 : 1;\n"
        "}\n"
    )
    out = tmp_path / "null0"
    res = _run([exe, "-std=c99", "-g", *SANITIZE, "-I", CSRC, str(src), SRC, JSON_SRC, "-o", str(out)])
    if res.returncode != 0 and "cannot find" in res.stderr:
        _missing("clang's sanitizer runtime is not installed")
    assert res.returncode == 0, res.stderr
    run = _run([str(out)])
    assert run.returncode == 0, run.stderr
