"""Deploy to an "edge host" over ssh:// that has neither the image nor a registry: a second Docker
engine (its own data root, socket and bridge) behind a local sshd, so the image must travel as a
`docker save` stream into the remote `docker load`, and the bundle through `put_archive` into a
volume on that engine. Skips, saying why, where root, sshd or ip(8) are missing."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containers.conftest import (
    IMAGES,
    PROMPT,
    free_port,
    run_slmops,
    ssh_missing,
    ssh_to_engine,
    stop_process,
    wait_serving,
)

BRIDGE = "slmopsbr0"
BRIDGE_CIDR = "172.31.250.1/24"


@pytest.fixture(scope="module")
def edge_host(docker_client: Any) -> Iterator[dict[str, Any]]:
    """{"host": "ssh://root@127.0.0.1:PORT", "env": {...PATH with an ssh that knows the key...}, "client": engine}."""
    import docker

    reason = ssh_missing() or next((f"a second engine needs {tool} (apt-get install iproute2 docker.io)"
                                    for tool in ("ip", "dockerd") if shutil.which(tool) is None), None)
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="slmops-edge-"))
    procs: list[subprocess.Popen] = []
    made_bridge = False
    try:
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
            subprocess.run(["ip", "link", "add", "name", BRIDGE, "type", "bridge"], check=True)
            subprocess.run(["ip", "addr", "add", BRIDGE_CIDR, "dev", BRIDGE], check=True)
            subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
            made_bridge = True
        sock = root / "docker.sock"
        procs.append(subprocess.Popen(
            ["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"), "--pidfile",
             str(root / "docker.pid"), "-H", f"unix://{sock}", "--bridge", BRIDGE, "--iptables=false", "--ip-masq=false"],
            stdout=(root / "dockerd.log").open("w"), stderr=subprocess.STDOUT))
        remote = None
        for _ in range(120):
            with contextlib.suppress(Exception):
                remote = docker.DockerClient(base_url=f"unix://{sock}", timeout=600)
                remote.ping()
                break
            remote = None
            time.sleep(0.5)
        if remote is None:
            pytest.fail(f"the second dockerd did not start:\n{(root / 'dockerd.log').read_text()[-2000:]}")

        with ssh_to_engine(sock, root / "ssh") as ssh:
            yield {**ssh, "client": remote, "root": root}
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        if made_bridge:
            subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        subprocess.run(["umount", "-R", str(root / "exec")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_save_load_into_an_engine_without_the_image(images: dict[str, Any], edge_host: dict[str, Any]) -> None:
    """`docker save | docker load` into a fresh engine (no shared layers): the sneakernet path, timed."""
    from tests.containers.conftest import docker_cli

    remote = edge_host["client"]
    sock = edge_host["root"] / "docker.sock"
    cli = docker_cli()
    start = time.monotonic()
    save = subprocess.Popen([cli, "save", IMAGES["serve"]], stdout=subprocess.PIPE)
    load = subprocess.run([cli, "-H", f"unix://{sock}", "load"], stdin=save.stdout, capture_output=True, text=True)
    assert save.wait() == 0 and load.returncode == 0, load.stderr
    seconds = time.monotonic() - start
    assert remote.images.get(IMAGES["serve"]).id == images["serve"].id
    remote.images.remove(IMAGES["serve"])  # the deploy test below must stream it again
    print(f"\nsave | load of the serve image into an empty engine: {seconds:.1f}s")


def test_deploy_over_ssh_streams_image_and_bundle(images: dict[str, Any], serve_bundle: Path,
                                                  edge_host: dict[str, Any], tmp_path: Path) -> None:
    remote = edge_host["client"]
    assert not remote.images.list(name=IMAGES["serve"].split(":")[0]), "the edge engine must start without the image"
    port, metrics = free_port(), free_port()
    env = {**edge_host["env"], "SLMOPS_DEPLOY_STATE": str(tmp_path / "deployments.json")}
    args = ["deploy", "--host", edge_host["host"], "--bundle", str(serve_bundle), "--port", str(port),
            "--metrics-port", str(metrics), "--bind", "127.0.0.1", "--timeout", "90", "--json"]
    start = time.monotonic()
    proc = run_slmops(args, env=env)
    wall = time.monotonic() - start
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\nstdout: {proc.stdout[-2000:]}"
    result = json.loads(proc.stdout)
    assert result["image_transfer"]["how"].startswith("save/load gzip")
    assert result["bundle_transfer"]["how"] == "copied"
    assert f"image {IMAGES['serve']} -> {edge_host['host']}" in proc.stderr  # progress lines
    assert remote.images.get(IMAGES["serve"]).id == images["serve"].id
    assert remote.containers.get("slmops-serve").status == "running"
    with wait_serving(f"127.0.0.1:{port}", timeout=30) as client:
        assert client.generate(PROMPT, adapter="tone", max_new_tokens=8).text

    status = run_slmops(["deploy", "status", "--json"], env=env)  # the recorded ssh host
    rows = json.loads(status.stdout)
    assert [(r["host"], r["name"], r["state"]) for r in rows] == [(edge_host["host"], "slmops-serve", "running")]

    again = run_slmops(args + ["--force"], env=env)  # image and bundle already there: nothing moves
    assert again.returncode == 0, f"{again.stderr[-3000:]}\nstdout: {again.stdout[-2000:]}"
    second = json.loads(again.stdout)
    assert second["image_transfer"]["how"] == "present" and second["bundle_transfer"]["how"] == "reused"
    print(f"\ndeploy over ssh to an engine without the image: {wall:.1f}s wall; image {result['image_transfer']}; "
          f"bundle {result['bundle_transfer']}; SERVING {result['serving_after_s']:.1f}s after start. "
          f"Redeploy (nothing to move): {second['total_s']:.1f}s")
