"""RiskAssessment: the tier, its reasons and the resources it rests on."""

from __future__ import annotations

from fhir_dm.core.build.common import (
    BuildContext,
    Json,
    instant,
    period,
    references,
    system_coding,
)
from fhir_dm.core.build.narrative import render_risk_narrative
from fhir_dm.core.explain import Explanation

OUTCOME_TEXT = "IIM-associated cancer"


def build_risk_assessment(ctx: BuildContext, explanation: Explanation) -> Json:
    """One RiskAssessment; without a tier when out of scope, with the scope reason whenever
    there is one."""
    a = ctx.plan.assessment
    rs = ctx.knowledge.ruleset
    iim = a.facts.iim
    prediction: Json = {"outcome": {"text": OUTCOME_TEXT}}
    if a.tier is not None:
        level = rs.tiers.level(a.tier)
        prediction["qualitativeRisk"] = {
            "coding": [
                system_coding(ctx.knowledge, "dm-risk-tier", level.id, level.label),
                system_coding(
                    ctx.knowledge,
                    "risk-probability",
                    level.risk_probability,
                    f"{level.risk_probability.capitalize()} likelihood",
                ),
            ],
            "text": level.label + (" (preliminary)" if a.preliminary else ""),
        }
    if a.window is not None:
        prediction["whenPeriod"] = period(*a.window)
    if a.scope_reason:
        # Outside the guideline's schedule (juvenile, IBM, late diagnosis, window closed...):
        # said whether or not the patient has a window (a lung programme, a safety net).
        prediction["rationale"] = a.scope_reason
    notes = [explanation.headline, *explanation.reasons, *explanation.notices]
    if explanation.unknown_facts:
        notes.append(
            "Not recorded (unknown, not negative): " + ", ".join(explanation.unknown_facts) + "."
        )
    notes.extend(f"Input not used: {f}" for f in explanation.findings)
    notes.append(f"Rule set {rs.label}; {explanation.guideline}. A proposal for a clinician.")
    data: Json = {
        "resourceType": "RiskAssessment",
        "meta": ctx.meta("RiskAssessment"),
        "identifier": ctx.identifier(ctx.identity.digest_value("risk")),
        "status": "preliminary" if a.preliminary else "final",
        "subject": ctx.subject,
        "occurrenceDateTime": instant(ctx.now),
        "method": {
            "coding": [
                {
                    **system_coding(ctx.knowledge, "dm-ruleset", rs.name, rs.title),
                    "version": rs.version,
                }
            ],
            "text": f"{rs.title}, rule set {rs.label}",
        },
        "basis": references(a.facts.all_sources),
        "prediction": [prediction],
        "note": [{"text": n} for n in notes],
        "text": {"status": "generated", "div": render_risk_narrative(explanation)},
    }
    if iim is not None:
        data["condition"] = {"reference": iim.reference}
    return ctx.finish(data)
