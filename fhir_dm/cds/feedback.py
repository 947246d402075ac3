"""Feedback store (sqlite3, a file or `:memory:`): issued cards and what clinicians did with them.

Every card the service returns is recorded with its type (card uuid -> type), so feedback,
which names only the card uuid, can be counted per card type. Feedback is de-duplicated on
(service, card, outcome, timestamp, reason): CDS clients may send the same feedback twice.
Override comments are free text that may hold patient data, so only their presence is kept
unless `keep_comments` is set.

A file is shared by every worker process of a host (WAL, a busy timeout, and one connection
per process, opened again after a fork); `:memory:` is for tests only. `CdsStore` is what the
web edge needs; `fhir_dm.cds.redis_store.RedisFeedbackStore` is the same for several hosts.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from fhir_dm.cds.models import FeedbackItem

MEMORY = ":memory:"
UNKNOWN_CARD_TYPE = "unknown"
DEFAULT_RETENTION_DAYS = 365
MAX_COMMENT_CHARS = 1000
BUSY_TIMEOUT_SECONDS = 10.0
_DAY_SECONDS = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued_card (
    card_uuid TEXT PRIMARY KEY,
    service_id TEXT NOT NULL,
    card_type TEXT NOT NULL,
    tier TEXT NOT NULL DEFAULT '',
    suggestion_uuid TEXT NOT NULL DEFAULT '',
    issued_at REAL NOT NULL,
    patient_id TEXT NOT NULL DEFAULT '',
    write_note TEXT NOT NULL DEFAULT ''
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
CREATE TABLE IF NOT EXISTS accepted_write (
    service_id TEXT NOT NULL,
    card_uuid TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (service_id, card_uuid)
);
"""
# Columns added after the first release: added to an older file when it is opened.
_ADDED_COLUMNS = {
    "issued_card": {
        "patient_id": "TEXT NOT NULL DEFAULT ''",
        "write_note": "TEXT NOT NULL DEFAULT ''",
    }
}


@dataclass(frozen=True, slots=True)
class IssuedCardRecord:
    """What is remembered about a returned card.

    `patient_id` is kept only when the site writes accepted plans itself (`write_on_accept`),
    and is cleared once that plan is written. `write_note` says why an accepted suggestion of
    the card will not be written (e.g. the call named another FHIR server): feedback answers
    say it instead of pretending the plan was handled. It names servers, never patients.
    """

    card_uuid: str
    card_type: str
    tier: str | None = None
    suggestion_uuid: str | None = None
    patient_id: str | None = None
    write_note: str | None = None


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


class CdsStore(Protocol):
    """What the CDS Hooks edge keeps, shared by every worker: cards, feedback, plan writes."""

    def record_issued(self, service_id: str, cards: Iterable[IssuedCardRecord]) -> None: ...

    def record_feedback(
        self,
        service_id: str,
        items: Sequence[FeedbackItem],
        *,
        reason_display: Callable[[str | None, str | None], str | None] = ...,
    ) -> FeedbackReceipt: ...

    def summary(self, service_id: str) -> FeedbackSummary: ...

    def issued_card(self, service_id: str, card_uuid: str) -> IssuedCardRecord | None: ...

    def claim_write(self, service_id: str, card_uuid: str, *, stale_after: float) -> bool: ...

    def finish_write(self, service_id: str, card_uuid: str) -> None: ...

    def release_write(self, service_id: str, card_uuid: str) -> None: ...

    def close(self) -> None: ...


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
        self._path = path
        self._keep_comments = keep_comments
        self._retention = retention_days * _DAY_SECONDS
        self._clock = clock
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._conn = self._open()

    @property
    def _db(self) -> sqlite3.Connection:
        """This process's connection: a connection inherited through fork() is never used."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        if self._path != MEMORY:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self._path,
            check_same_thread=False,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_SECONDS,
        )
        if self._path != MEMORY:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    # Another worker may add it first: then the column is there all the same.
                    with contextlib.suppress(sqlite3.OperationalError):
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
        return db

    def record_issued(self, service_id: str, cards: Iterable[IssuedCardRecord]) -> None:
        """Remember returned cards (idempotent per card uuid); drop rows past retention."""
        now = self._clock()
        rows = [
            (
                c.card_uuid,
                service_id,
                c.card_type,
                c.tier or "",
                c.suggestion_uuid or "",
                now,
                c.patient_id or "",
                c.write_note or "",
            )
            for c in cards
        ]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO issued_card (card_uuid, service_id, card_type, tier,"
                    " suggestion_uuid, issued_at, patient_id, write_note)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
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
            self._db.execute("BEGIN IMMEDIATE")
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
            # Per card, not per click: a card accepted twice (or sent twice) counts once.
            outcomes = self._db.execute(
                "SELECT card_type, outcome, COUNT(DISTINCT card_uuid) FROM feedback"
                " WHERE service_id = ?"
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

    def issued_card(self, service_id: str, card_uuid: str) -> IssuedCardRecord | None:
        """The record of a returned card, or None (unknown, or past retention)."""
        with self._lock:
            row = self._db.execute(
                "SELECT card_type, tier, suggestion_uuid, patient_id, write_note FROM issued_card"
                " WHERE card_uuid = ? AND service_id = ?",
                (card_uuid, service_id),
            ).fetchone()
        if row is None:
            return None
        return IssuedCardRecord(
            card_uuid, row[0], row[1] or None, row[2] or None, row[3] or None, row[4] or None
        )

    def claim_write(self, service_id: str, card_uuid: str, *, stale_after: float) -> bool:
        """Atomically claim writing the card's plan: True for exactly one caller.

        A claim left `pending` longer than `stale_after` seconds (a worker died mid-write) may
        be claimed again; a finished one never.
        """
        now = self._clock()
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO accepted_write (service_id, card_uuid, state, updated_at)"
                " VALUES (?, ?, 'pending', ?) ON CONFLICT (service_id, card_uuid) DO UPDATE"
                " SET state = 'pending', updated_at = excluded.updated_at"
                " WHERE accepted_write.state = 'pending' AND accepted_write.updated_at < ?",
                (service_id, card_uuid, now, now - stale_after),
            )
            return cursor.rowcount == 1

    def finish_write(self, service_id: str, card_uuid: str) -> None:
        """The plan is on the EHR's server: keep the claim for good, forget the patient id."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "UPDATE accepted_write SET state = 'done', updated_at = ?"
                    " WHERE service_id = ? AND card_uuid = ?",
                    (now, service_id, card_uuid),
                )
                self._db.execute(
                    "UPDATE issued_card SET patient_id = '' WHERE service_id = ? AND card_uuid = ?",
                    (service_id, card_uuid),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def release_write(self, service_id: str, card_uuid: str) -> None:
        """The write failed: let a later accepted feedback try again."""
        with self._lock:
            self._db.execute(
                "DELETE FROM accepted_write WHERE service_id = ? AND card_uuid = ?"
                " AND state = 'pending'",
                (service_id, card_uuid),
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
