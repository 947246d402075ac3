"""Small helpers for core tests: run the engine on resources and pick out one patient's result."""

from __future__ import annotations

from datetime import date
from typing import Any

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.core.facts import PatientFacts, extract_facts
from fhir_dm.core.inputs import read_patients
from tests.conftest import NOW
from tests.factories import bundle


def run_one(engine: Engine, *resources: dict[str, Any], now: date = NOW) -> PatientResult:
    results = engine.assess(bundle(*resources), now=now).results
    assert len(results) == 1
    return results[0]


def facts_of(engine: Engine, *resources: dict[str, Any]) -> PatientFacts:
    record = read_patients(bundle(*resources), engine.relevance)[0]  # the engine's own path
    return extract_facts(record, engine.knowledge, engine.matcher)


def planned_tests(result: PatientResult, round_id: str | None = None) -> list[str]:
    return [i.test_id for i in result.plan.items if round_id is None or i.round_id == round_id]
