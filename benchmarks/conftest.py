"""Fixtures for the benchmark suite: one stream server process per session."""

from __future__ import annotations

import os

import pytest

from ._harness import N, PACE_GAP_US, PACED_N, ROUNDS, SDK_N, SHORT
from .streamserver import ServerProcess


def pytest_report_header(config):
    return (
        f"llama_broker benchmarks: events={N} (openai SDK: {SDK_N}; paced mode: {PACED_N}, gap {PACE_GAP_US} us), "
        f"rounds={ROUNDS}{', short mode' if SHORT else ''}; "
        "set LB_BENCH_EVENTS / LB_BENCH_SHORT=1 / LB_BENCH_ROUNDS; "
        "paced suite (test_paced.py): LB_BENCH_PACED_GAPS_MS / _STREAMS / _TOKENS / _ROUNDS / _CLIENTS; "
        f"real llama-server (test_real.py): {'on' if os.environ.get('LB_BENCH_REAL', '') not in ('', '0') else 'off, LB_BENCH_REAL=1 to run'}"
    )


@pytest.fixture(scope="session")
def srv():
    """The stream server in its own process, every stream used here rendered ahead of time."""
    with ServerProcess() as s:
        for n in sorted({N, SDK_N, PACED_N, 0}):
            for mode in ("bulk", "event"):  # paced uses event's rendering
                s.warm(mode, n)
        yield s
