"""Prefetch templates from config, and resolution of every prefetch variant (no HTTP here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from fhir_dm.cds.prefetch import (
    Fetcher,
    PrefetchTemplate,
    build_templates,
    discovery_prefetch,
    parse_query,
    render,
    resolve_prefetch,
)
from fhir_dm.cds.settings import CdsConfig, CodeFilter, PrefetchConfig, TemplateConfig
from fhir_dm.common.errors import (
    InputError,
    KnowledgeError,
    PreconditionFailedError,
    UpstreamError,
)
from fhir_dm.knowledge.models import Knowledge
from tests.unit.cds import scenarios

Json = dict[str, Any]


class FakeFetcher:
    """Answers reads and searches from a list of resources; records every call."""

    def __init__(self, resources: Sequence[Json], calls: list[tuple[str, Any]], fail: bool = False):
        self.resources = resources
        self.calls = calls
        self.fail = fail
        self.closed = False

    def read(self, resource_type: str, id: str) -> Json | None:
        self.calls.append((resource_type, id))
        if self.fail:
            raise UpstreamError(f"GET {resource_type}/{{id}} failed: HTTP 500")
        return next(
            (r for r in self.resources if r["resourceType"] == resource_type and r["id"] == id),
            None,
        )

    def search(self, resource_type: str, params: Mapping[str, str | Sequence[str]]) -> list[Json]:
        self.calls.append((resource_type, dict(params)))
        if self.fail:
            raise UpstreamError(f"GET {resource_type}?… failed: HTTP 500")
        return [r for r in self.resources if r["resourceType"] == resource_type]

    def close(self) -> None:
        self.closed = True


def factory_for(resources: Sequence[Json], calls: list[tuple[str, Any]], **kw: Any) -> Any:
    def make() -> Fetcher:
        return FakeFetcher(resources, calls, **kw)

    return make


def no_server() -> Fetcher:
    raise PreconditionFailedError("no fhirServer and fhirAuthorization in the request")


def context(resources: Sequence[Json]) -> dict[str, Any]:
    return {"patientId": resources[0]["id"], "userId": "Practitioner/1"}


# --- templates ------------------------------------------------------------------------------


def test_templates_cover_every_input_the_rules_read(
    templates: tuple[PrefetchTemplate, ...],
) -> None:
    by_key = discovery_prefetch(templates)
    assert by_key["patient"] == "Patient/{{context.patientId}}"
    assert by_key["conditions"] == "Condition?patient={{context.patientId}}&_count=200"
    assert by_key["medicationRequests"].startswith(
        "MedicationRequest?patient={{context.patientId}}"
    )
    assert by_key["medicationStatements"].startswith("MedicationStatement?patient=")
    assert by_key["familyHistory"] == "FamilyMemberHistory?patient={{context.patientId}}&_count=200"
    assert by_key["procedures"].startswith(
        "Procedure?patient={{context.patientId}}&_count=200&code="
    )
    assert by_key["existingPlans"].startswith(
        "CarePlan?subject=Patient/{{context.patientId}}&status=active"
    )
    observations = by_key["observations"]
    assert observations.startswith("Observation?patient={{context.patientId}}&_count=200&code=")
    codes = observations.split("&code=")[1].split(",")
    assert "http://loinc.org|107562-1" in codes  # TIF1-gamma
    assert "http://loinc.org|2157-6" in codes  # creatine kinase
    assert "http://loinc.org|72166-2" in codes  # smoking status
    assert "http://hospital.example.org/lab-codes|MYO-TIF1G" in codes  # site-local mapping
    assert len(codes) == len(set(codes))


def test_every_search_template_asks_for_the_configured_page_size(
    cds_config: CdsConfig, knowledge: Knowledge
) -> None:
    templates = build_templates(cds_config.prefetch, knowledge)
    searches = [t for t in templates if "?" in t.query]
    assert searches and all("&_count=200" in t.query for t in searches)
    assert all("_count" not in t.query for t in templates if "?" not in t.query)  # reads
    smaller = cds_config.prefetch.model_copy(update={"page_size": 50})
    assert all(
        "&_count=50" in t.query for t in build_templates(smaller, knowledge) if "?" in t.query
    )
    own = cds_config.prefetch.model_copy(
        update={
            "templates": {
                **cds_config.prefetch.templates,
                "conditions": TemplateConfig(
                    query="Condition?patient={{context.patientId}}&_count=7"
                ),
            }
        }
    )
    [conditions] = [t for t in build_templates(own, knowledge) if t.key == "conditions"]
    assert conditions.query == "Condition?patient={{context.patientId}}&_count=7"


def test_long_code_lists_are_split_into_several_keys(
    cds_config: CdsConfig, knowledge: Knowledge
) -> None:
    config = cds_config.prefetch.model_copy(update={"max_codes_per_query": 10})
    keys = [t.key for t in build_templates(config, knowledge)]
    assert "observations" in keys and "observations-2" in keys and "observations-5" in keys
    assert all(
        len(t.query.split("&code=")[1].split(",")) <= 10
        for t in build_templates(config, knowledge)
        if "&code=" in t.query
    )


def test_too_long_a_query_stops_start_up(cds_config: CdsConfig, knowledge: Knowledge) -> None:
    config = cds_config.prefetch.model_copy(update={"max_query_length": 200})
    with pytest.raises(KnowledgeError, match="above max_query_length 200"):
        build_templates(config, knowledge)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (TemplateConfig(query="Observation?patient={{context.patient}}"), "unknown prefetch token"),
        (TemplateConfig(query="not a query"), "not a FHIR read"),
        (
            TemplateConfig(query="Observation?patient=x", codes=CodeFilter(value_sets=("nope",))),
            "unknown value set 'nope'",
        ),
        (
            TemplateConfig(
                query="Condition?patient=x", codes=CodeFilter(value_sets=("subtype-dm",))
            ),
            "matches by code prefix",
        ),
    ],
)
def test_bad_templates_stop_start_up(
    knowledge: Knowledge, template: TemplateConfig, message: str
) -> None:
    config = PrefetchConfig(
        templates={
            "patient": TemplateConfig(query="Patient/{{context.patientId}}", use="patient"),
            "bad": template,
        }
    )
    with pytest.raises(KnowledgeError, match=message):
        build_templates(config, knowledge)


def test_render_and_parse() -> None:
    rendered = render(
        "Observation?patient={{context.patientId}}&code=a|1,b|2", {"patientId": "p-1"}
    )
    assert rendered == "Observation?patient=p-1&code=a|1,b|2"
    assert parse_query(rendered) == ("Observation", None, {"patient": ["p-1"], "code": ["a|1,b|2"]})
    assert parse_query(render("Patient/{{context.patientId}}", {"patientId": "p.1"})) == (
        "Patient",
        "p.1",
        {},
    )
    with pytest.raises(InputError, match=r"context\.encounterId"):
        render("Encounter/{{context.encounterId}}", {"patientId": "p"})


# --- resolution -----------------------------------------------------------------------------


def test_complete_prefetch_needs_no_server(templates: tuple[PrefetchTemplate, ...]) -> None:
    resources = scenarios.high_risk()
    prefetch = scenarios.full_prefetch(templates, resources)
    resolved = resolve_prefetch(templates, prefetch, context(resources), no_server)
    assert resolved.patient == resources[0]
    assert list(resolved.resources) == resources[1:]
    assert resolved.fetched == () and resolved.unavailable == ()
    assert resolved.bundle()["entry"][0]["resource"] == resources[0]


@pytest.mark.parametrize(
    ("variant", "fetched"),
    [
        ("missing", True),
        ("null", False),
        ("operation-outcome", True),
        ("paged", True),
        ("complete", False),
    ],
)
def test_each_prefetch_variant(
    templates: tuple[PrefetchTemplate, ...], variant: str, fetched: bool
) -> None:
    resources = scenarios.high_risk()
    prefetch = scenarios.full_prefetch(templates, resources)
    antibody = resources[2]
    if variant == "missing":
        del prefetch["observations"]
    elif variant == "null":
        prefetch["observations"] = None
    elif variant == "operation-outcome":
        prefetch["observations"] = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "timeout"}],
        }
    elif variant == "paged":
        prefetch["observations"] = scenarios.searchset([], next_url="https://ehr/fhir?page=2")
    calls: list[tuple[str, Any]] = []
    resolved = resolve_prefetch(
        templates, prefetch, context(resources), factory_for(resources, calls)
    )
    assert (resolved.fetched == ("observations",)) is fetched
    assert (antibody in resolved.resources) is (variant != "null")
    if fetched:
        [(kind, params)] = calls
        assert kind == "Observation"
        assert params["patient"] == [resources[0]["id"]]
        assert "http://loinc.org|107562-1" in params["code"][0]
    else:
        assert calls == []


def test_searchset_outcome_entries_and_stray_patients_are_dropped(
    templates: tuple[PrefetchTemplate, ...],
) -> None:
    resources = scenarios.high_risk()
    prefetch = scenarios.full_prefetch(templates, resources)
    other = {"resourceType": "Patient", "id": "someone-else"}
    prefetch["conditions"]["entry"] += [
        {
            "resource": {"resourceType": "OperationOutcome", "issue": []},
            "search": {"mode": "outcome"},
        },
        {"resource": other, "search": {"mode": "include"}},
    ]
    resolved = resolve_prefetch(templates, prefetch, context(resources), no_server)
    kinds = [r["resourceType"] for r in resolved.resources]
    assert "OperationOutcome" not in kinds and "Patient" not in kinds


def test_missing_patient_is_read_from_the_server(templates: tuple[PrefetchTemplate, ...]) -> None:
    resources = scenarios.high_risk()
    prefetch = scenarios.full_prefetch(templates, resources)
    del prefetch["patient"]
    calls: list[tuple[str, Any]] = []
    resolved = resolve_prefetch(
        templates, prefetch, context(resources), factory_for(resources, calls)
    )
    assert calls == [("Patient", resources[0]["id"])]
    assert resolved.patient == resources[0]


def test_many_missing_keys_are_fetched_in_parallel(templates: tuple[PrefetchTemplate, ...]) -> None:
    resources = scenarios.high_risk()
    calls: list[tuple[str, Any]] = []
    resolved = resolve_prefetch(
        templates, None, context(resources), factory_for(resources, calls), workers=4
    )
    assert len(calls) == len(templates)
    assert set(resolved.fetched) == {t.key for t in templates}
    assert resolved.patient == resources[0]


@pytest.mark.parametrize("failure", ["no-server", "fetch-fails"])
def test_required_key_that_cannot_be_had_is_reported_incomplete(
    templates: tuple[PrefetchTemplate, ...], failure: str
) -> None:
    resources = scenarios.high_risk()
    prefetch = scenarios.full_prefetch(templates, resources)
    del prefetch["conditions"]
    factory = no_server if failure == "no-server" else factory_for(resources, [], fail=True)
    resolved = resolve_prefetch(templates, prefetch, context(resources), factory)
    [why] = resolved.incomplete
    assert "prefetch key 'conditions' is missing" in why
    assert resolved.incomplete_types == ("Condition",)


def test_optional_key_that_cannot_be_had_is_reported(
    templates: tuple[PrefetchTemplate, ...],
) -> None:
    optional = tuple(
        PrefetchTemplate(t.key, t.query, t.use, t.use != "existing-plans") for t in templates
    )
    resources = scenarios.high_risk()
    prefetch = scenarios.full_prefetch(optional, resources)
    del prefetch["existingPlans"]
    resolved = resolve_prefetch(optional, prefetch, context(resources), no_server)
    assert resolved.unavailable == ("existingPlans",)


@pytest.mark.parametrize("patient", [None, "not-found"])
def test_no_patient_is_412(templates: tuple[PrefetchTemplate, ...], patient: str | None) -> None:
    resources = scenarios.high_risk()
    prefetch = scenarios.full_prefetch(templates, resources)
    if patient is None:
        prefetch["patient"] = None
        factory: Any = no_server
    else:
        del prefetch["patient"]
        factory = factory_for([], [])
    with pytest.raises(PreconditionFailedError, match="context patient is not available"):
        resolve_prefetch(templates, prefetch, context(resources), factory)


def test_prefetched_patient_must_be_the_context_patient(
    templates: tuple[PrefetchTemplate, ...],
) -> None:
    resources = scenarios.high_risk()
    prefetch = scenarios.full_prefetch(templates, resources)
    with pytest.raises(InputError, match=r"does not match context\.patientId"):
        resolve_prefetch(templates, prefetch, {"patientId": "other"}, no_server)


@pytest.mark.parametrize("value", ["a string", [1, 2], {"no": "resourceType"}])
def test_garbage_prefetch_is_400(templates: tuple[PrefetchTemplate, ...], value: Any) -> None:
    resources = scenarios.high_risk()
    prefetch = scenarios.full_prefetch(templates, resources)
    prefetch["conditions"] = value
    with pytest.raises(InputError, match=r"prefetch\.conditions"):
        resolve_prefetch(templates, prefetch, context(resources), no_server)


def test_existing_plans_are_kept_apart(templates: tuple[PrefetchTemplate, ...]) -> None:
    resources = scenarios.high_risk()
    plan = {
        "resourceType": "CarePlan",
        "id": "cp",
        "status": "active",
        "intent": "proposal",
        "subject": {"reference": f"Patient/{resources[0]['id']}"},
    }
    prefetch = scenarios.full_prefetch(templates, resources, plans=[plan])
    resolved = resolve_prefetch(templates, prefetch, context(resources), no_server)
    assert resolved.existing_plans == (plan,)
    assert plan not in resolved.resources
