"""Write-back: read what the FHIR server holds, assess, revise, write a transaction per patient."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

from fhir_dm.core.assess import AssessmentRun, Engine, PatientResult
from fhir_dm.core.inputs import group_by_patient, validate_resource
from fhir_dm.core.revision import OPEN_PLAN_STATUSES, Revision, plan_revision, write_back_bundle
from fhir_dm.errors import InputError, NotFhirError, PatientNotFoundError, UpstreamError
from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.retry import is_idempotent_bundle
from fhir_dm.locks import PatientLocks

Json = dict[str, Any]
WriteStatus = Literal["preview", "written", "unchanged"]

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
)
_SERVER_PATIENT = re.compile(r"Patient/[A-Za-z0-9\-.]{1,64}")
_LOCATION = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/([^/]+))?/?$")


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
        parts = [f"{r.patient_reference}: {tier}", f"{len(r.service_requests)} service requests"]
        if self.status == "unchanged":
            what = "plan is already active" if r.care_plan else "assessment is already recorded"
            parts.append(f"unchanged: the same {what}")
            if self.preview:
                parts.append("preview: nothing would be written")
        else:
            parts.append(self.status)
            revision = self.revision
            if revision and (revision.revoked_plans or revision.revoked_requests):
                verb = "would revoke" if self.preview else "revoked"
                parts.append(
                    f"{verb} {len(revision.revoked_plans)} care plan(s) and "
                    f"{len(revision.revoked_requests)} service request(s)"
                )
        return "; ".join(parts)


class WriteBack:
    """Keeps one patient's record on the FHIR server in step with its latest assessment.

    Usage::

        writeback = WriteBack(client, engine, PatientLocks(lock_dir))
        write = writeback.assess_patient("123", now=date.today(), preview=False)
        writes = writeback.write_run(engine.assess(bundle, now=now))

    Each patient's read-decide-write runs under that patient's lock, so two concurrent
    assessments cannot both decide "nothing there yet" and write twice. A patient whose plan is
    already on the server is left alone: re-running the same input writes nothing.
    """

    def __init__(self, client: FhirClient, engine: Engine, locks: PatientLocks) -> None:
        self._client = client
        self._engine = engine
        self._locks = locks

    def assess_patient(
        self, patient_id: str, *, now: date | datetime, preview: bool
    ) -> PatientWrite:
        """Pull one patient from the server, assess, and write back (or preview) the revision."""
        with self._locks.hold(f"Patient/{patient_id}"):
            patient = self._client.read("Patient", patient_id)
            if patient is None:
                raise PatientNotFoundError("the FHIR server has no Patient with this id")
            resources = self._pull(patient_id)
            result = self._assess_pulled(patient, resources, now)
            plans = self._client.search("CarePlan", {"subject": f"Patient/{patient_id}"})
            requests = [r for r in resources if r.get("resourceType") == "ServiceRequest"]
            return self._revise(result, plans, requests, preview=preview)

    def preview_run(self, run: AssessmentRun) -> list[PatientWrite]:
        """The results of an assessed Bundle as they would be written; reads nothing."""
        return [
            PatientWrite(r, "preview", True, None, self._collection_entries(r.entries))
            for r in run.results
        ]

    def write_run(self, run: AssessmentRun) -> list[PatientWrite]:
        """Write an assessed Bundle, patient by patient (one transaction each, in order).

        A failure stops the run: earlier patients stay written, and re-posting is safe because
        they then come back unchanged.
        """
        for result in run.results:
            if not _SERVER_PATIENT.fullmatch(result.patient_reference):
                raise InputError(
                    "to write back, every Patient in the Bundle needs its id on the FHIR server"
                    " (a reference Patient/<id>); use preview, or the Patient operation"
                )
        writes = []
        for result in run.results:
            with self._locks.hold(result.patient_reference):
                plans, requests = self._series_state(result)
                writes.append(self._revise(result, plans, requests, preview=False))
        return writes

    def _pull(self, patient_id: str) -> list[Json]:
        """Everything the assessment reads about the patient, each resource once."""
        seen: dict[str, Json] = {}
        for resource_type in PATIENT_SEARCHES:
            for resource in self._client.search(resource_type, {"patient": patient_id}):
                key = f"{resource.get('resourceType')}/{resource.get('id')}"
                seen.setdefault(key, resource)
        return list(seen.values())

    def _assess_pulled(
        self, patient: Json, resources: Sequence[Json], now: date | datetime
    ) -> PatientResult:
        """Assess server data; invalid server data is the server's fault (502), not the caller's."""
        base = self._client.base_url
        pairs: list[tuple[Mapping[str, Any], str | None]] = []
        for resource in [patient, *resources]:
            resource_type = str(resource.get("resourceType"))
            try:
                validate_resource(resource, resource_type)
            except NotFhirError as exc:
                raise UpstreamError(
                    f"the FHIR server returned a resource that is not valid FHIR R4: {exc.message}"
                ) from None
            pairs.append((resource, f"{base}/{resource_type}/{resource.get('id')}"))
        records = group_by_patient(pairs)
        return self._engine.assess_records(records[:1], now=now).results[0]

    def _series_state(self, result: PatientResult) -> tuple[list[Json], list[Json]]:
        """The series' plans on the server, and the requests based on each open one."""
        identity = result.identity
        plans = self._client.search(
            "CarePlan", {"identifier": f"{identity.series_system}|{identity.series}"}
        )
        requests: list[Json] = []
        for plan in plans:
            if plan.get("status") in OPEN_PLAN_STATUSES and plan.get("id"):
                requests += self._client.search(
                    "ServiceRequest", {"based-on": f"CarePlan/{plan['id']}"}
                )
        return plans, requests

    def _revise(
        self,
        result: PatientResult,
        plans: Sequence[Mapping[str, Any]],
        requests: Iterable[Mapping[str, Any]],
        *,
        preview: bool,
    ) -> PatientWrite:
        revision = plan_revision(result, plans, requests)
        if revision.unchanged or (
            result.care_plan is None and not revision.revoke_entries and self._recorded(result)
        ):
            entries = self._collection_entries(result.entries)
            return PatientWrite(result, "unchanged", preview, revision, entries)
        bundle = write_back_bundle(result, revision)
        if preview:
            entries = self._collection_entries(bundle["entry"])
            return PatientWrite(result, "preview", True, revision, entries)
        response = self._client.transaction(bundle, idempotent=is_idempotent_bundle(bundle))
        entries = self._written_entries(bundle["entry"], response)
        return PatientWrite(result, "written", False, revision, entries)

    def _recorded(self, result: PatientResult) -> bool:
        """Whether this exact RiskAssessment is on the server (results without a plan)."""
        ident = result.risk_assessment["identifier"][0]
        found = self._client.search(
            "RiskAssessment", {"identifier": f"{ident['system']}|{ident['value']}"}
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
