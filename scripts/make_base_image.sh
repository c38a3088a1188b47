#!/usr/bin/env bash
# Build the slmops base image locally, without pulling anything from a registry:
# a minimal Debian bookworm root with Python 3.11 (Debian's python3), made by mmdebstrap from the
# Debian mirror and imported into the local Docker engine.
#
#   scripts/make_base_image.sh [TAG]          # default TAG: slmops-base:bookworm
#   ARCH=arm64 scripts/make_base_image.sh     # default TAG: slmops-base:bookworm-arm64
#   make images BASE_IMAGE=slmops-base:bookworm
#
# ARCH (amd64 or arm64, default: this machine's): the Debian architecture of the root. A foreign
# one runs mmdebstrap's maintainer scripts under qemu-user (apt-get install qemu-user-static
# binfmt-support), and the root is imported by a BuildKit `FROM scratch` build with
# --platform linux/$ARCH, because Docker 20.10's `docker import --platform` still labels it amd64.
#
# The Dockerfiles default to the official python:3.11-slim-bookworm; this base is for machines
# that cannot pull it (air-gapped build hosts, CI without registry access). Debian bookworm's
# python3 is 3.11, the same minor version as the official image, so one wheelhouse serves both.
#
# Needs: root (or a working `mmdebstrap --mode=unshare`), mmdebstrap, docker, and an apt mirror
# (MIRROR, default http://deb.debian.org/debian; SECURITY_MIRROR for bookworm-security).
# Skips the build when TAG already exists unless FORCE=1. Takes 30-60 s, ~100 MB.
set -euo pipefail

host_arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
case "$host_arch" in x86_64) host_arch=amd64 ;; aarch64) host_arch=arm64 ;; esac
ARCH="${ARCH:-$host_arch}"
case "$ARCH" in amd64|arm64) ;; *) echo "make_base_image: ARCH=$ARCH: use amd64 or arm64" >&2; exit 2 ;; esac
default_tag=slmops-base:bookworm
[ "$ARCH" = "$host_arch" ] || default_tag="slmops-base:bookworm-$ARCH"
TAG="${1:-${BASE_IMAGE:-$default_tag}}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
DOCKER="${DOCKER:-docker}"

if [ "${FORCE:-0}" != 1 ] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists (FORCE=1 rebuilds it)"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing: apt-get install -y mmdebstrap" >&2; exit 2; }
if [ "$ARCH" != "$host_arch" ] && [ ! -e "/proc/sys/fs/binfmt_misc/qemu-${ARCH/arm64/aarch64}" ]; then
    echo "make_base_image: ARCH=$ARCH needs qemu-user emulation: apt-get install -y qemu-user-static binfmt-support" \
        "(where /proc/sys/fs/binfmt_misc is empty: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc)" >&2
    exit 2
fi
"$DOCKER" info >/dev/null 2>&1 || { echo "no Docker engine answers ($DOCKER info failed): start dockerd" >&2; exit 2; }

mode=auto
[ "$(id -u)" = 0 ] && mode=root
start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# minbase + python3 (3.11) + python3-venv (venv creation in the builder stages) + ca-certificates.
# Docs, man pages and locales are left out (about 20 MB); apt lists are removed.
root_tar() {  # the root file system as a tar on stdout
mmdebstrap --mode="$mode" --variant=minbase --quiet --arch="$ARCH" \
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
    "deb $SECURITY_MIRROR $SUITE-security main" 2> "$log"
}
if [ "$ARCH" = "$host_arch" ]; then
  root_tar | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "slmops base: mmdebstrap $SUITE minbase + python3" \
    - "$TAG" >/dev/null || { tail -40 "$log" >&2; echo "make_base_image: mmdebstrap | docker import failed" >&2; exit 1; }
else
  ctx=$(mktemp -d)
  trap 'rm -f "$log"; rm -rf "$ctx"' EXIT
  root_tar > "$ctx/rootfs.tar" || { tail -40 "$log" >&2; echo "make_base_image: mmdebstrap --arch=$ARCH failed" >&2; exit 1; }
  printf '%s\n' 'FROM scratch' 'ADD rootfs.tar /' \
      'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      'CMD ["python3"]' > "$ctx/Dockerfile"
  DOCKER_BUILDKIT=1 "$DOCKER" build --quiet --network none --platform "linux/$ARCH" \
      --label "org.opencontainers.image.description=slmops base: mmdebstrap $SUITE minbase + python3 ($ARCH)" \
      -t "$TAG" "$ctx" >/dev/null || { echo "make_base_image: importing the $ARCH root failed" >&2; exit 1; }
fi
size=$("$DOCKER" image inspect -f '{{.Size}}' "$TAG")
arch=$("$DOCKER" image inspect -f '{{.Architecture}}' "$TAG")
[ "$arch" = "$ARCH" ] || { echo "make_base_image: $TAG is labelled $arch, not $ARCH" >&2; exit 1; }
pyver=$("$DOCKER" run --rm --network none --platform "linux/$ARCH" "$TAG" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
echo "base image $TAG ($ARCH): python $pyver, $((size / 1000000)) MB, built in $(( $(date +%s) - start ))s"
