"""Docker hosts: parse ``--host`` values and connect to their engines, with errors that say what to fix."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from slmops.errors import SlmopsUsageError

HOST_FORMS = "local, ssh://user@host[:port] or tcp://host:port"
# Seconds one engine API call may take; image loads and pushes get their own, longer budget.
API_TIMEOUT = 600


@dataclass(frozen=True)
class Host:
    """One Docker engine. ``url`` is None for the local engine ($DOCKER_HOST or the default socket)."""

    spec: str
    kind: str  # local | ssh | tcp | unix
    url: str | None

    @property
    def is_local(self) -> bool:
        return self.kind in ("local", "unix")

    def __str__(self) -> str:
        return self.spec


def parse_host(value: str | None) -> Host:
    """``local`` / ``ssh://user@host[:port]`` / ``tcp://host:port`` / ``unix:///path`` -> Host."""
    spec = (value or "local").strip()
    if spec in ("local", "localhost", "default"):
        return Host("local", "local", None)
    match = re.fullmatch(r"(ssh|tcp|unix)://(.+)", spec)
    if not match:
        hint = f"; did you mean ssh://{spec}?" if re.fullmatch(r"[\w.-]+@[\w.-]+(:\d+)?", spec) else ""
        raise SlmopsUsageError("--host", f"'{spec}' is not a Docker host: use {HOST_FORMS}{hint}")
    scheme, rest = match.groups()
    if scheme == "ssh":
        if not re.fullmatch(r"([\w.+-]+@)?[\w.-]+(:\d+)?", rest):
            raise SlmopsUsageError("--host", f"'{spec}': expected ssh://user@host[:port]")
        if shutil.which("ssh") is None:
            raise SlmopsUsageError("--host", f"'{spec}' needs the ssh client on this machine: install openssh-client")
    elif scheme == "tcp" and not re.fullmatch(r"[\w.-]+:\d+", rest):
        raise SlmopsUsageError("--host", f"'{spec}': expected tcp://host:port")
    return Host(spec, scheme, spec)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for pattern in (r"Broken pipe", r"No such file or directory", r"Connection refused", r"Permission denied", r"timed out",
                    r"Name or service not known", r"Could not resolve hostname[^'\")]*", r"No route to host"):
        found = re.search(pattern, text)
        if found:
            return found.group(0)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def connect(host: Host, timeout: int = API_TIMEOUT) -> Any:
    """A ``docker.DockerClient`` for ``host`` that answered a ping; SlmopsUsageError('--host') if none."""
    docker = import_docker()
    try:
        if host.url is None:
            client = docker.from_env(timeout=timeout)
        else:
            client = docker.DockerClient(base_url=host.url, use_ssh_client=host.kind == "ssh", timeout=timeout)
        client.ping()
    except docker.errors.DockerException as exc:
        where = (os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock") if host.url is None else host.url
        fix = ("start the Docker engine here (dockerd, or systemctl start docker) or set DOCKER_HOST"
               if host.is_local else
               "check the host name and port, that `ssh` to it works with your keys and that its user may run docker"
               if host.kind == "ssh" else "check the address and that dockerd listens there")
        reason = _reason(exc)
        if host.kind == "ssh" and ("Broken pipe" in reason or "Connection aborted" in reason):
            reason = "the ssh command failed: see its message above"
        raise SlmopsUsageError("--host", f"cannot reach the Docker engine of '{host}' at {where} ({reason}); {fix}") from exc
    return client


def import_docker() -> Any:
    try:
        import docker
    except ModuleNotFoundError as exc:
        import click

        raise click.ClickException("`slmops deploy` needs the 'deploy' extra (the docker SDK): "
                                   "pip install 'slmops[deploy]'") from exc
    return docker
