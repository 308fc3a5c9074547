# eva_jax: `make demo` runs the built-in end-to-end default, `make test` runs the test suite.
# Both create .venv and install what they need on first use (CPU jax; see README for GPU/TPU).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=15
DEMO_ARGS ?=

.PHONY: install install-test demo test bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-test.txt
	@touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install  ## the full built-in demo (10 min on 2 idle CPU cores, up to 2x on a slow machine); DEMO_ARGS=--config=configs/demo.py:short for the shortened one the tests run (7 min)
	$(PY) scripts/demo.py $(DEMO_ARGS)

test: install-test
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install-test
	$(PY) scripts/bench.py all --size tiny

clean:
	rm -rf $(VENV) outputs .pytest_cache
