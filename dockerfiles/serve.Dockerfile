# slmops serve image: `slmops serve` (gRPC + health + reflection + /metrics) and nothing else:
# no torch, no transformers, no peft, no pip (the build fails if the server would import them).
#
# Built by `make images` from the host-made wheelhouse (`make wheelhouse`), so it builds with
# `docker build --network none` (BuildKit: DOCKER_BUILDKIT=1, context = the repository root):
#   DOCKER_BUILDKIT=1 docker build --network none -f dockerfiles/serve.Dockerfile -t slmops-serve:0.1.0 .
# BASE_IMAGE: the official slim Python 3.11 image by default; offline, the base made by
# scripts/make_base_image.sh (Debian bookworm's python3, 3.11): --build-arg BASE_IMAGE=slmops-base:bookworm
#
# Run:  docker run -d --init -p 50051:50051 -p 9090:9090 -v /path/to/bundle:/bundle:ro slmops-serve:0.1.0
#   The bundle is read from /bundle: mount it read-only, or bake it in (make images BUNDLE=dist/bundles/cpu).
#   SIGTERM (docker stop): health NOT_SERVING, in-flight requests drain (--grace-period, default 30 s),
#   exit 0; give docker stop more time than that (docker stop -t 40). The server runs as PID 1 (exec
#   form) and handles SIGTERM itself; --init adds tini, which also reaps orphaned children.
#   HEALTHCHECK: grpc.health.v1 Check on the server's own port (dockerfiles/healthcheck.py); it fails
#   while loading or draining and once the scheduler died (the server then also exits 1, so
#   --restart / Swarm start a fresh one). Without --admin-token ($SLMOPS_ADMIN_TOKEN) adapter
#   admin calls through a published port are refused (only loopback inside the container may).
#   Arguments replace the CMD: docker run ... slmops-serve:0.1.0 serve /bundle --threads 2
#
# Architectures: `make images ARCH=arm64` (or amd64,arm64) builds it with --platform linux/arm64
# from wheelhouse/deps-arm64 (`make wheelhouse ARCH=...`); TARGETARCH picks the wheels. Built on
# an x86 host, the arm64 steps run under qemu-user, which shows the emulated process the HOST's
# /proc/cpuinfo: onnxruntime's import then crashes. The steps that import onnxruntime (to
# byte-compile) therefore see dockerfiles/emulation/arm64-cpuinfo instead, at build time only:
# the image has none of it, and a real device reads its real cpuinfo.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# What the server imports: byte-compiled at build time (the deps in their own layer).
# (?name: only when the serve extra installs it)
ARG DEPS_MODULES="numpy onnxruntime ?onnxruntime_genai ?tokenizers ?jinja2 grpc grpc_health.v1.health grpc_reflection.v1alpha.reflection prometheus_client pydantic yaml click rich.console"
ARG APP_MODULES="slmops.cli slmops.platforms slmops_serve.cli slmops_serve.server slmops_serve.engine slmops_serve.registry slmops_serve.servicer slmops_serve.client slmops.contract slmops.runtime.runner slmops.runtime.text !torch !transformers !peft"

FROM ${BASE_IMAGE} AS builder
ARG TARGETARCH
ARG BUILDARCH
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# /opt/pip holds pip; /opt/venv (what the image ships) gets none. Packages are installed without
# byte-compiling, then the modules the server imports are compiled by importing them.
RUN python3 -m venv /opt/pip && python3 -m venv --without-pip /opt/venv
# The wheelhouse of the target architecture: wheelhouse/deps (the build host's) or deps-<arch>.
# Left out after the install, as they are never imported by the server: tests, onnxruntime's
# transformers/quantization/tools scripts, onnxruntime-genai's model builder (needs torch), f2py,
# and huggingface_hub/hf_xet (a dependency of tokenizers for hub downloads; the server reads the
# bundle's tokenizer.json from disk, offline: 19 MB).
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    deps=/wheelhouse/deps; [ "${TARGETARCH}" = "${BUILDARCH}" ] || deps=/wheelhouse/deps-${TARGETARCH}; \
    [ -f "$deps/requirements-serve.txt" ] || { echo "no wheels for linux/${TARGETARCH} in wheelhouse/: run make wheelhouse ARCH=${TARGETARCH}" >&2; exit 1; }; \
    /opt/pip/bin/python -m pip --python /opt/venv/bin/python install --no-index --no-deps --no-compile \
        --find-links "$deps" -r "$deps/requirements-serve.txt" \
    && site=$(echo /opt/venv/lib/python3*/site-packages) \
    && find "$site" -depth -type d \( -name tests -o -name testing \) -path "$site/numpy/*" -exec rm -rf {} + \
    && find "$site" -depth -type d -name tests \( -path "$site/onnxruntime*" -o -path "$site/grpc*" \) -exec rm -rf {} + \
    && rm -rf "$site"/onnxruntime/transformers "$site"/onnxruntime/quantization "$site"/onnxruntime/tools \
        "$site"/onnxruntime/datasets "$site"/onnxruntime_genai/models "$site"/numpy/f2py \
        "$site"/huggingface_hub "$site"/hf_xet

FROM builder AS deps-amd64
ARG DEPS_MODULES
RUN --mount=type=bind,source=dockerfiles/precompile.py,target=/tmp/precompile.py \
    /opt/venv/bin/python /tmp/precompile.py ${DEPS_MODULES}

FROM builder AS deps-arm64
ARG DEPS_MODULES
RUN --mount=type=bind,source=dockerfiles/precompile.py,target=/tmp/precompile.py \
    --mount=type=bind,source=dockerfiles/emulation/arm64-cpuinfo,target=/proc/cpuinfo \
    /opt/venv/bin/python /tmp/precompile.py ${DEPS_MODULES}

FROM deps-${TARGETARCH} AS deps

FROM ${BASE_IMAGE} AS app
RUN useradd --system --uid 10001 --user-group --no-log-init --create-home --home-dir /home/slmops slmops \
    && mkdir -p /bundle
COPY --from=deps /opt/venv /opt/venv
# The project wheel in its own layer: a code change rebuilds only this step and the next.
RUN --mount=type=bind,from=deps,source=/opt/pip,target=/opt/pip \
    --mount=type=bind,source=wheelhouse/project,target=/project \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    /opt/pip/bin/python -m pip --python /opt/venv/bin/python install --no-index --no-deps --no-cache-dir \
        --no-compile /project/slmops-*.whl

# Byte-compile what the server imports, and prove that it imports no torch, transformers or peft.
FROM app AS app-amd64
ARG APP_MODULES
RUN --mount=type=bind,source=dockerfiles/precompile.py,target=/tmp/precompile.py \
    /opt/venv/bin/python /tmp/precompile.py ${APP_MODULES}

FROM app AS app-arm64
ARG APP_MODULES
RUN --mount=type=bind,source=dockerfiles/precompile.py,target=/tmp/precompile.py \
    --mount=type=bind,source=dockerfiles/emulation/arm64-cpuinfo,target=/proc/cpuinfo \
    /opt/venv/bin/python /tmp/precompile.py ${APP_MODULES}

FROM app-${TARGETARCH} AS serve
ARG VERSION=0.0.0
ARG TARGETARCH
LABEL org.opencontainers.image.title="slmops-serve" \
      org.opencontainers.image.description="slmops gRPC server for multi-adapter ONNX bundles" \
      org.opencontainers.image.version="${VERSION}" \
      io.slmops.stage="serve" \
      io.slmops.arch="${TARGETARCH}"
COPY dockerfiles/entrypoint.py dockerfiles/healthcheck.py /usr/local/lib/slmops/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
USER slmops
WORKDIR /home/slmops
EXPOSE 50051 9090 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/lib/slmops/healthcheck.py"]
ENTRYPOINT ["/opt/venv/bin/python", "/usr/local/lib/slmops/entrypoint.py"]
CMD ["serve", "/bundle", "--port", "50051", "--metrics-port", "9090", "--http-port", "8000"]
