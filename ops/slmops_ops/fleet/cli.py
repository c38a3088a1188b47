"""``slmops fleet``: deploy | status | adapters load/unload | rollback | manifest."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

from slmops import __version__
from slmops.errors import SlmopsUsageError
from slmops_ops.deploy.cli import _env_pairs, _registry, engine_errors

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
DEFAULT_IMAGE = f"slmops-serve:{__version__}"


def _manager_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option("--manager", default="local", envvar="SLMOPS_FLEET_MANAGER", metavar="ENGINE",
                        help="a swarm manager's Docker engine: local, unix:///path, ssh://user@host or tcp://host:port "
                             "($SLMOPS_FLEET_MANAGER)")(f)


@click.group("fleet", context_settings=CONTEXT)
def fleet_group() -> None:
    """Roll bundles out to a fleet of devices on Docker Swarm: health-gated, one device at a time, with
    Swarm's automatic rollback; or write the Kubernetes manifest for k3s fleets.

    \b
    slmops fleet deploy --bundle dist/bundles/cpu --service slm --port 50051 --registry reg.lan:5000
    slmops fleet deploy --bundle dist/bundles/cpu --bundle dist/bundles/cpu-arm64 --service slm --port 50051 \\
        --registry reg.lan:5000 --canary 1
    slmops fleet status --service slm
    slmops fleet adapters load tone2 runs/tone2/tone2.onnx_adapter --service slm
    slmops fleet rollback --service slm
    slmops fleet manifest --format kubernetes --bundle dist/bundles/cpu --registry reg.lan:5000 --out slm.yaml

    Ports are published in host mode on every device (the routing mesh needs IPVS and would hide which
    replica answers), so each replica is reachable at DEVICE:PORT; clients spread requests over the
    devices and retry UNAVAILABLE on another one while a device updates (stop-first).
    """


@fleet_group.command("deploy", context_settings=CONTEXT)
@click.option("--bundle", "bundles", type=click.Path(path_type=Path), multiple=True, required=True,
              help="bundle folder from `slmops build`; repeat it with one build per architecture (e.g. "
                   "dist/bundles/cpu and dist/bundles/cpu-arm64) for a multi-arch manifest list")
@click.option("--service", default="slmops", help="Swarm service name")
@click.option("--replicas", type=click.IntRange(min=0), default=None, help="N tasks  [default: global, one per device]")
@click.option("--global", "global_mode", is_flag=True, help="one task per device (the default)")
@click.option("--constraint", "constraints", multiple=True, metavar="EXPR",
              help="placement constraint (repeatable), e.g. node.labels.site==lab")
@click.option("--port", type=int, default=50051, help="gRPC port published on every device (host mode)")
@click.option("--http-port", type=int, default=None, help="OpenAI HTTP port published on every device")
@click.option("--metrics-port", type=int, default=None, help="Prometheus /metrics port published on every device")
@click.option("--registry", default=None, metavar="HOST:PORT", help="registry the devices pull the bundle image from")
@_manager_option
@click.option("--image", default=DEFAULT_IMAGE, help="serve image the bundle image is built from")
@click.option("--serve-arg", "serve_args", multiple=True, help="extra `slmops serve` argument (repeatable)")
@click.option("--env", "env", multiple=True, help="KEY=VALUE in the server (repeatable)")
@click.option("--canary", type=click.IntRange(min=0), default=0,
              help="update K tasks first, send each a Generate per adapter (compared with the bundle's own "
                   "answer), then the rest; a wrong answer rolls back")
@click.option("--canary-compare/--no-canary-compare", default=True,
              help="the canary's answers must equal what the bundle answers, computed here (same raw prompt, "
                   "greedy, 6 tokens) with the adapter's bundle.json sha256; off: each adapter must only answer")
@click.option("--timeout", type=float, default=600.0, help="seconds the whole rollout may take")
@click.option("--update-monitor", "monitor", type=float, default=5.0,
              help="seconds Swarm watches each updated task before the next")
@click.option("--memory", default=None, metavar="SIZE", help="memory limit per task, e.g. 2g")
@click.option("--cpus", type=float, default=None, help="CPU limit per task")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def deploy_command(bundles: tuple[Path, ...], service: str, replicas: int | None, global_mode: bool, constraints: tuple[str, ...],
                   port: int, http_port: int | None, metrics_port: int | None, registry: str | None, manager: str,
                   image: str, serve_args: tuple[str, ...], env: tuple[str, ...], canary: int, canary_compare: bool,
                   timeout: float, monitor: float, memory: str | None, cpus: float | None, as_json: bool) -> None:
    """Create or update a Swarm service running BUNDLE on every device (or N replicas).

    The bundle is baked into an image tagged by its content hash and pushed to --registry; Swarm
    updates one device at a time, gated by the image's gRPC health check, and rolls back on its own
    when a new task fails (exit 1, naming the node, the task error and its last log lines). The same
    bundle and options again: "unchanged". A cpu-arm64 bundle is placed on arm64 nodes only.

    Several --bundle (one per architecture): each is baked from its architecture's serve image
    (IMAGE, else IMAGE-ARCH as `make images ARCH=arm64` tags it) and pushed, a manifest list over
    them is put to the registry (its HTTP API, reached from this machine), and the service is placed
    by Placement.Platforms: each node pulls the member of its own architecture.

    --canary K: K tasks first; each gets a Generate per adapter (a fixed raw prompt, greedy) whose
    adapter name, adapter sha256 and text must equal what the bundle itself answers (computed here
    with the server's decode loop). A wrong answer makes Swarm roll the canaries back and the
    command exits 1 naming the node, the adapter, and what was expected and got.
    """
    from slmops_ops.fleet.swarm import FleetOptions, deploy

    if global_mode and replicas is not None:
        raise SlmopsUsageError("--replicas", "--global and --replicas exclude each other; pick one")
    opts = FleetOptions(manager=manager, service=service, bundles=list(bundles), image=image, registry=_registry(registry),
                        port=port, http_port=http_port, metrics_port=metrics_port, replicas=replicas,
                        constraints=list(constraints), serve_args=list(serve_args), env=_env_pairs(env), canary=canary,
                        canary_compare=canary_compare, timeout=timeout, monitor=monitor, memory=memory, cpus=cpus)
    with engine_errors(manager):
        result = deploy(opts, out=sys.stderr)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    extra = f"; node(s) down, they update when back: {', '.join(result.down_nodes)}" if result.down_nodes else ""
    click.echo(f"{result.service}: {result.status}, {result.image} on {result.tasks} task(s) "
               f"in {result.seconds:.1f}s{extra}")


@fleet_group.command("status", context_settings=CONTEXT)
@click.option("--service", default=None, help="one service  [default: every slmops fleet service]")
@_manager_option
@click.option("--json", "as_json", is_flag=True, help="print JSON rows")
def status_command(service: str | None, manager: str, as_json: bool) -> None:
    """One row per task: node, arch, state, health (asked over gRPC), image, bundle hash, adapters."""
    from slmops_ops.fleet.swarm import status

    with engine_errors(manager):
        rows = status(manager, service)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    cols = ["service", "node", "arch", "state", "health", "address", "bundle_sha256", "adapters", "image"]
    table = [cols] + [[str(r.get(c, "-")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@fleet_group.command("rollback", context_settings=CONTEXT)
@click.option("--service", required=True, help="Swarm service name")
@_manager_option
@click.option("--timeout", type=float, default=600.0, help="seconds the rollback may take")
def rollback_command(service: str, manager: str, timeout: float) -> None:
    """Put SERVICE back on its previous version (Swarm's rollback, one device at a time)."""
    from slmops_ops.fleet.swarm import rollback

    with engine_errors(manager):
        click.echo(rollback(manager, service, timeout, out=sys.stderr))


@fleet_group.group("adapters", context_settings=CONTEXT)
def adapters_group() -> None:
    """Load or unload an adapter on every replica over gRPC, without a restart; all or nothing."""


def _adapters(action: str, name: str, file: Path | None, service: str, manager: str, timeout: float) -> None:
    from slmops_ops.fleet.swarm import adapters

    with engine_errors(manager):
        done = adapters(manager, service, action, name, file, timeout, out=sys.stderr)
    click.echo(f"{action}ed '{name}' on {len(done)} replica(s) of {service}: " + ", ".join(d["node"] for d in done))


@adapters_group.command("load", context_settings=CONTEXT)
@click.argument("name")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--service", required=True, help="Swarm service name")
@_manager_option
@click.option("--timeout", type=float, default=60.0, help="seconds per replica")
def load_command(name: str, file: Path | None, service: str, manager: str, timeout: float) -> None:
    """Load NAME on every replica: FILE (a local .onnx_adapter, uploaded) or NAME.onnx_adapter from the
    bundle's adapter folder on each device. A replica that refuses makes the others drop it again."""
    if file is not None and not file.is_file():
        raise SlmopsUsageError("FILE", f"'{file}' is not a file; pass a .onnx_adapter file (slmops build writes them "
                               "into BUNDLE/adapters), or only NAME to load BUNDLE/adapters/NAME.onnx_adapter on each device")
    _adapters("load", name, file, service, manager, timeout)


@adapters_group.command("unload", context_settings=CONTEXT)
@click.argument("name")
@click.option("--service", required=True, help="Swarm service name")
@_manager_option
@click.option("--timeout", type=float, default=60.0, help="seconds per replica")
def unload_command(name: str, service: str, manager: str, timeout: float) -> None:
    """Unload NAME on every replica (those that did reload it from the bundle when one refuses)."""
    _adapters("unload", name, None, service, manager, timeout)


@fleet_group.command("manifest", context_settings=CONTEXT)
@click.option("--format", "fmt", type=click.Choice(["kubernetes"]), default="kubernetes", help="manifest kind")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="bundle folder from `slmops build`")
@click.option("--service", default="slmops", help="name of the DaemonSet/Deployment and Service")
@click.option("--registry", required=True, metavar="HOST:PORT", help="registry `slmops fleet deploy` pushes to")
@click.option("--replicas", type=click.IntRange(min=1), default=None, help="a Deployment of N  [default: a DaemonSet]")
@click.option("--namespace", default="default", help="Kubernetes namespace")
@click.option("--memory", default="2Gi", help="memory limit per pod")
@click.option("--cpus", default="2", help="CPU limit per pod")
@click.option("--host-port", type=int, default=None, help="also publish gRPC on this port of each node")
@click.option("--token-secret", default=None, help="Secret (key `token`) holding the admin token")
@click.option("--serve-arg", "serve_args", multiple=True, help="extra `slmops serve` argument (repeatable)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write here  [default: stdout]")
def manifest_command(fmt: str, bundle: Path, service: str, registry: str, replicas: int | None, namespace: str,
                     memory: str, cpus: str, host_port: int | None, token_secret: str | None,
                     serve_args: tuple[str, ...], out: Path | None) -> None:
    """Write a Kubernetes DaemonSet (or Deployment) and Service for BUNDLE's image: nodeSelector on
    kubernetes.io/arch, native gRPC probes, resource limits, Prometheus scrape annotations."""
    import yaml

    from slmops.platforms import bundle_arch
    from slmops_ops.deploy.deployer import check_bundle
    from slmops_ops.fleet.bake import image_ref
    from slmops_ops.fleet.manifest import kubernetes

    manifest, sha = check_bundle(bundle)
    reg = _registry(registry) or ""
    docs = kubernetes(service, image_ref(reg, manifest, sha), bundle_arch(manifest), sha, manifest.target.name,
                      replicas=replicas, memory=memory, cpus=cpus, serve_args=list(serve_args), namespace=namespace,
                      host_port=host_port, token_secret=token_secret)
    class Plain(yaml.SafeDumper):  # no &id001 anchors for the labels used twice
        def ignore_aliases(self, data: object) -> bool:
            return True

    text = yaml.dump_all(docs, Dumper=Plain, sort_keys=False)
    if out is None:
        click.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, out)
    click.echo(f"wrote {out} ({', '.join(d['kind'] for d in docs)})")
