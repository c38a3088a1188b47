#!/usr/bin/env bash
# Build the slmops base image locally, without pulling anything from a registry:
# a minimal Debian bookworm root with Python 3.11 (Debian's python3), made by mmdebstrap from the
# Debian mirror and imported into the local Docker engine.
#
#   scripts/make_base_image.sh [TAG]          # default TAG: slmops-base:bookworm
#   make images BASE_IMAGE=slmops-base:bookworm
#
# The Dockerfiles default to the official python:3.11-slim-bookworm; this base is for machines
# that cannot pull it (air-gapped build hosts, CI without registry access). Debian bookworm's
# python3 is 3.11, the same minor version as the official image, so one wheelhouse serves both.
#
# Needs: root (or a working `mmdebstrap --mode=unshare`), mmdebstrap, docker, and an apt mirror
# (MIRROR, default http://deb.debian.org/debian; SECURITY_MIRROR for bookworm-security).
# Skips the build when TAG already exists unless FORCE=1. Takes 30-60 s, ~100 MB.
set -euo pipefail

TAG="${1:-${BASE_IMAGE:-slmops-base:bookworm}}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
DOCKER="${DOCKER:-docker}"

if [ "${FORCE:-0}" != 1 ] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists (FORCE=1 rebuilds it)"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing: apt-get install -y mmdebstrap" >&2; exit 2; }
"$DOCKER" info >/dev/null 2>&1 || { echo "no Docker engine answers ($DOCKER info failed): start dockerd" >&2; exit 2; }

mode=auto
[ "$(id -u)" = 0 ] && mode=root
start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# minbase + python3 (3.11) + python3-venv (venv creation in the builder stages) + ca-certificates.
# Docs, man pages and locales are left out (about 20 MB); apt lists are removed.
mmdebstrap --mode="$mode" --variant=minbase --quiet \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=ca-certificates,python3,python3-venv \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" - \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main" 2> "$log" \
  | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "slmops base: mmdebstrap $SUITE minbase + python3" \
    - "$TAG" >/dev/null || { tail -40 "$log" >&2; echo "make_base_image: mmdebstrap | docker import failed" >&2; exit 1; }
size=$("$DOCKER" image inspect -f '{{.Size}}' "$TAG")
pyver=$("$DOCKER" run --rm --network none "$TAG" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
echo "base image $TAG: python $pyver, $((size / 1000000)) MB, built in $(( $(date +%s) - start ))s"
