"""The worklist: overdue and soon-due screening items, most overdue first (clinical-logic §11).

An item is on it when it is overdue, or not done and its due window ends within
`worklist.soon_due_days` of the evaluation date. Superseded rounds are not listed (the next
round replaced them); "consider" items are listed and said to be conditional.
Output as CSV and as a FHIR `List` of the patients (one entry per patient, its items in the
entry's flag text), in the same order.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from fhir_dm.population.rows import PatientRow

CSV_COLUMNS = (
    "patient",
    "tier",
    "round",
    "item",
    "conditional",
    "due_start",
    "due_end",
    "status",
    "days_overdue",
    "organization",
    "practitioner",
)


@dataclass(frozen=True, slots=True)
class WorkItem:
    patient: str
    tier: str
    round_label: str
    test: str
    conditional: bool
    due_start: str
    due_end: str
    status: str
    days_overdue: int
    organization: str
    practitioner: str

    def csv_row(self) -> list[str]:
        return [
            self.patient,
            self.tier,
            self.round_label,
            self.test,
            "yes" if self.conditional else "no",
            self.due_start,
            self.due_end,
            self.status,
            str(self.days_overdue),
            self.organization,
            self.practitioner,
        ]


def worklist(rows: Iterable[PatientRow], now: date, soon_due_days: int) -> list[WorkItem]:
    """Items owed now or soon, most days overdue first, then the soonest due, then patient."""
    horizon = now + timedelta(days=soon_due_days)
    out: list[WorkItem] = []
    for row in rows:
        for item in row.items:
            if item.superseded or item.status == "done":
                continue
            end = item.due_end_date
            overdue = end < now
            if not overdue and end > horizon:
                continue
            out.append(
                WorkItem(
                    patient=row.patient,
                    tier=row.tier or "",
                    round_label=item.round_label,
                    test=item.test,
                    conditional=item.conditional,
                    due_start=item.due_start,
                    due_end=item.due_end,
                    status="overdue" if overdue else "due soon",
                    days_overdue=(now - end).days if overdue else 0,
                    organization=row.organization or "",
                    practitioner=row.practitioner or "",
                )
            )
    out.sort(key=lambda w: (-w.days_overdue, w.due_end, w.patient, w.round_label, w.test))
    return out


def to_csv(items: Iterable[WorkItem]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(item.csv_row() for item in items)
    return buffer.getvalue()


def _flag(items: list[WorkItem]) -> str:
    parts = []
    for w in items:
        when = f"{w.days_overdue} days overdue" if w.status == "overdue" else f"due by {w.due_end}"
        consider = " (consider)" if w.conditional else ""
        parts.append(f"{w.test}{consider}, {w.round_label}: {when}")
    return "; ".join(parts)


def to_fhir_list(items: list[WorkItem], now: date) -> dict[str, Any]:
    """A FHIR R4 `List` (working, current) of the worklist's patients, most overdue first."""
    by_patient: dict[str, list[WorkItem]] = {}
    for item in items:
        by_patient.setdefault(item.patient, []).append(item)
    entries = []
    for patient, owed in by_patient.items():
        entries.append({"flag": {"text": _flag(owed)}, "item": {"reference": patient}})
    moment = datetime.combine(now, time(0, 0), tzinfo=UTC)
    resource: dict[str, Any] = {
        "resourceType": "List",
        "status": "current",
        "mode": "working",
        "title": "IIM cancer screening worklist: overdue and soon-due items",
        "date": moment.isoformat(),
        "orderedBy": {"text": "Most days overdue first, then soonest due"},
    }
    if entries:
        resource["entry"] = entries
    else:
        resource["emptyReason"] = {"text": "No overdue or soon-due items"}
    return resource
