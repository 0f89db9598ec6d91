# The two commands of the README: `make report` (the study) and `make test`.
# Each sets itself up first: a virtual environment with the pinned requirements.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
SEED ?= 0
RUNS ?= runs
TEST_WORKERS ?= 2

.PHONY: setup report test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The notebooks top to bottom and reports/report.html: real data from
# $$SKIN_LESION_DATA or data/ham10000 when present, else the synthetic demo set.
report: setup
	$(PY) -m skin_lesion report --profile $(PROFILE) --seed $(SEED) --runs $(RUNS)

# Two pytest workers keep both cores busy (one process alone averages about one);
# the tests that share the smoke study run on one of them (tests/conftest.py).
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

bench: setup
	$(PY) bench/pipeline.py
	$(PY) bench/inference.py
	$(PY) bench/frozen_cache.py
	$(PY) bench/metrics.py
	$(PY) bench/tracing.py
	$(PY) bench/export.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf reports/figures reports/executed reports/report.html .pytest_cache
