"""Cards from results: one per tier and scope, the suggestion convention, no nagging."""

from __future__ import annotations

import copy
import dataclasses
import uuid
from typing import Any

import pytest

from fhir_dm.cds.cards import (
    CARD_NOT_APPLICABLE,
    CARD_PLAN_ON_FILE,
    CARD_SCREENING_PLAN,
    CardBuilder,
    IssuedCard,
    card_uuid,
    find_plan_on_file,
    md,
    render_detail,
    suggestion_actions,
)
from fhir_dm.cds.models import MAX_SUMMARY_CHARS
from fhir_dm.cds.settings import CdsConfig
from fhir_dm.common.errors import KnowledgeError
from fhir_dm.core.assess import Engine, PatientResult
from fhir_dm.knowledge.models import Knowledge
from tests import factories as f
from tests.conftest import NOW
from tests.unit.cds import scenarios

HOOK = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"


def run_one(engine: Engine, *resources: dict[str, Any]) -> PatientResult:
    [result] = engine.assess(f.bundle(*resources), now=NOW).results
    return result


def _cards(builder: CardBuilder, result: PatientResult, **kw: Any) -> list[IssuedCard]:
    return builder.cards(result, hook_instance=HOOK, **kw)


def _stored_plan(result: PatientResult, **changes: Any) -> dict[str, Any]:
    """The result's CarePlan as a server holds it after the suggestion was applied."""
    assert result.care_plan is not None
    plan = copy.deepcopy(result.care_plan)
    plan.update({"id": "cp-1", "meta": {"lastUpdated": "2024-04-16T10:00:00Z"}}, **changes)
    return plan


@pytest.fixture(scope="module")
def high(engine: Engine) -> PatientResult:
    return run_one(engine, *scenarios.high_risk())


def test_high_risk_card_is_a_warning_with_a_recommended_suggestion(
    builder: CardBuilder, high: PatientResult, knowledge: Knowledge
) -> None:
    [issued] = _cards(builder, high)
    card = issued.card.dump()

    assert issued.card_type == CARD_SCREENING_PLAN
    assert card["summary"].startswith("IIM cancer screening: High risk — Dermatomyositis, anti")
    assert card["indicator"] == "warning"
    assert card["selectionBehavior"] == "any"
    assert card["uuid"] == card_uuid("dm-cancer-screening", HOOK, CARD_SCREENING_PLAN)
    source = card["source"]
    assert (
        source["url"]
        == knowledge.ruleset.guideline.url
        == "https://doi.org/10.1038/s41584-023-01045-w"
    )
    assert source["topic"] == {
        "system": "http://fhir-dm.org/fhir/CodeSystem/dm-careplan-category",
        "code": "dm-cancer-screening",
        "display": "IIM cancer screening",
    }
    assert card["links"] == [
        {"label": card["links"][0]["label"], "url": source["url"], "type": "absolute"}
    ]
    assert {r["code"] for r in card["overrideReasons"]} >= {
        "screened-elsewhere",
        "patient-declined",
    }
    assert all(r["display"] for r in card["overrideReasons"])
    [suggestion] = card["suggestions"]
    orders = len(high.service_requests)
    assert suggestion["label"] == f"Create the screening plan ({orders} orders)"
    assert suggestion["isRecommended"] is True
    assert suggestion["uuid"] == issued.suggestion_uuid
    kinds = [a["resource"]["resourceType"] for a in suggestion["actions"]]
    assert kinds == ["RiskAssessment", "CarePlan", *["ServiceRequest"] * orders, "Provenance"]
    assert [a["type"] for a in suggestion["actions"]][:-1] == ["create"] * (orders + 2)
    assert suggestion["actions"][-1]["type"] == "update"


def test_detail_is_concise_tier_why_in_clinical_words_and_next(
    builder: CardBuilder, high: PatientResult
) -> None:
    detail = _cards(builder, high)[0].card.detail or ""
    assert detail.startswith("**High risk of IIM-associated cancer**")
    why = next(line for line in detail.splitlines() if line.startswith("**Why**"))
    assert "anti-TIF1-gamma positive" in why
    # Clinical words: no rule-writing notes, source tags or rule ids in the reasons.
    for noise in ("exact age", "counts)", "[BMJ]", "[AT]", "(evidence ", "ab-tif1g"):
        assert noise not in why, noise
    # Next: key imaging first (not the same three basic items for every tier), at most five.
    start = detail.splitlines().index("**Next**:")
    next_items = [line for line in detail.splitlines()[start + 1 :] if line.startswith("- ")]
    # Overdue first (the lung baseline here), then the tier's key imaging.
    overdue = [i for i in next_items if i.startswith("- **Overdue**")]
    assert next_items[: len(overdue)] == overdue
    rest = next_items[len(overdue) :]
    assert not overdue or rest == [] or rest[0].startswith("- CT of neck, chest, abdomen")
    assert len([i for i in next_items if not i.startswith("- and ")]) <= 5
    assert "| When | Due | Status | Tests | Consider |" not in detail
    assert "proposal for a clinician" in detail
    assert "**Not recorded** (unknown, not negative)" in detail
    # Rule ids and evidence sit in the detail section behind a rule, not in the reasons.
    details = detail.split("\n---\n", 1)[1]
    assert "ab-tif1g (guideline)" in details
    assert f"rule set {high.plan.assessment.ruleset}" in details
    assert len(detail) < 1800


def test_moderate_preliminary_next_starts_with_the_antibody_panel_and_ct(
    builder: CardBuilder, engine: Engine
) -> None:
    """Issue 19: for a moderate, preliminary patient "Next" left out the two orders that matter."""
    result = run_one(engine, *scenarios.moderate_preliminary())
    detail = _cards(builder, result)[0].card.detail or ""
    lines = detail.splitlines()
    items = [i for i in lines[lines.index("**Next**:") + 1 :] if "**Overdue**" not in i]
    assert items[0].startswith("- Myositis-specific antibody panel")
    assert "could raise the tier" in items[0]
    assert items[1].startswith("- CT of neck, chest, abdomen and pelvis")


def test_with_an_app_the_card_links_to_it_as_a_smart_link(
    knowledge: Knowledge, cds_config: CdsConfig, high: PatientResult
) -> None:
    builder = CardBuilder(knowledge, cds_config, app_launch_url="https://dm.example.org/app/launch")
    card = _cards(builder, high)[0].card.dump()
    assert card["links"][1] == {
        "label": "Open the screening timeline",
        "url": "https://dm.example.org/app/launch",
        "type": "smart",
    }
    assert "(link below)" in card["detail"]


def test_the_full_detail_still_renders_the_schedule_table(high: PatientResult) -> None:
    detail = render_detail(high.explanation, max_findings=10, orders=1)
    assert "| When | Due | Status | Tests | Consider |" in detail
    assert "| At diagnosis | 2024-03-01 to 2024-06-01 |" in detail
    assert "Consider 18F-FDG PET-CT" in detail  # a "consider" item
    # Data text cannot open a link or HTML: brackets and angle brackets are escaped.
    linked = dataclasses.replace(high.explanation, reasons=("[anti-TIF1-gamma](https://x.org)",))
    assert "\\[anti-TIF1-gamma\\]" in render_detail(linked, max_findings=10, orders=1)


def test_moderate_preliminary_card_says_preliminary(builder: CardBuilder, engine: Engine) -> None:
    result = run_one(engine, *scenarios.moderate_preliminary())
    [issued] = _cards(builder, result)
    assert issued.card.summary.startswith("IIM cancer screening: Moderate risk (preliminary) — ")
    assert issued.card.indicator == "warning"
    assert "*Preliminary*" in (issued.card.detail or "")
    assert issued.tier == "moderate"
    actions = issued.card.suggestions[0].actions if issued.card.suggestions else []
    assert actions and actions[0].description.endswith("Moderate risk (preliminary) (IMACS 2023)")
    assert actions[0].resource and actions[0].resource["status"] == "preliminary"


def test_standard_card_is_info(builder: CardBuilder, engine: Engine) -> None:
    result = run_one(engine, *scenarios.standard_risk())
    [issued] = _cards(builder, result)
    assert issued.card.summary.startswith("IIM cancer screening: Standard risk — ")
    assert issued.card.indicator == "info"


def test_no_iim_gives_no_card(builder: CardBuilder, engine: Engine) -> None:
    assert _cards(builder, run_one(engine, *scenarios.no_iim())) == []


def test_an_iim_outside_the_guideline_gets_no_card_only_when_a_site_turns_it_off(
    cds_config: CdsConfig, knowledge: Knowledge, engine: Engine
) -> None:
    config = cds_config.model_copy(
        update={"cards": cds_config.cards.model_copy(update={"not_applicable_card": False})}
    )
    silent = CardBuilder(knowledge, config)
    assert silent.cards(run_one(engine, *scenarios.juvenile()), hook_instance=HOOK) == []


def test_an_iim_outside_the_guideline_gets_an_info_card_by_default(
    builder: CardBuilder, engine: Engine
) -> None:
    [issued] = builder.cards(run_one(engine, *scenarios.juvenile()), hook_instance=HOOK)
    assert issued.card_type == CARD_NOT_APPLICABLE
    assert issued.card.indicator == "info"
    assert issued.card.suggestions is None
    assert "Juvenile-onset IIM" in (issued.card.detail or "")
    assert builder.cards(run_one(engine, *scenarios.no_iim()), hook_instance=HOOK) == []


@pytest.mark.parametrize(
    "scenario", [scenarios.high_risk, scenarios.moderate_preliminary, scenarios.standard_risk]
)
def test_summaries_stay_under_140_characters(
    builder: CardBuilder, engine: Engine, scenario: Any
) -> None:
    result = run_one(engine, *scenario())
    plan = _stored_plan(result)
    for kwargs in ({}, {"existing_plans": [plan]}):
        for issued in _cards(builder, result, **kwargs):
            assert len(issued.card.summary) <= MAX_SUMMARY_CHARS < 140


def test_suggestion_resources_are_the_write_back_resources_with_relative_references(
    high: PatientResult,
) -> None:
    actions = suggestion_actions(high, include_provenance=True, summary_label="IMACS 2023")
    assert len(actions) == len(high.entries)
    ids: dict[str, str] = {}
    for action, entry in zip(actions, high.entries, strict=True):
        resource = action.resource or {}
        core = entry["resource"]
        assert resource["resourceType"] == core["resourceType"]
        if entry["request"]["method"] == "POST":
            assert action.type == "create"
            assert resource["identifier"] == core["identifier"]
            assert resource["id"] == entry["fullUrl"].removeprefix("urn:uuid:")
        else:
            assert action.type == "update"
            assert resource["id"] == core["id"]  # PUT keeps the id its URL names
            assert entry["request"]["url"] == f"{core['resourceType']}/{core['id']}"
        ids[entry["fullUrl"]] = f"{resource['resourceType']}/{resource['id']}"
    assert "urn:uuid:" not in repr([a.resource for a in actions])
    risk_ref = {"reference": ids[high.entries[0]["fullUrl"]]}
    plan_ref = {"reference": ids[high.entries[1]["fullUrl"]]}
    care_plan = actions[1].resource or {}
    assert care_plan["supportingInfo"] == [risk_ref]
    request = actions[2].resource or {}
    assert request["basedOn"] == [plan_ref]
    assert risk_ref in request["supportingInfo"]
    provenance = actions[-1].resource or {}
    assert {t["reference"] for t in provenance["target"]} == set(ids.values()) - {
        f"Provenance/{provenance['id']}"
    }
    # The core's own resources are untouched.
    assert high.entries[2]["resource"]["basedOn"][0]["reference"].startswith("urn:uuid:")
    assert high.entries[1]["resource"].get("id") is None


def test_provenance_can_be_left_out(high: PatientResult) -> None:
    actions = suggestion_actions(high, include_provenance=False, summary_label="x")
    assert [a.resource["resourceType"] for a in actions if a.resource][-1] == "ServiceRequest"


def test_plan_on_file_replaces_the_suggestion(builder: CardBuilder, high: PatientResult) -> None:
    [issued] = _cards(builder, high, existing_plans=[_stored_plan(high)])
    card = issued.card
    assert issued.card_type == CARD_PLAN_ON_FILE
    assert card.suggestions is None and card.override_reasons is None
    assert card.summary.startswith("Plan on file: High risk; ")
    assert "CarePlan/cp-1" in (card.detail or "")
    assert "different plan" not in (card.detail or "")


def test_plan_on_file_of_a_changed_plan_says_so(builder: CardBuilder, high: PatientResult) -> None:
    plan = _stored_plan(high)
    marker = next(i for i in plan["identifier"] if i["system"].endswith("/sid/plan-digest"))
    marker["value"] = f"{high.identity.series}.olderdigest"  # same plan, an older assessment
    [issued] = _cards(builder, high, existing_plans=[plan])
    assert issued.card_type == "plan-changed"
    assert issued.card.indicator == "warning"
    assert "**The record now gives a different plan than the one on file.**" in (
        issued.card.detail or ""
    )


@pytest.mark.parametrize(
    "change",
    [
        {"status": "revoked"},
        {"instantiatesCanonical": ["http://fhir-dm.org/fhir/PlanDefinition/imacs-2023|0.9.0"]},
        {"identifier": [{"system": "http://fhir-dm.org/fhir/sid/plan-series", "value": "other"}]},
    ],
)
def test_other_plans_do_not_stop_the_suggestion(
    builder: CardBuilder, high: PatientResult, knowledge: Knowledge, change: dict[str, Any]
) -> None:
    plan = _stored_plan(high, **change)
    assert find_plan_on_file(high, [plan], knowledge) is None
    [issued] = _cards(builder, high, existing_plans=[plan])
    assert issued.card_type == CARD_SCREENING_PLAN


def test_card_uuids_are_deterministic_per_call_and_type() -> None:
    a = card_uuid("svc", HOOK, CARD_SCREENING_PLAN)
    assert a == card_uuid("svc", HOOK, CARD_SCREENING_PLAN)
    assert a != card_uuid("svc", HOOK, CARD_PLAN_ON_FILE)
    assert a != card_uuid("svc", str(uuid.uuid4()), CARD_SCREENING_PLAN)
    assert uuid.UUID(a).version == 5


def test_markdown_escaping() -> None:
    assert md("a [link](http://x) <b>|</b> *x* _y_ `z`\nnext") == (
        "a \\[link\\](http://x) \\<b\\>\\|\\</b\\> \\*x\\* \\_y\\_ \\`z\\` next"
    )


def test_detail_caps_findings_and_lists_unavailable_keys(high: PatientResult) -> None:
    explanation = high.explanation
    many = type(explanation)(
        **{
            **{name: getattr(explanation, name) for name in explanation.__slots__},
            "findings": tuple(f"Observation/{n}: ignored" for n in range(15)),
        }
    )
    detail = render_detail(many, max_findings=10, orders=1, unavailable=("existingPlans",))
    assert "**Input not used (first 10 of 15)**" in detail
    assert "Observation/9: ignored" in detail and "Observation/10:" not in detail
    assert "**Not checked** (the EHR could not provide it): existingPlans." in detail
    assert "1 proposed order and" in detail


def test_config_must_cover_every_tier(cds_config: CdsConfig, knowledge: Knowledge) -> None:
    cards = cds_config.cards.model_copy(update={"indicators": {"high": "warning"}})
    with pytest.raises(KnowledgeError, match="no indicator for tier"):
        CardBuilder(knowledge, cds_config.model_copy(update={"cards": cards}))


@pytest.mark.parametrize("months_later", [0, 12, 25])
def test_plan_on_file_keeps_listing_what_is_due_and_overdue_through_the_years(
    builder: CardBuilder, engine: Engine, months_later: int
) -> None:
    """Issue 19: once a plan was on file the card no longer said what was due, for 3 years."""
    now = NOW.replace(year=NOW.year + (NOW.month - 1 + months_later) // 12).replace(
        month=(NOW.month - 1 + months_later) % 12 + 1
    )
    [result] = engine.assess(f.bundle(*scenarios.high_risk()), now=now).results
    [issued] = _cards(builder, result, existing_plans=[_stored_plan(result)])
    assert issued.card_type == CARD_PLAN_ON_FILE
    detail = issued.card.detail or ""
    owed = [i for i in result.plan.items if result.plan.status(i) in ("due", "overdue")]
    assert owed, "the scenario owes something at this date"
    assert "**Overdue and due**:" in detail
    items = [line for line in detail.splitlines() if line.startswith("- ")]
    assert items and len([i for i in items if not i.startswith("- and ")]) <= 5
    if any(result.plan.status(i) == "overdue" for i in owed):
        assert items[0].startswith("- **Overdue**: ")
        assert issued.card.indicator == "warning"
    assert "overdue" in issued.card.summary or "due" in issued.card.summary
