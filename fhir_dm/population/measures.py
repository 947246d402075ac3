"""The §11 measures: FHIR `Measure` definitions (for profiles/) and `MeasureReport` evaluation.

Evaluation is pure: it reads `PatientRow`s assessed on the period's last day and counts.
For a completion measure, a patient is in the initial population when in scope with a tier
the measure names; in the denominator when one of its rounds closed inside the period
(due window ended between the period start and end, both included, and before the
evaluation date; a period ending before the evaluation date reads the same rows' windows and
done dates); in the numerator when every firm item of those rounds (of the measure's panels)
was done by the end of its window. A superseded round counts as not done. For the overdue
measure, the denominator is the initial population and the numerator the patients with any
item overdue.
Stratifiers: tier, `Patient.managingOrganization`, `Patient.generalPractitioner`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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
    initial = f"In-scope adult IIM patients with a screening plan, tier: {tiers}"
    if measure.kind == "overdue":
        return {
            "initial-population": initial,
            "denominator": "The initial population",
            "numerator": "Patients with at least one screening item overdue at the period end",
        }
    panels = ", ".join(knowledge.ruleset.panels[p].label for p in measure.panels) or "all tests"
    rounds = ", ".join(measure.rounds)
    return {
        "initial-population": initial,
        "denominator": f"Patients whose round ({rounds}) due window closed during the period",
        "numerator": f"Every firm item ({panels}) of those rounds done by the end of its window",
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
class Membership:
    """Which populations one patient is in, for one measure."""

    initial: bool
    denominator: bool
    numerator: bool


def _closed_in(item: ItemRow, start: date, end: date, now: date) -> bool:
    return start <= item.due_end_date <= end and item.due_end_date < now


def membership(
    row: PatientRow,
    measure: MeasureConfig,
    tests: set[str] | None,
    start: date,
    end: date | None = None,
) -> Membership:
    """`end` (default: the evaluation date) may precede the evaluation date: a completion
    measure over a past period then reads the windows and done dates the rows already carry."""
    now = date.fromisoformat(row.now)
    initial = row.in_scope and row.tier in measure.tiers and bool(row.items)
    if not initial:
        return Membership(False, False, False)
    if measure.kind == "overdue":
        return Membership(True, True, any(i.status == "overdue" for i in row.items))
    counted = [
        i
        for i in row.items
        if i.round_id in measure.rounds
        and not i.conditional
        and (tests is None or i.test_id in tests)
        and _closed_in(i, start, end or now, now)
    ]
    if not counted:
        return Membership(True, False, False)
    return Membership(True, True, all(i.done_on_time() for i in counted))


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


def _score(members: Sequence[Membership]) -> Json | None:
    den = sum(m.denominator for m in members)
    if den == 0:
        return None
    return {"value": round(sum(m.numerator for m in members) / den, 4)}


def _subject_list(list_id: str, patients: Iterable[str], title: str) -> Json:
    entries = [{"item": {"reference": p}} for p in patients]
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
    members = [(row, membership(row, measure, tests, start, end)) for row in rows]
    contained: list[Json] = []
    populations: list[Json] = []
    for code in POPULATIONS:
        chosen = [
            row.patient
            for row, m in members
            if {"initial-population": m.initial, "denominator": m.denominator}.get(
                code, m.numerator
            )
        ]
        list_id = None
        if subject_list:
            list_id = f"{code}-subjects"
            contained.append(_subject_list(list_id, chosen, f"{measure.title}: {code}"))
        populations.append(_pop(code, len(chosen), list_id))
    group: Json = {"population": populations}
    score = _score([m for _, m in members])
    if score is not None:
        group["measureScore"] = score
    stratifiers = []
    for key, _, _, value_of in STRATIFIERS:
        strata: dict[str, list[Membership]] = {}
        for row, m in members:
            if m.initial:
                strata.setdefault(value_of(row), []).append(m)
        stratum_list = []
        for value in sorted(strata):
            ms = strata[value]
            stratum: Json = {
                "value": {"text": value},
                "population": [
                    _pop("initial-population", sum(m.initial for m in ms)),
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
