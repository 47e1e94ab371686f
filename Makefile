# Developer commands. `make run` and `make test` set everything up themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto' | sort)
GEN_PACKAGES := auth inference gateway

.PHONY: help setup models certs tools run test lint bench proto proto-check proto-lint proto-breaking clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.deps: requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $@

# The editable install maps the top-level packages found now, so it comes after generation.
$(VENV)/.installed: $(VENV)/.deps gen/.generated pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

CLIENTS_VENV := .venv-clients
MLSERVER_VENV := .venv-mlserver

# MLServer, the baseline the benchmarks compare inference with: its own virtualenv, never beside the services.
$(MLSERVER_VENV)/.installed: bench/mlserver-requirements.lock
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/mlserver-requirements.lock
	touch $@

$(CLIENTS_VENV)/.installed: tests/clients/requirements.lock
	test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/clients/requirements.lock
	touch $@

# promtool (alert rule checks and tests): Debian's prometheus package, installed when missing.
PROMTOOL := $(shell command -v promtool 2>/dev/null)

tools: ## Install the system tools the tests use (promtool), if missing
ifeq ($(PROMTOOL),)
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
endif

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

gen/.generated: $(PROTOS) $(VENV)/.deps
	$(MAKE) --no-print-directory proto

models/.built: $(VENV)/.installed services/inference/make_models.py $(wildcard services/inference/demo_models/*/*)
	$(PY) -m services.inference.make_models --repository models
	touch $@

models: models/.built ## Train the demo models (iris, digits) into models/ (idempotent)

setup: $(VENV)/.installed models/.built ## Create the venv, install pinned dependencies, generate code, train demo models (idempotent)

proto: $(VENV)/.deps ## Generate Python modules and .pyi stubs from protos/
	rm -rf $(addprefix gen/,$(GEN_PACKAGES))
	$(PY) -m grpc_tools.protoc -I protos \
		--python_out=gen --grpc_python_out=gen \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=gen \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=gen \
		$(patsubst protos/%,%,$(PROTOS))
	find $(addprefix gen/,$(GEN_PACKAGES)) -type d -not -name __pycache__ -exec touch {}/__init__.py \;
	touch gen/.generated

proto-check: proto ## Fail if the generated code differs from what is committed
	@drift="$$(git status --porcelain -- gen)"; if [ -n "$$drift" ]; then \
		echo "$$drift"; echo "generated code drifted from protos/: run 'make proto' and commit gen/"; exit 1; fi

proto-lint: node_modules/.installed ## buf lint on our proto packages
	npx --no-install buf lint

proto-breaking: node_modules/.installed ## buf breaking against the main branch
	npx --no-install buf breaking --against '.git#branch=main'

certs: $(VENV)/.installed ## Write a development CA and TLS certificates for the services and a client into certs/
	$(PY) -m services.devcerts --out certs

run: setup ## Start auth, inference and gateway in the foreground (Ctrl-C stops them)
	$(PY) -m services.devrun

test: setup tools $(CLIENTS_VENV)/.installed ## Run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup ## ruff (with security rules) and mypy on our code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup $(MLSERVER_VENV)/.installed ## Run the benchmarks (ratios against a baseline measured in the same run)
	$(PY) -m bench

clean: ## Remove the venv and caches
	rm -rf $(VENV) $(CLIENTS_VENV) $(MLSERVER_VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
