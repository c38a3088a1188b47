"""Bake a bundle into an image on a Docker engine (the swarm manager) and push it to the registry
the devices pull from. The image is ``FROM`` the serve image with the bundle at ``/bundle`` in two
layers: the base model's files, then the adapters and ``bundle.json``. The builder's layer cache
keys COPY layers by content, so a new bundle with the same base model reuses the model layer and a
device pulls only the adapter layer (bench/bench_fleet.py measures the bytes)."""

from __future__ import annotations

import json
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


# ---- multi-arch: a manifest list over the members, through the registry's HTTP API ---------------
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
VARIANT = {"arm64": "v8"}  # what `docker manifest` and buildx write for linux/arm64


def list_ref(registry: str, members: list[tuple[str, BundleManifest, str]]) -> str:
    """REGISTRY/slmops-bundle:TARGET_TARGET-SHA12 of the list over ``members`` ((arch, manifest, sha256)):
    the hash is of every member's bundle hash, so the same bundles give the same tag."""
    import hashlib

    key = hashlib.sha256("\n".join(sorted(f"{arch}={sha}" for arch, _, sha in members)).encode()).hexdigest()
    targets = "_".join(sorted(m.target.name for _, m, _ in members))
    return f"{registry}/{BUNDLE_REPO}:{targets}-{key[:12]}"


class Registry:
    """The few calls of the registry HTTP API (v2) that a manifest list needs. HTTPS first, plain
    HTTP when the registry does not speak TLS (as Docker does for an insecure registry). No auth:
    a registry that wants a token answers 401, which is reported as such."""

    def __init__(self, address: str, timeout: float = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        self.scheme: str | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        import ssl
        import urllib.error
        import urllib.request

        errors = []
        for scheme in [self.scheme] if self.scheme else ["https", "http"]:
            req = urllib.request.Request(f"{scheme}://{self.address}{path}", data=body, method=method,
                                         headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as res:
                    self.scheme = scheme
                    return res.status, {k.lower(): v for k, v in res.headers.items()}, res.read()
            except urllib.error.HTTPError as exc:
                self.scheme = scheme
                return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
            except (urllib.error.URLError, ssl.SSLError, ConnectionError, OSError) as exc:
                errors.append(f"{scheme}: {getattr(exc, 'reason', exc)}")
        raise SlmopsUsageError("--registry", f"cannot reach the registry {self.address} from this machine "
                               f"({'; '.join(errors)}); a multi-arch rollout puts its manifest list there itself")

    def manifest(self, repo: str, reference: str) -> tuple[str, bytes]:
        """(media type, bytes) of one image's manifest (not a list)."""
        status, headers, body = self.request("GET", f"/v2/{repo}/manifests/{reference}",
                                             headers={"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"})
        if status != 200:
            raise SlmopsUsageError("--registry", f"the registry {self.address} has no manifest {repo}:{reference} "
                                   f"(HTTP {status}: {body[:200].decode(errors='replace')})")
        return headers.get("content-type", "").split(";")[0].strip(), body

    def put_list(self, ref: str, members: list[tuple[str, str]]) -> str:
        """PUT the manifest list ``ref`` over ``members`` ((arch, image ref), all in ``ref``'s
        repository): each member's manifest digest and size as the registry serves them, its config's
        architecture checked against ``arch``. Returns the list's digest."""
        import hashlib

        repo, tag = _repo_tag(self.address, ref)
        entries = []
        for arch, member in members:
            member_repo, member_tag = _repo_tag(self.address, member)
            if member_repo != repo:
                raise ValueError(f"{member} is not in {self.address}/{repo}: a manifest list refers to its own repository")
            media, body = self.manifest(repo, member_tag)
            if media not in (DOCKER_MANIFEST, OCI_MANIFEST):
                raise SlmopsUsageError("--registry", f"{member} is served as '{media}', not an image manifest")
            config = json.loads(body)["config"]["digest"]
            status, _, blob = self.request("GET", f"/v2/{repo}/blobs/{config}")
            found = json.loads(blob).get("architecture") if status == 200 else None
            if found != arch:
                raise SlmopsUsageError("--bundle", f"{member} is a linux/{found} image, not linux/{arch}: its manifest "
                                       "list entry would send it to the wrong nodes")
            platform = {"architecture": arch, "os": "linux", **({"variant": VARIANT[arch]} if arch in VARIANT else {})}
            entries.append({"mediaType": media, "size": len(body), "digest": f"sha256:{hashlib.sha256(body).hexdigest()}",
                            "platform": platform})
        media = OCI_INDEX if all(e["mediaType"] == OCI_MANIFEST for e in entries) else DOCKER_LIST
        doc = json.dumps({"schemaVersion": 2, "mediaType": media, "manifests": entries}, indent=3).encode()
        status, headers, body = self.request("PUT", f"/v2/{repo}/manifests/{tag}", body=doc,
                                             headers={"Content-Type": media})
        if status not in (200, 201):
            raise SlmopsUsageError("--registry", f"the registry {self.address} refused the manifest list {ref} "
                                   f"(HTTP {status}: {body[:300].decode(errors='replace')})")
        return headers.get("docker-content-digest") or f"sha256:{hashlib.sha256(doc).hexdigest()}"


def _repo_tag(registry: str, ref: str) -> tuple[str, str]:
    if not ref.startswith(f"{registry}/"):
        raise ValueError(f"{ref} is not an image of the registry {registry}")
    repo, _, tag = ref[len(registry) + 1:].rpartition(":")
    return repo, tag
