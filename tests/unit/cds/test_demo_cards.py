"""Each demo patient's card, read as a clinician would: the tier, why, and what to do next.

Issue: the card's "Why" carried rule-writing notes and "Next" was the same three basic items
for every tier. For each demo patient (fhir_dm/demo_patients.yaml) the card alone must say the
tier, why, and at least two next things to do (one for a patient the guideline does not
stratify, whose plan holds a single "consider" item).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

import pytest

from fhir_dm.cds.cards import CardBuilder
from fhir_dm.cli.demo import DemoPatient, demo_patients
from fhir_dm.core.assess import Engine, PatientResult

TODAY = date(2026, 12, 7)
PATIENTS = {p.pid: p for p in demo_patients(TODAY)}
# Rule-writing notes, source tags and rule ids that must not reach the card's text.
NOISE = re.compile(r"exact age|counts\)|\[BMJ\]|\[AT\]|\[L\]|subtype-|ab-[a-z0-9]+\b|\(evidence ")


def _result(engine: Engine, patient: DemoPatient) -> PatientResult:
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in patient.resources],
    }
    [result] = engine.assess(bundle, now=datetime.combine(TODAY, datetime.min.time(), UTC)).results
    return result


def _next_items(detail: str) -> list[str]:
    lines = detail.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("**Next"))
    items = []
    for line in lines[start + 1 :]:
        if not line.startswith("- "):
            break
        items.append(line)
    return items


@pytest.mark.parametrize(
    ("pid", "tier", "why"),
    [
        ("demo-seed", "High risk", "anti-TIF1-gamma positive"),
        ("demo-38f", "Moderate risk (preliminary)", "Dermatomyositis"),
        ("demo-mda5", "High risk", "anti-MDA5 positive"),
        ("demo-pm", "Moderate risk", "polymyositis"),
        ("demo-ibm", "not stratified", "Inclusion body myositis"),
    ],
)
def test_each_demo_card_tells_the_tier_why_and_the_next_things_to_do(
    builder: CardBuilder, engine: Engine, pid: str, tier: str, why: str
) -> None:
    result = _result(engine, PATIENTS[pid])
    [issued] = builder.cards(result, hook_instance="demo")
    card = issued.card
    # The summary alone: tier — why.
    assert card.summary.startswith(f"IIM cancer screening: {tier} — ")
    assert why in card.summary.split(" — ", 1)[1]
    detail = card.detail or ""
    assert not NOISE.search(card.summary), card.summary
    why_line = next(line for line in detail.splitlines() if line.startswith("**Why**"))
    assert why in why_line and not NOISE.search(why_line), why_line
    items = [i for i in _next_items(detail) if not i.startswith("- and ")]
    assert len(items) >= (1 if tier == "not stratified" else 2), detail
    assert len(items) <= 5


def test_the_juvenile_demo_patient_is_told_the_guideline_does_not_apply(
    builder: CardBuilder, engine: Engine
) -> None:
    """Juvenile onset is outside the guideline: an info card says so, never silence."""
    [issued] = builder.cards(_result(engine, PATIENTS["demo-jdm"]), hook_instance="demo")
    card = issued.card
    assert card.indicator == "info"
    assert card.summary.startswith("IIM cancer screening: not stratified — ")
    assert "Juvenile" in card.summary and not NOISE.search(card.summary), card.summary
    assert card.suggestions is None  # nothing to write: there is no plan to propose


def test_every_demo_patient_is_covered() -> None:
    assert set(PATIENTS) == {
        "demo-seed",
        "demo-38f",
        "demo-mda5",
        "demo-pm",
        "demo-ibm",
        "demo-jdm",
    }
