# partmatch: `make run` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# No network in CI: never let kedro-telemetry try to phone home; headless plotting.
export KEDRO_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export MPLBACKEND := Agg

.PHONY: install run test test-slow test-all viz mlflow-ui serve bench clean-data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes (torch==2.14.1 / torchvision==0.29.1 are pinned there).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/kedro run $(ARGS)

# make test: the quick suite (< 3 min on 2 cores); make test-slow: the tests marked slow (real kedro runs,
# subprocesses, servers); make test-all: every test, as CI's .ci/run runs it.
test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

viz: install
	$(BIN)/kedro viz run --host 127.0.0.1

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1

# The newest identification model logged for MODEL (default the recommended one), on 127.0.0.1:5001.
serve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=sqlite:///mlflow.db $(BIN)/mlflow models serve -m "$$($(BIN)/python -m partmatch.serving $(or $(MODEL),siamese_pretrained))" --env-manager local -h 127.0.0.1 -p 5001

bench: install
	$(BIN)/python bench/compare_models.py

clean-data:
	find data -mindepth 2 ! -name .gitkeep -delete
