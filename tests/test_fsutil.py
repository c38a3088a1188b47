"""Bundle and run folders get ordinary permissions (folders 0755, files 0644) however they were
written: the serve image's non-root user reads a bundle through `docker run -v ...:/bundle:ro`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from slmops.fsutil import atomic_output_dir, replace_dir


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        if not path.is_symlink():
            out[path.relative_to(root).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return out


def _write_private(tmp: Path, outside: Path) -> None:
    """Files and folders as the stages may write them: mkstemp (0600), mkdtemp (0700), an executable,
    a link out of the folder (a run's `model` link to the model cache)."""
    fd, name = tempfile.mkstemp(dir=tmp)
    os.write(fd, b"weights")
    os.close(fd)
    os.replace(name, tmp / "model.onnx")
    sub = Path(tempfile.mkdtemp(dir=tmp))
    os.replace(sub, tmp / "adapters")
    (tmp / "adapters" / "tone.onnx_adapter").write_bytes(b"adapter")
    (tmp / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp / "run.sh", 0o700)
    os.symlink(outside, tmp / "model")


def test_atomic_output_dir_writes_ordinary_permissions_under_a_private_umask(tmp_path: Path) -> None:
    outside = tmp_path / "cache"
    outside.mkdir(mode=0o700)
    os.chmod(outside, 0o700)
    final = tmp_path / "dist" / "bundles" / "cpu"
    old = os.umask(0o077)
    try:
        with atomic_output_dir(final, overwrite=False) as tmp:
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o700  # mkdtemp's, until it is renamed into place
            _write_private(tmp, outside)
    finally:
        os.umask(old)
    assert _modes(final) == {".": 0o755, "model.onnx": 0o644, "adapters": 0o755,
                             "adapters/tone.onnx_adapter": 0o644, "run.sh": 0o755}
    assert (final / "model").is_symlink()
    assert stat.S_IMODE(outside.stat().st_mode) == 0o700  # a link's target is left alone


def test_replace_dir_over_an_existing_folder(tmp_path: Path) -> None:
    """The train stage's path: a `.name.partial` folder renamed over the previous run."""
    final = tmp_path / "runs" / "tone"
    final.mkdir(parents=True)
    (final / "stale").write_text("old")
    work = Path(tempfile.mkdtemp(dir=tmp_path / "runs"))
    fd, name = tempfile.mkstemp(dir=work)
    os.close(fd)
    os.replace(name, work / "run.json")
    replace_dir(work, final)
    assert _modes(final) == {".": 0o755, "run.json": 0o644}


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="reading as another uid needs root here")
def test_another_user_reads_the_whole_folder() -> None:
    """What the serve image's uid 10001 does with a -v mount: list every folder and read every file
    (in a folder of /tmp: pytest's own tmp folders are private to root)."""
    top = Path(tempfile.mkdtemp(prefix="slmops-perm-test-"))
    try:
        os.chmod(top, 0o755)
        final = top / "bundle"
        old = os.umask(0o077)
        try:
            with atomic_output_dir(final, overwrite=False) as tmp:
                _write_private(tmp, top)
        finally:
            os.umask(old)
        script = 'find "$1" -type d -exec ls {} + >/dev/null && find "$1" -type f -exec cat {} + | wc -c'
        done = subprocess.run(["sh", "-c", script, "sh", str(final)], user=10001, group=10001,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(len(b"weights" + b"adapter" + b"#!/bin/sh\n"))
    finally:
        shutil.rmtree(top)


def test_built_bundle_and_trained_runs_have_ordinary_permissions(tiny_bundle: Path, tiny_runs: dict[str, Path]) -> None:
    """The real stages (build_bundle, train): no 0700 folder or 0600 file in what they leave."""
    for root in (tiny_bundle, *tiny_runs.values()):
        modes = _modes(root)
        assert modes["."] == 0o755
        assert all(mode in (0o644, 0o755) for mode in modes.values()), (root, modes)
