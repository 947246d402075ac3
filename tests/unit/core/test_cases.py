"""The real cases of clinical-logic §9 and the issue's acceptance cases, written as FHIR."""

from __future__ import annotations

from datetime import date

import pytest

from fhir_dm.core.assess import Engine
from tests import factories as f
from tests.unit.core.helpers import planned_tests, run_one

FEMALE_ONLY = {"cervical-cytology", "mammography", "transvaginal-us", "abdominal-us", "ca125"}


def test_seed_case_report_tif1g(engine: Engine) -> None:
    """Intern Med 2017;56:719: expected HIGH, not preliminary, PET-CT (b) applies."""
    result = run_one(engine, *f.seed_case(), now=date(2015, 10, 25))
    a = result.plan.assessment
    assert (result.tier, a.preliminary) == ("high", False)
    cxr = [i.due_start.isoformat() for i in result.plan.items if i.test_id == "chest-xray"]
    assert cxr == [
        "2015-10-20",  # rounds run from the diagnosis date (recordedDate), not symptom onset
        "2016-10-20",
        "2017-10-20",
        "2018-10-20",
    ]
    # Only the round open now is ordered; the yearly radiographs are plan activities (§13).
    ordered = [r for r in result.service_requests if r["code"]["coding"][0]["code"] == "36643-5"]
    assert [r["occurrencePeriod"]["start"] for r in ordered] == ["2015-10-20"]
    assert result.care_plan is not None
    scheduled = [
        a["detail"]["scheduledPeriod"]["start"]
        for a in result.care_plan["activity"]
        if "detail" in a and a["detail"]["code"]["coding"][0]["code"] == "36643-5"
    ]
    assert scheduled == cxr[1:]
    enhanced = set(planned_tests(result, "diagnosis"))
    assert {"ct-ncap", "psa", "fobt"} <= enhanced
    assert not enhanced & FEMALE_ONLY
    assert planned_tests(result).count("psa") == 1
    pet = next(i for i in result.plan.items if i.test_id == "pet-ct")
    assert pet.conditional
    assert "pet-ct-tif1g" in {r.id for r in pet.rules}
    assert any("current smoking" in r for r in result.explanation.reasons)


def test_38_year_old_woman_without_antibodies(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date="1988-02-14")
    result = run_one(engine, p, f.iim_condition(p, onset="2026-08-01"), now=date(2026, 11, 21))
    assert (result.tier, result.plan.assessment.preliminary) == ("moderate", True)
    assert "myositis-antibodies" in planned_tests(result)
    assert result.risk_assessment["status"] == "preliminary"


def test_12_year_old_with_juvenile_dm(engine: Engine) -> None:
    p = f.patient(gender="male", birth_date="2014-04-02")
    result = run_one(
        engine,
        p,
        f.iim_condition(p, system=f.ICD10CM, code="M33.02", onset="2026-07-10"),
        now=date(2026, 11, 21),
    )
    assert result.service_requests == () and result.care_plan is None
    assert "no routine IIM-specific cancer screening" in result.explanation.headline
    assert [e["request"]["url"] for e in result.entries] == [
        "RiskAssessment",
        f"Provenance/{result.provenance['id']}",
    ]


@pytest.mark.parametrize("age", [43, 50, 58, 66, 75, 84])
@pytest.mark.parametrize("gender", ["female", "male"])
def test_paraneoplastic_series_all_at_least_moderate(engine: Engine, age: int, gender: str) -> None:
    """Actas Dermosifiliogr series: 25 adults aged 43-84 with DM; all get the enhanced panel."""
    p = f.patient(gender=gender, birth_date=f"{2024 - age}-01-01")
    result = run_one(engine, p, f.iim_condition(p))
    assert result.tier in ("moderate", "high")
    assert "ct-ncap" in planned_tests(result)
