#!/usr/bin/env bash
# Push the per-architecture serve images and a multi-arch manifest list over them:
#
#   scripts/push_images.sh REGISTRY IMAGE ARCH...
#   scripts/push_images.sh 127.0.0.1:5000 slmops-serve:0.1.0 amd64 arm64
#
# pushes REGISTRY/slmops-serve:0.1.0-amd64 and -arm64 (from the local IMAGE-<arch> tags that
# `make images ARCH=amd64,arm64` makes), then the manifest list REGISTRY/slmops-serve:0.1.0, so a
# `docker pull REGISTRY/slmops-serve:0.1.0` on a Pi gets the arm64 image and on a PC the amd64 one.
#
# Uses `docker manifest` (the client's; no buildx needed, which Debian's 20.10 client lacks).
# A plain-HTTP registry (INSECURE=1, the default for 127.0.0.1/localhost) is passed --insecure.
set -euo pipefail

[ $# -ge 3 ] || { echo "usage: $0 REGISTRY IMAGE ARCH..." >&2; exit 2; }
registry=$1 image=$2
shift 2
DOCKER="${DOCKER:-docker}"
case "$registry" in 127.0.0.1*|localhost*) INSECURE="${INSECURE:-1}" ;; *) INSECURE="${INSECURE:-0}" ;; esac
insecure=()
[ "$INSECURE" = 1 ] && insecure=(--insecure)

name=${image##*/}
repo=${name%:*} tag=${name##*:}
[ "$repo" != "$name" ] || tag=latest
list="$registry/$repo:$tag"
start=$(date +%s)
members=()
for arch in "$@"; do
    src="$image-$arch"
    have=$("$DOCKER" image inspect -f '{{.Architecture}}' "$src" 2>/dev/null) || {
        echo "push_images: no local image $src; build it with make images ARCH=$arch" >&2; exit 2; }
    [ "$have" = "$arch" ] || { echo "push_images: $src is $have, not $arch" >&2; exit 1; }
    dst="$registry/$repo:$tag-$arch"
    "$DOCKER" tag "$src" "$dst"
    s=$(date +%s)
    "$DOCKER" push "$dst" > /dev/null
    echo "pushed $dst ($(( $(date +%s) - s ))s)"
    members+=("$dst")
done
"$DOCKER" manifest rm "$list" > /dev/null 2>&1 || true  # a list left by an earlier run
"$DOCKER" manifest create "${insecure[@]}" "$list" "${members[@]}" > /dev/null
"$DOCKER" manifest push "${insecure[@]}" --purge "$list" > /dev/null
platforms=$("$DOCKER" manifest inspect "${insecure[@]}" "$list" \
    | python3 -c 'import json, sys; print(" ".join(m["platform"]["os"] + "/" + m["platform"]["architecture"] for m in json.load(sys.stdin)["manifests"]))')
echo "pushed manifest list $list: $platforms ($(( $(date +%s) - start ))s in all)"
