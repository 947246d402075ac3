"""Write-back: read what the FHIR server holds, assess, revise, write a transaction per patient."""

from __future__ import annotations

import copy
import logging
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

from fhir_dm.common import deadline as deadlines
from fhir_dm.common.errors import (
    ConflictError,
    InputError,
    NoPatientError,
    NotFhirError,
    PatientNotFoundError,
    UpstreamError,
    UpstreamRejectedError,
)
from fhir_dm.common.metrics import ASSESSMENTS, counting_assessment
from fhir_dm.core.assess import AssessmentRun, Engine, PatientResult
from fhir_dm.core.ids import FHIR_ID_PATTERN, is_fhir_id
from fhir_dm.core.inputs import (
    Pair,
    group_by_patient,
    normalise_reference,
    select_resources,
    validate_resource,
)
from fhir_dm.core.revision import (
    OPEN_PLAN_STATUSES,
    READ_REQUEST_STATUSES,
    REVISABLE_PLAN_STATUSES,
    Revision,
    is_family_plan,
    plan_revision,
    write_back_bundle,
)
from fhir_dm.fhir.client import FhirClient, upstream_status
from fhir_dm.fhir.retry import is_idempotent_bundle
from fhir_dm.writeback.locks import PatientLocks

_log = logging.getLogger(__name__)

Json = dict[str, Any]
WriteStatus = Literal["preview", "written", "unchanged"]

# A transaction that lost a race: 412 (an `ifMatch` no longer holds), 409 (HAPI: concurrent
# create of the same row). Read-decide-write then runs again, at most this often in all.
CONFLICT_STATUSES = frozenset({409, 412})
MAX_WRITE_ATTEMPTS = 4
CONFLICT_PAUSE_SECONDS = 0.1

# What a patient's assessment reads, each searched with `patient=<id>` (paging followed).
PATIENT_SEARCHES = (
    "Condition",
    "Observation",
    "MedicationRequest",
    "MedicationStatement",
    "FamilyMemberHistory",
    "Procedure",
    "DiagnosticReport",
    "ServiceRequest",
    "ImagingStudy",
)
_LOCATION = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/(" + FHIR_ID_PATTERN + r")(?:/_history/([^/]+))?/?$"
)


@dataclass(frozen=True, slots=True)
class PatientWrite:
    """What happened to one patient: the result, the revision, and the entries to show."""

    result: PatientResult
    status: WriteStatus
    preview: bool
    revision: Revision | None
    # Collection entries ({"fullUrl", "resource"}): what was written (with server locations),
    # what would be written (preview), or the result as computed (unchanged).
    entries: tuple[Json, ...]

    def summary(self) -> str:
        """One line for the caller, e.g. 'Patient/1: tier high; 36 service requests; written'."""
        r = self.result
        tier = f"tier {r.tier}" if r.tier else "no tier"
        if r.tier and r.plan.assessment.preliminary:
            tier += " (preliminary)"
        parts = [f"{r.patient_reference}: {tier}", _counts(r)]
        if self.status == "unchanged":
            if r.care_plan is not None:  # active, or completed once its window has closed
                what = f"the same plan is already {r.care_plan['status']}"
            elif r.plan.assessment.scope == "no-iim":
                what = "no IIM diagnosis, nothing is written (only IIM patients' charts are)"
            else:
                what = "the same assessment is already recorded"
            parts.append(f"unchanged: {what}")
            if self.preview:
                parts.append("preview: nothing would be written")
        else:
            parts.append(self.status)
            revision = self.revision

            def did(verb: str, past: str) -> str:
                """What a preview would do, or what the write did."""
                return f"would {verb}" if self.preview else past

            if revision and (revision.revoked_plans or revision.revoked_requests):
                parts.append(
                    f"{did('revoke', 'revoked')} {len(revision.revoked_plans)} care plan(s) and "
                    f"{len(revision.revoked_requests)} service request(s)"
                )
            if revision and revision.completed_plans:
                parts.append(
                    f"{did('complete', 'completed')} {len(revision.completed_plans)} care plan(s)"
                )
            if revision and (revision.updated_plans or revision.completed_requests):
                parts.append(
                    f"{did('update', 'updated')} {len(revision.updated_plans)} care plan(s)"
                    f" in place; {did('complete', 'completed')}"
                    f" {len(revision.completed_requests)} service request(s) done elsewhere"
                )
            if revision and revision.plan_on_server:
                parts.append(
                    f"kept {len(revision.kept_requests)} open service request(s);"
                    f" {did('create', 'created')} {revision.created_requests}"
                )
        return "; ".join(parts)


def _counts(result: PatientResult) -> str:
    """Orders and plan activities named apart, so the counts add up to the plan's items."""
    plan = result.plan
    orders = len(result.service_requests)
    return f"{orders} service requests, {len(plan.items) - orders} care-plan activities"


@dataclass(frozen=True, slots=True)
class _Decision:
    """What one read-decide pass concluded, and the transaction to post (empty: none)."""

    write: PatientWrite
    bundle: Json


class WriteBack:
    """Keeps one patient's record on the FHIR server in step with its latest assessment.

    Usage::

        writeback = WriteBack(client, engine, PatientLocks(lock_dir))
        write = writeback.assess_patient("123", now=date.today(), preview=False)
        writes = writeback.write_bundle(bundle, now=date.today())

    A write always acts on an existing server Patient, named by id, and assesses the server's
    record (plus, for a posted Bundle, the posted resources). Its identity is that Patient's,
    so there is at most one open plan per patient and rule-set family: any other is revoked in
    the same transaction. Concurrency: the patient's lock serialises one host's workers; across
    hosts, every update of an existing plan is versioned (`ifMatch`, 412 on conflict) and every
    create is conditional, and a conflict re-runs read-decide-write from scratch (then 409).
    """

    def __init__(self, client: FhirClient, engine: Engine, locks: PatientLocks) -> None:
        self._client = client
        self._engine = engine
        self._locks = locks

    def assess_patient(
        self, patient_id: str, *, now: date | datetime, preview: bool
    ) -> PatientWrite:
        """Pull one patient from the server, assess, and write back (or preview) the revision."""
        return self._write_patient(patient_id, (), now=now, preview=preview)

    def preview_run(self, run: AssessmentRun) -> list[PatientWrite]:
        """The results of an assessed Bundle as they would be written; reads nothing."""
        ASSESSMENTS.labels(outcome="previewed").inc(len(run.results))
        return [
            PatientWrite(r, "preview", True, None, self._collection_entries(r.entries))
            for r in run.results
        ]

    def write_bundle(self, bundle: Any, *, now: date | datetime) -> list[PatientWrite]:
        """Write a posted Bundle, patient by patient (one transaction each, in order).

        Every posted Patient must be an existing server Patient (see `bind_patient`); all are
        checked before anything is written. Each is assessed on the server's record merged with
        the posted resources, so a partial Bundle cannot revoke a plan made from fuller data.
        A failure stops the run: earlier patients stay written, and re-posting is safe.
        """
        pairs = select_resources(bundle, self._engine.relevance)[0]
        patients = [(r, url) for r, url in pairs if r.get("resourceType") == "Patient"]
        if not patients:
            raise NoPatientError("the input holds no Patient resource")
        bound: list[tuple[str, list[Pair]]] = []
        for patient, full_url in patients:
            patient_id = self.bind_patient(patient, full_url)
            if any(patient_id == other for other, _ in bound):
                raise InputError("the Bundle holds the same Patient twice; post it once")
            bound.append((patient_id, _posted_for(patient, full_url, pairs)))
        return [
            self._write_patient(patient_id, posted, now=now, preview=False)
            for patient_id, posted in bound
        ]

    def bind_patient(self, patient: Mapping[str, Any], full_url: str | None) -> str:
        """The server Patient id a posted Patient stands for; refuses anything else.

        The posted Patient needs its server id (`Patient.id`); an absolute fullUrl must be that
        Patient on this server; the server must hold it; and every posted identifier whose
        system the server Patient also uses must be one of the server's values for it.
        """
        patient_id = patient.get("id")
        if not isinstance(patient_id, str) or not is_fhir_id(patient_id):
            raise InputError(
                "to write back, every Patient in the Bundle needs its id on the FHIR server"
                " (Patient.id); use preview, or the Patient operation"
            )
        if full_url and not full_url.startswith("urn:"):
            expected = f"{self._client.base_url}/Patient/{patient_id}"
            given = urljoin(f"{self._client.base_url}/", full_url).split("/_history/")[0]
            if given.rstrip("/") != expected:
                raise InputError(
                    "to write back, a Patient's fullUrl must name that Patient (its id) on the"
                    " configured FHIR server; this one names another server or id"
                )
        server_patient = self._client.read("Patient", patient_id)
        if server_patient is None:
            raise PatientNotFoundError("the FHIR server has no Patient with this id")
        _check_same_patient(patient, server_patient)
        return patient_id

    def _write_patient(
        self,
        patient_id: str,
        posted: Sequence[Pair],
        *,
        now: date | datetime,
        preview: bool,
    ) -> PatientWrite:
        """`_assess_and_write`, counted by outcome for the operators' metrics."""
        with counting_assessment() as report:
            write = self._assess_and_write(patient_id, posted, now=now, preview=preview)
            report(write.status)
        return write

    def _assess_and_write(
        self,
        patient_id: str,
        posted: Sequence[Pair],
        *,
        now: date | datetime,
        preview: bool,
    ) -> PatientWrite:
        """Read, assess, revise and write one patient; a lost race starts again from reading."""
        written: PatientWrite | None = None
        for attempt in range(MAX_WRITE_ATTEMPTS):
            with self._locks.hold(f"Patient/{patient_id}"):
                result, plans, requests = self._read_state(patient_id, posted, now)
                write = self._decide(result, plans, requests, preview=preview)
                if write.write.status != "written":
                    # Unchanged after our own write (a second pass tidying a race): report ours.
                    return written if written is not None else write.write
                try:
                    response = self._client.transaction(
                        write.bundle, idempotent=is_idempotent_bundle(write.bundle)
                    )
                except UpstreamRejectedError as exc:
                    if upstream_status(exc) not in CONFLICT_STATUSES:
                        raise
                    _log.warning("write-back conflict; attempt %d", attempt + 1)
                else:
                    entries = self._written_entries(write.bundle["entry"], response)
                    written = replace(write.write, entries=entries)
                    if self._open_plan_count(result) <= 1:
                        return written
                    # Another host wrote a different plan at the same moment: one more pass
                    # revokes the extra (versioned, so the two hosts cannot undo each other).
                    _log.warning("write-back found several open plans; attempt %d", attempt + 1)
            self._pause(attempt)
        if written is not None:
            return written
        raise ConflictError(
            "the patient's plan was changed by another writer at the same time, again and again;"
            " nothing was written, try again"
        )

    def _pause(self, attempt: int) -> None:
        """A short random pause, so two hosts that collided do not collide again in step."""
        delay = CONFLICT_PAUSE_SECONDS * (attempt + 1) * (0.5 + random.random())  # noqa: S311
        left = deadlines.remaining_or_none()
        if left is not None and left < delay:
            raise ConflictError(
                "the patient's plan was changed by another writer at the same time;"
                " nothing was written, try again"
            )
        time.sleep(delay)

    def _read_state(
        self, patient_id: str, posted: Sequence[Pair], now: date | datetime
    ) -> tuple[PatientResult, list[Json], list[Json]]:
        """Assess the server's record (plus posted resources); read the open plans to revise."""
        patient = self._client.read("Patient", patient_id)
        if patient is None:
            raise PatientNotFoundError("the FHIR server has no Patient with this id")
        result = self._assess_pulled(patient, self._pull(patient_id), posted, now)
        plans = self._client.search(
            "CarePlan",
            {
                "subject": f"Patient/{patient_id}",
                "identifier": f"{result.identity.series_system}|",
                # A completed plan too: the patient's plan is revised after its window closed.
                "status": ",".join(sorted(REVISABLE_PLAN_STATUSES)),
            },
        )
        open_refs = [
            f"CarePlan/{p['id']}"
            for p in plans
            if p.get("status") in REVISABLE_PLAN_STATUSES and is_family_plan(p, result.identity)
        ]
        requests: list[Json] = []
        if open_refs:
            requests = self._client.search(
                "ServiceRequest",
                {
                    "based-on": ",".join(open_refs),
                    # Completed ones too: an order of ours a clinician completed is not
                    # ordered again (revision.py).
                    "status": ",".join(sorted(READ_REQUEST_STATUSES)),
                },
            )
        return result, plans, requests

    def _open_plan_count(self, result: PatientResult) -> int:
        """How many open plans of the family the patient has now (1 after a clean write)."""
        plans = self._client.search(
            "CarePlan",
            {
                "subject": result.patient_reference,
                "identifier": f"{result.identity.series_system}|",
                "status": ",".join(sorted(OPEN_PLAN_STATUSES)),
            },
        )
        return sum(
            1
            for p in plans
            if p.get("status") in OPEN_PLAN_STATUSES and is_family_plan(p, result.identity)
        )

    def _pull(self, patient_id: str) -> list[Json]:
        """Everything the assessment reads about the patient, each resource once."""
        seen: dict[str, Json] = {}
        for resource_type in PATIENT_SEARCHES:
            for resource in self._client.search(resource_type, {"patient": patient_id}):
                key = f"{resource.get('resourceType')}/{resource.get('id')}"
                seen.setdefault(key, resource)
        return list(seen.values())

    def _assess_pulled(
        self,
        patient: Json,
        resources: Sequence[Json],
        posted: Sequence[Pair],
        now: date | datetime,
    ) -> PatientResult:
        """Assess server data merged with posted resources (posted win on the same type/id).

        Invalid server data is the server's fault (502), not the caller's.
        """
        base = self._client.base_url
        posted_keys = {_type_id(r) for r, _ in posted if r.get("id")}
        pairs: list[Pair] = []
        for resource in [patient, *resources]:
            resource_type = str(resource.get("resourceType"))
            if resource_type != "Patient" and _type_id(resource) in posted_keys:
                continue
            try:
                validate_resource(resource, resource_type)
            except NotFhirError as exc:
                raise UpstreamError(
                    f"the FHIR server returned a resource that is not valid FHIR R4: {exc.message}"
                ) from None
            pairs.append((resource, f"{base}/{resource_type}/{resource.get('id')}"))
        pairs.extend(posted)
        records = group_by_patient(pairs)
        return self._engine.assess_records(records[:1], now=now).results[0]

    def _decide(
        self,
        result: PatientResult,
        plans: Sequence[Mapping[str, Any]],
        requests: Iterable[Mapping[str, Any]],
        *,
        preview: bool,
    ) -> _Decision:
        revision = plan_revision(result, plans, requests)
        no_iim = result.plan.assessment.scope == "no-iim"
        if (
            revision.unchanged
            or (no_iim and not revision.entries)
            or (result.care_plan is None and not revision.entries and self._recorded(result))
        ):
            # Only IIM patients' charts are written: no IIM and no plan of ours writes nothing.
            entries = () if no_iim else self._collection_entries(result.entries)
            return _Decision(PatientWrite(result, "unchanged", preview, revision, entries), {})
        if result.care_plan is None and not revision.entries and not no_iim:
            revision = replace(revision, entries=tuple(result.entries[:1]))
        bundle = write_back_bundle(result, revision, datetime.now(UTC))
        status: WriteStatus = "preview" if preview else "written"
        entries = self._collection_entries(bundle["entry"])
        return _Decision(PatientWrite(result, status, preview, revision, entries), bundle)

    def _recorded(self, result: PatientResult) -> bool:
        """Whether this exact RiskAssessment is on the server (results without a plan)."""
        ident = result.risk_assessment["identifier"][0]
        found = self._client.search(
            "RiskAssessment",
            {
                "identifier": f"{ident['system']}|{ident['value']}",
                "subject": result.patient_reference,
            },
        )
        return bool(found)

    def _absolute(self, url: str) -> str:
        """A collection Bundle needs absolute fullUrls: `Type/id` becomes a server URL."""
        if url.startswith("urn:") or urlsplit(url).scheme:
            return url
        return f"{self._client.base_url}/{url}"

    def _full_url(self, entry: Json) -> str:
        """Where a transaction entry's resource lives or will live: PUTs name it, POSTs don't."""
        request = entry.get("request") or {}
        if request.get("method") == "PUT" and isinstance(request.get("url"), str):
            return self._absolute(request["url"])
        return self._absolute(entry["fullUrl"])

    def _collection_entries(self, entries: Iterable[Json]) -> tuple[Json, ...]:
        return tuple({"fullUrl": self._full_url(e), "resource": e["resource"]} for e in entries)

    def _written_entries(self, entries: Sequence[Json], response: Json) -> tuple[Json, ...]:
        """The written resources as the server now holds them: ids and references resolved."""
        answers = response.get("entry") or []
        where: list[tuple[str, str, str | None] | None] = []
        for n, _ in enumerate(entries):
            answer = answers[n] if n < len(answers) and isinstance(answers[n], dict) else {}
            location = (answer.get("response") or {}).get("location")
            where.append(self._parse_location(location) if isinstance(location, str) else None)
        local = {
            e["fullUrl"]: f"{w[0]}/{w[1]}"
            for e, w in zip(entries, where, strict=True)
            if w is not None and e["fullUrl"].startswith("urn:")
        }
        out = []
        for entry, w in zip(entries, where, strict=True):
            resource = _replace_references(copy.deepcopy(entry["resource"]), local)
            if w is None:
                out.append({"fullUrl": self._full_url(entry), "resource": resource})
                continue
            resource_type, resource_id, version = w
            resource["id"] = resource_id
            if version:
                resource["meta"] = {**(resource.get("meta") or {}), "versionId": version}
            url = f"{self._client.base_url}/{resource_type}/{resource_id}"
            out.append({"fullUrl": url, "resource": resource})
        return tuple(out)

    def _parse_location(self, location: str) -> tuple[str, str, str | None] | None:
        """`CarePlan/1/_history/2` (relative or absolute) as (type, id, version)."""
        match = _LOCATION.search(urlsplit(urljoin(f"{self._client.base_url}/", location)).path)
        if match is None:
            return None
        return match.group(1), match.group(2), match.group(3)


def _type_id(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def _aliases(resource: Mapping[str, Any], full_url: str | None) -> set[str]:
    """Every reference form under which a posted resource may be named in the Bundle."""
    keys = {normalise_reference(full_url)} if full_url else set()
    if resource.get("id"):
        keys.add(_type_id(resource))
    return keys


def _posted_for(
    patient: Mapping[str, Any], full_url: str | None, pairs: Sequence[Pair]
) -> list[Pair]:
    """The posted resources of one patient, re-pointed at the server Patient by id.

    Resources naming another posted Patient are left out; resources naming none (a
    Medication, panel members) are kept, as they are reached by reference only.
    """
    aliases = _aliases(patient, full_url)
    others: set[str] = set()
    for resource, url in pairs:
        if resource.get("resourceType") == "Patient" and resource is not patient:
            others |= _aliases(resource, url)
    subject = f"Patient/{patient['id']}"
    out: list[Pair] = []
    for resource, url in pairs:
        if resource.get("resourceType") == "Patient":
            continue
        field = next(
            (f for f in ("subject", "patient") if isinstance(resource.get(f), Mapping)), None
        )
        reference = resource[field].get("reference") if field else None
        named = normalise_reference(reference) if isinstance(reference, str) else None
        if named is not None and named in others and named not in aliases:
            continue
        if field is not None and named in aliases:
            resource = {**resource, field: {**resource[field], "reference": subject}}
        out.append((resource, url))
    return out


def _check_same_patient(posted: Mapping[str, Any], server: Mapping[str, Any]) -> None:
    """Refuse a posted Patient whose identifiers contradict the server's Patient of that id.

    Rule: for every system both use, each posted value must be one of the server's values
    for it. Identifiers without a system, or of a system only one side uses, cannot be
    compared and do not count. The message names the system, never a value.
    """
    on_server: dict[str, set[str]] = {}
    for ident in server.get("identifier") or []:
        if isinstance(ident, Mapping) and ident.get("system") and ident.get("value"):
            on_server.setdefault(str(ident["system"]), set()).add(str(ident["value"]))
    for ident in posted.get("identifier") or []:
        if not isinstance(ident, Mapping):
            continue
        system, value = ident.get("system"), ident.get("value")
        if system in on_server and value and str(value) not in on_server[str(system)]:
            raise ConflictError(
                f"the posted Patient's identifier ({system}) differs from the FHIR server's"
                " Patient with this id; nothing was written"
            )


def _replace_references(value: Any, mapping: Mapping[str, str]) -> Any:
    """Point urn:uuid references at the server ids they became, as the server itself did."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and item in mapping:
                value[key] = mapping[item]
            else:
                _replace_references(item, mapping)
    elif isinstance(value, list):
        for item in value:
            _replace_references(item, mapping)
    return value
