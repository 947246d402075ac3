"""Deterministic business identifiers, so the same assessment always maps to the same resources.

An assessment is identified by its *series* (patient, rule set, window start: stable while the
plan is revised) and its *digest* (a hash of everything the plan says). Re-running unchanged
input reproduces every identifier; a changed plan gets a new digest in the same series, which
is how write-back finds the old plan to revoke.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass

from fhir_dm.core.plan import Plan
from fhir_dm.knowledge.models import RuleSet

DIGEST_LENGTH = 12


@dataclass(frozen=True, slots=True)
class Identity:
    """Identifier systems and values for one patient's generated resources."""

    base: str
    series: str
    digest: str

    @property
    def series_system(self) -> str:
        return f"{self.base}/sid/plan-series"

    @property
    def item_system(self) -> str:
        return f"{self.base}/sid/plan-item"

    @property
    def requisition_system(self) -> str:
        return f"{self.base}/sid/requisition"

    def value(self, *parts: str) -> str:
        return ".".join((self.series, self.digest, *parts))

    def full_url(self, *parts: str) -> str:
        """A stable urn:uuid for a generated resource inside the transaction."""
        name = f"{self.item_system}|{self.value(*parts)}"
        return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"

    def provenance_id(self) -> str:
        """A client-assigned id (Provenance has no identifier search parameter in R4)."""
        return "fhir-dm-" + hashlib.sha256(self.value("provenance").encode()).hexdigest()[:32]


def plan_digest(plan: Plan) -> str:
    """Hash of everything the plan says (not of when it was computed)."""
    a = plan.assessment
    content = {
        "ruleset": a.ruleset,
        "scope": a.scope,
        "tier": a.tier,
        "preliminary": a.preliminary,
        "factors": sorted(f.id for f in a.factors),
        "notices": sorted(n.id for n in a.notices),
        "items": [
            [i.round_id, i.test_id, i.due_start.isoformat(), i.due_end.isoformat(), i.conditional]
            for i in plan.items
        ],
    }
    raw = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:DIGEST_LENGTH]


def identity_for(plan: Plan, ruleset: RuleSet) -> Identity:
    """The identity of one patient's assessment under one rule set."""
    a = plan.assessment
    iim = a.facts.iim
    # The series must not depend on the day it is computed: with an unknown onset the window
    # starts at the evaluation date, so the series says "onset unknown" instead of that date.
    if a.window is None:
        window = "nowindow"
    elif iim is None or iim.onset is None:
        window = "onsetunknown"
    else:
        window = a.window[0].strftime("%Y%m%d")
    series = f"{ruleset.name}.{a.facts.patient_key}.{window}"
    return Identity(ruleset.canonical_base, series, plan_digest(plan))
