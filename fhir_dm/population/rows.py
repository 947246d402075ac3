"""One patient's place in the population: tier, items and their status, who is responsible.

A `PatientRow` is what the worklist and the measures read, and what a run's state file keeps
per patient; it is plain data (JSON round-trip), made from a core `PatientResult` and the
server's Patient (for `managingOrganization` / `generalPractitioner`).

Each item carries its status on the evaluation date (clinical-logic §13: upcoming, due,
overdue, done, done-late, missed) and what it is for the measures (§11 rev 3): a firm IMACS
cancer-screening item (the only kind the four screening measures count), a lung-surveillance
item (its own measure), or neither ("consider" items, the antibody panel, not-IMACS items).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from fhir_dm.core.assess import PatientResult
from fhir_dm.core.plan import CANCER_SCREENING_KINDS, Plan, PlanItem
from fhir_dm.knowledge.models import Knowledge

# Scopes whose patients the guideline applies to, or applied to until their window closed: a
# closed plan keeps its done and missed items, so its rounds still count (§11, §13).
GUIDELINE_SCOPES = frozenset({"in-scope", "window-closed"})
LUNG_KIND = "surveillance"


@dataclass(frozen=True, slots=True)
class ItemRow:
    """One planned test in one round, with its status on the evaluation date."""

    round_id: str
    round_label: str
    test_id: str
    test: str
    due_start: str
    due_end: str
    status: str  # upcoming / due / overdue / done / done-late / missed
    conditional: bool
    done_on: str | None = None
    # A firm item of IMACS cancer screening (not "consider", not labelled not-IMACS, there for
    # a screening rule): the only items the four screening measures count.
    imacs_screening: bool = False
    # A lung-surveillance item (not IMACS): counted in the lung measure only.
    lung: bool = False
    not_imacs: bool = False
    lapses_on: str | None = None

    @property
    def due_start_date(self) -> date:
        return date.fromisoformat(self.due_start)

    @property
    def due_end_date(self) -> date:
        return date.fromisoformat(self.due_end)

    @property
    def firm(self) -> bool:
        return not self.conditional

    def done_on_time(self) -> bool:
        """Done inside its due window or the lookback before it (not "done late")."""
        return self.status == "done"

    def done_late(self) -> bool:
        return self.status == "done-late"


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
    scope: str = ""
    # The plan (CarePlan) is active: something is owed or open, or the window still runs.
    plan_open: bool = False

    @property
    def guideline(self) -> bool:
        """In scope now, or was until its window closed (its rounds still count)."""
        return self.scope in GUIDELINE_SCOPES and self.tier is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PatientRow:
        """A row as `to_json` wrote it. A row written before items said what they count for
        (no `scope`) raises KeyError: a resumed run then assesses the patient again rather
        than measure it wrongly."""
        if "scope" not in data:
            raise KeyError("scope")
        return cls(**{**data, "items": tuple(ItemRow(**i) for i in data.get("items") or ())})


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


def is_imacs_screening(item: PlanItem) -> bool:
    """A firm IMACS cancer-screening item: the only kind the screening measures count."""
    return (
        not item.conditional
        and not item.labelled_not_imacs
        and any(r.kind in CANCER_SCREENING_KINDS for r in item.rules)
    )


def is_lung(item: PlanItem) -> bool:
    return any(r.kind == LUNG_KIND for r in item.rules)


def _item(plan: Plan, item: PlanItem, knowledge: Knowledge) -> ItemRow:
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
        imacs_screening=is_imacs_screening(item),
        lung=is_lung(item),
        not_imacs=item.labelled_not_imacs,
        lapses_on=item.lapses_on.isoformat() if item.lapses_on is not None else None,
    )


def patient_row(
    result: PatientResult,
    patient: Mapping[str, Any] | None,
    knowledge: Knowledge,
    reference: str | None = None,
) -> PatientRow:
    """The row of one assessed patient (missed items kept: they count as not on time)."""
    plan = result.plan
    a = plan.assessment
    organization, practitioner = responsible(patient or {})
    items = tuple(_item(plan, i, knowledge) for i in plan.items)
    # As the CarePlan's status: completed once the window has closed and nothing is open.
    plan_open = plan.open
    return PatientRow(
        patient=reference or result.patient_reference,
        in_scope=a.in_scope,
        tier=result.tier,
        preliminary=a.preliminary,
        now=a.now.isoformat(),
        organization=organization,
        practitioner=practitioner,
        items=items,
        scope=a.scope,
        plan_open=plan_open,
    )
