# Two commands from a fresh clone: `make train` and `make test`. Both create .venv and install what they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install train test test-all lint bench catalog cluster-up cluster-down clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/dtrain train jobs/mlp_digits.yaml $(ARGS)

# One test process. XDIST='-n 2 --dist loadgroup' splits the suite over two (tests/conftest.py groups the Ray tests).
XDIST ?=

test: $(STAMP)
	$(BIN)/ruff check dtrain tests benchmarks
	$(BIN)/python -m pytest -q $(XDIST) --durations=30 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dtrain tests benchmarks

# A head + worker node(s) on 127.0.0.1 (WORKERS=1 CPUS_PER_NODE=1 DASHBOARD_PORT=8275 by default; see the script).
cluster-up: $(STAMP)
	RAY=$(CURDIR)/$(BIN)/ray bash cluster/local/up.sh

cluster-down:
	bash cluster/local/down.sh

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Benchmarks (not tests): overhead, start-up, ZeRO memory, precision (+ GPU when CUDA is there); one table at the end.
# BENCH_ARGS="--quick" checks that everything runs; "--sections overhead,zero" picks some.
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# The README's catalog table: every shipped catalog job run by `dtrain train`, beside its tuned peer (about 10 min).
# CATALOG_ARGS="--rows rbm_digits,som_digits" reruns some rows.
catalog: $(STAMP)
	$(BIN)/python -m benchmarks.catalog $(CATALOG_ARGS)

clean:
	rm -rf runs wandb .pytest_cache
