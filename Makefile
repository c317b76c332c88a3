# The two quickstart commands (see README.md). Both set up .venv first, idempotently.
.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/python examples/remote_fit.py --store file://$(CURDIR)/demo-runs/store
	.venv/bin/python examples/quickstart.py

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	.venv/bin/python benchmarks/checkpoint_stall.py
