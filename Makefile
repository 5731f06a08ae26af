# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DATA ?=
WEIGHTS ?=
ARGS ?=
run_args = $(if $(DATA),--data "$(DATA)") $(if $(WEIGHTS),--weights "$(WEIGHTS)") $(ARGS)

.PHONY: setup run test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/catdog run $(run_args)

# Tests run in TEST_WORKERS processes (pytest-xdist): most of a flow run is single-threaded
# Python (tracing, Prefect, plotting), and many tests wait on servers and subprocesses: three
# processes keep two cores busy (182% of two cores over the whole suite).
TEST_WORKERS ?= 3

test: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=25
	$(BIN)/ruff check .

# Every test not marked slow (no TensorFlow training, no flow run): a quick check while editing.
test-fast: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"
	$(BIN)/ruff check .

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf artifacts/0* artifacts/.prefect artifacts/production artifacts/summary.json
