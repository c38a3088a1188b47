"""Progress lines for long transfers (image streams, pushes, pulls, bundle copies).

On a terminal one line is rewritten in place; otherwise (CI logs, pipes) a line is printed at most
every ``interval`` seconds. Both end with a summary: bytes, seconds, MB/s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

MB = 1_000_000


def human(n: float) -> str:
    return f"{n / MB:.1f} MB" if n < 10 * 1000 * MB else f"{n / (1000 * MB):.2f} GB"


class Progress:
    """``with Progress("image -> host", total) as p: p.advance(n)``; ``total`` may be an estimate (0 = unknown)."""

    def __init__(self, label: str, total: int = 0, stream: TextIO | None = None, interval: float | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self.start = time.monotonic()
        self._last = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Progress:
        # the first line comes one interval in: a rate over the first chunk alone means nothing
        self.start = self._last = time.monotonic()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.seconds = time.monotonic() - self.start
        if exc_type is None:
            self._write(f"{self.label}: {human(self.done)} in {self.seconds:.1f}s ({self._rate()})", final=True)
        elif self.tty:
            self.stream.write("\n")

    def _rate(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        return f"{self.done / elapsed / MB:.1f} MB/s"

    def _write(self, text: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, done: int, total: int | None = None) -> None:
        """Set the absolute progress (pushes and pulls report per-layer totals)."""
        self.done = done
        if total:
            self.total = total
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            if self.total:
                pct = min(99, int(100 * self.done / self.total))
                self._write(f"{self.label}: {human(self.done)} / ~{human(self.total)} ({pct}%), {self._rate()}")
            else:
                self._write(f"{self.label}: {human(self.done)}, {self._rate()}")

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def wrap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Pass ``chunks`` through, counting their bytes."""
        for chunk in chunks:
            self.advance(len(chunk))
            yield chunk
