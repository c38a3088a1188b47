"""File helpers shared by every stage: atomic output directories and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
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
    crash leaves only a ``.tmp-*`` sibling, never a half-written ``final``.
    """
    final = Path(final)
    check_output_path(final, overwrite, option)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, final: Path) -> None:
    """Move ``src`` to ``final``, replacing any existing ``final`` with two renames."""
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
