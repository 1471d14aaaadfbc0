"""Per-layer progress on stderr, shown only when the work takes more than a moment.

Example:
    >>> from tucker_fx._internal.progress import Progress
    >>> p = Progress(enabled=False)
    >>> p.step(1, 3, "c1")   # prints nothing when disabled
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


class Progress:
    """``enabled``: True always prints, False never, None prints once ``delay`` seconds passed."""

    def __init__(self, enabled: Optional[bool] = None, *, delay: float = 1.0,
                 stream: Optional[TextIO] = None) -> None:
        self.enabled, self.delay = enabled, delay
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.printed = False

    def _active(self) -> bool:
        if self.enabled is None:
            return time.perf_counter() - self.start >= self.delay
        return self.enabled

    def step(self, i: int, n: Optional[int], what: str) -> None:
        """One line ``[tucker_fx i/n 1.2s] what`` (``i`` alone when ``n`` is unknown)."""
        if not self._active():
            return
        elapsed = time.perf_counter() - self.start
        count = f"{i}/{n}" if n is not None else str(i)
        print(f"[tucker_fx {count} {elapsed:5.1f}s] {what}", file=self.stream, flush=True)
        self.printed = True
