"""Bake a bundle into an image on a Docker engine (the swarm manager) and push it to the registry
the devices pull from. The image is ``FROM`` the serve image with the bundle at ``/bundle`` in two
layers: the base model's files, then the adapters and ``bundle.json``. The builder's layer cache
keys COPY layers by content, so a new bundle with the same base model reuses the model layer and a
device pulls only the adapter layer (bench/bench_fleet.py measures the bytes)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from slmops.bundle import BUNDLE_JSON, BundleManifest
from slmops.errors import SlmopsUsageError
from slmops_ops.deploy.hosts import import_docker
from slmops_ops.deploy.transfer import tar_stream
from slmops_ops.fleet import BUNDLE_REPO, LABEL_ADAPTERS, LABEL_BUNDLE_NAME, LABEL_BUNDLE_SHA

MTIME = 315532800  # 1980-01-01: fixed file times, so equal files make equal layers


@dataclass
class Baked:
    ref: str  # REGISTRY/slmops-bundle:TARGET-SHA12
    built: bool  # False: the engine had it already
    pushed_bytes: int  # bytes of layers the registry did not have
    seconds: float


def image_ref(registry: str, manifest: BundleManifest, sha256: str) -> str:
    return f"{registry}/{BUNDLE_REPO}:{manifest.target.name}-{sha256[:12]}"


def _split(manifest: BundleManifest, bundle_dir: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    adapter_files = {a.file for a in manifest.adapters.values()}
    model = [(f"l1/{rel}", bundle_dir / rel) for rel in sorted(manifest.files) if rel not in adapter_files]
    top = [(f"l2/{rel}", bundle_dir / rel) for rel in sorted(adapter_files)] + [(f"l2/{BUNDLE_JSON}",
                                                                                 bundle_dir / BUNDLE_JSON)]
    return model, top


def dockerfile(base: str, sha256: str, manifest: BundleManifest) -> str:
    return (f"FROM {base}\n"
            "COPY l1/ /bundle/\n"
            "COPY l2/ /bundle/\n"
            f'LABEL {LABEL_BUNDLE_SHA}="{sha256}" {LABEL_BUNDLE_NAME}="{manifest.target.name}" '
            f'{LABEL_ADAPTERS}="{",".join(sorted(manifest.adapters))}"\n')


def _events(stream: Any, what: str) -> int:
    """Drain a build/push event stream; raise on its error; bytes pushed (layers the registry lacked)."""
    pushed: dict[str, int] = {}
    for event in stream:
        if "error" in event or "errorDetail" in event:
            raise RuntimeError(f"{what}: {event.get('error') or event['errorDetail'].get('message')}")
        detail = event.get("progressDetail") or {}
        if event.get("status") == "Pushing" and detail.get("total"):
            pushed[event["id"]] = int(detail["total"])
    return sum(pushed.values())


def bake(builder: Any, base: str, bundle_dir: Path, manifest: BundleManifest, sha256: str, registry: str,
         say: Any, out: TextIO | None = None) -> Baked:
    docker = import_docker()
    start = time.monotonic()
    ref = image_ref(registry, manifest, sha256)
    built = False
    try:
        builder.images.get(ref)
    except docker.errors.ImageNotFound:
        model, top = _split(manifest, bundle_dir)
        with tempfile.TemporaryDirectory() as tmp:
            df = Path(tmp) / "Dockerfile"
            df.write_text(dockerfile(base, sha256, manifest))
            files = [("Dockerfile", df), *model, *top]
            say(f"baking {ref} from {base} ({sum(p.stat().st_size for _, p in files) / 1e6:.1f} MB of bundle)")
            try:
                _events(builder.api.build(fileobj=tar_stream(files, mtime=MTIME), custom_context=True, tag=ref, rm=True,
                                          forcerm=True, pull=False, decode=True), f"building {ref}")
            except (RuntimeError, docker.errors.APIError) as exc:
                raise SlmopsUsageError("--image", f"cannot build the bundle image from {base} on the manager ({exc}); "
                                       "the serve image must be on the manager or on this machine's engine "
                                       "(make images)") from exc
        built = True
    repo, tag = ref.rsplit(":", 1)
    try:
        pushed = _events(builder.api.push(repo, tag=tag, stream=True, decode=True), f"pushing {ref}")
    except (RuntimeError, docker.errors.APIError) as exc:
        raise SlmopsUsageError("--registry", f"cannot push {ref} ({str(exc)[:300]}); is the registry running and "
                               "reachable from the manager (a plain-HTTP registry must be in every node's "
                               "insecure-registries)?") from exc
    return Baked(ref, built, pushed, time.monotonic() - start)
