"""Provenance: what was generated, from which inputs, by which software and rule set."""

from __future__ import annotations

from collections.abc import Sequence

from fhir_dm.core.build.common import BuildContext, Json, instant, plan_definition_url, references


def build_provenance(ctx: BuildContext, targets: Sequence[str], software: str) -> Json:
    """One Provenance for everything generated for a patient."""
    rs = ctx.knowledge.ruleset
    entities = references(ctx.plan.assessment.facts.all_sources)
    data: Json = {
        "resourceType": "Provenance",
        "id": ctx.identity.provenance_id(),
        "target": [{"reference": t} for t in targets],
        "recorded": instant(ctx.now),
        "policy": [rs.guideline.url, plan_definition_url(ctx.knowledge)],
        "agent": [{"who": {"display": f"{software} (rule set {rs.label})"}}],
        "entity": [{"role": "source", "what": e} for e in entities],
    }
    return ctx.finish(data)
