"""File helpers shared by every stage: atomic output directories and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from slmops.errors import SlmopsUsageError


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of one file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """One sha256 over several files: hash of the sorted (name, file hash) pairs."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def check_output_path(path: Path, overwrite: bool, option: str = "--output_path") -> None:
    """Refuse to clobber an existing, non-empty output unless asked to."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise SlmopsUsageError(option, f"'{path}' exists; pass --overwrite to replace it or choose another path")


@contextlib.contextmanager
def atomic_output_dir(final: Path, overwrite: bool, option: str = "--output_path") -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success rename it into place, on error delete it.

    The temp dir lives in the same parent so the final rename is atomic on one filesystem; a
    crash (kill -9, power loss) leaves only a ``.tmp-NAME-PID-*`` sibling, never a half-written
    ``final``, and the next run for ``final`` removes it (:func:`recover_stale`). ``final`` gets
    ordinary permissions (see :func:`replace_dir`), not mkdtemp's 0700.
    """
    final = Path(final)
    recover_stale(final)
    check_output_path(final, overwrite, option)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


DIR_MODE = 0o755
FILE_MODE = 0o644


def ordinary_permissions(root: Path) -> None:
    """Give ``root`` and everything under it ordinary permissions, however it was written (mkdtemp
    makes 0700 folders, mkstemp 0600 files, a umask of 077 both): folders 0755, files 0644 (0755
    when the owner may execute them). Symbolic links are not followed (a run's ``model`` links to
    the model cache, which is not ours to change)."""
    root = Path(root)
    if root.is_symlink():
        return
    os.chmod(root, DIR_MODE)
    for top, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, DIR_MODE)
        for name in files:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, DIR_MODE if st.st_mode & stat.S_IXUSR else FILE_MODE)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0; another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_owner(name: str, prefix: str) -> bool:
    """``name`` is ``PREFIX<pid>-...`` or ``PREFIX<pid>`` and that process is gone."""
    pid_text = name[len(prefix):].split("-", 1)[0]
    return pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text))


def recover_stale(final: Path) -> list[str]:
    """Clean up after a writer of ``final`` that died (kill -9) before it finished: its
    ``.tmp-NAME-PID-*`` sibling is removed, and an ``.old-NAME-PID`` (the previous ``final``, moved
    aside between :func:`replace_dir`'s two renames) is put back when ``final`` is missing, else
    removed. Only folders of processes that no longer exist are touched. Returns what it did."""
    final = Path(final)
    parent = final.parent
    done: list[str] = []
    if not parent.is_dir():
        return done
    tmp_prefix, old_prefix = f".tmp-{final.name}-", f".old-{final.name}-"
    for entry in sorted(parent.iterdir()):
        if entry.name.startswith(old_prefix) and _dead_owner(entry.name, old_prefix):
            if not final.exists() and not final.is_symlink():
                os.replace(entry, final)
                done.append(f"restored {final.name} from {entry.name}")
            else:
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed {entry.name}")
        elif entry.name.startswith(tmp_prefix) and _dead_owner(entry.name, tmp_prefix):
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry.name}")
    return done


def replace_dir(src: Path, final: Path) -> None:
    """Move ``src`` to ``final``, replacing any existing ``final`` with two renames. ``final`` gets
    ordinary permissions first (:func:`ordinary_permissions`): bundles and runs are read by other
    users, e.g. the serve image's non-root user through a ``-v`` mount. A crash between the two
    renames leaves the old ``final`` as ``.old-NAME-PID``, which :func:`recover_stale` puts back."""
    ordinary_permissions(src)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(src, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def portable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a bundle or report may record it, naming no folder of this machine: a relative
    path as given, an absolute one relative to the working directory when inside it, else only its
    last part (``/tmp/x/runs/tone`` -> ``tone``)."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.relative_to(Path.cwd()).as_posix() or "."
    except ValueError:
        return p.name
