"""Rule set 1.1.0 (clinical-logic rev 2): every changed rule, with pinned dates (kept in 1.2.0)."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.knowledge.models import Knowledge, SiteFlags
from tests import factories as f
from tests.unit.core.helpers import facts_of, planned_tests, run_one

YOUNG = "1994-01-01"  # 30 at the default onset 2024-03-01
ALL_CANCER_ANTIBODIES = ("tif1g", "nxp2", "sae1", "hmgcr", "mi2", "mda5")
ASSERTED_DATE = "http://hl7.org/fhir/StructureDefinition/condition-assertedDate"
CANCER_SCREENING = {"schedule", "addon", "red-flag", "flare"}


def fired(result: PatientResult) -> set[str]:
    return {r.id for r in result.plan.assessment.factors}


def negatives(p: dict[str, Any], *names: str, when: str = "2024-03-05") -> list[dict[str, Any]]:
    return [f.antibody(p, ab, "negative", effective=when) for ab in names or ALL_CANCER_ANTIBODIES]


def rounds(result: PatientResult) -> dict[str, str]:
    return {rid: start.isoformat() for rid, _, start, _ in result.plan.rounds()}


def engine_with(knowledge: Knowledge, **flags: bool) -> Engine:
    site = knowledge.site.model_copy(update={"site": SiteFlags(**flags)})
    return Engine(knowledge.model_copy(update={"site": site}))


# --- dates: diagnosis anchors the schedule, symptom onset decides eligibility ----------------


def test_late_diagnosis_inside_eligibility_gets_work_up_and_yearly_rounds(engine: Engine) -> None:
    """The review's example: symptoms Jan 2022, diagnosis Nov 2024, assessed Feb 2025."""
    p = f.patient(gender="female", birth_date="1970-05-10")  # 51 at onset: HIGH with DM
    cond = f.iim_condition(p, onset="2022-01-15", recorded="2024-11-05")
    result = run_one(engine, p, cond, *negatives(p), now=date(2025, 2, 10))
    a = result.plan.assessment
    assert (a.scope, result.tier) == ("in-scope", "high")
    assert rounds(result) == {
        "diagnosis": "2024-11-05",
        "lung-baseline": "2024-11-05",  # the ILD screening (1.2.0) is dated from it too
        "year-1": "2025-11-05",
        "year-2": "2026-11-05",
        "year-3": "2027-11-05",
    }
    assert {"ct-ncap", "cbc"} <= set(planned_tests(result, "diagnosis"))
    dates = " | ".join(result.explanation.dates)
    assert "symptom onset 2022-01-15 (onsetDateTime)" in dates
    assert "diagnosis 2024-11-05 (recordedDate)" in dates
    assert "2024-11-05" in result.care_plan["text"]["div"]  # type: ignore[index]


def test_asserted_date_extension_is_preferred_over_recorded_date(engine: Engine) -> None:
    p = f.patient(birth_date="1970-05-10")
    cond = f.iim_condition(
        p,
        onset="2024-01-10",
        recorded="2024-06-01",
        extension=[{"url": ASSERTED_DATE, "valueDateTime": "2024-03-20"}],
    )
    result = run_one(engine, p, cond, now=date(2024, 4, 15))
    assert rounds(result)["diagnosis"] == "2024-03-20"
    assert any("assertedDate extension" in d for d in result.explanation.dates)


def test_age_at_onset_comes_from_symptom_onset_not_diagnosis(engine: Engine) -> None:
    p = f.patient(birth_date="1983-06-01")  # 39 at symptom onset, 41 at diagnosis
    cond = f.iim_condition(p, onset="2023-01-10", recorded="2024-07-01")
    assert "age-over-40" not in fired(run_one(engine, p, cond, now=date(2024, 8, 1)))


def test_diagnosed_more_than_three_years_after_symptoms_is_out_of_the_guideline(
    engine: Engine,
) -> None:
    p = f.patient()
    cond = f.iim_condition(p, onset="2019-01-01", recorded="2023-06-01")
    result = run_one(engine, p, cond, now=date(2023, 7, 1))
    assert (result.plan.assessment.scope, result.tier) == ("late-diagnosis", None)
    # 1.2.0: no IMACS rounds, but never a silent nothing: the ILD screening (not IMACS) is
    # ordered, national screening is a "consider" activity (never an order) with the notice.
    ordered = {r["identifier"][0]["value"].split(".")[-3] for r in result.service_requests}
    assert ordered == {"lung-baseline"}
    assert result.care_plan is not None
    [net] = [a["detail"] for a in result.care_plan["activity"] if "detail" in a]
    assert net["code"]["coding"][0]["code"] == "national-cancer-screening"
    assert net["statusReason"]["coding"][0]["code"] == "consider"
    assert any(n.startswith("Outside IMACS 2023") for n in result.explanation.notices)


# --- factors -------------------------------------------------------------------------------


def test_35_year_old_man_with_polymyositis_is_moderate(engine: Engine) -> None:
    p = f.patient(gender="male", birth_date="1989-01-20")  # 35 at onset 2024-03-01
    result = run_one(engine, p, f.iim_condition(p, code="31384009"), *negatives(p))
    assert result.tier == "moderate"
    assert fired(result) == {"subtype-pm-imnm", "male-sex"}
    assert "ct-ncap" in planned_tests(result, "diagnosis")


@pytest.mark.parametrize(
    ("factor", "subtype", "antibody"),
    [
        ("subtype-cadm", "238935002", None),
        ("subtype-pm-imnm", "715863001", None),
        ("ab-mi2", "445187004", "mi2"),
        ("ab-mda5", "445187004", "mda5"),
        ("ab-hmgcr", "445187004", "hmgcr"),
        ("ab-sae1", "445187004", "sae1"),
    ],
)
def test_each_new_intermediate_factor(
    engine: Engine, factor: str, subtype: str, antibody: str | None
) -> None:
    p = f.patient(gender="female", birth_date=YOUNG)
    others = [a for a in ALL_CANCER_ANTIBODIES if a != antibody]
    extra = [f.antibody(p, antibody)] if antibody else []
    result = run_one(engine, p, f.iim_condition(p, code=subtype), *negatives(p, *others), *extra)
    assert factor in fired(result)
    assert result.tier == "standard"  # one intermediate factor alone
    assert not {"subtype-dm"} & fired(result)


def test_male_sex_and_one_more_intermediate_factor_make_moderate(engine: Engine) -> None:
    p = f.patient(gender="male", birth_date=YOUNG)
    result = run_one(
        engine, p, f.iim_condition(p, code="445187004"), *negatives(p, "tif1g", "nxp2", "sae1",
        "hmgcr", "mi2"), f.antibody(p, "mda5")
    )  # fmt: skip
    assert fired(result) >= {"male-sex", "ab-mda5"}
    assert result.tier == "moderate"


def test_cadm_is_intermediate_by_default(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date=YOUNG)
    result = run_one(engine, p, f.iim_condition(p, code="238935002"), *negatives(p))
    assert fired(result) == {"subtype-cadm"}
    assert result.tier == "standard"
    assert not result.explanation.notices


def test_site_option_counts_cadm_as_dm_and_says_it_deviates(knowledge: Knowledge) -> None:
    engine = engine_with(knowledge, cadm_as_dm=True)
    p = f.patient(gender="female", birth_date=YOUNG)
    result = run_one(engine, p, f.iim_condition(p, code="238935002"), *negatives(p))
    assert "subtype-dm" in fired(result) and "subtype-cadm" not in fired(result)
    assert result.tier == "moderate"
    assert any("deviates from IMACS" in n for n in result.explanation.notices)


def test_ca125_is_for_women_only(engine: Engine) -> None:
    woman = f.patient(gender="female", birth_date="1960-01-01")
    man = f.patient(gender="male", birth_date="1960-01-01")
    assert "ca125" in planned_tests(run_one(engine, woman, f.iim_condition(woman)))
    assert "ca125" not in planned_tests(run_one(engine, man, f.iim_condition(man)))


def test_overlap_myositis_is_in_scope_as_a_low_risk_factor(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date=YOUNG)
    cond = f.iim_condition(p, system=f.ICD10CM, code="M35.1")
    result = run_one(engine, p, cond, *negatives(p))
    assert result.plan.assessment.scope == "in-scope"
    assert fired(result) == {"subtype-low"}
    assert result.tier == "standard"
    assert "cbc" in planned_tests(result, "diagnosis")


@pytest.mark.parametrize(
    ("factor", "antibody"), [("ab-srp", "srp"), ("ab-myositis-associated", "ro52")]
)
def test_low_risk_antibodies_are_recorded_and_do_not_lower_the_tier(
    engine: Engine, factor: str, antibody: str
) -> None:
    p = f.patient(birth_date="1960-01-01")
    result = run_one(engine, p, f.iim_condition(p), f.antibody(p, antibody))
    assert factor in fired(result)
    assert result.tier == "high"


# --- preliminary (§4) ----------------------------------------------------------------------


def test_spec_example_dm_38_woman_is_moderate_and_not_preliminary(engine: Engine) -> None:
    """DM, 38, female, TIF1-gamma/NXP2/SAE1 negative, Mi-2/MDA5/HMGCR untested."""
    p = f.patient(gender="female", birth_date="1985-06-01")
    result = run_one(engine, p, f.iim_condition(p), *negatives(p, "tif1g", "nxp2", "sae1"))
    a = result.plan.assessment
    assert (result.tier, a.preliminary) == ("moderate", False)


def test_spec_example_asys_30_woman_is_standard_and_preliminary(engine: Engine) -> None:
    """ASyS, 30, female, Jo-1 positive, Mi-2/MDA5/HMGCR untested."""
    p = f.patient(gender="female", birth_date=YOUNG)
    result = run_one(
        engine,
        p,
        f.iim_condition(p, code="445187004"),
        f.antibody(p, "jo1"),
        *negatives(p, "tif1g", "nxp2", "sae1"),
    )
    a = result.plan.assessment
    assert (result.tier, a.preliminary) == ("standard", True)
    assert {"anti-Mi-2 antibody", "anti-MDA5 antibody", "anti-HMGCR antibody"} <= set(
        a.preliminary_because
    )
    assert "myositis-antibodies" in planned_tests(result)


def test_unknown_sex_can_make_a_tier_preliminary(engine: Engine) -> None:
    p = f.patient(gender=None, birth_date=YOUNG)
    result = run_one(engine, p, f.iim_condition(p, code="31384009"), *negatives(p))
    a = result.plan.assessment
    assert (result.tier, a.preliminary, a.preliminary_because) == ("standard", True, ("sex",))


def test_clinical_features_not_recorded_do_not_make_a_tier_preliminary(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date=YOUNG)
    result = run_one(engine, p, f.iim_condition(p, code="445187004"), *negatives(p))
    assert (result.tier, result.plan.assessment.preliminary) == ("standard", False)


def test_unconfirmed_diagnosis_is_assessed_preliminary_and_said(engine: Engine) -> None:
    p = f.patient(birth_date="1950-01-01")
    cond = f.iim_condition(p, verification="provisional")
    result = run_one(engine, p, cond, f.antibody(p, "tif1g"))
    a = result.plan.assessment
    assert (result.tier, a.preliminary) == ("high", True)
    assert "diagnosis not confirmed" in a.preliminary_because
    assert any("not confirmed" in n for n in result.explanation.notices)
    assert result.risk_assessment["status"] == "preliminary"


def test_confirmed_diagnosis_wins_over_an_unconfirmed_one(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    result = run_one(
        engine,
        p,
        f.iim_condition(p, code="396230008", verification="differential"),
        f.iim_condition(p, code="31384009", verification="confirmed"),
    )
    assert result.plan.assessment.facts.iim is not None
    assert result.plan.assessment.facts.iim.subtype == "pm"


def test_refuted_diagnosis_is_ignored(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    result = run_one(engine, p, f.iim_condition(p, verification="refuted"))
    assert result.plan.assessment.scope == "no-iim"


# --- red flags and flare at any time ---------------------------------------------------------


def _closed_window_patient(
    knowledge: Knowledge, positive: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """ASyS diagnosed 2019, work-up done, lungs screened before the diagnosis (no ILD round):
    by 2024 the window has closed. `positive`: one antibody recorded positive (the others
    negative)."""
    p = f.patient(gender="female", birth_date=YOUNG)
    done = [
        f.done_request(p, knowledge, t, "2019-02-01")
        for t in knowledge.ruleset.panels["basic"].tests
    ]
    tested = [
        f.antibody(p, ab, "positive" if ab == positive else "negative", effective="2019-01-10")
        for ab in ALL_CANCER_ANTIBODIES
    ]
    resources = [
        p,
        f.iim_condition(p, code="445187004", onset="2019-01-01"),
        *tested,
        *done,
        *f.lung_screened(p, "2018-12-01"),
    ]
    return p, resources


def test_window_closed_without_red_flags_keeps_a_completed_plan(engine: Engine) -> None:
    _, resources = _closed_window_patient(engine.knowledge)
    result = run_one(engine, *resources, now=date(2024, 4, 15))
    assert result.plan.assessment.scope == "window-closed"
    assert rounds(result) == {"diagnosis": "2019-01-01"}  # the history stays (§13)
    assert all(i.done is not None for i in result.plan.items)
    assert result.service_requests == ()
    assert result.care_plan is not None and result.care_plan["status"] == "completed"


def test_red_flag_after_the_window_gets_a_round_dated_from_it(engine: Engine) -> None:
    p, resources = _closed_window_patient(engine.knowledge)
    weight_loss = f.condition(p, f.concept(f.SCT, "422868009"), onset="2024-02-10")
    # 1.2.0: a test answers a red flag only when done on or after it (not in the 12 months
    # before, as in 1.1.0).
    ct = f.done_request(p, engine.knowledge, "ct-ncap", "2023-06-01")  # before the red flag
    mammography = f.done_request(p, engine.knowledge, "mammography", "2024-02-20")  # after it
    result = run_one(engine, *resources, weight_loss, ct, mammography, now=date(2024, 4, 15))
    assert result.plan.assessment.scope == "window-closed"
    # The done work-up stays as history; the red flag opens its own round.
    assert rounds(result) == {"diagnosis": "2019-01-01", "red-flag": "2024-02-10"}
    assert all(i.done is not None for i in result.plan.items if i.round_id == "diagnosis")
    items = [i for i in result.plan.items if i.round_id == "red-flag"]
    assert {i.due_end for i in items} == {date(2024, 3, 10)}  # due within a month
    assert all(i.conditional for i in items)
    assert "mammography" not in planned_tests(result, "red-flag")  # answered since
    assert {"ct-ncap", "fobt"} <= set(planned_tests(result, "red-flag"))
    assert "weight loss" in items[0].condition_text
    # "Consider" items never keep a plan open (§6 rev 3): the plan stays completed, and it
    # carries the red-flag round as not-started "consider" activities, with the notice.
    assert result.care_plan is not None and result.care_plan["status"] == "completed"
    details = [a["detail"] for a in result.care_plan["activity"]]
    assert any(
        d["status"] == "not-started" and d["scheduledPeriod"]["start"] == "2024-02-10"
        for d in details
    )
    assert any("Red flag recorded" in n for n in result.explanation.notices)


def test_red_flag_mid_course_gets_its_own_round(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date=YOUNG)
    cond = f.iim_condition(p, code="445187004", onset="2023-01-01")
    weight_loss = f.condition(p, f.concept(f.SCT, "422868009"), onset="2023-10-01")
    result = run_one(engine, p, cond, *negatives(p), weight_loss, now=date(2023, 10, 15))
    assert rounds(result)["red-flag"] == "2023-10-01"
    assert "ct-ncap" not in planned_tests(result, "diagnosis")


def test_red_flag_at_diagnosis_joins_the_diagnosis_round(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date=YOUNG)
    cond = f.iim_condition(p, code="445187004")
    weight_loss = f.condition(p, f.concept(f.SCT, "422868009"), onset="2024-02-01")
    result = run_one(engine, p, cond, *negatives(p), weight_loss)
    assert "red-flag" not in rounds(result)
    ct = next(i for i in result.plan.items if i.test_id == "ct-ncap")
    assert ct.round_id == "diagnosis" and ct.conditional


def test_flare_after_the_window_gets_a_round_dated_from_the_flare(engine: Engine) -> None:
    # Anti-SAE1 positive (a high-risk antibody for the flare rule; standard tier with ASyS).
    p, resources = _closed_window_patient(engine.knowledge, positive="sae1")
    flare = f.condition(p, f.concept(f.LOCAL_PROBLEMS, "DM-FLARE"), onset="2024-03-01")
    result = run_one(engine, *resources, flare, now=date(2024, 4, 15))
    assert (result.plan.assessment.scope, result.tier) == ("window-closed", "standard")
    assert rounds(result) == {"diagnosis": "2019-01-01", "flare": "2024-03-01"}
    assert all(i.done is not None for i in result.plan.items if i.round_id == "diagnosis")
    flare_items = [i for i in result.plan.items if i.round_id == "flare"]
    assert {"ct-ncap", "fobt"} <= {i.test_id for i in flare_items}
    assert all(i.labelled_not_imacs for i in flare_items)
    # 1.2.0: flare items are "consider", never orders, and never keep a plan open.
    assert all(i.done is None and i.conditional for i in flare_items)
    assert result.service_requests == ()
    assert result.care_plan is not None and result.care_plan["status"] == "completed"
    assert any("flare" in n for n in result.explanation.notices)


def test_flare_after_the_window_without_a_high_risk_antibody_is_a_review_notice(
    engine: Engine,
) -> None:
    p, resources = _closed_window_patient(engine.knowledge)
    flare = f.condition(p, f.concept(f.LOCAL_PROBLEMS, "DM-FLARE"), onset="2024-03-01")
    result = run_one(engine, *resources, flare, now=date(2024, 4, 15))
    assert rounds(result) == {"diagnosis": "2019-01-01"}  # no flare round
    assert any(n.id == "flare-review" for n in result.plan.assessment.notices)
    assert result.care_plan is not None and result.care_plan["status"] == "completed"


# --- cancer: active, past, checkpoint inhibitors ---------------------------------------------


def test_active_malignancy_turns_cancer_screening_into_consider_items(engine: Engine) -> None:
    p = f.patient(birth_date="1960-01-01")
    nsclc = f.condition(p, f.concept(f.SCT, "254637007", "Non-small cell lung cancer"))
    ild = f.condition(p, f.concept(f.SCT, "233703007"))
    result = run_one(engine, p, f.iim_condition(p), nsclc, ild)
    assert result.tier == "high"
    for item in result.plan.items:
        kinds = {r.kind for r in item.rules}
        if kinds & CANCER_SCREENING:
            assert item.conditional and "oncology" in item.condition_text, item.test_id
        else:  # lung surveillance and antibody testing are unaffected
            assert not item.conditional, item.test_id
    assert "hrct-chest" in planned_tests(result) and "myositis-antibodies" in planned_tests(result)
    assert any("paraneoplastic" in n for n in result.explanation.notices)


def test_past_cancer_gives_a_restaging_notice_naming_it(engine: Engine) -> None:
    """Seed series: DM at cancer relapse; the myositis may be the first sign of recurrence."""
    p = f.patient(gender="male", birth_date="1955-01-01")
    bladder = f.condition(
        p,
        f.concept(f.ICD10CM, "C67.9", "Malignant neoplasm of bladder, unspecified"),
        clinical_status="remission",
    )
    result = run_one(engine, p, f.iim_condition(p), bladder)
    assert result.tier == "high"
    notice = next(n for n in result.explanation.notices if "recurrence" in n)
    assert "Malignant neoplasm of bladder, unspecified" in notice
    assert "restage" in notice


@pytest.mark.parametrize(
    ("status", "period_end", "expected"),
    [
        ("active", None, True),
        ("completed", "2024-01-20", True),  # 3 months before: recent
        ("completed", "2023-07-01", False),  # 9 months before: not recent
    ],
)
def test_checkpoint_inhibitor_notice(
    engine: Engine, status: str, period_end: str | None, expected: bool
) -> None:
    p = f.patient(birth_date="1960-01-01")
    med: dict[str, Any] = {
        "resourceType": "MedicationStatement",
        "id": "ici-1",
        "status": status,
        "subject": f.ref(p),
        "medicationCodeableConcept": {"text": "Pembrolizumab 200 mg IV"},
    }
    if period_end:
        med["effectivePeriod"] = {"start": "2023-01-01", "end": period_end}
    result = run_one(engine, p, f.iim_condition(p), med)
    notices = result.explanation.notices
    assert any("checkpoint inhibitor" in n for n in notices) is expected
    assert result.tier == "high"
    ct = next(i for i in result.plan.items if i.test_id == "ct-ncap")
    assert ct.conditional is expected


# --- deceased --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "deceased", [{"deceasedBoolean": True}, {"deceasedDateTime": "2024-04-01"}]
)
def test_deceased_patient_gets_no_plan(engine: Engine, deceased: dict[str, Any]) -> None:
    p = f.patient(birth_date="1950-01-01", **deceased)
    result = run_one(engine, p, f.iim_condition(p), f.antibody(p, "tif1g"))
    assert result.plan.assessment.scope == "deceased"
    assert result.service_requests == () and result.care_plan is None
    assert "deceased" in result.explanation.headline


def test_a_future_death_date_is_not_applied_before_it(engine: Engine) -> None:
    p = f.patient(birth_date="1950-01-01", deceasedDateTime="2024-05-01")
    result = run_one(engine, p, f.iim_condition(p), now=date(2024, 4, 15))
    assert result.plan.assessment.scope == "in-scope"


# --- refractory ------------------------------------------------------------------------------


def test_coded_refractory_cutaneous_disease_is_refractory(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    skin = f.condition(p, f.concept(f.LOCAL_PROBLEMS, "DM-SKIN-REFRACTORY"))
    result = run_one(engine, p, f.iim_condition(p, code="238935002"), skin)
    assert "refractory" in fired(result)


def _ck_twice_high(p: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        f.ck(p, 900, effective="2023-09-01"),
        f.ck(p, 1200, effective="2024-01-15"),
    ]


def test_medication_reference_to_a_contained_medication_counts(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    drug = f.medication_resource("Methotrexate 15 mg tablet", id="mtx")
    med = f.medication_reference(p, "#mtx", contained=drug)
    facts = facts_of(engine, p, f.iim_condition(p, onset="2023-06-01"), med, *_ck_twice_high(p))
    assert facts.feature("refractory").is_true()


def test_medication_reference_to_a_bundled_medication_counts(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    drug = f.medication_resource("Azathioprine 50 mg", id="aza")
    med = f.medication_reference(p, "Medication/aza")
    facts = facts_of(
        engine, p, f.iim_condition(p, onset="2023-06-01"), drug, med, *_ck_twice_high(p)
    )
    assert facts.feature("refractory").is_true()


def test_unresolved_medication_reference_is_a_finding(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    med = f.medication_reference(p, "Medication/absent")
    facts = facts_of(engine, p, f.iim_condition(p), med)
    assert any("medicationReference not resolved" in x for x in facts.findings)


# --- terminology as real records send it -----------------------------------------------------


def test_icd10cm_under_its_oid_and_without_the_dot(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    cond = f.iim_condition(p, system="urn:oid:2.16.840.1.113883.6.90", code="M3310")
    result = run_one(engine, p, cond)
    assert result.plan.assessment.facts.iim is not None
    assert result.plan.assessment.facts.iim.subtype == "dm"


@pytest.mark.parametrize(
    "code",
    [f.concept(f.SCT, "77176002", "Smoker (finding)"), f.concept(f.ICD10CM, "Z72.0")],
)
def test_smoking_recorded_as_a_condition_is_a_red_flag(engine: Engine, code: Any) -> None:
    p = f.patient(birth_date=YOUNG)
    facts = facts_of(engine, p, f.iim_condition(p), f.condition(p, code, onset="2020-01-01"))
    assert facts.feature("current_smoking").is_true()


@pytest.mark.parametrize(
    "code",
    [f.concept(f.SCT, "51615001"), f.concept(f.ICD10CM, "J84.89"), f.concept(f.ICD10CM, "J84112")],
)
def test_more_ild_codes(engine: Engine, code: Any) -> None:
    p = f.patient(birth_date=YOUNG)
    assert "ild" in fired(run_one(engine, p, f.iim_condition(p), f.condition(p, code)))


@pytest.mark.parametrize(
    "code", ["126906006", "92691004", "254637007", "424132000", "94260004", "109838007"]
)
def test_snomed_cancers_as_problem_lists_code_them(engine: Engine, code: str) -> None:
    p = f.patient(birth_date=YOUNG)
    facts = facts_of(engine, p, f.iim_condition(p), f.condition(p, f.concept(f.SCT, code)))
    assert facts.feature("active_malignancy").is_true()


def test_unrecognised_condition_naming_a_cancer_is_flagged_not_guessed(engine: Engine) -> None:
    p = f.patient(birth_date=YOUNG)
    local = f.concept(f.LOCAL_PROBLEMS, "ONC-17", "Adenocarcinoma of pancreas")
    other = f.concept(f.LOCAL_PROBLEMS, "X-1", "Sprained ankle")
    onc = f.condition(p, local, id="onc-17")
    ankle = f.condition(p, other, id="ankle-1")
    facts = facts_of(engine, p, f.iim_condition(p), onc, ankle)
    assert not facts.feature("active_malignancy").is_true()
    # Rev 3: a fact behind a headline notice, no longer a line among the findings.
    assert facts.feature("possible_malignancy").sources == ("Condition/onc-17",)
    assert not [x for x in facts.findings if "malignancy" in x]
    assert "condition code not recognised: Condition/ankle-1" in facts.findings


# --- the real cases of §9 --------------------------------------------------------------------


@pytest.mark.parametrize("age", [43, 52, 61, 70, 84])
def test_seed_series_dm_at_cancer_relapse(engine: Engine, age: int) -> None:
    """Seed series: DM at a cancer relapse; at least MODERATE and the recurrence notice."""
    p = f.patient(gender="female", birth_date=f"{2024 - age}-01-01")
    history = f.condition(p, f.concept(f.ICD10CM, "Z85.3", "Personal history of breast cancer"))
    result = run_one(engine, p, f.iim_condition(p), history)
    assert result.tier in ("moderate", "high")
    assert any("recurrence" in n for n in result.explanation.notices)


def test_red_flag_applies_even_when_diagnosed_outside_the_guideline(engine: Engine) -> None:
    p = f.patient(birth_date="1960-01-01")
    cond = f.iim_condition(p, onset="2019-01-01", recorded="2023-06-01")
    weight_loss = f.condition(p, f.concept(f.SCT, "422868009"), onset="2023-06-20")
    result = run_one(engine, p, cond, weight_loss, now=date(2023, 7, 1))
    assert (result.plan.assessment.scope, result.tier) == ("late-diagnosis", None)
    # 1.2.0: the ILD screening and the safety net too, each dated from the diagnosis.
    assert rounds(result) == {
        "lung-baseline": "2023-06-01",
        "outside-guideline": "2023-06-01",
        "red-flag": "2023-06-20",
    }
    red = [i for i in result.plan.items if i.round_id == "red-flag"]
    assert "ct-ncap" in {i.test_id for i in red} and all(i.conditional for i in red)
    assert any(n.id == "red-flags" for n in result.plan.assessment.notices)
    assert result.care_plan is not None
    assert all(r["intent"] == "proposal" for r in result.service_requests)


def test_dates_are_the_earliest_over_every_iim_condition(engine: Engine) -> None:
    """PM coded in 2022, re-coded as DM in 2024: the IIM was diagnosed in 2022."""
    p = f.patient(birth_date="1970-01-01")
    pm = f.iim_condition(p, code="31384009", onset="2021-11-01", recorded="2022-02-01", id="pm")
    dm = f.iim_condition(p, onset="2024-01-01", recorded="2024-02-01", id="dm")
    result = run_one(engine, p, pm, dm, now=date(2024, 3, 1))
    iim = result.plan.assessment.facts.iim
    assert iim is not None and iim.subtype == "dm" and iim.reference == "Condition/dm"
    assert rounds(result)["diagnosis"] == "2022-02-01"
    assert iim.diagnosis_source == "recordedDate, Condition/pm"
    assert str(iim.onset) == "2021-11-01"


def test_an_equivocal_antibody_is_said_to_be_equivocal_not_unrecorded(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date=YOUNG)
    equivocal = f.antibody(p, "tif1g", "Equivocal", shape="string")
    others = negatives(p, "nxp2", "sae1", "hmgcr", "mi2", "mda5")
    result = run_one(engine, p, f.iim_condition(p), equivocal, *others)
    a = result.plan.assessment
    assert (result.tier, a.preliminary) == ("moderate", True)  # never positive
    assert a.preliminary_because == ("anti-TIF1-gamma antibody (equivocal)",)
    assert "anti-TIF1-gamma antibody (equivocal)" in result.explanation.unknown_facts


def test_the_antibody_panel_proposal_says_which_are_untested_and_which_equivocal(
    engine: Engine,
) -> None:
    p = f.patient(gender="female", birth_date=YOUNG)
    equivocal = f.antibody(p, "nxp2", "Borderline", shape="string")
    result = run_one(engine, p, f.iim_condition(p), equivocal, *negatives(p, "sae1", "hmgcr"))
    item = next(i for i in result.plan.items if i.test_id == "myositis-antibodies")
    facts = set(item.rules[0].facts)
    assert {"anti-NXP2 equivocal", "anti-TIF1-gamma untested"} <= facts
    # MDA5 is intermediate: it cannot lift this moderate tier (held by DM), so it is not named.
    assert "anti-MDA5 untested" not in facts
