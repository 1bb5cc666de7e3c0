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

.PHONY: install test test-fast lint train sweep report mlflow-ui bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,server]'
	touch $@

# The full suite (what CI runs); test-fast is its in-process tier, for the edit loop (a few minutes less than 3).
test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check models tune analysis bench tests

# A quick single run without Ray: override with e.g. `make train ARGS="--model cnn --epochs 2"`.
ARGS ?= --model mlp --dropout 0.8 --epochs 3
train: install
	$(PY) -m tune train $(ARGS) $(if $(DATA),--data $(DATA))

clean:
	rm -rf reports ray_results

# The study as concurrent Ray Tune trials, every trial an MLflow run.
# make sweep EXP=dropout-mlp SMOKE=1 DATA=imagefolder:../shared/data/cifar10-jpg.tar.gz SEEDS=3 SCHEDULER=fifo
# With RAY_ADDRESS set, the sweep runs on that cluster.
sweep: install
	$(PY) -m tune sweep $(EXP) $(if $(SMOKE),--smoke) $(if $(DATA),--data $(DATA)) $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(if $(RESUME),--resume) $(if $(RAY_ADDRESS),--address $(RAY_ADDRESS)) $(SWEEP_ARGS)

MLFLOW_PORT ?= 5000
# Serves the default store (./mlflow.db) on 127.0.0.1; with MLFLOW_TRACKING_URI set to a server, or with the
# Docker stack up (make up), points there instead.
mlflow-ui: install
	@if [ -n "$$MLFLOW_TRACKING_URI" ] && echo "$$MLFLOW_TRACKING_URI" | grep -q '^http'; then \
		echo "runs are on the tracking server: open $$MLFLOW_TRACKING_URI"; \
	elif url=$$(ENV_FILE=$(ENV_FILE) PYTHON=$(PY) docker/mlflow-url.sh); then \
		echo "the stack's MLflow is up: open $$url (log in as MLFLOW_ADMIN_USERNAME of $(ENV_FILE), password in secrets/mlflow_admin_password)"; \
	else \
		echo "each experiment's runs table:"; $(PY) -m tune links --server http://127.0.0.1:$(MLFLOW_PORT) | sed 's/^/  /'; \
		$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT); \
	fi

# The study report from the MLflow runs (store: MLFLOW_TRACKING_URI, else ./mlflow.db):
# reports/$(REPORT)/REPORT.md and REPORT.html, one PNG per figure, one CSV per table.
# make report REPORT_EXP="dropout-mlp dropout-cnn" SWEEP=<sweep_id>   (ALL=1 pools every sweep)
REPORT ?= study
REPORT_EXP ?=
SWEEP ?=
ALL ?=
report: install
	$(PY) -m analysis report --out reports/$(REPORT) $(if $(REPORT_EXP),--experiment $(REPORT_EXP)) \
		$(if $(SWEEP),--sweep $(SWEEP)) $(if $(ALL),--all)

# Benchmarks print ratios measured side by side; QUICK=1 runs the CI-sized variants.
bench: install
	$(PY) -m bench all $(if $(QUICK),--quick)

# The Docker deployment: up, down, logs, sweep-cluster.
include docker/docker.mk
