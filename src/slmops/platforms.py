"""CPU architectures, as Docker names them (amd64, arm64), and the checks that a bundle or an
image matches the machine that runs it.

A bundle records its target's architecture (bundle.json ``target.arch``); ``slmops serve``
refuses a bundle of another architecture unless ``--force``, and ``slmops deploy`` compares the
host engine's architecture with the image's and the bundle's before it stops anything.
Light on purpose (stdlib only): the serve image imports it.
"""

from __future__ import annotations

import platform
from typing import Any

# uname -m / Docker's `info.Architecture` / Python's platform.machine() -> Docker platform arch.
ARCH_ALIASES = {
    "x86_64": "amd64", "amd64": "amd64", "x64": "amd64",
    "aarch64": "arm64", "arm64": "arm64", "armv8": "arm64", "arm64v8": "arm64",
}
ARCHES = ("amd64", "arm64")
# The build target whose bundles suit each architecture (slmops.targets.TARGETS).
TARGET_FOR_ARCH = {"amd64": "cpu", "arm64": "cpu-arm64"}


def normalize_arch(name: str | None) -> str | None:
    """``x86_64`` -> ``amd64``, ``aarch64`` -> ``arm64``; an unknown name is returned lower-cased."""
    if not name:
        return None
    key = name.strip().lower()
    return ARCH_ALIASES.get(key, key)


def host_arch() -> str:
    """This machine's architecture as Docker names it (under qemu emulation: the emulated one)."""
    return normalize_arch(platform.machine()) or "unknown"


def bundle_arch(manifest: Any) -> str | None:
    """The architecture a bundle's manifest was built for: ``target.arch``, else (bundles written
    before it was recorded) its target's profile; None when neither says."""
    arch = normalize_arch(getattr(manifest.target, "arch", None))
    if arch:
        return arch
    from slmops.targets import TARGETS

    target = TARGETS.get(manifest.target.name)
    return target.arch if target is not None else None


def arch_mismatch(bundle: str | None, machine: str) -> str | None:
    """A one-line reason when a bundle for ``bundle`` should not run on ``machine``; None when it may."""
    if bundle is None or bundle == machine:
        return None
    right = TARGET_FOR_ARCH.get(machine)
    how = f"build one with `slmops build --target {right}` (make bundle TARGET={right})" if right else \
        f"build one for {machine}"
    return f"the bundle was built for {bundle}, this machine is {machine}; {how}"


def check_bundle_arch(manifest: Any, force: bool = False, machine: str | None = None) -> str | None:
    """For ``slmops serve``: raise SlmopsUsageError('BUNDLE_DIR') on a bundle of another architecture.

    With ``force`` the mismatch is returned as a warning line instead (None when there is none).
    """
    from slmops.errors import SlmopsUsageError

    why = arch_mismatch(bundle_arch(manifest), machine or host_arch())
    if why is None:
        return None
    if force:
        return f"warning: {why}; serving it anyway (--force)"
    raise SlmopsUsageError("BUNDLE_DIR", f"{why}, or pass --force to serve it anyway")
