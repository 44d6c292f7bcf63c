"""The package as a user gets it: the sdist, the wheel built from it, and the
installed copy the tests import.

``make test`` builds ``dist/`` (sdist, then the wheel from the unpacked sdist,
retagged manylinux by auditwheel) and runs this suite against that wheel
installed in a clean virtual environment, with ``LLAMA_BROKER_DIST`` naming
the directory. Without it (the editable dev loop) the sdist is made here with
``setup.py sdist`` and the wheel with ``pip wheel --no-build-isolation`` from
that sdist: the same path, offline, untagged.
"""

from __future__ import annotations

import email.parser
import glob
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import llama_broker
from installed_check import ENV, installed_problem, site_dirs

ROOT = Path(__file__).resolve().parent.parent  # the checkout, or the unpacked sdist under `make test`
DIST_ENV = "LLAMA_BROKER_DIST"
INSTALLED = bool(os.environ.get(ENV))

# What building the wheel needs from the sdist (and the tests need to run from it).
SDIST_MUST_HAVE = [
    "LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "PKG-INFO",
    "csrc/lb_sse.h", "csrc/lb_sse.c", "csrc/lb_json.h", "csrc/lb_json.c",
    "llama_broker/__init__.py", "llama_broker/_sse_build.py", "llama_broker/py.typed",
    "tests/conftest.py", "tests/c/test_lb_sse.c", "docs/ARCHITECTURE.md",
]


def _run(cmd: List[str], cwd: Path, timeout: float = 300) -> None:
    res = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """(sdist, wheel): ``$LLAMA_BROKER_DIST``'s, else built here from the checkout."""
    where = os.environ.get(DIST_ENV)
    if where:
        out = Path(where)
    else:
        if INSTALLED:
            pytest.fail(f"{ENV} is set: {DIST_ENV} must name the dist/ the installed wheel came from")
        out = tmp_path_factory.mktemp("dist")
        _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], ROOT)
        sdists = glob.glob(str(out / "*.tar.gz"))
        assert len(sdists) == 1, sdists
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir",
              "-w", str(out), sdists[0]], out)
    sdists = sorted(out.glob("llama_broker-*.tar.gz"))
    wheels = sorted(out.glob("llama_broker-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, (sdists, wheels)
    return sdists[0], wheels[0]


def _sdist_members(sdist: Path) -> Dict[str, tarfile.TarInfo]:
    with tarfile.open(sdist) as tf:
        members = tf.getmembers()
    top = f"llama_broker-{llama_broker.__version__}/"
    assert all(m.name == top.rstrip("/") or m.name.startswith(top) for m in members), "one top directory"
    return {m.name[len(top):]: m for m in members if m.name.startswith(top)}


def test_sdist_holds_what_the_build_needs(dist: Tuple[Path, Path]) -> None:
    sdist, _ = dist
    assert sdist.name == f"llama_broker-{llama_broker.__version__}.tar.gz"
    names = _sdist_members(sdist)
    missing = [n for n in SDIST_MUST_HAVE if n not in names]
    assert not missing, f"the sdist lacks {missing}"
    for name in names:  # no build output, no model, no cache
        assert not re.search(r"\.(so|o|pyc|gguf|whl)$", name), name
        assert not name.startswith(("build/", "dist/", ".benchmarks/", "fuzz/out/")), name
        assert name != "llama_broker/_sse.c", "cffi's generated C belongs to the build, not the sdist"


def test_license_is_mit_and_shipped(dist: Tuple[Path, Path]) -> None:
    sdist, wheel = dist
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    with tarfile.open(sdist) as tf:
        member = tf.extractfile(f"llama_broker-{llama_broker.__version__}/LICENSE")
        assert member is not None and member.read().decode() == text
    with zipfile.ZipFile(wheel) as zf:
        lic = [n for n in zf.namelist() if ".dist-info/" in n and n.endswith("LICENSE")]
        assert lic and zf.read(lic[0]).decode() == text
        meta = email.parser.Parser().parsestr(zf.read(_dist_info(zf) + "METADATA").decode())
    assert meta["License"] == "MIT" or meta["License-Expression"] == "MIT"


def _dist_info(zf: zipfile.ZipFile) -> str:
    return f"llama_broker-{llama_broker.__version__}.dist-info/"


def test_wheel_is_abi3_for_cpython_39_on(dist: Tuple[Path, Path]) -> None:
    _, wheel = dist
    # name-version-python-abi-platform.whl
    _name, version, py_tag, abi_tag, platform_tag = wheel.name[:-4].split("-")
    assert version == llama_broker.__version__
    assert (py_tag, abi_tag) == ("cp39", "abi3"), wheel.name
    if INSTALLED and sys.platform.startswith("linux"):
        assert "manylinux" in platform_tag, f"auditwheel did not tag {wheel.name}"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tags = [line.split(": ", 1)[1] for line in zf.read(_dist_info(zf) + "WHEEL").decode().splitlines()
                if line.startswith("Tag: ")]
    assert tags and all(t.startswith("cp39-abi3-") for t in tags), tags
    exts = [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]
    assert exts == ["llama_broker/_sse.abi3.so"], exts
    assert "llama_broker/py.typed" in names
    assert not any(n.endswith((".c", ".h", ".gguf")) for n in names), names


def _needed(path: str) -> List[str]:
    """The DT_NEEDED entries of a shared object (readelf comes with the C toolchain)."""
    res = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", res.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ELF dynamic section with readelf: wheels for Linux only")
def test_extension_links_only_libc(dist: Tuple[Path, Path], tmp_path: Path) -> None:
    _, wheel = dist
    with zipfile.ZipFile(wheel) as zf:
        zf.extract("llama_broker/_sse.abi3.so", tmp_path)
    assert _needed(str(tmp_path / "llama_broker" / "_sse.abi3.so")) == ["libc.so.6"]
    from llama_broker import _sse

    assert str(_sse.__file__).endswith("_sse.abi3.so"), _sse.__file__  # the imported one too
    assert _needed(str(_sse.__file__)) == ["libc.so.6"]


def test_version_is_single_sourced(dist: Tuple[Path, Path]) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.M), "a literal version in pyproject.toml"
    assert re.search(r'^dynamic\s*=\s*\[[^\]]*"version"', project, re.M)
    assert 'version = { attr = "llama_broker.__version__" }' in pyproject
    sdist, wheel = dist
    with zipfile.ZipFile(wheel) as zf:
        meta = email.parser.Parser().parsestr(zf.read(_dist_info(zf) + "METADATA").decode())
    assert meta["Version"] == llama_broker.__version__
    if INSTALLED:
        assert metadata.version("llama_broker") == llama_broker.__version__


def test_installed_check_tells_a_checkout_from_site_packages(tmp_path: Path) -> None:
    site = tmp_path / "venv" / "lib" / "site-packages"
    (site / "llama_broker").mkdir(parents=True)
    checkout = tmp_path / "checkout"
    (checkout / "llama_broker").mkdir(parents=True)
    tree = tmp_path / "tests-only"
    tree.mkdir()
    installed = str(site / "llama_broker" / "__init__.py")
    assert installed_problem(installed, [str(site)], str(tree)) is None
    problem = installed_problem(str(checkout / "llama_broker" / "__init__.py"), [str(site)], str(tree))
    assert problem and "not from site-packages" in problem
    problem = installed_problem(installed, [str(site)], str(checkout))
    assert problem and "its own" in problem


def test_this_run_imports_what_it_claims() -> None:
    """Under ``make test`` the package comes from the clean venv, never the checkout."""
    problem = installed_problem(llama_broker.__file__, site_dirs(), str(ROOT))
    if INSTALLED:
        assert problem is None, problem
        assert sys.prefix != getattr(sys, "base_prefix", sys.prefix), "not a virtual environment"
    else:
        # the dev loop: the checkout's copy (editable install or the worktree on sys.path)
        assert Path(llama_broker.__file__).resolve().parent.parent == ROOT, llama_broker.__file__
