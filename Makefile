# Sluice: `make demo` and `make test` work on a fresh machine; each creates .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-slow lint proto bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# constraints.txt pins torch==2.13.0 (the CPU build on local disk) and everything else.
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m clients.demo

test: install lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# A release of a model with more than 2 GiB of weights (two-file layout): ~1 min, ~5 GB RAM.
test-slow: install
	SLUICE_SLOW=1 $(BIN)/python -m pytest -q tests/slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

proto: install
	$(BIN)/python -m gateway.protogen

bench: install
	$(BIN)/python -m bench.bench_first

clean:
	rm -rf $(VENV) .sluice .mypy_cache .ruff_cache .pytest_cache
