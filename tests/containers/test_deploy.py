"""`slmops deploy` against real engines: the local one, through a local registry, rollbacks, status,
and the bad inputs that must name the option to fix (exit 2) while the running server stays up."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.containers.conftest import IMAGES, PROMPT, free_port, http_get, run_slmops, wait_serving


@pytest.fixture
def deployment(docker_client: Any, images: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A unique container name and free ports; every container and bundle volume of it removed after."""
    name = f"slmops-test-{uuid.uuid4().hex[:8]}"
    env = {"SLMOPS_DEPLOY_STATE": str(tmp_path / "deployments.json")}
    yield {"name": name, "port": free_port(), "metrics": free_port(), "env": env}
    for c in docker_client.containers.list(all=True, filters={"label": f"io.slmops.deploy.name={name}"}):
        c.remove(force=True)
    for suffix in ("", "-previous", "-rollback"):
        with contextlib.suppress(Exception):
            docker_client.containers.get(name + suffix).remove(force=True)
    from slmops_ops.deploy.deployer import prune_bundle_volumes

    prune_bundle_volumes(docker_client)


def deploy_args(d: dict[str, Any], bundle: Path, *extra: str) -> list[str]:
    return ["deploy", "--host", "local", "--bundle", str(bundle), "--name", d["name"], "--port", str(d["port"]),
            "--metrics-port", str(d["metrics"]), "--bind", "127.0.0.1", "--timeout", "60", "--json", *extra]


def deploy(d: dict[str, Any], bundle: Path, *extra: str) -> dict[str, Any]:
    proc = run_slmops(deploy_args(d, bundle, *extra), env=d["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(json.loads(proc.stdout))


def generate(port: int) -> str:
    with wait_serving(f"127.0.0.1:{port}", timeout=30) as client:
        response = client.generate(PROMPT, adapter="tone", max_new_tokens=8)
        assert response.adapter == "tone"
        return str(response.text)


def test_deploy_local_then_unchanged_then_status(docker_client: Any, serve_bundle: Path, deployment: dict[str, Any]) -> None:
    result = deploy(deployment, serve_bundle, "--serve-arg=--threads=1")
    assert result["status"] == "deployed" and result["image"] == IMAGES["serve"]
    assert result["bundle_transfer"]["how"] in ("copied", "reused") and result["image_transfer"]["how"] == "present"
    assert generate(deployment["port"])
    assert "slmops" in http_get(f"http://127.0.0.1:{deployment['metrics']}/metrics")
    c = docker_client.containers.get(deployment["name"])
    mounts = {m["Destination"]: m for m in c.attrs["Mounts"]}
    assert mounts["/bundle"]["Type"] == "volume" and mounts["/bundle"]["RW"] is False
    assert c.attrs["HostConfig"]["Init"] is True and c.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    # a random admin token per deployment: in the container, in the 0600 state file, required by admin calls
    state = Path(deployment["env"]["SLMOPS_DEPLOY_STATE"])
    token = json.loads(state.read_text())["local"][deployment["name"]]["admin_token"]
    assert result["admin_token_source"] == "generated" and len(token) >= 40 and state.stat().st_mode & 0o777 == 0o600
    assert f"SLMOPS_ADMIN_TOKEN={token}" in c.attrs["Config"]["Env"]
    assert run_slmops(["deploy", "token", "--name", deployment["name"]], env=deployment["env"]).stdout.strip() == token
    from slmops_serve.client import SlmopsClient

    with SlmopsClient(f"127.0.0.1:{deployment['port']}", token=token, timeout=30) as admin:
        assert {a.name for a in admin.list_adapters()} >= {"tone"}
    with SlmopsClient(f"127.0.0.1:{deployment['port']}", token="", timeout=30) as anonymous, \
            pytest.raises(grpc.RpcError) as denied:
        anonymous.unload_adapter("tone")
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    print(f"\ndeploy to local: SERVING {result['serving_after_s']:.1f}s after start, {result['total_s']:.1f}s in all "
          f"(bundle {result['bundle_transfer']})")

    again = deploy(deployment, serve_bundle, "--serve-arg=--threads=1")
    assert again["status"] == "unchanged" and again["container_id"] == result["container_id"]
    assert again["admin_token_source"] == "kept"
    assert again["bundle_transfer"]["how"] == "reused"

    proc = run_slmops(["deploy", "status", "--json"], env=deployment["env"])  # hosts recorded by the deploys
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in json.loads(proc.stdout) if r["name"] == deployment["name"]]
    assert len(rows) == 1 and rows[0]["state"] == "running" and rows[0]["host"] == "local"
    assert rows[0]["ports"].endswith(str(deployment["port"])) or str(deployment["port"]) in rows[0]["ports"]
    text = run_slmops(["deploy", "status", "--host", "local"], env=deployment["env"]).stdout
    assert deployment["name"] in text and "HOST" in text


def test_deploy_through_a_registry(docker_client: Any, serve_bundle: Path, deployment: dict[str, Any], registry: str) -> None:
    result = deploy(deployment, serve_bundle, "--registry", registry)
    ref = f"{registry}/slmops-serve:{IMAGES['serve'].split(':')[1]}"
    assert result["image"] == ref and result["image_transfer"]["how"] == "registry"
    assert docker_client.containers.get(deployment["name"]).attrs["Config"]["Image"] == ref
    catalog = json.loads(http_get(f"http://{registry}/v2/_catalog"))
    assert "slmops-serve" in catalog["repositories"]
    assert generate(deployment["port"])
    print(f"\ndeploy via registry {registry}: {result['total_s']:.1f}s in all ({result['image_transfer']})")


def test_failed_health_check_rolls_back_to_the_running_container(docker_client: Any, serve_bundle: Path,
                                                                deployment: dict[str, Any]) -> None:
    first = deploy(deployment, serve_bundle)
    before = generate(deployment["port"])
    # The new container runs but its health probe asks a port nothing listens on: never SERVING.
    proc = run_slmops(deploy_args(deployment, serve_bundle, "--env", "SLMOPS_HEALTH_ADDR=127.0.0.1:1",
                                  "--timeout", "8"), env=deployment["env"])
    assert proc.returncode == 1, proc.stderr
    assert "did not become SERVING" in proc.stderr and "rolled back" in proc.stderr and "SERVING again" in proc.stderr
    c = docker_client.containers.get(deployment["name"])
    assert c.id == first["container_id"] and c.status == "running"
    assert generate(deployment["port"]) == before

    # A new container that exits at once (a bad serve option): same rollback, with its logs in the message.
    proc = run_slmops(deploy_args(deployment, serve_bundle, "--serve-arg=--max-queue=-3"), env=deployment["env"])
    assert proc.returncode == 1, proc.stderr
    assert "exit code" in proc.stderr and "last log lines" in proc.stderr and "SERVING again" in proc.stderr
    assert docker_client.containers.get(deployment["name"]).id == first["container_id"]
    assert generate(deployment["port"]) == before


@pytest.mark.parametrize("failure", ["create_then_connection_drops", "eof_while_waiting"])
def test_any_failure_after_the_stop_rolls_back(docker_client: Any, serve_bundle: Path, deployment: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """A dropped ssh connection is not a docker APIError: the previous container must still come back.
    Injected in-process, after the real engine stopped the old container: (1) the create reached the
    engine but its answer never came back (a new container exists under the name, no handle to it);
    (2) the connection ends (EOFError) while waiting for SERVING."""
    from slmops_ops.deploy import deployer
    from slmops_ops.deploy.hosts import parse_host

    first = deploy(deployment, serve_bundle)
    before = generate(deployment["port"])
    real_create, stopped_seen = deployer._create, []

    def create_then_drop(target: Any, *args: Any, **kwargs: Any) -> Any:
        stopped_seen.append(docker_client.containers.get(first["container_id"]).status)
        real_create(target, *args, **kwargs)
        raise ConnectionError("ssh: connection to the host was lost")

    def eof_while_waiting(container: Any, timeout: float, say: Any, interval: float = 1.0) -> Any:
        if container.id == first["container_id"]:  # the rollback's wait on the previous container
            return real_wait(container, timeout, say, interval)
        stopped_seen.append(docker_client.containers.get(first["container_id"]).status)
        raise EOFError("the ssh channel closed")

    real_wait = deployer.wait_serving
    if failure == "create_then_connection_drops":
        monkeypatch.setattr(deployer, "_create", create_then_drop)
    else:
        monkeypatch.setattr(deployer, "wait_serving", eof_while_waiting)
    opts = deployer.DeployOptions(host=parse_host("local"), image=IMAGES["serve"], bundle=serve_bundle,
                                  name=deployment["name"], port=deployment["port"], metrics_port=deployment["metrics"],
                                  bind="127.0.0.1", timeout=60, force=True, serve_args=["--threads=2"])
    with pytest.raises(deployer.DeployError) as info:
        deployer.deploy(opts)
    message = str(info.value.message)
    expected = ConnectionError if failure == "create_then_connection_drops" else EOFError
    assert isinstance(info.value.__cause__, expected)  # the original error, chained
    assert expected.__name__ in message and "rolled back" in message and "SERVING again" in message, message
    assert stopped_seen == ["exited"]  # the failure came after the old container was stopped
    c = docker_client.containers.get(deployment["name"])
    assert c.id == first["container_id"] and c.status == "running"
    names = {x.name for x in docker_client.containers.list(all=True, filters={"label": f"io.slmops.deploy.name={deployment['name']}"})}
    assert names == {deployment["name"]}  # the half-made new container is gone
    assert generate(deployment["port"]) == before


def test_redeploy_keeps_previous_and_rollback_command(docker_client: Any, serve_bundle: Path,
                                                      deployment: dict[str, Any], tmp_path: Path) -> None:
    first = deploy(deployment, serve_bundle)
    # A second bundle (same files, another bundle.json): a new volume, the first container kept as -previous.
    other = tmp_path / "bundle2"
    shutil.copytree(serve_bundle, other)
    manifest = json.loads((other / "bundle.json").read_text())
    manifest["created_at"] = "2000-01-01T00:00:00Z"
    (other / "bundle.json").write_text(json.dumps(manifest, indent=2))
    second = deploy(deployment, other)
    assert second["status"] == "deployed" and second["bundle"] != first["bundle"]
    assert second["bundle_transfer"]["how"] == "copied"
    previous = docker_client.containers.get(deployment["name"] + "-previous")
    assert previous.id == first["container_id"] and previous.status == "exited"
    assert generate(deployment["port"])

    proc = run_slmops(["deploy", "rollback", "--host", "local", "--name", deployment["name"]], env=deployment["env"])
    assert proc.returncode == 0, proc.stderr
    assert "rolled back" in proc.stdout
    assert docker_client.containers.get(deployment["name"]).id == first["container_id"]
    assert docker_client.containers.get(deployment["name"] + "-previous").id == second["container_id"]
    assert generate(deployment["port"])


# ---- bad input: exit 2, the option named, nothing running disturbed --------------------------------
def test_image_not_built(docker_client: Any, serve_bundle: Path, deployment: dict[str, Any]) -> None:
    proc = run_slmops(deploy_args(deployment, serve_bundle, "--image", "slmops-serve:no-such-tag"), env=deployment["env"])
    assert proc.returncode == 2 and "--image" in proc.stderr and "make images" in proc.stderr, proc.stderr


def test_port_in_use_by_a_process_and_by_a_container(docker_client: Any, serve_bundle: Path,
                                                     deployment: dict[str, Any]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", deployment["port"]))
        sock.listen()
        proc = run_slmops(deploy_args(deployment, serve_bundle), env=deployment["env"])
    assert proc.returncode == 2 and "--port" in proc.stderr and "in use" in proc.stderr, proc.stderr
    assert not docker_client.containers.list(all=True, filters={"name": f"^{deployment['name']}$"})

    first = deploy(deployment, serve_bundle)
    other = dict(deployment, name=deployment["name"] + "-b", metrics=free_port())
    proc = run_slmops(deploy_args(other, serve_bundle), env=deployment["env"])
    assert proc.returncode == 2 and "--port" in proc.stderr and deployment["name"] in proc.stderr, proc.stderr
    assert docker_client.containers.get(deployment["name"]).id == first["container_id"]


def test_unreachable_engine(deployment: dict[str, Any], serve_bundle: Path) -> None:
    args = deploy_args(deployment, serve_bundle)
    args[args.index("local")] = "tcp://127.0.0.1:1"
    proc = run_slmops(args, env=deployment["env"])
    assert proc.returncode == 2 and "--host" in proc.stderr and "cannot reach the Docker engine" in proc.stderr


def test_status_reports_unreachable_hosts(docker_client: Any, tmp_path: Path) -> None:
    proc = run_slmops(["deploy", "status", "--host", "tcp://127.0.0.1:1", "--json"],
                      env={"SLMOPS_DEPLOY_STATE": str(tmp_path / "s.json")})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows[0]["state"] == "unreachable" and "cannot reach" in rows[0]["detail"]


def test_deploy_timing_summary_is_printed(docker_client: Any, serve_bundle: Path, deployment: dict[str, Any]) -> None:
    args = [a for a in deploy_args(deployment, serve_bundle) if a != "--json"]
    start = time.monotonic()
    proc = run_slmops(args, env=deployment["env"])
    assert proc.returncode == 0, proc.stderr
    assert "SERVING after" in proc.stdout and "deployed" in proc.stdout
    assert f"bundle {serve_bundle}" in proc.stderr  # bundle copy progress line
    print(f"\n{proc.stdout.strip()} (CLI wall {time.monotonic() - start:.1f}s)")


def test_baked_bundle_image_deploys_without_bundle(docker_client: Any, images: dict[str, Any], serve_bundle: Path,
                                                  deployment: dict[str, Any], tmp_path: Path) -> None:
    """`make images BUNDLE=...` (here: make -f mk/docker.mk image-bundle) bakes a bundle into the serve image."""
    import subprocess

    from tests.containers.conftest import REPO, VERSION, docker_cli

    bundle = tmp_path / "cpu"
    shutil.copytree(serve_bundle, bundle)
    bundle.chmod(0o700)  # private on the host: the image must still be readable by its user
    tag = f"slmops-serve:{VERSION}-cpu"
    proc = subprocess.run(["make", "--no-print-directory", "-f", "mk/docker.mk", "image-bundle", f"BUNDLE={bundle}",
                           "OFFLINE=1", f"DOCKER={docker_cli()}"], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        image = docker_client.images.get(tag)
        assert len(image.labels["io.slmops.bundle.sha256"]) == 64
        args = [a for a in deploy_args(deployment, serve_bundle) if a not in ("--bundle", str(serve_bundle))]
        result = run_slmops(args + ["--image", tag], env=deployment["env"])
        assert result.returncode == 0, result.stderr[-3000:]
        data = json.loads(result.stdout)
        assert data["bundle"].endswith("(baked)") and data["bundle_transfer"]["how"] == "baked"
        assert generate(deployment["port"])
        mounts = docker_client.containers.get(deployment["name"]).attrs["Mounts"]
        assert not [m for m in mounts if m["Destination"] == "/bundle"]
    finally:
        for c in docker_client.containers.list(all=True, filters={"ancestor": tag}):
            c.remove(force=True)
        docker_client.images.remove(tag, force=True)


def test_missing_bundle_for_an_image_without_one(docker_client: Any, images: dict[str, Any],
                                                 deployment: dict[str, Any]) -> None:
    args = ["deploy", "--host", "local", "--name", deployment["name"], "--port", str(deployment["port"]),
            "--metrics-port", str(deployment["metrics"])]
    proc = run_slmops(args, env=deployment["env"])
    assert proc.returncode == 2 and proc.stderr.startswith("Error: --bundle: missing"), proc.stderr
