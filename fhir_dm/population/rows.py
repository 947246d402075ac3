"""One patient's place in the population: tier, items and their status, who is responsible.

A `PatientRow` is what the worklist and the measures read, and what a run's state file keeps
per patient; it is plain data (JSON round-trip), made from a core `PatientResult` and the
server's Patient (for `managingOrganization` / `generalPractitioner`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from fhir_dm.core.assess import PatientResult
from fhir_dm.core.plan import Plan, PlanItem
from fhir_dm.knowledge.models import Knowledge


@dataclass(frozen=True, slots=True)
class ItemRow:
    """One planned test in one round, with its status on the evaluation date."""

    round_id: str
    round_label: str
    test_id: str
    test: str
    due_start: str
    due_end: str
    status: str  # done / overdue / due / upcoming
    conditional: bool
    done_on: str | None = None
    superseded: bool = False

    @property
    def due_end_date(self) -> date:
        return date.fromisoformat(self.due_end)

    def done_on_time(self) -> bool:
        """Done no later than the end of its due window (lookback before it counts too)."""
        return self.done_on is not None and date.fromisoformat(self.done_on) <= self.due_end_date


@dataclass(frozen=True, slots=True)
class PatientRow:
    """A patient as the population view sees it."""

    patient: str  # "Patient/<id>"
    in_scope: bool
    tier: str | None
    preliminary: bool
    now: str
    organization: str | None
    practitioner: str | None
    items: tuple[ItemRow, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PatientRow:
        items = tuple(ItemRow(**i) for i in data.get("items") or ())
        return cls(**{**data, "items": items})


def _reference(value: Any) -> str | None:
    if isinstance(value, Mapping):
        ref = value.get("reference")
        if isinstance(ref, str) and ref:
            return ref
        display = value.get("display")
        return display if isinstance(display, str) and display else None
    return None


def responsible(patient: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """`Patient.managingOrganization` and the first `generalPractitioner`, as references."""
    gps = patient.get("generalPractitioner") or []
    first_gp = gps[0] if isinstance(gps, list) and gps else None
    return _reference(patient.get("managingOrganization")), _reference(first_gp)


def _item(plan: Plan, item: PlanItem, knowledge: Knowledge, *, superseded: bool) -> ItemRow:
    return ItemRow(
        round_id=item.round_id,
        round_label=item.round_label,
        test_id=item.test_id,
        test=knowledge.ruleset.tests[item.test_id].display,
        due_start=item.due_start.isoformat(),
        due_end=item.due_end.isoformat(),
        status=plan.status(item),
        conditional=item.conditional,
        done_on=item.done.when.isoformat() if item.done is not None else None,
        superseded=superseded,
    )


def patient_row(
    result: PatientResult,
    patient: Mapping[str, Any] | None,
    knowledge: Knowledge,
    reference: str | None = None,
) -> PatientRow:
    """The row of one assessed patient (superseded rounds kept: they count as not on time)."""
    plan = result.plan
    organization, practitioner = responsible(patient or {})
    items = [_item(plan, i, knowledge, superseded=plan.status(i) == "missed") for i in plan.items]
    return PatientRow(
        patient=reference or result.patient_reference,
        in_scope=plan.assessment.in_scope,
        tier=result.tier,
        preliminary=plan.assessment.preliminary,
        now=plan.assessment.now.isoformat(),
        organization=organization,
        practitioner=practitioner,
        items=tuple(items),
    )
