# Two entry points do everything on a fresh clone: `make bench` and `make test`.
# Both create (or refresh, when pyproject.toml changes) the virtual environment first, with the
# optional extras (the `jax` family), so that both show every implementation family.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned to the local CPU build: an unpinned `torch` would pull several GB of CUDA packages.
TORCH  ?= torch==2.13.0

.PHONY: env bench lint format test quick reports clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e '.[test,jax]'
	touch $@

# The main job: `losscheck bench` on the embedded default config -> reports/default.{json,md}
bench: env
	$(BIN)/losscheck bench

# Style and types before the tests (configured in pyproject.toml): lint, formatting, mypy.
# Measured on the 2-core dev machine (load ~14): ruff check + format --check 0.2 s; mypy 1.5 s
# with its cache (.mypy_cache) warm, 53 s from cold (most of it reading the torch and numpy stubs).
lint: env
	$(BIN)/ruff check losscheck
	$(BIN)/ruff format --check losscheck
	$(BIN)/mypy losscheck

# Apply ruff's formatting and safe fixes (then `make lint` shows what is left to do by hand).
format: env
	$(BIN)/ruff format losscheck
	$(BIN)/ruff check --fix losscheck

# The whole test suite, after the lint.
test: env lint
	$(BIN)/python -m pytest -n auto

# The CI-sized sweep (about 10 s).
quick: env
	$(BIN)/losscheck bench configs/quick.yaml --out reports

# Regenerate the committed reports in reports/ from fresh runs (default, quick, reduction,
# options, sequence, custom, frameworks, training, linear, llm).
reports: bench quick
	$(BIN)/losscheck bench configs/reduction.yaml --out reports
	$(BIN)/losscheck bench configs/options.yaml --out reports
	$(BIN)/losscheck bench configs/sequence.yaml --out reports
	$(BIN)/losscheck bench examples/custom.yaml --out reports
	$(BIN)/losscheck bench configs/frameworks.yaml --out reports
	$(BIN)/losscheck bench configs/training.yaml --out reports
	$(BIN)/losscheck bench configs/linear.yaml --out reports
	$(BIN)/losscheck bench configs/llm.yaml --out reports

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
