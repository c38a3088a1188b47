"""``slmops deploy`` (ship + start + health-check + rollback), ``slmops deploy status`` and
``slmops deploy rollback``."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from slmops import __version__
from slmops.errors import SlmopsUsageError
from slmops_ops.deploy import CONTAINER_METRICS_PORT, CONTAINER_PORT

DEFAULT_IMAGE = f"slmops-serve:{__version__}"
# The default --memory, from the serve container's measured peak: 0.54 GB RSS (VmHWM) serving the
# default 135M int4 model to 8 concurrent requests of ~455 tokens (the server's default --max-batch
# 8). The KV cache grows with context: 46 KB per position per row for this model (30 layers x K,V x
# 3 KV heads x 64 x fp32), so 8 rows at the default --max-context 4096 add ~1.5 GB. 2g covers that
# worst case of the default settings and still leaves most of a 4 GB Pi 5 to the system; a bigger
# model, more rows or longer contexts need a larger --memory (or 0 for none).
DEFAULT_MEMORY = "2g"
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def _env_pairs(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SlmopsUsageError("--env", f"'{item}' is not KEY=VALUE")
        env[key] = value
    return env


@contextlib.contextmanager
def engine_errors(host: str) -> Iterator[None]:
    """Engine and connection failures as one-line errors (exit 1) that name the host. Without this, an
    EPIPE from a dropped ssh connection would end the command silently (click turns EPIPE into exit 1)."""
    from slmops_ops.deploy.hosts import import_docker

    docker = import_docker()
    import requests

    try:
        yield
    except (SlmopsUsageError, click.ClickException):
        raise
    except (ConnectionError, requests.exceptions.RequestException) as exc:
        raise click.ClickException(f"lost the connection to the Docker engine of {host} ({exc}); check "
                                   f"`slmops deploy status --host {host}` and run the command again") from exc
    except docker.errors.DockerException as exc:
        raise click.ClickException(f"the Docker engine of {host} refused: {exc}") from exc


def _mounts(values: tuple[str, ...]) -> list[tuple[str, str, str]]:
    out = []
    for item in values:
        parts = item.split(":")
        mode = parts.pop() if len(parts) == 3 and parts[-1] in ("ro", "rw") else "ro"
        if len(parts) != 2 or not all(p.startswith("/") for p in parts):
            raise SlmopsUsageError("--mount", f"'{item}' is not HOST_PATH:PATH[:ro|rw] with absolute paths, e.g. "
                                   "/srv/adapters:/adapters:ro")
        out.append((parts[0], parts[1], mode))
    return out


def _size(option: str, value: str | None) -> str | None:
    """A Docker size (``768m``, ``2g``, ``512k``, bytes); ``0``/``none`` -> None (no limit)."""
    if value is None or value.strip().lower() in ("0", "none", ""):
        return None
    text = value.strip().lower()
    if not re.fullmatch(r"\d+(\.\d+)?[bkmg]?", text):
        raise SlmopsUsageError(option, f"'{value}' is not a size: use e.g. 768m or 2g")
    return text


def _registry(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
    if not re.fullmatch(r"[\w.-]+(:\d+)?(/[\w.-]+)*", value):
        raise SlmopsUsageError("--registry", f"'{value}' is not a registry address: expected HOST:PORT, e.g. 127.0.0.1:5000")
    return value


@click.group("deploy", invoke_without_command=True, context_settings=CONTEXT)
@click.option("--host", "host_spec", default="local", envvar="SLMOPS_DEPLOY_HOST",
              help="where to run: local, ssh://user@host[:port] or tcp://host:port ($SLMOPS_DEPLOY_HOST)")
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="bundle folder from `slmops build`; omit for an image with a baked bundle")
@click.option("--image", default=DEFAULT_IMAGE, help="serve image (make images builds it)")
@click.option("--registry", default=None, metavar="HOST:PORT",
              help="ship the image through this registry (push here, pull on the host) instead of a save/load stream")
@click.option("--name", default="slmops-serve", help="container name on the host; the one it replaces stays as NAME-previous")
@click.option("--port", type=int, default=CONTAINER_PORT, help="host port for gRPC")
@click.option("--metrics-port", type=int, default=CONTAINER_METRICS_PORT, help="host port for Prometheus /metrics")
@click.option("--no-metrics", is_flag=True, help="do not serve /metrics")
@click.option("--bind", default="0.0.0.0", help="host address the ports are published on")
@click.option("--timeout", type=float, default=120.0, help="seconds the new container gets to become SERVING")
@click.option("--compress/--no-compress", default=None,
              help="gzip the image stream  [default: on for remote hosts, off for local]")
@click.option("--serve-arg", "serve_args", multiple=True, help="extra `slmops serve` argument (repeatable), e.g. --serve-arg=--threads=2")
@click.option("--env", "env", multiple=True, help="KEY=VALUE in the container (repeatable), e.g. SLMOPS_ADMIN_TOKEN=...")
@click.option("--mount", "mounts", multiple=True, metavar="HOST_PATH:PATH[:ro|rw]",
              help="bind-mount a path of the host into the server (repeatable; read-only unless :rw)")
@click.option("--restart", type=click.Choice(["unless-stopped", "always", "on-failure", "no"]), default="unless-stopped",
              help="Docker restart policy of the server")
@click.option("--memory", default=DEFAULT_MEMORY, metavar="SIZE",
              help="memory limit of the server (and its swap limit), e.g. 768m, 2g; 0 = none")
@click.option("--cpus", type=float, default=None, help="CPU limit, e.g. 2 or 1.5  [default: none]")
@click.option("--read-only/--writable", "read_only", default=True,
              help="read-only root file system (writes go to a /tmp tmpfs only)")
@click.option("--tmp-size", default="256m", metavar="SIZE", help="size of the /tmp tmpfs (the server's scratch space; uploaded adapters are held in memory, not written there)")
@click.option("--log-max-size", default="10m", metavar="SIZE", help="rotate the server's log at this size")
@click.option("--log-max-files", type=int, default=3, help="rotated log files kept")
@click.option("--force", is_flag=True, help="redeploy even when the same image, bundle and options already run")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def deploy_group(ctx: click.Context, host_spec: str, bundle: Path | None, image: str, registry: str | None, name: str,
                 port: int, metrics_port: int, no_metrics: bool, bind: str, timeout: float, compress: bool | None,
                 serve_args: tuple[str, ...], env: tuple[str, ...], mounts: tuple[str, ...], restart: str,
                 memory: str | None, cpus: float | None,
                 read_only: bool, tmp_size: str, log_max_size: str, log_max_files: int, force: bool, as_json: bool) -> None:
    """Ship the serve image and a bundle to a Docker host and start it there, health-checked.

    \b
    slmops deploy --bundle dist/bundles/cpu                         # this machine's Docker engine
    slmops deploy --host ssh://pi@edge-1 --bundle dist/bundles/cpu  # image via docker save | load
    slmops deploy --host ssh://pi@edge-1 --registry reg.lan:5000 --bundle dist/bundles/cpu
    slmops deploy --host ssh://pi@pi5 --bundle dist/bundles/cpu-arm64 --memory 2g --cpus 3  # an arm64 board
    slmops deploy status                                            # what runs where
    slmops deploy rollback --host ssh://pi@edge-1                   # back to NAME-previous
    export SLMOPS_ADMIN_TOKEN=$(slmops deploy token --host ssh://pi@edge-1)  # for slmops adapters ...

    The new container replaces NAME once it answers SERVING on grpc.health.v1; otherwise it is
    removed and the previous container is started again (exit code 1).

    The host engine's architecture picks the image (IMAGE, else IMAGE-<arch> from `make images
    ARCH=arm64`); an image or bundle of another architecture is refused before anything moves.

    Each deployment has its own admin token ($SLMOPS_ADMIN_TOKEN in the container; without it the
    server refuses adapter admin calls from other hosts): generated once, kept in the local state file
    (mode 0600) and reused by later deploys; `slmops deploy token` prints it.
    """
    ctx.ensure_object(dict)
    ctx.obj["host"] = host_spec
    if ctx.invoked_subcommand is not None:
        return
    from slmops_ops.deploy.deployer import DeployOptions, deploy
    from slmops_ops.deploy.hosts import parse_host

    opts = DeployOptions(host=parse_host(host_spec), image=image, bundle=bundle, name=name, port=port,
                         metrics_port=None if no_metrics else metrics_port, bind=bind, registry=_registry(registry),
                         compress=compress, timeout=timeout, serve_args=list(serve_args), env=_env_pairs(env),
                         restart=restart, force=force, memory=_size("--memory", memory), cpus=cpus, read_only=read_only,
                         tmp_size=_size("--tmp-size", tmp_size) or "256m", log_max_size=_size("--log-max-size", log_max_size) or "10m",
                         log_max_files=log_max_files, mounts=_mounts(mounts))
    if cpus is not None and cpus <= 0:
        raise SlmopsUsageError("--cpus", f"{cpus} must be > 0 (e.g. 2)")
    if log_max_files < 1:
        raise SlmopsUsageError("--log-max-files", f"{log_max_files} must be >= 1")
    with engine_errors(host_spec):
        result = deploy(opts)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    moved = result.image_transfer
    image_note = moved.how if not moved.nbytes else f"{moved.how}, {moved.nbytes / 1e6:.0f} MB in {moved.seconds:.1f}s"
    b = result.bundle_transfer
    bundle_note = b.how if not b.nbytes else f"{b.how}, {b.nbytes / 1e6:.1f} MB in {b.seconds:.1f}s"
    click.echo(f"{result.status} '{result.name}' on {result.host} (linux/{result.arch}): {result.image} ({image_note}), bundle {result.bundle} "
               f"({bundle_note}); SERVING after {result.serving_after_s:.1f}s, {result.total_s:.1f}s in all")
    if result.admin_token_source != "--env":
        where = "kept in the local state file" if result.state_saved else "only in the container (docker inspect)"
        click.echo(f"admin token: {result.admin_token_source}, {where}; `slmops deploy token --host {host_spec} --name "
                   f"{result.name}` prints it for `slmops adapters ... --token`")


@deploy_group.command("status", context_settings=CONTEXT)
@click.option("--host", "hosts", multiple=True,
              help="host to list (repeatable)  [default: every host deployed to from here, else local]")
@click.option("--json", "as_json", is_flag=True, help="print JSON rows")
@click.pass_context
def status_command(ctx: click.Context, hosts: tuple[str, ...], as_json: bool) -> None:
    """List the slmops serve containers (running, previous, stopped) on each host."""
    from slmops_ops.deploy.deployer import known_hosts, status
    from slmops_ops.deploy.hosts import parse_host

    parent_host = (ctx.obj or {}).get("host")
    specs = list(hosts) or ([parent_host] if parent_host not in (None, "local") else known_hosts())
    rows = status([parse_host(h) for h in specs])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no slmops containers on {', '.join(specs)}")
        return
    columns = ["host", "arch", "name", "state", "health", "image", "bundle", "ports", "deployed_at"]
    table: list[list[Any]] = [[str(r.get(c, "")) if r.get("state") != "unreachable" or c in ("host", "state")
                               else "" for c in columns] for r in rows]
    for row, r in zip(table, rows, strict=True):
        if r.get("state") == "unreachable":
            row[columns.index("image")] = r.get("detail", "")
    widths = [max(len(c), *(len(row[i]) for row in table)) if i < len(columns) - 1 else 0 for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@deploy_group.command("rollback", context_settings=CONTEXT)
@click.option("--host", "host_spec", default=None, help="host  [default: the --host given to `deploy`, else local]")
@click.option("--name", default="slmops-serve", help="container name")
@click.option("--timeout", type=float, default=120.0, help="seconds the previous container gets to become SERVING")
@click.pass_context
def rollback_command(ctx: click.Context, host_spec: str | None, name: str, timeout: float) -> None:
    """Start NAME-previous again in place of NAME (which stays, stopped, as NAME-previous)."""
    from slmops_ops.deploy.deployer import rollback
    from slmops_ops.deploy.hosts import parse_host

    host = parse_host(host_spec or (ctx.obj or {}).get("host"))
    with engine_errors(str(host)):
        click.echo(rollback(host, name, timeout))


@deploy_group.command("token", context_settings=CONTEXT)
@click.option("--host", "host_spec", default=None, help="host  [default: the --host given to `deploy`, else local]")
@click.option("--name", default="slmops-serve", help="container name")
@click.pass_context
def token_command(ctx: click.Context, host_spec: str | None, name: str) -> None:
    """Print the admin token of deployment NAME on HOST (kept in the local state file by `slmops
    deploy`), e.g. export SLMOPS_ADMIN_TOKEN=$(slmops deploy token --host ssh://pi@edge-1)."""
    from slmops_ops.deploy.deployer import recorded_token, state_file
    from slmops_ops.deploy.hosts import parse_host

    host = parse_host(host_spec or (ctx.obj or {}).get("host"))
    token = recorded_token(host, name)
    if token is None:
        raise SlmopsUsageError("--name", f"no admin token for '{name}' on {host} in {state_file()}; deploy it from this "
                               "machine with `slmops deploy` (or pass the one you set with --env SLMOPS_ADMIN_TOKEN)")
    click.echo(token)


# The lazy root CLI registers "deploy" -> "slmops_ops.deploy.cli:deploy_group".
deploy_command = deploy_group
