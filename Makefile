# secure-ml: `make demo` runs the whole pipeline; `make test` runs every test.
# Both set everything up first, from the hashed lock file, and are quick when nothing changed.

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
export SECURE_ML_HOME ?= $(CURDIR)/.secure_ml
export DAGSTER_HOME   ?= $(SECURE_ML_HOME)/dagster
# Nothing phones home: DVC and Dagster analytics are off everywhere we run.
export DVC_NO_ANALYTICS := 1
export DAGSTER_DISABLE_TELEMETRY := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install init demo test ui bench lock system-deps clean fuzz crash

help:
	@echo "make demo    set up and run the whole pipeline on the bundled sample data"
	@echo "make test    set up and run every test"
	@echo "make ui      the Dagster UI on http://127.0.0.1:3000 (sensors and schedules on)"
	@echo "make bench   the benchmarks (figures as ratios to same-run baselines)"
	@echo "make fuzz    the property-based tests with long runs (FUZZ=1)"
	@echo "make crash   SIGKILL the CLI 200+ times across every stage, check recovery (long)"
	@echo "make lock    re-resolve requirements.in into requirements.lock (hashed)"

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation --no-index -e . >/dev/null
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

init: install
	$(BIN)/secure-ml init

# The pipeline registers a candidate; a second person approves it (carol, an approver) and a third
# deploys it (dave, a deployer) after the deploy gate re-verifies it from its bytes.
demo: init
	$(BIN)/secure-ml pipeline run
	$(BIN)/secure-ml approve staging --as carol
	SECURE_ML_ACTOR=dave $(BIN)/secure-ml deploy
	$(BIN)/secure-ml status
	$(BIN)/secure-ml audit verify

# Browser tests need Debian's chromium; the storage tests need a PostgreSQL server binary.
system-deps:
	@bash scripts/system-deps.sh

# Two workers (the machine has two cores); a module's tests stay on one worker, so module-scoped
# servers (PostgreSQL, the Dagster webserver) start once.
PYTEST_ARGS ?= -n 2 --dist loadfile
test: install system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

ui: init
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# The fast lane runs the same property-based tests with few examples; FUZZ=1 runs 50x more.
fuzz: install
	FUZZ=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz_parsers.py tests/test_serving_abuse.py

# Not in `make test`: hours on a loaded two-core machine. Prints the README's table.
CRASH_ARGS ?= --kills 200 --seed 7
crash: install
	$(BIN)/python -m bench.crash_harness $(CRASH_ARGS)

lock:
	$(PYTHON) -m venv /tmp/secure-ml-lock && /tmp/secure-ml-lock/bin/pip install -q pip==25.3
	/tmp/secure-ml-lock/bin/pip install --dry-run --ignore-installed --report /tmp/secure-ml-lock.json -r requirements.in
	/tmp/secure-ml-lock/bin/python scripts/lock.py /tmp/secure-ml-lock.json > requirements.lock

clean:
	rm -rf $(VENV) .secure_ml test-artifacts
