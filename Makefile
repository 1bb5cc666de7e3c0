# Every target installs first when needed; `make install` is quick when nothing changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

EXP ?= report
DATA ?=
SMOKE ?=
SEEDS ?=
SCHEDULER ?=
RESUME ?=
SWEEP_ARGS ?=

.PHONY: install test lint train sweep report mlflow-ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,server]'
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check models tune analysis bench tests

# A quick single run without Ray: override with e.g. `make train ARGS="--model cnn --epochs 2"`.
ARGS ?= --model mlp --dropout 0.8 --epochs 3
train: install
	$(PY) -m tune train $(ARGS) $(if $(DATA),--data $(DATA))

clean:
	rm -rf reports ray_results
