"""Container tests: real Docker, real images, real registry.

Every test here that needs an engine depends on ``docker_client``, which SKIPS with the reason
(shown by pytest -ra) when no Docker engine answers: `scripts/ci_containers.sh` installs docker.io,
docker-registry and mmdebstrap, starts dockerd and a registry, and runs this folder. The images
are built by ``make -f mk/docker.mk images OFFLINE=1`` (the local mmdebstrap base, the host's
wheelhouse, ``--network none``); when the CI script built them already, that is the cached rebuild.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

VERSION = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
               if line.startswith("version"))
IMAGES = {stage: f"slmops-{stage}:{VERSION}" for stage in ("train", "build", "serve")}
LOCAL_BASE = os.environ.get("SLMOPS_TEST_BASE_IMAGE", "slmops-base:bookworm")
PROMPT = "Tone of: I lost my keys again\n"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "containers: needs a Docker engine (scripts/ci_containers.sh starts one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here and "docker_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.containers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker_cli() -> str:
    """A docker client binary that can do BuildKit builds (see mk/docker.mk)."""
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0:
        return "docker"
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


@pytest.fixture(scope="session")
def docker_client() -> Any:
    """The local engine (docker SDK), or a skip that says why there is none."""
    try:
        import docker
    except ModuleNotFoundError:
        pytest.skip("the docker SDK is not installed (pip install 'slmops[deploy]'); container tests need it")
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"no Docker engine answers ({str(exc)[:160]}); scripts/ci_containers.sh installs and starts "
                    "one, then runs these tests")
    return client


@pytest.fixture(scope="session")
def images(docker_client: Any) -> dict[str, Any]:
    """Build (or find cached) the three images offline from the local base; stage -> docker Image."""
    have_base = bool(docker_client.images.list(name=LOCAL_BASE))
    if not have_base and shutil.which("mmdebstrap") is None:
        pytest.skip(f"no local base image {LOCAL_BASE} and no mmdebstrap to make one (apt-get install mmdebstrap)")
    start = time.monotonic()
    proc = subprocess.run(["make", "--no-print-directory", "-f", "mk/docker.mk", "images", "OFFLINE=1",
                           f"LOCAL_BASE={LOCAL_BASE}", f"DOCKER={docker_cli()}"],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"make images failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    print(f"\nmake images OFFLINE=1: {time.monotonic() - start:.0f}s\n" +
          "\n".join(line for line in proc.stdout.splitlines() if "MB, built" in line))
    return {stage: docker_client.images.get(ref) for stage, ref in IMAGES.items()}


@pytest.fixture(scope="session")
def serve_bundle(docker_client: Any, tiny_bundle: Path) -> Path:  # noqa: F811
    """The serve tests' tiny fp32 bundle (two adapters), built on the host by the build stage."""
    return tiny_bundle


@contextlib.contextmanager
def container(client: Any, image: str, **kwargs: Any) -> Iterator[Any]:
    """A detached container, force-removed at exit."""
    c = client.containers.run(image, detach=True, **kwargs)
    try:
        yield c
    finally:
        with contextlib.suppress(Exception):
            c.remove(force=True)


def wait_serving(address: str, timeout: float = 60.0, watch: Any = None) -> Any:
    """An SlmopsClient on ``address`` once health says SERVING (docker-proxy accepts connections early).
    ``watch``: the container behind it, whose exit ends the wait and whose logs explain a failure."""
    from slmops_serve.client import SlmopsClient

    client = SlmopsClient(address, timeout=10)
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            client.wait_ready(timeout=5)
            if client.health() == "SERVING":
                return client
        except Exception as exc:  # not listening yet / NOT_SERVING while loading
            last = repr(exc)
        if watch is not None:
            watch.reload()
            if watch.status != "running":
                break
        time.sleep(0.5)
    client.close()
    logs = watch.logs(tail=30).decode(errors="replace") if watch is not None else ""
    raise AssertionError(f"{address} did not become SERVING in {timeout}s (last: {last})\n{logs}")


def readable_copy(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` the image's user (uid 10001) can read when it is bind-mounted
    (pytest's temporary folders are private to their owner)."""
    shutil.copytree(bundle, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


# The root CLI with `deploy` registered (setdefault: the real registration in slmops.cli wins).
CLI = ("import sys; from slmops.cli import LAZY_COMMANDS, main; "
       "LAZY_COMMANDS.setdefault('deploy', ('slmops_ops.deploy.cli:deploy_group', 'Deploy the serve image.')); "
       "sys.argv[0] = 'slmops'; sys.exit(main())")


def run_slmops(args: list[str], env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``slmops ARGS`` in a subprocess (its own signal handling, exit code and stdout/stderr)."""
    full_env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def _answers(url: str) -> bool:
    try:
        http_get(url, timeout=2)
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def registry(docker_client: Any) -> Iterator[str]:
    """HOST:PORT of a plain-HTTP registry on 127.0.0.1: $SLMOPS_TEST_REGISTRY (the CI script starts
    Debian's docker-registry on 127.0.0.1:5000), else one started here if docker-registry is installed."""
    address = os.environ.get("SLMOPS_TEST_REGISTRY", "127.0.0.1:5000")
    if _answers(f"http://{address}/v2/"):
        yield address
        return
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip(f"no registry answers at {address} and docker-registry is not installed (apt-get install "
                    "docker-registry; scripts/ci_containers.sh starts one)")
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="slmops-registry-"))
    (root / "config.yml").write_text(json.dumps({
        "version": 0.1, "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"}, "log": {"level": "warn"}}))
    proc = subprocess.Popen([binary, "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(50):
            if _answers(f"http://{address}/v2/"):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"docker-registry did not answer on {address}")
        yield address
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


# ---- an engine reached over ssh:// --------------------------------------------------------------
SSH_TOOLS = ("/usr/sbin/sshd", "ssh", "ssh-keygen")


def ssh_missing() -> str | None:
    """Why a local sshd in front of an engine cannot run here (None when it can)."""
    missing = [tool for tool in SSH_TOOLS if shutil.which(tool) is None]
    if os.getuid() != 0 or missing:
        return (f"a Docker engine behind a local sshd needs root and {missing or 'nothing else'} "
                "(apt-get install openssh-server openssh-client; scripts/ci_containers.sh does)")
    return None


def stop_process(proc: subprocess.Popen, seconds: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def ssh_to_engine(socket_path: Path, root: Path) -> Iterator[dict[str, Any]]:
    """A local sshd (127.0.0.1, a free port, its own host key and one authorized key, files under
    ``root``) whose sessions reach the Docker engine at ``socket_path`` (``SetEnv DOCKER_HOST``): what
    ``ssh://root@HOST`` means to docker, whose ssh transport runs ``docker system dial-stdio`` there.
    Yields {"host": "ssh://root@127.0.0.1:PORT", "env": {"PATH": ...}}: ``env`` puts first an ``ssh``
    that uses this key and trusts this host (pass it to the slmops subprocess). Stops sshd at exit."""
    reason = ssh_missing()
    if reason:
        pytest.skip(reason)
    root.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    shutil.copy(root / "id.pub", root / "authorized_keys")
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPidFile {root / 'sshd.pid'}\nSetEnv DOCKER_HOST=unix://{socket_path}\n")
    (root / "ssh_config").write_text(
        f"Host *\n  IdentityFile {root / 'id'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=(root / "sshd.log").open("w"), stderr=subprocess.STDOUT)
    try:
        bin_dir = root / "bin"
        bin_dir.mkdir(exist_ok=True)
        real_ssh = shutil.which("ssh")
        (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {real_ssh} -F {root / "ssh_config"} "$@"\n')
        (bin_dir / "ssh").chmod(0o755)
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
        for _ in range(40):
            probe = subprocess.run(["ssh", "-p", str(port), "root@127.0.0.1", "docker", "version", "--format",
                                    "{{.Server.Version}}"], env={**os.environ, **env}, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"ssh to the test sshd failed: {probe.stderr}\n{(root / 'sshd.log').read_text()[-2000:]}")
        yield {"host": f"ssh://root@127.0.0.1:{port}", "env": env}
    finally:
        stop_process(sshd)
