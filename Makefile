# nimflow: the two set-up commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-gpu lint test-lowest venv testbed-up testbed-down validate clean

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

# The GPU suite against named real images, on a GPU host (docs/testbed.md "On a GPU host"): builds,
# serves, and records what the real software printed under tests/gpu/recorded/; a skip fails here.
test-gpu: venv
	@test -n "$(NIM_IMAGE)" -a -n "$(HF_REPO)" -a -n "$(S3_URI)" || { \
	  echo "usage: make test-gpu NIM_IMAGE=<NIM 1.x image> HF_REPO=<org/model> S3_URI=s3://<bucket>/<prefix> [TRTLLM_IMAGE=<TensorRT-LLM release image>] [STANDBY_GPU=1]"; exit 2; }
	NIMFLOW_GPU_REQUIRED=1 NIMFLOW_GPU_NIM_IMAGE="$(NIM_IMAGE)" NIMFLOW_GPU_TRTLLM_IMAGE="$(TRTLLM_IMAGE)" \
	  NIMFLOW_GPU_REPO="$(HF_REPO)" NIMFLOW_GPU_S3_URI="$(S3_URI)" NIMFLOW_GPU_STANDBY="$(STANDBY_GPU)" \
	  $(BIN)/python -m pytest -m gpu -v -rs tests/gpu

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
