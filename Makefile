# Quick start: `make run` (set up, then run the pipeline on its embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmflow-installed

.PHONY: setup run test test-fast lint browser-check bench-extractors clean

# torch first, pinned to the CPU wheel on this disk: any looser requirement with no torch present
# pulls a multi-GB CUDA build. The constraint keeps every later install (detoxify's torch
# requirement included) on that same torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/llmflow run

test: setup
	$(BIN)/pytest

# The tests that start no server: no Prefect server, no `llmflow run` or `llmflow serve`, no
# Chromium (the `server` marker, pyproject.toml). For the edit-test loop; `make test` runs all.
test-fast: setup
	$(BIN)/pytest -m "not server"

# The browser check alone: Chromium (installed with apt-get when root), then screenshots of the
# Prefect and MLflow UIs of a deployment run, in screenshots/.
browser-check: setup
	.ci/install_chromium
	LLMFLOW_SCREENSHOTS=$(CURDIR)/screenshots $(BIN)/pytest tests/test_browser_ui.py -rs

# CI runs this before the tests: a lint, format or type error fails the build. mypy's settings
# (which packages, under which names) are in pyproject.toml.
lint: setup
	@echo "== ruff check" && $(BIN)/ruff check .
	@echo "== ruff format --check (run \`$(BIN)/ruff format .\` to fix)" && $(BIN)/ruff format --check .
	@echo "== mypy" && $(BIN)/mypy

bench-extractors: setup
	$(BIN)/python bench/html_extractors.py

clean:
	rm -rf $(VENV) llmflow-work screenshots
