"""A dependency-free progress bar on stderr.

On a terminal it redraws one line; elsewhere (CI logs, pipes) it prints one line per phase so
logs stay short. ``Progress(total=0)`` or ``enabled=False`` prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Counts timed calls against a known total.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> p = Progress(2, stream=out, tty=False)
        >>> p.phase("one-large clipping"); p.tick(); p.tick(); p.close()
        >>> "one-large clipping" in out.getvalue()
        True
    """

    WIDTH = 30

    def __init__(self, total: int, stream: Optional[TextIO] = None, enabled: bool = True,
                 tty: Optional[bool] = None):
        self.total = max(total, 0)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.total > 0
        self.tty = self.stream.isatty() if tty is None else tty
        self.label = ""
        self._last_draw = 0.0
        self._start = time.perf_counter()

    def phase(self, label: str) -> None:
        self.label = label
        if not self.enabled:
            return
        if self.tty:
            self._draw(force=True)
        else:
            print(f"[{self.done}/{self.total}] {label}", file=self.stream, flush=True)

    def tick(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if self.enabled and self.tty:
            self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1 and self.done < self.total:
            return
        self._last_draw = now
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        line = f"\r[{bar}] {self.done}/{self.total} {now - self._start:5.1f}s {self.label}"
        self.stream.write(line[:120].ljust(120))
        self.stream.flush()

    def clear(self) -> None:
        """Blank the bar's line so other output can be printed; the next tick redraws it."""
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
