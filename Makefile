# The two quickstart commands (see README.md). Both set up .venv first, idempotently.
.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/python examples/remote_fit.py --store file://$(CURDIR)/demo-runs/store
	.venv/bin/python examples/quickstart.py

# Lint, format check and type check first (seconds), then the suite on 4 workers: most tests wait
# on subprocesses and stores, so 4 workers keep 2 cores busy (6 were slower: 10m20s against 9m09s).
# --maxschedchunk 1: tests go to workers one at a time, the ones marked slow first (tests/conftest.py),
# so the run does not end on one long test alone. PYTEST_ARGS overrides both.
PYTEST_ARGS ?= -n 4 --maxschedchunk 1
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
