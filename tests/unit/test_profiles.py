"""profiles/: valid R4B, in step with config/ (drift check) and with what the builders emit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhir_dm.core.assess import Engine
from fhir_dm.core.build.common import PROFILE_NAMES, plan_definition_url, profile_url
from fhir_dm.knowledge.models import Knowledge
from tests import factories as f
from tools import build_profiles
from tools.build_profiles import PROFILES_DIR, build_artifacts, render

NOW = date(2024, 4, 15)

Json = dict[str, Any]


def _on_disk() -> dict[str, Json]:
    return {
        p.name: json.loads(p.read_text(encoding="utf-8"))
        for p in sorted(PROFILES_DIR.glob("*.json"))
    }


ARTIFACTS = _on_disk()


def _of_type(resource_type: str) -> dict[str, Json]:
    return {r["url"]: r for r in ARTIFACTS.values() if r["resourceType"] == resource_type}


def _varied_patients() -> list[tuple[list[Json], date]]:
    """Patients whose plans use every kind of coded element the builders write."""
    unknown_sex = f.patient(gender=None, birth_date="1960-01-01")
    young = f.patient(birth_date="1990-01-01")
    juvenile = f.patient(birth_date="2012-01-01")
    pm = f.patient(gender="male", birth_date="1990-01-01")
    return [
        (f.seed_case(), date(2015, 10, 25)),
        ([unknown_sex, f.iim_condition(unknown_sex)], NOW),
        ([young, f.iim_condition(young), f.antibody(young, "mda5")], NOW),
        ([juvenile, f.iim_condition(juvenile, code="1212005")], NOW),
        (
            [
                pm,
                f.iim_condition(pm, code="31384009"),
                *(f.antibody(pm, ab, "negative") for ab in f.ANTIBODY_LOINC),
            ],
            NOW,
        ),
    ]


@pytest.fixture(scope="module")
def generated(engine: Engine) -> list[Json]:
    """Every RiskAssessment, CarePlan, ServiceRequest and Provenance of the varied patients."""
    out: list[Json] = []
    for resources, now in _varied_patients():
        for result in engine.assess(f.bundle(*resources), now=now).results:
            out += [result.risk_assessment, *result.service_requests, result.provenance]
            if result.care_plan is not None:
                out.append(result.care_plan)
    return out


def _codings(node: Any) -> Iterator[Json]:
    """Every Coding-like dict (system and code) anywhere inside a resource."""
    if isinstance(node, dict):
        if isinstance(node.get("system"), str) and isinstance(node.get("code"), str):
            yield node
        for value in node.values():
            yield from _codings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _codings(value)


# --- every file is FHIR, named for what it holds --------------------------------------------


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_artifact_parses_as_its_r4b_model(name: str) -> None:
    resource = ARTIFACTS[name]
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    assert name == f"{resource['resourceType']}-{resource['id']}.json"


def test_every_artifact_has_an_id_and_a_canonical_url_under_the_base(knowledge: Knowledge) -> None:
    rs = knowledge.ruleset
    for resource in ARTIFACTS.values():
        assert resource["id"]
        assert resource["url"] == f"{rs.canonical_base}/{resource['resourceType']}/{resource['id']}"
        assert resource["version"] == rs.version
        assert resource["status"] == "active"


# --- drift: profiles/ is exactly what the generator writes now ------------------------------


def test_profiles_are_what_the_generator_writes_now(knowledge: Knowledge) -> None:
    expected = build_artifacts(knowledge)
    assert sorted(expected) == sorted(ARTIFACTS), "run: python -m tools.build_profiles"
    stale = [
        name
        for name, resource in expected.items()
        if (PROFILES_DIR / name).read_text(encoding="utf-8") != render(resource)
    ]
    assert not stale, f"out of date (run: python -m tools.build_profiles): {stale}"


def test_generator_check_mode_reports_drift(tmp_path: Path, knowledge: Knowledge) -> None:
    assert build_profiles.main(["--check"]) == 0
    assert build_profiles.main(["--out", str(tmp_path)]) == 0
    name = next(iter(build_artifacts(knowledge)))
    (tmp_path / name).write_text("{}", encoding="utf-8")
    (tmp_path / "CodeSystem-stale.json").write_text("{}", encoding="utf-8")
    assert build_profiles.drift(build_artifacts(knowledge), tmp_path) == sorted(
        [name, "CodeSystem-stale.json"]
    )
    assert build_profiles.main(["--check", "--out", str(tmp_path)]) == 1


def test_generator_output_is_deterministic(knowledge: Knowledge) -> None:
    first = {n: render(r) for n, r in build_artifacts(knowledge).items()}
    assert first == {n: render(r) for n, r in build_artifacts(knowledge).items()}


# --- the builders' references resolve in profiles/ ------------------------------------------


def test_every_declared_meta_profile_has_a_structure_definition(
    generated: list[Json], knowledge: Knowledge
) -> None:
    profiles = _of_type("StructureDefinition")
    declared = {
        (r["resourceType"], p) for r in generated for p in r.get("meta", {}).get("profile", [])
    }
    assert {t for t, _ in declared} == set(PROFILE_NAMES)
    for resource_type, url in declared:
        sd = profiles.get(url)
        assert sd is not None, f"no StructureDefinition for {url}"
        assert sd["type"] == resource_type
    assert {profile_url(knowledge, t) for t in PROFILE_NAMES} == set(profiles)


@pytest.mark.parametrize("url", sorted(_of_type("StructureDefinition")))
def test_structure_definitions_are_differential_constraints_on_r4(url: str) -> None:
    sd = _of_type("StructureDefinition")[url]
    assert sd["fhirVersion"] == "4.0.1"
    assert sd["derivation"] == "constraint"
    assert sd["baseDefinition"] == f"http://hl7.org/fhir/StructureDefinition/{sd['type']}"
    assert "snapshot" not in sd
    elements = sd["differential"]["element"]
    assert elements[0]["path"] == sd["type"]
    assert all(e["path"].split(".")[0] == sd["type"] for e in elements)
    assert len({e["id"] for e in elements}) == len(elements)
    for element in elements:  # no required binding: LOINC/SNOMED cannot be checked offline
        binding = element.get("binding")
        if binding and binding["strength"] == "required":
            assert binding["valueSet"].startswith(("http://fhir-dm.org/", "http://hl7.org/fhir/"))


def test_qualitative_risk_binding_is_not_required(knowledge: Knowledge) -> None:
    sd = _of_type("StructureDefinition")[profile_url(knowledge, "RiskAssessment")]
    (element,) = [
        e
        for e in sd["differential"]["element"]
        if e["id"] == "RiskAssessment.prediction.qualitativeRisk"
    ]
    assert element["binding"]["strength"] in ("extensible", "preferred")
    assert element["binding"]["valueSet"].endswith("/ValueSet/dm-risk-tier")
    assert element.get("min", 0) == 0  # out-of-scope patients have no tier


def test_project_codings_emitted_exist_in_the_code_systems(
    generated: list[Json], knowledge: Knowledge
) -> None:
    code_systems = _of_type("CodeSystem")
    base = knowledge.ruleset.canonical_base
    seen = set()
    consider = ("dm-screening", "consider")
    for resource in generated:
        for coding in _codings(resource):
            # "consider" items are CarePlan activities, never orders (clinical-logic §13).
            flag = (coding["system"], coding["code"]) == (
                f"{base}/CodeSystem/dm-screening",
                "consider",
            )
            assert not (flag and resource["resourceType"] == "ServiceRequest")
            if not coding["system"].startswith(f"{base}/CodeSystem/"):
                continue
            cs = code_systems.get(coding["system"])
            assert cs is not None, f"no CodeSystem {coding['system']}"
            concepts = {c["code"]: c for c in cs["concept"]}
            assert coding["code"] in concepts, f"{coding['code']} not in {cs['id']}"
            assert (
                coding.get("display", concepts[coding["code"]]["display"])
                == concepts[coding["code"]]["display"]
            )
            seen.add((cs["id"], coding["code"]))
    # the variety above reaches every project code system (override reasons appear only on
    # CDS Hooks cards: checked below)
    emitted = {cs["id"] for cs in code_systems.values()} - {"dm-cds-override-reason"}
    assert {cs for cs, _ in seen} == emitted
    # The variety has "consider" items: CarePlan activities marked with the 'consider' code in
    # their status reason (1.2.0), never on a ServiceRequest (checked above).
    assert consider in seen
    considered = [
        a["detail"]
        for r in generated
        if r["resourceType"] == "CarePlan"
        for a in r["activity"]
        if "detail" in a and "Consider: " in a["detail"]["description"]
    ]
    assert considered
    assert all(
        d["statusReason"]["coding"][0]["code"] == "consider"
        for d in considered
        if d["status"] == "not-started"
    )
    assert any(d["status"] == "not-started" for d in considered)
    assert not any("asNeededCodeableConcept" in r for r in generated)


def test_every_dm_screening_code_in_config_is_in_the_code_system(knowledge: Knowledge) -> None:
    (cs,) = [r for r in _of_type("CodeSystem").values() if r["id"] == "dm-screening"]
    assert cs["url"] == knowledge.terminology.system_url("dm-screening")
    concepts = {c["code"]: c["display"] for c in cs["concept"]}
    used = {
        (t.code.code, t.code.display)
        for t in knowledge.ruleset.tests.values()
        if t.code.system == "dm-screening"
    }
    used |= {
        (e.code, e.display)
        for vs in knowledge.terminology.value_sets.values()
        for e in vs.include
        if e.system == "dm-screening" and e.code is not None
    }
    assert used
    for code, display in used:
        assert concepts.get(code) == display, code
    assert concepts["consider"] == "Consider (conditional recommendation)"
    assert cs["content"] == "complete" and cs["count"] == len(concepts)


def test_project_system_aliases_are_the_code_system_urls(knowledge: Knowledge) -> None:
    code_systems = {r["id"]: r["url"] for r in _of_type("CodeSystem").values()}
    systems = knowledge.terminology.systems
    for cs_id, url in code_systems.items():
        assert systems[cs_id] == url


def test_risk_tier_code_system_has_every_tier(knowledge: Knowledge) -> None:
    (cs,) = [r for r in _of_type("CodeSystem").values() if r["id"] == "dm-risk-tier"]
    assert [(c["code"], c["display"]) for c in cs["concept"]] == [
        (level.id, level.label) for level in knowledge.ruleset.tiers.levels
    ]


# --- value sets -----------------------------------------------------------------------------


def _members(vs: Json) -> set[tuple[str, str]]:
    return {
        (inc["system"], c["code"])
        for inc in vs["compose"]["include"]
        for c in inc.get("concept", [])
    }


def _value_set(vs_id: str) -> Json:
    (vs,) = [r for r in _of_type("ValueSet").values() if r["id"] == vs_id]
    return vs


def _config_codes(knowledge: Knowledge, value_set_ids: list[str]) -> set[tuple[str, str]]:
    t = knowledge.terminology
    return {
        (t.system_url(e.system), e.code)
        for vs in value_set_ids
        for e in t.value_sets[vs].include
        if e.code is not None
    }


def test_antibody_value_set_has_every_antibody_code(knowledge: Knowledge) -> None:
    ids = [a.value_set for a in knowledge.ruleset.antibodies]
    members = _members(_value_set("dm-myositis-antibodies"))
    assert members == _config_codes(knowledge, ids)
    assert {(system, code) for system, code in members if system == "http://loinc.org"} == members


def test_subtype_value_set_has_every_exact_code_and_names_the_prefixes(
    knowledge: Knowledge,
) -> None:
    ids = [s.value_set for s in knowledge.ruleset.subtypes]
    vs = _value_set("dm-iim-subtypes")
    assert _members(vs) == _config_codes(knowledge, ids)
    prefixes = [
        e.prefix for i in ids for e in knowledge.terminology.value_sets[i].include if e.prefix
    ]
    assert prefixes
    assert all(f"{p}*" in vs["description"] for p in prefixes)


def test_screening_test_value_set_has_every_test_code(knowledge: Knowledge) -> None:
    t = knowledge.terminology
    expected = {
        (t.system_url(x.code.system), x.code.code) for x in knowledge.ruleset.tests.values()
    }
    assert _members(_value_set("dm-screening-tests")) == expected


def test_risk_tier_value_set_includes_the_code_system() -> None:
    vs = _value_set("dm-risk-tier")
    (cs,) = [r for r in _of_type("CodeSystem").values() if r["id"] == "dm-risk-tier"]
    assert vs["compose"]["include"] == [{"system": cs["url"]}]
    assert cs["valueSet"] == vs["url"]


# --- protocol -------------------------------------------------------------------------------


def _actions(node: Json) -> Iterator[Json]:
    for action in node.get("action", []):
        yield action
        yield from _actions(action)


def test_care_plans_instantiate_the_plan_definition(
    generated: list[Json], knowledge: Knowledge
) -> None:
    (pd,) = _of_type("PlanDefinition").values()
    assert f"{pd['url']}|{pd['version']}" == plan_definition_url(knowledge)
    plans = [r for r in generated if r["resourceType"] == "CarePlan"]
    assert plans
    assert all(p["instantiatesCanonical"] == [plan_definition_url(knowledge)] for p in plans)
    assert pd["type"]["coding"][0]["code"] in ("eca-rule", "clinical-protocol")
    assert any(knowledge.ruleset.guideline.doi in a.get("url", "") for a in pd["relatedArtifact"])


def test_plan_definition_covers_every_round_addon_and_lung_round(knowledge: Knowledge) -> None:
    rs = knowledge.ruleset
    (pd,) = _of_type("PlanDefinition").values()
    ids = {a["id"] for a in _actions(pd)}
    assert len(ids) == len(list(_actions(pd)))
    for tier, schedule in rs.schedules.items():
        assert {f"tier-{tier}.{r.id}" for r in schedule.rounds} <= ids
    assert {f"addon-{a.id}" for a in rs.addons} <= ids
    assert {f"lung-surveillance.{r.id}" for r in rs.lung_surveillance.rounds} <= ids


def test_every_plan_action_points_at_an_activity_definition(knowledge: Knowledge) -> None:
    rs = knowledge.ruleset
    activities = _of_type("ActivityDefinition")
    (pd,) = _of_type("PlanDefinition").values()
    targets = {a["definitionCanonical"] for a in _actions(pd) if "definitionCanonical" in a}
    assert targets == set(activities)
    assert {a["id"] for a in activities.values()} == set(rs.tests)
    for ad in activities.values():
        test = rs.tests[ad["id"]]
        assert ad.get("kind") == ("ServiceRequest" if test.kind == "order" else None)
        assert ad["intent"] == "proposal"
        assert ad["code"]["coding"][0]["code"] == test.code.code


# --- operations -----------------------------------------------------------------------------


def _parameters(op: Json) -> dict[tuple[str, str], Json]:
    return {(p["use"], p["name"]): p for p in op["parameter"]}


def test_operation_definitions_for_system_and_patient_levels(knowledge: Knowledge) -> None:
    base = knowledge.ruleset.canonical_base
    ops = _of_type("OperationDefinition")
    system = ops[f"{base}/OperationDefinition/dm-cancer-screening"]
    patient = ops[f"{base}/OperationDefinition/Patient-dm-cancer-screening"]
    assert system["code"] == patient["code"] == "dm-cancer-screening"
    assert (system["system"], system["type"], system["instance"]) == (True, False, False)
    assert (patient["system"], patient["type"], patient["instance"]) == (False, False, True)
    assert patient["resource"] == ["Patient"]
    sp, pp = _parameters(system), _parameters(patient)
    assert set(sp) == {("in", "bundle"), ("in", "preview"), ("in", "now"), ("out", "return")}
    assert set(pp) == {("in", "preview"), ("in", "now"), ("out", "return")}
    assert (sp["in", "bundle"]["type"], sp["in", "bundle"]["min"]) == ("Bundle", 1)
    assert sp["in", "preview"]["type"] == pp["in", "preview"]["type"] == "boolean"
    assert sp["in", "now"]["type"] == pp["in", "now"]["type"] == "date"
    assert sp["out", "return"]["type"] == pp["out", "return"]["type"] == "Bundle"
    assert "true (default)" in sp["in", "preview"]["documentation"]
    assert "false (default)" in pp["in", "preview"]["documentation"]


def test_cds_override_reasons_are_the_code_system() -> None:
    from fhir_dm.cds.settings import load_cds_config

    reasons = load_cds_config().override_reasons
    (cs,) = [r for r in _of_type("CodeSystem").values() if r["id"] == "dm-cds-override-reason"]
    assert cs["url"] == reasons.system
    assert {c["code"]: c["display"] for c in cs["concept"]} == {
        r.code: r.display for r in reasons.reasons
    }
