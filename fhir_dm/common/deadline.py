"""A per-request time budget that every wait at the service's edges respects.

The web service answers within its deadline whatever the FHIR server does: every FHIR call's
timeouts are cut to the time left, a retry whose back-off (or `Retry-After`) would outlast it
is not made, and a patient lock is waited for only until then. The core never sees it.

Usage::

    with within(Deadline.after(25.0)):
        ...                       # FhirClient calls, PatientLocks.hold(), token requests
    remaining_or_none()          # None outside any deadline: wait as configured
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

from fhir_dm.common.errors import DeadlineExceededError

# Below this, a call cannot usefully start: fail at once rather than with a zero timeout.
MIN_CALL_SECONDS = 0.05

_current: ContextVar[Deadline | None] = ContextVar("fhir_dm_deadline", default=None)


@dataclass(frozen=True, slots=True)
class Deadline:
    """A moment on the monotonic clock by which the request must be answered."""

    seconds: float  # the whole budget, for messages and Retry-After hints
    expires_at: float
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    @classmethod
    def after(cls, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> Deadline:
        """A deadline `seconds` from now."""
        return cls(seconds, clock() + seconds, clock)

    def remaining(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.expires_at - self.clock())

    def cap(self, seconds: float) -> float:
        """`seconds`, or the time left if that is shorter."""
        return min(seconds, self.remaining())

    def check(self, what: str) -> float:
        """The time left; DeadlineExceededError when too little is left to start `what`."""
        left = self.remaining()
        if left < MIN_CALL_SECONDS:
            raise DeadlineExceededError(
                f"{what}: the request's time limit of {self.seconds:g} s ran out"
            )
        return left

    def retry_after(self) -> int:
        """A whole number of seconds after which a request like this one has surely finished."""
        return max(1, math.ceil(self.seconds))


def current() -> Deadline | None:
    """The deadline of the request being handled in this context, if any."""
    return _current.get()


def remaining_or_none() -> float | None:
    """Seconds left of the current deadline, or None when there is none."""
    deadline = _current.get()
    return None if deadline is None else deadline.remaining()


@contextmanager
def within(deadline: Deadline | None) -> Iterator[Deadline | None]:
    """Make `deadline` the current one for the body of the `with` block (None: no deadline)."""
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


def enter(deadline: Deadline | None) -> Token[Deadline | None]:
    """Set the current deadline where a `with` block does not fit (request hooks)."""
    return _current.set(deadline)


def leave(token: Token[Deadline | None]) -> None:
    """Undo `enter`; from another context (a torn-down request), just clear it."""
    try:
        _current.reset(token)
    except ValueError:
        _current.set(None)


def cap_timeout(
    timeout: tuple[float, float], deadline: Deadline | None, what: str
) -> tuple[float, float]:
    """(connect, read) timeouts cut to the deadline; DeadlineExceededError if nothing is left."""
    if deadline is None:
        return timeout
    left = deadline.check(what)
    return min(timeout[0], left), min(timeout[1], left)
