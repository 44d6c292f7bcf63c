#!/usr/bin/env bash
# Build the libFuzzer harness for the C SSE splitter and fuzz it.
#
#   fuzz/run.sh [seconds] [extra libFuzzer flags...]
#
# seconds defaults to 60. Builds with clang -fsanitize=fuzzer,address,undefined
# into fuzz/out/, fuzzes a copy of fuzz/corpus/ in fuzz/corpus-work/ (both
# gitignored), writes crash inputs to fuzz/out/, prints the execution count,
# and exits non-zero when the fuzzer found a crash.
# Needs (Debian 12): apt-get install clang libclang-rt-14-dev
# LB_SSE_CSRC=/path/to/csrc fuzzes another copy of the C (to try a fix).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
secs="${1:-60}"
shift || true
csrc="${LB_SSE_CSRC:-$root/csrc}"
cc="${CC_FUZZ:-clang}"
out="$here/out"
work="$here/corpus-work"

mkdir -p "$out" "$work"
"$cc" -std=c99 -g -O1 -Wall -Wextra -Werror \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    -I "$csrc" "$here/fuzz_lb_sse.c" "$csrc/lb_sse.c" "$csrc/lb_json.c" -o "$out/fuzz_lb_sse"

cp -n "$here"/corpus/* "$work"/ 2>/dev/null || true

log="$out/fuzz.log"
set +e
ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" \
UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
"$out/fuzz_lb_sse" -max_total_time="$secs" -print_final_stats=1 -max_len=8192 \
    -artifact_prefix="$out/" "$@" "$work" >"$log" 2>&1
rc=$?
set -e

execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)"
if [ -z "$execs" ]; then
    # a crash stops libFuzzer before its final stats: take the last status line
    execs="$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || true)"
fi
echo "lb_sse fuzz: ${execs:-0} executions in up to ${secs}s, exit code $rc (log: $log)"
if [ "$rc" -ne 0 ]; then
    grep -E 'lb_sse fuzz:|ERROR:|SUMMARY:|Test unit written|runtime error' "$log" | head -20 >&2 || true
    exit "$rc"
fi
