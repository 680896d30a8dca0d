# Two commands do all the set-up on a fresh machine:
#   make quickstart   # venv + install + the quickstart study on the embedded shapes data (minutes, CPU)
#   make test         # venv + install with test extras + ruff (pyflakes, import order, line length) + the suite
# TORCH pins the CPU build that this project is tested with; on a GPU machine use e.g. TORCH=torch==2.13.0
# from the CUDA index of your choice, or TORCH=torch to let pip choose.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: install quickstart test bench
install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/study run search_spaces/quickstart.yaml

test: $(VENV)/.installed
	$(VENV)/bin/ruff check study analysis tests benchmarks
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done
