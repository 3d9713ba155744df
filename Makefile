# Sluice: `make demo` and `make test` work on a fresh machine; each creates .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist), one module per worker at a time: the suite waits on
# sockets, subprocesses and deadlines about half the time, so two cores take ~half as long.
PYTEST_WORKERS ?= 2

.PHONY: install interop-deps demo test test-slow lint proto bench bench-quick soak clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# constraints.txt pins torch==2.13.0 (the CPU build on local disk) and everything else.
	$(BIN)/pip install -q -c constraints.txt -e '.[gateway,dev,ray]'
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# The Node.js client of tests/interop (grpc-js with default options), from its lock file.
NODE_DIR := tests/interop/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed-stamp

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund
	touch $(NODE_STAMP)

interop-deps: $(NODE_STAMP)

demo: install
	$(BIN)/python -m sluice.clients.demo

test: install lint interop-deps
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# A release of a model with more than 2 GiB of weights (two-file layout): ~1 min, ~5 GB RAM.
test-slow: install
	SLUICE_SLOW=1 $(BIN)/python -m pytest -q tests/slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

proto: install
	$(BIN)/python -m sluice.gateway.protogen

# The benchmark suite (bench/README.md): writes bench/results/latest.json and .md and
# rewrites the README's performance table. Full: ~20 min, ~30 GB of free disk.
bench: install
	$(BIN)/python -m bench

# The same code paths on small models in ~2 min (results in bench/results/latest-quick.*).
bench-quick: install
	$(BIN)/python -m bench --quick

# 64 trainers of drivenet-tiny against one gateway for 10 minutes, retention on: errors,
# RSS, open files, threads, disk (bench/README.md: Soak). Exits 1 on a FAIL.
soak: install
	$(BIN)/python -m bench.soak

clean:
	rm -rf $(VENV) .sluice .mypy_cache .ruff_cache .pytest_cache
