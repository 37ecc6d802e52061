# The front door: `make` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= $(if $(wildcard ../shared/datasets/coco128/images/train2017),../shared/datasets/coco128/images/train2017,)
MODEL_DIR ?= models/tiny-clip-random

.DEFAULT_GOAL := help
.PHONY: help venv protos check-protos demo test clean tiny-clip bench-dupes test-inference system-deps soak

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

venv: $(BIN)/python ## Create .venv and install the project with its dev tools
	$(BIN)/pip install --quiet -e '.[dev]'

protos: ## Generate the Python gRPC code under imgsearch/ from protos/
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		$$(find protos -name '*.proto' | sort)
	find imgsearch -type d -exec touch {}/__init__.py \;

check-protos: protos ## Fail when the generated code differs from protos/
	git diff --exit-code -- imgsearch
	@test -z "$$(git status --porcelain -- imgsearch)" || { git status --porcelain -- imgsearch; echo "generated code is not committed: run make protos"; exit 1; }

demo: venv ## Ingest COCO128, search with one image, write demo-output/
	$(BIN)/python -m imgsearch_client.demo --dataset '$(DATASET)' --model-dir '$(MODEL_DIR)' --out demo-output

test: venv ## Run the tests
	$(BIN)/python -m pytest

COCO128 ?= $(if $(wildcard ../shared/datasets/coco128/images),../shared/datasets/coco128,)

bench-dupes: venv ## Duplicate benchmark on COCO128 variants; writes bench/results/dupes.*
	@test -n '$(COCO128)' || { echo "set COCO128=DIR, a folder with images/train2017 and labels/train2017"; exit 2; }
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.dupes --dataset '$(COCO128)' --model-dir '$(MODEL_DIR)' --out bench/results --readme README.md

SYSTEM_PACKAGES := chromium chromium-driver iproute2 util-linux

system-deps: ## Install the Debian packages that the full test suite needs (headless Chromium, ip, unshare)
	@missing=$$(for package in $(SYSTEM_PACKAGES); do dpkg -s $$package >/dev/null 2>&1 || echo $$package; done); \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

clean: ## Remove demo output and caches
	rm -rf demo-output .pytest_cache

TOOLS_VENV ?= .venv-tools

$(TOOLS_VENV)/bin/python:
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet torch==2.13.0 transformers==5.25.0 onnx==1.23.2

tiny-clip: $(TOOLS_VENV)/bin/python ## Regenerate the tiny random CLIP test model in models/tiny-clip-random
	$(TOOLS_VENV)/bin/python scripts/make_tiny_clip.py --out models/tiny-clip-random

INFERENCE_VENV ?= .venv-inference
INFERENCE_PYTHON ?= $(PYTHON)
# Written after a complete install, so an interrupted one is retried. A change of the requirements reinstalls.
INFERENCE_STAMP := $(INFERENCE_VENV)/.imgsearch-installed

$(INFERENCE_STAMP): scripts/inference/requirements.txt
	test -x $(INFERENCE_VENV)/bin/python || { $(INFERENCE_PYTHON) -m venv $(INFERENCE_VENV) && \
		$(INFERENCE_VENV)/bin/pip install --quiet --upgrade pip; }
	$(INFERENCE_VENV)/bin/pip install --quiet -r scripts/inference/requirements.txt
	touch $@

test-inference: venv $(INFERENCE_STAMP) ## Run tests/inference against a real Inference server in a loopback-only namespace
	command -v ip >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2; }
	VENV='$(VENV)' INFERENCE_VENV='$(INFERENCE_VENV)' MODEL_DIR='$(MODEL_DIR)' scripts/inference/run_tests_in_netns.sh

SOAK_S ?= 60

soak: venv ## Load both services for SOAK_S seconds (default 60) and check them; writes bench/results/soak.json
	$(BIN)/python -m bench.soak --duration '$(SOAK_S)' --out bench/results/soak.json

.PHONY: test-node
test-node: venv ## Run the Node.js client's tests against live services
	@command -v npm >/dev/null || { echo "test-node needs Node.js 20 or newer, with npm, on PATH"; exit 2; }
	cd clients/node && npm ci --no-audit --no-fund && IMGSEARCH_PYTHON='$(abspath $(BIN))/python' npm test

MILVUS_VENV ?= .venv-milvus
# Written after a complete install, so an interrupted one is retried. A change of the requirements reinstalls.
MILVUS_STAMP := $(MILVUS_VENV)/.imgsearch-installed
BENCH_OUT ?= bench/results

$(MILVUS_STAMP): bench/peer/requirements.txt
	test -x $(MILVUS_VENV)/bin/python || $(PYTHON) -m venv $(MILVUS_VENV)
	$(MILVUS_VENV)/bin/pip install --quiet -r bench/peer/requirements.txt
	touch $@

.PHONY: bench bench-quick
bench: venv $(MILVUS_STAMP) ## Performance against raw faiss and milvus-lite (about 10 min); writes bench/results/summary.json
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.perf --out '$(BENCH_OUT)' --peer-python '$(MILVUS_VENV)/bin/python' \
		--dataset '$(DATASET)' --readme README.md

bench-quick: venv $(MILVUS_STAMP) ## Every phase of the performance benchmark at small sizes (under 2 min), into test-output/
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.perf --quick --out test-output/bench-quick --peer-python '$(MILVUS_VENV)/bin/python' \
		--dataset '$(DATASET)'
