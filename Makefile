# The two quickstart commands (see README.md). Both set up .venv first, idempotently.
.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/python examples/remote_fit.py --store file://$(CURDIR)/demo-runs/store
	.venv/bin/python examples/quickstart.py

# Lint, format check and type check first (seconds), then the suite on 4 workers: most tests wait
# on subprocesses and stores, so 4 workers keep 2 cores busy (6 were slower: 10m20s against 9m09s).
# xdist's default scheduling: running the tests marked slow first, handed out one at a time, was
# slower on the same code and quiet machine (10m22s, 13.0 CPU-min, against 8m17s, 10.6 CPU-min):
# the heaviest tests started together contend for the 2 cores. PYTEST_ARGS overrides the workers.
PYTEST_ARGS ?= -n 4
test: setup
	.venv/bin/ruff check trainctl_lightning tests benchmarks examples scripts
	.venv/bin/ruff format --check trainctl_lightning tests benchmarks examples scripts
	.venv/bin/mypy
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check trainctl_lightning tests benchmarks examples scripts
	.venv/bin/ruff format --check trainctl_lightning tests benchmarks examples scripts
	.venv/bin/mypy

bench: setup
	.venv/bin/python benchmarks/checkpoint_stall.py
