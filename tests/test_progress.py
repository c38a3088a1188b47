"""Deploy transfer progress: lines at most every interval in a pipe (CI logs), a summary at the end."""

from __future__ import annotations

import io
import time


def test_pipe_gets_a_line_per_interval_and_a_summary() -> None:
    from slmops_ops.deploy.progress import Progress

    stream = io.StringIO()
    with Progress("image x -> host", 40 * 65536, stream, interval=0.05) as progress:
        for _ in progress.wrap(b"\0" * 65536 for _ in range(40)):
            time.sleep(0.005)
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 6, lines  # ~0.2 s of transfer at one line per 0.05 s, not one per chunk
    assert "/ ~2.6 MB" in lines[0] and "MB/s" in lines[0]
    first_rate = float(lines[0].rsplit(", ", 1)[1].split()[0])
    assert first_rate < 1000  # not the rate of the first chunk alone
    assert lines[-1].startswith("image x -> host: 2.6 MB in ") and lines[-1].endswith("MB/s)")
