"""Rest-hook notifications from the FHIR server: authenticate, find the patient, enqueue, answer.

Routes (key: a watched resource type in lower case, see `fhir_dm.events.subscriptions`):

- `POST /notifications/{key}`: the changed resource (or a Bundle of them) as body; an empty
  body (an id-only / heartbeat notification) names no patient and is acknowledged.
- `PUT|POST /notifications/{key}/{type}/{id}`: how HAPI delivers a payload (an update of the
  resource at the endpoint's base).
- `DELETE /notifications/{key}/{type}/{id}`: a deletion names no patient; acknowledged, left
  to the daily sweep.

Each request carries the subscription's secret header, compared in constant time; the answer
(202) comes as soon as the work is enqueued. A resource fhir-dm generated itself (its plan's
ServiceRequests, see `fhir_dm.events.subscriptions.is_own_write`) is acknowledged and ignored: the
write-back that stored it needs no second run. Logs name the key and counts, never a patient.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from fhir_dm.common.errors import (
    AuthError,
    InputError,
    NotFhirError,
    PatientNotFoundError,
    TooCostlyError,
)
from fhir_dm.core.ids import NOT_A_SAFE_ID, check_fhir_id, is_fhir_id
from fhir_dm.events.queue import Jobs, patient_id_of
from fhir_dm.events.subscriptions import (
    KEY_TYPES,
    NOTIFICATION_PATH,
    SECRET_HEADER,
    is_own_write,
    secret_matches,
)
from fhir_dm.web.outcomes import fhir_response, operation_outcome, read_json_body
from fhir_dm.web.settings import current_service

bp = Blueprint("notifications", __name__)

JOBS_KEY = "fhir_dm_jobs"
# References through which each watched resource names its patient.
PATIENT_FIELDS = ("subject", "patient")
_PATIENT_SEGMENT = re.compile(r"(?:^|/)Patient/([^/]*)(?:/_history/[^/]*)?/?$")

_log = logging.getLogger(__name__)

Json = dict[str, Any]


def init_app(app: Flask, jobs: Jobs) -> None:
    """Serve the notification endpoint, enqueueing into `jobs`."""
    if jobs.settings.notification_secret is None:
        raise ValueError("the notification endpoint needs jobs.notification_secret")
    app.extensions[JOBS_KEY] = jobs
    app.register_blueprint(bp)


def _jobs() -> Jobs:
    jobs = current_app.extensions[JOBS_KEY]
    if not isinstance(jobs, Jobs):
        raise TypeError("app.extensions['fhir_dm_jobs'] is not Jobs")
    return jobs


def _authenticate(jobs: Jobs, key: str) -> str:
    """The watched resource type of `key`; 404 for an unknown key, 401 for a wrong secret."""
    resource_type = KEY_TYPES.get(key)
    if resource_type is None:
        raise PatientNotFoundError("no such notification channel")
    secret = jobs.settings.notification_secret
    assert secret is not None  # checked by init_app
    if not secret_matches(secret.get_secret_value(), key, request.headers.get(SECRET_HEADER)):
        raise AuthError("missing or wrong notification secret")
    return resource_type


def _resources(body: Any) -> list[Mapping[str, Any]]:
    """The notified resources: the body itself, or the resources of a Bundle body."""
    if not isinstance(body, Mapping) or not isinstance(body.get("resourceType"), str):
        raise NotFhirError("the notification body is not a FHIR resource (no resourceType)")
    if body["resourceType"] != "Bundle":
        return [body]
    entries = body.get("entry") or []
    if not isinstance(entries, list):
        raise NotFhirError("Bundle.entry is not a list", expression=["Bundle.entry"])
    return [
        e["resource"]
        for e in entries
        if isinstance(e, Mapping) and isinstance(e.get("resource"), Mapping)
    ]


def patients_named(resources: Iterable[Mapping[str, Any]], base_url: str) -> set[str]:
    """The server Patient ids the resources are about (a Patient: itself).

    A Patient id outside the FHIR id grammar (`Patient/..` included) refuses the notification
    (400): it names no patient this service could read, so it is never queued.
    """
    found: set[str] = set()
    for resource in resources:
        if resource.get("resourceType") == "Patient":
            rid = resource.get("id")
            if rid is not None:
                found.add(check_fhir_id(rid, "Patient.id"))
            continue
        for name in PATIENT_FIELDS:
            reference = resource.get(name)
            pid = patient_id_of(reference, base_url)
            if pid:
                found.add(pid)
            elif _names_a_bad_patient_id(reference):
                raise InputError(f"{name}: the Patient id {NOT_A_SAFE_ID}", expression=[name])
    return found


def _names_a_bad_patient_id(reference: object) -> bool:
    """Whether a Reference has the shape `[...]Patient/<id>` with an id that is not a FHIR id."""
    text = reference.get("reference") if isinstance(reference, Mapping) else None
    if not isinstance(text, str):
        return False
    match = _PATIENT_SEGMENT.search(text)
    return match is not None and not is_fhir_id(match.group(1))


def _accepted(key: str, enqueued: int, patients: int, own: int = 0) -> Response:
    # Counts and the channel only (the formatter drops unknown extras; ids never go in).
    _log.info(
        "notification on %s: %d patient(s), %d enqueued, %d own write(s) ignored",
        key,
        patients,
        enqueued,
        own,
    )
    text = f"accepted: {patients} patient(s), {enqueued} re-assessment(s) enqueued"
    if own:
        text += f", {own} resource(s) written by fhir-dm itself ignored"
    return fhir_response(operation_outcome("information", "informational", text), 202)


def _enqueue(jobs: Jobs, key: str, resources: list[Mapping[str, Any]]) -> Response:
    service = current_service()
    resource_type = KEY_TYPES[key]
    for resource in resources:
        kind = resource.get("resourceType")
        if kind not in (resource_type, "Patient", "SubscriptionStatus", "Parameters"):
            raise InputError(
                f"this channel notifies {resource_type}, not {kind}", expression=[str(kind)]
            )
    canonical_base = service.knowledge.ruleset.canonical_base
    theirs = [r for r in resources if not is_own_write(r, canonical_base)]
    patients = patients_named(theirs, service.fhir.base_url)
    limit = jobs.settings.max_patients_per_notification
    if len(patients) > limit:
        # Refused whole rather than cut: nothing is half-done, and the server's delivery
        # error shows the operator what happened (a real change names one patient).
        _log.warning("notification on %s refused: %d patients over the limit", key, len(patients))
        raise TooCostlyError(
            f"the notification names {len(patients)} patients;"
            f" max_patients_per_notification is {limit}"
        )
    enqueued = sum(1 for pid in sorted(patients) if jobs.request(pid))
    return _accepted(key, enqueued, len(patients), len(resources) - len(theirs))


@bp.post(f"{NOTIFICATION_PATH}/<key>")
def notify(key: str) -> Response:
    """A notification with the changed resource (or none) in the body."""
    jobs = _jobs()
    _authenticate(jobs, key)
    body = read_json_body(current_service().settings.max_request_bytes, required=False)
    if body is None:
        return _accepted(key, 0, 0)
    return _enqueue(jobs, key, _resources(body))


@bp.route(f"{NOTIFICATION_PATH}/<key>/<resource_type>/<rid>", methods=["PUT", "POST", "DELETE"])
def notify_resource(key: str, resource_type: str, rid: str) -> Response:
    """HAPI's delivery of a payload: an update (or delete) of the resource at our endpoint."""
    jobs = _jobs()
    _authenticate(jobs, key)
    if request.method == "DELETE":
        return _accepted(key, 0, 0)
    body = read_json_body(current_service().settings.max_request_bytes, required=True)
    resources = _resources(body)
    if any(r.get("resourceType") != resource_type for r in resources):
        raise InputError("the body's resourceType does not match the URL")
    return _enqueue(jobs, key, resources)
