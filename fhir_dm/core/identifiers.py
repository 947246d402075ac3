"""Deterministic business identifiers, so the same assessment always maps to the same resources.

An assessment is identified by its *series* (rule-set family + the patient it is written for:
stable while the plan is revised) and its *digest* (a hash of everything the plan says).
Re-running unchanged input reproduces every identifier. The CarePlan is one per series, revised
in place (clinical-logic §13): its identifier is the series'; each order is one test of one
round with its due start (`series.round.test.YYYYMMDD`), so an order still proposed keeps its
identifier whatever else changes. Only the RiskAssessment (an assessment is an event) and the
plan's version marker carry the digest. Nothing the assessment computes (window, onset,
diagnosis date) and nothing the Patient may change (its identifiers) is part of the series, so
a corrected date or a new MRN revises the plan instead of starting a second one.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import date

from fhir_dm.core.ids import FHIR_ID_PATTERN
from fhir_dm.core.plan import Plan
from fhir_dm.knowledge.models import RuleSet

DIGEST_LENGTH = 12
PATIENT_KEY_LENGTH = 16
# A patient known by its logical id (on the server it is written to): `Patient/<id>`.
_PATIENT_ID_REFERENCE = re.compile(r"Patient/" + FHIR_ID_PATTERN)


@dataclass(frozen=True, slots=True)
class Identity:
    """Identifier systems and values for one patient's generated resources."""

    base: str
    series: str
    digest: str
    family: str = ""

    @property
    def family_prefix(self) -> str:
        """Every series of this rule-set family starts so (also those of older releases)."""
        return f"{self.family}."

    @property
    def series_system(self) -> str:
        return f"{self.base}/sid/plan-series"

    @property
    def item_system(self) -> str:
        return f"{self.base}/sid/plan-item"

    @property
    def requisition_system(self) -> str:
        return f"{self.base}/sid/requisition"

    @property
    def digest_system(self) -> str:
        """The plan's version marker: which assessment its content came from."""
        return f"{self.base}/sid/plan-digest"

    def value(self, *parts: str) -> str:
        """A series-scoped value, stable across revisions (the plan, its orders)."""
        return ".".join((self.series, *parts))

    def digest_value(self, *parts: str) -> str:
        """A value that changes whenever the plan says something else (the RiskAssessment)."""
        return ".".join((self.series, self.digest, *parts))

    def item_value(self, round_id: str, test_id: str, due_start: date) -> str:
        """One test of one round: `series.round.test.YYYYMMDD` (round and test hold no dot)."""
        return self.value(round_id, test_id, due_start.strftime("%Y%m%d"))

    def full_url(self, value: str) -> str:
        """A stable urn:uuid for a generated resource inside the transaction."""
        name = f"{self.item_system}|{value}"
        return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"

    def provenance_id(self) -> str:
        """A client-assigned id (Provenance has no identifier search parameter in R4)."""
        raw = self.digest_value("provenance").encode()
        return "fhir-dm-" + hashlib.sha256(raw).hexdigest()[:32]


def parse_item_value(value: str) -> tuple[str, str, str] | None:
    """(round, test, YYYYMMDD) of an order's identifier value, or None (another format)."""
    parts = value.rsplit(".", 3)
    if len(parts) != 4 or not (len(parts[3]) == 8 and parts[3].isdigit()):
        return None
    return parts[1], parts[2], parts[3]


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


def series_key(patient_reference: str, fallback_key: str) -> str:
    """The patient part of the series: a hash of `Patient/<id>`, else the facts' stable key.

    Written plans always name a server Patient by id, so the series is that Patient's, whatever
    its identifiers say. Input without a Patient id (CLI files, previews of urn:uuid bundles)
    keeps the facts' key (first identifier, else the fullUrl), which is stable for one file.
    """
    if _PATIENT_ID_REFERENCE.fullmatch(patient_reference):
        return hashlib.sha256(patient_reference.encode()).hexdigest()[:PATIENT_KEY_LENGTH]
    return fallback_key


def identity_for(plan: Plan, ruleset: RuleSet) -> Identity:
    """The identity of one patient's assessment under one rule set."""
    facts = plan.assessment.facts
    series = f"{ruleset.name}.{series_key(facts.patient_reference, facts.patient_key)}"
    return Identity(ruleset.canonical_base, series, plan_digest(plan), ruleset.name)
