"""Feedback store (sqlite3, a file or `:memory:`): issued cards and what clinicians did with them.

Every card the service returns is recorded with its type (card uuid -> type), so feedback,
which names only the card uuid, can be counted per card type. Feedback is de-duplicated on
(service, card, outcome, timestamp, reason): CDS clients may send the same feedback twice.
Override comments are free text that may hold patient data, so only their presence is kept
unless `keep_comments` is set. One connection behind a lock: safe across threads.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from fhir_dm.cds.models import FeedbackItem

MEMORY = ":memory:"
UNKNOWN_CARD_TYPE = "unknown"
DEFAULT_RETENTION_DAYS = 365
MAX_COMMENT_CHARS = 1000
_DAY_SECONDS = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued_card (
    card_uuid TEXT PRIMARY KEY,
    service_id TEXT NOT NULL,
    card_type TEXT NOT NULL,
    tier TEXT NOT NULL DEFAULT '',
    suggestion_uuid TEXT NOT NULL DEFAULT '',
    issued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS issued_card_at ON issued_card (issued_at);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    service_id TEXT NOT NULL,
    card_uuid TEXT NOT NULL,
    card_type TEXT NOT NULL,
    outcome TEXT NOT NULL,
    accepted_suggestions INTEGER NOT NULL DEFAULT 0,
    reason_system TEXT NOT NULL DEFAULT '',
    reason_code TEXT NOT NULL DEFAULT '',
    reason_display TEXT NOT NULL DEFAULT '',
    has_comment INTEGER NOT NULL DEFAULT 0,
    comment TEXT,
    outcome_timestamp TEXT NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (service_id, card_uuid, outcome, outcome_timestamp, reason_system, reason_code)
);
"""


@dataclass(frozen=True, slots=True)
class IssuedCardRecord:
    """What is remembered about a returned card."""

    card_uuid: str
    card_type: str
    tier: str | None = None
    suggestion_uuid: str | None = None


@dataclass(frozen=True, slots=True)
class FeedbackReceipt:
    stored: int
    duplicates: int
    unattributed: int


@dataclass(slots=True)
class CardTypeCounts:
    issued: int = 0
    accepted: int = 0
    overridden: int = 0


@dataclass(frozen=True, slots=True)
class ReasonCount:
    system: str
    code: str
    display: str
    count: int


@dataclass(frozen=True, slots=True)
class FeedbackSummary:
    """Counts for one service; `card_types` includes `unknown` for unattributable feedback."""

    service_id: str
    card_types: dict[str, CardTypeCounts] = field(default_factory=dict)
    override_reasons: tuple[ReasonCount, ...] = ()
    overridden_without_reason: int = 0
    comments: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "service": self.service_id,
            "cardTypes": {
                name: {"issued": c.issued, "accepted": c.accepted, "overridden": c.overridden}
                for name, c in sorted(self.card_types.items())
            },
            "overrideReasons": [
                {"system": r.system, "code": r.code, "display": r.display, "count": r.count}
                for r in self.override_reasons
            ],
            "overriddenWithoutReason": self.overridden_without_reason,
            "comments": self.comments,
        }


class FeedbackStore:
    """Records issued cards and feedback; summarises them per card type and override reason.

    Usage::

        store = FeedbackStore("/var/lib/fhir-dm/cds-feedback.sqlite3")   # or ":memory:"
        store.record_issued("dm-cancer-screening", [IssuedCardRecord(uuid, "screening-plan")])
        store.record_feedback("dm-cancer-screening", request.feedback)
        store.summary("dm-cancer-screening").as_json()
    """

    def __init__(
        self,
        path: str = MEMORY,
        *,
        keep_comments: bool = False,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keep_comments = keep_comments
        self._retention = retention_days * _DAY_SECONDS
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if path != MEMORY:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def record_issued(self, service_id: str, cards: Iterable[IssuedCardRecord]) -> None:
        """Remember returned cards (idempotent per card uuid); drop rows past retention."""
        now = self._clock()
        rows = [
            (c.card_uuid, service_id, c.card_type, c.tier or "", c.suggestion_uuid or "", now)
            for c in cards
        ]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO issued_card VALUES (?, ?, ?, ?, ?, ?)", rows
                )
                self._db.execute(
                    "DELETE FROM issued_card WHERE issued_at < ?", (now - self._retention,)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def record_feedback(
        self,
        service_id: str,
        items: Sequence[FeedbackItem],
        *,
        reason_display: Callable[[str | None, str | None], str | None] = lambda s, c: None,
    ) -> FeedbackReceipt:
        """Store feedback items; duplicates are counted, not stored again."""
        now = self._clock()
        stored = duplicates = unattributed = 0
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for item in items:
                    row = self._db.execute(
                        "SELECT card_type FROM issued_card WHERE card_uuid = ? AND service_id = ?",
                        (item.card, service_id),
                    ).fetchone()
                    card_type = row[0] if row else UNKNOWN_CARD_TYPE
                    if row is None:
                        unattributed += 1
                    reason = item.override_reason.reason if item.override_reason else None
                    comment = item.override_reason.user_comment if item.override_reason else None
                    system = reason.system if reason else ""
                    code = reason.code if reason else ""
                    display = (
                        reason_display(system, code) or (reason.display if reason else "") or ""
                    )
                    cursor = self._db.execute(
                        "INSERT OR IGNORE INTO feedback (service_id, card_uuid, card_type, outcome,"
                        " accepted_suggestions, reason_system, reason_code, reason_display,"
                        " has_comment, comment, outcome_timestamp, received_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            service_id,
                            item.card,
                            card_type,
                            item.outcome,
                            len(item.accepted_suggestions or ()),
                            system,
                            code,
                            display,
                            int(bool(comment and comment.strip())),
                            comment[:MAX_COMMENT_CHARS]
                            if comment and self._keep_comments
                            else None,
                            _utc_iso(item.outcome_timestamp),
                            now,
                        ),
                    )
                    if cursor.rowcount:
                        stored += 1
                    else:
                        duplicates += 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return FeedbackReceipt(stored, duplicates, unattributed)

    def summary(self, service_id: str) -> FeedbackSummary:
        """Issued / accepted / overridden per card type, and override reasons by count."""
        with self._lock:
            issued = self._db.execute(
                "SELECT card_type, COUNT(*) FROM issued_card WHERE service_id = ?"
                " GROUP BY card_type",
                (service_id,),
            ).fetchall()
            outcomes = self._db.execute(
                "SELECT card_type, outcome, COUNT(*) FROM feedback WHERE service_id = ?"
                " GROUP BY card_type, outcome",
                (service_id,),
            ).fetchall()
            reasons = self._db.execute(
                "SELECT reason_system, reason_code, MAX(reason_display), COUNT(*) FROM feedback"
                " WHERE service_id = ? AND outcome = 'overridden' AND reason_code != ''"
                " GROUP BY reason_system, reason_code ORDER BY COUNT(*) DESC, reason_code",
                (service_id,),
            ).fetchall()
            (no_reason,) = self._db.execute(
                "SELECT COUNT(*) FROM feedback WHERE service_id = ? AND outcome = 'overridden'"
                " AND reason_code = ''",
                (service_id,),
            ).fetchone()
            (comments,) = self._db.execute(
                "SELECT COUNT(*) FROM feedback WHERE service_id = ? AND has_comment = 1",
                (service_id,),
            ).fetchone()
        counts: dict[str, CardTypeCounts] = {}
        for card_type, n in issued:
            counts.setdefault(card_type, CardTypeCounts()).issued = n
        for card_type, outcome, n in outcomes:
            entry = counts.setdefault(card_type, CardTypeCounts())
            if outcome == "accepted":
                entry.accepted = n
            else:
                entry.overridden = n
        return FeedbackSummary(
            service_id=service_id,
            card_types=counts,
            override_reasons=tuple(ReasonCount(s, c, d, n) for s, c, d, n in reasons),
            overridden_without_reason=no_reason,
            comments=comments,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _utc_iso(moment: datetime) -> str:
    """A canonical UTC form, so the same instant sent twice is recognised as a duplicate."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")
