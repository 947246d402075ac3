"""The §11 measures: FHIR `Measure` definitions (for profiles/) and `MeasureReport` evaluation.

Evaluation is pure: it reads `PatientRow`s assessed on the period's last day and counts units
(`units`), per clinical-logic §11 rev 3:
- completion measures count only firm IMACS cancer-screening items ("consider", lung and
  not-IMACS items never count), or, for the lung measure, only firm lung items. The initial
  population: patients the guideline applies to (in scope, or their window closed: done and
  missed items stay in the plan) with a tier the measure names, one unit per patient, per round
  or per item that has such items. A unit is in the denominator when the due window of those
  items ended inside the period (its last day between the period's start and end, both
  included, and not after the evaluation date); in the numerator when every one of them was
  done within its window or the lookback before it (done late and missed are not on time).
- the overdue measure: denominator = those patients whose plan is open (the CarePlan is
  active) at the period end; numerator = those with at least one firm IMACS cancer-screening
  item overdue then (after the lapse rules of §13: a lapsed item is missed, not overdue).
Subject lists are in a stable order: patient id, then the unit's due date.
Stratifiers: tier, `Patient.managingOrganization`, `Patient.generalPractitioner`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from fhir_dm.knowledge.models import Knowledge
from fhir_dm.population.config import MeasureConfig
from fhir_dm.population.rows import ItemRow, PatientRow

Json = dict[str, Any]
POPULATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/measure-population"
SCORING_SYSTEM = "http://terminology.hl7.org/CodeSystem/measure-scoring"
IMPROVEMENT_SYSTEM = "http://terminology.hl7.org/CodeSystem/measure-improvement-notation"
POPULATIONS = ("initial-population", "denominator", "numerator")
POPULATION_DISPLAY = {
    "initial-population": "Initial Population",
    "denominator": "Denominator",
    "numerator": "Numerator",
}
NO_VALUE = "(not recorded)"
FHIRPATH = "text/fhirpath"
POPULATION_VARIABLE = {
    "initial-population": "%dmInitialPopulation",
    "denominator": "%dmDenominator",
    "numerator": "%dmNumerator",
}
# (key, description, criteria (language, expression), value of a row). The populations and the
# tier are computed by fhir-dm (`fhir-dm population measure`), so their FHIRPath criteria name
# environment variables the evaluator supplies (`%dm...`; the description says what each
# means); the responsible organisation and practitioner are plain FHIRPath on the Patient.
STRATIFIERS: tuple[tuple[str, str, tuple[str, str], Callable[[PatientRow], str]], ...] = (
    ("tier", "Risk tier", (FHIRPATH, "%dmRiskTier"), lambda r: r.tier or NO_VALUE),
    (
        "organization",
        "Patient.managingOrganization",
        (FHIRPATH, "Patient.managingOrganization.reference"),
        lambda r: r.organization or NO_VALUE,
    ),
    (
        "practitioner",
        "Patient.generalPractitioner (the first)",
        (FHIRPATH, "Patient.generalPractitioner.first().reference"),
        lambda r: r.practitioner or NO_VALUE,
    ),
)


def measure_url(knowledge: Knowledge, measure: MeasureConfig) -> str:
    return f"{knowledge.ruleset.canonical_base}/Measure/{measure.id}"


def _panel_tests(knowledge: Knowledge, measure: MeasureConfig) -> set[str] | None:
    if not measure.panels:
        return None
    return {t for p in measure.panels for t in knowledge.ruleset.panels[p].tests}


def _criteria(language: str, expression: str) -> Json:
    return {"language": language, "expression": expression}


def _population_texts(knowledge: Knowledge, measure: MeasureConfig) -> dict[str, str]:
    labels = {lvl.id: lvl.label for lvl in knowledge.ruleset.tiers.levels}
    tiers = ", ".join(labels[t] for t in measure.tiers)
    patients = (
        "adult IIM patients the guideline applies to (in scope, or their window closed),"
        f" tier: {tiers}"
    )
    if measure.kind == "overdue":
        return {
            "initial-population": f"{patients[0].upper()}{patients[1:]}, with a screening plan",
            "denominator": "Those whose plan is open (active) at the period end",
            "numerator": "Those with at least one firm IMACS cancer-screening item overdue at the"
            " period end (lapsed items are missed, not overdue); 'consider', lung and not-IMACS"
            " items never count",
        }
    if measure.items == "lung":
        what = "firm lung-surveillance items (not IMACS)"
    else:
        what = (
            "firm IMACS cancer-screening items ('consider', lung and not-IMACS items never count)"
        )
    panels = ", ".join(knowledge.ruleset.panels[p].label for p in measure.panels)
    if panels:
        what += f" of: {panels}"
    rounds = f"round(s) {', '.join(measure.rounds)}" if measure.rounds else "any round"
    on_time = "done within its due window or the lookback before it (done late or missed is not)"
    if measure.unit == "patient":
        return {
            "initial-population": f"{patients[0].upper()}{patients[1:]}, with {what} in"
            f" {rounds} of their plan",
            "denominator": f"Those whose due window ({rounds}) ended inside the period",
            "numerator": f"Those with every such item {on_time}",
        }
    if measure.unit == "round":
        return {
            "initial-population": f"Each round ({rounds}) with {what} in the plan of {patients};"
            " each round is a unit, its subject the patient",
            "denominator": "Rounds whose due window ended inside the period",
            "numerator": f"Rounds with every such item {on_time}",
        }
    return {
        "initial-population": f"Each of the {what} ({rounds}) in the plan of {patients}; each"
        " item is a unit, its subject the patient",
        "denominator": "Items whose due window ended inside the period",
        "numerator": f"Items {on_time.replace('its', 'their')}",
    }


def measure_resource(knowledge: Knowledge, measure: MeasureConfig, header: Json) -> Json:
    """The FHIR R4 Measure of one configured measure (`header`: the shared canonical metadata)."""
    texts = _population_texts(knowledge, measure)
    improvement = "decrease" if measure.kind == "overdue" else "increase"
    return {
        **header,
        "scoring": {"coding": [{"system": SCORING_SYSTEM, "code": "proportion"}]},
        "rationale": f"{measure.source} (evidence: {measure.evidence})",
        "improvementNotation": {"coding": [{"system": IMPROVEMENT_SYSTEM, "code": improvement}]},
        "group": [
            {
                "population": [
                    {
                        "code": {
                            "coding": [
                                {
                                    "system": POPULATION_SYSTEM,
                                    "code": code,
                                    "display": POPULATION_DISPLAY[code],
                                }
                            ]
                        },
                        "description": texts[code],
                        "criteria": _criteria(FHIRPATH, POPULATION_VARIABLE[code]),
                    }
                    for code in POPULATIONS
                ],
                "stratifier": [
                    {"code": {"text": key}, "description": text, "criteria": _criteria(*crit)}
                    for key, text, crit, _ in STRATIFIERS
                ],
            }
        ],
    }


@dataclass(frozen=True, slots=True)
class Unit:
    """One counted unit of a measure: a patient, or one of its rounds or items, in the
    initial population; whether it is in the denominator and the numerator."""

    row: PatientRow
    label: str  # "" for a patient; the round, or "round: test", otherwise
    order: tuple[str, str]  # within the patient: due date, then label
    denominator: bool
    numerator: bool

    @property
    def subject(self) -> str:
        return self.row.patient


def _measured(item: ItemRow, measure: MeasureConfig, tests: set[str] | None) -> bool:
    kind = item.imacs_screening if measure.items == "imacs-screening" else item.lung and item.firm
    return (
        kind
        and (not measure.rounds or item.round_id in measure.rounds)
        and (tests is None or item.test_id in tests)
    )


def units(
    row: PatientRow,
    measure: MeasureConfig,
    tests: set[str] | None,
    start: date,
    end: date | None = None,
) -> list[Unit]:
    """The units one patient brings to one measure (clinical-logic §11 rev 3).

    A due window "ended inside the period" when its last day is in [start, end] and not after
    the evaluation date. `end` (default: the evaluation date) may precede the evaluation date:
    a completion measure over a past period then reads the windows and done dates the rows
    already carry (a status on the evaluation date is not a past one: not for `overdue`).
    """
    now = date.fromisoformat(row.now)
    if not row.guideline or row.tier not in measure.tiers:
        return []
    if measure.kind == "overdue":
        if not row.items:
            return []
        overdue = any(i.imacs_screening and i.status == "overdue" for i in row.items)
        return [Unit(row, "", ("", ""), row.plan_open, row.plan_open and overdue)]
    last = min(end or now, now)
    groups: dict[tuple[str, ...], list[ItemRow]] = {}
    for item in row.items:
        if not _measured(item, measure, tests):
            continue
        key = {
            "patient": (),
            "round": (item.round_id,),
            "item": (item.round_id, item.test_id),
        }[measure.unit]
        groups.setdefault(key, []).append(item)
    out = []
    for key, items in groups.items():
        first = items[0]
        label = {0: "", 1: first.round_label, 2: f"{first.round_label}: {first.test}"}[len(key)]
        counted = [i for i in items if start <= i.due_end_date <= last]
        due = min(i.due_start for i in items)
        out.append(
            Unit(
                row,
                label,
                (due, label),
                bool(counted),
                bool(counted) and all(i.done_on_time() for i in counted),
            )
        )
    return sorted(out, key=lambda u: u.order)


def _pop(code: str, count: int, subjects: str | None = None) -> Json:
    pop: Json = {
        "code": {
            "coding": [
                {"system": POPULATION_SYSTEM, "code": code, "display": POPULATION_DISPLAY[code]}
            ]
        },
        "count": count,
    }
    if subjects is not None:
        pop["subjectResults"] = {"reference": f"#{subjects}"}
    return pop


def _score(members: Sequence[Unit]) -> Json | None:
    den = sum(m.denominator for m in members)
    if den == 0:
        return None
    return {"value": round(sum(m.numerator for m in members) / den, 4)}


def _subject_list(list_id: str, chosen: Sequence[Unit], title: str) -> Json:
    entries: list[Json] = []
    for unit in chosen:
        entry: Json = {"item": {"reference": unit.subject}}
        if unit.label:
            entry["flag"] = {"text": unit.label}
        entries.append(entry)
    resource: Json = {
        "resourceType": "List",
        "id": list_id,
        "status": "current",
        "mode": "snapshot",
        "title": title,
    }
    if entries:
        resource["entry"] = entries
    else:
        resource["emptyReason"] = {"text": "No patient in this population"}
    return resource


def measure_report(
    knowledge: Knowledge,
    measure: MeasureConfig,
    rows: Sequence[PatientRow],
    period: tuple[date, date],
    *,
    subject_list: bool,
    generated: datetime | None = None,
) -> Json:
    """The MeasureReport (summary or subject-list) of one measure over the patients' rows."""
    start, end = period
    tests = _panel_tests(knowledge, measure)
    # Subjects in a stable order: patient id, then the unit's due date within the patient.
    members = sorted(
        (u for row in rows for u in units(row, measure, tests, start, end)),
        key=lambda u: (u.subject, u.order),
    )
    contained: list[Json] = []
    populations: list[Json] = []
    for code in POPULATIONS:
        chosen = [
            m
            for m in members
            if {"initial-population": True, "denominator": m.denominator}.get(code, m.numerator)
        ]
        list_id = None
        if subject_list:
            list_id = f"{code}-subjects"
            contained.append(_subject_list(list_id, chosen, f"{measure.title}: {code}"))
        populations.append(_pop(code, len(chosen), list_id))
    group: Json = {"population": populations}
    score = _score(members)
    if score is not None:
        group["measureScore"] = score
    stratifiers = []
    for key, _, _, value_of in STRATIFIERS:
        strata: dict[str, list[Unit]] = {}
        for m in members:
            strata.setdefault(value_of(m.row), []).append(m)
        stratum_list = []
        for value in sorted(strata):
            ms = strata[value]
            stratum: Json = {
                "value": {"text": value},
                "population": [
                    _pop("initial-population", len(ms)),
                    _pop("denominator", sum(m.denominator for m in ms)),
                    _pop("numerator", sum(m.numerator for m in ms)),
                ],
            }
            stratum_score = _score(ms)
            if stratum_score is not None:
                stratum["measureScore"] = stratum_score
            stratum_list.append(stratum)
        stratifier: Json = {"code": [{"text": key}]}
        if stratum_list:
            stratifier["stratum"] = stratum_list
        stratifiers.append(stratifier)
    group["stratifier"] = stratifiers
    moment = generated or datetime.now(UTC)
    report: Json = {
        "resourceType": "MeasureReport",
        "status": "complete",
        "type": "subject-list" if subject_list else "summary",
        "measure": f"{measure_url(knowledge, measure)}|{knowledge.ruleset.version}",
        "date": moment.isoformat(),
        "period": {
            "start": datetime.combine(start, time(0, 0), tzinfo=UTC).isoformat(),
            "end": datetime.combine(end, time(23, 59, 59), tzinfo=UTC).isoformat(),
        },
        "improvementNotation": {
            "coding": [
                {
                    "system": IMPROVEMENT_SYSTEM,
                    "code": "decrease" if measure.kind == "overdue" else "increase",
                }
            ]
        },
        "group": [group],
    }
    if contained:
        report["contained"] = contained
    return report
