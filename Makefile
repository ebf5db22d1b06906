# Two entry points on a fresh machine (Python 3.11): `make run` and `make test`.
# Both create .venv and install torch (CPU build, pinned first so pip never pulls the
# multi-GB CUDA build) and then the project with its pinned dependencies.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
RUN_ARGS ?= --scenario all --method timematch
PYTEST_ARGS ?=
# make ui STORE=results/mlflow.db (a path or sqlite:///...; default mlflow/mlflow.db); UI_ARGS: more server.sh options
STORE ?=
UI_ARGS ?=

.PHONY: install run test test-fast ui bench image clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH)"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python launch.py $(RUN_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the suite without the runs marked slow, for the edit-test loop (timings: docs/testing.md)
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

ui: install
	PATH="$(abspath $(BIN)):$$PATH" bash mlflow/server.sh $(if $(STORE),--store "$(STORE)") $(UI_ARGS)

bench: install
	$(BIN)/python benchmarks/data_loading.py
	$(BIN)/python benchmarks/training_step.py
	$(BIN)/python benchmarks/shift_estimation.py
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/selection.py
	$(BIN)/python benchmarks/cli_startup.py

# the image of Dockerfile with podman, without a registry (root; docs/kubernetes.md, "The image, built and run here")
image:
	bash k8s/build-local.sh

clean:
	rm -rf $(VENV) results .pytest_cache
