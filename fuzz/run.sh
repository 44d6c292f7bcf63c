#!/usr/bin/env bash
# Build the libFuzzer harnesses for the C code and fuzz each for a while.
#
#   fuzz/run.sh [seconds] [extra libFuzzer flags...]
#
# seconds (default 60) is per target: fuzz_lb_sse (the SSE splitter with the
# content fast path; chunked vs whole must agree) and fuzz_lb_json (the chunk
# extractor alone, with a JSON dictionary). Builds with clang
# -fsanitize=fuzzer,address,undefined into fuzz/out/, fuzzes copies of the
# seed corpora in fuzz/corpus-work/ (both gitignored), writes crash inputs to
# fuzz/out/, prints the execution counts and exits non-zero on a crash.
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
mkdir -p "$out"

# fuzz NAME SEED_DIR MAX_LEN [flags...]
fuzz() {
    local name="$1" seeds="$2" max_len="$3"
    shift 3
    local dir="$work/$name" log="$out/$name.log" rc execs
    mkdir -p "$dir"
    "$cc" -std=c99 -g -O1 -Wall -Wextra -Werror -Wconversion -Wshadow \
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
        -I "$csrc" "$here/$name.c" "$csrc/lb_sse.c" "$csrc/lb_json.c" -o "$out/$name"
    cp -n "$seeds"/* "$dir"/ 2>/dev/null || true
    set +e
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" \
    UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
    "$out/$name" -max_total_time="$secs" -print_final_stats=1 -max_len="$max_len" \
        -artifact_prefix="$out/$name-" "$@" "$dir" >"$log" 2>&1
    rc=$?
    set -e
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)"
    if [ -z "$execs" ]; then
        # a crash stops libFuzzer before its final stats: take the last status line
        execs="$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || true)"
    fi
    echo "$name: ${execs:-0} executions in up to ${secs}s, exit code $rc (log: $log)"
    if [ "$rc" -ne 0 ]; then
        grep -E 'ERROR:|SUMMARY:|Test unit written|runtime error' "$log" | head -20 >&2 || true
        return "$rc"
    fi
}

fuzz fuzz_lb_sse "$here/corpus" 8192 "$@"
fuzz fuzz_lb_json "$here/corpus_json" 4096 -dict="$here/json.dict" "$@"
