"""Our hand-written parts against the maintained library that does the same, on equal work (issue 12).

    .venv/bin/python bench/bench_hand_written.py --out bench/results/hand_written_cpu.json

1. progress: slmops_ops.deploy.progress.Progress vs rich.progress (already a dependency) counting the
   same 20,000 chunks of 64 KiB (a 1.3 GB image stream): seconds spent in the progress code, and
   the lines a non-terminal (CI log, pipe) gets during a 3 s transfer.
2. watcher: slmops_serve.watch.AdapterWatcher (polling) vs watchfiles (inotify, and its
   force_polling mode): seconds from a file renamed into the adapter folder to the load call, and
   CPU seconds used by 10 s of watching an idle folder of 10 adapters.
3. JSON logs: slmops_serve.logs.JsonFormatter vs python-json-logger's JsonFormatter made to write
   the same keys: microseconds per record, and whether the lines parse to the same objects.
Timings on a shared machine swing: each pair runs interleaved in this one process.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "serve")]

from bench.bench_serve import versions  # noqa: E402

CHUNK = b"\0" * 65536


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- 1. progress --------------------------------------------------------------------------------
def ours_progress(stream: Any, chunks: int, pause: float = 0.0) -> float:
    from slmops_ops.deploy.progress import Progress

    started = time.perf_counter()
    with Progress("image x -> host", chunks * len(CHUNK), stream, interval=0.2 if stream.isatty() else 1.0) as p:
        for _ in p.wrap(CHUNK for _ in range(chunks)):
            if pause:
                time.sleep(pause)
    return time.perf_counter() - started


def rich_progress(stream: Any, chunks: int, pause: float = 0.0) -> float:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    console = Console(file=stream, force_terminal=stream.isatty(), width=100)
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeElapsedColumn(), console=console, refresh_per_second=5) as p:
        task = p.add_task("image x -> host", total=chunks * len(CHUNK))
        for _ in range(chunks):
            p.update(task, advance=len(CHUNK))
            if pause:
                time.sleep(pause)
    return time.perf_counter() - started


def bench_progress(reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    times: dict[str, list[float]] = {k: [] for k in ("ours_tty", "rich_tty", "ours_pipe", "rich_pipe")}
    for _ in range(reps):
        times["ours_tty"].append(ours_progress(Tty(), 20000))
        times["rich_tty"].append(rich_progress(Tty(), 20000))
        times["ours_pipe"].append(ours_progress(io.StringIO(), 20000))
        times["rich_pipe"].append(rich_progress(io.StringIO(), 20000))
    out["seconds_for_20000_chunks_median"] = {k: round(statistics.median(v), 4) for k, v in times.items()}
    # a 3 s transfer into a pipe (CI log): what does the reader see while it runs?
    for name, fn in (("ours", ours_progress), ("rich", rich_progress)):
        stream = io.StringIO()
        fn(stream, 300, pause=0.01)
        lines = [line for line in stream.getvalue().splitlines() if line.strip()]
        out[f"{name}_pipe_lines_for_3s"] = len(lines)
        out[f"{name}_pipe_sample"] = lines[:2]
    return out


# ---- 2. adapter folder watcher ------------------------------------------------------------------
class Recorder:
    """Stands in for the registry: records when each name was loaded."""

    def __init__(self) -> None:
        self.loaded: dict[str, float] = {}
        self.event = threading.Event()

    def load(self, name: str, path: str, source: str) -> Any:
        self.loaded[name] = time.perf_counter()
        self.event.set()

        class Result:
            unchanged = False

            class adapter:  # noqa: N801 - the attribute shape the watcher logs
                sha256 = "0" * 64
        return Result()

    def get(self, name: str) -> None:
        return None


def watchfiles_loop(directory: Path, recorder: Recorder, stop: threading.Event, force_polling: bool) -> None:
    import watchfiles

    for changes in watchfiles.watch(directory, stop_event=stop, force_polling=force_polling, poll_delay_ms=1000,
                                    debounce=1600, step=50, rust_timeout=200, yield_on_timeout=False):
        for change, path in changes:
            if change != watchfiles.Change.deleted and path.endswith(".onnx_adapter"):
                recorder.load(Path(path).stem, path=path, source="watch")


def run_watcher(kind: str, directory: Path, recorder: Recorder, stop: threading.Event) -> threading.Thread | Any:
    if kind.startswith("ours"):
        from slmops_serve.watch import AdapterWatcher

        watcher = AdapterWatcher(recorder, directory, interval_s=1.0)  # type: ignore[arg-type]
        watcher.poll()
        watcher.start()
        return watcher
    thread = threading.Thread(target=watchfiles_loop, args=(directory, recorder, stop, kind == "watchfiles_polling"),
                              daemon=True)
    thread.start()
    return thread


def bench_watch(reps: int) -> dict[str, Any]:
    kinds = ("ours_poll_1s", "watchfiles_inotify", "watchfiles_polling")
    latency: dict[str, list[float]] = {k: [] for k in kinds}
    idle_cpu: dict[str, float] = {}
    payload = os.urandom(3_000_000)  # a tone-sized adapter
    for rep in range(reps):
        for kind in kinds:
            with tempfile.TemporaryDirectory() as tmp:
                directory = Path(tmp)
                for i in range(10):
                    (directory / f"a{i}.onnx_adapter").write_bytes(payload[:100_000])
                recorder, stop = Recorder(), threading.Event()
                handle = run_watcher(kind, directory, recorder, stop)
                time.sleep(1.5)  # settle: the initial files are known
                recorder.loaded.clear()
                recorder.event.clear()
                if rep == 0:
                    before = cpu_s()
                    time.sleep(10)
                    idle_cpu[kind] = round(cpu_s() - before, 3)
                staging = directory / "new.tmp"
                staging.write_bytes(payload)
                dropped = time.perf_counter()
                staging.replace(directory / "new.onnx_adapter")
                recorder.event.wait(10)
                latency[kind].append(recorder.loaded.get("new", float("nan")) - dropped)
                stop.set()
                if hasattr(handle, "stop"):
                    handle.stop()
                else:
                    handle.join(5)
    return {"drop_to_load_s_median": {k: round(statistics.median(v), 3) for k, v in latency.items()},
            "drop_to_load_s_all": {k: [round(x, 3) for x in v] for k, v in latency.items()},
            "cpu_s_for_10s_idle_10_files": idle_cpu}


# ---- 3. JSON log lines --------------------------------------------------------------------------
def library_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class Fields(JsonFormatter):  # our call sites pass extra={"fields": {...}}: flatten them
        def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
            super().add_fields(log_data, record, message_dict)
            log_data.pop("fields", None)
            log_data["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
            log_data["level"] = record.levelname.lower()
            if isinstance(getattr(record, "fields", None), dict):
                log_data.update(record.fields)  # type: ignore[attr-defined]

    return Fields("{name}{message}", style="{", rename_fields={"name": "logger", "message": "msg"},
                  reserved_attrs=[*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "fields", "message"],
                  json_default=str)


def bench_logs(records: int, reps: int) -> dict[str, Any]:
    from slmops_serve.logs import JsonFormatter

    ours, lib = JsonFormatter(), library_formatter()
    logger = logging.getLogger("slmops.serve")
    made = [logger.makeRecord("slmops.serve", logging.INFO, __file__, 1, "request done", (), None,
                              extra={"fields": {"event": "request", "request_id": f"{i:016x}", "method": "Generate",
                                                "code": "OK", "ms": 12.5 + i, "adapter": "tone"}})
            for i in range(records)]
    same = all(json.loads(ours.format(r)) == json.loads(lib.format(r)) for r in made[:200])
    sample = {"ours": ours.format(made[0]), "library": lib.format(made[0])}
    times: dict[str, list[float]] = {"ours": [], "library": []}
    for _ in range(reps):
        for name, formatter in (("ours", ours), ("library", lib)):
            started = time.perf_counter()
            for record in made:
                formatter.format(record)
            times[name].append((time.perf_counter() - started) / records * 1e6)
    return {"us_per_record_median": {k: round(statistics.median(v), 2) for k, v in times.items()},
            "same_objects_on_200_records": same, "sample": sample}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", choices=("progress", "watch", "logs"), action="append")
    args = parser.parse_args(argv)
    if args.out:  # never over a committed results file (bench/readme_figures.py)
        from readme_figures import beside_committed

        args.out = beside_committed(args.out)
    parts = args.only or ["progress", "watch", "logs"]
    report: dict[str, Any] = {"loadavg_start": os.getloadavg(),
                              "versions": versions(("rich", "watchfiles", "anyio", "python-json-logger"))}
    if "progress" in parts:
        report["progress"] = bench_progress(args.reps)
        print(json.dumps(report["progress"], indent=1), flush=True)
    if "logs" in parts:
        report["logs"] = bench_logs(20000, args.reps)
        print(json.dumps(report["logs"], indent=1), flush=True)
    if "watch" in parts:
        report["watch"] = bench_watch(args.reps)
        print(json.dumps(report["watch"], indent=1), flush=True)
    report["loadavg_end"] = os.getloadavg()
    if args.out:
        from readme_figures import committed_of

        base = args.out if args.out.exists() else committed_of(args.out)  # adds to the committed runs
        existing = json.loads(base.read_text()) if base.exists() else {}
        existing.update(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(existing, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
