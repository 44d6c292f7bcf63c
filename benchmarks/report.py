"""Turn pytest-benchmark's ``--benchmark-json`` output into a markdown table.

    python benchmarks/report.py bench.json            # the table
    python benchmarks/report.py bench.json --check    # and fail on a gross regression

Columns: client, mode, events, events/s (best round), CPU µs/event (median
round), "× SDK" (the OpenAI SDK's CPU µs/event in the same mode over this
client's: how many times less CPU per event than the SDK — in bulk mode, where
every client is CPU-bound, that is also its speed-up), "× floor" (CPU
µs/event over the in-memory ``orjson.loads`` decode floor's: how many times the
bare cost of decoding), WRITEFUNCTION callbacks per event (the pycurl clients),
and a note. Rows are grouped by mode and sorted by CPU µs/event.

``--check`` compares entries of the same run only, as ratios: it exits 1 when
llama_broker end to end (``chat_stream``, bulk) delivers fewer events/s than
the pure-Python pycurl + ``json.loads`` path, times ``--margin`` (default
1.0), and 2 when either entry is missing from the file. Nothing else fails it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Tuple

MODE_ORDER = {"bulk": 0, "event": 1, "paced": 2, "memory": 3, "memory-event": 4}
SDK = "openai"
FLOOR = "orjson.loads"
CHECK_FAST = ("llama_broker", "bulk")
CHECK_SLOW = ("pycurl+json", "bulk")


def load(path: str, paired: bool = False) -> List[dict]:
    """The per-client rows (or, with ``paired``, the interleaved comparisons)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if paired:
            if info.get("paired"):
                rows.append(info)
        elif "client" in info and "events_per_s" in info:
            rows.append(info)
    return rows


def paired_table(rows: List[dict]) -> str:
    """The interleaved one-event-per-write comparisons: CPU µs/event and per-round ratios."""
    if not rows:
        return ""
    rows = sorted(rows, key=lambda r: MODE_ORDER.get(r["mode"], 9))
    clients = list(rows[0]["cpu_us_per_event"])
    ratios = list(rows[0]["ratio"])
    out = [
        "| mode | events | " + " | ".join(f"{c} CPU µs/event" for c in clients) + " | "
        + " | ".join(ratios) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in clients + ratios) + " |",
    ]
    for r in rows:
        cells = [_fmt_us(r["cpu_us_per_event"].get(c, float("nan"))) for c in clients]
        cells += [f"{r['ratio'].get(k, float('nan')):.2f}" for k in ratios]
        out.append(f"| {r['mode']} | {r['events']:,} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def _fmt_us(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def _cpu(r: dict) -> float:
    return r.get("cpu_us_per_event_median", r.get("cpu_us_per_event", 0.0))


def table(rows: List[dict], machine: str = "") -> str:
    by_key: Dict[Tuple[str, str], dict] = {(r["client"], r["mode"]): r for r in rows}
    sdk_cpu = {mode: _cpu(r) for (client, mode), r in by_key.items() if client == SDK}
    floor = by_key.get((FLOOR, "memory"))
    floor_cpu = _cpu(floor) if floor else None
    out = []
    if machine:
        out.append(machine)
        out.append("")
    out.append("| client | mode | events | events/s | CPU µs/event | × SDK | × floor | callbacks/event | note |")
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    # concurrency rows ("bulk ×64") group by their wire mode, then stream count
    rows = sorted(
        rows,
        key=lambda r: (MODE_ORDER.get(r.get("wire", r["mode"]), 9), r.get("streams", 0), r["mode"], _cpu(r)),
    )
    for r in rows:
        sdk, cpu = sdk_cpu.get(r["mode"]), _cpu(r)
        x_sdk = sdk / cpu if sdk and cpu > 0 else None
        x_floor = _cpu(r) / floor_cpu if floor_cpu else None
        cb = r.get("callbacks_per_event")
        note = r.get("note", "")
        if "mb_per_s" in r and r["mode"].startswith("memory"):
            note = f"{r['mb_per_s']:.0f} MB/s; {note}" if note else f"{r['mb_per_s']:.0f} MB/s"
        out.append(
            f"| {r['client']} | {r['mode']} | {r['events']:,} | {_fmt_rate(r['events_per_s'])} | "
            f"{_fmt_us(_cpu(r))} | {_fmt_ratio(x_sdk)} | {_fmt_ratio(x_floor)} | "
            f"{'' if cb is None else f'{cb:.2f}'} | {note} |"
        )
    return "\n".join(out)


def check(rows: List[dict], margin: float) -> Tuple[int, str]:
    by_key = {(r["client"], r["mode"]): r for r in rows}
    fast, slow = by_key.get(CHECK_FAST), by_key.get(CHECK_SLOW)
    if fast is None or slow is None:
        missing = [f"{c} ({m})" for (c, m), r in ((CHECK_FAST, fast), (CHECK_SLOW, slow)) if r is None]
        return 2, f"check: cannot compare, missing from the run: {', '.join(missing)}"
    ratio = fast["events_per_s"] / slow["events_per_s"]
    what = (
        f"llama_broker bulk {fast['events_per_s']:,.0f} events/s vs pycurl+json {slow['events_per_s']:,.0f} "
        f"events/s: {ratio:.2f}× (must be >= {margin:.2f}×)"
    )
    if ratio < margin:
        return 1, "check FAILED: " + what
    return 0, "check ok: " + what


def _machine(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        m = data.get("machine_info", {})
        cpu = m.get("cpu", {}).get("brand_raw", "")
        return f"_{m.get('python_implementation', '')} {m.get('python_version', '')}, {cpu}, {data.get('datetime', '')}_"
    except (OSError, ValueError, AttributeError):
        return ""


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="pytest-benchmark JSON -> markdown table")
    ap.add_argument("json", help="the file written by --benchmark-json")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if llama_broker (bulk) is slower than pycurl+json (bulk) in this run")
    ap.add_argument("--margin", type=float, default=1.0,
                    help="--check fails below this events/s ratio (default 1.0)")
    args = ap.parse_args(argv)
    rows = load(args.json)
    paired = paired_table(load(args.json, paired=True))
    if not rows and not paired:
        print(f"no llama_broker benchmark entries in {args.json}", file=sys.stderr)
        return 2
    if rows:
        print(table(rows, _machine(args.json)))
    if paired:
        print()
        print("One event per write, clients interleaved round by round (median of per-round ratios):")
        print()
        print(paired)
    if args.check:
        code, msg = check(rows, args.margin)
        print()
        print(msg)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
