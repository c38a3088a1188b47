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
