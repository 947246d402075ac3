"""Facts extraction: one test per input representation listed in the FHIR contract."""

from __future__ import annotations

from datetime import date

import pytest

from fhir_dm.common.errors import InputError, NoPatientError, NotFhirError
from fhir_dm.core.assess import Engine
from fhir_dm.core.facts import UNKNOWN
from fhir_dm.core.inputs import read_patients
from tests import factories as f
from tests.conftest import NOW
from tests.unit.core.helpers import facts_of, run_one

# --- codes from several systems --------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "code", "subtype"),
    [
        (f.SCT, "396230008", "dm"),
        (f.SCT, "238935002", "cadm"),
        (f.ICD10CM, "M33.12", "dm"),  # prefix match on M33.1
        (f.ICD10CM, "M33.93", "dm"),
        (f.ICD10CM, "M33.02", "juvenile"),
        (f.ICD10CM, "M33.21", "pm"),
        (f.ICD10CM, "G72.41", "ibm"),
        (f.ICD10, "M33.1", "dm"),
        (f.ICD10, "M33.2", "pm"),
        (f.SCT, "715863001", "imnm"),
    ],
)
def test_iim_subtype_from_snomed_icd10cm_and_icd10(
    engine: Engine, system: str, code: str, subtype: str
) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p, system=system, code=code))
    assert facts.iim is not None
    assert facts.iim.subtype == subtype


def test_antibody_by_loinc_code(engine: Engine) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p), f.antibody(p, "tif1g", "positive"))
    assert facts.antibody("tif1g").value is True


def test_site_local_code_is_mapped_by_config(engine: Engine) -> None:
    p = f.patient()
    obs = f.observation(p, f.concept(f.LOCAL_LAB, "MYO-TIF1G"), valueString="Positive")
    facts = facts_of(engine, p, f.iim_condition(p), obs)
    assert facts.antibody("tif1g").value is True


def test_local_code_for_refractory_condition(engine: Engine) -> None:
    p = f.patient()
    cond = f.condition(p, f.concept(f.LOCAL_PROBLEMS, "DM-REFRACTORY"))
    facts = facts_of(engine, p, f.iim_condition(p), cond)
    assert facts.feature("refractory").value is True


def test_text_only_condition_is_reported_not_guessed(engine: Engine) -> None:
    p = f.patient()
    text_only = f.condition(p, {"text": "dermatomyositis"})
    facts = facts_of(engine, p, text_only)
    assert facts.iim is None
    assert any("text-only condition not recognised" in x for x in facts.findings)


def test_unknown_coded_condition_is_reported(engine: Engine) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p), f.condition(p, f.concept(f.SCT, "22298006")))
    assert any("condition code not recognised" in x for x in facts.findings)


def test_antibody_by_text_synonym_when_local_code_unmapped(engine: Engine) -> None:
    p = f.patient()
    obs = f.observation(
        p,
        {
            "coding": [{"system": "http://lab.example/x", "code": "Q1"}],
            "text": "Anti-NXP2 (line blot)",
        },
        valueString="NEG",
    )
    facts = facts_of(engine, p, f.iim_condition(p), obs)
    assert facts.antibody("nxp2").value is False


# --- antibody result shapes --------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["coded", "loinc-answer", "string", "interpretation", "quantity"])
@pytest.mark.parametrize("result", ["positive", "negative"])
def test_antibody_result_shapes(engine: Engine, shape: str, result: str) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p), f.antibody(p, "sae1", result, shape=shape))
    assert facts.antibody("sae1").value is (result == "positive")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Positive", True),
        ("POS", True),
        ("negative", False),
        ("weak positive", True),
        ("low positive", True),
        ("+ mild", True),
        ("indeterminate", UNKNOWN),
        ("borderline", UNKNOWN),
    ],
)
def test_antibody_value_strings(engine: Engine, text: str, expected: object) -> None:
    p = f.patient()
    obs = f.observation(p, f.concept(f.LOINC, f.ANTIBODY_LOINC["tif1g"]), valueString=text)
    assert facts_of(engine, p, f.iim_condition(p), obs).antibody("tif1g").value is expected


def test_weak_positive_can_count_as_unknown_by_site_setting(engine: Engine) -> None:
    k = engine.knowledge
    strict = k.model_copy(
        update={
            "site": k.site.model_copy(
                update={
                    "antibody_results": k.site.antibody_results.model_copy(
                        update={"weak_positive": "unknown"}
                    )
                }
            )
        }
    )
    p = f.patient()
    obs = f.observation(
        p, f.concept(f.LOINC, f.ANTIBODY_LOINC["tif1g"]), valueString="weak positive"
    )
    result = run_one(Engine(strict), p, f.iim_condition(p), obs)
    assert result.plan.assessment.facts.antibody("tif1g").value is UNKNOWN


@pytest.mark.parametrize(("code", "expected"), [("H", True), ("N", False)])
def test_interpretation_high_normal(engine: Engine, code: str, expected: bool) -> None:
    p = f.patient()
    obs = f.observation(
        p,
        f.concept(f.LOINC, f.ANTIBODY_LOINC["mda5"]),
        interpretation=[f.concept(f.V3_INTERP, code)],
    )
    assert facts_of(engine, p, f.iim_condition(p), obs).antibody("mda5").value is expected


def test_quantity_without_reference_range_is_unknown(engine: Engine) -> None:
    p = f.patient()
    obs = f.observation(
        p, f.concept(f.LOINC, "105555-7"), valueQuantity={"value": 50, "unit": "U/mL"}
    )
    facts = facts_of(engine, p, f.iim_condition(p), obs)
    assert facts.antibody("tif1g").value is UNKNOWN
    assert any("without a reference range" in x for x in facts.findings)


def test_panel_with_has_member(engine: Engine) -> None:
    p = f.patient()
    member_pos = f.antibody(None, "tif1g", "positive")
    member_neg = f.antibody(None, "nxp2", "negative")
    panel = f.observation(
        p, {"text": "Myositis panel"}, hasMember=[f.ref(member_pos), f.ref(member_neg)]
    )
    facts = facts_of(engine, p, f.iim_condition(p), panel, member_pos, member_neg)
    assert facts.antibody("tif1g").value is True
    assert facts.antibody("nxp2").value is False


def test_panel_with_components(engine: Engine) -> None:
    p = f.patient()
    panel = f.observation(
        p,
        {"text": "Myositis line blot"},
        component=[
            {"code": f.concept(f.LOINC, f.ANTIBODY_LOINC["sae1"]), "valueString": "Positive"},
            {
                "code": f.concept(f.LOINC, f.ANTIBODY_LOINC["mda5"]),
                "valueCodeableConcept": f.NEGATIVE,
            },
        ],
    )
    facts = facts_of(engine, p, f.iim_condition(p), panel)
    assert facts.antibody("sae1").value is True
    assert facts.antibody("mda5").value is False


def test_latest_antibody_result_wins(engine: Engine) -> None:
    p = f.patient()
    old = f.antibody(p, "tif1g", "negative", effective="2023-01-01")
    new = f.antibody(p, "tif1g", "positive", effective="2024-03-01")
    assert facts_of(engine, p, f.iim_condition(p), new, old).antibody("tif1g").value is True


# --- creatine kinase units -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "u_per_l"), [(900, "U/L", 900), (900, "IU/L", 900), (15, "ukat/L", 900)]
)
def test_ck_units_are_converted(engine: Engine, value: float, unit: str, u_per_l: float) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p), f.ck(p, value, unit=unit, high=None))
    assert facts.creatine_kinase[0].value == pytest.approx(u_per_l)
    assert (
        facts.creatine_kinase[0].upper_limit
        == engine.knowledge.ruleset.derived.creatine_kinase.default_upper_limit_u_per_l
    )


def test_ck_upper_limit_from_reference_range(engine: Engine) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p), f.ck(p, 300, high=320))
    assert facts.creatine_kinase[0].upper_limit == 320
    assert not facts.creatine_kinase[0].above_limit


def test_refractory_derived_from_ck_series_on_treatment(engine: Engine) -> None:
    p = f.patient()
    facts = facts_of(
        engine,
        p,
        f.iim_condition(p),
        f.medication(p, "Methotrexate 15 mg weekly"),
        f.ck(p, 2500, effective="2024-03-05"),
        f.ck(p, 1800, effective="2024-07-01"),
    )
    assert facts.feature("refractory").value is True


def test_refractory_needs_months_apart(engine: Engine) -> None:
    p = f.patient()
    facts = facts_of(
        engine,
        p,
        f.iim_condition(p),
        f.medication(p),
        f.ck(p, 2500, effective="2024-03-05"),
        f.ck(p, 1800, effective="2024-04-01"),
    )
    assert facts.feature("refractory").value is False


def test_refractory_unknown_without_ck(engine: Engine) -> None:
    p = f.patient()
    assert (
        facts_of(engine, p, f.iim_condition(p), f.medication(p)).feature("refractory").value
        is UNKNOWN
    )


# --- statuses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["preliminary", "cancelled", "entered-in-error"])
def test_unusable_observation_statuses_are_ignored_and_reported(
    engine: Engine, status: str
) -> None:
    p = f.patient()
    facts = facts_of(
        engine, p, f.iim_condition(p), f.antibody(p, "tif1g", "positive", status=status)
    )
    assert facts.antibody("tif1g").value is UNKNOWN
    assert any(f"status {status}" in x for x in facts.findings)


@pytest.mark.parametrize("status", ["amended", "corrected"])
def test_amended_and_corrected_are_used(engine: Engine, status: str) -> None:
    p = f.patient()
    assert (
        facts_of(engine, p, f.iim_condition(p), f.antibody(p, "tif1g", status=status))
        .antibody("tif1g")
        .value
        is True
    )


@pytest.mark.parametrize("verification", ["refuted", "entered-in-error"])
def test_refuted_conditions_are_ignored(engine: Engine, verification: str) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p, verification=verification))
    assert facts.iim is None


def test_resolved_feature_still_counts_and_says_so(engine: Engine) -> None:
    """A disease feature that has resolved was still part of the disease (cancer risk)."""
    p = f.patient()
    dysphagia = f.condition(p, f.concept(f.ICD10CM, "R13.10"), clinical_status="resolved")
    fact = facts_of(engine, p, f.iim_condition(p), dysphagia).feature("dysphagia")
    assert (fact.value, fact.note) == (True, "recorded as resolved")


# --- dates ---------------------------------------------------------------------------------------


def test_effective_period_and_issued(engine: Engine) -> None:
    p = f.patient()
    a = f.antibody(
        p,
        "tif1g",
        "negative",
        effective=None,
        effectivePeriod={"start": "2024-01-01", "end": "2024-01-02"},
    )
    b = f.antibody(p, "tif1g", "positive", effective=None, issued="2024-03-01T10:00:00+01:00")
    assert facts_of(engine, p, f.iim_condition(p), a, b).antibody("tif1g").value is True


def test_onset_age(engine: Engine) -> None:
    p = f.patient(birth_date="1970-06-01")
    cond = f.iim_condition(
        p,
        onset=None,
        onsetAge={"value": 52, "unit": "years", "system": "http://unitsofmeasure.org", "code": "a"},
    )
    facts = facts_of(engine, p, cond)
    assert facts.iim is not None and facts.iim.onset_source == "onsetAge"
    assert (
        facts.onset_age is not None
        and 51.9 < facts.onset_age[0] <= 52 <= facts.onset_age[1] <= 53.1
    )


def test_onset_period(engine: Engine) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p, onset=None, onsetPeriod={"start": "2024-02-10"}))
    assert facts.iim is not None and str(facts.iim.onset) == "2024-02-10"


def test_onset_string_falls_back_to_recorded_date_and_says_so(engine: Engine) -> None:
    p = f.patient()
    facts = facts_of(
        engine, p, f.iim_condition(p, onset=None, onsetString="last spring", recorded="2024-03-20")
    )
    assert facts.iim is not None and str(facts.iim.onset) == "2024-03-20"
    assert facts.iim.onset_source.startswith("recordedDate")
    assert any("onsetString" in x for x in facts.findings)


def test_partial_dates(engine: Engine) -> None:
    p = f.patient(birth_date="1950")
    facts = facts_of(engine, p, f.iim_condition(p, onset="2024-03"))
    assert facts.onset_age is not None
    youngest, oldest = facts.onset_age
    assert 73 < youngest < 74 < oldest < 75


def test_missing_birth_date_makes_age_unknown(engine: Engine) -> None:
    p = f.patient(birth_date=None)
    result = run_one(engine, p, f.iim_condition(p))
    assert result.plan.assessment.facts.onset_age is None
    assert "age at onset" in result.plan.assessment.unknown_facts


# --- bundles, patients and references ------------------------------------------------------------


def test_several_patients_and_reference_styles(engine: Engine) -> None:
    p1, p2, p3 = f.patient("a1"), f.patient("a2"), f.patient("a3")
    c1 = f.iim_condition(p1)
    c2 = f.iim_condition(p2) | {
        "subject": {"reference": "urn:uuid:6f1b4b2c-0000-4000-8000-000000000002"}
    }
    c3 = f.iim_condition(p3) | {"subject": {"reference": "https://ehr.example.org/fhir/Patient/a3"}}
    data = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"fullUrl": "https://ehr.example.org/fhir/Patient/a1", "resource": p1},
            {"fullUrl": "urn:uuid:6f1b4b2c-0000-4000-8000-000000000002", "resource": p2},
            {"fullUrl": "https://ehr.example.org/fhir/Patient/a3", "resource": p3},
            {"resource": c1},
            {"resource": c2},
            {"resource": c3},
        ],
    }
    records = read_patients(data)
    assert [len(r.resources) for r in records] == [1, 1, 1]
    results = engine.assess(data, now=NOW).results
    assert all(r.plan.assessment.facts.iim is not None for r in results)


@pytest.mark.parametrize("bundle_type", ["collection", "transaction", "batch", "searchset"])
def test_any_bundle_type(engine: Engine, bundle_type: str) -> None:
    p = f.patient()
    records = read_patients(f.bundle(p, f.iim_condition(p), type=bundle_type))
    assert len(records[0].resources) == 1


def test_no_patient_is_an_error() -> None:
    with pytest.raises(NoPatientError):
        read_patients({"resourceType": "Bundle", "type": "collection", "entry": []})


def test_invalid_fhir_names_the_path() -> None:
    bad = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": {"resourceType": "Patient", "birthDate": "not-a-date"}}],
    }
    with pytest.raises(NotFhirError) as err:
        read_patients(bad)
    assert err.value.expression[0].startswith("Bundle.entry[0].resource.birthDate")


# --- red flags, cancer and smoking -------------------------------------------------------------


def test_smoking_family_history_and_cancer_facts(engine: Engine) -> None:
    p = f.patient()
    fmh = {
        "resourceType": "FamilyMemberHistory",
        "id": "fmh-1",
        "status": "completed",
        "patient": f.ref(p),
        "relationship": f.concept("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "MTH"),
        "condition": [{"code": f.concept(f.ICD10CM, "C50.911")}],
    }
    history = f.condition(p, f.concept(f.ICD10CM, "Z85.3"))
    active = f.condition(p, f.concept(f.SCT, "363358000"))
    facts = facts_of(engine, p, f.iim_condition(p), f.smoking(p, "449868002"), fmh, history, active)
    assert facts.feature("current_smoking").value is True
    assert facts.feature("family_history_cancer").value is True
    assert facts.feature("personal_history_cancer").value is True
    assert facts.feature("active_malignancy").value is True


def test_former_smoker_is_not_current(engine: Engine) -> None:
    p = f.patient()
    assert (
        facts_of(engine, p, f.iim_condition(p), f.smoking(p, "8517006"))
        .feature("current_smoking")
        .value
        is False
    )


def test_refractory_unknown_when_not_known_to_be_treated(engine: Engine) -> None:
    p = f.patient()
    cks = [f.ck(p, 2500, effective="2024-03-05"), f.ck(p, 1800, effective="2024-07-01")]
    assert facts_of(engine, p, f.iim_condition(p), *cks).feature("refractory").value is UNKNOWN


def test_refractory_counts_ck_only_from_treatment_start(engine: Engine) -> None:
    p = f.patient()
    med = f.medication(p, "Prednisolone 40 mg") | {"authoredOn": "2024-06-01"}
    cks = [f.ck(p, 2500, effective="2024-03-05"), f.ck(p, 1800, effective="2024-07-01")]
    assert facts_of(engine, p, f.iim_condition(p), med, *cks).feature("refractory").value is False


def test_topical_preparations_are_not_immunosuppression(engine: Engine) -> None:
    p = f.patient()
    cks = [f.ck(p, 2500, effective="2024-03-05"), f.ck(p, 1800, effective="2024-07-01")]
    cream = f.medication(p, "Tacrolimus 0.1% ointment")
    assert (
        facts_of(engine, p, f.iim_condition(p), cream, *cks).feature("refractory").value is UNKNOWN
    )


def test_conflicting_antibody_results_use_the_positive_and_say_so(engine: Engine) -> None:
    p = f.patient()
    old = f.antibody(p, "tif1g", "positive", effective="2023-01-01")
    new = f.antibody(p, "tif1g", "negative", effective="2024-03-01")
    facts = facts_of(engine, p, f.iim_condition(p), new, old)
    assert facts.antibody("tif1g").value is True
    assert any("conflicting" in x for x in facts.findings)


def test_deeply_nested_input_is_a_clear_input_error() -> None:
    nested: dict[str, object] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(400):
        nested = {"url": "http://example.org/x", "extension": [nested]}
    data = {"resourceType": "Patient", "id": "p", "extension": [nested]}
    with pytest.raises(NotFhirError, match="nested too deeply"):
        read_patients(data)


@pytest.mark.parametrize("onset", ["0001-01-01", "9999-12-31"])
def test_implausible_dates_are_unusable_not_a_crash(engine: Engine, onset: str) -> None:
    p = f.patient()
    result = run_one(engine, p, f.iim_condition(p, onset=onset, recorded="2024-03-01"))
    assert result.plan.assessment.facts.iim is not None
    assert result.plan.assessment.facts.iim.onset_source.startswith("recordedDate")


def test_implausible_evaluation_date_is_an_input_error(engine: Engine) -> None:
    p = f.patient()
    with pytest.raises(InputError, match="evaluation date"):
        engine.assess(f.bundle(p, f.iim_condition(p)), now=date(9999, 1, 1))
