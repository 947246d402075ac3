"""CarePlan: the screening plan, with its schedule as activities and a readable narrative."""

from __future__ import annotations

from collections.abc import Mapping

from fhir_dm.core.build.common import (
    BuildContext,
    Json,
    coding,
    instant,
    period,
    plan_definition_url,
    reference,
    system_coding,
)
from fhir_dm.core.build.narrative import render_narrative
from fhir_dm.core.build.service_request import CONSIDER_CODE, item_note
from fhir_dm.core.explain import Explanation
from fhir_dm.core.plan import PlanItem

US_CORE_ASSESS_PLAN = (
    "us-core-careplan-category",
    "assess-plan",
    "Assessment and Plan of Treatment",
)
DM_CATEGORY = ("dm-careplan-category", "dm-cancer-screening", "IIM cancer screening")


def _detail(ctx: BuildContext, item: PlanItem, status: str = "not-started") -> Json:
    k = ctx.knowledge
    test = k.ruleset.tests[item.test_id]
    detail: Json = {
        "code": {"coding": [coding(k, test.code)], "text": test.display},
        "status": status,
        "scheduledPeriod": period(item.due_start, item.due_end),
        "description": test.display + "".join(f" {n['text']}" for n in item_note(item)),
    }
    if item.conditional and status == "not-started":
        # A "consider" item is an activity, never an order (§13): marked so for any EHR.
        detail["statusReason"] = {
            "coding": [
                system_coding(
                    k, "dm-screening", CONSIDER_CODE, "Consider (conditional recommendation)"
                )
            ],
            "text": f"Consider: {item.condition_text}",
        }
    return {"detail": detail}


def done_activity(ctx: BuildContext, item: PlanItem) -> Json:
    """The activity of a done item: completed, with the record that shows it as outcome."""
    assert item.done is not None
    activity = _detail(ctx, item, "completed")
    activity["outcomeReference"] = [reference(item.done.reference)]
    late = ctx.plan.status(item) == "done-late"
    if late or item.done.note:
        said = ["done late" if late else "", item.done.note]
        activity["detail"]["statusReason"] = {"text": "; ".join(s for s in said if s)}
    return activity


def missed_activity(ctx: BuildContext, item: PlanItem) -> Json:
    """The activity of an item that lapsed undone: kept in the history, with why (§13)."""
    activity = _detail(ctx, item, "cancelled")
    activity["detail"]["statusReason"] = {"text": item.lapse_note}
    return activity


def build_care_plan(
    ctx: BuildContext,
    explanation: Explanation,
    risk_url: str,
    request_urls: Mapping[tuple[str, str], str],
) -> Json:
    """The CarePlan; items ordered now reference their ServiceRequest, others are details.

    A done item (clinical-logic §10) is a completed detail whose `outcomeReference` is the
    record that shows it done; a missed one is cancelled with the reason; later rounds and
    "consider" items are not-started details with their scheduled period (§13). The plan is
    completed once its window has closed and nothing in it is open.
    """
    k = ctx.knowledge
    plan = ctx.plan
    a = plan.assessment
    assert a.window is not None
    activities: list[Json] = []
    for item in plan.items:
        url = request_urls.get(item.key)
        if url is not None:
            activities.append({"reference": {"reference": url}})
            continue
        if item.done is not None:
            activities.append(done_activity(ctx, item))
        elif plan.status(item) == "missed":
            activities.append(missed_activity(ctx, item))
        else:
            activities.append(_detail(ctx, item))
    window = f"{a.window[0].isoformat()} to {a.window[1].isoformat()}"
    data: Json = {
        "resourceType": "CarePlan",
        "meta": ctx.meta("CarePlan"),
        "identifier": [
            *ctx.identifier(ctx.identity.value("plan")),
            {"system": ctx.identity.series_system, "value": ctx.identity.series},
            {"system": ctx.identity.digest_system, "value": ctx.identity.digest_value()},
        ],
        "instantiatesCanonical": [plan_definition_url(k)],
        "status": "active" if plan.open else "completed",
        "intent": k.site.orders.care_plan_intent,
        "category": [
            {"coding": [system_coding(k, *US_CORE_ASSESS_PLAN)]},
            {"coding": [system_coding(k, *DM_CATEGORY)]},
        ],
        "title": f"IIM cancer screening plan: {explanation.headline}",
        "description": (
            f"IMACS 2023 cancer screening for the {window} window; rule set {k.ruleset.label}."
        ),
        "subject": ctx.subject,
        "period": {"start": a.window[0].isoformat(), "end": a.window[1].isoformat()},
        "created": instant(ctx.now),
        "supportingInfo": [{"reference": risk_url}],
        "activity": activities,
        "text": {"status": "generated", "div": render_narrative(explanation, window)},
    }
    if a.facts.iim is not None:
        data["addresses"] = [{"reference": a.facts.iim.reference}]
    return ctx.finish(data)
