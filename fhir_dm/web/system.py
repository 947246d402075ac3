"""Unauthenticated endpoints: liveness, readiness (FHIR server reachable), CapabilityStatement."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from flask import Blueprint, Response, jsonify

from fhir_dm import __version__
from fhir_dm.common.errors import FhirDmError
from fhir_dm.core.assess import SOFTWARE_NAME
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.web.outcomes import fhir_response, outcome_response
from fhir_dm.web.settings import Settings, current_service

bp = Blueprint("system", __name__)

FHIR_VERSION = "4.0.1"
SYSTEM_OPERATION_ID = "dm-cancer-screening"
PATIENT_OPERATION_ID = "Patient-dm-cancer-screening"
OPERATION_NAME = "dm-cancer-screening"
TRUST_DESCRIPTIONS = {
    "jwt": "Operations require a bearer JWT signed by a trusted issuer (CDS Hooks 2.0 client"
    " trust); aud is the URL called.",
    "static": "Operations require a bearer token issued by the service operator.",
    "off": "Authentication is off (development only): every caller is anonymous.",
}

Json = dict[str, Any]


def build_capability_statement(
    settings: Settings, knowledge: Knowledge, *, started: datetime
) -> Json:
    """The service's own CapabilityStatement: the two operations and how to authenticate."""
    base = knowledge.ruleset.canonical_base
    statement: Json = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": started.isoformat(timespec="seconds"),
        "publisher": "fhir-dm project",
        "kind": "instance",
        "software": {"name": SOFTWARE_NAME, "version": __version__},
        "implementation": {
            "description": "IIM occult-cancer risk and screening plans (IMACS 2023), rule set "
            + knowledge.ruleset.label,
            "url": settings.public_base_url,
        },
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Operations return a collection Bundle: an OperationOutcome with"
                " one issue per patient, then the generated resources.",
                "security": {"description": TRUST_DESCRIPTIONS[settings.trust.mode]},
                "resource": [
                    {
                        "type": "Patient",
                        "operation": [
                            {
                                "name": OPERATION_NAME,
                                "definition": f"{base}/OperationDefinition/{PATIENT_OPERATION_ID}",
                            }
                        ],
                    }
                ],
                "operation": [
                    {
                        "name": OPERATION_NAME,
                        "definition": f"{base}/OperationDefinition/{SYSTEM_OPERATION_ID}",
                    }
                ],
            }
        ],
    }
    CapabilityStatement.model_validate(statement)
    return statement


@bp.get("/healthz")
def healthz() -> Response:
    """Alive: the process answers. Says nothing about the FHIR server (see /readyz)."""
    return jsonify(status="ok", version=__version__)


@bp.get("/readyz")
def readyz() -> Response:
    """Ready: the FHIR server answers its metadata call (once, no retries: the probe repeats)."""
    service = current_service()
    try:
        service.fhir.capabilities(retry=False)
    except FhirDmError as exc:
        return outcome_response(503, exc.issue_code, f"FHIR server not ready: {exc.message}")
    return jsonify(status="ready")


@bp.get("/metadata")
def metadata() -> Response:
    """The CapabilityStatement, built once at start-up."""
    return fhir_response(current_service().capability_statement)
