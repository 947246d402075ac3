"""The feedback store: attribution per card type, duplicates, reasons, comments, threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fhir_dm.cds.feedback import FeedbackStore, IssuedCardRecord
from fhir_dm.cds.models import FeedbackRequest

SERVICE = "dm-cancer-screening"
REASONS = "http://fhir-dm.org/fhir/CodeSystem/dm-cds-override-reason"


def items(*feedback: dict[str, Any]) -> Any:
    return FeedbackRequest.model_validate({"feedback": list(feedback)}).feedback


def accepted(card: str, at: str = "2024-04-15T10:00:00Z") -> dict[str, Any]:
    return {
        "card": card,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": "s"}],
        "outcomeTimestamp": at,
    }


def overridden(
    card: str, code: str | None = None, comment: str | None = None, at: str = "2024-04-15T10:00:00Z"
) -> dict[str, Any]:
    item: dict[str, Any] = {"card": card, "outcome": "overridden", "outcomeTimestamp": at}
    reason: dict[str, Any] = {}
    if code:
        reason["reason"] = {"system": REASONS, "code": code}
    if comment:
        reason["userComment"] = comment
    if reason:
        item["overrideReason"] = reason
    return item


def display(system: str | None, code: str | None) -> str | None:
    return {"patient-declined": "Patient declined cancer screening"}.get(code or "")


@pytest.fixture
def store() -> FeedbackStore:
    s = FeedbackStore()
    s.record_issued(
        SERVICE,
        [
            IssuedCardRecord("c1", "screening-plan", "high", "s"),
            IssuedCardRecord("c2", "screening-plan", "moderate", "s2"),
            IssuedCardRecord("c3", "plan-on-file", "high"),
        ],
    )
    return s


def test_counts_per_card_type_and_reason(store: FeedbackStore) -> None:
    receipt = store.record_feedback(
        SERVICE,
        items(
            accepted("c1"),
            overridden("c2", "patient-declined", comment="pt prefers later"),
            overridden("c3"),
            overridden("zz", "not-appropriate"),
        ),
        reason_display=display,
    )
    assert (receipt.stored, receipt.duplicates, receipt.unattributed) == (4, 0, 1)
    summary = store.summary(SERVICE).as_json()
    assert summary["cardTypes"] == {
        "plan-on-file": {"issued": 1, "accepted": 0, "overridden": 1},
        "screening-plan": {"issued": 2, "accepted": 1, "overridden": 1},
        "unknown": {"issued": 0, "accepted": 0, "overridden": 1},
    }
    assert summary["overrideReasons"] == [
        {"system": REASONS, "code": "not-appropriate", "display": "", "count": 1},
        {
            "system": REASONS,
            "code": "patient-declined",
            "display": "Patient declined cancer screening",
            "count": 1,
        },
    ]
    assert summary["overriddenWithoutReason"] == 1
    assert summary["comments"] == 1


def test_duplicates_are_counted_once(store: FeedbackStore) -> None:
    store.record_feedback(SERVICE, items(accepted("c1")))
    # The same instant in another zone is the same feedback.
    receipt = store.record_feedback(SERVICE, items(accepted("c1", "2024-04-15T12:00:00+02:00")))
    assert (receipt.stored, receipt.duplicates) == (0, 1)
    assert store.summary(SERVICE).card_types["screening-plan"].accepted == 1


def test_comments_are_not_kept_unless_asked(tmp_path: Path) -> None:
    path = str(tmp_path / "fb.sqlite3")
    with FeedbackStore(path) as store:
        store.record_feedback(SERVICE, items(overridden("c", comment="Mrs X declined")))
    with FeedbackStore(path) as store:
        rows = store._db.execute("SELECT has_comment, comment FROM feedback").fetchall()
    assert rows == [(1, None)]
    with FeedbackStore(str(tmp_path / "keep.sqlite3"), keep_comments=True) as store:
        store.record_feedback(SERVICE, items(overridden("c", comment="kept")))
        assert store._db.execute("SELECT comment FROM feedback").fetchall() == [("kept",)]


def test_file_store_survives_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "fb.sqlite3")
    with FeedbackStore(path) as store:
        store.record_issued(SERVICE, [IssuedCardRecord("c1", "screening-plan")])
    with FeedbackStore(path) as store:
        store.record_feedback(SERVICE, items(accepted("c1")))
        assert store.summary(SERVICE).card_types["screening-plan"].accepted == 1


def test_old_issued_cards_are_pruned() -> None:
    now = [1_000_000.0]
    store = FeedbackStore(retention_days=1, clock=lambda: now[0])
    store.record_issued(SERVICE, [IssuedCardRecord("old", "screening-plan")])
    now[0] += 2 * 86400
    store.record_issued(SERVICE, [IssuedCardRecord("new", "screening-plan")])
    assert store.summary(SERVICE).card_types["screening-plan"].issued == 1


def test_services_are_counted_apart(store: FeedbackStore) -> None:
    store.record_feedback("other-service", items(accepted("c1")))
    assert store.summary("other-service").card_types == {
        "unknown": store.summary("other-service").card_types["unknown"]
    }
    assert store.summary(SERVICE).card_types["screening-plan"].accepted == 0


def test_thread_safe(store: FeedbackStore) -> None:
    def work(n: int) -> None:
        store.record_issued(SERVICE, [IssuedCardRecord(f"t{n}", "screening-plan")])
        store.record_feedback(SERVICE, items(accepted(f"t{n}")))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(work, range(200)))
    counts = store.summary(SERVICE).card_types["screening-plan"]
    assert (counts.issued, counts.accepted) == (202, 200)
