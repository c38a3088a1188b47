"""`slmops fleet` on a REAL multi-node Docker Swarm: one manager and two workers, each its own
dockerd (own data-root, exec-root, pidfile, socket, bridge and host name) in a network namespace this
module creates, joined by a bridge in a hub namespace; Debian's docker-registry on the hub address
is what the nodes pull from (slmops_ops/fleet/lab.py). The serve image comes from the default
engine (read only: `docker save`); the bundles are the tiny test bundle and copies of it with the
`tone` adapter's weights scaled (a new version whose answers carry a new adapter sha256).

The tests run in order on one swarm (module scope): v1, the same again, v2 under load, v3 that
cannot start, adapters all-or-nothing, a canary, a canary that answers wrongly (rolled back), the
manager reached over ssh://, a manifest list put to the lab's registry, a multi-arch rollout (amd64
+ a tiny cpu-arm64 build), a node lost during an update (last: it kills node-2).

Every lab node is amd64: that an arm64 node pulls the arm64 member of the manifest list and runs it
is not tested here (the list's arm64 entry, its digest and its image's architecture are).
"""

from __future__ import annotations

import contextlib
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

from tests.containers.conftest import CLI, IMAGES, run_slmops, ssh_to_engine
from tests.containers.test_arm64 import ARM64_IMAGE, arm64_bundle  # noqa: F401 - the cpu-arm64 bundle fixture

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
                                   for v, scale in (("v2", 1.5), ("v3", 2.0), ("v4", 2.5), ("v5", 3.0))}}


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


def test_canary_that_answers_wrongly_is_rolled_back(lab: Any, env: dict[str, str], versions: dict[str, Path]) -> None:
    """v5's image serves other weights than v5's bundle (baked beforehand from v2's files under v5's
    tag: a stale or tampered registry image). It starts and is healthy, so only the canary's
    comparison with what v5 itself answers catches it: exit 1 naming the node, the adapter,
    expected vs got, and Swarm's rollback puts every node back on v4, SERVING."""
    from slmops_ops.deploy.deployer import check_bundle
    from slmops_ops.fleet.bake import bake
    from slmops_serve.client import SlmopsClient

    from slmops.bundle import read_manifest

    before = {r["node"]: r["image"] for r in status(lab, env)}
    manifest, sha = check_bundle(versions["v5"])
    assert read_manifest(versions["v2"]).adapters["tone"].sha256 != manifest.adapters["tone"].sha256
    tampered = bake(lab.manager.client, IMAGES["serve"], versions["v2"], manifest, sha, lab.registry, print)
    start = time.monotonic()
    proc = fleet(lab, env, *deploy_args(lab, versions["v5"], "--canary", "1"))
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("Error: canary ") and "on node node-" in err, err
    assert "answered wrongly for adapter 'tone'" in err, err
    assert f"adapter sha256 expected {adapter_sha(versions['v5'])[:16]} (bundle.json), got " \
           f"{adapter_sha(versions['v2'])[:16]}" in err, err
    assert "text expected" in err and f"Swarm rolled '{SERVICE}' back to {before['node-0']}" in err, err
    print(f"\na canary that answered wrongly ({tampered.ref}), rolled back in {took:.1f}s: {err[:400]}")
    rows = status(lab, env)
    assert {r["node"]: r["image"] for r in rows} == before
    assert all(r["state"] == "running" and r["health"] == "SERVING" for r in rows), rows
    for node in lab.nodes:
        with SlmopsClient(f"{node.address}:{PORT}", timeout=30) as c:
            assert c.generate("Tone of: hi\n", adapter="tone", max_new_tokens=2).adapter_sha256 == \
                adapter_sha(versions["v4"])


def test_manager_over_ssh(lab: Any, env: dict[str, str], versions: dict[str, Path], tmp_path: Path) -> None:
    """--manager ssh://root@127.0.0.1:PORT: a local sshd whose sessions reach the lab manager's engine
    (docker's ssh transport: `docker system dial-stdio` there). Status answers; the running version
    deployed again is "unchanged"."""
    with ssh_to_engine(lab.manager.root / "docker.sock", tmp_path / "ssh") as ssh:
        ssh_env = {**env, **ssh["env"]}
        proc = run_slmops(["fleet", "status", "--service", SERVICE, "--json", "--manager", ssh["host"]], env=ssh_env,
                          timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = json.loads(proc.stdout)
        assert sorted(r["node"] for r in rows) == ["node-0", "node-1", "node-2"]
        assert all(r["health"] == "SERVING" for r in rows), rows
        start = time.monotonic()
        proc = run_slmops(["fleet", *deploy_args(lab, versions["v4"]), "--manager", ssh["host"]], env=ssh_env,
                          timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout)
        assert result["status"] == "unchanged" and result["tasks"] == 3, result
        print(f"\nfleet status and an unchanged deploy over ssh://: deploy {time.monotonic() - start:.1f}s")


def _tiny_image(reg: Any, repo: str, tag: str, arch: str) -> tuple[str, str]:
    """One-layer image of ``arch`` put to the registry blob by blob (no engine): (manifest digest, config digest)."""
    import gzip
    import hashlib
    import io
    import tarfile

    from slmops_ops.fleet.bake import DOCKER_MANIFEST

    def put_blob(data: bytes) -> str:
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        code, headers, body = reg.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert code == 202, body
        location = headers["location"]
        if "://" in location:
            location = "/" + location.split("://", 1)[1].split("/", 1)[1]
        code, _, body = reg.request("PUT", location + ("&" if "?" in location else "?") + f"digest={digest}", body=data,
                                    headers={"Content-Type": "application/octet-stream"})
        assert code == 201, body
        return digest

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("arch.txt")
        payload = f"{arch}\n".encode()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    config = json.dumps({"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [f"sha256:{hashlib.sha256(raw.getvalue()).hexdigest()}"]}}).encode()
    config_digest, layer_digest = put_blob(config), put_blob(layer)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                      "size": len(config), "digest": config_digest},
                           "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                       "size": len(layer), "digest": layer_digest}]}).encode()
    code, _, body = reg.request("PUT", f"/v2/{repo}/manifests/{tag}", body=manifest,
                                headers={"Content-Type": DOCKER_MANIFEST})
    assert code == 201, body
    return f"sha256:{hashlib.sha256(manifest).hexdigest()}", config_digest


def test_manifest_list_put_on_the_lab_registry(lab: Any) -> None:
    """The v2 manifest list PUT against the registry the nodes pull from: one amd64 and one arm64
    image (put blob by blob), the list over them read back, and an amd64 node that pulls the list
    gets the amd64 image. A member whose image is of another arch than its entry is refused."""
    from slmops_ops.fleet.bake import DOCKER_LIST, DOCKER_MANIFEST, Registry

    from slmops.errors import SlmopsUsageError

    reg = Registry(lab.registry)
    repo = "slmops-bundle"
    digests = {arch: _tiny_image(reg, repo, f"listtest-{arch}", arch) for arch in ("amd64", "arm64")}
    ref = f"{lab.registry}/{repo}:listtest"
    digest = reg.put_list(ref, [(arch, f"{lab.registry}/{repo}:listtest-{arch}") for arch in ("amd64", "arm64")])
    code, headers, body = reg.request("GET", f"/v2/{repo}/manifests/listtest", headers={"Accept": DOCKER_LIST})
    assert code == 200 and headers["content-type"] == DOCKER_LIST and headers["docker-content-digest"] == digest
    doc = json.loads(body)
    assert doc["mediaType"] == DOCKER_LIST and [(m["platform"]["architecture"], m["digest"], m["mediaType"])
                                                for m in doc["manifests"]] == \
        [("amd64", digests["amd64"][0], DOCKER_MANIFEST), ("arm64", digests["arm64"][0], DOCKER_MANIFEST)]
    assert doc["manifests"][1]["platform"] == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    pulled = lab.nodes[1].client.images.pull(f"{lab.registry}/{repo}", tag="listtest")
    assert pulled.id == digests["amd64"][1] and pulled.attrs["Architecture"] == "amd64"
    with pytest.raises(SlmopsUsageError, match="is a linux/amd64 image, not linux/arm64"):
        reg.put_list(f"{lab.registry}/{repo}:listtest-bad", [("arm64", f"{lab.registry}/{repo}:listtest-amd64")])


def test_multi_arch_rollout_amd64_nodes_run_the_amd64_member(lab: Any, env: dict[str, str], versions: dict[str, Path],
                                                            arm64_bundle: Path,  # noqa: F811 - the fixture
                                                            docker_client: Any) -> None:
    """--bundle CPU --bundle CPU-ARM64: each baked from its arch's serve image and pushed, a manifest
    list over them, the service placed by Placement.Platforms; every (amd64) node runs the amd64
    member. An arm64 node pulling the arm64 member is not tested: every lab node is amd64."""
    import docker
    from slmops_ops.deploy.deployer import check_bundle
    from slmops_ops.fleet import LABEL_BUNDLE_SHA
    from slmops_ops.fleet.bake import DOCKER_LIST, Registry
    from slmops_serve.client import SlmopsClient

    try:
        docker_client.images.get(ARM64_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"no {ARM64_IMAGE} in the local engine: `make images ARCH=arm64 OFFLINE=1` builds it (emulated; "
                    "scripts/ci_containers.sh does)")
    service, port = "slm-multi", PORT + 2
    _, sha_amd = check_bundle(versions["v1"])
    _, sha_arm = check_bundle(arm64_bundle)
    try:
        start = time.monotonic()
        proc = fleet(lab, env, "deploy", "--bundle", str(versions["v1"]), "--bundle", str(arm64_bundle), "--service",
                     service, "--port", str(port), "--registry", lab.registry, "--serve-arg=--threads=1",
                     "--timeout", "600", "--json", timeout=1500)
        took = time.monotonic() - start
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout)
        assert result["status"] == "created" and result["tasks"] == 3, result
        members = result["members"]
        assert sorted(members) == ["amd64", "arm64"], members
        assert members["amd64"]["bundle_sha256"] == sha_amd and members["arm64"]["bundle_sha256"] == sha_arm
        spec = lab.manager.client.api.inspect_service(service)["Spec"]
        assert spec["TaskTemplate"]["Placement"]["Platforms"] == [{"Architecture": "amd64", "OS": "linux"},
                                                                  {"Architecture": "arm64", "OS": "linux"}]
        repo, tag = result["image"][len(lab.registry) + 1:].rsplit(":", 1)
        code, _, body = Registry(lab.registry).request("GET", f"/v2/{repo}/manifests/{tag}",
                                                       headers={"Accept": DOCKER_LIST})
        assert code == 200 and sorted(m["platform"]["architecture"] for m in json.loads(body)["manifests"]) == \
            ["amd64", "arm64"]
        arm_image = lab.manager.client.images.get(members["arm64"]["image"])
        assert arm_image.attrs["Architecture"] == "arm64" and arm_image.labels[LABEL_BUNDLE_SHA] == sha_arm
        for node in lab.nodes:  # each node runs the amd64 member, pulled through the list
            (c,) = node.client.containers.list(filters={"label": f"com.docker.swarm.service.name={service}"})
            assert c.image.attrs["Architecture"] == "amd64" and c.image.labels[LABEL_BUNDLE_SHA] == sha_amd, node.name
            with SlmopsClient(f"{node.address}:{port}", timeout=30) as client:
                assert client.generate("Tone of: hi\n", adapter="tone", max_new_tokens=2).adapter_sha256 == \
                    adapter_sha(versions["v1"])
        proc = fleet(lab, env, "status", "--service", service, "--json")
        rows = json.loads(proc.stdout)
        assert [(r["arch"], r["health"], r["bundle_sha256"]) for r in rows] == [("amd64", "SERVING", sha_amd[:12])] * 3
        print(f"\nmulti-arch (amd64 + cpu-arm64) created on 3 amd64 nodes in {took:.1f}s: {result['baked']}")
        again = fleet(lab, env, "deploy", "--bundle", str(versions["v1"]), "--bundle", str(arm64_bundle), "--service",
                      service, "--port", str(port), "--registry", lab.registry, "--serve-arg=--threads=1", "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["status"] == "unchanged", again.stderr[-2000:]
    finally:
        with contextlib.suppress(Exception):
            lab.manager.client.api.remove_service(service)


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


def test_canary_compares_each_answer_with_what_the_bundle_answers(tiny_bundle: Path, tmp_path: Path) -> None:
    """The canary's check against a real in-process server: the answers computed here with the
    server's decode loop equal the server's, to the character; another adapter version (its sha256)
    or another text is named, expected vs got; --no-canary-compare only checks that each answers."""
    from slmops_ops.fleet.lab import bundle_variant
    from slmops_ops.fleet.swarm import expected_answers, generate_each

    from slmops.bundle import read_manifest
    from tests.serve.conftest import ADMIN_TOKEN, running_server

    manifest = read_manifest(tiny_bundle)
    want = expected_answers(tiny_bundle, manifest)
    assert sorted(want) == ["", "extract", "tone"]
    assert want["tone"]["sha256"] == manifest.adapters["tone"].sha256 and want[""]["sha256"] == ""
    assert len({w["text"] for w in want.values()}) > 1, want  # the adapters change the answer: the text says something
    names = ["extract", "tone"]
    with running_server(tiny_bundle) as server:
        answers = generate_each(server.address, ADMIN_TOKEN, names, want)
        assert [a["adapter"] for a in answers] == ["", "extract", "tone"]
        assert all(a["ok"] for a in answers), answers
        assert [a["text"] for a in answers] == [want[k]["text"] for k in ("", "extract", "tone")]
        other = {k: dict(v) for k, v in want.items()}
        other[""]["text"] += " and more"  # a server whose base weights answer otherwise
        bad = generate_each(server.address, ADMIN_TOKEN, names, other)
        assert [a["ok"] for a in bad] == [False, True, True], bad
        assert bad[0]["error"] == f"text expected {other['']['text']!r} (what the bundle answers), got {want['']['text']!r}"
        missing = generate_each(server.address, ADMIN_TOKEN, names, {k: v for k, v in want.items() if k != "extract"})
        assert [a["ok"] for a in missing] == [True, False, True] and "no such adapter" in missing[1]["error"]

    variant = bundle_variant(tiny_bundle, tmp_path / "v2", 3.0)  # the tone adapter's weights x3: a new sha256
    with running_server(variant) as server:
        answers = generate_each(server.address, ADMIN_TOKEN, names, want)
        assert [a["ok"] for a in answers] == [True, True, False], answers
        err = answers[2]["error"]
        assert err.startswith(f"adapter sha256 expected {want['tone']['sha256'][:16]} (bundle.json), got "
                              f"{read_manifest(variant).adapters['tone'].sha256[:16]}"), err
        assert all(a["ok"] for a in generate_each(server.address, ADMIN_TOKEN, names, None))  # --no-canary-compare


def test_bundles_of_a_multi_arch_rollout_are_checked_before_anything_moves(tiny_bundle: Path, tmp_path: Path) -> None:
    """Several --bundle: one per architecture, with the same adapters; one line and exit 2 otherwise."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny_bundle, twin)
    proc = run_slmops(["fleet", "deploy", "--bundle", str(tiny_bundle), "--bundle", str(twin), "--registry",
                       "127.0.0.1:1", "--manager", "unix:///nonexistent/docker.sock"], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--bundle" in lines[0] and "are both amd64 builds" in lines[0], lines[0]
