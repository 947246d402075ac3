"""When and how long to wait before repeating a failed FHIR call; only safe calls repeat.

The repeating itself is tenacity's (`fhir_dm.fhir.client.FhirClient._request`): this policy
gives each wait, and the client stops when the wait would outlast the request's deadline.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF_FACTOR = 0.5
DEFAULT_MAX_BACKOFF = 30.0
DEFAULT_RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to back off; the caller decides whether a call is safe to repeat.

    Usage::

        policy = RetryPolicy(max_retries=3, backoff_factor=0.5, max_backoff=30)
        policy.delay(0, None)   # 0.5 s before the first retry, then 1 s, 2 s, ...
        policy.delay(0, "2")    # the server's Retry-After wins: 2 s
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR
    max_backoff: float = DEFAULT_MAX_BACKOFF
    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES

    def retries_status(self, status: int) -> bool:
        """Whether an HTTP status is transient (overload, gateway trouble) and worth repeating."""
        return status in self.retry_statuses

    def delay(
        self, attempt: int, retry_after_header: str | None, *, now: float | None = None
    ) -> float:
        """Seconds to wait before retry number `attempt` (0-based), never above max_backoff.

        A `Retry-After` header (delta-seconds or HTTP-date, compared with `now`, epoch seconds)
        is the server telling us when it can cope again, so it beats exponential backoff.
        """
        retry_after = parse_retry_after(retry_after_header, now=now)
        if retry_after is None:
            retry_after = self.backoff_factor * (2**attempt)
        return min(retry_after, self.max_backoff)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks us to wait, or None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def is_idempotent_bundle(bundle: Mapping[str, Any]) -> bool:
    """Whether posting this transaction twice has the effect of posting it once.

    True when every entry is a read, a PUT or DELETE, a conditional create (`ifNoneExist`) or a
    versioned PATCH (`ifMatch`): a repeat then finds its own first write and changes nothing.
    """
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        return False
    for entry in entries:
        request = entry.get("request") if isinstance(entry, Mapping) else None
        if not isinstance(request, Mapping):
            return False
        method = str(request.get("method", "")).upper()
        if method in ("GET", "HEAD", "PUT", "DELETE"):
            continue
        if method == "POST" and request.get("ifNoneExist"):
            continue
        if method == "PATCH" and request.get("ifMatch"):
            continue
        return False
    return True
