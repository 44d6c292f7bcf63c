#!/usr/bin/env bash
# scripts/test_installed.sh PYTHON DIST VENV [pytest args...]
#
# Runs the test suite against the package as a user installs it: the wheel in
# DIST (built by `make dist` from the sdist) goes into a clean virtual
# environment VENV (recreated) with its [server,test,ray] extras; the tests come
# from the sdist in DIST, unpacked into a temporary directory with its
# llama_broker/ sources removed, so nothing can import the checkout.
# conftest.py checks that again (LLAMA_BROKER_TEST_INSTALLED=1).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$1" dist="$(cd "$2" && pwd)" venv="$3"
shift 3

shopt -s nullglob
sdists=("$dist"/llama_broker-*.tar.gz)
wheels=("$dist"/llama_broker-*.whl)
if ((${#sdists[@]} != 1 || ${#wheels[@]} != 1)); then
  echo "expected one sdist and one wheel in $dist (make dist), found: ${sdists[*]} ${wheels[*]}" >&2
  exit 2
fi

echo "== clean virtual environment $venv"
"$py" -m venv --clear "$venv"
vpy="$(cd "$venv" && pwd)/bin/python"
echo "== install ${wheels[0]##*/} [server,test,ray] into it"
bash "$here/pip_install.sh" "$vpy" -q "${wheels[0]}[server,test,ray]"
# the [ray] extra must give a working Ray Data in this venv (tests/test_ray.py runs on it)
"$vpy" -c 'import ray, ray.data, pyarrow; print("== ray", ray.__version__, "pyarrow", pyarrow.__version__)'

work="$(mktemp -d "${TMPDIR:-/tmp}/llama_broker-tests.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tar -xzf "${sdists[0]}" -C "$work"
src=("$work"/llama_broker-*)
rm -rf "${src[0]}/llama_broker"  # the tests must import the installed copy
cd "${src[0]}"
echo "== pytest from the sdist's tests ($PWD) against $("$vpy" -c 'import llama_broker, os; print(os.path.dirname(llama_broker.__file__))')"
LLAMA_BROKER_TEST_INSTALLED=1 LLAMA_BROKER_DIST="$dist" \
  "$vpy" -m pytest -p no:cacheprovider "$@"
