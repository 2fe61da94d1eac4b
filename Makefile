# `make demo` and `make test` each build .venv from nothing on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# One pytest worker per core, at most 4 (each trains the suite's shared tiny run once).
TEST_WORKERS ?= -n auto --maxprocesses=4 --dist worksteal

.PHONY: demo test clean

# ONNX export (the tests run it): jax2onnx without its unused orbax-checkpoint pin.
JAX2ONNX := jax2onnx==0.17.1

$(VENV)/.installed: requirements.txt requirements-export.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-export.txt
	$(PY) -m pip install -q --no-deps $(JAX2ONNX)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Both stages on Fashion-MNIST on the CPU, then the route table and the gated result.
demo: $(VENV)/.installed $(FMNIST_DIR)
	$(PY) train.py --config=configs/ds_mbnet_fmnist.py --workdir=workdir/ds_mbnet_fmnist

# The embedded data set: Debian's package, where apt is available (else train.py says what to
# install, and the tests that read it skip).
$(FMNIST_DIR):
	@if command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else echo "no apt-get: put the Fashion-MNIST IDX files under $@"; fi

# The tests' own extra: PyTorch, torchvision and timm for the importers' checks and the
# PyTorch baseline, so that no test skips for want of it.
$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

test: $(VENV)/.test-installed $(FMNIST_DIR)
	$(PY) -m pytest -q --durations=15 $(TEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
