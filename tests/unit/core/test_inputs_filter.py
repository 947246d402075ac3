"""The input filter: only what the rules can read is validated and kept; the rest is counted once.

Real records are mostly claims, encounters and vital signs. Dropping must never change what
the rules see: a record whose relevant resources are surrounded by Synthea-shaped noise gets
the same facts, tier and plan as the same record without the noise.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import re
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from fhir_dm.common.errors import NotFhirError
from fhir_dm.core import facts as facts_module
from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.core.inputs import FOLLOWED_REFERENCES, READ_TYPES, Relevance, read_patients
from fhir_dm.core.terminology import SERVER_CHECKED_TYPES, Matcher
from fhir_dm.knowledge.models import Knowledge, LocalCode
from tests import factories as f
from tests import synthea

NOW = date(2015, 10, 25)
UNUSED = re.compile(r"^\d+ resources? no rule reads \(")


def _only(result: Any) -> PatientResult:
    assert len(result.results) == 1
    return result.results[0]  # type: ignore[no-any-return]


def _with_entries(bundle: dict[str, Any], resources: list[dict[str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(bundle)
    out["entry"] += [{"resource": r} for r in resources]
    return out


def _unused_lines(result: PatientResult) -> list[str]:
    return [line for line in result.plan.assessment.facts.findings if UNUSED.match(line)]


def test_noise_around_the_relevant_resources_changes_nothing_but_one_finding(
    engine: Engine,
) -> None:
    noisy = synthea.record(1500, noise_conditions=False)
    relevant = 1 + len(synthea.relevant(f.patient()))
    clean = {**noisy, "entry": noisy["entry"][:relevant]}
    with_noise = _only(engine.assess(noisy, now=NOW))
    without = _only(engine.assess(clean, now=NOW))

    a, b = with_noise.plan.assessment, without.plan.assessment
    assert dataclasses.replace(a.facts, findings=()) == dataclasses.replace(b.facts, findings=())
    assert (a.tier, a.preliminary, a.factors, a.notices) == (
        b.tier,
        b.preliminary,
        b.factors,
        b.notices,
    )
    assert with_noise.plan.items == without.plan.items
    assert a.tier == "high" and with_noise.service_requests
    # The relevant part exercises every kept shape: antibodies by code, text and component,
    # a panel member and a report result reached by reference only, CK, smoking, treatment.
    assert a.facts.antibody("tif1g").value is True
    assert a.facts.antibody("mi2").value is False  # text-only result
    assert a.facts.antibody("mda5").value is False  # component of a line blot
    assert a.facts.antibody("sae1").value is False  # panel member without a subject
    assert a.facts.feature("current_smoking").known
    assert len(a.facts.creatine_kinase) == 2
    assert any("not recognised as a myositis antibody" in x for x in a.facts.findings)
    extra = [line for line in a.facts.findings if line not in b.facts.findings]
    assert len(extra) == 1 and UNUSED.match(extra[0])
    assert not _unused_lines(without)


def test_noise_is_dropped_before_validation_and_counted_per_type(engine: Engine) -> None:
    bundle = synthea.record(1500)
    record = read_patients(bundle, engine.relevance)[0]
    kept = {res["resourceType"] for _, res in record.resources}
    assert not kept & {"Claim", "ExplanationOfBenefit", "Encounter", "Immunization", "CareTeam"}
    vitals = {c for c, *_ in synthea.VITALS + synthea.METABOLIC}
    assert not any(
        res["resourceType"] == "Observation"
        and res["code"].get("coding", [{}])[0].get("code") in vitals
        for _, res in record.resources
    )
    total = len(bundle["entry"])
    unused = dict(record.unused)
    # Everything is either kept or counted: the Patient, the record, three subject-less
    # resources reached by reference (two panel members, one report result), the rest unused.
    assert sum(unused.values()) + len(record.resources) + 1 + 3 == total
    assert unused["Claim"] == sum(
        1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Claim"
    )
    line = record.unused_summary()
    assert line is not None
    assert line.startswith(f"{sum(unused.values())} resources no rule reads (Observation ")
    assert "Claim" in line and "ExplanationOfBenefit" in line


def test_the_grouped_finding_appears_once(engine: Engine) -> None:
    result = _only(engine.assess(synthea.record(800), now=NOW))
    assert len(_unused_lines(result)) == 1
    assert "urn:uuid" not in _unused_lines(result)[0]  # counts, never one line per resource


def test_without_noise_there_is_no_unused_finding(engine: Engine) -> None:
    p = f.patient()
    result = _only(engine.assess(f.bundle(p, f.iim_condition(p)), now=date(2024, 4, 15)))
    assert _unused_lines(result) == []


def test_generated_records_are_valid_r4b() -> None:
    Bundle.model_validate(synthea.record(400, seed=3))


# --- conservative: unknown is kept -------------------------------------------------------------


def test_a_report_or_panel_is_kept_with_every_result_when_one_result_is_relevant(
    engine: Engine,
) -> None:
    p = f.patient()
    noise = f.observation(None, f.concept(f.LOINC, "2339-0"), valueString="90")
    antibody = f.antibody(None, "jo1", "positive")
    report = {
        "resourceType": "DiagnosticReport",
        "id": "rep",
        "status": "final",
        "code": f.concept(f.LOINC, "51990-0"),
        "subject": f.ref(p),
        "result": [f.ref(noise), f.ref(antibody)],
    }
    record = read_patients(f.bundle(p, report, noise, antibody), engine.relevance)[0]
    assert record.unused == ()
    assert record.resolve("Observation/" + noise["id"]) is noise


def test_a_noise_report_goes_with_its_noise_results(engine: Engine) -> None:
    p = f.patient()
    noise = f.observation(None, f.concept(f.LOINC, "2339-0"), valueString="90")
    report = {
        "resourceType": "DiagnosticReport",
        "id": "rep",
        "status": "final",
        "code": f.concept(f.LOINC, "51990-0"),
        "subject": f.ref(p),
        "result": [f.ref(noise)],
    }
    record = read_patients(f.bundle(p, report, noise), engine.relevance)[0]
    assert record.resources == ()
    assert record.resolve("Observation/" + noise["id"]) is None
    # The subject-less result names no patient; with one Patient it is counted for it.
    assert dict(record.unused) == {"DiagnosticReport": 1, "Observation": 1}


def test_a_report_whose_result_is_not_in_the_input_is_kept(engine: Engine) -> None:
    p = f.patient()
    report = {
        "resourceType": "DiagnosticReport",
        "id": "rep",
        "status": "final",
        "code": f.concept(f.LOINC, "51990-0"),
        "subject": f.ref(p),
        "result": [{"reference": "#contained-1"}, {"reference": "Observation/elsewhere"}],
    }
    record = read_patients(f.bundle(p, report), engine.relevance)[0]
    assert [res["id"] for _, res in record.resources] == ["rep"]


def test_a_noise_panel_member_is_kept_so_the_panel_resolves(engine: Engine) -> None:
    p = f.patient()
    comment = f.observation(None, {"text": "Specimen comment"}, valueString="haemolysed")
    member = f.antibody(None, "pl7", "negative")
    panel = f.observation(p, {"text": "Myositis panel"}, hasMember=[f.ref(member), f.ref(comment)])
    record = read_patients(f.bundle(p, panel, member, comment), engine.relevance)[0]
    assert record.resolve("Observation/" + comment["id"]) is comment
    assert record.unused == ()


@pytest.mark.parametrize(
    "code",
    [
        {"text": "TIF1-gamma Ab"},  # a synonym in the text
        {"coding": [{"system": f.LOCAL_LAB, "code": "Z9", "display": "Anti-Ku"}]},  # in a display
        f.concept(f.LOCAL_LAB, "MYO-NXP2"),  # a site-local code
        f.concept(f.LOINC, "2157-6"),  # creatine kinase
        f.concept(f.LOINC, "58410-2"),  # a screening test (CBC panel)
        {"text": "Histone Ab"},  # an antibody no value set knows: reported, so kept
    ],
)
def test_observations_the_rules_can_read_are_kept(engine: Engine, code: dict[str, Any]) -> None:
    assert engine.relevance.keeps({"resourceType": "Observation", "status": "final", "code": code})


def test_a_relevant_component_keeps_the_observation(engine: Engine) -> None:
    obs = {
        "resourceType": "Observation",
        "code": {"text": "Line blot"},
        "component": [{"code": f.concept(f.LOINC, "8480-6")}, {"code": {"text": "PL-12"}}],
    }
    assert engine.relevance.keeps(obs)


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Observation", "code": f.concept(f.LOINC, "8302-2", "Body Height")},
        {"resourceType": "Observation", "code": {"text": "Heart rate"}},
        {"resourceType": "Claim", "status": "active"},
        {"resourceType": "Immunization", "vaccineCode": {"text": "Influenza"}},
    ],
)
def test_what_no_rule_reads_is_dropped(engine: Engine, resource: dict[str, Any]) -> None:
    assert not engine.relevance.keeps(resource)


@pytest.mark.parametrize(
    "code", [None, "8302-2", {"coding": "8302-2"}, {"coding": ["8302-2"]}, {"text": 5}]
)
def test_a_malformed_observation_is_kept_and_reported_by_validation(
    engine: Engine, code: Any
) -> None:
    p = f.patient()
    obs: dict[str, Any] = {"resourceType": "Observation", "status": "final", "subject": f.ref(p)}
    if code is not None:
        obs["code"] = code
    assert engine.relevance.keeps(obs)
    with pytest.raises(NotFhirError) as err:
        engine.assess(_with_entries(f.bundle(p), [obs]), now=NOW)
    assert err.value.expression[0].startswith("Bundle.entry[1].resource")


def test_an_invalid_kept_resource_gives_the_same_error_as_without_the_filter(
    engine: Engine,
) -> None:
    p = f.patient()
    bad = dict(f.antibody(p, "tif1g"), status=7)
    data = _with_entries(f.bundle(p), [bad])
    with pytest.raises(NotFhirError) as filtered:
        read_patients(data, engine.relevance)
    with pytest.raises(NotFhirError) as unfiltered:
        read_patients(data)
    assert filtered.value.message == unfiltered.value.message
    assert tuple(filtered.value.expression) == ("Bundle.entry[1].resource.status",)


def test_an_invalid_resource_no_rule_reads_is_counted_not_validated(engine: Engine) -> None:
    p = f.patient()
    claim = {"resourceType": "Claim", "status": 7, "patient": f.ref(p)}
    data = _with_entries(f.bundle(p), [claim])
    record = read_patients(data, engine.relevance)[0]
    assert dict(record.unused) == {"Claim": 1}
    with pytest.raises(NotFhirError):
        read_patients(data)  # the unfiltered reader validates everything


def test_every_entry_still_needs_a_known_resource_type(engine: Engine) -> None:
    p = f.patient()
    data = _with_entries(f.bundle(p), [{"resourceType": "Claimz"}])
    with pytest.raises(NotFhirError, match="unknown resourceType 'Claimz'"):
        read_patients(data, engine.relevance)


def test_the_code_lists_come_from_the_knowledge(knowledge: Knowledge) -> None:
    """A site-local code added in config is kept; without the mapping it is noise."""
    obs = {"resourceType": "Observation", "code": f.concept("http://lab.example.org", "A-1")}
    mapping = LocalCode(system="http://lab.example.org", code="A-1", value_set="ab-tif1g")
    terminology = knowledge.terminology.model_copy(
        update={"mappings": (*knowledge.terminology.mappings, mapping)}
    )
    site = knowledge.model_copy(update={"terminology": terminology})
    assert not Relevance(knowledge, Matcher(knowledge.terminology)).keeps(obs)
    assert Relevance(site, Matcher(terminology)).keeps(obs)


def test_every_type_the_facts_reader_names_is_kept() -> None:
    """facts.py names the types it reads as string literals; each must pass the filter."""
    source = Path(facts_module.__file__).read_text(encoding="utf-8")
    names = {
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    fhir_types = {n for n in names if n.isidentifier() and n[:1].isupper() and _is_type(n)}
    assert fhir_types, "facts.py names no resource type?"
    assert fhir_types <= READ_TYPES | set(FOLLOWED_REFERENCES)
    assert set(SERVER_CHECKED_TYPES) <= READ_TYPES


def _is_type(name: str) -> bool:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        model = get_fhir_model_class(name)
    except (KeyError, ValueError):
        return False
    return "resourceType" in model.model_fields or hasattr(model, "get_resource_type")


@pytest.mark.parametrize("system", [{"a": 1}, ["x"], 7])
def test_a_coding_of_the_wrong_type_is_a_clear_input_error(engine: Engine, system: Any) -> None:
    """Malformed codes are kept for validation, which names the path (never a TypeError)."""
    p = f.patient()
    report = {
        "resourceType": "DiagnosticReport",
        "id": "bad-code",
        "status": "final",
        "subject": f.ref(p),
        "code": {"coding": [{"system": system, "code": "89283-6"}]},
    }
    bundle = f.bundle(p, f.iim_condition(p))  # valid; the bad report is added unvalidated
    bundle["entry"].append({"resource": report})
    with pytest.raises(NotFhirError, match=r"code\.coding\.0\.system"):
        engine.assess(bundle, now=date(2024, 4, 15))
