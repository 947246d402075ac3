"""Generated resources and profiles/ artifacts validated by a real HAPI FHIR server ($validate)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import pytest
import requests

from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.core.build.service_request import CONSIDER_CODE as CONSIDER
from fhir_dm.knowledge.load import load_knowledge
from tests import factories as f
from tests.integration.conftest import REQUEST_TIMEOUT_S, profile_artifacts

pytestmark = pytest.mark.integration

NOW = date(2024, 4, 15)
SEED_NOW = date(2015, 10, 25)
LATER = date(2026, 3, 15)
BAD = ("error", "fatal")
ILD = f.concept(f.SCT, "233703007", "Interstitial lung disease (disorder)")
PM_SNOMED = "31384009"
JUVENILE_DM_SNOMED = "1212005"
CANCER_ANTIBODIES = ["tif1g", "nxp2", "sae1"]

Json = dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    """One patient, when they are assessed, and what the plan must show."""

    name: str
    resources: Callable[[], list[Json]]
    now: date
    tier: str | None
    preliminary: bool = False


def _negative(p: Json, names: list[str]) -> list[Json]:
    return [f.antibody(p, name, "negative") for name in names]


def _dm_38f_no_antibodies() -> list[Json]:
    p = f.patient("val-dm-38f", gender="female", birth_date="1985-06-01")
    return [p, f.iim_condition(p)]


def _mda5_ild() -> list[Json]:
    p = f.patient("val-mda5-ild", gender="female", birth_date="1990-02-02")
    return [
        p,
        f.iim_condition(p),
        f.condition(p, ILD, onset="2024-03-01"),
        f.antibody(p, "mda5", "positive"),
        *_negative(p, CANCER_ANTIBODIES),
    ]


def _sex_unknown() -> list[Json]:
    p = f.patient("val-sex-unknown", gender=None, birth_date="1960-01-01")
    return [p, f.iim_condition(p), *_negative(p, CANCER_ANTIBODIES)]


def _juvenile() -> list[Json]:
    p = f.patient("val-jdm", gender="male", birth_date="2012-01-01")
    return [p, f.iim_condition(p, code=JUVENILE_DM_SNOMED)]


def _polymyositis_standard() -> list[Json]:
    p = f.patient("val-pm", gender="female", birth_date="1990-01-01")  # male sex: moderate
    return [p, f.iim_condition(p, code=PM_SNOMED), *_negative(p, list(f.ANTIBODY_LOINC))]


def _high_round_missed() -> list[Json]:
    """High risk assessed two years on: the CBC of the work-up done (a completed activity), the
    12-month round and the lung baseline lapsed undone (cancelled activities), the 24-month
    round open (orders)."""
    p = f.patient("val-high-missed", gender="female", birth_date="1960-01-01")
    return [
        p,
        f.iim_condition(p),
        *_negative(p, CANCER_ANTIBODIES),
        f.done_request(p, load_knowledge(), "cbc", "2024-03-20"),
    ]


SCENARIOS = [
    Scenario("seed-tif1g-high", f.seed_case, SEED_NOW, "high"),
    Scenario("dm-38f-no-antibodies", _dm_38f_no_antibodies, NOW, "moderate", preliminary=True),
    Scenario("mda5-ild-lung", _mda5_ild, NOW, "moderate"),
    Scenario("sex-unknown", _sex_unknown, NOW, "high"),
    Scenario("juvenile-dm", _juvenile, NOW, None),
    Scenario("pm-standard", _polymyositis_standard, NOW, "standard"),
    Scenario("high-round-missed", _high_round_missed, LATER, "high"),
]


def _assess(scenario: Scenario) -> PatientResult:
    engine = Engine(load_knowledge(), software_version="test")
    results = engine.assess(f.bundle(*scenario.resources()), now=scenario.now).results
    assert len(results) == 1
    return results[0]


RESULTS = {s.name: _assess(s) for s in SCENARIOS}


def _details(care_plan: Json, status: str, reason_code: str | None = None) -> list[Json]:
    """The plan's activity details with this status (and this `statusReason` code)."""
    out = []
    for activity in care_plan.get("activity", []):
        detail = activity.get("detail")
        if detail is None or detail["status"] != status:
            continue
        codes = {c.get("code") for c in detail.get("statusReason", {}).get("coding", [])}
        if reason_code is None or reason_code in codes:
            out.append(detail)
    return out


def _generated(result: PatientResult) -> list[Json]:
    care_plan = [result.care_plan] if result.care_plan is not None else []
    return [result.risk_assessment, *care_plan, *result.service_requests]


def _case_id(resource: Json) -> str:
    """`CarePlan:plan`, `RiskAssessment:risk`, `ServiceRequest:<round>-<test>` (from the
    order's `series.round.test.YYYYMMDD`)."""
    parts = resource["identifier"][0]["value"].rsplit(".", 3)
    name = "-".join(parts[1:3]) if parts[-1].isdigit() else parts[-1]
    return f"{resource['resourceType']}:{name}"


CASES = [
    pytest.param(resource, id=f"{name}-{_case_id(resource)}")
    for name, result in RESULTS.items()
    for resource in _generated(result)
]


def _validate(
    http: requests.Session, base_url: str, resource: Json, profile: str | None = None
) -> list[Json]:
    """POST [base]/{type}/$validate (?profile=...) and return the OperationOutcome's issues."""
    params = {"profile": profile} if profile else None
    response = http.post(
        f"{base_url}/{resource['resourceType']}/$validate",
        params=params,
        data=json.dumps(resource),
        timeout=REQUEST_TIMEOUT_S,
    )
    body = response.json()
    assert body.get("resourceType") == "OperationOutcome", response.text
    issues: list[Json] = body.get("issue", [])
    return issues


def _describe(issues: list[Json]) -> str:
    lines = []
    for issue in issues:
        where = ", ".join(issue.get("expression") or issue.get("location") or ["-"])
        lines.append(f"{issue['severity']} at {where}: {issue.get('diagnostics', '')}")
    return "\n".join(lines)


def _errors(issues: list[Json]) -> list[Json]:
    return [i for i in issues if i.get("severity") in BAD]


# --- the scenarios are the variety they claim to be (no server needed) ----------------------


def test_scenarios_cover_tiers_preliminary_lung_consider_missed_done_and_out_of_scope() -> None:
    for scenario in SCENARIOS:
        result = RESULTS[scenario.name]
        assert result.tier == scenario.tier, scenario.name
        assert (result.risk_assessment["status"] == "preliminary") is scenario.preliminary
    assert RESULTS["juvenile-dm"].care_plan is None
    assert RESULTS["juvenile-dm"].service_requests == ()
    assert "qualitativeRisk" not in RESULTS["juvenile-dm"].risk_assessment["prediction"][0]
    lung = {r["code"]["text"] for r in RESULTS["mda5-ild-lung"].service_requests}
    assert {"High-resolution CT of the chest", "Pulmonary function tests with DLCO"} <= lung
    # "Consider" items are CarePlan activities marked so, never ServiceRequests (§13).
    for result in RESULTS.values():
        assert not any("asNeededCodeableConcept" in r for r in result.service_requests)
    unknown_sex = RESULTS["sex-unknown"]
    assert unknown_sex.care_plan is not None
    consider = {d["code"]["text"] for d in _details(unknown_sex.care_plan, "not-started", CONSIDER)}
    assert {"Mammography", "Prostate-specific antigen"} <= consider
    ordered = {r["code"]["text"] for r in unknown_sex.service_requests}
    assert not consider & ordered
    # A missed (lapsed) round is a cancelled activity with why; a done test a completed one.
    later = RESULTS["high-round-missed"].care_plan
    assert later is not None
    missed = _details(later, "cancelled")
    assert {d["statusReason"]["text"] for d in missed} >= {
        "missed: superseded by the 24 months round"
    }
    assert {d["code"]["text"] for d in _details(later, "completed")} == {"Complete blood count"}
    assert RESULTS["high-round-missed"].service_requests  # the 24-month round is open


# --- generated resources against their declared profiles ------------------------------------


@pytest.mark.parametrize("resource", CASES)
def test_generated_resource_validates_against_its_profile(
    resource: Json,
    fhir_base_url: str,
    fhir_http: requests.Session,
    loaded_profiles: dict[str, Json],
) -> None:
    (profile,) = resource["meta"]["profile"]
    assert profile in loaded_profiles
    issues = _validate(fhir_http, fhir_base_url, resource, profile)
    errors = _errors(issues)
    assert not errors, f"{len(errors)} error(s) validating against {profile}:\n{_describe(errors)}"


def _drop(*path: str) -> Callable[[Json], None]:
    def mutate(resource: Json) -> None:
        target = resource
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _set(key: str, value: Any) -> Callable[[Json], None]:
    def mutate(resource: Json) -> None:
        resource[key] = value

    return mutate


def _only_first_category(resource: Json) -> None:
    resource["category"] = resource["category"][:1]


def _period_to_date_time(resource: Json) -> None:
    resource["occurrenceDateTime"] = resource.pop("occurrencePeriod")["start"]


def _bogus_tier(resource: Json) -> None:
    resource["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] = "very-high"


# Negative controls: each breaks one constraint the profile adds to the base resource, so a
# clean result above means the profile was applied, not ignored.
BROKEN = [
    pytest.param("RiskAssessment", _drop("note"), "RiskAssessment.note", id="ra-no-note"),
    pytest.param("RiskAssessment", _drop("method"), "RiskAssessment.method", id="ra-no-method"),
    pytest.param("RiskAssessment", _bogus_tier, "very-high", id="ra-unknown-tier"),
    pytest.param("CarePlan", _only_first_category, "CarePlan.category", id="cp-no-dm-category"),
    pytest.param("CarePlan", _drop("text"), "CarePlan.text", id="cp-no-narrative"),
    pytest.param(
        "CarePlan",
        _set("instantiatesCanonical", ["urn:a", "urn:b"]),
        "CarePlan.instantiatesCanonical",
        id="cp-two-canonicals",
    ),
    pytest.param(
        "ServiceRequest", _drop("requisition"), "ServiceRequest.requisition", id="sr-no-requisition"
    ),
    pytest.param("ServiceRequest", _period_to_date_time, "Period", id="sr-occurrence-datetime"),
    pytest.param(
        "ServiceRequest",
        _drop("reasonReference"),
        "ServiceRequest.reasonReference",
        id="sr-no-reason",
    ),
]


@pytest.mark.parametrize(("resource_type", "mutate", "expected"), BROKEN)
def test_profiles_reject_what_they_constrain(
    resource_type: str,
    mutate: Callable[[Json], None],
    expected: str,
    fhir_base_url: str,
    fhir_http: requests.Session,
    loaded_profiles: dict[str, Json],
) -> None:
    result = RESULTS["seed-tif1g-high"]
    original = next(r for r in _generated(result) if r["resourceType"] == resource_type)
    resource = copy.deepcopy(original)
    mutate(resource)
    (profile,) = resource["meta"]["profile"]
    errors = _errors(_validate(fhir_http, fhir_base_url, resource, profile))
    assert any(expected in i.get("diagnostics", "") for i in errors), _describe(errors) or "none"


# --- the artifacts themselves ---------------------------------------------------------------


@pytest.mark.parametrize(
    "artifact", [pytest.param(a, id=f"{a['resourceType']}-{a['id']}") for a in profile_artifacts()]
)
def test_profile_artifact_is_valid_fhir(
    artifact: Json,
    fhir_base_url: str,
    fhir_http: requests.Session,
    loaded_profiles: dict[str, Json],
) -> None:
    errors = _errors(_validate(fhir_http, fhir_base_url, artifact))
    assert not errors, _describe(errors)


# --- the whole transaction Bundle (references between the generated resources resolve) ------

REASON_TARGET = "Invalid Resource target type"
RELATIVE_FULL_URL = "The fullUrl must be an absolute URL"

BUNDLES = [pytest.param(name, id=name) for name in RESULTS]


def _bundle_errors(http: requests.Session, base_url: str, name: str) -> list[Json]:
    result = RESULTS[name]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": list(result.entries)}
    return _errors(_validate(http, base_url, bundle))


@pytest.mark.parametrize("name", BUNDLES)
def test_transaction_bundle_has_no_other_errors(
    name: str, fhir_base_url: str, fhir_http: requests.Session, loaded_profiles: dict[str, Json]
) -> None:
    errors = _bundle_errors(fhir_http, fhir_base_url, name)
    assert not errors, _describe(errors)


def test_service_request_reason_references_are_allowed_r4_targets(
    fhir_base_url: str, fhir_http: requests.Session, loaded_profiles: dict[str, Json]
) -> None:
    errors = _bundle_errors(fhir_http, fhir_base_url, "seed-tif1g-high")
    bad = [e for e in errors if e.get("diagnostics", "").startswith(REASON_TARGET)]
    assert not bad, _describe(bad)


def test_bundle_full_urls_are_absolute(
    fhir_base_url: str, fhir_http: requests.Session, loaded_profiles: dict[str, Json]
) -> None:
    errors = _bundle_errors(fhir_http, fhir_base_url, "seed-tif1g-high")
    bad = [e for e in errors if e.get("diagnostics", "").startswith(RELATIVE_FULL_URL)]
    assert not bad, _describe(bad)
