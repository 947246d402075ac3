"""FHIR output: R4B validity, round-trip, conditional entries, determinism, narrative."""

from __future__ import annotations

import json
from datetime import date

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

from fhir_dm.core.assess import Engine
from fhir_dm.knowledge.models import Knowledge
from tests import factories as f
from tests.unit.core.helpers import run_one

SEED_NOW = date(2015, 10, 25)


def _varied_patients() -> list[list[dict[str, object]]]:
    seed = f.seed_case()  # assessed in 2024: window closed, a completed plan, no order
    p2 = f.patient(gender=None, birth_date="1990-01-01")
    p3 = f.patient(birth_date="2012-01-01")
    p4 = f.patient(birth_date="1970-01-01", gender="female")
    return [
        seed,
        [p2, f.iim_condition(p2), f.antibody(p2, "mda5")],
        [p3, f.iim_condition(p3)],
        [p4, f.iim_condition(p4, code="31384009"), f.condition(p4, f.concept(f.SCT, "422868009"))],
    ]


def test_engine_can_validate_every_resource_it_builds(knowledge: Knowledge) -> None:
    strict = Engine(knowledge, validate_output=True)
    result = run_one(strict, *f.seed_case(), now=SEED_NOW)
    ordered = [i for i in result.plan.items if result.plan.orders_now(i)]
    assert len(result.service_requests) == len(ordered) >= 10
    # Later rounds and "consider" items are CarePlan activities, validated with the plan.
    assert result.care_plan is not None
    details = [a["detail"] for a in result.care_plan["activity"] if "detail" in a]
    assert len(details) == len(result.plan.items) - len(ordered) > 20
    # After the window: missed (cancelled, with the reason) activities of a completed plan.
    later = run_one(strict, *f.seed_case(), now=date(2019, 6, 1))
    assert later.care_plan is not None and later.care_plan["status"] == "completed"
    missed = [a["detail"] for a in later.care_plan["activity"] if "detail" in a]
    assert {d["status"] for d in missed} == {"cancelled"}
    assert all(d["statusReason"]["text"].startswith("missed: ") for d in missed)


def test_every_generated_resource_validates_and_round_trips(engine: Engine) -> None:
    for resources in _varied_patients():
        result = run_one(engine, *resources)
        generated = [result.risk_assessment, result.provenance, *result.service_requests]
        if result.care_plan:
            generated.append(result.care_plan)
        for resource in generated:
            model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            again = type(model).model_validate_json(model.model_dump_json())
            assert again == model


def test_result_is_a_valid_transaction_bundle_of_conditional_entries(engine: Engine) -> None:
    bundle = engine.assess(f.bundle(*f.seed_case()), now=date(2015, 10, 25)).bundle()
    Bundle.model_validate(bundle)
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        request = entry["request"]
        if request["method"] == "POST":
            ident = entry["resource"]["identifier"][0]
            criteria = request["ifNoneExist"].split("&")
            assert criteria[:2] == [
                f"identifier={ident['system']}|{ident['value']}",
                f"subject={entry['resource']['subject']['reference']}",
            ]
        else:
            assert (request["method"], request["url"]) == (
                "PUT",
                f"Provenance/{entry['resource']['id']}",
            )


def test_same_input_gives_the_same_bundle(engine: Engine) -> None:
    data = f.bundle(*f.seed_case())
    first = engine.assess(data, now=date(2015, 10, 25)).bundle()
    second = engine.assess(json.loads(json.dumps(data)), now=date(2015, 10, 25)).bundle()
    assert first == second


def test_changed_input_keeps_the_series_and_changes_the_digest(engine: Engine) -> None:
    p = f.patient(birth_date="1994-01-01")
    cond = f.iim_condition(p)
    before = run_one(engine, p, cond)
    after = run_one(engine, p, cond, f.antibody(p, "tif1g"))
    assert before.identity.series == after.identity.series
    assert before.identity.digest != after.identity.digest


def test_references_inside_the_result(engine: Engine) -> None:
    result = run_one(engine, *f.seed_case(), now=SEED_NOW)
    urls = {e["fullUrl"] for e in result.entries}
    care_plan = result.care_plan
    assert care_plan is not None
    assert care_plan["supportingInfo"][0]["reference"] in urls
    for request in result.service_requests:
        assert request["basedOn"][0]["reference"] in urls
        assert request["supportingInfo"][0]["reference"] in urls
        assert request["reasonReference"][0]["reference"].startswith("Condition/")
        assert request["subject"] == {"reference": "Patient/seed-case"}
    activity_refs = {a["reference"]["reference"] for a in care_plan["activity"] if "reference" in a}
    assert len(activity_refs) == len(result.service_requests)
    assert {t["reference"] for t in result.provenance["target"]} == urls - {
        result.entries[-1]["fullUrl"]
    }


def test_risk_assessment_contents(engine: Engine) -> None:
    result = run_one(engine, *f.seed_case(), now=SEED_NOW)
    ra = result.risk_assessment
    codings = ra["prediction"][0]["qualitativeRisk"]["coding"]
    assert [(c["system"].rsplit("/", 1)[1], c["code"]) for c in codings] == [
        ("dm-risk-tier", "high"),
        ("risk-probability", "high"),
    ]
    assert ra["method"]["coding"][0]["version"] == engine.knowledge.ruleset.version
    assert ra["condition"]["reference"].startswith("Condition/")
    assert {"reference": "Observation/" + ra["basis"][2]["reference"].split("/")[1]} in ra["basis"]
    assert ra["prediction"][0]["whenPeriod"] == {"start": "2015-10-20", "end": "2018-10-20"}


def test_care_plan_narrative_is_readable(engine: Engine) -> None:
    p = f.patient(gender=None, birth_date="1994-01-01")
    result = run_one(engine, p, f.iim_condition(p), f.antibody(p, "tif1g"))
    assert result.care_plan is not None
    div = result.care_plan["text"]["div"]
    assert div.startswith('<div xmlns="http://www.w3.org/1999/xhtml">')
    assert "High risk" in div and "<table>" in div and "<i>Consider</i>" in div
    assert "Not recorded (unknown, not negative)" in div
    assert engine.knowledge.ruleset.label in div


def test_orders_are_proposals_by_default(engine: Engine) -> None:
    result = run_one(engine, *f.seed_case(), now=SEED_NOW)
    assert {r["intent"] for r in result.service_requests} == {"proposal"}
    assert result.care_plan is not None and result.care_plan["intent"] == "proposal"


def test_series_does_not_change_with_the_day_when_onset_is_unknown(engine: Engine) -> None:
    p = f.patient(birth_date="1994-01-01")
    cond = f.iim_condition(p, onset=None)
    a = run_one(engine, p, cond, now=date(2024, 4, 15))
    b = run_one(engine, p, cond, now=date(2024, 4, 16))
    assert a.identity.series == b.identity.series


def test_series_is_the_patient_by_id_whatever_its_identifiers_or_dates(engine: Engine) -> None:
    p = f.patient("series-1", birth_date="1994-01-01")
    a = run_one(engine, p, f.iim_condition(p, onset="2024-03-01"), now=date(2024, 4, 15))
    q = f.patient("series-1", birth_date="1994-01-01", identifier="MRN-2")
    b = run_one(engine, q, f.iim_condition(q, onset="2023-11-01"), now=date(2024, 4, 15))
    other = f.patient("series-2", birth_date="1994-01-01", identifier="MRN-2")
    c = run_one(engine, other, f.iim_condition(other), now=date(2024, 4, 15))
    assert a.identity.series == b.identity.series != c.identity.series
    assert a.identity.series.startswith(a.identity.family_prefix)


def test_the_narrative_counts_orders_and_activities_apart_and_lists_the_evidence(
    engine: Engine,
) -> None:
    result = run_one(engine, *f.seed_case(), now=date(2015, 10, 25))
    assert result.care_plan is not None
    div = result.care_plan["text"]["div"]
    orders = len(result.service_requests)
    activities = len(result.plan.items) - orders
    assert (
        f"<p>Proposed: {orders} service requests and {activities} care-plan activities"
        f" ({len(result.plan.items)} items).</p>"
    ) in div
    why = div[div.index("<b>Why</b>") : div.index("<table>")]
    assert "rule " not in why and "[BMJ]" not in why
    assert "<b>Evidence (rule; level; sources)</b>" in div
    assert "anti-TIF1-gamma positive: rule ab-tif1g" in div
