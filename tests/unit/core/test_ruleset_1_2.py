"""Rule set 1.2.0 (clinical-logic rev 3): no silent gaps at the clinical edges, pinned dates.

Each case is built from the third clinical review's descriptions (imacs-review-3, rows named).
"""

from __future__ import annotations

from datetime import date
from typing import Any

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.knowledge.models import Knowledge
from tests import factories as f
from tests.unit.core.helpers import planned_tests, run_one

Json = dict[str, Any]
SCT = f.SCT
LOINC = f.LOINC
WEIGHT_LOSS = f.concept(SCT, "422868009")
ILD = f.concept(SCT, "233703007")
IBM = "72315009"
JUVENILE_DM = "1212005"
SKIN_ULCER = f.concept(SCT, "46742003")
DYSPHAGIA = f.concept(SCT, "40739000")
ENHANCED = {
    "ct-ncap",
    "cervical-cytology",
    "mammography",
    "ca125",
    "fobt",
    "abdominal-us",
    "transvaginal-us",
}


def _done(p: Json, system: str, code: str, when: str, n: int) -> Json:
    return {
        "resourceType": "DiagnosticReport",
        "id": f"done-{n}-{code}",
        "status": "final",
        "code": f.concept(system, code),
        "subject": f.ref(p),
        "effectiveDateTime": when,
    }


def _notices(result: PatientResult) -> str:
    return "\n".join(result.explanation.notices)


def _items(result: PatientResult, round_id: str) -> dict[str, Any]:
    return {i.test_id: i for i in result.plan.items if i.round_id == round_id}


def _orders(result: PatientResult) -> set[str]:
    return {r["identifier"][0]["value"].rsplit(".", 3)[2] for r in result.service_requests}


# -- Red flags never vanish (review row 4) ---------------------------------------------------


def test_weight_loss_after_a_negative_enhanced_work_up_is_shown_and_screened(
    engine: Engine, knowledge: Knowledge
) -> None:
    """F 35, DM, enhanced panel done 2025-02-10; unexplained weight loss 2025-10-15."""
    p = f.patient("rf-1", birth_date="1990-01-01", gender="female")
    negatives = [f.antibody(p, ab, "negative") for ab in ("tif1g", "nxp2", "sae1")]
    done = [
        _done(p, knowledge.terminology.system_url(t.code.system), t.code.code, "2025-02-10", n)
        for n, (tid, t) in enumerate(knowledge.ruleset.tests.items())
        if tid in ENHANCED or tid in knowledge.ruleset.panels["basic"].tests
    ]
    weight_loss = f.condition(p, WEIGHT_LOSS, onset="2025-10-15")
    resources = [p, f.iim_condition(p, onset="2025-01-20"), *negatives, *done, weight_loss]
    result = run_one(engine, *resources, now=date(2025, 11, 1))
    assert "Red flag recorded: unexplained weight loss (since 2025-10-15)" in _notices(result)
    red = _items(result, "red-flag")
    # Tests done before the symptom began do not answer it: the enhanced panel to consider.
    assert set(red) == ENHANCED - {"cervical-cytology"} | {"cervical-cytology"} & set(red)
    assert {"ct-ncap", "mammography", "fobt"} <= set(red)
    assert all(i.conditional and i.due_start == date(2025, 10, 15) for i in red.values())
    assert not any(".red-flag." in r["identifier"][0]["value"] for r in result.service_requests)
    # A test done on or after the red flag answers it.
    ct_after = _done(p, LOINC, "89283-6", "2025-10-25", 99)
    again = run_one(engine, *resources, ct_after, now=date(2025, 11, 1))
    assert "ct-ncap" not in _items(again, "red-flag")


def test_a_red_flag_test_open_in_another_round_is_not_proposed_twice(engine: Engine) -> None:
    p = f.patient("rf-2", birth_date="1970-01-01", gender="female")
    weight_loss = f.condition(p, WEIGHT_LOSS, onset="2024-07-01")
    result = run_one(
        engine, p, f.iim_condition(p), f.antibody(p, "tif1g"), weight_loss, now=date(2024, 7, 5)
    )
    # The diagnosis round's CT is overdue and still ordered: the red flag does not add another.
    assert "ct-ncap" in _items(result, "diagnosis")
    assert "ct-ncap" not in _items(result, "red-flag")
    assert "Red flag recorded" in _notices(result)


# -- Outside the guideline: a safety net, never silence (rows 5, 10) ---------------------------


def test_ibm_with_weight_loss_gets_the_safety_net_and_the_red_flag(engine: Engine) -> None:
    p = f.patient("ibm-1", birth_date="1958-06-01", gender="male")
    result = run_one(
        engine,
        p,
        f.iim_condition(p, code=IBM, onset="2024-10-01"),
        f.condition(p, WEIGHT_LOSS, onset="2025-01-10"),
        now=date(2025, 2, 1),
    )
    assert result.plan.assessment.scope == "excluded-subtype"
    assert result.tier is None
    notices = _notices(result)
    assert "Outside IMACS 2023" in notices and "national cancer screening" in notices
    assert "unexplained weight loss" in notices
    net = _items(result, "outside-guideline")
    assert set(net) == {"national-screening"} and net["national-screening"].conditional
    red = _items(result, "red-flag")
    assert {"ct-ncap", "psa", "fobt"} <= set(red) and all(i.conditional for i in red.values())
    assert result.service_requests == ()  # every item is to consider: nothing ordered
    assert "hrct-chest" not in planned_tests(result)  # no ILD screening for IBM


def test_late_diagnosis_tif1g_gets_the_safety_net(engine: Engine) -> None:
    """TIF1-gamma-positive man, first symptoms 2021, diagnosed 2025 (row 10)."""
    p = f.patient("late-1", birth_date="1960-01-01", gender="male")
    dm = f.iim_condition(p, onset="2021-01-10", recorded="2025-01-15")
    result = run_one(engine, p, dm, f.antibody(p, "tif1g"), now=date(2025, 2, 15))
    assert result.plan.assessment.scope == "late-diagnosis"
    assert "Outside IMACS 2023" in _notices(result)
    assert "national-screening" in _items(result, "outside-guideline")
    # Adults outside the cancer guideline still get the ILD screening (not IMACS).
    assert {"hrct-chest", "pft-dlco"} <= set(_items(result, "lung-baseline"))


# -- The lung programme (rows 6, 7) -------------------------------------------------------------


def test_juvenile_anti_mda5_with_ild_gets_lung_monitoring_and_no_cancer_screening(
    engine: Engine,
) -> None:
    p = f.patient("jdm-1", birth_date="2012-03-01", gender="male")
    result = run_one(
        engine,
        p,
        f.iim_condition(p, code=JUVENILE_DM, onset="2024-09-01"),
        f.antibody(p, "mda5"),
        f.condition(p, ILD, onset="2024-09-15"),
        now=date(2024, 10, 1),
    )
    assert result.plan.assessment.scope == "juvenile" and result.tier is None
    tests = planned_tests(result)
    assert not set(tests) & (ENHANCED | {"cbc", "psa", "chest-xray"})  # no cancer screening
    rounds = {i.round_id for i in result.plan.items}
    assert {"lung-baseline", "lung-1m", "lung-6m", "lung-12m", "lung-36m"} <= rounds
    assert "lung-3m" not in rounds  # anti-MDA5: the first PFT at 1-3 months instead
    assert "Check ferritin" in _notices(result)
    assert {"hrct-chest", "pft-dlco"} <= _orders(result)


def test_adult_ild_monitoring_cadence_with_desaturation_tests(engine: Engine) -> None:
    p = f.patient("ild-1", birth_date="1975-01-01", gender="female")
    result = run_one(
        engine,
        p,
        f.iim_condition(p, code="445187004", onset="2024-03-01"),
        f.antibody(p, "jo1"),
        f.condition(p, ILD, onset="2024-03-01"),
        now=date(2024, 3, 10),
    )
    pft = sorted(i.due_start for i in result.plan.items if i.test_id == "pft-dlco")
    assert [d.isoformat() for d in pft] == [
        "2024-03-01",
        "2024-06-01",
        "2024-09-01",
        "2024-12-01",
        "2025-03-01",
        "2025-09-01",
        "2026-03-01",
        "2026-09-01",
        "2027-03-01",
    ]
    desat = [i for i in result.plan.items if i.test_id == "desaturation-test"]
    assert len(desat) == 6 and all(i.labelled_not_imacs for i in desat)
    assert "repeat HRCT when clinically indicated" in _notices(result)


def test_ild_screening_for_every_adult_iim_unless_done_recently(engine: Engine) -> None:
    p = f.patient("scr-1", birth_date="1970-01-01", gender="female")
    base = [p, f.iim_condition(p), f.antibody(p, "tif1g")]
    result = run_one(engine, *base, now=date(2024, 3, 10))
    assert set(_items(result, "lung-baseline")) == {"hrct-chest", "pft-dlco"}
    assert not any(i.round_id == "lung-6m" for i in result.plan.items)  # no ILD: no monitoring
    hrct = _done(p, SCT, "16335031000119100", "2023-06-01", 1)
    again = run_one(engine, *base, hrct, now=date(2024, 3, 10))
    assert set(_items(again, "lung-baseline")) == {"pft-dlco"}


# -- Flare items conditional and targeted (row 13) ------------------------------------------------


def test_a_flare_without_a_high_risk_antibody_or_past_cancer_gets_a_review_notice_only(
    engine: Engine,
) -> None:
    p = f.patient("fl-1", birth_date="1980-01-01")
    negatives = [f.antibody(p, ab, "negative") for ab in ("tif1g", "nxp2", "sae1")]
    flare = f.condition(p, f.concept(f.LOCAL_PROBLEMS, "DM-FLARE"), onset="2024-12-20")
    result = run_one(
        engine, p, f.iim_condition(p, code="31384009"), *negatives, flare, now=date(2025, 1, 10)
    )
    assert not _items(result, "flare")
    assert "review for malignancy" in _notices(result)


def test_a_flare_with_tif1g_proposes_the_enhanced_panel_to_consider_not_to_order(
    engine: Engine,
) -> None:
    p = f.patient("fl-2", birth_date="1980-01-01")
    flare = f.condition(p, f.concept(f.LOCAL_PROBLEMS, "DM-FLARE"), onset="2028-05-01")
    result = run_one(
        engine, p, f.iim_condition(p), f.antibody(p, "tif1g"), flare, now=date(2028, 5, 10)
    )
    flare_items = _items(result, "flare")
    assert {"ct-ncap", "fobt"} <= set(flare_items)
    assert all(i.conditional for i in flare_items.values())
    assert not any(".flare." in r["identifier"][0]["value"] for r in result.service_requests)


# -- PET-CT as a single investigation (row 23) ----------------------------------------------------


def test_pet_ct_single_investigation_shows_the_ct_as_ct_or_pet_ct(engine: Engine) -> None:
    p = f.patient("pet-1", birth_date="1960-01-01", gender="male")
    result = run_one(
        engine,
        p,
        f.iim_condition(p),
        f.antibody(p, "tif1g"),
        f.condition(p, DYSPHAGIA, onset="2024-03-01"),
        now=date(2024, 3, 10),
    )
    items = _items(result, "diagnosis")
    assert "or 18F-FDG PET-CT instead" in items["ct-ncap"].note
    assert "may replace the CT-based imaging" in items["pet-ct"].condition_text
    assert "misses some cancers" in items["pet-ct"].condition_text
    assert items["pet-ct"].conditional and not items["ct-ncap"].conditional
    ct_order = next(
        r for r in result.service_requests if r["code"]["coding"][0]["code"] == "89283-6"
    )
    assert any("or 18F-FDG PET-CT instead" in n["text"] for n in ct_order["note"])


# -- Regional options for the site or the patient (rows 20, 21) ----------------------------------


def _with_regions(knowledge: Knowledge, **countries: list[str]) -> Knowledge:
    site = knowledge.site.model_copy(
        update={"regional_risk": knowledge.site.regional_risk.model_copy(update=countries)}
    )
    return knowledge.model_copy(update={"site": site})


def _born_in(country: str) -> Json:
    return {
        "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
        "valueAddress": {"country": country},
    }


def test_a_patient_born_in_an_npc_region_gets_nasoendoscopy_and_ebv_at_any_site(
    knowledge: Knowledge,
) -> None:
    engine = Engine(_with_regions(knowledge, npc_birth_countries=["HK", "China"]))
    p = f.patient("hk-1", birth_date="1974-01-01", gender="male", extension=[_born_in("hk")])
    result = run_one(engine, p, f.iim_condition(p), now=date(2024, 3, 10))
    items = _items(result, "diagnosis")
    assert items["nasoendoscopy"].conditional and items["ebv-serology"].conditional
    plain = Engine(knowledge)
    q = f.patient("hk-2", birth_date="1974-01-01", gender="male", extension=[_born_in("HK")])
    assert "nasoendoscopy" not in planned_tests(run_one(plain, q, f.iim_condition(q)))


def test_gastric_option_for_moderate_risk_patients_born_in_a_mapped_country(
    knowledge: Knowledge,
) -> None:
    engine = Engine(_with_regions(knowledge, gastric_birth_countries=["JP"]))
    p = f.patient("jp-1", birth_date="1986-01-01", gender="female", extension=[_born_in("JP")])
    sae1 = f.antibody(p, "sae1")
    result = run_one(engine, p, f.iim_condition(p), sae1, now=date(2024, 3, 10))
    assert result.tier == "moderate"
    upper = _items(result, "diagnosis")["upper-gi-endoscopy"]
    assert upper.conditional and "deviates from IMACS" in upper.condition_text


# -- Smaller points ----------------------------------------------------------------------------


def test_mammography_under_40_says_breast_ultrasound_per_local_practice(engine: Engine) -> None:
    p = f.patient("young-1", birth_date="2001-01-01", gender="female")
    result = run_one(engine, p, f.iim_condition(p), f.antibody(p, "tif1g"), now=date(2024, 3, 10))
    assert "breast ultrasound" in _items(result, "diagnosis")["mammography"].note
    q = f.patient("older-1", birth_date="1970-01-01", gender="female")
    older = run_one(engine, q, f.iim_condition(q), f.antibody(q, "tif1g"), now=date(2024, 3, 10))
    assert _items(older, "diagnosis")["mammography"].note == ""


def test_anti_mda5_ulcer_caveat(engine: Engine) -> None:
    p = f.patient("mda5-ulcer", birth_date="1980-01-01", gender="female")
    result = run_one(
        engine,
        p,
        f.iim_condition(p, code="238935002"),
        f.antibody(p, "mda5"),
        f.condition(p, SKIN_ULCER, onset="2024-03-01"),
        now=date(2024, 3, 10),
    )
    assert "ulcers mark vasculopathy rather than cancer" in _notices(result)


def test_window_closed_wording_and_cohort_rates(engine: Engine) -> None:
    p = f.patient("closed-1", birth_date="1970-01-01")
    result = run_one(engine, p, f.iim_condition(p, onset="2019-01-10"), now=date(2026, 6, 1))
    assert result.plan.assessment.scope == "window-closed"
    reason = result.plan.assessment.scope_reason
    assert "continue age- and sex-appropriate national screening" in reason
    q = f.patient("rates-1", birth_date="1970-01-01")
    stratified = run_one(engine, q, f.iim_condition(q), now=date(2024, 3, 10))
    assert any("high 20.6%, moderate 6.7%" in r for r in stratified.explanation.reasons)
    assert any("not a prediction for this patient" in r for r in stratified.explanation.reasons)
