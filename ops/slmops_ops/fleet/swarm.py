"""The Swarm side of ``slmops fleet``: the service spec, deploy (create or update, followed to the
end), status, rollback, and adapters on every replica. See ``slmops_ops.fleet`` for who does what."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import click

from slmops.errors import SlmopsUsageError
from slmops.platforms import bundle_arch, normalize_arch
from slmops_ops.deploy import BUNDLE_MOUNT, CONTAINER_METRICS_PORT, CONTAINER_PORT, HEALTH_PROBE
from slmops_ops.deploy.deployer import (
    ADMIN_TOKEN_ENV,
    admin_token,
    check_bundle,
    pick_image,
    record,
    recorded_token,
)
from slmops_ops.deploy.hosts import Host, connect, import_docker, parse_host
from slmops_ops.deploy.transfer import ensure_image
from slmops_ops.fleet import (
    LABEL_ADAPTERS,
    LABEL_BUNDLE_NAME,
    LABEL_BUNDLE_SHA,
    LABEL_FLEET,
    LABEL_MEMBERS,
    LABEL_PORT,
    LABEL_SPEC,
)
from slmops_ops.fleet.bake import Baked, Registry, bake, list_ref

HTTP_CONTAINER_PORT = 8000
STOP_GRACE_S = 40  # the server's drain (--grace-period 30) + margin
SWARM_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}  # node.platform.arch names
NS = 1_000_000_000
PORT_RACE = "port is already allocated"
PORT_RACE_RETRIES = 2
STALL_S = 20.0  # an update that waits this long on a node that is down: that node is drained
CANARY_PROMPT = "Hello! Say something about the weather.\n"  # raw (no chat template), greedy
CANARY_TOKENS = 6
ANY_ARCH = "*"  # the expected answers of a single bundle, whatever a node's arch


class CanaryFailed(Exception):
    """A canary task answered wrongly: deploy() has Swarm roll the service back, then says who and what."""

    def __init__(self, node: str, address: str, answer: dict[str, Any]) -> None:
        super().__init__(node)
        self.node, self.address, self.answer = node, address, answer


class FleetError(click.ClickException):
    """A rollout that failed (exit code 1); the message says what Swarm rolled back."""


@dataclass
class FleetOptions:
    manager: str = "local"
    service: str = "slmops"
    bundle: Path | None = None
    bundles: list[Path] = field(default_factory=list)  # one per architecture (several: a manifest list)
    image: str = ""
    registry: str | None = None
    port: int = CONTAINER_PORT
    http_port: int | None = None
    metrics_port: int | None = None
    replicas: int | None = None  # None: global (one task per device)
    constraints: list[str] = field(default_factory=list)
    serve_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    canary: int = 0
    canary_compare: bool = True  # the canary's answers must equal the bundle's own (computed here)
    timeout: float = 300.0
    monitor: float = 5.0
    health_interval: float = 2.0
    memory: str | None = None
    cpus: float | None = None


@dataclass
class FleetResult:
    service: str
    status: str  # created | updated | unchanged | rolled back
    image: str
    bundle_sha256: str
    tasks: int
    seconds: float
    baked: dict[str, Any] = field(default_factory=dict)
    members: dict[str, dict[str, Any]] = field(default_factory=dict)  # multi-arch: arch -> image, bundle sha256
    down_nodes: list[str] = field(default_factory=list)
    canary: list[dict[str, Any]] = field(default_factory=list)
    admin_token_source: str = ""
    retries: int = 0  # updates issued again after Docker's host-port race rolled one back

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- connection ---------------------------------------------------------------------------------
def connect_manager(spec: str) -> tuple[Host, Any]:
    """(Host, docker client) of a swarm manager; SlmopsUsageError('--manager') otherwise."""
    try:
        host = parse_host(spec)
        client = connect(host, timeout=120)
    except SlmopsUsageError as exc:
        raise SlmopsUsageError("--manager", exc.message.replace("--host", "--manager")) from exc
    swarm = (client.info().get("Swarm") or {})
    if not swarm.get("ControlAvailable"):
        state = swarm.get("LocalNodeState", "inactive")
        raise SlmopsUsageError("--manager", f"the Docker engine at '{spec}' is not a swarm manager (swarm state: {state}); "
                               "pass a manager's address, or make one with `docker swarm init`")
    return host, client


def _service(client: Any, name: str, manager: str) -> dict[str, Any]:
    docker = import_docker()
    try:
        found: dict[str, Any] = client.api.inspect_service(name)
    except docker.errors.NotFound:
        names = sorted(s["Spec"]["Name"] for s in client.api.services(filters={"label": LABEL_FLEET}))
        known = f"; fleet services there: {', '.join(names)}" if names else "; there are no slmops fleet services there"
        raise SlmopsUsageError("--service", f"no service '{name}' on the swarm at {manager}{known}") from None
    return found


def nodes(client: Any) -> dict[str, dict[str, Any]]:
    """node id -> hostname, arch, address, state, availability."""
    out = {}
    for n in client.api.nodes():
        addr = n["Status"].get("Addr", "")
        if addr in ("", "0.0.0.0", "127.0.0.1") and n.get("ManagerStatus"):
            addr = n["ManagerStatus"].get("Addr", "").rsplit(":", 1)[0] or addr
        out[n["ID"]] = {"hostname": n["Description"]["Hostname"], "arch": normalize_arch(
            n["Description"]["Platform"]["Architecture"]), "addr": addr, "state": n["Status"]["State"],
            "availability": n["Spec"].get("Availability", "active")}
    return out


def tasks(client: Any, service_id: str) -> list[dict[str, Any]]:
    return list(client.api.tasks(filters={"service": service_id}))


def task_logs(client: Any, task_id: str, lines: int = 12) -> str:
    """The last lines of a task's output, through the manager (empty when its node does not answer)."""
    api = client.api
    try:
        res = api._get(api._url("/tasks/{0}/logs", task_id), params={"stdout": 1, "stderr": 1, "tail": lines},
                       stream=False, timeout=15)
        api._raise_for_status(res)
        raw = res.content
    except Exception:
        return ""
    text, i = [], 0
    while i + 8 <= len(raw):  # multiplexed frames: 8-byte header (stream, 0, 0, 0, size) then the bytes
        size = int.from_bytes(raw[i + 4:i + 8], "big")
        text.append(raw[i + 8:i + 8 + size].decode(errors="replace"))
        i += 8 + size
    return "".join(text).strip()


# ---- the spec -----------------------------------------------------------------------------------
def _bytes(value: str | None) -> int | None:
    if not value:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)b?", value.strip().lower())
    if not m:
        raise SlmopsUsageError("--memory", f"'{value}' is not a size; use e.g. 512m or 2g")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)])


def server_args(opts: FleetOptions) -> list[str]:
    args = ["serve", BUNDLE_MOUNT, "--port", str(CONTAINER_PORT)]
    args += ["--metrics-port", str(CONTAINER_METRICS_PORT)] if opts.metrics_port else ["--no-metrics"]
    if opts.http_port:
        args += ["--http-port", str(HTTP_CONTAINER_PORT)]
    return args + list(opts.serve_args)


def service_spec(opts: FleetOptions, image: str, arch: str | None, sha256: str, target: str, adapters: list[str],
                 token: str, members: dict[str, str] | None = None) -> dict[str, Any]:
    """The service's spec. ``members`` (arch -> bundle sha256): ``image`` is a manifest list over one
    image per architecture, and the tasks are placed by ``Placement.Platforms`` (a node of another
    architecture gets none); else a bundle of a known ``arch`` is constrained to nodes of that arch."""
    labels = {LABEL_FLEET: "1", LABEL_BUNDLE_SHA: sha256, LABEL_BUNDLE_NAME: target, LABEL_ADAPTERS: ",".join(adapters),
              LABEL_PORT: str(opts.port)}
    constraints = list(opts.constraints)
    placement: dict[str, Any] = {"Constraints": constraints}
    if members:
        labels[LABEL_MEMBERS] = ",".join(f"{a}={members[a]}" for a in sorted(members))
        placement["Platforms"] = [{"Architecture": a, "OS": "linux"} for a in sorted(members)]
    elif arch in SWARM_ARCH:
        constraints.append(f"node.platform.arch=={SWARM_ARCH[arch]}")
    ports = [(opts.port, CONTAINER_PORT)]
    if opts.metrics_port:
        ports.append((opts.metrics_port, CONTAINER_METRICS_PORT))
    if opts.http_port:
        ports.append((opts.http_port, HTTP_CONTAINER_PORT))
    limits: dict[str, int] = {}
    if opts.memory:
        limits["MemoryBytes"] = _bytes(opts.memory) or 0
    if opts.cpus:
        limits["NanoCPUs"] = int(opts.cpus * NS)
    env = {**opts.env, ADMIN_TOKEN_ENV: token}
    stage = {"Parallelism": 1, "Delay": 0, "FailureAction": "rollback", "Monitor": int(opts.monitor * NS),
             "MaxFailureRatio": 0, "Order": "stop-first"}
    return {
        "Name": opts.service,
        "Labels": labels,
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": image, "Args": server_args(opts), "Env": [f"{k}={v}" for k, v in sorted(env.items())],
                "Labels": labels, "Init": True, "ReadOnly": True, "StopSignal": "SIGTERM",
                "StopGracePeriod": STOP_GRACE_S * NS, "CapabilityDrop": ["ALL"],
                "Mounts": [{"Type": "tmpfs", "Target": "/tmp", "TmpfsOptions": {"SizeBytes": 256 << 20}}],
                "Healthcheck": {"Test": ["CMD", *HEALTH_PROBE], "Interval": int(opts.health_interval * NS),
                                "Timeout": 5 * NS, "Retries": 3, "StartPeriod": 120 * NS},
            },
            "Resources": {"Limits": limits},
            "RestartPolicy": {"Condition": "any", "Delay": 2 * NS, "MaxAttempts": 0},
            "Placement": placement,
            "LogDriver": {"Name": "json-file", "Options": {"max-size": "10m", "max-file": "3"}},
        },
        "Mode": {"Replicated": {"Replicas": opts.replicas}} if opts.replicas is not None else {"Global": {}},
        "UpdateConfig": stage,
        # a rollback that meets a failure goes on (each task restarts on its own): pausing would
        # leave the fleet half on each version
        "RollbackConfig": {**stage, "FailureAction": "continue"},
        "EndpointSpec": {"Mode": "dnsrr", "Ports": [{"Protocol": "tcp", "TargetPort": t, "PublishedPort": p,
                                                     "PublishMode": "host"} for p, t in ports]},
    }


def create_service(client: Any, spec: dict[str, Any]) -> str:
    api = client.api
    res = api._post_json(api._url("/services/create"), data=spec)
    api._raise_for_status(res)
    return str(res.json()["ID"])


def update_service(client: Any, service: dict[str, Any], spec: dict[str, Any], rollback: bool = False) -> None:
    api = client.api
    params: dict[str, Any] = {"version": service["Version"]["Index"]}
    if rollback:
        params["rollback"] = "previous"
    res = api._post_json(api._url("/services/{0}/update", service["ID"]), data=spec, params=params)
    api._raise_for_status(res)


# ---- following a rollout ------------------------------------------------------------------------
def _task_spec_image(task: dict[str, Any]) -> str:
    return str(task["Spec"]["ContainerSpec"]["Image"]).split("@")[0]


def _problem(client: Any, task: dict[str, Any], node_table: dict[str, dict[str, Any]]) -> str:
    node = node_table.get(task.get("NodeID", ""), {}).get("hostname", task.get("NodeID", "?")[:12])
    status = task.get("Status") or {}
    err = status.get("Err") or status.get("Message") or status.get("State")
    exit_code = (status.get("ContainerStatus") or {}).get("ExitCode")
    logs = task_logs(client, task["ID"])
    tail = "; last log lines: " + " | ".join(logs.splitlines()[-6:]) if logs else ""
    code = f" (exit code {exit_code})" if exit_code and "exit" not in str(err) else ""
    return f"node {node}: task {task['ID'][:12]} {err}{code}{tail}"


def _settled(client: Any, service_id: str, image: str, node_table: dict[str, dict[str, Any]]) -> tuple[int, int, list[str]]:
    """(tasks running the image, tasks that should, down nodes that hold or should hold one)."""
    svc = client.api.inspect_service(service_id)
    current = tasks(client, service_id)
    wanted = [t for t in current if t.get("DesiredState") == "running"]
    down = sorted({node_table[t["NodeID"]]["hostname"] for t in current if t.get("NodeID") in node_table
                   and node_table[t["NodeID"]]["state"] != "ready" and t["Status"]["State"] in ("running", "starting")})
    live = [t for t in wanted if node_table.get(t.get("NodeID", ""), {}).get("state", "ready") == "ready"]
    ok = [t for t in live if t["Status"]["State"] == "running" and _task_spec_image(t) == image.split("@")[0]]
    if "Replicated" in svc["Spec"]["Mode"]:
        should = int(svc["Spec"]["Mode"]["Replicated"]["Replicas"])
    else:  # global: one per ready node that holds a task of the service (placement may exclude others)
        should = len({t["NodeID"] for t in current if node_table.get(t.get("NodeID", ""), {}).get("state") == "ready"})
    return len(ok), should, down


def follow(client: Any, service_id: str, image: str, timeout: float, say: Callable[[str], None],
           first_failure: list[str]) -> tuple[str, list[str]]:
    """Follow an update or a create until it ends: ("completed" | "rolled back" | "paused" | "timeout", down nodes).
    Failed tasks of the new image are described into ``first_failure``."""
    deadline = time.monotonic() + timeout
    last_said = ""
    seen_failed: set[str] = set()
    down: list[str] = []
    last_progress, progress_at = "", time.monotonic()
    while time.monotonic() < deadline:
        table = nodes(client)
        svc = client.api.inspect_service(service_id)
        state = (svc.get("UpdateStatus") or {}).get("State", "")
        for t in tasks(client, service_id):
            if (t["Status"]["State"] in ("failed", "rejected") and t["ID"] not in seen_failed
                    and _task_spec_image(t) == image.split("@")[0]):
                seen_failed.add(t["ID"])
                first_failure.append(_problem(client, t, table))
                say(f"  failed: {first_failure[-1]}")
        ok, should, down_now = _settled(client, service_id, image, table)
        down = sorted(set(down) | set(down_now) | {n["hostname"] for n in table.values() if n["state"] == "down"})
        line = f"  {ok}/{should} tasks on the new version" + (f"; update {state}" if state else "") + \
               (f"; node(s) down: {', '.join(down)}" if down else "")
        if line != last_said:
            say(line)
            last_said = line
        if state in ("rollback_completed",):
            return "rolled back", down
        if state in ("paused", "rollback_paused"):
            return "paused", down
        if state == "completed" and ok >= should:
            return "completed", down
        if not state and ok >= should > 0:  # a create (no UpdateStatus): every task healthy
            return "completed", down
        if state == "updating" and ok >= should > 0 and down:
            # the live nodes are done; swarm keeps the update open for the lost node's slot
            return "completed", down
        if line != last_progress:
            last_progress, progress_at = line, time.monotonic()
        elif down and state == "updating" and time.monotonic() - progress_at > STALL_S:
            # Swarm's update waits for the task it started on a node that is gone (it never runs):
            # drain the lost node(s) so the update goes on with the others
            for node_id, n in table.items():
                if n["hostname"] in down and n["availability"] != "drain":
                    drain(client, node_id)
                    say(f"  {n['hostname']} is down and the update waits for it: drained it so the rollout goes "
                        f"on (`docker node update --availability active {n['hostname']}` when it is back)")
            progress_at = time.monotonic()
        time.sleep(0.5)
    return "timeout", down


def wait_running(client: Any, service_id: str, image: str, timeout: float, say: Callable[[str], None]) -> bool:
    """Until every task that should run ``image`` runs it (healthy: a task with a health check is
    'starting' until it passes); False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok, should, _down = _settled(client, service_id, image, nodes(client))
        if ok >= should > 0:
            return True
        time.sleep(0.5)
    say(f"  {image} did not run on every node within {timeout:.0f}s of the rollback")
    return False


def drain(client: Any, node_id: str) -> None:
    node = client.api.inspect_node(node_id)
    spec = dict(node["Spec"], Availability="drain")
    client.api.update_node(node_id, node["Version"]["Index"], spec)


# ---- deploy -------------------------------------------------------------------------------------
def _sayer(out: TextIO | None) -> Callable[[str], None]:
    def say(text: str) -> None:
        if out is not None:
            print(text, file=out, flush=True)
    return say


def _spec_key(spec: dict[str, Any]) -> str:
    """What decides "unchanged": a hash of the spec we asked for (Swarm stores it with defaults added
    and the image pinned to a digest, so the stored spec is not compared)."""
    import hashlib

    ours = {k: v for k, v in spec.items() if k != "Labels"}
    return hashlib.sha256(json.dumps(ours, sort_keys=True).encode()).hexdigest()


def _existing_token(service: dict[str, Any] | None) -> str | None:
    if service is None:
        return None
    for item in service["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env") or []:
        key, _, value = str(item).partition("=")
        if key == ADMIN_TOKEN_ENV and value:
            return value
    return None


@dataclass
class Member:
    """One bundle of a rollout: its folder, manifest, bundle.json sha256 and architecture."""
    bundle: Path
    manifest: Any
    sha256: str
    arch: str | None
    baked: Baked | None = None


def _members(opts: FleetOptions) -> list[Member]:
    paths = list(opts.bundles) or ([opts.bundle] if opts.bundle is not None else [])
    if not paths:
        raise SlmopsUsageError("--bundle", "pass the bundle folder to roll out (make bundle writes dist/bundles/cpu)")
    members = [Member(p, *check_bundle(p), None) for p in paths]
    for m in members:
        m.arch = bundle_arch(m.manifest)
    if len(members) == 1:
        return members
    unknown = [str(m.bundle) for m in members if m.arch is None]
    if unknown:
        raise SlmopsUsageError("--bundle", f"cannot tell which architecture {', '.join(unknown)} was built for; "
                               "several --bundle need one build per architecture (slmops build --target cpu / cpu-arm64)")
    seen: dict[str, Path] = {}
    for m in members:
        assert m.arch is not None
        if m.arch in seen:
            raise SlmopsUsageError("--bundle", f"{seen[m.arch]} and {m.bundle} are both {m.arch} builds; pass one "
                                   "bundle per architecture")
        seen[m.arch] = m.bundle
    names = {m.arch: sorted(m.manifest.adapters) for m in members}
    if len({tuple(v) for v in names.values()}) > 1:
        raise SlmopsUsageError("--bundle", "the bundles carry different adapters ("
                               + "; ".join(f"{a}: {', '.join(v) or 'none'}" for a, v in sorted(names.items()))
                               + "); every device of a service must serve the same ones")
    return sorted(members, key=lambda m: str(m.arch))


def expected_answers(bundle: Path, manifest: Any, prompt: str = CANARY_PROMPT,
                     max_new_tokens: int = CANARY_TOKENS) -> dict[str, dict[str, str]]:
    """adapter ("" = the base model) -> {"text", "sha256"}: what ``bundle`` itself answers to the
    canary's Generate (raw ``prompt``, greedy, ``max_new_tokens``), computed in this process by the
    server's decode loop (``slmops.runtime.LocalModel``) and detokenized by the server's incremental
    detokenizer; the sha256 is bundle.json's."""
    from slmops.runtime import LocalModel

    try:
        model = LocalModel(bundle / manifest.model_dir, manifest.lora_template,
                           execution_provider=manifest.target.execution_provider)
        ids = model.codec.encode(prompt)
        out = {}
        for adapter in ["", *sorted(manifest.adapters)]:
            if adapter:
                model.load_adapter(adapter, bundle / manifest.adapters[adapter].file)
            stream = model.codec.stream()
            text = "".join(stream.decode(t) for t in model.stream(ids, max_new_tokens, adapter or None))
            out[adapter] = {"text": text, "sha256": manifest.adapters[adapter].sha256 if adapter else ""}
            if adapter:
                model.unload_adapter(adapter)
    except Exception as exc:  # onnxruntime raises its own types (a provider missing here, a bad graph)
        raise SlmopsUsageError("--canary", f"cannot compute what {bundle} answers, to compare the canary's answers with "
                               f"({type(exc).__name__}: {str(exc)[:300]}); pass --no-canary-compare to only check "
                               "that each adapter answers") from exc
    return out


def _bake_members(opts: FleetOptions, members: list[Member], host: Host, client: Any, local: Any,
                  say: Callable[[str], None], out: TextIO | None) -> str | None:
    """Bake and push each member from its architecture's serve image; the image arch of a single
    member (None when unknown). Refuses an image of another architecture than its bundle."""
    image_arch: str | None = None
    for m in members:
        base = opts.image
        if m.arch and len(members) > 1:  # IMAGE when it is that arch, else IMAGE-ARCH (make images ARCH=...)
            base = pick_image(local, client, base, m.arch, host, lambda _text: None)
            say(f"{m.arch}: {m.bundle} on {base}")
        elif m.arch:  # a cpu-arm64 bundle takes the arm64 serve image (IMAGE-arm64, as `make images ARCH=arm64` tags it)
            base = pick_image(local, client, base, m.arch, host, say)
        base, _moved = ensure_image(local if local is not None else client, client, host, base, None, None, out)
        image_arch = normalize_arch(client.images.get(base).attrs.get("Architecture"))
        if m.arch and image_arch and m.arch != image_arch:
            raise SlmopsUsageError("--image", f"{base} is a linux/{image_arch} image and {m.bundle} was built for "
                                   f"{m.arch} (target {m.manifest.target.name}); build the serve image with "
                                   f"`make images ARCH={m.arch}`")
        assert opts.registry is not None
        m.baked = bake(client, base, m.bundle, m.manifest, m.sha256, opts.registry, say, out)
    return image_arch


def deploy(opts: FleetOptions, out: TextIO | None = None) -> FleetResult:
    docker = import_docker()
    say = _sayer(out)
    start = time.monotonic()
    members = _members(opts)
    if not opts.registry:
        raise SlmopsUsageError("--registry", "the devices pull the bundle image from a registry: pass --registry "
                               "HOST:PORT (one every node can reach; e.g. `docker run -d -p 5000:5000 registry:2`)")
    expected: dict[str, dict[str, dict[str, str]]] = {}
    if opts.canary > 0 and opts.canary_compare:  # before anything moves: a bundle that cannot run here says so now
        for m in members:
            key = str(m.arch) if len(members) > 1 else ANY_ARCH
            say(f"computing what {m.bundle} answers (the canary's answers must equal it)")
            expected[key] = expected_answers(m.bundle, m.manifest)
    host, client = connect_manager(opts.manager)
    docker_err = docker.errors.APIError
    existing = None
    with contextlib.suppress(docker.errors.NotFound):
        existing = client.api.inspect_service(opts.service)
    if existing is not None and existing["Spec"].get("Labels", {}).get(LABEL_FLEET) != "1":
        raise SlmopsUsageError("--service", f"service '{opts.service}' exists and was not made by slmops fleet; "
                               "pick another --service name")

    # the serve image(s) on the manager (from this machine's engine when the manager lacks them)
    local = None
    with contextlib.suppress(Exception):
        local = connect(parse_host("local"), timeout=600)
    image_arch = _bake_members(opts, members, host, client, local, say, out)
    first = members[0]
    assert first.baked is not None
    if len(members) == 1:
        ref, sha, target, arch, shas = first.baked.ref, first.sha256, first.manifest.target.name, \
            image_arch or first.arch, None
        baked_info = asdict(first.baked)
    else:
        import hashlib

        ref = list_ref(opts.registry, [(str(m.arch), m.manifest, m.sha256) for m in members])
        shas = {str(m.arch): m.sha256 for m in members}
        sha = hashlib.sha256("\n".join(f"{a}={s}" for a, s in sorted(shas.items())).encode()).hexdigest()
        target, arch = "+".join(m.manifest.target.name for m in members), None
        t = time.monotonic()
        digest = Registry(opts.registry).put_list(ref, [(str(m.arch), m.baked.ref) for m in members if m.baked])
        say(f"manifest list {ref} ({digest[:19]}): " + ", ".join(f"linux/{m.arch} -> {m.baked.ref}" for m in members
                                                                  if m.baked))
        baked_info = {"ref": ref, "digest": digest, "list_seconds": time.monotonic() - t,
                      "built": any(m.baked.built for m in members if m.baked),
                      "pushed_bytes": sum(m.baked.pushed_bytes for m in members if m.baked),
                      "seconds": sum(m.baked.seconds for m in members if m.baked)}
    token, source = admin_token(host, opts.service, None, opts.env)
    if source == "generated":
        kept = _existing_token(existing)
        if kept:
            token, source = kept, "kept"
    spec = service_spec(opts, ref, arch, sha, target, sorted(first.manifest.adapters), token, shas)
    spec["Labels"][LABEL_SPEC] = _spec_key(spec)
    result = FleetResult(opts.service, "", ref, sha, 0, 0.0, baked_info, admin_token_source=source)
    if shas:
        result.members = {str(m.arch): {"image": m.baked.ref if m.baked else "", "bundle_sha256": m.sha256,
                                        "target": m.manifest.target.name} for m in members}
    if existing is not None and existing["Spec"].get("Labels", {}).get(LABEL_SPEC) == spec["Labels"][LABEL_SPEC]:
        ok, should, down = _settled(client, existing["ID"], ref, nodes(client))
        if ok >= should:
            record(host, opts.service, ref, target, token)
            result.status, result.tasks, result.down_nodes = "unchanged", ok, down
            result.seconds = time.monotonic() - start
            return result
    failures: list[str] = []
    try:
        if existing is None:
            say(f"creating service {opts.service}: {ref} "
                f"({'global' if opts.replicas is None else f'{opts.replicas} replicas'}, host port {opts.port})")
            service_id = create_service(client, spec)
        else:
            service_id = existing["ID"]
            prev = existing["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].split("@")[0]
            say(f"updating service {opts.service}: {prev} -> {ref}, one device at a time, health-gated")
            if opts.canary > 0:
                try:
                    result.canary = canary(client, existing, spec, opts, say, expected or None)
                except CanaryFailed as bad:
                    raise _canary_rolled_back(client, host, existing, opts, bad, token, start, say) from None
            else:
                update_service(client, existing, spec)
    except docker_err as exc:
        raise SlmopsUsageError("--service", f"the swarm refused the service spec: {exc.explanation or exc}") from exc
    record(host, opts.service, ref, target, token)
    state, down = follow(client, service_id, ref, opts.timeout, say, failures)
    for _ in range(PORT_RACE_RETRIES):
        if existing is None or opts.canary or state == "completed" or not failures \
                or not all(PORT_RACE in f for f in failures):
            break
        # Docker's host-port race, not the new version: stop-first stopped the old task, but the
        # engine had not released its port yet when the new one started. Swarm rolled back; go again.
        say(f"  the new task found the host port still held by the old one ({PORT_RACE}): "
            "Docker's port release race, not the new version; updating again")
        result.retries += 1
        failures.clear()
        update_service(client, client.api.inspect_service(service_id), spec)
        state, down = follow(client, service_id, ref, opts.timeout, say, failures)
    result.down_nodes = down
    result.seconds = time.monotonic() - start
    if state == "completed":
        result.status = "created" if existing is None else "updated"
        result.tasks = _settled(client, service_id, ref, nodes(client))[0]
        return result
    why = failures[0] if failures else f"the update did not finish in {opts.timeout:.0f}s"
    if opts.canary > 0 and existing is not None and state != "completed":
        # after the canary phase the service was updated again (to let the rest follow), so Swarm's
        # "previous spec" is the new version: put the old spec back ourselves
        say(f"  rolling '{opts.service}' back to the spec it had before the canary")
        update_service(client, client.api.inspect_service(service_id), existing["Spec"])
        back_image = existing["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].split("@")[0]
        follow(client, service_id, back_image, opts.timeout, say, [])
        state = "rolled back"
    if state == "rolled back":
        back = existing["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].split("@")[0] if existing else "-"
        if existing is not None:
            # Swarm says rollback_completed once it has rescheduled the old tasks, not once they run
            # (and pass their health check): wait for them, so "rolled back" means serving again
            wait_running(client, service_id, back, opts.timeout, say)
            record(host, opts.service, back, existing["Spec"].get("Labels", {}).get(LABEL_BUNDLE_NAME, "?"), token)
        raise FleetError(f"rollout of {ref} to '{opts.service}' failed and Swarm rolled it back to {back} "
                         f"in {result.seconds:.1f}s: {why}")
    if existing is None:
        raise FleetError(f"service '{opts.service}' did not become healthy ({state}): {why}; it is left for "
                         f"inspection (`slmops fleet status --service {opts.service}`; `docker service rm "
                         f"{opts.service}` removes it)")
    raise FleetError(f"rollout of {ref} to '{opts.service}' stopped ({state}): {why}; "
                     f"`slmops fleet rollback --service {opts.service}` goes back to the previous version")


# ---- canary -------------------------------------------------------------------------------------
def _canary_rolled_back(client: Any, host: Host, existing: dict[str, Any], opts: FleetOptions, bad: CanaryFailed,
                        token: str, start: float, say: Callable[[str], None]) -> FleetError:
    """Swarm's own rollback of the canary batch (the service's previous spec is the one before this
    deploy), followed until every task runs the previous image again; the error that says why."""
    a = bad.answer
    what = f"adapter '{a['adapter']}'" if a["adapter"] else "the base model (no adapter)"
    say(f"  canary on {bad.node} ({bad.address}) answered wrongly for {what}: {a['error']}; Swarm rolls back")
    back = existing["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"].split("@")[0]
    service_id = existing["ID"]
    svc = client.api.inspect_service(service_id)
    update_service(client, svc, svc["Spec"], rollback=True)
    state, _down = follow(client, service_id, back, opts.timeout, say, [])
    serving = wait_running(client, service_id, back, opts.timeout, say)
    record(host, opts.service, back, existing["Spec"].get("Labels", {}).get(LABEL_BUNDLE_NAME, "?"), token)
    done = f"Swarm rolled '{opts.service}' back to {back}" if serving and state in ("rolled back", "completed") else \
        f"Swarm's rollback of '{opts.service}' to {back} did not finish ({state}; see `slmops fleet status`)"
    return FleetError(f"canary {bad.address} on node {bad.node} answered wrongly for {what}: {a['error']}; "
                      f"{done} in {time.monotonic() - start:.1f}s")


def canary(client: Any, existing: dict[str, Any], spec: dict[str, Any], opts: FleetOptions,
           say: Callable[[str], None], expected: dict[str, dict[str, dict[str, str]]] | None = None
           ) -> list[dict[str, Any]]:
    """Update ``opts.canary`` tasks first (a batch of K, then a long delay), send each a Generate per
    adapter, then let the rest follow one at a time. ``expected`` (node arch, or ANY_ARCH, -> adapter
    -> {"text", "sha256"}): each answer must equal it; a wrong answer raises CanaryFailed (the caller
    has Swarm roll back)."""
    staged = json.loads(json.dumps(spec))
    staged["UpdateConfig"] = {**spec["UpdateConfig"], "Parallelism": opts.canary, "Delay": 3600 * NS}
    update_service(client, existing, staged)
    image = spec["TaskTemplate"]["ContainerSpec"]["Image"]
    deadline = time.monotonic() + opts.timeout
    checked: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        table = nodes(client)
        svc = client.api.inspect_service(existing["ID"])
        state = (svc.get("UpdateStatus") or {}).get("State", "")
        if state.startswith("rollback") or state == "paused":
            return checked  # follow() reports it
        running = [t for t in tasks(client, existing["ID"]) if t["Status"]["State"] == "running"
                   and t.get("DesiredState") == "running" and _task_spec_image(t) == image]
        if len(running) >= opts.canary:
            token = _existing_token({"Spec": spec}) or ""
            for t in running[:opts.canary]:
                node = table[t["NodeID"]]
                address = f"{node['addr']}:{opts.port}"
                want = None if expected is None else expected.get(node["arch"], expected.get(ANY_ARCH))
                answers = generate_each(address, token, spec["Labels"][LABEL_ADAPTERS].split(","), want)
                checked.append({"node": node["hostname"], "arch": node["arch"], "address": address,
                                "compared": want is not None, "answers": answers})
                bad = [a for a in answers if not a["ok"]]
                if bad:
                    raise CanaryFailed(node["hostname"], address, bad[0])
                say(f"  canary {node['hostname']} ({address}): {len(answers)} Generate calls answered, one per "
                    "adapter" + (", each equal to what the bundle answers" if want is not None else ""))
            update_service(client, client.api.inspect_service(existing["ID"]), spec)
            return checked
        time.sleep(0.5)
    return checked


def generate_each(address: str, token: str, adapters: list[str],
                  expected: dict[str, dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """A Generate per adapter ("" = the base model first) on ``address``: the canary's raw prompt,
    greedy, CANARY_TOKENS. An answer is wrong when it is an error, names another adapter, or (with
    ``expected``: adapter -> {"text", "sha256"}) its adapter sha256 or its text differs."""
    from slmops_serve.client import SlmopsClient

    answers = []
    with SlmopsClient(address, token=token or None, timeout=30) as c:
        for adapter in ["", *sorted(a for a in adapters if a)]:
            row: dict[str, Any] = {"adapter": adapter, "ok": False, "error": ""}
            try:
                r = c.generate(CANARY_PROMPT, adapter=adapter, max_new_tokens=CANARY_TOKENS, temperature=0.0)
            except Exception as exc:  # grpc.RpcError
                row["error"] = _rpc_error(exc)
                answers.append(row)
                continue
            row.update(text=r.text, sha256=r.adapter_sha256)
            want = (expected or {}).get(adapter)
            if r.adapter != adapter:
                row["error"] = f"answered with adapter '{r.adapter}'"
            elif not r.usage.completion_tokens:
                row["error"] = "answered no token"
            elif expected is not None and want is None:
                row["error"] = "the bundle has no such adapter to compare with"
            elif want is not None and r.adapter_sha256 != want["sha256"]:
                row["error"] = (f"adapter sha256 expected {want['sha256'][:16]} (bundle.json), got "
                                f"{r.adapter_sha256[:16] or 'none'}; text expected {want['text']!r}, got {r.text!r}")
            elif want is not None and r.text != want["text"]:
                row["error"] = f"text expected {want['text']!r} (what the bundle answers), got {r.text!r}"
            row["ok"] = not row["error"]
            if want is not None:
                row["expected"] = want["text"]
            answers.append(row)
    return answers


def _rpc_error(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return f"{type(exc).__name__}: {exc}"


# ---- rollback, status ---------------------------------------------------------------------------
def rollback(manager: str, service: str, timeout: float = 300.0, out: TextIO | None = None) -> str:
    say = _sayer(out)
    host, client = connect_manager(manager)
    svc = _service(client, service, manager)
    previous = svc.get("PreviousSpec")
    if not previous:
        raise SlmopsUsageError("--service", f"'{service}' has no previous version to roll back to")
    start = time.monotonic()
    update_service(client, svc, svc["Spec"], rollback=True)
    image = previous["TaskTemplate"]["ContainerSpec"]["Image"].split("@")[0]
    failures: list[str] = []
    state, down = follow(client, svc["ID"], image, timeout, say, failures)
    if state not in ("completed", "rolled back"):
        raise FleetError(f"rollback of '{service}' to {image} did not finish ({state}): "
                         f"{failures[0] if failures else 'see `slmops fleet status`'}")
    if state == "rolled back":
        wait_running(client, svc["ID"], image, timeout, say)
    record(host, service, image, previous.get("Labels", {}).get(LABEL_BUNDLE_NAME, "?"), None)
    return f"'{service}' rolled back to {image} in {time.monotonic() - start:.1f}s" + \
           (f" (node(s) down: {', '.join(down)})" if down else "")


def replicas(client: Any, svc: dict[str, Any]) -> list[dict[str, Any]]:
    """Running tasks with their node and address (node address : published host port)."""
    table = nodes(client)
    port = int(svc["Spec"].get("Labels", {}).get(LABEL_PORT, CONTAINER_PORT))
    rows = []
    for t in tasks(client, svc["ID"]):
        if t.get("DesiredState") != "running":
            continue
        node = table.get(t.get("NodeID", ""), {})
        labels = t["Spec"]["ContainerSpec"].get("Labels", {})
        members = dict(m.split("=", 1) for m in labels.get(LABEL_MEMBERS, "").split(",") if "=" in m)
        rows.append({"task": t["ID"][:12], "node": node.get("hostname", "?"), "arch": node.get("arch", "?"),
                     "node_state": node.get("state", "?"), "state": t["Status"]["State"],
                     "address": f"{node.get('addr', '?')}:{port}", "image": _task_spec_image(t),
                     # a multi-arch service: the bundle of the node's architecture (its member of the list)
                     "bundle_sha256": members.get(node.get("arch", "?"), labels.get(LABEL_BUNDLE_SHA, "-"))[:12],
                     "error": t["Status"].get("Err", "")})
    return sorted(rows, key=lambda r: r["node"])


def status(manager: str, service: str | None) -> list[dict[str, Any]]:
    from slmops_serve.client import SlmopsClient

    host, client = connect_manager(manager)
    services = [_service(client, service, manager)] if service else \
        [client.api.inspect_service(s["ID"]) for s in client.api.services(filters={"label": LABEL_FLEET})]
    rows = []
    for svc in services:
        token = recorded_token(host, svc["Spec"]["Name"]) or _existing_token(svc)
        for row in replicas(client, svc):
            row = {"service": svc["Spec"]["Name"], **row, "health": "-", "adapters": "-"}
            if row["state"] == "running" and row["node_state"] == "ready":
                try:
                    with SlmopsClient(row["address"], token=token, timeout=5) as c:
                        row["health"] = c.health()
                        row["adapters"] = ",".join(sorted(a.name for a in c.list_adapters())) or "-"
                except Exception as exc:
                    row["health"] = _rpc_error(exc).split(":")[0]
            rows.append(row)
    return rows


# ---- adapters on every replica ------------------------------------------------------------------
@contextlib.contextmanager
def _clients(addresses: list[str], token: str | None, timeout: float) -> Iterator[list[Any]]:
    from slmops_serve.client import SlmopsClient

    clients = [SlmopsClient(a, token=token, timeout=timeout) for a in addresses]
    try:
        yield clients
    finally:
        for c in clients:
            c.close()


def adapters(manager: str, service: str, action: str, name: str, file: Path | None, timeout: float = 60.0,
             out: TextIO | None = None) -> list[dict[str, Any]]:
    """Load or unload ``name`` on every running replica of ``service``, all or nothing: when one
    replica refuses, those that had loaded it drop it again and FleetError says who refused."""
    say = _sayer(out)
    host, client = connect_manager(manager)
    svc = _service(client, service, manager)
    token = recorded_token(host, service) or _existing_token(svc)
    rows = [r for r in replicas(client, svc) if r["state"] == "running" and r["node_state"] == "ready"]
    if not rows:
        raise FleetError(f"'{service}' has no running replica to {action} '{name}' on")
    addresses = [r["address"] for r in rows]
    done: list[dict[str, Any]] = []
    with _clients(addresses, token, timeout) as clients:
        for row, c in zip(rows, clients, strict=True):
            try:
                if action == "load":
                    had = any(a.name == name for a in c.list_adapters())
                    r = c.upload_adapter(name, file) if file is not None else c.load_adapter(name, path=f"{name}.onnx_adapter")
                    sha = r.adapter.sha256
                else:
                    had = True
                    c.unload_adapter(name)
                    sha = ""
                done.append({"node": row["node"], "address": row["address"], "ok": True, "had": had, "sha256": sha})
                say(f"  {row['node']} ({row['address']}): {action}ed {name}")
            except Exception as exc:
                problem = _rpc_error(exc)
                say(f"  {row['node']} ({row['address']}): refused: {problem}")
                undone = []
                for prev, pc in zip(done, clients, strict=False):
                    with contextlib.suppress(Exception):
                        if action == "load" and not prev["had"]:
                            pc.unload_adapter(name)
                        elif action == "load":
                            pc.load_adapter(name, path=f"{name}.onnx_adapter")  # the bundle's copy back
                        else:
                            pc.load_adapter(name, path=f"{name}.onnx_adapter")
                        undone.append(prev["node"])
                raise FleetError(f"{action} of adapter '{name}' refused by {row['node']} ({row['address']}): {problem}; "
                                 f"undone on {', '.join(undone) or 'no other replica'} (all or nothing)") from exc
    return done
