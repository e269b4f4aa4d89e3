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

bench: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py

clean:
	rm -rf demo .pytest_cache
