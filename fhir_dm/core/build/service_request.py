"""ServiceRequest: one per test per round, a proposal unless the site says otherwise."""

from __future__ import annotations

from fhir_dm.core.build.common import (
    BuildContext,
    Json,
    coding,
    period,
    reference,
    references,
)
from fhir_dm.core.build.narrative import render_request_narrative
from fhir_dm.core.plan import PlanItem

# The project's code for a conditional ("consider") item: carried by its CarePlan activity,
# never by an order (a "consider" item is never a ServiceRequest, clinical-logic §13).
CONSIDER_CODE = "consider"


def item_note(item: PlanItem) -> list[Json]:
    notes = []
    for rule in item.rules:
        facts = "; ".join(rule.facts)
        notes.append(
            {
                "text": f"Rule {rule.id}: {rule.label}"
                + (f" [{facts}]" if facts else "")
                + f" (evidence {rule.evidence}: {rule.source})"
            }
        )
    if item.conditional:
        notes.append({"text": f"Consider: {item.condition_text}"})
    if item.note:
        notes.append({"text": f"Note: {item.note}"})
    if item.labelled_not_imacs:
        notes.append({"text": "Not part of the IMACS 2023 cancer-screening guideline."})
    return notes


def build_service_request(
    ctx: BuildContext, item: PlanItem, care_plan_url: str, risk_url: str
) -> Json:
    """One ServiceRequest for an orderable plan item."""
    k = ctx.knowledge
    test = k.ruleset.tests[item.test_id]
    orders = k.site.orders
    iim = ctx.plan.assessment.facts.iim
    assert iim is not None, "requests are only planned for an IIM diagnosis"
    data: Json = {
        "resourceType": "ServiceRequest",
        "meta": ctx.meta("ServiceRequest"),
        "identifier": ctx.identifier(
            ctx.identity.item_value(item.round_id, item.test_id, item.due_start)
        ),
        "basedOn": [{"reference": care_plan_url}],
        "requisition": {
            "system": ctx.identity.requisition_system,
            "value": ctx.identity.value(item.round_id, item.due_start.strftime("%Y%m%d")),
        },
        "status": orders.service_request_status,
        "intent": orders.service_request_intent,
        "priority": orders.priority,
        "code": {"coding": [coding(k, test.code)], "text": test.display},
        "subject": ctx.subject,
        "occurrencePeriod": period(item.due_start, item.due_end),
        "authoredOn": ctx.now.date().isoformat(),
        # R4 allows only Condition/Observation/DiagnosticReport/DocumentReference as the
        # reason, so the reason is the IIM diagnosis and the RiskAssessment is supporting info.
        "reasonReference": [reference(iim.reference)],
        "supportingInfo": [
            {"reference": risk_url},
            *references(s for r in item.rules for s in r.sources if s != iim.reference),
        ],
        "note": item_note(item),
    }
    data["text"] = {
        "status": "generated",
        "div": render_request_narrative(
            test.display,
            item.round_label,
            f"{item.due_start.isoformat()} to {item.due_end.isoformat()}",
            [n["text"] for n in data["note"]],
        ),
    }
    return ctx.finish(data)
