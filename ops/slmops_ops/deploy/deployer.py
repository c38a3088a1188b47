"""Deploy, roll back and list serve containers on Docker hosts.

A deploy stops the container that runs under ``--name`` (the server drains on SIGTERM), keeps it
as ``<name>-previous``, starts the new one and waits until it answers SERVING on
``grpc.health.v1.Health`` (the image's own probe, run inside the container, so no port needs to be
reachable from here). When it does not (it exits, turns unhealthy or stays NOT_SERVING past
``--timeout``), it is removed and the previous container is renamed back and restarted: a failed
deploy leaves the previous server running. Any other failure once the old container is being
stopped (a dropped ssh connection, a Docker error, Ctrl-C) rolls back the same way and is reported
as a DeployError that names the original error. Only one previous container is kept per name.

Each deployment gets an admin token (``$SLMOPS_ADMIN_TOKEN`` in the container, so adapter admin
calls need it from any host): the one given with ``--env SLMOPS_ADMIN_TOKEN=...``, else the one this
machine keeps for that host and name, else the one the running container has, else a new random
one (``secrets.token_urlsafe``). It is kept in the local state file (mode 0600) and never printed
or put in a label; ``slmops deploy token`` prints it for ``slmops adapters ... --token``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import click

from slmops.bundle import BUNDLE_JSON, BundleError, BundleManifest, read_manifest, verify_files
from slmops.errors import SlmopsUsageError
from slmops.platforms import TARGET_FOR_ARCH, bundle_arch, normalize_arch
from slmops_ops.deploy import (
    BUNDLE_MOUNT,
    CONTAINER_METRICS_PORT,
    CONTAINER_PORT,
    HEALTH_PROBE,
    LABEL_ARCH,
    LABEL_BUNDLE_NAME,
    LABEL_BUNDLE_SHA,
    LABEL_CONFIG,
    LABEL_DEPLOY,
    LABEL_DEPLOYED_AT,
    LABEL_IMAGE,
    LABEL_IMAGE_ID,
    LABEL_NAME,
)
from slmops_ops.deploy.hosts import Host, connect, import_docker, parse_host
from slmops_ops.deploy.transfer import Moved, ensure_bundle, ensure_image, get_image

STOP_TIMEOUT = 40  # seconds docker gives a stopping server: its default drain (--grace-period 30) + margin
ADMIN_TOKEN_ENV = "SLMOPS_ADMIN_TOKEN"


class DeployError(click.ClickException):
    """The new container did not become SERVING (exit code 1); the message says what was rolled back."""


@dataclass
class DeployOptions:
    host: Host
    image: str
    bundle: Path | None = None
    name: str = "slmops-serve"
    port: int = CONTAINER_PORT
    metrics_port: int | None = CONTAINER_METRICS_PORT  # None: /metrics not published
    bind: str = "0.0.0.0"
    registry: str | None = None
    compress: bool | None = None  # None: gzip the image stream for remote hosts only
    timeout: float = 120.0
    serve_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restart: str = "unless-stopped"
    force: bool = False
    # Device limits (docker run --memory / --cpus / --read-only / --log-opt max-size, max-file).
    memory: str | None = None  # e.g. "1g"; None: no limit
    cpus: float | None = None  # e.g. 2.0; None: no limit
    read_only: bool = True  # read-only root file system; /tmp is a tmpfs (adapter uploads)
    tmp_size: str = "256m"  # size of that /tmp tmpfs (scratch space; uploaded adapters stay in memory)
    log_max_size: str = "10m"
    log_max_files: int = 3
    # Extra bind mounts on the host: (host path, container path, "ro" | "rw").
    mounts: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class DeployResult:
    host: str
    name: str
    status: str  # deployed | unchanged
    image: str
    image_id: str
    bundle: str | None
    container_id: str
    image_transfer: Moved
    bundle_transfer: Moved
    serving_after_s: float
    total_s: float
    previous: str | None = None
    arch: str | None = None  # the host engine's architecture
    # where the admin token came from: "--env", "kept" (this machine's state or the running
    # container), "generated"; the token itself is only in the state file and the container
    admin_token_source: str = ""
    state_saved: bool = True  # False: the state file could not be written (the token is only in the container)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- inputs -------------------------------------------------------------------------------------
def check_bundle(bundle: Path) -> tuple[BundleManifest, str]:
    """(manifest, sha256 of bundle.json) of a complete bundle; SlmopsUsageError('--bundle') otherwise."""
    if not bundle.is_dir():
        raise SlmopsUsageError("--bundle", f"'{bundle}' is not a folder; pass a bundle folder from `slmops build` "
                               "(make bundle writes dist/bundles/cpu)")
    try:
        manifest = read_manifest(bundle)
    except (BundleError, ValueError) as exc:
        raise SlmopsUsageError("--bundle", str(exc)) from exc
    problems = verify_files(bundle, manifest)
    if problems:
        raise SlmopsUsageError("--bundle", f"'{bundle}' does not match its {BUNDLE_JSON} ({'; '.join(problems[:5])}); "
                               "rebuild it with `slmops build`")
    return manifest, hashlib.sha256((bundle / BUNDLE_JSON).read_bytes()).hexdigest()


def check_ports(opts: DeployOptions) -> None:
    for option, port in (("--port", opts.port), ("--metrics-port", opts.metrics_port)):
        if port is not None and not 1 <= port <= 65535:
            raise SlmopsUsageError(option, f"{port} is not a TCP port (1-65535)")
    if opts.metrics_port is not None and opts.metrics_port == opts.port:
        raise SlmopsUsageError("--metrics-port", f"{opts.port} is also --port; choose another (or --no-metrics)")


# ---- architectures ------------------------------------------------------------------------------
def engine_arch(client: Any) -> str:
    """The architecture of a Docker engine's machine as Docker names it (``info().Architecture``:
    x86_64 -> amd64, aarch64 -> arm64)."""
    return normalize_arch(str(client.info().get("Architecture") or "")) or "unknown"


def image_arch(image: Any) -> str | None:
    return normalize_arch(image.attrs.get("Architecture"))


def pick_image(local: Any | None, target: Any, ref: str, arch: str, host: Host, say: Callable[[str], None]) -> str:
    """The image reference to ship to a host of ``arch``: ``ref`` when it is that architecture, else
    ``ref-<arch>`` (what `make images ARCH=...` tags), else a one-line refusal. An image found
    nowhere is left to ensure_image, which says how to build it."""
    candidates = [ref] if ref.endswith(f"-{arch}") else [ref, f"{ref}-{arch}"]
    wrong: list[tuple[str, str | None]] = []
    for candidate in candidates:
        image = get_image(local, candidate) or get_image(target, candidate)
        if image is None:
            continue
        found = image_arch(image)
        if found == arch:
            if candidate != ref:
                say(f"{host} runs linux/{arch}: shipping {candidate} (the linux/{arch} build of {ref})")
            return candidate
        wrong.append((candidate, found))
    if not wrong:
        return ref
    candidate, found = wrong[0]
    raise SlmopsUsageError("--image", f"{candidate} is a linux/{found} image and {host} runs linux/{arch}, so it cannot run "
                           f"there; build the linux/{arch} serve image with `make images ARCH={arch}` (add OFFLINE=1 "
                           f"without a registry; it is tagged {ref}-{arch}) and deploy again")


def check_bundle_arch(bundle: Path, manifest: BundleManifest, arch: str, host: Host) -> None:
    """Refuse a bundle built for another architecture than the host's, naming the target to build."""
    built_for = bundle_arch(manifest)
    if built_for is None or built_for == arch:
        return
    right = TARGET_FOR_ARCH.get(arch)
    sibling = bundle.parent / right if right else None
    if sibling is not None and (sibling / BUNDLE_JSON).is_file():
        how = f"pass --bundle {sibling} (built for target {right})"
    elif right:
        how = (f"build one with `slmops build --target {right}` (make bundle TARGET={right} writes "
               f"dist/bundles/{right}) and pass it as --bundle")
    else:
        how = f"build a bundle for {arch}"
    raise SlmopsUsageError("--bundle", f"'{bundle}' was built for {built_for} (target {manifest.target.name}) and {host} "
                           f"runs {arch}; {how}")


def _published(container: Any) -> list[tuple[str, int]]:
    ports = (container.attrs.get("HostConfig") or {}).get("PortBindings") or {}
    out = []
    for bindings in ports.values():
        for b in bindings or []:
            if b.get("HostPort"):
                out.append((b.get("HostIp") or "0.0.0.0", int(b["HostPort"])))
    return out


def check_port_conflicts(target: Any, opts: DeployOptions, ours: set[str]) -> None:
    """A clear error when another container (or, on this machine, any process) holds a port we publish."""
    wanted = [("--port", opts.port)] + ([("--metrics-port", opts.metrics_port)] if opts.metrics_port else [])
    ours_ports: set[int] = set()
    # One list call (not an inspect per container: over ssh:// every API call is an ssh session).
    for summary in target.api.containers():
        name = (summary.get("Names") or ["/?"])[0].lstrip("/")
        published = {int(p["PublicPort"]) for p in summary.get("Ports") or [] if p.get("PublicPort")}
        if name in ours:
            ours_ports |= published
            continue
        for option, port in wanted:
            if port in published:
                raise SlmopsUsageError(option, f"port {port} on {opts.host} is published by container '{name}' "
                                       f"({summary.get('Image', '?')}); stop that container or choose another {option}")
    if opts.host.is_local and not os.environ.get("DOCKER_HOST", "unix://").startswith(("tcp://", "ssh://")):
        for option, port in wanted:
            if port in ours_ports:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((opts.bind if opts.bind not in ("", "0.0.0.0") else "0.0.0.0", port))
                except OSError as exc:
                    raise SlmopsUsageError(option, f"port {port} is in use on this machine ({exc.strerror}); stop what "
                                           f"listens there or choose another {option}") from exc


def _image_name(container: Any) -> str:
    tags = container.attrs.get("Config", {}).get("Image")
    return str(tags or container.attrs.get("Image", "?"))


# ---- health -------------------------------------------------------------------------------------
def probe(container: Any) -> tuple[int | None, str]:
    """Run the image's health probe in ``container``: (exit code, output).

    Low-level exec calls instead of ``exec_run``: over ``ssh://`` (the SDK's ssh client transport) the
    engine may close the hijacked exec stream first, and closing it then raises BrokenPipeError after
    the output was read; the exit code is then read with exec_inspect."""
    api = container.client.api
    exec_id = api.exec_create(container.id, HEALTH_PROBE)["Id"]
    try:
        output = api.exec_start(exec_id) or b""
    except BrokenPipeError:
        output = b""
    code = None
    for _ in range(20):
        info = api.exec_inspect(exec_id)
        if not info.get("Running"):
            code = info.get("ExitCode")
            break
        time.sleep(0.1)
    return code, output.decode(errors="replace").strip() if isinstance(output, bytes) else str(output)


def wait_serving(container: Any, timeout: float, say: Callable[[str], None], interval: float = 1.0) -> tuple[bool, str, float]:
    """(SERVING?, why, seconds): polls Docker's state and the image's health probe inside the container."""
    docker = import_docker()
    start = time.monotonic()
    last = "no answer yet"
    said = 0.0
    while True:
        elapsed = time.monotonic() - start
        try:
            container.reload()
        except docker.errors.NotFound:
            return False, "the container disappeared", elapsed
        state = container.attrs.get("State", {})
        status = state.get("Status")
        if status in ("exited", "dead") or state.get("Restarting") or int(container.attrs.get("RestartCount") or 0) > 0:
            return False, f"the container {status or 'restarted'} (exit code {state.get('ExitCode')})", elapsed
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return True, "healthy", elapsed
        if health == "unhealthy":
            log = (state.get("Health") or {}).get("Log") or [{}]
            return False, f"Docker's HEALTHCHECK says unhealthy ({(log[-1].get('Output') or '').strip()})", elapsed
        if status == "running":
            try:
                code, output = probe(container)
                if code == 0:
                    return True, "SERVING", time.monotonic() - start
                last = output or f"probe exit {code}"
            except docker.errors.APIError as exc:
                last = str(exc)
        if elapsed > timeout:
            return False, f"not SERVING after {timeout:.0f}s (last health answer: {last})", elapsed
        if elapsed - said >= 10:
            said = elapsed
            say(f"  waiting for SERVING ({elapsed:.0f}s: {last})")
        time.sleep(interval)


def _logs(container: Any, lines: int = 25) -> str:
    try:
        return str(container.logs(tail=lines).decode(errors="replace").rstrip())
    except Exception:  # logs are a courtesy in an error message
        return "(no logs)"


def _sayer(out: TextIO | None) -> Callable[[str], None]:
    """Progress messages go to ``out`` (default stderr); results go to stdout."""
    def say(text: str) -> None:
        stream = out if out is not None else sys.stderr
        stream.write(text + "\n")
        stream.flush()
    return say


# ---- deploy -------------------------------------------------------------------------------------
def _config_key(opts: DeployOptions, image_id: str, bundle_sha: str | None) -> str:
    blob = json.dumps([image_id, bundle_sha, opts.port, opts.metrics_port, opts.bind, opts.serve_args,
                       sorted(opts.env.items()), opts.restart, opts.memory, opts.cpus, opts.read_only, opts.tmp_size,
                       opts.log_max_size, opts.log_max_files, opts.mounts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _get(target: Any, name: str) -> Any | None:
    docker = import_docker()
    try:
        return target.containers.get(name)
    except docker.errors.NotFound:
        return None


def _create(target: Any, opts: DeployOptions, image_ref: str, volume: str | None, labels: dict[str, str]) -> Any:
    docker = import_docker()
    api = target.api
    bindings: dict[str, Any] = {f"{CONTAINER_PORT}/tcp": (opts.bind, opts.port)}
    command = ["serve", BUNDLE_MOUNT, "--port", str(CONTAINER_PORT)]
    if opts.metrics_port is None:
        command.append("--no-metrics")
    else:
        bindings[f"{CONTAINER_METRICS_PORT}/tcp"] = (opts.bind, opts.metrics_port)
        command += ["--metrics-port", str(CONTAINER_METRICS_PORT)]
    host_config = api.create_host_config(
        port_bindings=bindings,
        binds={**({volume: {"bind": BUNDLE_MOUNT, "mode": "ro"}} if volume else {}),
               **{src: {"bind": dst, "mode": mode} for src, dst, mode in opts.mounts}} or None,
        init=True,
        restart_policy={"Name": opts.restart} if opts.restart != "no" else None,
        log_config=docker.types.LogConfig(type="json-file", config={"max-size": opts.log_max_size,
                                                                     "max-file": str(opts.log_max_files)}),
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        mem_limit=opts.memory,
        # the swap limit equals the memory limit: an edge box that swaps to an SD card stalls
        memswap_limit=opts.memory,
        nano_cpus=int(opts.cpus * 1e9) if opts.cpus else None,
        read_only=opts.read_only,
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={opts.tmp_size}"} if opts.read_only else None,
    )
    created = api.create_container(image_ref, command=command + list(opts.serve_args), name=opts.name, labels=labels,
                                   host_config=host_config, ports=[int(k.split("/")[0]) for k in bindings],
                                   environment=opts.env or None, stop_timeout=STOP_TIMEOUT)
    return target.containers.get(created["Id"])


def _roll_back(target: Any, opts: DeployOptions, previous: Any | None, new: Any | None, say: Callable[[str], None],
               was_running: bool) -> str:
    """Remove the new container (also one created but never handed back, as after a dropped
    connection) and bring the previous one back as ``opts.name``; returns a sentence for the error
    message. When the engine does not answer, one fresh connection to the host is tried."""
    docker = import_docker()
    name = opts.name
    problem = ""
    for attempt in range(2):
        try:
            if attempt:
                target = connect(opts.host)
            try:
                leftover = target.containers.get(new.id if new is not None else name)
            except docker.errors.NotFound:
                leftover = None
            if leftover is not None and (previous is None or leftover.id != previous.id) \
                    and leftover.labels.get(LABEL_DEPLOY) == "1":
                leftover.remove(force=True)
            if previous is None:
                return f"there was no previous container; nothing runs as '{name}' now"
            back = target.containers.get(previous.id)
            if back.name != name:
                back.rename(name)
            if not was_running:
                return f"the previous container '{name}' is back under its name (it was not running before, so it stays stopped)"
            back.start()
            break
        except Exception as exc:  # noqa: BLE001 - reported in the deploy's error, never masks it
            problem = problem or f"{type(exc).__name__}: {exc}"
    else:
        return (f"the rollback failed too ({problem}); once {opts.host} answers, run `slmops deploy rollback --name "
                f"{name}` or `docker start` the container '{name}-previous'")
    ok, why, seconds = wait_serving(back, opts.timeout, say)
    image = back.labels.get(LABEL_IMAGE, _image_name(back))
    if ok:
        return f"rolled back: the previous container '{name}' ({image}) is SERVING again after {seconds:.1f}s"
    return f"rolled back to the previous container '{name}' ({image}), but it is not SERVING either: {why}"


def deploy(opts: DeployOptions, out: TextIO | None = None) -> DeployResult:
    """Ship image and bundle to ``opts.host`` and switch ``opts.name`` to them, or roll back."""
    docker = import_docker()
    start = time.monotonic()
    say = _sayer(out)

    check_ports(opts)
    manifest, bundle_sha = check_bundle(opts.bundle) if opts.bundle is not None else (None, None)
    target = connect(opts.host)
    local = target
    if not opts.host.is_local:
        try:
            local = connect(parse_host("local"))
        except SlmopsUsageError:
            local = None
    previous = _get(target, opts.name)
    if previous is not None and previous.labels.get(LABEL_DEPLOY) != "1":
        raise SlmopsUsageError("--name", f"a container named '{opts.name}' on {opts.host} was not deployed by slmops; "
                               "remove it (docker rm -f) or choose another --name")
    check_port_conflicts(target, opts, {opts.name, f"{opts.name}-previous"})
    token, token_source = admin_token(opts.host, opts.name, previous, opts.env)
    opts = replace(opts, env={**opts.env, ADMIN_TOKEN_ENV: token})
    # The host's architecture decides the image and the bundle; a mismatch is refused here, before
    # any transfer and before anything is stopped.
    arch = engine_arch(target)
    if manifest is not None and opts.bundle is not None:
        check_bundle_arch(opts.bundle, manifest, arch, opts.host)
    image_wanted = pick_image(local, target, opts.image, arch, opts.host, say)
    if opts.bundle is None:  # before any transfer: an image without a baked bundle needs --bundle
        source = get_image(local, image_wanted) or get_image(target, image_wanted)
        if source is not None and not source.labels.get(LABEL_BUNDLE_SHA):
            raise SlmopsUsageError("--bundle", f"missing: {image_wanted} has no bundle baked in; pass --bundle "
                                   "dist/bundles/<target> (or bake one: make images BUNDLE=...)")

    image_ref, image_moved = ensure_image(local, target, opts.host, image_wanted, opts.registry, opts.compress, out)
    image = target.images.get(image_ref)
    volume, bundle_moved = None, Moved("baked")
    if manifest is not None and opts.bundle is not None and bundle_sha is not None:
        volume, bundle_moved = ensure_bundle(target, image_ref, opts.bundle, manifest, bundle_sha, str(opts.host), out)
        bundle_label = f"{manifest.target.name}@{bundle_sha[:12]}"
    else:
        bundle_sha = image.labels.get(LABEL_BUNDLE_SHA) or None
        if not bundle_sha:
            raise SlmopsUsageError("--bundle", f"missing: {opts.image} has no bundle baked in; pass --bundle "
                                   "dist/bundles/<target> (or bake one: make images BUNDLE=...)")
        bundle_label = f"{image.labels.get(LABEL_BUNDLE_NAME) or 'baked'}@{bundle_sha[:12]} (baked)"
    key = _config_key(opts, image.id, bundle_sha)

    if previous is not None and not opts.force and previous.labels.get(LABEL_CONFIG) == key \
            and previous.status == "running":
        ok, _, _ = wait_serving(previous, 5, say)
        if ok:
            say(f"'{opts.name}' on {opts.host} already runs {image_ref} with bundle {bundle_label}, SERVING (--force redeploys)")
            saved = record(opts.host, opts.name, image_ref, bundle_label, token)
            return DeployResult(str(opts.host), opts.name, "unchanged", image_ref, image.id, bundle_label, previous.id,
                                image_moved, bundle_moved, 0.0, time.monotonic() - start, arch=arch,
                                admin_token_source=token_source, state_saved=saved)

    labels = {LABEL_DEPLOY: "1", LABEL_NAME: opts.name, LABEL_IMAGE: image_ref, LABEL_IMAGE_ID: image.id,
              LABEL_CONFIG: key, LABEL_BUNDLE_SHA: bundle_sha or "", LABEL_BUNDLE_NAME: bundle_label, LABEL_ARCH: arch,
              LABEL_DEPLOYED_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    older = _get(target, f"{opts.name}-previous")
    if older is not None:
        older.remove(force=True)
    previous_desc = None
    was_running = previous is not None and previous.status in ("running", "restarting")
    new = None
    stopping = False
    try:
        if previous is not None:
            previous_desc = previous.labels.get(LABEL_IMAGE, _image_name(previous))
            say(f"stopping '{opts.name}' ({previous_desc}); it stays as '{opts.name}-previous' for a rollback")
            stopping = True
            previous.stop(timeout=STOP_TIMEOUT)
            previous.rename(f"{opts.name}-previous")
        say(f"starting '{opts.name}' on {opts.host} (linux/{arch}): {image_ref}, bundle {bundle_label}, port {opts.port}")
        new = _create(target, opts, image_ref, volume, labels)
        new.start()
        ok, why, serving_after = wait_serving(new, opts.timeout, say)
    except BaseException as exc:
        # ANY failure once the old container is being stopped (a dropped ssh connection, a Docker
        # error, Ctrl-C) brings it back, so a failed deploy never leaves nothing running
        if not stopping and previous is not None:
            raise
        rolled = _roll_back(target, opts, previous, new, say, was_running)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: rolled back, then as asked
        text = str(getattr(exc, "explanation", None) or exc) or type(exc).__name__
        if isinstance(exc, docker.errors.APIError) and ("port is already allocated" in text or "address already in use" in text):
            raise SlmopsUsageError("--port", f"cannot publish port {opts.port}/{opts.metrics_port} on {opts.host} "
                                   f"({text}); choose another --port/--metrics-port. {rolled}") from exc
        step = "starting the new container" if new is None or isinstance(exc, docker.errors.APIError) else \
            "waiting for the new container"
        raise DeployError(f"{step} on {opts.host} failed ({type(exc).__name__}: {text}); {rolled}") from exc
    if not ok:
        logs = _logs(new)
        rolled = _roll_back(target, opts, previous, new, say, was_running)
        raise DeployError(f"the new container ({image_ref}, bundle {bundle_label}) did not become SERVING: {why}; it was "
                          f"removed and {rolled}.\n--- its last log lines ---\n{logs}")
    say(f"'{opts.name}' on {opts.host} is SERVING after {serving_after:.1f}s")
    prune_bundle_volumes(target)
    saved = record(opts.host, opts.name, image_ref, bundle_label, token)
    if not saved:
        say(f"could not write {state_file()}: the admin token is only in the container's environment "
            f"(docker inspect {opts.name}); set $SLMOPS_DEPLOY_STATE to a writable file")
    return DeployResult(str(opts.host), opts.name, "deployed", image_ref, image.id, bundle_label, new.id, image_moved,
                        bundle_moved, serving_after, time.monotonic() - start, previous_desc, arch,
                        admin_token_source=token_source, state_saved=saved)


def prune_bundle_volumes(target: Any) -> list[str]:
    """Remove slmops bundle volumes that no container (running or stopped) uses any more."""
    used = {m.get("Name") for c in target.api.containers(all=True) for m in c.get("Mounts") or []}
    removed = []
    for volume in target.volumes.list(filters={"label": LABEL_DEPLOY}):
        if volume.name not in used:
            try:
                volume.remove()
                removed.append(volume.name)
            except Exception:  # in use by a container created meanwhile: keep it
                pass
    return removed


# ---- rollback -----------------------------------------------------------------------------------
def rollback(host: Host, name: str, timeout: float = 120.0, out: TextIO | None = None) -> str:
    """Swap ``name`` and ``name-previous``: start the previous container, keep the current one stopped."""
    say = _sayer(out)

    target = connect(host)
    previous = _get(target, f"{name}-previous")
    if previous is None or previous.labels.get(LABEL_DEPLOY) != "1":
        raise SlmopsUsageError("--name", f"no container '{name}-previous' on {host} to roll back to")
    current = _get(target, name)
    if current is not None:
        current.stop(timeout=STOP_TIMEOUT)
        current.rename(f"{name}-rollback")
    previous.rename(name)
    previous.start()
    ok, why, seconds = wait_serving(previous, timeout, say)
    if not ok:
        logs = _logs(previous)
        previous.stop(timeout=STOP_TIMEOUT)
        previous.rename(f"{name}-previous")
        restored = "nothing else was running"
        if current is not None:
            current.rename(name)
            current.start()
            back, _, _ = wait_serving(current, timeout, say)
            restored = "the current container runs again" + ("" if back else " but is not SERVING")
        raise DeployError(f"the previous container did not become SERVING ({why}); {restored}.\n--- its logs ---\n{logs}")
    if current is not None:
        current.rename(f"{name}-previous")
    image = previous.labels.get(LABEL_IMAGE, _image_name(previous))
    record(host, name, image, previous.labels.get(LABEL_BUNDLE_NAME, "?"), container_token(previous))
    return f"'{name}' on {host} rolled back to {image} (bundle {previous.labels.get(LABEL_BUNDLE_NAME, '?')}), SERVING after {seconds:.1f}s"


# ---- status -------------------------------------------------------------------------------------
def state_file() -> Path:
    """Where deploys are recorded (``$SLMOPS_DEPLOY_STATE``, else $XDG_STATE_HOME/slmops/deployments.json)."""
    if os.environ.get("SLMOPS_DEPLOY_STATE"):
        return Path(os.environ["SLMOPS_DEPLOY_STATE"])
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "slmops" / "deployments.json"


def _read_state() -> dict[str, Any]:
    try:
        data = json.loads(state_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record(host: Host, name: str, image: str, bundle: str, token: str | None = None) -> bool:
    """Remember a deployment (and its admin token; None keeps the one recorded) in the state file,
    written atomically with mode 0600 (it holds secrets). False when it cannot be written."""
    data = _read_state()
    entry: dict[str, Any] = {"image": image, "bundle": bundle, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    kept = (data.get(str(host)) or {}).get(name, {}).get("admin_token")
    if token or kept:
        entry["admin_token"] = token or kept
    data.setdefault(str(host), {})[name] = entry
    path = state_file()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # also when tmp existed with wider bits
            f.write(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
        return True
    except OSError:
        return False


def container_token(container: Any | None) -> str | None:
    """The admin token in a container's environment (``$SLMOPS_ADMIN_TOKEN``), if any."""
    if container is None:
        return None
    for item in (container.attrs.get("Config") or {}).get("Env") or []:
        key, _, value = str(item).partition("=")
        if key == ADMIN_TOKEN_ENV and value:
            return value
    return None


def recorded_token(host: Host | str, name: str) -> str | None:
    """The admin token this machine keeps for deployment ``name`` on ``host``."""
    token = ((_read_state().get(str(host)) or {}).get(name) or {}).get("admin_token")
    return str(token) if token else None


def admin_token(host: Host, name: str, previous: Any | None, env: dict[str, str]) -> tuple[str, str]:
    """(token, source) for a deployment: ``--env SLMOPS_ADMIN_TOKEN=...``; else the one kept here for
    this host and name; else the running container's (a state file lost, or a deploy from another
    machine); else a new random one. Reusing it keeps clients and scripts that hold it working."""
    if env.get(ADMIN_TOKEN_ENV):
        return env[ADMIN_TOKEN_ENV], "--env"
    kept = recorded_token(host, name) or container_token(previous)
    if kept:
        return kept, "kept"
    return secrets.token_urlsafe(32), "generated"


def known_hosts() -> list[str]:
    return sorted(_read_state()) or ["local"]


def status(hosts: list[Host]) -> list[dict[str, Any]]:
    """One row per slmops container on each host (or one 'unreachable' row per host that does not answer)."""
    rows: list[dict[str, Any]] = []
    for host in hosts:
        try:
            client = connect(host, timeout=30)
        except SlmopsUsageError as exc:
            rows.append({"host": str(host), "name": "-", "state": "unreachable", "detail": exc.message})
            continue
        try:
            arch = engine_arch(client)
        except Exception:  # an engine that lists containers but not its info: still list them
            arch = "?"
        for c in sorted(client.containers.list(all=True, filters={"label": LABEL_NAME}), key=lambda c: c.name):
            state = c.attrs.get("State", {})
            rows.append({
                "host": str(host), "arch": arch, "name": c.name, "state": state.get("Status", "?"),
                "health": (state.get("Health") or {}).get("Status", "-") if state.get("Status") == "running" else "-",
                "image": c.labels.get(LABEL_IMAGE, _image_name(c)), "bundle": c.labels.get(LABEL_BUNDLE_NAME, "-"),
                "ports": ", ".join(f"{ip}:{port}" for ip, port in _published(c)) or "-",
                "deployed_at": c.labels.get(LABEL_DEPLOYED_AT, "-"), "started_at": state.get("StartedAt", "-")[:19],
                "id": c.short_id,
            })
    return rows
