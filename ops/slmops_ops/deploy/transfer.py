"""Moving the serve image and a bundle to a Docker host.

Image: already there (same image ID) -> nothing moves; ``--registry`` -> push from the local engine,
pull on the host; otherwise a ``docker save`` stream from the local engine, gzip-compressed for
remote hosts, straight into the host's ``docker load`` (no temporary file on either side).

Bundle: a named volume per bundle content (``slmops-bundle-<target>-<sha12>``), filled by
``put_archive`` through a helper container that is created from the serve image but never started
(so nothing runs and no other image is needed on the host). The files are streamed as a tar built
on the fly, owned by root and read-only to the server's user; a marker file written last tells a
complete volume from an interrupted copy.
"""

from __future__ import annotations

import json
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from slmops.bundle import BUNDLE_JSON, BundleManifest
from slmops.errors import SlmopsUsageError
from slmops_ops.deploy import BUNDLE_MOUNT, LABEL_BUNDLE_NAME, LABEL_BUNDLE_SHA, LABEL_DEPLOY
from slmops_ops.deploy.hosts import Host, import_docker
from slmops_ops.deploy.progress import Progress

COMPLETE_MARKER = ".slmops-complete"
CHUNK = 1 << 20


@dataclass
class Moved:
    """What a transfer did: ``how`` (present, save/load, registry, copied, reused), bytes, seconds."""

    how: str
    nbytes: int = 0
    seconds: float = 0.0


# ---- images -------------------------------------------------------------------------------------
def split_ref(ref: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``tag``); no tag -> ``latest``."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, "latest"


def get_image(client: Any, ref: str) -> Any | None:
    docker = import_docker()
    if client is None:
        return None
    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None


def gzip_chunks(chunks: Iterable[bytes], level: int = 1) -> Iterator[bytes]:
    """Gzip a byte stream on the fly (``docker load`` takes gzip); level 1: cheap on small CPUs."""
    z = zlib.compressobj(level, zlib.DEFLATED, 31)
    for chunk in chunks:
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def save_load(local: Any, target: Any, ref: str, label: str, compress: bool, stream: TextIO | None = None) -> Moved:
    """Stream ``docker save ref`` from ``local`` into ``docker load`` on ``target``."""
    image = local.images.get(ref)
    size = int(image.attrs.get("Size") or 0)
    with Progress(f"image {ref} -> {label}" + (" (gzip)" if compress else ""), size, stream) as progress:
        chunks: Iterable[bytes] = progress.wrap(image.save(chunk_size=CHUNK, named=ref))
        sent = {"n": 0}
        if compress:
            def counted(it: Iterable[bytes]) -> Iterator[bytes]:
                for c in it:
                    sent["n"] += len(c)
                    yield c
            chunks = counted(gzip_chunks(chunks))
        target.images.load(chunks)
    return Moved("save/load" + (f" gzip {sent['n'] / 1e6:.0f} MB sent" if compress else ""), progress.done,
                 progress.seconds)


def _layer_progress(events: Iterable[dict[str, Any]], progress: Progress) -> None:
    """Sum per-layer progress of a push or pull event stream into ``progress``; raise on an error event."""
    layers: dict[str, tuple[int, int]] = {}
    for event in events:
        if "error" in event or "errorDetail" in event:
            raise RuntimeError(event.get("error") or event["errorDetail"].get("message", str(event)))
        detail = event.get("progressDetail") or {}
        if event.get("id") and detail.get("total"):
            layers[event["id"]] = (int(detail.get("current", 0)), int(detail["total"]))
            progress.update(sum(c for c, _ in layers.values()), sum(t for _, t in layers.values()))
        elif event.get("id") and event.get("status") in ("Layer already exists", "Pushed", "Pull complete",
                                                           "Already exists", "Download complete"):
            total = layers.get(event["id"], (0, 0))[1]
            layers[event["id"]] = (total, total)
    progress.update(sum(t for _, t in layers.values()))


def push_pull(local: Any, target: Any, ref: str, registry: str, label: str, stream: TextIO | None = None) -> tuple[str, Moved]:
    """Tag ``ref`` as ``registry/name:tag``, push it from ``local``, pull it on ``target``."""
    docker = import_docker()
    repo, tag = split_ref(ref)
    name = repo.rsplit("/", 1)[-1]
    remote_repo = f"{registry}/{name}"
    image = local.images.get(ref)
    image.tag(remote_repo, tag)
    start = time.monotonic()
    with Progress(f"push {remote_repo}:{tag}", int(image.attrs.get("Size") or 0), stream) as progress:
        try:
            _layer_progress(local.images.push(remote_repo, tag=tag, stream=True, decode=True), progress)
        except (RuntimeError, docker.errors.APIError) as exc:
            raise SlmopsUsageError("--registry", f"cannot push {remote_repo}:{tag} to {registry} ({exc}); is the registry "
                                   "running and reachable from here? (a plain-HTTP registry other than 127.0.0.1 must "
                                   "be listed in dockerd's insecure-registries)") from exc
    with Progress(f"pull {remote_repo}:{tag} on {label}", 0, stream) as progress:
        try:
            _layer_progress(target.api.pull(remote_repo, tag=tag, stream=True, decode=True), progress)
        except (RuntimeError, docker.errors.APIError) as exc:
            raise SlmopsUsageError("--registry", f"{label} cannot pull {remote_repo}:{tag} ({exc}); the registry must "
                                   "be reachable from that host under the same name (and be in its insecure-registries "
                                   "if it speaks plain HTTP)") from exc
    return f"{remote_repo}:{tag}", Moved("registry", progress.done, time.monotonic() - start)


def ensure_image(local: Any | None, target: Any, host: Host, ref: str, registry: str | None, compress: bool | None,
                 stream: TextIO | None = None) -> tuple[str, Moved]:
    """Make ``ref`` runnable on ``target``; returns the reference to run and what moved."""
    local_image = get_image(local, ref)
    if registry:
        if local_image is None:
            raise SlmopsUsageError("--image", f"image {ref} is not in the local Docker engine, so it cannot be pushed to "
                                   f"{registry}; build it with `make images` or pass --image")
        return push_pull(local, target, ref, registry, str(host), stream)
    target_image = target if local is target else None
    remote_image = local_image if target_image is not None else get_image(target, ref)
    if local_image is None and remote_image is None:
        where = "the local Docker engine" if host.is_local else f"the local Docker engine nor on {host}"
        raise SlmopsUsageError("--image", f"image {ref} is not in {where}; build it with `make images` "
                               "(or pass --image with an image that exists)")
    if local_image is None or (remote_image is not None and remote_image.id == local_image.id):
        return ref, Moved("present")
    return ref, save_load(local, target, ref, str(host), not host.is_local if compress is None else compress, stream)


# ---- bundles ------------------------------------------------------------------------------------
def bundle_files(bundle_dir: Path, manifest: BundleManifest) -> list[tuple[str, Path]]:
    """(name in the archive, local path): bundle.json and every file it lists, nothing else."""
    return [(BUNDLE_JSON, bundle_dir / BUNDLE_JSON)] + [(rel, bundle_dir / rel) for rel in sorted(manifest.files)]


def tar_stream(files: list[tuple[str, Path]], mtime: int | None = None) -> Iterator[bytes]:
    """A tar of ``files`` (and their folders), built while it is read: root-owned, 0644 / 0755."""
    mtime = int(time.time()) if mtime is None else mtime
    seen: set[str] = set()
    for name, path in files:
        parts = Path(name).parts
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder not in seen:
                seen.add(folder)
                info = tarfile.TarInfo(folder)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
                yield info.tobuf(tarfile.PAX_FORMAT)
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = path.stat().st_size, 0o644, mtime
        info.uname = info.gname = "root"
        yield info.tobuf(tarfile.PAX_FORMAT)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        if info.size % 512:
            yield b"\0" * (512 - info.size % 512)
    yield b"\0" * 1024


def volume_name(manifest: BundleManifest, sha256: str) -> str:
    return f"slmops-bundle-{manifest.target.name}-{sha256[:12]}"


def ensure_bundle(target: Any, image_ref: str, bundle_dir: Path, manifest: BundleManifest, sha256: str, label: str,
                  stream: TextIO | None = None) -> tuple[str, Moved]:
    """The name of a volume on ``target`` that holds this bundle, filled now unless it already was."""
    docker = import_docker()
    name = volume_name(manifest, sha256)
    labels = {LABEL_DEPLOY: "1", LABEL_BUNDLE_SHA: sha256, LABEL_BUNDLE_NAME: manifest.target.name}
    try:
        target.volumes.get(name)
    except docker.errors.NotFound:
        target.volumes.create(name, labels=labels)
    helper = target.containers.create(image_ref, entrypoint=["true"], command=[], labels={LABEL_DEPLOY: "helper"},
                                      volumes={name: {"bind": BUNDLE_MOUNT, "mode": "rw"}}, network_disabled=True,
                                      user="0")
    try:
        try:
            helper.get_archive(f"{BUNDLE_MOUNT}/{COMPLETE_MARKER}")
            return name, Moved("reused")
        except docker.errors.NotFound:
            pass
        files = bundle_files(bundle_dir, manifest)
        total = sum(p.stat().st_size for _, p in files)
        with Progress(f"bundle {bundle_dir} -> {label} volume {name}", total, stream) as progress:
            if not helper.put_archive(BUNDLE_MOUNT, progress.wrap(tar_stream(files))):
                raise RuntimeError(f"copying the bundle into volume {name} on {label} failed")
        marker = json.dumps({"sha256": sha256, "source": str(bundle_dir), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                                  time.gmtime())})
        helper.put_archive(BUNDLE_MOUNT, b"".join(_bytes_tar(COMPLETE_MARKER, marker.encode())))
        return name, Moved("copied", progress.done, progress.seconds)
    finally:
        helper.remove(force=True)


def _bytes_tar(name: str, data: bytes) -> Iterator[bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    yield info.tobuf(tarfile.PAX_FORMAT)
    yield data + b"\0" * ((512 - len(data) % 512) % 512)
    yield b"\0" * 1024
