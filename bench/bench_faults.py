"""Faults: kill -9 of the server during an adapter upload and of `slmops build` midway, a full disk
during a build. What was done, what was found, how long recovery took. JSON.

    .venv/bin/python bench/bench_faults.py --out bench/results/faults_cpu.json

Every case uses real processes and real files: a tiny random Llama (tests/conftest.py's TINY_LLAMA)
built into a cpu fp32 bundle by the real `slmops build`, a real `slmops serve` on free ports.

* server: ``slmops serve`` with an ``--adapter-dir`` and ``--adapter-memory`` (so uploads are spooled
  to its temp dir), one upload finished, a second one in flight (its first chunk sent, the stream held
  open), then SIGKILL. Checked: the adapter dir holds exactly the files it held (same bytes, no
  partial file); the server restarts, removes the dead server's spool, reaches SERVING and answers with
  the bundle's model, a lazily loaded adapter of the dir, and a new upload.
* build: ``slmops build --overwrite`` over an existing bundle, SIGKILLed (with its builder subprocess)
  once its temp folder appears and again while it writes the model. Checked: the target is the old
  bundle (same files, same bytes), the rerun removes the dead build's temp folder and succeeds; and a
  kill between the two renames of the final swap (old bundle moved aside, new one not yet in place):
  the next build puts the old one back before it starts.
* full disk: ``slmops build`` into a tmpfs of a few hundred kB the run mounts (root only; a loop-mounted
  image otherwise would need root too). Checked: exit code 1, one line on stderr naming the device and
  the fix, no traceback, nothing but the parent's previous contents on the small filesystem.

The functions return dicts of checks (name -> bool) that tests/e2e/test_faults.py asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "serve", REPO / "build"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

ADMIN_TOKEN = "faults-admin-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "slmops.cli", *args]


def tree_state(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (folders by their files)."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def make_tiny_model(out: Path) -> Path:
    """tests/conftest.py's tiny random Llama with its 400-token tokenizer, made once in ``out``."""
    from tests.conftest import make_tiny_llama

    return out if (out / "config.json").is_file() else make_tiny_llama(out)


def build_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return cli_command("build", "--target", "cpu", "--precision", "fp32", "-m", str(model_dir), "-o", str(out),
                       "--no-validate", *extra)


def run_build(model_dir: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(build_args(model_dir, out, *extra), capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def siblings(out: Path) -> list[str]:
    """Leftovers of writers of ``out`` beside it (temp folders, the old bundle moved aside)."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((f".tmp-{out.name}-", f".old-{out.name}-")))


# ---- build killed midway --------------------------------------------------------------------------
def first_bundle(model_dir: Path, out: Path, old_bundle: Path | None) -> None:
    """The bundle a faulty rebuild must leave intact: a copy of ``old_bundle`` (built from
    ``model_dir`` with the defaults) or a fresh build."""
    if old_bundle is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(old_bundle, out)
        return
    first = run_build(model_dir, out)
    if first.returncode != 0:
        raise RuntimeError(f"the first build failed: {first.stderr[-2000:]}")


# `slmops build ARGS` (argv[1:]) that SIGKILLs its process group once the model file is saved
KILLED_AFTER_MODEL_SAVE = """
import os, signal, sys
import onnx_ir
save = onnx_ir.save
def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os.killpg(0, signal.SIGKILL)
onnx_ir.save = save_then_die
from slmops.cli import main
sys.argv = ["slmops", *sys.argv[1:]]
main()
"""


def kill_build_midway(model_dir: Path, work: Path, when: str, old_bundle: Path | None = None) -> dict[str, Any]:
    """With a bundle in place, rebuild it with ``--overwrite`` and SIGKILL the build (its whole process
    group: the builder subprocess too) ``when`` = "temp" (its temp folder exists) or "model" (its
    model file is being written); then run the build again."""
    out = work / f"bundles-{when}" / "cpu"
    first_bundle(model_dir, out, old_bundle)
    before = tree_state(out)
    # --lora_modules changes the build key, so the rebuild really writes a new bundle
    command = build_args(model_dir, out, "--overwrite", "--lora_modules", "q_proj,v_proj")
    if when == "model":
        # the model file is in the temp folder and its side files are not: a tiny model's is written
        # in milliseconds, which polling from here can miss, so the build kills itself right there
        command = [sys.executable, "-c", KILLED_AFTER_MODEL_SAVE, *command[3:]]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    killed_at = None
    seen = ""
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        temps = [p for p in out.parent.iterdir() if p.name.startswith(f".tmp-{out.name}-")]
        if temps and when == "temp":
            seen = "temp folder"
        if seen:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = time.perf_counter() - started
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    if when == "model" and proc.returncode == -signal.SIGKILL:
        killed_at, seen = time.perf_counter() - started, "model file saved in the temp folder"
    after_kill = tree_state(out)
    leftovers = siblings(out)
    t0 = time.perf_counter()
    rerun = run_build(model_dir, out, "--overwrite", "--lora_modules", "q_proj,v_proj")
    rerun_s = time.perf_counter() - t0
    from slmops.bundle import read_manifest

    manifest_ok = rerun.returncode == 0 and read_manifest(out).lora_template.modules is not None
    checks = {
        "killed_midway": killed_at is not None and proc.returncode == -signal.SIGKILL,
        "target_is_old_bundle_after_kill": after_kill == before,
        "rerun_succeeds": rerun.returncode == 0 and manifest_ok,
        "rerun_changed_the_bundle": tree_state(out) != before,
        "no_leftovers_after_rerun": siblings(out) == [],
    }
    return {"case": f"build killed midway ({when})", "killed_after_s": round(killed_at or 0, 2), "kill_point": seen,
            "leftovers_after_kill": [name.split("-")[0] + "-*" for name in leftovers], "rerun_s": round(rerun_s, 2),
            "rerun_stderr_tail": rerun.stderr.strip().splitlines()[-1:] if rerun.returncode else [], "checks": checks}


def kill_between_renames(model_dir: Path, work: Path, old_bundle: Path | None = None) -> dict[str, Any]:
    """A build killed after it moved the old bundle aside and before the new one took its place (the
    one moment :func:`slmops.fsutil.replace_dir` has no ``final``): a child process does exactly that
    first rename and SIGKILLs itself; then the next build runs."""
    out = work / "bundles-renames" / "cpu"
    first_bundle(model_dir, out, old_bundle)
    before = tree_state(out)
    code = ("import os, signal, sys; from pathlib import Path; final = Path(sys.argv[1]); "
            "os.replace(final, final.with_name(f'.old-{final.name}-{os.getpid()}')); os.kill(os.getpid(), signal.SIGKILL)")
    child = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, timeout=60)
    missing_after_kill = not out.exists()
    leftovers = siblings(out)
    t0 = time.perf_counter()
    # same inputs: the restored bundle is up to date (unless the code changed since it was built: the
    # build key hashes slmops' own code, so then it is rebuilt, which --overwrite allows)
    rerun = run_build(model_dir, out, "--overwrite")
    rerun_s = time.perf_counter() - t0
    up_to_date = "up to date" in rerun.stderr
    checks = {
        "killed_between_renames": child.returncode == -signal.SIGKILL and missing_after_kill and len(leftovers) == 1,
        "rerun_succeeds": rerun.returncode == 0 and (out / "bundle.json").is_file(),
        "old_bundle_restored_when_up_to_date": tree_state(out) == before if up_to_date else True,
        "no_leftovers_after_rerun": siblings(out) == [],
    }
    return {"case": "build killed between the final renames", "rerun_s": round(rerun_s, 2),
            "rerun_said": "up to date (the old bundle, put back)" if up_to_date else "rebuilt (the build key changed)",
            "checks": checks}


# ---- full disk ------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(mountpoint: Path, size_kb: int) -> Iterator[str]:
    """A tmpfs of ``size_kb`` kB at ``mountpoint`` (root), unmounted afterwards. Yields how it was made.
    Raises OSError with the reason when it cannot be mounted here."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield f"tmpfs size={size_kb}k"
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def full_disk_build(model_dir: Path, work: Path, size_kb: int = 256) -> dict[str, Any]:
    """``slmops build`` whose output folder is on a filesystem too small for the bundle."""
    mount = work / "small-fs"
    with small_filesystem(mount, size_kb) as how:
        (mount / "keep.txt").write_text("what was there before\n")
        before = tree_state(mount)
        out = mount / "bundles" / "cpu"
        t0 = time.perf_counter()
        done = run_build(model_dir, out)
        seconds = time.perf_counter() - t0
        after = tree_state(mount)
        stray = sorted(set(after) - set(before))
        stderr_lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        error_lines = [line for line in stderr_lines if line.startswith("Error")]
    checks = {
        "exit_code_1": done.returncode == 1,
        "no_traceback": "Traceback" not in done.stderr,
        "one_error_line": len(error_lines) == 1,
        "error_names_no_space": bool(error_lines) and "no space left" in error_lines[0].lower(),
        "no_partial_bundle": not stray and after == before,
    }
    return {"case": "full disk during a build", "filesystem": how, "exit_code": done.returncode, "seconds": round(seconds, 2),
            "stderr_last_line": stderr_lines[-1] if stderr_lines else "", "stray_files": stray[:10], "checks": checks}


# ---- server killed during an upload -----------------------------------------------------------------
def start_server(bundle: Path, adapter_dir: Path, tmpdir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port, metrics_port = free_port(), free_port()
    command = cli_command("serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                          str(metrics_port), "--adapter-dir", str(adapter_dir), "--adapter-memory", "64",
                          "--admin-token", ADMIN_TOKEN, "--no-verify-bundle", "--threads", "1", "--max-batch", "2")
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": os.pathsep.join([str(REPO / "serve"), str(REPO / "build"),
                                                                           os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
    return proc, f"127.0.0.1:{port}"


def wait_serving(proc: subprocess.Popen[bytes], address: str, log_path: Path, timeout: float = 120) -> float:
    from slmops_serve.client import SlmopsClient

    started = time.perf_counter()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
        with contextlib.suppress(Exception), SlmopsClient(address, timeout=2) as probe:
            if probe.health() == "SERVING":
                return time.perf_counter() - started
        time.sleep(0.2)
    raise RuntimeError(f"the server did not reach SERVING in {timeout} s: {log_path.read_text()[-2000:]}")


def kill_server_during_upload(bundle: Path, work: Path) -> dict[str, Any]:
    """See the module docstring (server)."""
    import grpc
    from slmops_serve.client import SlmopsClient
    from slmops_serve.registry import SPOOL_PREFIX

    from bench.synthetic import synthetic_adapter
    from slmops.bundle import read_manifest
    from slmops.v1 import adapters_pb2

    template = read_manifest(bundle).lora_template
    adapter_dir = work / "adapter-dir"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    for i, modules in enumerate((["q_proj", "v_proj"], ["o_proj", "down_proj"])):
        synthetic_adapter(template, modules, 4, adapter_dir / f"dir{i}.onnx_adapter", seed=i)
    uploads = [synthetic_adapter(template, ["q_proj", "v_proj"], 8, work / f"upload{i}.onnx_adapter", seed=100 + i)
               for i in range(2)]
    tmpdir = work / "server-tmp"
    tmpdir.mkdir(exist_ok=True)
    log_path = work / "server.log"
    before = tree_state(adapter_dir)

    proc, address = start_server(bundle, adapter_dir, tmpdir, log_path)
    first_start_s = wait_serving(proc, address, log_path)
    release = threading.Event()
    stream_error: list[str] = []
    with SlmopsClient(address, token=ADMIN_TOKEN, timeout=60) as client:
        client.generate("Hello", adapter="dir0", max_new_tokens=4)  # lazily loaded from the adapter dir
        client.upload_adapter("up0", uploads[0])  # finished: spooled in the server's temp dir
        data = uploads[1].read_bytes()

        def pieces() -> Iterator[Any]:
            yield adapters_pb2.UploadAdapterChunk(name="up1", size=len(data), data=data[: len(data) // 3])
            release.wait(30)  # the rest never comes: the server dies first
            yield adapters_pb2.UploadAdapterChunk(data=data[len(data) // 3:])

        def upload() -> None:
            try:
                client.adapters.UploadAdapter(pieces(), timeout=60, metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")])
            except grpc.RpcError as exc:
                stream_error.append(exc.code().name)  # type: ignore[attr-defined]

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        time.sleep(1.0)  # the first chunk is on the server
        spools_before_kill = sorted(p.name.split("-")[3] for p in tmpdir.iterdir() if p.name.startswith(SPOOL_PREFIX))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        release.set()
        uploader.join(timeout=30)
    after_kill = tree_state(adapter_dir)
    stale_spool = [p for p in tmpdir.iterdir() if p.name.startswith(SPOOL_PREFIX)]

    proc2, address2 = start_server(bundle, adapter_dir, tmpdir, log_path)
    try:
        restart_s = wait_serving(proc2, address2, log_path)
        spools_after_restart = [p for p in tmpdir.iterdir() if p.name.startswith(SPOOL_PREFIX)]
        with SlmopsClient(address2, token=ADMIN_TOKEN, timeout=60) as client:
            base = client.generate("Hello", max_new_tokens=4)
            lazy = client.generate("Hello", adapter="dir1", max_new_tokens=4)
            loaded_after_restart = sorted(a.name for a in client.list_adapters())
            client.upload_adapter("up1", uploads[1])
            again = client.generate("Hello", adapter="up1", max_new_tokens=4)
    finally:
        proc2.send_signal(signal.SIGTERM)
        try:
            proc2.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc2.pid, signal.SIGKILL)
    after_restart = tree_state(adapter_dir)
    checks = {
        "upload_in_flight_at_kill": stream_error == ["UNAVAILABLE"] and proc.returncode == -signal.SIGKILL,
        "adapter_dir_unchanged_after_kill": after_kill == before,
        "dead_server_spool_left_before_restart": len(stale_spool) == 1,
        "restart_removes_stale_spool": [p for p in spools_after_restart if p in stale_spool] == [],
        "restart_serves_base": len(base.text) >= 0 and base.finish_reason != 0,
        "restart_lazy_loads_from_dir": lazy.finish_reason != 0,
        "uploads_not_kept_across_restart": "up0" not in loaded_after_restart and "up1" not in loaded_after_restart,
        "upload_after_restart_works": again.finish_reason != 0,
        "adapter_dir_unchanged_after_restart": after_restart == before,
    }
    return {"case": "server killed during an upload", "first_start_s": round(first_start_s, 2),
            "restart_to_serving_s": round(restart_s, 2), "upload_client_saw": stream_error,
            "spool_pids_before_kill": spools_before_kill, "adapter_dir_files": len(before),
            "loaded_after_restart": loaded_after_restart, "checks": checks}


CASE_SUMMARY = {
    "server killed during an upload": "adapter dir byte-identical; restart removes the dead server's upload spool, "
                                      "serves the base model, a lazily loaded adapter and a new upload",
    "build killed midway (temp)": "target still the old bundle (same bytes); rerun removes the temp folder and succeeds",
    "build killed midway (model)": "target still the old bundle (same bytes); rerun removes the temp folder and succeeds",
    "build killed between the final renames": "the next build puts the old bundle back before it starts; no leftovers",
    "full disk during a build": "exit 1, one line (`Error: no space left on the device ...`), no traceback, "
                                "nothing written on the small filesystem",
}


def readme_block(data: dict[str, Any]) -> str:
    """The README's ``figures:faults`` block (bench/readme_figures.py)."""
    lines = ["| fault (kill -9 = SIGKILL) | checked | result | recovery |", "|---|---|---|---|"]
    for case in data["cases"]:
        name = case["case"]
        if case.get("unverified"):
            lines.append(f"| {name} | - | unverified: {case['unverified']} | - |")
            continue
        result = "pass" if case["passed"] else "FAIL: " + ", ".join(k for k, v in case["checks"].items() if not v)
        if "restart_to_serving_s" in case:
            recovery = f"SERVING {case['restart_to_serving_s']} s after restart"
        elif "rerun_s" in case:
            recovery = f"rerun {case['rerun_s']} s"
        else:
            recovery = f"failed in {case['seconds']} s ({case['filesystem']})"
        lines.append(f"| {name} | {CASE_SUMMARY.get(name, ', '.join(case['checks']))} | {result} "
                     f"({sum(case['checks'].values())}/{len(case['checks'])} checks) | {recovery} |")
    lines.append("")
    lines.append("Times on a shared 2-core machine under other work. "
                 "Tiny random Llama, cpu fp32 bundles, real `slmops build` / `slmops serve` processes "
                 "(`bench/bench_faults.py`, `bench/results/faults_cpu.json`; the same checks are "
                 "`tests/e2e/test_faults.py`).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results JSON (a committed one gets NAME.new.json)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder, removed)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "bench"))
    from readme_figures import beside_committed

    args.out = beside_committed(args.out)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-faults-"))
    results: dict[str, Any] = {"bench": "faults", "cases": []}
    try:
        t0 = time.perf_counter()
        model_dir = make_tiny_model(work / "tiny-model")
        bundle = work / "bundle" / "cpu"
        if not (bundle / "bundle.json").is_file():
            done = run_build(model_dir, bundle)
            if done.returncode != 0:
                raise SystemExit(f"building the tiny bundle failed: {done.stderr[-2000:]}")
        print(f"tiny model and bundle ready in {time.perf_counter() - t0:.1f} s", flush=True)
        steps = [("server", lambda: kill_server_during_upload(bundle, work / "server")),
                 ("build-temp", lambda: kill_build_midway(model_dir, work, "temp", bundle)),
                 ("build-model", lambda: kill_build_midway(model_dir, work, "model", bundle)),
                 ("build-renames", lambda: kill_between_renames(model_dir, work, bundle)),
                 ("full-disk", lambda: full_disk_build(model_dir, work))]
        for name, step in steps:
            t0 = time.perf_counter()
            try:
                case = step()
            except OSError as exc:  # e.g. no tmpfs without root: said, not hidden
                case = {"case": name, "unverified": str(exc), "checks": {}}
            case["case_s"] = round(time.perf_counter() - t0, 2)
            case["passed"] = bool(case["checks"]) and all(case["checks"].values())
            results["cases"].append(case)
            failed = [k for k, v in case["checks"].items() if not v]
            print(f"{case['case']}: {'PASS' if case['passed'] else 'FAIL ' + str(failed) if case['checks'] else 'UNVERIFIED'}"
                  f" ({case['case_s']} s)", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    import platform

    results["versions"] = {"python": platform.python_version(), "cpus": str(os.cpu_count())}
    results["model"] = "tiny random Llama (tests/conftest.py TINY_LLAMA), cpu fp32 bundle, --no-validate"
    results["builder_in_process"] = os.environ.get("SLMOPS_BUILDER_IN_PROCESS", "0") not in ("0", "", "false")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".part")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0 if all(c["passed"] for c in results["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
