"""ENTRYPOINT of the slmops images: the ``slmops`` CLI, with SIGTERM turned into SystemExit.

A process that runs as PID 1 in a container gets no default signal actions from the kernel: without
a handler, ``docker stop`` would wait its whole timeout and then SIGKILL a train or build run. Here
SIGTERM raises SystemExit(143), so the run stops at once (``finally`` blocks run, files close).
``slmops serve`` installs its own SIGTERM handler over this one: health NOT_SERVING, drain the
requests in flight, exit 0. ``docker run --init`` (tini) works too and also reaps orphaned children.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.argv[0] = "slmops"
    from slmops.cli import main

    sys.exit(main())
