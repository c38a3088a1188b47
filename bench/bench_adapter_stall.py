"""Does loading a large adapter stall the streams that are decoding? Written as JSON.

    .venv/bin/python bench/bench_adapter_stall.py dist/bundles/cpu --out bench/results/adapter_stall_cpu.json

In one process, as the server runs it: the engine's scheduler thread decodes ``--streams`` long
streams (end-of-sequence suppressed, base model) while an admin thread does the work of
LoadAdapter / UnloadAdapter RPCs on a large synthetic adapter (all modules, ``--rank``):

  idle      no admin work (the reference)
  load      load the big adapter from --adapter-dir, then unload it, again and again
  upload    the same from bytes (LoadAdapter data)
  free      a short stream on a replaced adapter version ends (the scheduler frees that version)
            while the big load runs: the scheduler's free used to wait for the load's lock
  swaps     the same short streams and replacements without the big load (free's control: the
            short streams' prefill and LoRA steps lengthen the base streams' steps by themselves)
  grpc      a client PROCESS uploads the big adapter over gRPC (LoadAdapter data) and unloads it,
            again and again: the server also receives and parses the 175 MB message
  grpc_stream  the same through UploadAdapter (the client's upload_adapter: 4 MiB pieces)

Every gap between two decode steps is timed inside the scheduler (the engine's ``token_hook``),
so a stall is measured where it happens, not behind the client's thread. Scenarios are
interleaved ``--reps`` times in one run; the JSON records the load average (a shared machine
swings: compare the scenarios of one run, not runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "serve")]

from bench.bench_serve import pct, versions  # noqa: E402
from bench.synthetic import synthetic_adapter  # noqa: E402

ADMIN_TOKEN = "bench-admin-token"
PROMPT = "Write a long, detailed story about a small robot who learns to paint."


KINDS = ("idle", "load", "upload", "free", "swaps", "grpc", "grpc_stream")


class StepClock:
    """The engine's token hook: the time of every decode step of the base streams."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.recording = False

    def hook(self, gen: Any, produced: int) -> None:
        if self.recording and gen.adapter is None:
            now = time.perf_counter()
            # one entry per step: the first base row's call of that step
            if not self.times or now - self.times[-1] > 1e-4:
                self.times.append(now)

    def gaps_ms(self) -> list[float]:
        return [(b - a) * 1000 for a, b in zip(self.times, self.times[1:], strict=False)]


def run_streams(engine: Any, streams: int, tokens: int) -> list[Any]:
    from slmops_serve.engine import GenerationRequest

    return [engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=tokens, min_new_tokens=tokens))
            for _ in range(streams)]


GRPC_CLIENT = """
import os, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/serve"]
from slmops_serve.client import SlmopsClient
data = open(sys.argv[3], "rb").read()
n = 0
with SlmopsClient(sys.argv[2], token=sys.argv[5], timeout=300) as client:
    while not os.path.exists(sys.argv[4]):
        if sys.argv[6] == "grpc":
            client.load_adapter("big", data=data)  # one LoadAdapter(data) message
        else:
            client.upload_adapter("big", sys.argv[3])  # UploadAdapter: 4 MiB pieces
        client.unload_adapter("big")
        n += 1
print(n)
"""


def grpc_uploads(server: Any, big: Path, stop: threading.Event, loads: list[float], kind: str) -> None:
    """Upload+unload ``big`` from a client process until ``stop``; ``loads`` gets one entry per upload."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        flag = Path(tmp) / "stop"
        proc = subprocess.Popen([sys.executable, "-c", GRPC_CLIENT, str(REPO), server.address, str(big), str(flag),
                                 ADMIN_TOKEN, kind], stdout=subprocess.PIPE, text=True)
        started = time.perf_counter()
        stop.wait()
        flag.touch()
        out, _ = proc.communicate(timeout=300)
        count = int(out.strip() or 0)
        loads.extend([(time.perf_counter() - started) / max(count, 1)] * count)


def scenario(server: Any, clock: StepClock, kind: str, big: Path, swap: list[Path], streams: int, tokens: int) -> dict[str, Any]:
    from slmops_serve.engine import GenerationRequest

    engine = server.engine
    registry = engine.registry
    data = big.read_bytes() if kind == "upload" else None
    loads: list[float] = []
    stop = threading.Event()

    def admin() -> None:
        if kind in ("grpc", "grpc_stream"):
            grpc_uploads(server, big, stop, loads, kind)
            return
        i = 0
        while not stop.is_set():
            if kind in ("free", "swaps"):
                # a short request holds the current 'swap' version; replacing it retires that
                # version, and the request ends (the scheduler frees it) while 'big' loads
                registry.load("swap", path=str(swap[i % 2]))
                short = engine.submit(GenerationRequest(prompt=PROMPT, adapter="swap", max_new_tokens=4, min_new_tokens=4))
                registry.load("swap", path=str(swap[(i + 1) % 2]))
                i += 1
                if kind == "swaps":
                    short.result()
                    registry.unload("swap", timeout=5)
                    continue
                started = time.perf_counter()
                registry.load("big", path=str(big))
                loads.append(time.perf_counter() - started)
                short.result()
            else:
                started = time.perf_counter()
                if data is not None:
                    registry.load("big", data=data, source="upload")
                else:
                    registry.load("big", path=str(big))
                loads.append(time.perf_counter() - started)
            registry.unload("big", timeout=5)
            if kind == "free":
                registry.unload("swap", timeout=5)

    clock.times.clear()
    gens = run_streams(engine, streams, tokens)
    # record from the second step: the first steps include the streams' prefill
    while engine.running < streams:
        time.sleep(0.001)
    time.sleep(0.05)
    clock.recording = True
    worker = None
    if kind != "idle":
        worker = threading.Thread(target=admin, name="admin")
        worker.start()
    for gen in gens:
        gen.result()
    clock.recording = False
    stop.set()
    if worker is not None:
        worker.join()
    gaps = clock.gaps_ms()[:-1]  # the last gap may span a row leaving the batch
    return {"scenario": kind, "steps": len(gaps), "gap_p50_ms": round(pct(gaps, 50), 2),
            "gap_p99_ms": round(pct(gaps, 99), 2), "gap_max_ms": round(max(gaps), 2) if gaps else None,
            "loads": len(loads), "load_s_median": round(sorted(loads)[len(loads) // 2], 3) if loads else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rank", type=int, default=96, help="rank of the big synthetic adapter (all modules)")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream in each scenario")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--label", default="", help="a label stored in the JSON (e.g. the code version measured)")
    args = parser.parse_args(argv)
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)

    from slmops_serve.config import ServeConfig
    from slmops_serve.server import SlmopsServer

    from slmops.bundle import read_manifest

    manifest = read_manifest(args.bundle)
    template = manifest.lora_template
    with tempfile.TemporaryDirectory(prefix="slmops-stall-") as tmp:
        workdir = Path(tmp)
        big = synthetic_adapter(template, list(template.modules), args.rank, workdir / "big.onnx_adapter", seed=1)
        swap = [synthetic_adapter(template, ["q_proj", "v_proj"], 4, workdir / f"swap{i}.onnx_adapter", seed=10 + i)
                for i in range(2)]
        config = ServeConfig(bundle_dir=str(args.bundle), adapter_dir=str(workdir), threads=args.threads,
                             max_batch=args.streams + 1, host="127.0.0.1", port=0, metrics_port=None,
                             verify_bundle=False, admin_token=ADMIN_TOKEN, max_upload_bytes=big.stat().st_size + 1,
                             max_new_tokens_limit=4096)
        server = SlmopsServer(config)
        server.start()
        server.load()
        clock = StepClock()
        server.engine.token_hook = clock.hook
        runs: list[dict[str, Any]] = []
        try:
            for rep in range(args.reps):
                for kind in args.kinds:
                    result = scenario(server, clock, kind, big, swap, args.streams, args.tokens)
                    result["rep"] = rep
                    runs.append(result)
                    print(json.dumps(result), flush=True)
        finally:
            server.stop(grace=5)
        summary: dict[str, Any] = {}
        for kind in args.kinds:
            mine = [r for r in runs if r["scenario"] == kind]
            summary[kind] = {
                "gap_max_ms": max(r["gap_max_ms"] for r in mine),
                "gap_p99_ms_median": sorted(r["gap_p99_ms"] for r in mine)[len(mine) // 2],
                "gap_p50_ms_median": sorted(r["gap_p50_ms"] for r in mine)[len(mine) // 2],
                "load_s_median": sorted(r["load_s_median"] or 0 for r in mine)[len(mine) // 2],
            }
        report = {
            "label": args.label, "bundle": str(args.bundle), "big_adapter": {"rank": args.rank, "modules": template.modules,
                                                                            "bytes": big.stat().st_size, "synthetic": True},
            "streams": args.streams, "tokens": args.tokens, "threads": args.threads, "reps": args.reps,
            "loadavg_start": os.getloadavg(), "versions": versions(("onnxruntime", "numpy")),
            "summary": summary, "runs": runs,
        }
    print(json.dumps(summary, indent=1))
    if args.out:
        from readme_figures import committed_of

        base = args.out if args.out.exists() else committed_of(args.out)  # adds to the committed runs
        existing = json.loads(base.read_text()) if base.exists() else {}
        existing[args.label or "run"] = report
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(existing, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
