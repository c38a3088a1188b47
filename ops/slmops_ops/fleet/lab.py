"""A real multi-node Docker Swarm on one Linux machine, for the fleet tests and benchmark.

Each node is its own ``dockerd`` (own ``--data-root``, ``--exec-root``, ``--pidfile``, unix socket,
bridge, host name) in its own network namespace. The namespaces hang off a bridge that lives in a
"hub" namespace of its own, so no packet between nodes crosses this machine's firewall (the host's
FORWARD chain, which Docker sets to DROP, never sees them). This machine reaches the hub through
one veth (``SUBNET.1``), which is also where a plain-HTTP registry (Debian's ``docker-registry``)
listens for the nodes (listed in each node's ``insecure-registries``). Nodes are ``SUBNET.10+i``.
Node 0 is the manager; swarm heartbeats are 1 s so a lost node is noticed in seconds.

Everything is undone by :meth:`SwarmLab.close` (processes killed by their PID, namespaces, links and
folders removed), also after a failed start. Needs root, ``ip``, ``nsenter``, ``unshare``, ``dockerd``
and ``docker-registry``; :func:`missing` says what is absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOOLS = ("ip", "nsenter", "unshare", "dockerd", "docker-registry")


def missing() -> str | None:
    """Why a lab cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, dockerd)"
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return f"missing {', '.join(absent)} (apt-get install iproute2 util-linux docker.io docker-registry)"
    try:
        import docker  # noqa: F401
    except ModuleNotFoundError:
        return "the docker SDK is not installed (pip install 'slmops[deploy]')"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()[:400]}")
    return proc


@dataclass
class Node:
    index: int
    name: str  # host name, also the swarm node's hostname
    netns: str
    veth: str  # the hub-side end of its link
    address: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    client: Any = None
    orphans: list[int] = field(default_factory=list)  # container PIDs left by a killed dockerd

    @property
    def socket(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def rx_bytes(self, hub: str) -> int:
        """Bytes this node received over its link so far (the hub end's transmit counter)."""
        out = _run("ip", "netns", "exec", hub, "cat", f"/sys/class/net/{self.veth}/statistics/tx_bytes").stdout
        return int(out.strip())


@dataclass
class SwarmLab:
    root: Path
    nodes_n: int = 3
    prefix: str = "slmf"
    subnet: str = "10.77.0"
    nodes: list[Node] = field(default_factory=list)
    registry: str = ""
    registry_proc: subprocess.Popen[bytes] | None = None
    log: list[str] = field(default_factory=list)
    tmpfs_size: str | None = "6g"  # None: on the root's own file system

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.1"

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    def _say(self, text: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {text}")

    # ---- bring up --------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> SwarmLab:
        try:
            self._network()
            self._registry()
            for node in self.nodes:
                self._dockerd(node)
            for node in self.nodes:
                node.client = self._wait_engine(node, timeout)
            self._swarm(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _network(self) -> None:
        self.close_network()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tmpfs_size:  # in memory: image loads are faster and teardown is one umount
            _run("mount", "-t", "tmpfs", "-o", f"size={self.tmpfs_size},mode=0755", f"{self.prefix}-lab", str(self.root))
        hub, br = self.hub, f"{self.prefix}br"
        _run("ip", "netns", "add", hub)
        _run("ip", "-n", hub, "link", "add", br, "type", "bridge")
        _run("ip", "-n", hub, "link", "set", br, "up")
        _run("ip", "-n", hub, "link", "set", "lo", "up")
        # this machine's way in: SUBNET.1 on a veth whose other end is a port of the hub's bridge
        _run("ip", "link", "add", f"{self.prefix}h", "type", "veth", "peer", "name", "hostp", "netns", hub)
        _run("ip", "addr", "add", f"{self.host_address}/24", "dev", f"{self.prefix}h")
        _run("ip", "link", "set", f"{self.prefix}h", "up")
        _run("ip", "-n", hub, "link", "set", "hostp", "master", br, "up")
        for i in range(self.nodes_n):
            ns, veth = f"{self.prefix}-n{i}", f"n{i}"
            node = Node(i, f"node-{i}", ns, veth, f"{self.subnet}.{10 + i}", self.root / f"node-{i}")
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "-n", hub, "link", "set", veth, "master", br, "up")
            _run("ip", "-n", ns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", self.host_address)
            self.nodes.append(node)
        self._say(f"network: hub {hub}, this machine {self.host_address}, nodes "
                  + ", ".join(n.address for n in self.nodes))

    def _registry(self) -> None:
        with socket.socket() as s:
            s.bind((self.host_address, 0))
            port = s.getsockname()[1]
        self.registry = f"{self.host_address}:{port}"
        root = self.root / "registry"
        (root / "data").mkdir(parents=True, exist_ok=True)
        config = root / "config.yml"
        config.write_text("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                          f"    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
                          f"http:\n  addr: {self.registry}\n")
        log = open(root / "log", "wb")  # noqa: SIM115 - the process owns it
        self.registry_proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log,
                                              start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.host_address, port), timeout=1):
                self._say(f"registry {self.registry} (pid {self.registry_proc.pid})")
                return
            if self.registry_proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"docker-registry did not listen on {self.registry}: {(root / 'log').read_text()[-800:]}")

    def _dockerd(self, node: Node) -> None:
        node.root.mkdir(parents=True, exist_ok=True)
        config = node.root / "daemon.json"
        config.write_text(json.dumps({"insecure-registries": [self.registry], "log-level": "warn",
                                      "bip": "172.31.250.1/24", "default-address-pools": [
                                          {"base": "172.30.0.0/16", "size": 24}]}))
        cmd = (f"hostname {node.name} && exec dockerd --config-file {config} --data-root {node.root}/data "
               f"--exec-root {node.root}/exec --pidfile {node.root}/dockerd.pid -H {node.socket}")
        log = open(node.root / "dockerd.log", "wb")  # noqa: SIM115
        # nsenter --net (not `ip netns exec`, which remounts /sys and hides the cgroup mounts dockerd needs)
        node.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "sh", "-c", cmd],
                                     stdout=log, stderr=log, start_new_session=True)

    def _wait_engine(self, node: Node, timeout: float) -> Any:
        import docker

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"dockerd of {node.name} exited: "
                                   f"{(node.root / 'dockerd.log').read_text(errors='replace')[-800:]}")
            with contextlib.suppress(Exception):
                client = docker.DockerClient(base_url=node.socket, timeout=120)
                client.ping()
                self._say(f"{node.name}: dockerd pid {node.proc.pid if node.proc else '?'} at {node.socket}")
                return client
            time.sleep(0.3)
        raise RuntimeError(f"dockerd of {node.name} did not answer in {timeout:.0f}s")

    def _swarm(self, timeout: float) -> None:
        m = self.manager.client
        m.swarm.init(advertise_addr=self.manager.address, listen_addr=f"{self.manager.address}:2377",
                     dispatcher_heartbeat_period=1_000_000_000, task_history_retention_limit=3)
        token = m.swarm.attrs["JoinTokens"]["Worker"]
        for node in self.nodes[1:]:
            node.client.swarm.join(remote_addrs=[f"{self.manager.address}:2377"], join_token=token,
                                   advertise_addr=node.address, listen_addr=f"{node.address}:2377")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [n for n in m.nodes.list() if n.attrs["Status"]["State"] == "ready"]
            if len(ready) == len(self.nodes):
                self._say(f"swarm: {len(ready)} nodes ready, manager {self.manager.name}")
                return
            time.sleep(0.5)
        raise RuntimeError("the swarm's nodes did not all become ready")

    # ---- during a test ---------------------------------------------------------------------------
    def load_image(self, source: Any, ref: str, node: Node | None = None) -> None:
        """``docker save ref`` from ``source`` (e.g. the default engine) into ``docker load`` on a node."""
        target = (node or self.manager).client
        target.images.load(source.images.get(ref).save(chunk_size=2 << 20, named=ref))

    def stop_node(self, node: Node, timeout: float = 30.0) -> None:
        """Lose a node as a device that loses power: its link goes down and its dockerd is killed
        (SIGKILL); the containers it ran are ended by :meth:`close`."""
        with contextlib.suppress(Exception):
            node.orphans = [int(c.attrs["State"]["Pid"]) for c in node.client.containers.list()]
        _run("ip", "-n", self.hub, "link", "set", node.veth, "down", check=False)
        if node.proc is not None and node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout)
        self._say(f"{node.name}: link down, dockerd killed")

    # ---- tear down -------------------------------------------------------------------------------
    def close(self) -> None:
        for node in reversed(self.nodes):
            self._stop_dockerd(node)
        if self.registry_proc is not None and self.registry_proc.poll() is None:
            self.registry_proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.registry_proc.wait(10)
            if self.registry_proc.poll() is None:
                self.registry_proc.kill()
        self.close_network()
        self._unmount(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        self.nodes = []

    def _stop_dockerd(self, node: Node) -> None:
        if node.proc is None:
            return
        if node.proc.poll() is None and node.client is not None:
            for c in node.client.containers.list():  # no 40 s drain per task at teardown
                with contextlib.suppress(Exception):
                    c.kill()
        for pid in node.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.proc.pid, signal.SIGTERM)
            try:
                node.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(10)
        # containerd and the task shims it started live in the same session: end what is left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        for pid in _pids_under(node.root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _unmount(root: Path) -> None:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1] == str(root) or line.split()[1].startswith(f"{root}/")]
        for mount in sorted(mounts, key=len, reverse=True):
            _run("umount", "-l", mount, check=False)

    def close_network(self) -> None:
        for i in range(self.nodes_n):
            _run("ip", "netns", "del", f"{self.prefix}-n{i}", check=False)
        _run("ip", "netns", "del", self.hub, check=False)
        _run("ip", "link", "del", f"{self.prefix}h", check=False)


def _pids_under(root: Path) -> list[int]:
    """PIDs whose command line names a path under ``root`` (containerd, shims of this lab's nodes)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if str(root).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return [p for p in found if p != os.getpid()]


def bundle_variant(src: Path, dest: Path, scale: float, adapter: str = "tone") -> Path:
    """A copy of bundle ``src`` whose ``adapter`` has its LoRA weights multiplied by ``scale`` (a new
    version of one adapter, same base model), with bundle.json's hashes updated to match."""
    import hashlib

    import numpy as np
    import onnxruntime as ort

    shutil.copytree(src, dest)
    manifest = json.loads((dest / "bundle.json").read_text())
    rel = manifest["adapters"][adapter]["file"]
    fmt = ort.AdapterFormat.read_adapter(str(dest / rel))
    params = {name: ort.OrtValue.ortvalue_from_numpy((value.numpy() * np.float32(scale)).astype(value.numpy().dtype))
              for name, value in fmt.get_parameters().items()}
    out = ort.AdapterFormat()
    out.set_adapter_version(fmt.get_adapter_version())
    out.set_model_version(fmt.get_model_version())
    out.set_parameters(params)
    out.export_adapter(str(dest / rel))
    sha = hashlib.sha256((dest / rel).read_bytes()).hexdigest()
    manifest["adapters"][adapter]["sha256"] = manifest["files"][rel] = sha
    (dest / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return dest


class Gateway:
    """A client side that spreads requests over the devices (round robin) and retries UNAVAILABLE
    (or a refused connection, or a deadline) on the next device: what a fleet's callers do while a
    device updates stop-first. A request starts every ``every`` seconds whether or not the earlier
    ones finished (each in its own thread). Records every answer's device and adapter sha256,
    failed requests and each device's longest gap between two answers."""

    def __init__(self, addresses: list[str], adapter: str = "tone", timeout: float = 5.0,
                 max_in_flight: int | None = None) -> None:
        from slmops_serve.client import SlmopsClient

        self.addresses = addresses
        self.adapter = adapter
        self.clients = {a: SlmopsClient(a, timeout=timeout) for a in addresses}
        self.answers: list[tuple[float, str, str]] = []  # (time, address, adapter sha256)
        self.failed: list[str] = []
        self.sent = 0
        self.retries = 0
        self.last_ok: dict[str, float] = {}
        self.gaps: dict[str, float] = {a: 0.0 for a in addresses}
        self.down_since: dict[str, float] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = False
        # at most this many requests at once: a tick that finds them all busy waits (the rate falls
        # to what the fleet answers; `sent` over the time says what it was)
        self._slots = threading.BoundedSemaphore(max_in_flight) if max_in_flight else None

    def _one(self, first: int) -> None:
        try:
            self.one(first)
        finally:
            if self._slots is not None:
                self._slots.release()

    def one(self, first: int) -> None:
        import grpc

        for attempt in range(len(self.addresses)):
            address = self.addresses[(first + attempt) % len(self.addresses)]
            try:
                r = self.clients[address].generate("Tone of: I lost my keys again\n", adapter=self.adapter,
                                                   max_new_tokens=2)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):  # type: ignore[attr-defined]
                    with self._lock:
                        self.retries += 1
                        self.down_since.setdefault(address, self.last_ok.get(address, time.monotonic()))
                    continue
                with self._lock:
                    self.failed.append(f"{address}: {exc.code().name} {exc.details()}")  # type: ignore[attr-defined]
                return
            now = time.monotonic()
            with self._lock:
                if address in self.down_since:
                    self.gaps[address] = max(self.gaps[address], now - self.down_since.pop(address))
                self.last_ok[address] = now
                self.answers.append((now, address, r.adapter_sha256))
            return
        with self._lock:
            self.failed.append("every device answered UNAVAILABLE")

    def run(self, every: float = 0.1) -> None:
        """Start a request every ``every`` seconds until :meth:`stop` (run this in a thread)."""
        next_at = time.monotonic()
        while not self._stop:
            if self._slots is not None:
                self._slots.acquire()
            t = threading.Thread(target=self._one, args=(self.sent,), daemon=True)
            t.start()
            self._threads.append(t)
            self.sent += 1
            next_at += every
            time.sleep(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        """Stop sending and wait for the requests in flight."""
        self._stop = True
        for t in self._threads:
            t.join(60)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
