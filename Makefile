# The two set-up commands of the README are `make up` and `make test`; each
# creates/reuses .venv, installs pinned dependencies and generates proto code.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
BOOTSTRAP_STAMP := $(VENV)/.bootstrap-ok

.PHONY: venv proto up down test test-unit test-integration lint typecheck bench clean-run

# Re-runs the bootstrap when the pins, the package metadata or the protos change.
$(BOOTSTRAP_STAMP): requirements/requirements.txt pyproject.toml scripts/bootstrap.sh scripts/install_lightfm.sh $(wildcard protos/coldstart/v1/*.proto)
	scripts/bootstrap.sh $(VENV)
	touch $@

venv: $(BOOTSTRAP_STAMP)

proto: $(BOOTSTRAP_STAMP)
	$(PY) -m services.common.protogen

up: $(BOOTSTRAP_STAMP)
	$(VENV)/bin/coldstart up $(UP_ARGS)

down: $(BOOTSTRAP_STAMP)
	$(VENV)/bin/coldstart down

lint: $(BOOTSTRAP_STAMP)
	$(VENV)/bin/ruff check services tests bench k8s
	$(VENV)/bin/ruff format --check services tests bench k8s

typecheck: $(BOOTSTRAP_STAMP)
	$(VENV)/bin/mypy

test-unit: $(BOOTSTRAP_STAMP)
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-integration: $(BOOTSTRAP_STAMP)
	scripts/ensure_redis.sh
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

# Everything: lint, types, unit and integration tests (one shared Kafka broker; a
# redis-server for fusion's Redis online state, installed when missing and possible).
test: $(BOOTSTRAP_STAMP)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	scripts/ensure_redis.sh
	$(VENV)/bin/pytest tests $(PYTEST_ARGS)

bench: $(BOOTSTRAP_STAMP)
	$(VENV)/bin/coldstart bench all

clean-run:
	rm -rf .run
