"""Turn pytest-benchmark's ``--benchmark-json`` output into markdown tables.

    python benchmarks/report.py bench.json                  # the tables
    python benchmarks/report.py bench.json --check          # and fail on a gross regression
    python benchmarks/report.py bench.json --check-paced    # and fail if map costs more than the floor

First the paced table (``test_paced.py``: a token every few ms per stream,
the regime of a real llama-server): per shape (gap, streams) and client, the
tokens per stream, wall time (median round; the pacing sets it: "ideal" is
tokens × gap), client CPU µs per token (median round), "× floor" (this
client's CPU per token over the floor's in the same round, median over
rounds; the floor is ``floor: easy.perform`` for one stream and ``floor:
multi per-wake`` for many), "× SDK" (the OpenAI SDK's CPU per token over this
client's, same rounds: how many times less CPU), "core @ rate" (the share of
one core this client needs for that many streams at the nominal token rate:
CPU per token × streams × tokens/s per stream), "server core" (the stream
server's CPU share during the run: it must stay well below 100% for the
figures to mean anything), "server late" (how late the server's pacer sent
each token on average: scheduling delay on a busy machine, or a server that
cannot keep up — late tokens arrive bunched, and a client reads several per
wake-up) and a note. Then the targets the project aims at,
with where this run stands (reported, not checked), the real
llama-server table if ``test_real.py`` ran, the import-time table if
``test_import.py`` ran (best and median wall ms of ``import llama_broker``,
``pycurl`` alone and the SDK, each in a fresh interpreter; the 40 ms target),
and the Ray Data stage table if ``test_ray.py`` ran (rows/s, CPU ms per row
of the whole Ray instance and of its workers, and each client's CPU per row
over llama_broker.ray's).

Then the bulk table. Columns: client, mode, events, events/s (best round), CPU µs/event (median
round), "× SDK" (the OpenAI SDK's CPU µs/event in the same mode over this
client's: how many times less CPU per event than the SDK — in bulk mode, where
every client is CPU-bound, that is also its speed-up), "× floor" (CPU
µs/event over the in-memory ``orjson.loads`` decode floor's: how many times the
bare cost of decoding), WRITEFUNCTION callbacks per event (the pycurl clients),
and a note. Rows are grouped by mode and sorted by CPU µs/event.

``--check`` compares entries of the same run only, as ratios: it exits 1 when
llama_broker end to end (``chat_stream``, bulk) delivers fewer events/s than
the pure-Python pycurl + ``json.loads`` path, times ``--margin`` (default
1.0), and 2 when either entry is missing from the file.

``--check-paced`` (passed by ``make bench-ci``) exits 1 when ``llama_broker.map`` on 64 paced streams
(``--paced-gap-ms``, default 20) costs more CPU per token than the per-wake
``CurlMulti`` floor in the same rounds (median per-round ratio above
``--paced-margin``, default 1.0), and 2 when that shape or either entry is
missing. Nothing else fails the report.
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


PACED_MAP = "llama_broker.map"
PACED_FLOOR = "floor: multi per-wake"


def load_paced(path: str, key: str = "paced_streams") -> List[dict]:
    """The paced-stream shapes (or, with ``key="real_server"``, the real llama-server runs)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    out = [(b.get("extra_info") or {}) for b in data.get("benchmarks", [])]
    return [i for i in out if i.get(key)]


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{x * 100:.0f}%" if x >= 0.1 else f"{x * 100:.1f}%"


def _late(us: Optional[float]) -> str:
    return "–" if us is None else f"{us / 1000:.1f} ms" if us >= 1000 else f"{us:.0f} µs"


def paced_table(shapes: List[dict]) -> str:
    """The paced streams: one row per (gap, streams, client), cheapest first within a shape."""
    if not shapes:
        return ""
    out = [
        "| gap | streams | client | tokens/stream | wall s (ideal) | CPU µs/token | × floor | × SDK | core @ rate "
        "| server core | server late | note |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for sh in sorted(shapes, key=lambda s: (s["streams"], s["gap_ms"])):
        rate = sh["streams"] * 1000 / sh["gap_ms"]
        for name, r in sorted(sh["clients"].items(), key=lambda kv: kv[1]["cpu_us_per_token_median"]):
            cpu = r["cpu_us_per_token_median"]
            out.append(
                f"| {sh['gap_ms']} ms | {sh['streams']} | {name} | {r['tokens_per_stream']:,} | "
                f"{r['wall_s']:.2f} ({r['wall_ideal_s']:.2f}) | {_fmt_us(cpu)} | {_fmt_ratio(r.get('x_floor'))} | "
                f"{_fmt_ratio(r.get('x_sdk'))} | {_pct(cpu * rate / 1e6)} | {_pct(r.get('server_core'))} | "
                f"{_late(r.get('pacer_late_mean_us'))} | {r.get('note', '')} |"
            )
        for name, why in (sh.get("skipped") or {}).items():
            out.append(f"| {sh['gap_ms']} ms | {sh['streams']} | {name} | | | | | | | | | skipped: {why} |")
    return "\n".join(out)


def _shape(shapes: List[dict], gap_ms: int, streams: int) -> Optional[dict]:
    return next((s for s in shapes if s["gap_ms"] == gap_ms and s["streams"] == streams), None)


def paced_targets(shapes: List[dict]) -> str:
    """Where this run stands against the project's paced-stream targets (reported, not checked)."""
    lines = []

    def best(sh: Optional[dict], names: Tuple[str, ...], key: str, low: bool) -> Optional[Tuple[str, float]]:
        if sh is None:
            return None
        got = [(n, sh["clients"][n].get(key)) for n in names if n in sh["clients"]]
        got = [(n, v) for n, v in got if v is not None]
        if not got:
            return None
        return (min if low else max)(got, key=lambda nv: nv[1])

    def verdict(ok: bool) -> str:
        return "met" if ok else "not yet"

    lb = ("llama_broker.map", "llama_broker.amap")
    sh = _shape(shapes, 20, 64)
    b = best(sh, lb, "x_floor", True)
    if b:
        lines.append(f"- 64 streams, 20 ms: best of map/amap ≤ 0.5× the per-wake floor: {b[0]} {b[1]:.2f}× ({verdict(b[1] <= 0.5)})")
    b = best(sh, lb, "x_sdk", False)
    if b:
        lines.append(f"- 64 streams, 20 ms: best of map/amap ≥ 20× AsyncOpenAI+gather: {b[0]} {b[1]:.1f}× ({verdict(b[1] >= 20)})")
    sh = _shape(shapes, 20, 256)
    b = best(sh, lb, "cpu_us_per_token_median", True)
    if b:
        share = b[1] * 256 * 50 / 1e6
        lines.append(f"- 256 streams at 50 tokens/s: one thread under 25% of a core: {b[0]} {share * 100:.0f}% ({verdict(share < 0.25)})")
    for gap in sorted({s["gap_ms"] for s in shapes}):
        sh = _shape(shapes, gap, 1)
        for name, limit in (("llama_broker.chat_stream", 1.1), ("llama_broker.stream", 1.25)):
            r = sh["clients"].get(name) if sh else None
            if r and r.get("x_floor") is not None:
                lines.append(f"- 1 stream, {gap} ms: {name.split('.')[1]} ≤ {limit}× the easy.perform floor: "
                             f"{r['x_floor']:.2f}× ({verdict(r['x_floor'] <= limit)})")
    return "\n".join(lines)


def real_table(runs: List[dict]) -> str:
    """The real llama-server runs: client CPU per token, per stream count."""
    if not runs:
        return ""
    out = [
        "| streams | client | tokens | wall s | CPU µs/token | × SDK | note |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in sorted(runs, key=lambda r: r["streams"]):
        for name, r in sorted(run["clients"].items(), key=lambda kv: kv[1]["cpu_us_per_token_median"]):
            out.append(
                f"| {run['streams']} | {name} | {r['tokens']:,} | {r['wall_s']:.2f} | "
                f"{_fmt_us(r['cpu_us_per_token_median'])} | {_fmt_ratio(r.get('x_sdk'))} | {r.get('note', '')} |"
            )
    return "\n".join(out)


RAY_OURS = "llama_broker.ray"


def ray_table(runs: List[dict]) -> str:
    """The Ray Data stage (``test_ray.py``): rows/s and CPU per row of the whole
    Ray instance and of its workers, and Ray's CPU per row ÷ llama_broker's."""
    if not runs:
        return ""
    ours = next((r for r in runs if r["client"] == RAY_OURS), None)
    out = [
        "| client | rows | in flight | rows/s (ideal) | start-up s | CPU ms/row, all | CPU ms/row, workers | × CPU/row | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(runs, key=lambda r: r["cpu_ms_per_row"]):
        x = ours["cpu_ms_per_row"] and r["cpu_ms_per_row"] / ours["cpu_ms_per_row"] if ours else None
        out.append(
            f"| {r['client']} | {r['rows']:,} | {r['in_flight']} | {r['rows_per_s']:.1f} ({r['ideal_rows_per_s']:.0f}) | "
            f"{r['startup_s']:.1f} | {r['cpu_ms_per_row']:.2f} | {r['cpu_ms_per_row_workers']:.2f} | "
            f"{_fmt_ratio(x) if x is not None else '–'} | {r.get('note', '')} |"
        )
    return "\n".join(out)


def check_paced(shapes: List[dict], gap_ms: int, margin: float) -> Tuple[int, str]:
    """``llama_broker.map`` on 64 paced streams must not cost more per token than the per-wake floor."""
    sh = _shape(shapes, gap_ms, 64)
    if sh is None:
        return 2, f"check-paced: cannot compare, no 64-stream shape at {gap_ms} ms in the run"
    missing = [n for n in (PACED_MAP, PACED_FLOOR) if n not in sh["clients"]]
    if missing:
        return 2, f"check-paced: cannot compare, missing from the run: {', '.join(missing)}"
    m, f = sh["clients"][PACED_MAP], sh["clients"][PACED_FLOOR]
    ratio = m.get("x_floor")
    if ratio is None:
        return 2, "check-paced: no per-round ratio recorded"
    what = (
        f"llama_broker.map on 64 streams at {gap_ms} ms: {m['cpu_us_per_token_median']:.1f} µs/token vs the "
        f"per-wake floor's {f['cpu_us_per_token_median']:.1f}: {ratio:.2f}× (must be <= {margin:.2f}×)"
    )
    if ratio > margin:
        return 1, "check-paced FAILED: " + what
    return 0, "check-paced ok: " + what


#: the import-time target: ``import llama_broker`` (best of the samples)
IMPORT_TARGET_MS = 40.0


def load_import(path: str) -> Dict[str, dict]:
    """The import-time samples (``test_import.py``): module -> best_ms, median_ms, runs."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if info.get("import_time"):
            return dict(info.get("modules") or {})
    return {}


def import_table(mods: Dict[str, dict]) -> str:
    """One row per module: best and median wall ms of ``import <module>`` in a fresh interpreter."""
    if not mods:
        return ""
    floor = mods.get("pycurl", {}).get("best_ms")
    out = [
        "| import | best ms | median ms | × pycurl | runs | note |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    notes = {"llama_broker": f"target ≤ {IMPORT_TARGET_MS:g} ms", "pycurl": "the transport alone (the floor)",
             "openai": "the OpenAI SDK"}
    for name, r in sorted(mods.items(), key=lambda kv: kv[1]["best_ms"]):
        x = r["best_ms"] / floor if floor else None
        out.append(f"| {name} | {r['best_ms']:.1f} | {r['median_ms']:.1f} | {_fmt_ratio(x)} | {r['runs']} | "
                   f"{notes.get(name, '')} |")
    lb = mods.get("llama_broker")
    if lb:
        ok = lb["best_ms"] <= IMPORT_TARGET_MS
        out.append("")
        out.append(f"- `import llama_broker` ≤ {IMPORT_TARGET_MS:g} ms: best {lb['best_ms']:.1f} ms "
                   f"({'met' if ok else 'not yet'})")
    return "\n".join(out)


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
    ap.add_argument("--check-paced", action="store_true",
                    help="exit 1 if llama_broker.map on 64 paced streams costs more CPU/token than the per-wake floor")
    ap.add_argument("--paced-gap-ms", type=int, default=20, help="the gap of the shape --check-paced looks at")
    ap.add_argument("--paced-margin", type=float, default=1.0,
                    help="--check-paced fails above this map ÷ floor ratio (default 1.0)")
    args = ap.parse_args(argv)
    rows = load(args.json)
    paired = paired_table(load(args.json, paired=True))
    shapes = load_paced(args.json)
    real = load_paced(args.json, key="real_server")
    rays = load_paced(args.json, key="ray_stage")
    imports = load_import(args.json)
    if not rows and not paired and not shapes and not real and not rays and not imports:
        print(f"no llama_broker benchmark entries in {args.json}", file=sys.stderr)
        return 2
    machine = _machine(args.json)
    if shapes:
        print("Paced streams (a token every gap per stream; client CPU per token, median round):")
        print()
        if machine:
            print(machine)
            print()
        print(paced_table(shapes))
        targets = paced_targets(shapes)
        if targets:
            print()
            print("Targets (reported, not checked):")
            print()
            print(targets)
        print()
    if real:
        print("Real llama-server (bundled model; client CPU per token, median round):")
        print()
        print(real_table(real))
        print()
    if rays:
        print(f"Ray Data stage ({rays[0]['tokens_per_row']} tokens a row, one every {rays[0]['gap_ms']} ms; rows/s and "
              "CPU once every actor has started, to the last row; all: every process of the Ray instance; "
              "× CPU/row: over llama_broker.ray's):")
        print()
        print(ray_table(rays))
    if imports:
        print("Import time (a fresh interpreter per sample, bytecode cached; wall ms of the import alone):")
        print()
        print(import_table(imports))
        print()
    if rows:
        print(table(rows, "" if shapes else machine))
    if paired:
        print()
        print("One event per write, clients interleaved round by round (median of per-round ratios):")
        print()
        print(paired)
    code = 0
    if args.check:
        c, msg = check(rows, args.margin)
        print()
        print(msg)
        code = max(code, c)
    if args.check_paced:
        c, msg = check_paced(shapes, args.paced_gap_ms, args.paced_margin)
        print()
        print(msg)
        code = max(code, c)
    return code


if __name__ == "__main__":
    sys.exit(main())
