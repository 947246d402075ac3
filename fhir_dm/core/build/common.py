"""Pieces every builder shares: validation through R4B models, codings, references, profiles."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from fhir_dm.core.identifiers import Identity
from fhir_dm.core.plan import Plan
from fhir_dm.knowledge.models import CodeRef, Knowledge

Json = dict[str, Any]

PROFILE_NAMES = {
    "RiskAssessment": "dm-cancer-risk-assessment",
    "CarePlan": "dm-cancer-screening-careplan",
    "ServiceRequest": "dm-cancer-screening-request",
}


def as_fhir(data: Json) -> Json:
    """Validate a resource through its R4B model and return it (raises on any invalid field)."""
    get_fhir_model_class(data["resourceType"]).model_validate(data)
    return data


def profile_url(knowledge: Knowledge, resource_type: str) -> str:
    return f"{knowledge.ruleset.canonical_base}/StructureDefinition/{PROFILE_NAMES[resource_type]}"


def plan_definition_url(knowledge: Knowledge) -> str:
    rs = knowledge.ruleset
    return f"{rs.canonical_base}/PlanDefinition/{rs.name}|{rs.version}"


def coding(knowledge: Knowledge, ref: CodeRef) -> Json:
    return {
        "system": knowledge.terminology.system_url(ref.system),
        "code": ref.code,
        "display": ref.display,
    }


def system_coding(knowledge: Knowledge, alias: str, code: str, display: str) -> Json:
    return {"system": knowledge.terminology.system_url(alias), "code": code, "display": display}


def reference(ref: str) -> Json:
    """A Reference to an input resource; positional pseudo-references become display-only."""
    if "#entry" in ref:
        return {"display": f"{ref.split('/')[0]} (input entry {ref.rsplit('#entry', 1)[1]})"}
    return {"reference": ref}


def references(refs: Iterable[str]) -> list[Json]:
    return [reference(r) for r in dict.fromkeys(r.split("#component")[0] for r in refs)]


def instant(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def period(start: date, end: date) -> Json:
    return {"start": start.isoformat(), "end": end.isoformat()}


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What every builder needs for one patient."""

    knowledge: Knowledge
    plan: Plan
    identity: Identity
    now: datetime
    validate: bool = True

    def finish(self, data: Json) -> Json:
        """Validate through the R4B model (unless the engine was built without) and return."""
        return as_fhir(data) if self.validate else data

    @property
    def subject(self) -> Json:
        return {"reference": self.plan.assessment.facts.patient_reference}

    def identifier(self, value: str) -> list[Json]:
        """The business identifier (an `Identity` value) in the project's item system."""
        return [{"system": self.identity.item_system, "value": value}]

    def meta(self, resource_type: str) -> Json:
        return {"profile": [profile_url(self.knowledge, resource_type)]}
