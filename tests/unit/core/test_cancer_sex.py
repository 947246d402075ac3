"""Cancers as records code them, and sex for clinical use (clinical-logic §2, §6, §12 rev 3)."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.knowledge.load import load_knowledge
from tests import factories as f
from tests.unit.core.helpers import facts_of, run_one

MIDDLE_AGED = "1970-05-10"  # 53 at the default onset 2024-03-01: DM is HIGH
ANTIBODIES = ("tif1g", "nxp2", "sae1", "hmgcr", "mi2", "mda5")
CANCER_SCREENING = {"schedule", "addon", "red-flag", "flare"}
SEX_SPECIFIC = {
    "cervical-cytology",
    "mammography",
    "psa",
    "ca125",
    "abdominal-us",
    "transvaginal-us",
}
FEMALE_TESTS = SEX_SPECIFIC - {"psa"}
SPCU = "http://hl7.org/fhir/StructureDefinition/patient-sexParameterForClinicalUse"
SPCU_SYSTEM = "http://terminology.hl7.org/CodeSystem/sex-parameter-for-clinical-use"
BIRTH_SEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
INDIVIDUAL_SEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-individual-sex"
NOW_AFTER_CANCER = date(2024, 10, 1)


def negatives(p: dict[str, Any]) -> list[dict[str, Any]]:
    return [f.antibody(p, ab, "negative", effective="2024-03-05") for ab in ANTIBODIES]


def screening_items(result: PatientResult) -> list[Any]:
    return [i for i in result.plan.items if {r.kind for r in i.rules} & CANCER_SCREENING]


def items_by_test(result: PatientResult) -> dict[str, Any]:
    return {i.test_id: i for i in result.plan.items}


def notice_ids(result: PatientResult) -> list[str]:
    return [n.id for n in result.plan.assessment.notices]


def _config_codes(value_set: str, source: str) -> list[str]:
    include = load_knowledge().terminology.value_sets[value_set].include
    return [e.code for e in include if e.source == source and e.code and e.system == "sct"]


# --- A1. cancers coded in SNOMED CT ----------------------------------------------------------


def test_snomed_breast_cancer_gets_the_oncology_notice_and_no_firm_mammography(
    engine: Engine,
) -> None:
    """Review row 8: breast cancer coded 254837009 at month 8 left every order firm."""
    p = f.patient(gender="female", birth_date=MIDDLE_AGED)
    breast = f.condition(
        p,
        f.concept(f.SCT, "254837009", "Malignant neoplasm of breast (disorder)"),
        onset="2024-09-15",
    )
    result = run_one(engine, p, f.iim_condition(p), breast, *negatives(p), now=NOW_AFTER_CANCER)
    assert result.tier == "high"
    assert "active-malignancy" in notice_ids(result)
    assert any("management with oncology" in n for n in result.explanation.notices)
    mammography = items_by_test(result)["mammography"]
    assert mammography.conditional and "oncology" in mammography.condition_text
    assert screening_items(result) and all(i.conditional for i in screening_items(result))
    # Found after the myositis began: cancer-associated, never "recurrence".
    assert "cancer-associated" in notice_ids(result)
    assert not any("recurrence" in n for n in result.explanation.notices)
    assert not any("possible" in x for x in result.explanation.findings)


@pytest.mark.parametrize("code", _config_codes("malignancy", "VSAC24"))
def test_each_verified_snomed_cancer_code_is_recognised(engine: Engine, code: str) -> None:
    p = f.patient(birth_date=MIDDLE_AGED)
    facts = facts_of(engine, p, f.iim_condition(p), f.condition(p, f.concept(f.SCT, code)))
    assert facts.feature("active_malignancy").is_true()
    assert not facts.feature("possible_malignancy").is_true()


@pytest.mark.parametrize("code", _config_codes("history-of-cancer", "VSAC24"))
def test_each_verified_history_of_cancer_code_is_a_past_cancer(engine: Engine, code: str) -> None:
    p = f.patient(birth_date=MIDDLE_AGED)
    history = f.condition(p, f.concept(f.SCT, code), onset="2015-06-01")
    facts = facts_of(engine, p, f.iim_condition(p), history)
    assert facts.feature("personal_history_cancer").is_true()
    assert [(c.active, c.order) for c in facts.cancers] == [(False, "before")]


@pytest.mark.parametrize(
    ("system", "code", "kind"),
    [
        (f.ICD10CM, "C50.911", "malignancy"),
        (f.ICD10CM, "C4A.9", "malignancy"),  # Merkel cell carcinoma
        (f.ICD10, "C97", "malignancy"),
        (f.ICD10CM, "D48.5", "possible"),  # uncertain behaviour
        (f.ICD10CM, "D49.9", "possible"),  # unspecified behaviour
        (f.ICD10, "D47.1", "possible"),
        (f.ICD10CM, "D05.11", "neither"),  # in situ
        (f.ICD10CM, "D17.9", "neither"),  # benign
        (f.ICD10CM, "D3A.00", "neither"),  # benign neuroendocrine
    ],
)
def test_icd10_neoplasm_blocks(engine: Engine, system: str, code: str, kind: str) -> None:
    p = f.patient(birth_date=MIDDLE_AGED)
    neoplasm = f.condition(p, f.concept(system, code, "Neoplasm"))
    facts = facts_of(engine, p, f.iim_condition(p), neoplasm)
    assert facts.feature("active_malignancy").is_true() == (kind == "malignancy")
    assert facts.feature("possible_malignancy").is_true() == (kind == "possible")
    # A recognised benign or in situ neoplasm is not reported as an unreadable cancer.
    assert not [x for x in facts.findings if neoplasm["id"] in x]


# --- A2. M36.0 implies a cancer ---------------------------------------------------------------


@pytest.mark.parametrize("system", [f.ICD10CM, f.ICD10])
def test_m36_0_is_dm_with_a_cancer_implied(engine: Engine, system: str) -> None:
    """Review row 9: "dermato(poly)myositis in neoplastic disease" was read as plain DM."""
    p = f.patient(gender="male", birth_date=MIDDLE_AGED)
    cond = f.iim_condition(p, code="M36.0", system=system)
    result = run_one(engine, p, cond, *negatives(p))
    assert result.plan.assessment.facts.iim is not None
    assert result.plan.assessment.facts.iim.subtype == "dm"
    assert result.tier == "high"
    assert "cancer-implied" in notice_ids(result)
    notice = next(n.text for n in result.plan.assessment.notices if n.id == "cancer-implied")
    assert "oncology" in notice and cond["id"] in notice
    items = screening_items(result)
    assert items and all(i.conditional and "neoplasm" in i.condition_text for i in items)


def test_m36_0_with_its_cancer_recorded_names_the_cancer_instead(engine: Engine) -> None:
    p = f.patient(gender="male", birth_date=MIDDLE_AGED)
    cond = f.iim_condition(p, code="M36.0", system=f.ICD10CM)
    lung = f.condition(
        p,
        f.concept(f.SCT, "93880001", "Primary malignant neoplasm of lung (disorder)"),
        onset="2024-03-01",
    )
    result = run_one(engine, p, cond, lung, *negatives(p))
    assert "cancer-implied" not in notice_ids(result)
    assert {"active-malignancy", "cancer-associated"} <= set(notice_ids(result))


# --- A3. a Condition whose text names a cancer --------------------------------------------------


def test_unrecognised_cancer_text_is_a_headline_and_makes_screening_consider(
    engine: Engine,
) -> None:
    p = f.patient(gender="female", birth_date=MIDDLE_AGED)
    onc = f.condition(
        p, f.concept(f.LOCAL_PROBLEMS, "ONC-17", "Adenocarcinoma of pancreas"), id="onc-17"
    )
    result = run_one(engine, p, f.iim_condition(p), onc, *negatives(p))
    e = result.explanation
    assert e.headline.startswith("Possible cancer in the record, not coded as one")
    assert e.headline.endswith("plan. High risk of IIM-associated cancer")
    assert notice_ids(result)[0] == "possible-malignancy"
    assert "Condition/onc-17" in e.notices[0]
    items = screening_items(result)
    assert items and all(i.conditional and "not coded" in i.condition_text for i in items)
    assert not any("malignancy" in x for x in e.findings)  # no longer a line at the end
    # Lung surveillance and antibody testing are not cancer screening: unchanged.
    others = [i for i in result.plan.items if i not in items]
    assert all(not i.conditional for i in others)


def test_headline_notice_comes_first_even_after_other_notices(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date=MIDDLE_AGED)
    past = f.condition(p, f.concept(f.ICD10CM, "Z85.3"), onset="2010-01-01")
    text_only = f.condition(p, {"text": "suspected lymphoma, awaiting biopsy"})
    result = run_one(engine, p, f.iim_condition(p), past, text_only, *negatives(p))
    assert result.explanation.notices[0].startswith("A Condition may be a cancer")
    assert any("recurrence" in n for n in result.explanation.notices[1:])


# --- A4. the wording follows which came first ------------------------------------------------


def test_cancer_before_the_myositis_may_recur(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date=MIDDLE_AGED)
    ovary = f.condition(
        p,
        f.concept(f.SCT, "363443007", "Malignant tumor of ovary (disorder)"),
        onset="2019-05-01",
        clinical_status="remission",
    )
    result = run_one(engine, p, f.iim_condition(p), ovary, *negatives(p))
    notice = next(n.text for n in result.plan.assessment.notices if n.id == "prior-malignancy")
    assert "first sign of recurrence of Malignant tumor of ovary (disorder)" in notice
    assert "restage" in notice
    assert "cancer-associated" not in notice_ids(result)
    # A past cancer is a red flag (the enhanced panel as "consider"), not an active one.
    assert not result.plan.assessment.facts.feature("active_malignancy").is_true()


def test_cancer_found_after_the_myositis_is_cancer_associated_never_recurrence(
    engine: Engine,
) -> None:
    """Review row 11: a cancer found at month 8, in remission at month 20."""
    p = f.patient(gender="female", birth_date=MIDDLE_AGED)
    breast = f.condition(
        p,
        f.concept(f.SCT, "254837009", "Malignant neoplasm of breast (disorder)"),
        onset="2024-11-01",
        clinical_status="remission",
    )
    result = run_one(engine, p, f.iim_condition(p), breast, *negatives(p), now=date(2025, 11, 1))
    notices = result.explanation.notices
    assert not any("recurrence" in n for n in notices)
    notice = next(n.text for n in result.plan.assessment.notices if n.id == "cancer-associated")
    assert "follow myositis activity with oncology" in notice
    assert "restaging of Malignant neoplasm of breast (disorder)" in notice
    facts = result.plan.assessment.facts
    # The myositis's own cancer is not a red flag: no round dated from the cancer.
    assert not facts.feature("personal_history_cancer").is_true()
    assert "red-flag" not in {i.round_id for i in result.plan.items}
    assert all(i.conditional for i in screening_items(result))


def test_past_cancer_without_dates_says_both_readings(engine: Engine) -> None:
    p = f.patient(gender="male", birth_date=MIDDLE_AGED)
    bladder = f.condition(
        p,
        f.concept(f.ICD10CM, "C67.9", "Malignant neoplasm of bladder, unspecified"),
        clinical_status="resolved",
    )
    result = run_one(engine, p, f.iim_condition(p), bladder, *negatives(p))
    assert "prior-malignancy-order-unknown" in notice_ids(result)
    assert {"prior-malignancy", "cancer-associated"}.isdisjoint(notice_ids(result))


def test_history_code_recorded_before_the_myositis_came_before(engine: Engine) -> None:
    p = f.patient(gender="female", birth_date=MIDDLE_AGED)
    history = f.condition(p, f.concept(f.ICD10CM, "Z85.43"), recorded="2020-02-01", onset=None)
    facts = facts_of(engine, p, f.iim_condition(p), history)
    assert [c.order for c in facts.cancers] == ["before"]


# --- B. sex for clinical use -------------------------------------------------------------------


def spcu(code: str, *, end: str | None = None) -> dict[str, Any]:
    subs: list[dict[str, Any]] = [
        {
            "url": "value",
            "valueCodeableConcept": {"coding": [{"system": SPCU_SYSTEM, "code": code}]},
        }
    ]
    if end:
        subs.append({"url": "period", "valuePeriod": {"start": "2000-01-01", "end": end}})
    return {"url": SPCU, "extension": subs}


def sex_result(engine: Engine, gender: str | None, *extensions: dict[str, Any]) -> PatientResult:
    extra = {"extension": list(extensions)} if extensions else {}
    p = f.patient(gender=gender, birth_date=MIDDLE_AGED, **extra)
    return run_one(engine, p, f.iim_condition(p), *negatives(p))


def firm_sex_tests(result: PatientResult) -> set[str]:
    return {t for t, i in items_by_test(result).items() if t in SEX_SPECIFIC and not i.conditional}


def male_factor(result: PatientResult) -> bool:
    return "male-sex" in {r.id for r in result.plan.assessment.factors}


def test_gender_only(engine: Engine) -> None:
    result = sex_result(engine, "male")
    assert firm_sex_tests(result) == {"psa"} and set(items_by_test(result)) & SEX_SPECIFIC == {
        "psa"
    }
    assert male_factor(result)
    assert "sex-for-clinical-use" not in notice_ids(result)


def test_gender_harmony_sex_parameter_agreeing_with_gender(engine: Engine) -> None:
    result = sex_result(engine, "female", spcu("female-typical"))
    assert firm_sex_tests(result) == FEMALE_TESTS
    assert not male_factor(result)
    assert result.plan.assessment.facts.sex.note == "sex parameter for clinical use"


def test_gender_harmony_sex_parameter_decides_and_disagreement_makes_all_consider(
    engine: Engine,
) -> None:
    result = sex_result(engine, "female", spcu("male-typical"))
    assert result.plan.assessment.facts.sex.value == "male"
    assert male_factor(result)  # the male-sex factor follows the clinical sex
    assert firm_sex_tests(result) == set()
    assert set(items_by_test(result)) >= SEX_SPECIFIC
    notice = next(n.text for n in result.plan.assessment.notices if n.id == "sex-for-clinical-use")
    assert (
        "sex parameter for clinical use male" in notice and "administrative gender female" in notice
    )


def test_ended_gender_harmony_parameter_gives_way_to_the_current_one(engine: Engine) -> None:
    result = sex_result(
        engine, "male", spcu("female-typical", end="2010-01-01"), spcu("male-typical")
    )
    assert result.plan.assessment.facts.sex.value == "male"
    assert firm_sex_tests(result) == {"psa"}


def test_gender_harmony_specified_makes_every_sex_test_consider(engine: Engine) -> None:
    result = sex_result(engine, "female", spcu("specified"))
    assert not result.plan.assessment.facts.sex.known
    assert firm_sex_tests(result) == set() and set(items_by_test(result)) >= SEX_SPECIFIC
    psa = items_by_test(result)["psa"]
    assert "does not apply" in psa.condition_text


def test_us_core_birth_sex_discordant_with_gender(engine: Engine) -> None:
    """Review row 24: gender male, birth sex F got PSA and none of the female tests."""
    result = sex_result(engine, "male", {"url": BIRTH_SEX, "valueCode": "F"})
    assert result.plan.assessment.facts.sex.value == "female"
    assert not male_factor(result)
    items = items_by_test(result)
    assert set(items) >= SEX_SPECIFIC
    for test_id in SEX_SPECIFIC:
        text = items[test_id].condition_text
        assert items[test_id].conditional, test_id
        assert "birth sex (US Core) female" in text and "administrative gender male" in text
    assert "sex-for-clinical-use" in notice_ids(result)


def test_us_core_individual_sex_without_gender(engine: Engine) -> None:
    coding = {"system": f.SCT, "code": "248153007", "display": "Male (finding)"}
    result = sex_result(engine, None, {"url": INDIVIDUAL_SEX, "valueCoding": coding})
    assert result.plan.assessment.facts.sex.value == "male"
    assert firm_sex_tests(result) == {"psa"}
    assert "sex" not in result.plan.assessment.unknown_facts


def test_birth_sex_unknown_falls_back_to_gender(engine: Engine) -> None:
    result = sex_result(engine, "female", {"url": BIRTH_SEX, "valueCode": "UNK"})
    assert result.plan.assessment.facts.sex.value == "female"
    assert firm_sex_tests(result) == FEMALE_TESTS


def test_unrecognised_sex_value_is_reported(engine: Engine) -> None:
    p = f.patient(
        gender="female", birth_date=MIDDLE_AGED, extension=[{"url": BIRTH_SEX, "valueCode": "X"}]
    )
    facts = facts_of(engine, p, f.iim_condition(p))
    assert facts.sex.value == "female"
    assert any("birth sex (US Core) value not recognised (X)" in x for x in facts.findings)


@pytest.mark.parametrize(
    "text",
    [
        "Benign tumour of the parotid",
        "Family history of breast cancer",
        "Screening for colon cancer",
    ],
)
def test_text_that_says_it_is_no_cancer_of_the_patient_is_not_a_possible_one(
    engine: Engine, text: str
) -> None:
    p = f.patient(birth_date=MIDDLE_AGED)
    cond = f.condition(p, {"text": text})
    facts = facts_of(engine, p, f.iim_condition(p), cond)
    assert not facts.feature("possible_malignancy").is_true()
    assert any(cond["id"] in x and "not recognised" in x for x in facts.findings)


def test_a_coded_cancer_screening_encounter_is_not_a_possible_cancer(engine: Engine) -> None:
    p = f.patient(birth_date=MIDDLE_AGED)
    display = "Encounter for screening mammogram for malignant neoplasm of breast"
    cond = f.condition(p, f.concept(f.ICD10CM, "Z12.31", display))
    facts = facts_of(engine, p, f.iim_condition(p), cond)
    assert not facts.feature("possible_malignancy").is_true()
    assert not facts.feature("active_malignancy").is_true()
