"""`slmops fleet` on a real 3-node Docker Swarm (slmops_ops/fleet/lab.py: three dockerds in network
namespaces on this machine, a registry on the hub address; needs root and docker-registry).

    .venv/bin/python bench/bench_fleet.py --out bench/results/fleet_cpu.json [--bundle dist/bundles/cpu]

Measures, in one run on one swarm:
  1. v1 -> v2 (a new version of one adapter) on 3 nodes while a client sends a request every
     100 ms spread over the devices, retrying UNAVAILABLE on another: rollout seconds, failed
     requests (goal 0), retries, and each device's gap (longest time between two answers from it);
  2. a v3 whose server refuses its options: seconds from the failed task (Swarm's timestamp) to
     Swarm's rollback completed, and the command's total;
  3. bytes each worker node received (its link's counter) while rolling out a new bundle (a base
     model file changed: the model layer is new) against a new adapter only (v1 -> v2): an adapter
     change must not re-ship the base model.
The bundle defaults to dist/bundles/cpu (the default model), else the tests' tiny bundle is not
available here: pass --bundle. The serve image comes from the default engine (`docker save`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from readme_figures import REPO, beside_committed  # noqa: E402

PORT = 50071


def model_variant(src: Path, dest: Path) -> Path:
    """A copy of ``src`` with one base-model file changed (a harmless key in tokenizer_config.json):
    to the registry it is a new bundle whose model layer is new."""
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "bundle.json").read_text())
    rel = next(r for r in manifest["files"] if r.endswith("tokenizer_config.json"))
    config = json.loads((dest / rel).read_text())
    config["slmops_bench_variant"] = 1
    (dest / rel).write_text(json.dumps(config, indent=2))
    manifest["files"][rel] = hashlib.sha256((dest / rel).read_bytes()).hexdigest()
    (dest / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return dest


def _ts(value: str) -> float:
    """A Docker RFC 3339 timestamp (nanoseconds) -> epoch seconds."""
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def rollout(lab: Any, bundle: Path, service: str, serve_args: list[str], load: bool = False) -> dict[str, Any]:
    from slmops_ops.fleet.lab import Gateway
    from slmops_ops.fleet.swarm import FleetError, FleetOptions, deploy

    opts = FleetOptions(manager=lab.manager.socket, service=service, bundle=bundle, image=f"slmops-serve:{version()}",
                        registry=lab.registry, port=PORT, serve_args=serve_args, timeout=600)
    before = {n.name: n.rx_bytes(lab.hub) for n in lab.nodes}
    # one request in flight per device at most: the default model on this shared 2-core machine
    # answers fewer than 10 a second, and a queue would turn into deadline errors that say nothing
    # about the rollout
    gateway = Gateway([f"{n.address}:{PORT}" for n in lab.nodes], max_in_flight=len(lab.nodes)) if load else None
    thread = threading.Thread(target=gateway.run, args=(0.1,), daemon=True) if gateway else None
    if thread:
        thread.start()
        time.sleep(2)
    start = time.monotonic()
    out: dict[str, Any] = {}
    try:
        result = deploy(opts, out=sys.stderr)
        out.update(status=result.status, tasks=result.tasks, image=result.image, port_race_retries=result.retries)
    except FleetError as exc:
        out.update(status="failed", error=exc.message[:400])
    out["seconds"] = round(time.monotonic() - start, 1)
    if gateway and thread:
        time.sleep(2)
        out["load_seconds"] = round(time.monotonic() - start + 4, 1)
        gateway.stop()
        thread.join(30)
        gateway.close()
        out.update(requests=gateway.sent, answered=len(gateway.answers), failed=len(gateway.failed),
                   retried_on_another=gateway.retries,
                   gap_s={a.split(":")[0]: round(g, 2) for a, g in gateway.gaps.items()},
                   answers_by_adapter_sha={sha[:12]: sum(1 for *_, s in gateway.answers if s == sha)
                                           for sha in sorted({s for *_, s in gateway.answers})})
    out["rx_bytes"] = {n.name: n.rx_bytes(lab.hub) - before[n.name] for n in lab.nodes}
    return out


def version() -> str:
    return next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                if line.startswith("version"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "dist" / "bundles" / "cpu")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fleet_cpu.json"))
    args = parser.parse_args()

    import docker
    from slmops_ops.fleet.lab import SwarmLab, bundle_variant, missing

    why = missing()
    if why:
        sys.exit(f"bench_fleet: a multi-node swarm cannot run here: {why}")
    if not (args.bundle / "bundle.json").is_file():
        sys.exit(f"bench_fleet: no bundle at {args.bundle}; run `make bundle` or pass --bundle")
    out = beside_committed(args.out)
    os.environ.setdefault("SLMOPS_DEPLOY_STATE", str(Path(tempfile.mkdtemp(prefix="fleet-bench-")) / "state.json"))
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-bundles-"))
    lab = SwarmLab(Path(f"/tmp/slmops-fleet-bench-{os.getpid()}"), prefix=f"slb{os.getpid() % 10000}", subnet="10.79.0")
    report: dict[str, Any] = {"command": "bench/bench_fleet.py --out bench/results/fleet_cpu.json"
                              + (f" --bundle {args.bundle}" if args.bundle != REPO / "dist/bundles/cpu" else ""),
                              "client": "one request started every 100 ms, at most one in flight per node",
                              "run": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "nodes": 3, "bundle": str(args.bundle.relative_to(REPO) if args.bundle.is_relative_to(REPO)
                                                         else args.bundle.name)}
    try:
        start = time.monotonic()
        lab.start()
        local = docker.from_env(timeout=600)
        ref = f"slmops-serve:{version()}"
        for node in lab.nodes:  # the devices already run the serve image (what a fleet has before its first bundle)
            lab.load_image(local, ref, node)
        report["lab_up_s"] = round(time.monotonic() - start, 1)
        v1 = args.bundle
        v2 = bundle_variant(v1, work / "v2", 1.5)  # one adapter's new version
        v3 = model_variant(v2, work / "v3")  # a base-model file changed
        serve = ["--threads=1"]
        report["v1_create"] = rollout(lab, v1, "slm", serve)
        report["v1_to_v2_adapter_only"] = rollout(lab, v2, "slm", serve, load=True)
        report["v2_to_v3_new_model_layer"] = rollout(lab, v3, "slm", serve)
        failed_at = time.time()
        report["v4_cannot_start"] = rollout(lab, bundle_variant(v3, work / "v4", 2.0), "slm", [*serve, "--max-queue=-3"])
        svc = lab.manager.client.api.inspect_service("slm")
        fails = [t for t in lab.manager.client.api.tasks(filters={"service": "slm"})
                 if t["Status"]["State"] in ("failed", "rejected") and _ts(t["Status"]["Timestamp"]) >= failed_at]
        update = svc.get("UpdateStatus") or {}
        report["v4_cannot_start"]["swarm_state"] = update.get("State")
        if fails and update.get("CompletedAt"):
            first = min(_ts(t["Status"]["Timestamp"]) for t in fails)
            report["v4_cannot_start"]["failure_to_rolled_back_s"] = round(_ts(update["CompletedAt"]) - first, 1)
        workers = [n.name for n in lab.nodes[1:]]
        adapter = report["v1_to_v2_adapter_only"]["rx_bytes"]
        model = report["v2_to_v3_new_model_layer"]["rx_bytes"]
        report["bytes_per_worker"] = {"new_adapter_only": max(adapter[w] for w in workers),
                                      "new_model_layer": max(model[w] for w in workers),
                                      "bundle_bytes": sum(p.stat().st_size for p in v1.rglob("*") if p.is_file())}
        report["load_average_after"] = list(os.getloadavg())
    finally:
        lab.close()
        shutil.rmtree(work, ignore_errors=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)


def readme_block(report: dict[str, Any]) -> str:
    """The README's fleet figures, from a results JSON of this script."""
    up = report["v1_to_v2_adapter_only"]
    answered = up.get("answered", up["requests"] - up["failed"])  # one at a time: answered or failed
    load_s = up.get("load_seconds", up["seconds"] + 4)  # the client runs 2 s before and after the rollout
    fail = report["v4_cannot_start"]
    b = report["bytes_per_worker"]
    gaps = ", ".join(f"{g:.1f}" for g in up["gap_s"].values())
    mb = 1e6
    return "\n".join([
        f"`{report['command']}`: a real 3-node swarm on one 2-core machine (three dockerds in network namespaces, "
        f"a local registry), bundle `{report['bundle']}`, one task per node, updates one node at a time (stop-first).",
        "",
        "| measured | value |",
        "|---|---|",
        f"| v1 -> v2 (new adapter version) on 3 nodes | {up['seconds']:.1f} s |",
        f"| requests during it, spread over the nodes, UNAVAILABLE retried on another | {up['requests']} sent in "
        f"{load_s:.0f} s, {answered} answered, **{up['failed']} failed**, {up['retried_on_another']} retries |",
        f"| each node's gap (longest time without an answer from it) | {gaps} s |",
        f"| v4 that cannot start: failed task -> Swarm's rollback complete | "
        f"{fail.get('failure_to_rolled_back_s', '?')} s (command exit 1 after {fail['seconds']:.1f} s) |",
        f"| bytes a worker received for a new adapter only | {b['new_adapter_only'] / mb:.1f} MB |",
        f"| bytes a worker received for a new base-model layer | {b['new_model_layer'] / mb:.1f} MB "
        f"(bundle {b['bundle_bytes'] / mb:.1f} MB) |",
        "",
        f"The client: {report.get('client', 'one request started every 100 ms')}. "
        f"{report.get('run', '')}. A new adapter version re-ships the adapters layer (all of the bundle's "
        "adapters and bundle.json, gzip-compressed), never the base model.",
    ])


if __name__ == "__main__":
    main()
