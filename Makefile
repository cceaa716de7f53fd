# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-pythons test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

## The main job: the simulated LLM workload on a local Ray, with a results table and a chart.
demo: setup
	$(PY) -m ray_quota.demo

## The whole default test suite, with the type checker first.
test: setup
	$(PY) -m mypy
	$(PY) -m pytest

## The core suite on Python 3.11, 3.12 and 3.13 and the whole suite on 3.11 (noxfile.py), each in
## a fresh virtualenv installed from pyproject.toml. Not part of `make test`: the installs take long.
test-pythons: setup
	$(VENV)/bin/nox

## Every benchmark against its baselines: bench/results.md and bench/*.png (under 10 minutes).
bench: setup
	$(PY) -m bench

## Long soak, load and benchmark variants.
test-slow: setup
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .hypothesis
