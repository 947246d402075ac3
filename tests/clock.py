"""A clock the tests move by hand, for code that takes `clock: Callable[[], float]`."""

from __future__ import annotations

import time


class FakeClock:
    """Seconds since the epoch (the wall clock's at creation unless given); moved by hand."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
