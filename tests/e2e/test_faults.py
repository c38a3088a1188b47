"""Faults with real processes and files (bench/bench_faults.py does the work; these assert its checks):
kill -9 of `slmops serve` during an adapter upload and of `slmops build` midway, then a restart or a
rerun; a full disk (a tmpfs the test mounts) during a build. Tiny random Llama, cpu fp32 bundles."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import bench_faults
from slmops.fsutil import atomic_output_dir, recover_stale


def failed(case: dict[str, Any]) -> list[str]:
    return [name for name, ok in case["checks"].items() if not ok]


@pytest.fixture(scope="module")
def faults_env() -> Any:
    """The builds run the model builder in-process (the same code, without the ~10 s import of a
    subprocess): the kill still takes the whole build, it is one process then."""
    old = os.environ.get("SLMOPS_BUILDER_IN_PROCESS")
    os.environ["SLMOPS_BUILDER_IN_PROCESS"] = "1"
    yield
    if old is None:
        os.environ.pop("SLMOPS_BUILDER_IN_PROCESS", None)
    else:
        os.environ["SLMOPS_BUILDER_IN_PROCESS"] = old


@pytest.fixture(scope="module")
def old_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, faults_env: Any) -> Path:
    """A bundle of the tiny model built by the real CLI with the defaults: what a faulty rebuild must keep."""
    out = tmp_path_factory.mktemp("faults-old") / "cpu"
    done = bench_faults.run_build(tiny_model_dir, out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_server_killed_during_an_upload_restarts_with_its_adapter_dir_intact(tiny_bundle: Path, tmp_path: Path) -> None:
    case = bench_faults.kill_server_during_upload(tiny_bundle, tmp_path)
    assert not failed(case), case
    assert case["upload_client_saw"] == ["UNAVAILABLE"]


def test_build_killed_while_writing_the_model_keeps_the_old_bundle_and_rerun_succeeds(
        tiny_model_dir: Path, old_bundle: Path, tmp_path: Path) -> None:
    case = bench_faults.kill_build_midway(tiny_model_dir, tmp_path, "model", old_bundle)
    assert not failed(case), case
    assert case["leftovers_after_kill"] == [".tmp-*"], "the killed build's temp folder is what the rerun removes"


def test_build_killed_between_the_final_renames_gets_the_old_bundle_back(
        tiny_model_dir: Path, old_bundle: Path, tmp_path: Path) -> None:
    case = bench_faults.kill_between_renames(tiny_model_dir, tmp_path, old_bundle)
    assert not failed(case), case


def test_full_disk_during_a_build_is_one_clear_line_and_no_partial_bundle(
        tiny_model_dir: Path, tmp_path: Path, faults_env: Any) -> None:
    try:
        case = bench_faults.full_disk_build(tiny_model_dir, tmp_path)
    except OSError as exc:  # mounting needs root (a loop-mounted image would too)
        pytest.skip(f"no small filesystem can be mounted here: {exc}")
    assert not failed(case), case
    assert case["stderr_last_line"].startswith("Error: no space left on the device")


def test_recover_stale_touches_only_leftovers_of_dead_processes(tmp_path: Path) -> None:
    final = tmp_path / "cpu"
    final.mkdir()
    (final / "f").write_text("current")
    # a live writer (this process) and a dead one (a child that exited), each with a temp folder
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live_tmp = tmp_path / f".tmp-cpu-{os.getpid()}-abc"
    dead_tmp = tmp_path / f".tmp-cpu-{dead_pid}-abc"
    other = tmp_path / f".tmp-cpu-int4-{dead_pid}-abc"  # another target's: not ours to touch
    for folder in (live_tmp, dead_tmp, other):
        folder.mkdir()
    dead_old = tmp_path / f".old-cpu-{dead_pid}"
    dead_old.mkdir()
    done = recover_stale(final)
    assert live_tmp.exists() and other.exists() and not dead_tmp.exists()
    assert not dead_old.exists() and (final / "f").read_text() == "current", done  # final exists: the old one goes
    # final missing (killed between the renames): the old one comes back
    shutil.rmtree(final)
    dead_old.mkdir()
    (dead_old / "f").write_text("previous")
    recover_stale(final)
    assert (final / "f").read_text() == "previous" and not dead_old.exists()


def test_atomic_output_dir_killed_inside_leaves_no_partial_final(tmp_path: Path) -> None:
    """The writer of an atomic_output_dir SIGKILLs itself after writing a file: the final path is never
    created; the next writer removes the dead one's temp folder."""
    final = tmp_path / "out"
    code = ("import os, signal, sys; from pathlib import Path; from slmops.fsutil import atomic_output_dir\n"
            "with atomic_output_dir(Path(sys.argv[1]), overwrite=False) as tmp:\n"
            "    (tmp / 'half').write_text('x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    child = subprocess.run([sys.executable, "-c", code, str(final)], capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not final.exists() and len(list(tmp_path.glob(".tmp-out-*"))) == 1
    with atomic_output_dir(final, overwrite=False) as tmp:
        (tmp / "whole").write_text("y")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "whole").read_text() == "y"
