# `make demo` and `make test` each build .venv from nothing on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m dsnet_jax.complexity --model=ds_mbnet

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
