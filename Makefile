# Thin targets; `make check` is the one gate for developers and CI (.ci/run calls it).
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
PYTEST_ARGS ?=

.PHONY: check format lint types test bench bench-full run

check: lint types test

format:
	$(PYTHON) -m ruff format policyd tests bench

lint:
	$(PYTHON) -m ruff format --check policyd tests bench
	$(PYTHON) -m ruff check policyd tests bench

types:
	$(PYTHON) -m mypy

test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

run:
	$(PYTHON) -m policyd

# bench: per question (floor, policyd, greylistd, postgrey) then per message through Exim;
# ~3.5 minutes. Both write bench/results/*.json and *.md (see bench/README.md).
bench:
	$(PYTHON) bench/run.py --quick
	$(PYTHON) bench/exim_msg.py --quick

bench-full:
	$(PYTHON) bench/run.py
	$(PYTHON) bench/exim_msg.py
	$(PYTHON) bench/variants.py --spf
	$(PYTHON) bench/memory.py
