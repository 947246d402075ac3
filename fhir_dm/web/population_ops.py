"""The population operations: `$dm-population-run` and `Measure/{id}/$evaluate-measure`.

Both find the IIM patients of the service's FHIR server with the population finder (one
indexed Condition search). A run goes onto the job queue when `jobs.*` is configured (202 and
a status location; `fhir-dm worker` does the work); without a queue, or for a measure, the
patients are assessed within the request, so a population over `max_patients_per_request` is
refused (413) before any work starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request

from fhir_dm.common.errors import (
    DeadlineExceededError,
    FhirDmError,
    InputError,
    NotFhirError,
    TooCostlyError,
    UpstreamError,
    UpstreamTimeoutError,
)
from fhir_dm.population.config import PopulationConfig, load_population_config
from fhir_dm.population.finder import find_iim_patients, iim_search_tokens
from fhir_dm.population.measures import measure_report
from fhir_dm.population.rows import patient_row
from fhir_dm.population.run import RUN_ID, Done, Failure, RunResult, StateFile, new_run_id
from fhir_dm.web import limits
from fhir_dm.web.authorize import require_population
from fhir_dm.web.operations import OperationCall, authenticate, parse_parameters
from fhir_dm.web.outcomes import (
    fhir_json,
    fhir_response,
    issue,
    outcome_of,
    outcome_response,
    read_json_body,
)
from fhir_dm.web.params import parse_date
from fhir_dm.web.settings import Service, current_service

bp = Blueprint("population_ops", __name__)

RUN_OPERATION = "$dm-population-run"
MEASURE_OPERATION = "$evaluate-measure"
POPULATION_KEY = "fhir_dm_population"
# The queue-storage key naming the one population run in progress (see `_claim_active`).
ACTIVE_RUN_KEY = "fhir-dm:population-active"
RUN_QUERY = frozenset({"preview", "now"})
MEASURE_PARAMETERS = frozenset({"periodStart", "periodEnd", "reportType"})
REPORT_TYPES = {"summary": False, "subject-list": True}
_BOOLEANS = {"true": True, "false": False}
DEADLINE_ERRORS = frozenset({DeadlineExceededError.__name__, UpstreamTimeoutError.__name__})

Json = dict[str, Any]


class NotFoundError(FhirDmError):
    """A Measure or a run this service does not have."""

    status = 404


def init_app(app: Flask) -> None:
    """Register the operations, with the population configuration read once."""
    service: Service = app.extensions["fhir_dm"]
    app.extensions[POPULATION_KEY] = load_population_config(
        service.knowledge, service.settings.config_dir
    )
    app.register_blueprint(bp)


def _population() -> PopulationConfig:
    config = current_app.extensions[POPULATION_KEY]
    if not isinstance(config, PopulationConfig):
        raise TypeError("app.extensions['fhir_dm_population'] is not a PopulationConfig")
    return config


def _today() -> date:
    return datetime.now(UTC).date()


def _single_query(allowed: frozenset[str]) -> dict[str, str]:
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        raise InputError(f"unknown query parameter(s): {', '.join(unknown)}")
    for name in request.args:
        if len(request.args.getlist(name)) > 1:
            raise InputError(f"query parameter {name} given more than once")
    return {name: request.args[name] for name in request.args}


def _find(service: Service) -> list[str]:
    tokens = iim_search_tokens(service.knowledge, _population().finder)
    return find_iim_patients(service.fhir, tokens)


def _check_size(service: Service, count: int) -> None:
    limit = service.settings.max_patients_per_request
    if count > limit:
        raise TooCostlyError(
            f"the population has {count} patients; max_patients_per_request is {limit}:"
            " configure the job queue (jobs.*) or use `fhir-dm population` offline"
        )


def _assess_all(service: Service, patient_ids: list[str], *, now: date, preview: bool) -> RunResult:
    """Assess each patient within the request; one patient's failure is listed, not raised."""
    result = RunResult("request", len(patient_ids))
    for patient_id in patient_ids:
        try:
            write = service.writeback.assess_patient(patient_id, now=now, preview=preview)
            patient = service.fhir.read("Patient", patient_id)
        except FhirDmError as exc:
            result.failures.append(Failure(patient_id, type(exc).__name__, exc.message))
            continue
        row = patient_row(write.result, patient, service.knowledge, f"Patient/{patient_id}")
        result.done.append(Done(patient_id, write.status, row))
    return result


def _summary(result: RunResult, *, preview: bool, complete: bool) -> Json:
    """A Parameters: the run, its progress, and per tier patients/written/unchanged/failed."""
    parameters: list[Json] = [
        {"name": "runId", "valueString": result.run_id},
        {"name": "preview", "valueBoolean": preview},
        {"name": "status", "valueCode": "completed" if complete else "in-progress"},
        {"name": "total", "valueInteger": result.total},
        {"name": "finished", "valueInteger": len(result.done) + len(result.failures)},
    ]
    for tier, counts in sorted(result.by_tier().items()):
        parts: list[Json] = [{"name": "tier", "valueCode": tier}]
        parts += [{"name": k, "valueInteger": v} for k, v in counts.items()]
        parameters.append({"name": "byTier", "part": parts})
    for failure in result.failures:
        parameters.append(
            {
                "name": "failure",
                "part": [
                    {
                        "name": "patient",
                        "valueReference": {"reference": f"Patient/{failure.patient_id}"},
                    },
                    {"name": "error", "valueString": failure.error},
                ],
            }
        )
    return {"resourceType": "Parameters", "parameter": parameters}


def _run_call() -> OperationCall:
    query = _single_query(RUN_QUERY)
    body = read_json_body(current_service().settings.max_request_bytes, required=False)
    call = OperationCall()
    if body is not None:
        if not isinstance(body, Mapping) or body.get("resourceType") != "Parameters":
            raise NotFhirError("the request body must be a Parameters resource")
        call = parse_parameters(body)
        if call.bundle is not None:
            raise InputError("this operation reads the server's patients; do not post a bundle")
    preview = call.preview
    if "preview" in query:
        if query["preview"] not in _BOOLEANS:
            raise InputError("query parameter preview must be true or false")
        if preview is not None and preview != _BOOLEANS[query["preview"]]:
            raise InputError("preview is given in the query and in the body with different values")
        preview = _BOOLEANS[query["preview"]]
    now = call.now
    if "now" in query:
        now = parse_date(query["now"], "now")
    return OperationCall(preview=preview, now=now)


def _queue(service: Service) -> Any:
    from fhir_dm.web.jobs import queue_for

    jobs = service.settings.jobs
    assert jobs is not None
    return queue_for(service.settings, jobs)


def _running(jobs: Any) -> str | None:
    """The id of the recorded active run while it still has patients queued; else None."""
    from fhir_dm.population.queued import QueuedRun

    raw = jobs.huey.storage.peek_data(ACTIVE_RUN_KEY)
    current = bytes(raw).decode("ascii", "replace") if isinstance(raw, bytes) else ""
    if not RUN_ID.fullmatch(current):
        return None
    result = QueuedRun(jobs, current).status()
    if result is None or len(result.done) + len(result.failures) >= result.total:
        return None  # finished, or its manifest is gone: it may be taken over
    return current


def _claim_active(jobs: Any, run_id: str) -> str | None:
    """Make `run_id` the one active run; the id of another run still going, else None.

    One key in the queue's storage, set atomically, so the limit holds across workers and
    hosts. A recorded run that has finished (or whose manifest is gone) is taken over.
    """
    storage = jobs.huey.storage
    for _ in range(3):
        if storage.put_if_empty(ACTIVE_RUN_KEY, run_id.encode("ascii")):
            return None
        running = _running(jobs)
        if running is not None:
            return running
        popped = storage.pop_data(ACTIVE_RUN_KEY)
        if isinstance(popped, bytes) and _running(jobs) is None:
            continue  # the finished run's claim is gone: claim again
        if isinstance(popped, bytes):
            storage.put_if_empty(ACTIVE_RUN_KEY, popped)  # a newer claim: put it back
    return _running(jobs) or "unknown"


def _conflict(service: Service, running: str) -> Response:
    location = _run_location(service, running)
    return outcome_response(
        409,
        "conflict",
        f"population run {running} is still in progress; one run at a time (status at {location})",
        headers={"Content-Location": location},
    )


def _run_location(service: Service, run_id: str) -> str:
    return f"{service.settings.public_base_url}/{RUN_OPERATION}/{run_id}"


@bp.post(f"/{RUN_OPERATION}")
def population_run() -> Response:
    """Assess every IIM patient: preview (default) or write; queued when a queue exists."""
    from fhir_dm.population.queued import QueuedRun

    service = current_service()
    principal = authenticate(service)
    call = _run_call()
    preview = True if call.preview is None else call.preview
    require_population(principal, write=not preview)
    now = call.now or _today()
    if service.settings.jobs is None:
        patient_ids = _find(service)
        _check_size(service, len(patient_ids))
        result = _assess_all(service, patient_ids, now=now, preview=preview)
        return fhir_response(_summary(result, preview=preview, complete=True))
    from fhir_dm.events.queue import queue_available

    jobs = _queue(service)
    try:
        with queue_available():
            # Refused before the population search when a run is going (the cheap check);
            # the claim below decides for requests racing past it.
            running = _running(jobs)
        if running is not None:
            return _conflict(service, running)
        patient_ids = _find(service)
        with queue_available():
            run = QueuedRun(jobs, new_run_id())
            # The manifest first: a run another request sees as active can always be read.
            run.save_manifest(patient_ids, now=now, preview=preview)
            running = _claim_active(jobs, run.run_id)
            if running is not None:
                run.forget([])
                return _conflict(service, running)
            run.submit(patient_ids, now=now, preview=preview)
    finally:
        jobs.close()
    location = _run_location(service, run.run_id)
    text = f"{len(patient_ids)} patient(s) queued as run {run.run_id}; status at {location}"
    return fhir_response(
        outcome_of([issue("information", "informational", text)]),
        status=202,
        headers={"Content-Location": location, "Location": location},
    )


@bp.get(f"/{RUN_OPERATION}/<run_id>")
def population_run_status(run_id: str) -> Response:
    """A queued run's progress: 202 while patients are queued, 200 with the summary after."""
    from fhir_dm.population.queued import QueuedRun

    service = current_service()
    require_population(authenticate(service), write=False)
    try:
        StateFile.check_run_id(run_id)
    except FhirDmError:
        raise InputError("not a valid run id") from None
    if service.settings.jobs is None:
        raise NotFoundError("no job queue is configured; runs are answered in the request")
    from fhir_dm.events.queue import queue_available

    jobs = _queue(service)
    try:
        with queue_available():
            result = QueuedRun(jobs, run_id).status()
            manifest_preview = True if result is None else _manifest_preview(jobs, run_id)
    finally:
        jobs.close()
    if result is None:
        raise NotFoundError("no such population run")
    complete = len(result.done) + len(result.failures) == result.total
    body = _summary(result, preview=manifest_preview, complete=complete)
    return fhir_response(body, status=200 if complete else 202)


def _manifest_preview(jobs: Any, run_id: str) -> bool:
    import json

    from fhir_dm.population.queued import manifest_key

    try:
        return bool(json.loads(bytes(jobs.huey.storage.peek_data(manifest_key(run_id))))["preview"])
    except (ValueError, TypeError, KeyError):
        return True


def _measure_inputs() -> tuple[date, date, bool]:
    """periodStart, periodEnd, reportType from the query (GET) or a Parameters body (POST)."""
    values: dict[str, Any] = dict(_single_query(MEASURE_PARAMETERS))
    if request.method == "POST":
        body = read_json_body(current_service().settings.max_request_bytes, required=False)
        if body is not None:
            if not isinstance(body, Mapping) or body.get("resourceType") != "Parameters":
                raise NotFhirError("the request body must be a Parameters resource")
            for n, parameter in enumerate(body.get("parameter") or []):
                path = f"Parameters.parameter[{n}]"
                name = parameter.get("name") if isinstance(parameter, Mapping) else None
                if name not in MEASURE_PARAMETERS:
                    raise InputError(f"{path}: unknown parameter", expression=[path])
                value = parameter.get("valueDate", parameter.get("valueCode"))
                if name in values and values[name] != value:
                    raise InputError(f"{name} is given twice with different values")
                values[name] = value
    for name in ("periodStart", "periodEnd"):
        if name not in values:
            raise InputError(f"{name} is required", expression=[name])
    start = parse_date(values["periodStart"], "periodStart")
    end = parse_date(values["periodEnd"], "periodEnd")
    if end < start:
        raise InputError("periodEnd is before periodStart", expression=["periodEnd"])
    report_type = values.get("reportType", "summary")
    if report_type not in REPORT_TYPES:
        raise InputError("reportType must be summary or subject-list", expression=["reportType"])
    return start, end, REPORT_TYPES[report_type]


@bp.route(f"/Measure/<id>/{MEASURE_OPERATION}", methods=["GET", "POST"])
def evaluate_measure(id: str) -> Response:
    """A MeasureReport of one §11 measure for a period (patients assessed at its last day)."""
    service = current_service()
    require_population(authenticate(service), write=False)
    measure = next((m for m in _population().measures if m.id == id), None)
    if measure is None:
        raise NotFoundError("no Measure with this id")
    start, end, subject_list = _measure_inputs()
    patient_ids = _find(service)
    _check_size(service, len(patient_ids))
    result = _assess_all(service, patient_ids, now=end, preview=True)
    if any(f.error in DEADLINE_ERRORS for f in result.failures):
        # Out of time, not a failing server: 504 like every other request at its deadline.
        raise DeadlineExceededError(
            f"{len(result.failures)} patient(s) could not be assessed within the request's"
            " time limit; the report would be incomplete"
        )
    if result.failures:
        # A report that silently left patients out would under-count: refuse it instead.
        raise UpstreamError(
            f"{len(result.failures)} patient(s) could not be assessed;"
            " the report would be incomplete"
        )
    report = measure_report(
        service.knowledge, measure, result.rows, (start, end), subject_list=subject_list
    )
    limits.check_response_size(len(fhir_json(report)), service.settings.max_response_bytes)
    return fhir_response(report)
