"""Unauthenticated endpoints: liveness, readiness (FHIR server reachable), CapabilityStatement."""

from __future__ import annotations

from contextlib import suppress
from datetime import datetime
from typing import Any

import redis
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from flask import Blueprint, Response, jsonify

from fhir_dm import __version__
from fhir_dm.common.errors import FhirDmError
from fhir_dm.core.assess import SOFTWARE_NAME
from fhir_dm.events.queue import Jobs, Runtime, open_huey_checked
from fhir_dm.events.settings import JobsSettings
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.web.outcomes import fhir_response, issue, outcome_of
from fhir_dm.web.settings import Settings, current_service

bp = Blueprint("system", __name__)

FHIR_VERSION = "4.0.1"
REDIS_PROBE_SECONDS = 2.0
SYSTEM_OPERATION_ID = "dm-cancer-screening"
PATIENT_OPERATION_ID = "Patient-dm-cancer-screening"
OPERATION_NAME = "dm-cancer-screening"
TRUST_DESCRIPTIONS = {
    "smart": "Operations and the app require a SMART access token of the FHIR server's"
    " authorization server (its .well-known/smart-configuration); scopes and the patient"
    " context are enforced.",
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
    """Ready: every configured backend answers, each asked once (no retries: the probe repeats).

    The FHIR server (its metadata call) always; the job queue's storage (Redis, or the SQLite
    file) when `jobs` is configured; CDS Hooks' shared state when it is on Redis. A 503 names
    every backend that is not ready.
    """
    service = current_service()
    problems: list[tuple[str, str]] = []
    try:
        service.fhir.capabilities(retry=False)
    except FhirDmError as exc:
        problems.append((exc.issue_code, f"FHIR server not ready: {exc.message}"))
    if service.settings.jobs is not None:
        try:
            _ping_queue(service.settings.jobs)
        except FhirDmError as exc:
            problems.append((exc.issue_code, f"job queue not ready: {exc.message}"))
    cds = service.settings.cds
    if cds is not None and cds.state.backend == "redis" and cds.state.redis_url is not None:
        try:
            _ping_redis(cds.state.redis_url.get_secret_value())
        except redis.exceptions.RedisError:
            problems.append(("transient", "CDS Hooks state (Redis) not ready: cannot reach it"))
    if problems:
        return fhir_response(
            outcome_of([issue("error", code, text) for code, text in problems]), 503
        )
    return jsonify(status="ready")


def _ping_queue(settings: JobsSettings) -> None:
    """Open the queue's storage and read one key; QueueUnavailableError when it is down."""
    jobs = Jobs(open_huey_checked(settings), settings, _no_runtime)
    try:
        jobs.ping()
    finally:
        with suppress(Exception):
            jobs.close()


def _ping_redis(url: str) -> None:
    """One PING with short timeouts; RedisError when Redis does not answer."""
    client = redis.Redis.from_url(
        url, socket_connect_timeout=REDIS_PROBE_SECONDS, socket_timeout=REDIS_PROBE_SECONDS
    )
    try:
        client.ping()
    finally:
        client.close()


def _no_runtime() -> Runtime:
    raise RuntimeError("the readiness probe runs no task")


@bp.get("/metadata")
def metadata() -> Response:
    """The CapabilityStatement, built once at start-up."""
    return fhir_response(current_service().capability_statement)
