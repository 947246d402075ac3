"""The $dm-cancer-screening operations: on a posted Bundle, and on a Patient of the FHIR server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from flask import Blueprint, Response, request

from fhir_dm.common.errors import InputError, NotFhirError
from fhir_dm.core.assess import AssessmentRun
from fhir_dm.web import limits
from fhir_dm.web.authorize import require_patient, require_population
from fhir_dm.web.outcomes import fhir_json, fhir_response, issue, outcome_of, read_json_body
from fhir_dm.web.params import check_fhir_id, parse_date
from fhir_dm.web.settings import Service, current_service
from fhir_dm.web.trust import Principal
from fhir_dm.writeback.writer import PatientWrite

bp = Blueprint("operations", __name__)

OPERATION = "$dm-cancer-screening"
QUERY_PARAMETERS = frozenset({"preview", "now"})
PARAMETER_VALUES = {"bundle": "resource", "preview": "valueBoolean", "now": "valueDate"}
_BOOLEANS = {"true": True, "false": False}

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class OperationCall:
    """The operation's inputs, from the body (Parameters or a bare Bundle) and the query."""

    bundle: Json | None = None
    bundle_path: str = "Bundle"
    preview: bool | None = None
    now: date | None = None


def authenticate(service: Service) -> Principal:
    """Every operation authenticates; the audience is the URL the caller used."""
    audience = service.settings.public_base_url + request.path
    return service.auth.authenticate(request.headers.get("Authorization"), audience=audience)


def _query_call() -> OperationCall:
    """`preview` and `now` from the query; anything else is refused, so typos cannot write."""
    unknown = sorted(set(request.args) - QUERY_PARAMETERS)
    if unknown:
        raise InputError(f"unknown query parameter(s): {', '.join(unknown)}")
    for name in QUERY_PARAMETERS:
        if len(request.args.getlist(name)) > 1:
            raise InputError(f"query parameter {name} given more than once")
    preview: bool | None = None
    raw_preview = request.args.get("preview")
    if raw_preview is not None:
        if raw_preview not in _BOOLEANS:
            raise InputError("query parameter preview must be true or false")
        preview = _BOOLEANS[raw_preview]
    raw_now = request.args.get("now")
    now = parse_date(raw_now, "now") if raw_now is not None else None
    return OperationCall(preview=preview, now=now)


def parse_parameters(body: Mapping[str, Any]) -> OperationCall:
    """Read a Parameters resource: `bundle` (resource), `preview` (boolean), `now` (date)."""
    parameters = body.get("parameter") or []
    if not isinstance(parameters, list):
        where = "Parameters.parameter"
        raise NotFhirError(f"{where} is not a list", expression=[where])
    values: dict[str, Any] = {}
    paths: dict[str, str] = {}
    for n, parameter in enumerate(parameters):
        path = f"Parameters.parameter[{n}]"
        if not isinstance(parameter, Mapping) or not isinstance(parameter.get("name"), str):
            raise NotFhirError(f"{path} has no name", expression=[path])
        name = parameter["name"]
        if name not in PARAMETER_VALUES:
            raise InputError(f"{path}: unknown parameter '{name}'", expression=[f"{path}.name"])
        if name in values:
            raise InputError(f"{path}: parameter '{name}' given more than once", expression=[path])
        field = PARAMETER_VALUES[name]
        if field not in parameter:
            raise InputError(f"{path}: '{name}' needs {field}", expression=[path])
        values[name] = parameter[field]
        paths[name] = f"{path}.{field}"
    bundle = values.get("bundle")
    is_bundle = isinstance(bundle, dict) and bundle.get("resourceType") == "Bundle"
    if "bundle" in values and not is_bundle:
        raise InputError(f"{paths['bundle']} must be a Bundle", expression=[paths["bundle"]])
    preview = values.get("preview")
    if "preview" in values and not isinstance(preview, bool):
        raise InputError(f"{paths['preview']} must be true or false", expression=[paths["preview"]])
    now = parse_date(values["now"], paths["now"]) if "now" in values else None
    return OperationCall(
        bundle=bundle, bundle_path=paths.get("bundle", "Bundle"), preview=preview, now=now
    )


def _merge(body: OperationCall, query: OperationCall) -> OperationCall:
    """Body and query may both be used, but must not disagree."""
    for name in ("preview", "now"):
        in_body, in_query = getattr(body, name), getattr(query, name)
        if in_body is not None and in_query is not None and in_body != in_query:
            raise InputError(f"{name} is given in the query and in the body with different values")
    return OperationCall(
        bundle=body.bundle,
        bundle_path=body.bundle_path,
        preview=body.preview if body.preview is not None else query.preview,
        now=body.now if body.now is not None else query.now,
    )


def _body_call(body: Any, *, bundle_allowed: bool) -> OperationCall:
    if not isinstance(body, Mapping) or not isinstance(body.get("resourceType"), str):
        raise NotFhirError("the request body is not a FHIR resource (no resourceType)")
    kind = body["resourceType"]
    if kind == "Parameters":
        call = parse_parameters(body)
        if call.bundle is not None and not bundle_allowed:
            raise InputError(
                "this operation reads the patient from the FHIR server; do not post a bundle",
                expression=[call.bundle_path],
            )
        return call
    if kind == "Bundle" and bundle_allowed:
        return OperationCall(bundle=dict(body))
    expected = "a Bundle or a Parameters" if bundle_allowed else "a Parameters"
    raise InputError(f"the request body must be {expected} resource", expression=[kind])


def _today() -> date:
    return datetime.now(UTC).date()


def result_bundle(writes: Sequence[PatientWrite]) -> Json:
    """The operations' answer: an OperationOutcome (one issue per patient), then the resources."""
    outcome = outcome_of([issue("information", "informational", w.summary()) for w in writes])
    entries: list[Json] = [{"resource": outcome}]
    for write in writes:
        entries.extend(write.entries)
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _respond(service: Service, writes: Sequence[PatientWrite]) -> Response:
    """The result Bundle, refused (413) when over max_response_bytes and nothing was written.

    A written result is always returned: refusing it would hide what was written. Bundle
    writes are checked before writing instead (`_check_run_size`).
    """
    body = fhir_json(result_bundle(writes))
    if all(w.status != "written" for w in writes):
        limits.check_response_size(len(body), service.settings.max_response_bytes)
    return fhir_response(body)


def _check_run_size(service: Service, run: AssessmentRun) -> None:
    """Before a Bundle write: refuse (413) a result that would answer over max_response_bytes."""
    size = sum(len(fhir_json(entry)) for result in run.results for entry in result.entries)
    limits.check_response_size(size, service.settings.max_response_bytes)


@bp.post(f"/{OPERATION}")
def screen_bundle() -> Response:
    """Assess every patient of a posted Bundle; preview (default) or write to the FHIR server."""
    service = current_service()
    principal = authenticate(service)
    body = read_json_body(service.settings.max_request_bytes, required=True)
    call = _merge(_body_call(body, bundle_allowed=True), _query_call())
    if call.bundle is None:
        raise InputError("Parameters must hold a 'bundle'", expression=["Parameters.parameter"])
    limits.check_patient_count(call.bundle, service.settings.max_patients_per_request)
    try:
        run = service.engine.assess(call.bundle, now=call.now or _today())
    except NotFhirError as exc:
        if call.bundle_path == "Bundle":
            raise
        # Report paths inside the Parameters the caller posted, not inside the bare Bundle.
        paths = [call.bundle_path + e.removeprefix("Bundle") for e in exc.expression]
        raise NotFhirError(exc.message, expression=paths) from None
    preview = True if call.preview is None else call.preview
    # A Bundle names any patients: a token needs user- or system-level scopes.
    require_population(principal, write=not preview)
    if not preview:
        _check_run_size(service, run)
    if preview:
        writes = service.writeback.preview_run(run)
    else:
        # A write binds each posted Patient to the server Patient of that id and assesses the
        # server's record together with the posted resources (WriteBack.write_bundle).
        writes = service.writeback.write_bundle(call.bundle, now=call.now or _today())
    return _respond(service, writes)


@bp.post(f"/Patient/<id>/{OPERATION}")
def screen_patient(id: str) -> Response:
    """Read one patient from the FHIR server, assess, and write back (default) or preview."""
    service = current_service()
    principal = authenticate(service)
    check_fhir_id(id, "Patient id")
    body = read_json_body(service.settings.max_request_bytes, required=False)
    from_body = OperationCall() if body is None else _body_call(body, bundle_allowed=False)
    call = _merge(from_body, _query_call())
    preview = False if call.preview is None else call.preview
    require_patient(principal, id, write=not preview)
    write = service.writeback.assess_patient(id, now=call.now or _today(), preview=preview)
    return _respond(service, [write])
