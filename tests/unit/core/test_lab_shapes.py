"""Real-shaped lab records (codes.md §E): result names as labs print them, panels, reports.

Each record goes through the whole reading path (Bundle -> records per patient -> facts), so
what reaches the rules is what a real Bundle of that shape gives.
"""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhir_dm.core import results as r
from fhir_dm.core.assess import Engine
from fhir_dm.core.facts import EQUIVOCAL_FINDING, UNKNOWN, extract_facts
from fhir_dm.core.inputs import read_patients
from tests import factories as f
from tests.unit.core.helpers import facts_of, run_one

Json = dict[str, Any]
LAB = "http://lab.example/result-codes"  # a lab-local code system no config maps


def valid(resource: Json) -> Json:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


def named(subject: Json | None, name: str, **value: Any) -> Json:
    """A result under a lab-local code, recognisable only by the name the lab printed."""
    code = {"coding": [{"system": LAB, "code": "R1", "display": name}], "text": name}
    return f.observation(subject, code, **value)


def report(subject: Json, *results: Json, **extra: Any) -> Json:
    return valid(
        {
            "resourceType": "DiagnosticReport",
            "id": f"dr-{subject['id']}-{len(results)}-{len(extra)}",
            "status": "final",
            "code": {"text": "Myositis antibody panel"},
            "subject": f.ref(subject),
            "effectiveDateTime": "2024-03-05",
            "result": [f.ref(x) for x in results],
            **extra,
        }
    )


# --- names as labs print them ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "antibody"),
    [
        ("TIF-1 gamma (155 kDa) Ab", "tif1g"),  # ARUP
        ("TIF-1y Ab", "tif1g"),  # Quest
        ("Anti-TIF-1gamma Ab", "tif1g"),  # Mayo / Esoterix
        ("Anti-TIF1-γ antibody", "tif1g"),
        ("SSA 52 (Ro) (ENA) Antibody", "ro52"),
        ("PM-Scl100", "pmscl"),  # National Jewish
        ("PM-Scl75", "pmscl"),
        ("PM/Scl-100 Ab, IgG", "pmscl"),
        ("3-Hydroxy-3-Methylglutaryl Coenzyme-A (HMG-CoA) Reductase Antibodies", "hmgcr"),
        ("HMG-CoA Reductase", "hmgcr"),
        ("Mi-2β Ab", "mi2"),
        ("Mi-2 alpha Ab", "mi2"),
        ("NXP-2 (MJ) Ab", "nxp2"),
        ("MDA-5 (CADM-140) Ab", "mda5"),
        ("SAE1 Ab", "sae1"),
        ("Jo 1 Ab", "jo1"),
        ("PL-12 Ab", "pl12"),
    ],
)
def test_result_names_as_labs_print_them(engine: Engine, name: str, antibody: str) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p), named(p, name, valueString="Positive"))
    assert facts.antibody(antibody).value is True
    others = [a.id for a in engine.knowledge.ruleset.antibodies if a.id != antibody]
    assert all(facts.antibody(a).value is UNKNOWN for a in others)


def test_text_only_name_without_coding(engine: Engine) -> None:
    p = f.patient()
    obs = f.observation(p, {"text": "TIF-1 gamma (155 kDa) Ab"}, valueString="Negative")
    assert facts_of(engine, p, f.iim_condition(p), obs).antibody("tif1g").value is False


@pytest.mark.parametrize("name", ["SSA 60 (Ro) (ENA) Antibody", "Scl-70 Ab", "Anti-dsDNA Ab"])
def test_other_antibodies_are_reported_not_matched(engine: Engine, name: str) -> None:
    p = f.patient()
    facts = facts_of(engine, p, f.iim_condition(p), named(p, name, valueString="Positive"))
    assert all(facts.antibody(a.id).value is UNKNOWN for a in engine.knowledge.ruleset.antibodies)
    assert any("not recognised as a myositis antibody" in x for x in facts.findings)


# --- LOINCs from codes.md §E --------------------------------------------------------------------


@pytest.mark.parametrize(("loinc", "antibody"), [("18485-3", "mi2"), ("82440-9", "sae1")])
def test_result_loincs_seen_in_lab_catalogues(engine: Engine, loinc: str, antibody: str) -> None:
    p = f.patient()
    obs = f.observation(p, f.concept(f.LOINC, loinc), valueString="Positive")
    assert facts_of(engine, p, f.iim_condition(p), obs).antibody(antibody).value is True


def test_cn1a_is_recognised_but_never_a_factor(engine: Engine) -> None:
    p = f.patient()
    obs = f.observation(p, f.concept(f.LOINC, "96562-4"), valueString="Positive")
    result = run_one(engine, p, f.iim_condition(p), obs)
    facts = result.plan.assessment.facts
    assert all(v.value is UNKNOWN for v in facts.antibodies.values())
    assert any("recognised but used by no rule" in x and obs["id"] in x for x in facts.findings)
    assert all("cN-1A" not in fired.label for fired in result.plan.assessment.factors)


@pytest.mark.parametrize(
    ("unit", "value", "u_per_l"),
    [("U/l", 300, 300), ("IU/L", 300, 300), ("U/L", 300, 300), ("iu/l", 300, 300)],
)
def test_ck_in_blood_and_loose_units(
    engine: Engine, unit: str, value: float, u_per_l: float
) -> None:
    p = f.patient()
    ck = f.observation(
        p,
        f.concept(f.LOINC, "50756-6"),
        valueQuantity={"value": value, "unit": unit},
        referenceRange=[{"text": "<200 U/L"}],
    )
    facts = facts_of(engine, p, f.iim_condition(p), ck)
    assert [(c.value, c.upper_limit) for c in facts.creatine_kinase] == [(u_per_l, 200)]


def test_ck_in_microkatal_with_micro_sign(engine: Engine) -> None:
    p = f.patient()
    ck = f.ck(p, 5, unit="\u00b5kat/L", high=3)
    facts = facts_of(engine, p, f.iim_condition(p), ck)
    assert [(c.value, c.upper_limit) for c in facts.creatine_kinase] == [(300, 180)]


@pytest.mark.parametrize(
    ("comparator", "value", "above"), [(">", 20000, True), ("<", 20, False), (">", 150, None)]
)
def test_ck_given_as_a_bound(
    engine: Engine, comparator: str, value: float, above: bool | None
) -> None:
    p = f.patient()
    ck = f.ck(p, value)
    ck["valueQuantity"]["comparator"] = comparator
    facts = facts_of(engine, p, f.iim_condition(p), ck)
    assert [c.above_limit for c in facts.creatine_kinase] == ([] if above is None else [above])
    if above is None:
        assert any("creatine kinase given as a bound" in x for x in facts.findings)


# --- equivocal is unknown, never positive ---------------------------------------------------------


def arup_tif1g(subject: Json | None, value: float, **kw: Any) -> Json:
    return f.observation(
        subject,
        f.concept(f.LOINC, "105555-7"),
        valueQuantity={"value": value, "unit": "AU/mL"},
        referenceRange=[
            {"high": {"value": 29, "unit": "AU/mL"}, "text": "Negative"},
            {"low": {"value": 30}, "high": {"value": 40}, "text": "Equivocal"},
            {"low": {"value": 41}, "text": "Positive"},
        ],
        **kw,
    )


def test_equivocal_quantity_is_unknown_with_its_source(engine: Engine) -> None:
    """The old reading took 35 AU/mL as positive (above the first range's high)."""
    p = f.patient(birth_date="1986-01-01")
    obs = arup_tif1g(p, 35)
    negatives = [f.antibody(p, a, "negative") for a in ("nxp2", "sae1", "mi2", "mda5", "hmgcr")]
    result = run_one(engine, p, f.iim_condition(p), obs, *negatives)
    fact = result.plan.assessment.facts.antibody("tif1g")
    assert fact.value is UNKNOWN
    assert fact.sources == (f"Observation/{obs['id']}",)
    assert fact.note == "equivocal"
    assert any(EQUIVOCAL_FINDING in x for x in result.plan.assessment.facts.findings)
    # DM (one high factor): MODERATE, and preliminary because TIF1-gamma could be positive.
    assert result.plan.assessment.tier == "moderate"
    assert result.plan.assessment.preliminary


@pytest.mark.parametrize("text", ["Equivocal", "Borderline", "Indeterminate"])
def test_equivocal_words_are_unknown(engine: Engine, text: str) -> None:
    p = f.patient()
    obs = named(p, "TIF-1y Ab", valueString=text)
    fact = facts_of(engine, p, f.iim_condition(p), obs).antibody("tif1g")
    assert (fact.value, fact.note, fact.sources) == (
        UNKNOWN,
        "equivocal",
        (f"Observation/{obs['id']}",),
    )


def test_later_equivocal_after_negative_is_unknown_and_later_negative_wins(engine: Engine) -> None:
    p = f.patient()
    neg_old = f.antibody(p, "tif1g", "negative", effective="2023-01-01")
    eq_new = arup_tif1g(p, 33, effective="2024-02-01")
    assert (
        facts_of(engine, p, f.iim_condition(p), neg_old, eq_new).antibody("tif1g").value is UNKNOWN
    )
    eq_old = arup_tif1g(p, 33, effective="2023-01-01")
    neg_new = f.antibody(p, "tif1g", "negative", effective="2024-02-01")
    assert facts_of(engine, p, f.iim_condition(p), eq_old, neg_new).antibody("tif1g").value is False


def test_value_and_interpretation_disagreeing_is_unknown_and_reported(engine: Engine) -> None:
    p = f.patient()
    obs = named(
        p, "TIF-1y Ab", valueString="Negative", interpretation=[f.concept(f.V3_INTERP, "POS")]
    )
    facts = facts_of(engine, p, f.iim_condition(p), obs)
    assert facts.antibody("tif1g").value is UNKNOWN
    assert any(r.CONFLICT in x for x in facts.findings)


@pytest.mark.parametrize(("setting", "expected"), [("positive", True), ("unknown", UNKNOWN)])
def test_one_plus_follows_the_weak_positive_setting(
    engine: Engine, setting: str, expected: object
) -> None:
    k = engine.knowledge
    site = k.site.model_copy(
        update={
            "antibody_results": k.site.antibody_results.model_copy(
                update={"weak_positive": setting}
            )
        }
    )
    p = f.patient()
    obs = named(p, "PM-Scl75", valueString="1+")
    result = run_one(Engine(k.model_copy(update={"site": site})), p, f.iim_condition(p), obs)
    assert result.plan.assessment.facts.antibody("pmscl").value is expected


def test_value_boolean_and_coded_detected(engine: Engine) -> None:
    p = f.patient()
    jo1 = named(p, "Jo-1 Ab", valueBoolean=True)
    srp = named(
        p, "SRP Ab", valueCodeableConcept={"coding": [{"system": f.SCT, "code": "260373001"}]}
    )
    facts = facts_of(engine, p, f.iim_condition(p), jo1, srp)
    assert (facts.antibody("jo1").value, facts.antibody("srp").value) == (True, True)


def test_unreadable_result_is_tested_but_unknown_and_reported(engine: Engine) -> None:
    p = f.patient()
    obs = named(p, "TIF-1y Ab", valueString="see comment")
    facts = facts_of(engine, p, f.iim_condition(p), obs)
    fact = facts.antibody("tif1g")
    assert (fact.value, fact.sources) == (UNKNOWN, (f"Observation/{obs['id']}",))
    assert any(r.UNREADABLE in x for x in facts.findings)


# --- panels and reports -------------------------------------------------------------------------


def test_has_member_to_contained_members(engine: Engine) -> None:
    p = f.patient()
    tif = {**named(None, "TIF-1 gamma (155 kDa) Ab", valueString="Positive"), "id": "m1"}
    nxp = {**named(None, "NXP-2 (MJ) Ab", valueString="Negative"), "id": "m2"}
    panel = f.observation(
        p,
        {"text": "Myositis Extended Panel"},
        contained=[tif, nxp],
        hasMember=[{"reference": "#m1"}, {"reference": "#m2"}],
    )
    facts = facts_of(engine, p, f.iim_condition(p), panel)
    assert (facts.antibody("tif1g").value, facts.antibody("nxp2").value) == (True, False)
    assert facts.antibody("tif1g").sources == (f"Observation/{panel['id']}#m1",)
    assert f"Observation/{panel['id']}" in facts.all_sources


def test_report_results_without_subject_reach_the_reports_patient(engine: Engine) -> None:
    p = f.patient()
    tif = named(None, "TIF-1y Ab", valueString="Positive", effective=None)
    mda = named(None, "MDA5 Ab", valueString="Negative")
    dr = report(p, tif, mda)
    facts = facts_of(engine, p, f.iim_condition(p), dr, tif, mda)
    assert (facts.antibody("tif1g").value, facts.antibody("mda5").value) == (True, False)
    # A result without its own date takes the report's.
    assert facts.antibody("tif1g").when is not None
    assert facts.antibody("tif1g").when.isoformat() == "2024-03-05"


def test_report_results_contained_in_the_report(engine: Engine) -> None:
    p = f.patient()
    tif = {**named(None, "Anti-TIF-1gamma Ab", valueString="3+ Strong Positive"), "id": "c1"}
    panel = {
        **f.observation(None, {"text": "Myositis panel"}),
        "id": "c2",
        "hasMember": [{"reference": "#c3"}],
    }
    sae = {**named(None, "SAE1 Ab", valueString="Negative"), "id": "c3"}
    dr = valid(
        {
            "resourceType": "DiagnosticReport",
            "id": "dr-contained",
            "status": "final",
            "code": {"text": "Myositis panel"},
            "subject": f.ref(p),
            "contained": [tif, panel, sae],
            "result": [{"reference": "#c1"}, {"reference": "#c2"}],
        }
    )
    facts = facts_of(engine, p, f.iim_condition(p), dr)
    assert (facts.antibody("tif1g").value, facts.antibody("sae1").value) == (True, False)


def test_each_patient_gets_only_its_own_reports_results(engine: Engine) -> None:
    a, b = f.patient(), f.patient()
    res_a = named(None, "TIF-1y Ab", valueString="Positive")
    res_b = named(None, "TIF-1y Ab", valueString="Negative")
    data = f.bundle(
        a,
        b,
        f.iim_condition(a),
        f.iim_condition(b),
        report(a, res_a),
        report(b, res_b),
        res_a,
        res_b,
    )
    records = {rec.reference: rec for rec in read_patients(data)}
    got = {
        ref: extract_facts(rec, engine.knowledge, engine.matcher).antibody("tif1g").value
        for ref, rec in records.items()
    }
    assert got == {f"Patient/{a['id']}": True, f"Patient/{b['id']}": False}


def test_report_result_about_another_patient_is_not_used(engine: Engine) -> None:
    a, b = f.patient(), f.patient()
    theirs = named(b, "TIF-1y Ab", valueString="Positive")
    facts = facts_of(engine, a, b, f.iim_condition(a), report(a, theirs), theirs)
    assert facts.antibody("tif1g").value is UNKNOWN
    assert any("report result is about another subject" in x for x in facts.findings)


@pytest.mark.parametrize(
    ("member_status", "finding"),
    [
        ("preliminary", "panel member ignored (status preliminary)"),
        (None, "panel member not in the input"),
    ],
)
def test_unusable_panel_members_are_reported(
    engine: Engine, member_status: str | None, finding: str
) -> None:
    p = f.patient()
    member = named(None, "TIF-1y Ab", valueString="Positive", status=member_status or "final")
    panel = f.observation(p, {"text": "Myositis panel"}, hasMember=[f.ref(member)])
    resources = [p, f.iim_condition(p), panel] + ([member] if member_status else [])
    facts = facts_of(engine, *resources)
    assert facts.antibody("tif1g").value is UNKNOWN
    assert any(finding in x for x in facts.findings)


def test_missing_report_result_and_cancelled_report_are_reported(engine: Engine) -> None:
    p = f.patient()
    absent = named(None, "TIF-1y Ab", valueString="Positive")
    cancelled = {**report(p, absent), "id": "dr-cancelled", "status": "cancelled"}
    facts = facts_of(engine, p, f.iim_condition(p), report(p, absent), valid(cancelled))
    assert any("report result not in the input" in x for x in facts.findings)
    assert any("diagnostic report ignored (status cancelled)" in x for x in facts.findings)


def test_result_read_once_when_bundled_and_linked(engine: Engine) -> None:
    p = f.patient()
    pos = named(p, "TIF-1y Ab", valueString="Positive")
    panel = f.observation(p, {"text": "Myositis panel"}, hasMember=[f.ref(pos)])
    facts = facts_of(engine, p, f.iim_condition(p), panel, report(p, pos), pos)
    assert facts.antibody("tif1g").sources == (f"Observation/{pos['id']}",)
    assert not any("conflicting" in x for x in facts.findings)
