# Two entry points that work on a fresh clone: `make demo` and `make test`.
# Both create .venv when missing and install the pinned stack from requirements.lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-output

.PHONY: all demo test test-fast lint format install clean benchmark

all: test

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/al3d demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q Testing

# the unit tests without nnU-Net training, simulations, Slurm or process races (a fast tier; CI runs `make test`)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" Testing

LINTED := ActiveLearning3D ActiveLearning3DLib Testing benchmarks

# ruff: likely bugs (check) and one layout for all code (format --check; `make format` applies it)
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff format $(LINTED)

benchmark: $(STAMP)
	$(PY) benchmarks/bench_query.py

clean:
	rm -rf $(VENV) $(DEMO_OUT)
