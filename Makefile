# make demo  - set up .venv and run the whole pipeline on a generated demo night
# make test  - set up .venv and run the test suite (what CI runs)
# make lint  - ruff and snakemake --lint
# make bench - the performance benchmark (see bench/README.md)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/python -m imgproc.demo demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p $(VENV)/lint-input && $(BIN)/snakemake --lint --snakefile Snakefile --config input_dir=$(CURDIR)/$(VENV)/lint-input output_dir=$(CURDIR)/$(VENV)/lint-output

# The benchmark has a venv of its own, without the SLURM executor plugin of the test extra: with
# slurm-client installed but no controller reachable, that plugin makes every Snakemake start
# wait about 9 s (bench/README.md). Siril (bench/siril.py) comes from Debian when apt-get works.
BENCH_VENV ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
# The big-sensor nights (61-MP lights; about 22 GB of disk under BENCH_DATA, 30-40 minutes):
# `make bench BENCH_BIG=` leaves them out.
BENCH_BIG ?= 10,40
BENCH_DATA ?= bench/data
BENCH_DIR = $(abspath $(BENCH_DATA))

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	command -v siril-cli >/dev/null || (apt-get update -qq && apt-get install -y -qq siril) || echo "make bench: no Siril; bench/siril.py will be skipped"
	$(BENCH_VENV)/bin/python bench/run.py --repeat 2 --data $(BENCH_DIR)
	if [ -n "$(BENCH_BIG)" ]; then $(BENCH_VENV)/bin/python bench/run.py --big $(BENCH_BIG) --data $(BENCH_DIR); fi
	$(BENCH_VENV)/bin/python bench/register.py
	if command -v siril-cli >/dev/null; then $(BENCH_VENV)/bin/python bench/siril.py --data $(BENCH_DIR); fi

clean:
	rm -rf demo .pytest_cache
