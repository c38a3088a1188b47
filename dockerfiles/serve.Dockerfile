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
#   HEALTHCHECK: grpc.health.v1 Check on the server's own port (dockerfiles/healthcheck.py).
#   Arguments replace the CMD: docker run ... slmops-serve:0.1.0 serve /bundle --threads 2
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# /opt/pip holds pip; /opt/venv (what the image ships) gets none. Packages are installed without
# byte-compiling, then the modules the server imports are compiled by importing them.
RUN python3 -m venv /opt/pip && python3 -m venv --without-pip /opt/venv
RUN --mount=type=bind,source=wheelhouse/deps,target=/wheelhouse \
    --mount=type=bind,source=dockerfiles/precompile.py,target=/tmp/precompile.py \
    /opt/pip/bin/python -m pip --python /opt/venv/bin/python install --no-index --no-deps --no-compile \
        --find-links /wheelhouse -r /wheelhouse/requirements-serve.txt \
    && /opt/venv/bin/python /tmp/precompile.py numpy onnxruntime onnxruntime_genai grpc grpc_health.v1.health \
        grpc_reflection.v1alpha.reflection prometheus_client pydantic yaml click rich.console

FROM ${BASE_IMAGE} AS serve
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="slmops-serve" \
      org.opencontainers.image.description="slmops gRPC server for multi-adapter ONNX bundles" \
      org.opencontainers.image.version="${VERSION}" \
      io.slmops.stage="serve"
RUN useradd --system --uid 10001 --user-group --no-log-init --create-home --home-dir /home/slmops slmops \
    && mkdir -p /bundle
COPY --from=builder /opt/venv /opt/venv
# The project wheel in its own layer: a code change rebuilds only this step. Then byte-compile what
# the server imports, and prove that it imports no torch, transformers or peft.
RUN --mount=type=bind,from=builder,source=/opt/pip,target=/opt/pip \
    --mount=type=bind,source=wheelhouse/project,target=/project \
    --mount=type=bind,source=dockerfiles/precompile.py,target=/tmp/precompile.py \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    /opt/pip/bin/python -m pip --python /opt/venv/bin/python install --no-index --no-deps --no-cache-dir \
        --no-compile /project/slmops-*.whl \
    && /opt/venv/bin/python /tmp/precompile.py slmops.cli slmops_serve.cli slmops_serve.server \
        slmops_serve.engine slmops_serve.registry slmops_serve.servicer slmops_serve.client \
        '!torch' '!transformers' '!peft'
COPY dockerfiles/entrypoint.py dockerfiles/healthcheck.py /usr/local/lib/slmops/
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
USER slmops
WORKDIR /home/slmops
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/lib/slmops/healthcheck.py"]
ENTRYPOINT ["/opt/venv/bin/python", "/usr/local/lib/slmops/entrypoint.py"]
CMD ["serve", "/bundle", "--port", "50051", "--metrics-port", "9090"]
