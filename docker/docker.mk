# The Docker deployment (docker/compose.yaml); README "Run on a GPU cluster" walks through it.
#   make env                       .env from .env.example, and fresh random secrets in secrets/
#   make up [WORKERS=N]            build, start and wait until healthy (MULTIHOST=1: see compose.multihost.yaml)
#   make scale WORKERS=N           N workers, without rebuilding or recreating any running service
#   make worker-env                .env.worker: what a worker host needs (no PostgreSQL or MLflow admin secret)
#   make worker-up                 on another GPU host: one worker joining CLUSTER_HEAD_IP's head
#   make pin-images                on a Docker host: pin every pulled image tag to its digest
#   make down / make logs [SERVICE=mlflow]
#   make sweep-cluster EXP=report  the sweep as a Ray job on the stack (SMOKE, DATA, SEEDS, ... as for `make sweep`)
#   make stack-test                the same stack without Docker, as CI runs it
COMPOSE ?= docker compose
ENV_FILE ?= .env
WORKERS ?= 1
MULTIHOST ?=
SERVICE ?=
DC = $(COMPOSE) --env-file $(ENV_FILE) -f docker/compose.yaml $(if $(MULTIHOST),-f docker/compose.multihost.yaml)

.PHONY: env worker-env up scale worker-up down logs sweep-cluster stack-test check-env-file pin-images

env:
	docker/init-env.sh $(ENV_FILE)

worker-env:
	ENV_FILE=$(ENV_FILE) docker/worker-env.sh

pin-images:
	docker/pin-images.sh

check-env-file:
	@test -f $(ENV_FILE) || { echo "no $(ENV_FILE): run 'make env' (or copy .env.example and write the secrets into secrets/)" >&2; exit 1; }

up: check-env-file
	$(DC) up --detach --build --wait --scale ray-worker=$(WORKERS)

# Only the number of workers changes: --no-build and --no-recreate keep every running container
# (the head, MLflow, PostgreSQL and the workers already up) exactly as it is.
scale: check-env-file
	$(DC) up --detach --no-build --no-recreate --wait --scale ray-worker=$(WORKERS) ray-worker

# Only the worker, on a host other than the head's: no PostgreSQL, MLflow or head here.
worker-up: MULTIHOST = 1
worker-up: check-env-file
	$(DC) up --detach --build --no-deps ray-worker

down:
	$(DC) down

logs:
	$(DC) logs --follow --tail=100 $(SERVICE)

sweep-cluster: install
	ENV_FILE=$(ENV_FILE) RAY=$(VENV)/bin/ray PYTHON=$(PY) docker/sweep-cluster.sh $(EXP) $(if $(SMOKE),--smoke) \
		$(if $(DATA),--data $(DATA)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) \
		$(if $(RESUME),--resume) $(SWEEP_ARGS)

stack-test: install
	$(PY) -m pytest -q tests/test_deploy_static.py tests/test_deploy_scripts.py tests/test_deploy_stack.py
