"""Soak run: many adapters under a memory budget, mixed traffic, for a long time. JSON.

    .venv/bin/python bench/bench_soak.py BUNDLE --out bench/results/soak_<tag>.json            # 30 min
    .venv/bin/python bench/bench_soak.py BUNDLE --out /tmp/soak.json --minutes 4 --window-s 60  # short

A real ``slmops serve`` process (gRPC, metrics) over ``--adapters`` (200) synthetic adapters in its
``--adapter-dir`` with ``--adapter-memory`` (256 MB): none is loaded at start, each is loaded lazily
by the first request that names it and evicted (LRU) when the budget needs room. Client threads send
streaming requests whose adapter is drawn from a skewed distribution (a hot few, a long tail) and
cancel some of them after the first chunk; an admin thread uploads new adapters and unloads them,
and unloads adapters of the directory (the next request loads them again).

Recorded: requests lost (an error the client did not cause; goal 0), refusals by status, the
server's RSS every ``--sample-s`` (goal: flat after warm-up, under the budget plus the base), the
held adapter bytes and evictions from /metrics, TTFT p50/p99 per ``--window-s`` window. The machine
and the load average are recorded: on a shared machine the latencies carry the neighbours' load.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "serve")]

from bench.synthetic import synthetic_adapter  # noqa: E402

ADMIN_TOKEN = "soak-admin-token"
MODULES = [["q_proj", "v_proj"], ["o_proj", "down_proj"], ["gate_proj", "up_proj"],
           ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]
PROMPTS = ["Tone of: I lost my keys again\n", "Extract: a table for two in Paris on Friday\n",
           "Tone of: we won the cup!\n", "Hello there, how are", "Once upon a time"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def smaps_rollup(pid: int) -> dict[str, float]:
    """MB of a process's resident memory by kind (Linux /proc/PID/smaps_rollup): anonymous (heap,
    arenas, numpy and onnxruntime buffers) vs file-backed (the mapped model and libraries)."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Anonymous", "Shared_Clean", "Private_Clean", "Private_Dirty"):
                    out[key.lower()] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))], 2)


def scrape(port: int) -> dict[str, float]:
    wanted = ("slmops_adapter_memory_bytes", "slmops_adapter_evictions_total", "slmops_adapter_lazy_loads_total",
              "slmops_kv_cache_bytes", "slmops_adapters_loaded", "slmops_lora_feeds_cache_bytes")
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                name, _, value = line.partition(" ")
                if name.partition("{")[0] in wanted:  # labelled series keep their labels: x{cache="bank"}
                    out[name] = float(value)
    except OSError:
        pass
    return out


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.cancelled = 0
        self.lost: list[str] = []
        self.refused: dict[str, int] = {}
        self.ttft: list[tuple[float, float]] = []  # (time since start, ttft ms)
        self.uploads = 0
        self.unloads = 0
        self.admin_errors: list[str] = []


def client_loop(address: str, names: list[str], weights: list[float], tally: Tally, stop: threading.Event, t0: float,
                seed: int, cancel_share: float) -> None:
    import grpc
    from slmops_serve.client import SlmopsClient

    rng = random.Random(seed)
    with SlmopsClient(address, timeout=120) as client:
        while not stop.is_set():
            adapter = rng.choices(names, weights)[0]
            cancel = rng.random() < cancel_share
            started = time.perf_counter()
            stream = client.generate_stream(rng.choice(PROMPTS), adapter=adapter, max_new_tokens=rng.randint(8, 48))
            first = None
            try:
                for _chunk in stream:
                    if first is None:
                        first = time.perf_counter()
                        with tally.lock:
                            tally.ttft.append((first - t0, (first - started) * 1000))
                        if cancel:
                            stream.cancel()  # type: ignore[attr-defined]
                            break
                with tally.lock:
                    if cancel:
                        tally.cancelled += 1
                    else:
                        tally.ok += 1
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                with tally.lock:
                    if code == grpc.StatusCode.CANCELLED and cancel:
                        tally.cancelled += 1
                    elif code in (grpc.StatusCode.RESOURCE_EXHAUSTED,):
                        tally.refused[code.name] = tally.refused.get(code.name, 0) + 1
                    else:
                        tally.lost.append(f"{adapter}: {code.name}: {exc.details()}")  # type: ignore[attr-defined]


def admin_loop(address: str, dir_names: list[str], upload_files: list[Path], tally: Tally, stop: threading.Event,
               period_s: float, seed: int) -> None:
    import grpc
    from slmops_serve.client import SlmopsClient

    rng = random.Random(seed)
    uploaded: list[str] = []
    i = 0
    with SlmopsClient(address, token=ADMIN_TOKEN, timeout=120) as client:
        while not stop.wait(period_s):
            try:
                name = f"up{i:04d}"
                client.upload_adapter(name, upload_files[i % len(upload_files)])
                uploaded.append(name)
                tally.uploads += 1
                if len(uploaded) > 3:
                    client.unload_adapter(uploaded.pop(0))
                    tally.unloads += 1
                loaded = {a.name for a in client.list_adapters()}
                victims = [n for n in dir_names if n in loaded]
                if victims:
                    client.unload_adapter(rng.choice(victims))
                    tally.unloads += 1
            except grpc.RpcError as exc:
                tally.admin_errors.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
            i += 1


def readme_block(data: dict[str, Any]) -> str:
    """The README's ``figures:soak`` block (bench/readme_figures.py)."""
    rss, req, admin = data["rss_mb"], data["requests"], data["admin"]
    bound = rss["bound_budget_plus_base"]
    over = rss["after_warmup_max"] - bound
    short = " (a SHORT run)" if data.get("short_run") else ""
    lines = [
        f"{data['minutes']:g} minutes{short}: {data['adapters']} adapters ({data['adapter_files_mb']:g} MB of files) in "
        f"`--adapter-dir`, `--adapter-memory {data['adapter_memory_mb']:g}`, {data['clients']} streaming clients "
        f"({data['cancel_share']:.0%} cancelled after their first token), an admin uploading and unloading every few "
        f"seconds: **{req['lost']} requests lost**, {req['ok']} completed, {req['cancelled_by_client']} cancelled by "
        f"their client, refused {req['refused'] or 'none'}; {admin['uploads']} uploads, {admin['unloads']} unloads, "
        f"{len(admin['errors'])} admin errors; server died: {'yes' if data['server_died'] else 'no'}.",
        "",
        f"Server RSS: {rss['base_after_start']:g} MB after start, {rss['after_warmup_min']:g}-{rss['after_warmup_max']:g} MB "
        f"after warm-up, goal budget + base = {bound:g} MB: "
        + (f"met ({-over:.0f} MB under)." if over <= 0 else f"**missed by {over:.0f} MB** (see below)."),
        "",
        "| window | requests | TTFT p50 | TTFT p99 | RSS max |",
        "|---|---|---|---|---|",
    ]
    for w in data["windows"]:
        lines.append(f"| {w['from_s'] / 60:.0f}-{w['to_s'] / 60:.0f} min | {w['requests']} | {w['ttft_p50_ms']} ms | "
                     f"{w['ttft_p99_ms']} ms | {w['rss_mb_max']} MB |")
    warm = [x for x in data["samples"] if x["t_s"] >= min(data["minutes"] * 20, 300) and x.get("smaps_mb")]
    if warm and over > 0:  # where the RSS above the budget went: the largest sample after warm-up
        top = max(warm, key=lambda x: x["rss_mb"])
        first = data["samples"][0]
        anon, bank = top["smaps_mb"].get("anonymous", 0.0), top.get("feeds_mb", {}).get("bank", 0.0)
        other = anon - top["adapter_mb"] - bank - top["kv_mb"]
        other0 = (first["smaps_mb"].get("anonymous", 0.0) - first["adapter_mb"] - first.get("feeds_mb", {}).get("bank", 0.0)
                  - first["kv_mb"])
        lines += ["", f"Where it went (the largest sample, {top['t_s'] / 60:.0f} min, from /proc/PID/smaps_rollup and "
                  f"/metrics): RSS {top['rss_mb']:g} MB = {top['rss_mb'] - anon:.0f} MB file-backed + {anon:g} MB anonymous: "
                  f"adapters {top['adapter_mb']:g} MB + mix concatenations {bank:g} MB (together within the "
                  f"{data['adapter_memory_mb']:g} MB budget) + KV cache {top['kv_mb']:g} MB + {other:.0f} MB else "
                  f"(model weights, Python, onnxruntime's arena, the allocator's free-but-kept pages), which was "
                  f"{other0:.0f} MB in the first sample: that growth of {other - other0:.0f} MB is the miss."]
    if data.get("note"):
        lines += ["", f"Run: {data['note']}."]
    lines += ["", f"TTFT is measured on a shared 2-core machine under other work (load average "
              f"{min(s['load_avg_1m'] for s in data['samples']):.1f}-{max(s['load_avg_1m'] for s in data['samples']):.1f}); "
              "`bench/bench_soak.py`, `bench/results/soak_cpu.json`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, nargs="?")
    parser.add_argument("--make-bundle", type=Path, default=None, help="build a random-init small bundle here first "
                        "(bench_adapter_mix.py's SMALL_LLAMA)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (a new file)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--window-s", type=float, default=300.0, help="TTFT percentiles per window of this many seconds")
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS sample period")
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--adapter-memory", type=float, default=256.0, help="MB")
    parser.add_argument("--rank", type=int, default=16, help="largest rank of the synthetic adapters")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--cancel-share", type=float, default=0.1)
    parser.add_argument("--admin-period-s", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    from readme_figures import beside_committed  # never over a committed results file

    args.out = beside_committed(args.out)
    if args.out.exists():
        parser.error(f"--out {args.out} exists; write a new file")
    if args.make_bundle is not None:
        from bench.bench_adapter_mix import make_small_bundle

        args.bundle = make_small_bundle(args.make_bundle)
    if args.bundle is None:
        parser.error("give BUNDLE or --make-bundle DIR")
    import psutil

    from slmops.bundle import read_manifest

    template = read_manifest(args.bundle).lora_template
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    atexit.register(shutil.rmtree, work, True)  # the synthetic adapters (hundreds of MB) go with the run
    adapter_dir = work / "adapters"
    adapter_dir.mkdir()
    names = [f"s{i:03d}" for i in range(args.adapters)]
    for i, name in enumerate(names):  # ranks and module sets vary, like real adapters
        rank = max(2, args.rank >> (i % 3))
        synthetic_adapter(template, MODULES[i % len(MODULES)], rank, adapter_dir / f"{name}.onnx_adapter", seed=i)
    uploads = [synthetic_adapter(template, MODULES[i % len(MODULES)], args.rank, work / f"upload{i}.onnx_adapter",
                                 seed=10_000 + i) for i in range(4)]
    files_mb = sum(p.stat().st_size for p in adapter_dir.iterdir()) / (1 << 20)
    # skewed traffic: a hot 10% gets half the requests, the tail shares the rest
    hot = max(1, args.adapters // 10)
    weights = [5.0 / hot if i < hot else 5.0 / (args.adapters - hot) for i in range(args.adapters)]
    port, metrics_port = free_port(), free_port()
    command = [str(Path(sys.executable).parent / "slmops"), "serve", str(args.bundle), "--host", "127.0.0.1",
               "--port", str(port), "--metrics-port", str(metrics_port), "--adapter-dir", str(adapter_dir),
               "--adapter-memory", str(args.adapter_memory), "--max-batch", str(args.max_batch), "--max-queue", "64",
               "--admin-token", ADMIN_TOKEN, "--no-verify-bundle", "--max-new-tokens-limit", "512",
               "--log-level", "WARNING"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    with open(work / "server.log", "wb") as log_file:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
    address = f"127.0.0.1:{port}"
    tally = Tally()
    samples: list[dict[str, Any]] = []
    try:
        from slmops_serve.client import SlmopsClient

        deadline = time.time() + 300
        while True:
            try:
                with SlmopsClient(address, timeout=5) as probe:
                    if probe.health() == "SERVING":
                        break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        process = psutil.Process(server.pid)
        base_rss = process.memory_info().rss
        stop = threading.Event()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(address, names, weights, tally, stop, t0, i, args.cancel_share),
                                    daemon=True) for i in range(args.clients)]
        threads.append(threading.Thread(target=admin_loop, args=(address, names, uploads, tally, stop, args.admin_period_s, 7),
                                        daemon=True))
        for thread in threads:
            thread.start()
        end = t0 + args.minutes * 60
        while time.perf_counter() < end and server.poll() is None:
            time.sleep(args.sample_s)
            sample = {"t_s": round(time.perf_counter() - t0, 1), "rss_mb": round(process.memory_info().rss / (1 << 20), 1),
                      "load_avg_1m": os.getloadavg()[0]}
            metrics = scrape(metrics_port)
            sample.update({"adapter_mb": round(metrics.get("slmops_adapter_memory_bytes", 0) / (1 << 20), 1),
                           "evictions": metrics.get("slmops_adapter_evictions_total"),
                           "lazy_loads": metrics.get("slmops_adapter_lazy_loads_total"),
                           "kv_mb": round(metrics.get("slmops_kv_cache_bytes", 0) / (1 << 20), 2),
                           "loaded": metrics.get("slmops_adapters_loaded"),
                           "feeds_mb": {k.partition('"')[2].rstrip('"}'): round(v / (1 << 20), 1) for k, v in metrics.items()
                                        if k.startswith("slmops_lora_feeds_cache_bytes")},
                           "smaps_mb": smaps_rollup(server.pid)})
            samples.append(sample)
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        died = server.poll() is not None
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    duration = args.minutes * 60
    allocator = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "SLMOPS_MALLOC"))}
    windows = []
    start = 0.0
    while start < duration:
        values = [ms for t, ms in tally.ttft if start <= t < start + args.window_s]
        rss = [s["rss_mb"] for s in samples if start <= s["t_s"] < start + args.window_s]
        windows.append({"from_s": start, "to_s": min(duration, start + args.window_s), "requests": len(values),
                        "ttft_p50_ms": pct(values, 50), "ttft_p99_ms": pct(values, 99),
                        "rss_mb_max": max(rss) if rss else None})
        start += args.window_s
    warm = [s["rss_mb"] for s in samples if s["t_s"] >= min(duration / 3, 300)]
    result = {
        "bench": "soak", "bundle": str(args.bundle), "note": args.note,
        "short_run": args.minutes < 30, "minutes": args.minutes, "window_s": args.window_s,
        "adapters": args.adapters, "adapter_files_mb": round(files_mb, 1), "adapter_memory_mb": args.adapter_memory,
        "clients": args.clients, "max_batch": args.max_batch, "cancel_share": args.cancel_share,
        "allocator_env": allocator,  # SLMOPS_MALLOC=default: glibc's defaults, not the server's tuning
        "server_died": died, "requests": {"ok": tally.ok, "cancelled_by_client": tally.cancelled,
                                          "lost": len(tally.lost), "lost_examples": tally.lost[:10],
                                          "refused": tally.refused},
        "admin": {"uploads": tally.uploads, "unloads": tally.unloads, "errors": tally.admin_errors[:10]},
        "rss_mb": {"base_after_start": round(base_rss / (1 << 20), 1), "max": max((s["rss_mb"] for s in samples), default=None),
                   "after_warmup_min": min(warm, default=None), "after_warmup_max": max(warm, default=None),
                   "bound_budget_plus_base": round(base_rss / (1 << 20) + args.adapter_memory, 1)},
        "windows": windows, "samples": samples, "versions": {"python": sys.version.split()[0], "cpus": str(os.cpu_count())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.minutes} min, {args.adapters} adapters ({files_mb:.0f} MB of files), budget {args.adapter_memory} MB: "
          f"{tally.ok} ok, {tally.cancelled} cancelled, {len(tally.lost)} lost, refused {tally.refused}; "
          f"{tally.uploads} uploads, {tally.unloads} unloads")
    print(f"RSS {result['rss_mb']}")
    for w in windows:
        print(f"  {w['from_s']:>6.0f}-{w['to_s']:<6.0f}s  {w['requests']:>5} req  TTFT p50 {w['ttft_p50_ms']} ms  "
              f"p99 {w['ttft_p99_ms']} ms  RSS max {w['rss_mb_max']} MB")
    print(f"wrote {args.out}")
    return 1 if tally.lost or died else 0


if __name__ == "__main__":
    sys.exit(main())
