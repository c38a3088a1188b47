"""`slmops fleet` on a REAL multi-node Docker Swarm: one manager and two workers, each its own
dockerd (own data-root, exec-root, pidfile, socket, bridge and host name) in a network namespace this
module creates, joined by a bridge in a hub namespace; Debian's docker-registry on the hub address
is what the nodes pull from (slmops_ops/fleet/lab.py). The serve image comes from the default
engine (read only: `docker save`); the bundles are the tiny test bundle and copies of it with the
`tone` adapter's weights scaled (a new version whose answers carry a new adapter sha256).

The tests run in order on one swarm (module scope): v1, the same again, v2 under load, v3 that
cannot start, adapters all-or-nothing, a node lost during an update (last: it kills node-2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containers.conftest import CLI, IMAGES, run_slmops

SERVICE = "slm"
PORT = 50061


def _skip_reason() -> str | None:
    from slmops_ops.fleet.lab import missing

    return missing()


@pytest.fixture(scope="module")
def lab(docker_client: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A running 3-node swarm with the serve image loaded on every node."""
    from concurrent.futures import ThreadPoolExecutor

    import docker
    from slmops_ops.fleet.lab import SwarmLab

    reason = _skip_reason()
    if reason:
        pytest.skip(f"a multi-node swarm cannot run here: {reason}")
    try:
        docker_client.images.get(IMAGES["serve"])  # scripts/ci_containers.sh built it before the tests
    except docker.errors.ImageNotFound:
        request.getfixturevalue("images")  # build the images (make images OFFLINE=1)
    root = Path(f"/tmp/slmops-fleet-{os.getpid()}")
    swarm = SwarmLab(root, prefix=f"slt{os.getpid() % 10000}", subnet="10.78.0")
    start = time.monotonic()
    swarm.start()
    try:
        tar = root / "serve.tar"
        with tar.open("wb") as f:  # one `docker save` from the default engine, loaded on each node at once
            for chunk in docker_client.images.get(IMAGES["serve"]).save(chunk_size=4 << 20, named=IMAGES["serve"]):
                f.write(chunk)

        def load(node: Any) -> None:
            with tar.open("rb") as f:
                node.client.images.load(f)

        with ThreadPoolExecutor(len(swarm.nodes)) as pool:
            list(pool.map(load, swarm.nodes))
        tar.unlink()
        print(f"\nswarm of {len(swarm.nodes)} nodes up, serve image on each: {time.monotonic() - start:.0f}s")
        yield swarm
    finally:
        print("\n".join(swarm.log))
        swarm.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"SLMOPS_DEPLOY_STATE": str(tmp_path_factory.mktemp("fleet-state") / "deployments.json")}


@pytest.fixture(scope="module")
def versions(serve_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from slmops_ops.fleet.lab import bundle_variant

    root = tmp_path_factory.mktemp("fleet-bundles")
    return {"v1": serve_bundle, **{v: bundle_variant(serve_bundle, root / v, scale)
                                   for v, scale in (("v2", 1.5), ("v3", 2.0), ("v4", 2.5))}}


def fleet(lab: Any, env: dict[str, str], *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return run_slmops(["fleet", *args, "--manager", lab.manager.socket], env=env, timeout=timeout)


def deploy_args(lab: Any, bundle: Path, *extra: str) -> list[str]:
    return ["deploy", "--bundle", str(bundle), "--service", SERVICE, "--port", str(PORT), "--registry", lab.registry,
            "--serve-arg=--threads=1", "--timeout", "300", "--json", *extra]


def status(lab: Any, env: dict[str, str]) -> list[dict[str, Any]]:
    proc = fleet(lab, env, "status", "--service", SERVICE, "--json")
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def adapter_sha(bundle: Path, name: str = "tone") -> str:
    return str(json.loads((bundle / "bundle.json").read_text())["adapters"][name]["sha256"])


def test_deploy_v1_every_task_serving_and_a_generate_per_adapter(lab: Any, env: dict[str, str],
                                                                  versions: dict[str, Path]) -> None:
    from slmops_serve.client import SlmopsClient

    start = time.monotonic()
    proc = fleet(lab, env, *deploy_args(lab, versions["v1"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "created" and result["tasks"] == 3, result
    print(f"\nv1 created on 3 nodes in {time.monotonic() - start:.1f}s ({result['baked']})")
    rows = status(lab, env)
    assert sorted(r["node"] for r in rows) == ["node-0", "node-1", "node-2"]
    assert all(r["state"] == "running" and r["health"] == "SERVING" for r in rows), rows
    assert all(r["adapters"] == "extract,tone" and r["image"] == result["image"] for r in rows), rows
    assert {r["address"] for r in rows} == {f"{n.address}:{PORT}" for n in lab.nodes}
    for node in lab.nodes:  # each device's own published port (host mode)
        with SlmopsClient(f"{node.address}:{PORT}", timeout=30) as c:
            for adapter in ("", "tone", "extract"):
                r = c.generate("Tone of: I lost my keys again\n", adapter=adapter, max_new_tokens=3)
                assert r.adapter == adapter and r.usage.completion_tokens > 0
                if adapter == "tone":
                    assert r.adapter_sha256 == adapter_sha(versions["v1"])


def test_same_bundle_again_is_unchanged(lab: Any, env: dict[str, str], versions: dict[str, Path]) -> None:
    ids = {t["ID"] for t in lab.manager.client.api.tasks(filters={"service": SERVICE})}
    proc = fleet(lab, env, *deploy_args(lab, versions["v1"]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "unchanged"
    assert {t["ID"] for t in lab.manager.client.api.tasks(filters={"service": SERVICE})} == ids  # nothing restarted


def test_v2_rollout_under_load_loses_no_request(lab: Any, env: dict[str, str], versions: dict[str, Path]) -> None:
    from slmops_ops.fleet.lab import Gateway

    # a request started every 100 ms, at most one in flight per node: on a loaded shared machine a
    # queue of them would end in deadline errors that say nothing about the rollout
    gateway = Gateway([f"{n.address}:{PORT}" for n in lab.nodes], max_in_flight=len(lab.nodes))
    thread = threading.Thread(target=gateway.run, args=(0.1,), daemon=True)
    thread.start()
    try:
        time.sleep(2)
        start = time.monotonic()
        proc = fleet(lab, env, *deploy_args(lab, versions["v2"]))
        took = time.monotonic() - start
        time.sleep(2)
    finally:
        gateway.stop()
        thread.join(30)
        gateway.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "updated" and result["tasks"] == 3
    shas = {sha for _, _, sha in gateway.answers}
    v1, v2 = adapter_sha(versions["v1"]), adapter_sha(versions["v2"])
    print(f"\nv1 -> v2 on 3 nodes: {took:.1f}s; {gateway.sent} requests, {len(gateway.answers)} answered, "
          f"{len(gateway.failed)} failed, "
          f"{gateway.retries} retried on another device; per-device gap (s): "
          + ", ".join(f"{a} {g:.1f}" for a, g in gateway.gaps.items()))
    assert gateway.failed == [] and len(gateway.answers) == gateway.sent >= 30
    assert shas <= {v1, v2} and v2 in shas and v1 in shas, shas
    assert all(gap > 0 for gap in gateway.gaps.values()), gateway.gaps  # every device did go away and come back
    last = {}
    for _, address, sha in gateway.answers:
        last[address] = sha
    assert set(last.values()) == {v2}, last  # after the rollout every device answers with v2
    assert all(r["image"] == result["image"] and r["health"] == "SERVING" for r in status(lab, env))


def test_v3_that_cannot_start_is_rolled_back_by_swarm(lab: Any, env: dict[str, str], versions: dict[str, Path]) -> None:
    from slmops_serve.client import SlmopsClient

    before = {r["node"]: r["image"] for r in status(lab, env)}
    start = time.monotonic()
    proc = fleet(lab, env, *deploy_args(lab, versions["v3"], "--serve-arg=--max-queue=-3"))
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "Swarm rolled it back" in err and "node node-" in err and "--max-queue" in err, err  # node, error, log line
    assert "Traceback" not in proc.stderr
    print(f"\nv3 failed and was rolled back in {took:.1f}s: {err[:300]}")
    rows = status(lab, env)
    assert {r["node"]: r["image"] for r in rows} == before
    assert all(r["health"] == "SERVING" for r in rows), rows
    for node in lab.nodes:
        with SlmopsClient(f"{node.address}:{PORT}", timeout=30) as c:
            assert c.generate("Tone of: hi\n", adapter="tone", max_new_tokens=2).adapter_sha256 == \
                adapter_sha(versions["v2"])


def test_adapters_load_is_all_or_nothing(lab: Any, env: dict[str, str], versions: dict[str, Path],
                                         tmp_path: Path) -> None:
    from slmops_serve.client import SlmopsClient

    upload = versions["v3"] / "adapters" / "tone.onnx_adapter"
    proc = fleet(lab, env, "adapters", "load", "tone3", str(upload), "--service", SERVICE)
    assert proc.returncode == 0, proc.stderr
    token = json.loads(Path(env["SLMOPS_DEPLOY_STATE"]).read_text())[lab.manager.socket][SERVICE]["admin_token"]
    for node in lab.nodes:
        with SlmopsClient(f"{node.address}:{PORT}", token=token, timeout=30) as c:
            assert "tone3" in {a.name for a in c.list_adapters()}
            assert c.generate("Tone of: hi\n", adapter="tone3", max_new_tokens=2).adapter_sha256 == adapter_sha(
                versions["v3"])
    proc = fleet(lab, env, "adapters", "unload", "tone3", "--service", SERVICE)
    assert proc.returncode == 0, proc.stderr

    # node-2's server stops answering (its container frozen): the load must leave no replica with it
    frozen = lab.nodes[2].client.containers.list(filters={"label": f"com.docker.swarm.service.name={SERVICE}"})[0]
    frozen.pause()
    try:
        proc = fleet(lab, env, "adapters", "load", "tone4", str(upload), "--service", SERVICE, "--timeout", "5")
    finally:
        frozen.unpause()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "node-2" in last and "all or nothing" in last and "Traceback" not in proc.stderr, proc.stderr
    for node in lab.nodes:
        with SlmopsClient(f"{node.address}:{PORT}", token=token, timeout=30) as c:
            assert "tone4" not in {a.name for a in c.list_adapters()}, node.name


def test_canary_first_then_the_rest(lab: Any, env: dict[str, str], versions: dict[str, Path]) -> None:
    proc = fleet(lab, env, *deploy_args(lab, versions["v4"], "--canary", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "updated" and result["tasks"] == 3, result
    (canary,) = result["canary"]  # one task checked before the others were touched
    assert [a["adapter"] for a in canary["answers"]] == ["", "extract", "tone"] and all(a["ok"] for a in canary["answers"])
    assert all(r["image"] == result["image"] for r in status(lab, env))


def test_bad_input_one_line_exit_2(lab: Any, env: dict[str, str], versions: dict[str, Path]) -> None:
    cases = {
        "unknown service": (["status", "--service", "nope", "--manager", lab.manager.socket], "--service"),
        "unreachable manager": (["status", "--manager", "unix:///nonexistent/docker.sock"], "--manager"),
        "no registry": (["deploy", "--bundle", str(versions["v1"]), "--service", SERVICE, "--manager",
                         lab.manager.socket], "--registry"),
        "rollback of an unknown service": (["rollback", "--service", "nope", "--manager", lab.manager.socket],
                                           "--service"),
    }
    for case, (args, option) in cases.items():
        proc = run_slmops(["fleet", *args], env=env, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and option in lines[0], (case, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_node_lost_during_an_update(lab: Any, env: dict[str, str], versions: dict[str, Path]) -> None:
    """node-2 loses power while v1 rolls out again: the command says so and the service converges on the others."""
    from slmops_serve.client import SlmopsClient

    args = deploy_args(lab, versions["v1"])
    child = subprocess.Popen([sys.executable, "-c", CLI, "fleet", *args, "--manager", lab.manager.socket],
                             env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    svc = {}
    while time.monotonic() < deadline:  # the update has started
        svc = lab.manager.client.api.inspect_service(SERVICE)
        if (svc.get("UpdateStatus") or {}).get("State") == "updating":
            break
        time.sleep(0.2)
    assert (svc.get("UpdateStatus") or {}).get("State") == "updating", svc.get("UpdateStatus")
    lost_at = time.monotonic()
    lab.stop_node(lab.nodes[2])
    out, err = child.communicate(timeout=400)
    took = time.monotonic() - lost_at
    assert child.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["down_nodes"] == ["node-2"] and result["tasks"] == 2, result
    assert "node(s) down: node-2" in err
    print(f"\nnode-2 lost during v4->v1: the rollout finished on the 2 others {took:.1f}s later")
    rows = {r["node"]: r for r in status(lab, env)}
    for name in ("node-0", "node-1"):
        assert rows[name]["image"] == result["image"] and rows[name]["health"] == "SERVING", rows
    for node in lab.nodes[:2]:
        with SlmopsClient(f"{node.address}:{PORT}", timeout=30) as c:
            assert c.generate("Tone of: hi\n", adapter="tone", max_new_tokens=2).adapter_sha256 == \
                adapter_sha(versions["v1"])


# ---- no engine needed -----------------------------------------------------------------------------
def test_kubernetes_manifest_validates_against_the_pinned_schema(tiny_bundle: Path, tmp_path: Path) -> None:
    import yaml

    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the dev extra installs kubernetes-validate")
    for extra, kind in (([], "DaemonSet"), (["--replicas", "3", "--host-port", "50051"], "Deployment")):
        out = tmp_path / f"{kind}.yaml"
        proc = run_slmops(["fleet", "manifest", "--format", "kubernetes", "--bundle", str(tiny_bundle), "--registry",
                           "reg.lan:5000", "--service", "slm", "--token-secret", "slm-admin", "--out", str(out), *extra])
        assert proc.returncode == 0, proc.stderr
        docs = list(yaml.safe_load_all(out.read_text()))
        assert [d["kind"] for d in docs] == [kind, "Service"]
        for doc in docs:
            kubernetes_validate.validate(doc, "1.37.0", strict=True)  # raises on any schema violation
        pod = docs[0]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert pod["spec"]["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
        assert container["readinessProbe"]["grpc"]["port"] == 50051 and container["livenessProbe"]["grpc"]
        assert container["resources"]["limits"] == {"memory": "2Gi", "cpu": "2"}
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert container["image"].startswith("reg.lan:5000/slmops-bundle:cpu-")
    bad = dict(docs[0])
    bad["spec"] = {**bad["spec"], "replicas": "three"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.37.0", strict=True)


def test_arm64_bundle_is_placed_on_arm64_nodes_only() -> None:
    from slmops_ops.fleet.swarm import FleetOptions, service_spec

    spec = service_spec(FleetOptions(service="s", port=1), "r/i:t", "arm64", "0" * 64, "cpu-arm64", ["a"], "tok")
    assert "node.platform.arch==aarch64" in spec["TaskTemplate"]["Placement"]["Constraints"]
    spec = service_spec(FleetOptions(service="s", port=1, replicas=2), "r/i:t", "amd64", "0" * 64, "cpu", [], "tok")
    assert spec["TaskTemplate"]["Placement"]["Constraints"] == ["node.platform.arch==x86_64"]
    assert spec["Mode"] == {"Replicated": {"Replicas": 2}}
    update = spec["UpdateConfig"]
    assert update["Parallelism"] == 1 and update["FailureAction"] == "rollback" and update["Order"] == "stop-first"
    assert all(p["PublishMode"] == "host" for p in spec["EndpointSpec"]["Ports"])
