# nimflow: the two set-up commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint test-lowest venv testbed-up testbed-down validate clean

# The virtual environment, rebuilt when pyproject.toml changes. Debian ships venv separately.
$(BIN)/nimflow: pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv (Debian)"; apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[testbed,lint]'
	@touch $@

venv: $(BIN)/nimflow

# Start the local test bed and host a generated tiny model end to end through the real flow.
demo: venv
	$(BIN)/nimflow demo

# The whole test suite against the real local test bed (the tests start what they need).
test: venv lint
	$(BIN)/python -m nimflow.testbed.docker_engine
	$(BIN)/python -m pytest -q --durations=25

# Static checks: ruff (lint and import order) and mypy. mypy reads the package as the wheel lays it out
# (flows/ and tasks/ are nimflow.flows and nimflow.tasks there), through a tree of symlinks.
TYPED := .testbed/typecheck
lint: venv
	$(BIN)/ruff check .
	rm -rf $(TYPED) && mkdir -p $(TYPED)/nimflow
	for entry in nimflow/*; do ln -s "$(CURDIR)/$$entry" $(TYPED)/nimflow/; done
	ln -s "$(CURDIR)/flows" $(TYPED)/nimflow/flows && ln -s "$(CURDIR)/tasks" $(TYPED)/nimflow/tasks
	cd $(TYPED) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p nimflow

# The unit tests against the lowest versions pyproject.toml allows (constraints/lowest.txt), in a
# separate venv, so the floors stay honest. CI runs it after `make test`.
LOWEST := .testbed/venv-lowest
test-lowest:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv (Debian)"; apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; }
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q --constraint constraints/lowest.txt -e '.[testbed]'
	$(LOWEST)/bin/python -m pip list --format=freeze | grep -iE '^(prefect|huggingface.hub|boto3|botocore|docker|pydantic|httpx|moto)=='
	$(LOWEST)/bin/python -m pytest -q tests/unit

validate: venv
	$(BIN)/nimflow validate configs/*.yaml configs/examples/*.yaml

testbed-up: venv
	$(BIN)/nimflow testbed up

testbed-down: venv
	$(BIN)/nimflow testbed down

clean: testbed-down
	rm -rf .testbed
