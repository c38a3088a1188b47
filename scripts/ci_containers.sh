#!/usr/bin/env bash
# Container CI: installs Docker (Debian's docker.io 20.10), docker-registry, mmdebstrap and sshd
# (for the ssh:// deploy test), starts dockerd and a registry on 127.0.0.1:5000 when none runs,
# builds the local base image, the wheelhouse and the three images (offline, timed: cold on a
# fresh machine, then the cached rebuild), runs the README's container commands as typed (which
# build the images: tests/e2e/test_readme_walkthrough.py), runs `pytest tests/containers`, and
# stops what it started, by PID.
#
# arm64 (SLMOPS_CI_ARM64=1, the default; 0 skips it): qemu-user-static + binfmt-support register
# qemu-aarch64 (binfmt_misc is mounted first where it is not), then the arm64 base (mmdebstrap
# --arch arm64), the arm64 wheelhouse and the arm64 serve image are built too (emulated: slow),
# both serve images and a multi-arch manifest list are pushed to the registry (timed), and
# tests/containers/test_arm64.py runs the arm64 image under emulation.
#
#   scripts/ci_containers.sh [PYTEST_ARGS...]
#
# Idempotent: installed packages, a running engine or registry, the base image, the wheelhouse and
# Docker's build cache are all reused. Exits with pytest's status (non-zero when a test fails).
# Environment: PY (default .venv/bin/python), SLMOPS_CI_STATE (logs and registry data, default
# /tmp/slmops-ci-containers), REGISTRY_ADDR (default 127.0.0.1:5000).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
STATE="${SLMOPS_CI_STATE:-/tmp/slmops-ci-containers}"
REGISTRY_ADDR="${REGISTRY_ADDR:-127.0.0.1:5000}"
ARM64="${SLMOPS_CI_ARM64:-1}"
ARCHES=amd64
[ "$ARM64" = 1 ] && ARCHES=amd64,arm64
DOCKER=/usr/bin/docker   # Debian's 20.10 client: BuildKit builds without buildx
mkdir -p "$STATE"
t0=$(date +%s)
say() { echo "== containers [$(( $(date +%s) - t0 ))s]: $*"; }
sudo_cmd=()
[ "$(id -u)" = 0 ] || sudo_cmd=(sudo)

# ---- packages ------------------------------------------------------------------------------------
missing=()
# openssh-server/-client and iproute2: the ssh:// deploy test (a second engine behind a local sshd).
pkgs=(docker.io docker-registry mmdebstrap openssh-server openssh-client iproute2)
# qemu-user-static + binfmt-support: run arm64 binaries here; arch-test: mmdebstrap --arch checks with it.
[ "$ARM64" = 1 ] && pkgs+=(qemu-user-static binfmt-support arch-test)
for pkg in "${pkgs[@]}"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        > "$STATE/apt.log" 2>&1 || { cat "$STATE/apt.log"; exit 1; }
fi
if ! "$PY" -c "import docker" 2>/dev/null; then
    say "installing the docker SDK (the deploy extra)"
    "$PY" -m pip install -q "docker>=7"
fi

if [ "$ARM64" = 1 ]; then
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        say "mounting binfmt_misc (for qemu-aarch64)"
        "${sudo_cmd[@]}" mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
    fi
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || "${sudo_cmd[@]}" update-binfmts --enable qemu-aarch64 || true
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        say "no qemu-aarch64 binfmt handler could be registered: the arm64 image is skipped"
        ARM64=0 ARCHES=amd64
    fi
fi

# ---- daemons: started here -> stopped here (by PID), at exit, whatever happens --------------------
DOCKERD_PID=""
REGISTRY_PID=""
stop_pid() {  # PID NAME: SIGTERM, wait up to 30 s, then SIGKILL
    local pid=$1 name=$2
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || { say "stopped $name (pid $pid)"; return 0; }; sleep 0.5; done
    say "$name (pid $pid) did not stop in 30s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    [ -n "$REGISTRY_PID" ] && stop_pid "$REGISTRY_PID" docker-registry
    [ -n "$DOCKERD_PID" ] && stop_pid "$DOCKERD_PID" dockerd
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if "$DOCKER" info >/dev/null 2>&1; then
    say "using the running Docker engine"
else
    say "starting dockerd (log: $STATE/dockerd.log)"
    "${sudo_cmd[@]}" dockerd > "$STATE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        "$DOCKER" info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$STATE/dockerd.log"; say "dockerd exited"; DOCKERD_PID=""; break; }
        sleep 0.5
    done
    if ! "$DOCKER" info >/dev/null 2>&1; then
        say "no Docker engine could start here; tests/containers will skip, saying why"
        "$PY" -m pytest -q -ra tests/containers "$@"
        exit $?
    fi
fi

answers() { "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; }
if answers "http://$REGISTRY_ADDR/v2/"; then
    say "using the registry at $REGISTRY_ADDR"
else
    mkdir -p "$STATE/registry"
    cat > "$STATE/registry.yml" <<YAML
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $STATE/registry}
  delete: {enabled: true}
http: {addr: "$REGISTRY_ADDR"}
YAML
    say "starting docker-registry on $REGISTRY_ADDR"
    docker-registry serve "$STATE/registry.yml" > "$STATE/registry.log" 2>&1 &
    REGISTRY_PID=$!
    for _ in $(seq 50); do answers "http://$REGISTRY_ADDR/v2/" && break; sleep 0.2; done
    answers "http://$REGISTRY_ADDR/v2/" || { tail -5 "$STATE/registry.log"; say "docker-registry did not start"; exit 1; }
fi

# ---- base image, wheelhouse, images (timed) -------------------------------------------------------
s=$(date +%s)
make --no-print-directory -f mk/docker.mk base-image DOCKER="$DOCKER"
say "base image ready in $(( $(date +%s) - s ))s"
if [ "$ARM64" = 1 ]; then
    s=$(date +%s)
    make --no-print-directory -f mk/docker.mk base-image-arm64 DOCKER="$DOCKER"
    say "arm64 base image ready in $(( $(date +%s) - s ))s (mmdebstrap --arch arm64, emulated)"
fi
s=$(date +%s)
make --no-print-directory -f mk/docker.mk wheelhouse ARCH="$ARCHES"
say "wheelhouse ($ARCHES) ready in $(( $(date +%s) - s ))s"
# The README's container commands, as typed and in its order (tests/e2e/test_readme_walkthrough.py):
# `make images OFFLINE=1`, `make images OFFLINE=1 BUNDLE=dist/bundles/cpu`, `make bundle TARGET=cpu
# IN_DOCKER=1`, the `docker run -v "$PWD/dist/bundles/cpu:/bundle:ro"` line (until SERVING), the
# deploys (placeholder host: local; registry: this one) and, with arm64, `make bundle
# TARGET=cpu-arm64`, `make images ARCH=amd64,arm64 OFFLINE=1` and its REGISTRY= push with the
# manifest list. These build every image the tests below use.
s=$(date +%s)
say "README walkthrough, container part (log: $STATE/walkthrough.log)"
SLMOPS_README_WALKTHROUGH=containers SLMOPS_CI_ARM64="$ARM64" SLMOPS_TEST_REGISTRY="$REGISTRY_ADDR" \
    "$PY" -m pytest -q -s -p no:cacheprovider "tests/e2e/test_readme_walkthrough.py::test_readme_walkthrough[containers]" \
    > "$STATE/walkthrough.log" 2>&1 || { tail -80 "$STATE/walkthrough.log"; say "the README's container commands failed"; exit 1; }
grep -E "^\+ |MB, built in|SERVING\)" "$STATE/walkthrough.log" || true
say "README container commands ($ARCHES) ran in $(( $(date +%s) - s ))s"
# The images' sizes beside the committed ones (bench/results/images.new.json; `make figures` takes them).
"$PY" - "$DOCKER" "$ARCHES" <<'PY' || say "image sizes not recorded"
import json, re, subprocess, sys
sys.path.insert(0, "bench")
from readme_figures import RESULTS, beside_committed
docker, arches = sys.argv[1], sys.argv[2].split(",")
version = re.search(r'^version *= *"(.*)"', open("pyproject.toml").read(), re.M).group(1)
def size(tag):
    done = subprocess.run([docker, "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True)
    return round(int(done.stdout) / 1e6) if done.returncode == 0 else None
images = {}
for name in ("slmops-serve", "slmops-train", "slmops-build"):
    found = {a: size(f"{name}:{version}-{a}") for a in arches}
    images[name] = {a: mb for a, mb in found.items() if mb}
images["slmops-base"] = {a: mb for a in arches if (mb := size("slmops-base:bookworm" + ("" if a == "amd64" else f"-{a}")))}
committed = json.loads((RESULTS / "images.json").read_text())
out = beside_committed(RESULTS / "images.json")
out.write_text(json.dumps({**committed, "note": f"docker image inspect sizes (MB = 10^6 bytes, uncompressed) of `make images OFFLINE=1` (ARCH={','.join(arches)}) in scripts/ci_containers.sh", "images": images}, indent=2) + "\n")
print(f"image sizes: {images} -> {out}")
PY
s=$(date +%s)
make --no-print-directory -f mk/docker.mk images OFFLINE=1 ARCH="$ARCHES" DOCKER="$DOCKER" > "$STATE/images-cached.log" 2>&1
say "cached rebuild of the images ($ARCHES): $(( $(date +%s) - s ))s"
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^slmops-' || true
# (the multi-arch push and manifest list: the README's `make images ... REGISTRY=` line above)

# ---- tests ----------------------------------------------------------------------------------------
say "pytest tests/containers"
set +e
SLMOPS_TEST_REGISTRY="$REGISTRY_ADDR" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    "$PY" -m pytest -q -ra -s -p no:cacheprovider tests/containers "$@"
rc=$?
set -e
say "pytest exit code $rc"
exit $rc
