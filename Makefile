# tfdssm: `make demo` and `make test` each set up .venv first (Python 3.11-3.13).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tfdssm-installed
EXPORT_DIR ?= saved_models/movielens

.PHONY: setup demo serve test bench bench-data lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; \
	  sys.exit(0 if (3, 11) <= v <= (3, 13) else "tfdssm needs Python 3.11-3.13 (its TF/ScaNN wheels), found %d.%d: run make PYTHON=python3.11" % v)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tfdssm train --pipeline movielens --export-dir $(EXPORT_DIR)
	$(BIN)/python pipelines/movielens.py --export-dir $(EXPORT_DIR) --users 1,42,500

# After `make demo`: TF Serving's gRPC (8500) and REST (8501) APIs on loopback.
serve: $(STAMP)
	$(BIN)/tfdssm serve --export-dir $(EXPORT_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Long benchmarks (not CI): `make bench` (a full run also refreshes
# docs/benchmarks.md), or one suite: `make bench SUITES="--suite quality"`. The long versions of
# tests marked `bench` (1/8/32 clients, 23 killed exports, amplification
# requests from 4 clients, 6 slowly copied versions) and the README's long blocks
# (make demo, full trainings) run first; `make bench BENCH_TESTS=` skips them.
BENCH_TESTS ?= tests/test_load.py tests/test_reliability.py tests/test_readme.py
bench: $(STAMP) bench-data
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(if $(BENCH_TESTS),$(BIN)/python -m pytest -q -s -m bench $(BENCH_TESTS))
	$(BIN)/python -m benchmarks.run $(SUITES) $(BENCH_ARGS) \
	  $(if $(SUITES)$(BENCH_ARGS),,--readme docs/benchmarks.md)

# The text suite's corpora (Debian's man pages and English package descriptions);
# best effort: without root or apt the suite says which command it needs.
bench-data:
	-@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq -o Acquire::Languages=en && \
	  apt-get install -y -qq manpages manpages-dev >/dev/null; \
	else echo "make bench-data: not root or no apt-get; the text suite may ask for Debian packages"; fi

lint: $(STAMP)
	$(BIN)/ruff check tfdssm tests pipelines scripts

clean:
	rm -rf $(VENV) .pytest_cache
