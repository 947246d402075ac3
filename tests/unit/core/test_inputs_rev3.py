"""Real-world input shapes of clinical-logic §2 "Facts, rev 3", each built by hand.

HL7 v2 messages converted to FHIR by an open-source converter name the patient by
`Reference.identifier`, send results as `valueString` and codes in local systems; US Core and
IPS examples carry `onsetAge` / `onsetRange`, year-only birth dates and `Patient.link`.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import pytest

from fhir_dm.common.errors import NotFhirError
from fhir_dm.core.assess import Engine
from fhir_dm.core.inputs import (
    LINK_OUTSIDE,
    SUBJECT_AMBIGUOUS,
    SUBJECT_MISSING,
    SUBJECT_OTHER,
    read_patients,
    validate_resource,
)
from tests import factories as f
from tests.unit.core.helpers import facts_of, planned_tests, run_one

NOW = date(2024, 9, 1)
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.19.5.99"  # an HL7 v2 assigning authority as an OID
LOCAL_LAB = "http://lab.example.org/hl7v2/OBX-3"  # an OBX-3 local coding system
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

Json = dict[str, Any]


def _hl7v2_patient(**kw: Any) -> Json:
    """A PID-shaped Patient: an MRN identifier with its type (results name it, not the id)."""
    p = f.patient(**kw)
    p["identifier"] = [
        {
            "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
            "system": MRN_SYSTEM,
            "value": "MRN-004711",
        }
    ]
    return f._valid(p)


def _hl7v2_result(subject: Json | None, name: str, value: str, **kw: Any) -> Json:
    """An OBX-shaped Observation: local code with the lab's name, valueString, subject as given."""
    res: Json = {
        "resourceType": "Observation",
        "id": kw.pop("id", None) or f._next_id("obx"),
        "status": "final",
        "code": {"coding": [{"system": LOCAL_LAB, "code": "X" + name[:4], "display": name}]},
        "effectiveDateTime": "2024-06-20T09:30:00-04:00",
        "valueString": value,
    }
    if subject is not None:
        res["subject"] = subject
    res.update(kw)
    return f._valid(res)


def _by_identifier(value: str = "MRN-004711", system: str | None = MRN_SYSTEM) -> Json:
    ident = {"value": value} | ({"system": system} if system else {})
    return {"identifier": ident}


def _findings_with(result_findings: tuple[str, ...], message: str) -> list[str]:
    return [x for x in result_findings if message in x]


# --- whose data it is: Reference.identifier, missing subject, another patient ---------------


@pytest.mark.parametrize("system", [MRN_SYSTEM, None], ids=["system+value", "value only"])
def test_a_result_naming_the_patient_by_identifier_is_the_patients(
    engine: Engine, system: str | None
) -> None:
    p = _hl7v2_patient(birth_date="1970-02-01")
    tif1g = _hl7v2_result(_by_identifier(system=system), "TIF1-gamma Ab", "Positive")
    result = run_one(engine, p, f.iim_condition(p), tif1g, now=NOW)
    fact = result.plan.assessment.facts.antibody("tif1g")
    assert (fact.value, fact.sources) == (True, (f"Observation/{tif1g['id']}",))
    assert result.tier == "high"  # DM + anti-TIF1-gamma (and age over 40)
    assert not _findings_with(result.explanation.findings, "not used: Observation")


def test_a_condition_naming_the_patient_by_identifier_is_the_patients(engine: Engine) -> None:
    p = _hl7v2_patient(birth_date="1994-01-01")
    dm = f.iim_condition(p)
    dm["subject"] = _by_identifier()
    facts = facts_of(engine, p, dm)
    assert facts.iim is not None and facts.iim.subtype == "dm"


def test_a_result_without_a_subject_is_reported_not_dropped(engine: Engine) -> None:
    p = _hl7v2_patient(birth_date="1970-02-01")
    orphan = _hl7v2_result(None, "TIF1-gamma Ab", "Positive", id="obx-orphan")
    result = run_one(engine, p, f.iim_condition(p), orphan, now=NOW)
    assert result.plan.assessment.facts.antibody("tif1g").known is False  # untested, not positive
    assert f"{SUBJECT_MISSING}: Observation/obx-orphan" in result.explanation.findings


def test_a_display_only_subject_counts_as_missing(engine: Engine) -> None:
    p = _hl7v2_patient()
    orphan = _hl7v2_result({"display": "DOE^JANE"}, "TIF1-gamma Ab", "Positive", id="obx-d")
    facts = facts_of(engine, p, f.iim_condition(p), orphan)
    assert f"{SUBJECT_MISSING}: Observation/obx-d" in facts.findings


@pytest.mark.parametrize(
    "subject",
    [
        {"reference": "Patient/somebody-else"},
        _by_identifier("MRN-999999"),
        _by_identifier(system="urn:oid:2.16.840.1.113883.19.5.1"),  # same value, other authority
    ],
    ids=["reference", "identifier value", "identifier system"],
)
def test_a_result_about_another_patient_is_reported_not_used(engine: Engine, subject: Json) -> None:
    p = _hl7v2_patient()
    other = _hl7v2_result(subject, "TIF1-gamma Ab", "Positive", id="obx-other")
    facts = facts_of(engine, p, f.iim_condition(p), other)
    assert facts.antibody("tif1g").known is False
    assert f"{SUBJECT_OTHER}: Observation/obx-other" in facts.findings


def test_a_result_without_a_subject_inside_the_patients_report_is_read(engine: Engine) -> None:
    p = _hl7v2_patient()
    member = _hl7v2_result(None, "TIF1-gamma Ab", "Positive", id="obx-member")
    report = f._valid(
        {
            "resourceType": "DiagnosticReport",
            "id": "orm-1",
            "status": "final",
            "code": {"text": "Myositis antibody panel"},
            "subject": _by_identifier(),
            "effectiveDateTime": "2024-06-20",
            "result": [{"reference": "Observation/obx-member"}],
        }
    )
    facts = facts_of(engine, p, f.iim_condition(p), report, member)
    assert facts.antibody("tif1g").value is True
    assert not [x for x in facts.findings if "obx-member" in x]


def test_a_report_member_about_another_patient_is_not_used(engine: Engine) -> None:
    p = _hl7v2_patient()
    member = _hl7v2_result(_by_identifier("MRN-999999"), "TIF1-gamma Ab", "Positive", id="m2")
    report = f._valid(
        {
            "resourceType": "DiagnosticReport",
            "id": "orm-2",
            "status": "final",
            "code": {"text": "Myositis antibody panel"},
            "subject": f.ref(p),
            "result": [{"reference": "Observation/m2"}],
        }
    )
    facts = facts_of(engine, p, f.iim_condition(p), report, member)
    assert facts.antibody("tif1g").known is False
    assert "report result is about another subject; not used: Observation/m2" in facts.findings


def test_an_identifier_two_patients_share_names_neither(engine: Engine) -> None:
    a, b = _hl7v2_patient(), _hl7v2_patient()
    shared = _hl7v2_result(_by_identifier(), "TIF1-gamma Ab", "Positive", id="obx-shared")
    records = read_patients(
        f.bundle(a, b, f.iim_condition(a), f.iim_condition(b), shared), engine.relevance
    )
    assert len(records) == 2
    for record in records:
        assert (SUBJECT_AMBIGUOUS, "Observation/obx-shared") in record.unattributed
        assert all(r["id"] != "obx-shared" for _, r in record.resources)


# --- Patient.link ---------------------------------------------------------------------------


def _linked_pair() -> tuple[Json, Json]:
    new = f.patient("new", birth_date="1970-02-01", gender="female")
    old = f.patient("old", birth_date="1970-02-01", gender="female", active=False)
    new["link"] = [{"other": {"reference": "Patient/old"}, "type": "replaces"}]
    old["link"] = [{"other": {"reference": "Patient/new"}, "type": "replaced-by"}]
    return new, old


def test_data_filed_under_a_replaced_record_counts_for_the_surviving_one(engine: Engine) -> None:
    new, old = _linked_pair()
    result = engine.assess(
        f.bundle(old, new, f.iim_condition(new), f.antibody(old, "tif1g", "positive")), now=NOW
    ).results
    assert len(result) == 1  # one person, one assessment
    (one,) = result
    assert one.patient_reference == "Patient/new"
    assert one.plan.assessment.facts.antibody("tif1g").value is True
    assert one.tier == "high"
    # The output names the links (a notice, not "input not used").
    assert one.explanation.findings == ()
    (notice,) = [n for n in one.plan.assessment.notices if n.id == "patient-link"]
    assert "(Patient/new replaces Patient/old; Patient/old replaced-by Patient/new)" in notice.text
    assert notice.sources == ("Patient/old",)
    assert any("Patient/new replaces Patient/old" in n for n in one.explanation.notices)
    assert "Patient/old replaced-by Patient/new" in json.dumps(one.risk_assessment)


def test_a_seealso_link_by_identifier_joins_records(engine: Engine) -> None:
    first = _hl7v2_patient(birth_date="1970-02-01")
    second = f.patient("ips-1", birth_date="1970-02-01")
    second["link"] = [{"other": _by_identifier(), "type": "seealso"}]
    records = read_patients(
        f.bundle(first, second, f.iim_condition(first), f.antibody(second, "nxp2")),
        engine.relevance,
    )
    assert len(records) == 1
    assert records[0].reference == f"Patient/{first['id']}"  # the first of two equals
    assert any(r["resourceType"] == "Observation" for _, r in records[0].resources)


def test_a_link_to_a_record_not_in_the_input_is_named(engine: Engine) -> None:
    p = f.patient("kept", birth_date="1970-02-01")
    p["link"] = [{"other": {"reference": "Patient/elsewhere"}, "type": "replaces"}]
    facts = facts_of(engine, p, f.iim_condition(p))
    assert f"{LINK_OUTSIDE}: Patient/kept replaces Patient/elsewhere" in facts.findings


def test_a_refer_link_does_not_join(engine: Engine) -> None:
    a = f.patient("a")
    b = f.patient("b")
    a["link"] = [{"other": {"reference": "Patient/b"}, "type": "refer"}]
    assert len(read_patients(f.bundle(a, b), engine.relevance)) == 2


# --- age at onset without (or with part of) a birth date ----------------------------------------


def _negatives(p: Json, *names: str) -> list[Json]:
    return [f.antibody(p, n, "negative") for n in names]


ALL_TIER_ANTIBODIES = ("tif1g", "nxp2", "sae1", "hmgcr", "mi2", "mda5")


def test_onset_age_gives_the_age_when_the_birth_date_is_missing(engine: Engine) -> None:
    """A 52-year-old with no birth date: DM + age over 40 is High, not Moderate."""
    p = f.patient(birth_date=None)
    dm = f.iim_condition(
        p,
        onset=None,
        recorded="2024-06-01",
        onsetAge={"value": 52, "unit": "years", "system": UCUM, "code": "a"},
    )
    result = run_one(engine, p, dm, *_negatives(p, *ALL_TIER_ANTIBODIES), now=NOW)
    assert result.plan.assessment.facts.onset_age == (52, 53)
    assert result.tier == "high"
    assert not result.plan.assessment.preliminary
    assert any(
        "birth date missing; age at onset read from the Condition" in x
        for x in result.explanation.findings
    )


def test_onset_range_gives_the_age_when_the_birth_date_is_missing(engine: Engine) -> None:
    p = f.patient(birth_date=None)
    dm = f.iim_condition(
        p,
        onset=None,
        recorded="2024-06-01",
        onsetRange={
            "low": {"value": 50, "unit": "a", "system": UCUM, "code": "a"},
            "high": {"value": 55, "unit": "a", "system": UCUM, "code": "a"},
        },
    )
    result = run_one(engine, p, dm, *_negatives(p, *ALL_TIER_ANTIBODIES), now=NOW)
    assert result.plan.assessment.facts.onset_age == (50, 56)
    assert result.tier == "high"


def test_onset_range_with_a_birth_date_gives_the_onset_interval(engine: Engine) -> None:
    p = f.patient(birth_date="1970-02-01")
    dm = f.iim_condition(
        p,
        onset=None,
        onsetRange={"low": {"value": 54, "code": "a"}, "high": {"value": 54, "code": "a"}},
    )
    facts = facts_of(engine, p, dm)
    assert facts.iim is not None and facts.iim.onset_source == "onsetRange"
    assert str(facts.iim.onset) == "2024-02-01..2025-02-01"


def test_an_onset_age_of_exactly_forty_leaves_the_tier_preliminary_on_age(engine: Engine) -> None:
    """ "40 years" is 40 years and 0 to 364 days: over 40 or not is not known."""
    p = f.patient(birth_date=None)
    dm = f.iim_condition(p, onset=None, recorded="2024-06-01", onsetAge={"value": 40, "code": "a"})
    result = run_one(engine, p, dm, *_negatives(p, *ALL_TIER_ANTIBODIES), now=NOW)
    a = result.plan.assessment
    assert (result.tier, a.preliminary) == ("moderate", True)
    assert a.preliminary_because == ("age at onset (birth date missing)",)


def test_an_unusable_onset_age_is_reported(engine: Engine) -> None:
    p = f.patient(birth_date=None)
    dm = f.iim_condition(p, onset=None, onsetAge={"value": 52, "unit": "decades"})
    facts = facts_of(engine, p, dm)
    assert facts.onset_age is None
    assert any("onsetAge without a usable age" in x for x in facts.findings)


def test_a_year_only_birth_date_names_age_not_antibodies_that_cannot_change_the_tier(
    engine: Engine,
) -> None:
    """Born "1984", onset June 2024: 39 or 40, so over 40 is open. DM holds Moderate; only the
    age can lift it to High; untested HMGCR, Mi-2, MDA5 (intermediate) cannot."""
    p = f.patient(birth_date="1984")
    dm = f.iim_condition(p, onset="2024-06-10", recorded="2024-07-01")
    result = run_one(engine, p, dm, *_negatives(p, "tif1g", "nxp2", "sae1"), now=NOW)
    a = result.plan.assessment
    assert (result.tier, a.preliminary) == ("moderate", True)
    assert a.preliminary_because == ("age at onset (birth date known only to the year)",)
    assert a.preliminary_unknowns == ("onset_age",)
    # Nor is the antibody panel proposed for antibodies that cannot change the tier.
    assert "myositis-antibodies" not in planned_tests(result)


def test_a_year_only_birth_date_that_settles_the_age_is_not_preliminary(engine: Engine) -> None:
    p = f.patient(birth_date="1970")
    dm = f.iim_condition(p, onset="2024-06-10", recorded="2024-07-01")
    result = run_one(engine, p, dm, *_negatives(p, "tif1g", "nxp2", "sae1"), now=NOW)
    assert (result.tier, result.plan.assessment.preliminary) == ("high", False)


def test_both_age_and_antibodies_named_when_either_can_raise_the_tier(engine: Engine) -> None:
    p = f.patient(birth_date="1984-06")
    dm = f.iim_condition(p, onset="2024-06-10", recorded="2024-07-01")
    result = run_one(engine, p, dm, *_negatives(p, "sae1"), now=NOW)
    assert result.plan.assessment.preliminary_because == (
        "anti-TIF1-gamma antibody",
        "anti-NXP2 antibody",
        "age at onset (birth date known only to the month)",
    )


# --- names that must not overlap ---------------------------------------------------------------


def test_an_sae2_result_is_not_read_as_sae1(engine: Engine) -> None:
    p = _hl7v2_patient()
    sae2 = _hl7v2_result(_by_identifier(), "SAE2 Ab", "Positive", id="obx-sae2")
    facts = facts_of(engine, p, f.iim_condition(p), sae2)
    assert facts.antibody("sae1").known is False
    assert (
        "antibody result recognised but used by no rule; not used: Observation/obx-sae2"
        in facts.findings
    )


def test_an_sae1_result_by_name_is_still_read(engine: Engine) -> None:
    p = _hl7v2_patient()
    sae1 = _hl7v2_result(_by_identifier(), "SAE1 Ab", "POS")
    assert facts_of(engine, p, f.iim_condition(p), sae1).antibody("sae1").value is True


def _brute_force_named(facts: Any, knowledge: Any, tier: str) -> set[str]:
    """Every unknown in a smallest raising set, by evaluating every subset of unknowns."""
    from itertools import combinations

    from fhir_dm.core import rules

    rs = knowledge.ruleset
    names = [n for n in rs.tiers.preliminary_if_unknown if rules._is_unknown(n, facts, rs)]

    def raises(subset: tuple[str, ...]) -> bool:
        evaluator = rules.Evaluator(facts, knowledge, assume_positive=frozenset(subset))
        _, high, intermediate = rules._count(evaluator, rs)
        return rs.tiers.rank(rules._tier(rs, high, intermediate)) > rs.tiers.rank(tier)

    named: set[str] = set()
    for size in range(1, len(names) + 1):
        for subset in combinations(names, size):
            if raises(subset) and not any(
                raises(tuple(x for x in subset if x != y)) for y in subset
            ):
                named.update(subset)
    return named


@pytest.mark.parametrize(
    ("code", "gender", "birth", "tested"),
    [
        ("396230008", "female", "1984", ("tif1g", "nxp2", "sae1")),  # DM, age open
        ("396230008", None, "1994-01-01", ("tif1g",)),  # DM, sex unknown, young
        ("445187004", "female", "1994-01-01", ("tif1g", "nxp2", "sae1")),  # ASyS
        ("445187004", None, None, ()),  # ASyS, nothing known
        ("702380008", "male", "1984-06", ("hmgcr", "mi2")),  # unspecified subtype
        ("238935002", None, "1984", ("sae1",)),  # CADM
    ],
)
def test_the_unknowns_named_are_exactly_those_in_a_smallest_raising_set(
    engine: Engine, code: str, gender: str | None, birth: str | None, tested: tuple[str, ...]
) -> None:
    p = f.patient(gender=gender, birth_date=birth)
    dm = f.iim_condition(p, code=code, onset="2024-06-10", recorded="2024-07-01")
    result = run_one(engine, p, dm, *_negatives(p, *tested), now=NOW)
    a = result.plan.assessment
    assert a.tier is not None
    expected = _brute_force_named(a.facts, engine.knowledge, a.tier)
    assert set(a.preliminary_unknowns) == expected
    assert a.preliminary == bool(expected)


# --- an STU3 resource is named as such ---------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "sign"),
    [
        (
            {"resourceType": "Condition", "clinicalStatus": "active", "subject": {}},
            "Condition.clinicalStatus is a code, as in STU3",
        ),
        ({"resourceType": "ProcedureRequest", "status": "active"}, "STU3 resource type"),
        (
            {"resourceType": "Observation", "status": "final", "comment": "x", "code": 1},
            "Observation.comment exists in STU3",
        ),
    ],
)
def test_an_stu3_resource_gets_a_hint_that_fhir_dm_reads_r4(
    resource: dict[str, object], sign: str
) -> None:
    with pytest.raises(NotFhirError) as exc:
        validate_resource(resource, "Bundle.entry[1].resource")
    assert sign in exc.value.message and "fhir-dm reads FHIR R4 (4.0.x)" in exc.value.message
    assert "Invalid JSON" not in exc.value.message


def test_an_r4_error_gets_no_stu3_hint() -> None:
    with pytest.raises(NotFhirError) as exc:
        validate_resource({"resourceType": "Observation", "status": 5}, "Observation")
    assert "STU3" not in exc.value.message
