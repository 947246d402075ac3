"""The worklist (clinical-logic §11 rev 3): what is owed, in three sections, in this order.

1. overdue: every firm item overdue on the evaluation date (after the lapse rules of §13),
   most days overdue first;
2. due soon: every firm item not done whose due window ends within `worklist.soon_due_days`
   of the evaluation date, soonest first;
3. consider: "consider" items that are open and inside their due window (not done, not
   lapsed), in their own section: never overdue, never owed; past its window a "consider"
   item stays open in the plan but no longer keeps the patient on the worklist.
Firm items are all the plan owes: cancer screening, lung surveillance and the antibody panel
(the `kind` column says which). Done and missed (lapsed) items are never listed, so a patient
whose firm items are all done is in no firm section. Ties are broken by patient id.
Output as CSV and as a FHIR `List` (one entry per patient and section, its items in the
entry's flag text), in the same order.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from fhir_dm.population.rows import ItemRow, PatientRow

SECTIONS = ("overdue", "due soon", "consider")
CSV_COLUMNS = (
    "section",
    "patient",
    "tier",
    "round",
    "item",
    "kind",
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
    status: str  # the section: overdue, due soon, consider
    patient: str
    tier: str
    round_label: str
    test: str
    kind: str  # cancer screening (IMACS), lung (not IMACS), other
    conditional: bool
    due_start: str
    due_end: str
    days_overdue: int
    organization: str
    practitioner: str

    def csv_row(self) -> list[str]:
        return [
            self.status,
            self.patient,
            self.tier,
            self.round_label,
            self.test,
            self.kind,
            "yes" if self.conditional else "no",
            self.due_start,
            self.due_end,
            str(self.days_overdue),
            self.organization,
            self.practitioner,
        ]


def _kind(item: ItemRow) -> str:
    if item.lung:
        return "lung (not IMACS)"
    if item.not_imacs:
        return "not IMACS"
    if item.imacs_screening or (item.conditional and not item.not_imacs):
        return "cancer screening"
    return "other"


def _section(item: ItemRow, now: date, horizon: date) -> str | None:
    if item.conditional:
        # Open and inside its own due window: a "consider" item past its window stays open in
        # the plan but does not keep a patient whose firm items are done on the worklist.
        return "consider" if item.status == "due" and item.due_end_date >= now else None
    if item.status == "overdue":
        return "overdue"
    if item.status in ("due", "upcoming") and item.due_end_date <= horizon:
        return "due soon"
    return None


def worklist(rows: Iterable[PatientRow], now: date, soon_due_days: int) -> list[WorkItem]:
    """The three sections in order; see the module docstring."""
    horizon = now + timedelta(days=soon_due_days)
    out: list[WorkItem] = []
    for row in rows:
        for item in row.items:
            section = _section(item, now, horizon)
            if section is None:
                continue
            end = item.due_end_date
            out.append(
                WorkItem(
                    status=section,
                    patient=row.patient,
                    tier=row.tier or "",
                    round_label=item.round_label,
                    test=item.test,
                    kind=_kind(item),
                    conditional=item.conditional,
                    due_start=item.due_start,
                    due_end=item.due_end,
                    days_overdue=(now - end).days if section == "overdue" else 0,
                    organization=row.organization or "",
                    practitioner=row.practitioner or "",
                )
            )
    out.sort(
        key=lambda w: (
            SECTIONS.index(w.status),
            -w.days_overdue,
            w.due_end if w.status == "due soon" else "",
            w.patient,
            w.due_start,
            w.round_label,
            w.test,
        )
    )
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
        if w.status == "overdue":
            when = f"{w.days_overdue} days overdue"
        elif w.status == "due soon":
            when = f"due by {w.due_end}"
        else:
            when = f"consider (open, window {w.due_start} to {w.due_end})"
        parts.append(f"{w.test}, {w.round_label}: {when}")
    return f"{items[0].status}: " + "; ".join(parts)


def to_fhir_list(items: list[WorkItem], now: date) -> dict[str, Any]:
    """A FHIR R4 `List` (working, current): one entry per section and patient, in the
    worklist's order (overdue, due soon, then the "consider" section)."""
    groups: dict[tuple[str, str], list[WorkItem]] = {}
    for item in items:
        groups.setdefault((item.status, item.patient), []).append(item)
    entries = [
        {"flag": {"text": _flag(owed)}, "item": {"reference": patient}}
        for (_, patient), owed in groups.items()
    ]
    moment = datetime.combine(now, time(0, 0), tzinfo=UTC)
    resource: dict[str, Any] = {
        "resourceType": "List",
        "status": "current",
        "mode": "working",
        "title": "IIM screening worklist: overdue, soon-due and open 'consider' items",
        "date": moment.isoformat(),
        "orderedBy": {
            "text": "Overdue (most days first), then due soon (soonest first), then 'consider'"
        },
    }
    if entries:
        resource["entry"] = entries
    else:
        resource["emptyReason"] = {"text": "No overdue, soon-due or open 'consider' items"}
    return resource
