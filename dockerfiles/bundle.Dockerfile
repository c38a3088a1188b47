# Bakes a bundle into the serve image: `make images BUNDLE=dist/bundles/cpu` runs
#   DOCKER_BUILDKIT=1 docker build --network none -f dockerfiles/bundle.Dockerfile \
#     --build-arg SERVE_IMAGE=slmops-serve:0.1.0 -t slmops-serve:0.1.0-cpu dist/bundles/cpu
# The build context is the bundle folder itself. Its files land in /bundle owned by root, readable
# (not writable) by the server's user whatever their modes were on the host. bundle.json's sha256
# goes into a label, so `slmops deploy --image slmops-serve:0.1.0-cpu` runs it without --bundle.
ARG SERVE_IMAGE=slmops-serve:latest
FROM ${SERVE_IMAGE}
ARG BUNDLE_SHA256=""
ARG BUNDLE_NAME=""
LABEL io.slmops.bundle.sha256="${BUNDLE_SHA256}" io.slmops.bundle.name="${BUNDLE_NAME}"
USER root
RUN --mount=type=bind,target=/src \
    cp -R /src/. /bundle/ && chown -R root:root /bundle && chmod -R u=rwX,go=rX /bundle
USER slmops
