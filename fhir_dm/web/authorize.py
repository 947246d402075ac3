"""What a caller's SMART scopes and patient context let it do with the service's endpoints.

The service reads and writes the FHIR server with its own credentials, so it enforces the
clinician's token itself:

- a patient's record (the app's view, a preview): read (`rs`) on every type the assessment
  reads, by `user/` or `system/` scopes, or by `patient/` scopes when the token's patient is that
  patient;
- writing a patient's plan: also create/update on each type written (`WRITES`);
- the clinic page and population operations (many patients): `user/` or `system/` scopes only.

A caller without a grant (static token, CDS client JWT, trust off) is not limited here.
Refusals are 403 OperationOutcomes naming the missing scopes.
"""

from __future__ import annotations

from collections.abc import Sequence

from fhir_dm.common.errors import ForbiddenError
from fhir_dm.web.scopes import Level, Need, has_level, missing_permissions
from fhir_dm.web.trust import Principal
from fhir_dm.writeback.writer import PATIENT_SEARCHES

# Every type an assessment reads from the FHIR server (the patient, its record, plans on file).
READ_TYPES = ("Patient", *PATIENT_SEARCHES, "CarePlan", "RiskAssessment")
READS = tuple(Need(resource_type, "rs") for resource_type in dict.fromkeys(READ_TYPES))
# What the write-back creates or updates: the assessment, the plan and its orders (revised in
# place), and the record of who wrote them.
WRITES = (
    Need("RiskAssessment", "c"),
    Need("CarePlan", "cu"),
    Need("ServiceRequest", "cu"),
    Need("Provenance", "c"),
)
_WIDE: tuple[Level, ...] = ("user", "system")
_PATIENT: tuple[Level, ...] = ("patient",)


def _labels(needs: Sequence[Need], level: str) -> str:
    return " ".join(need.label(level) for need in needs)


def require_patient(principal: Principal, patient_id: str, *, write: bool) -> None:
    """Allow reading (and with `write`, writing the plan of) Patient/`patient_id`, or 403."""
    grant = principal.grant
    if grant is None:
        return
    what = "write this patient's plan" if write else "read this patient's record"
    # What user- or system-level scopes do not cover must come from patient scopes.
    lacking = missing_permissions(grant.scopes, READS + WRITES if write else READS, levels=_WIDE)
    if not lacking:
        return
    if grant.patient is not None and grant.patient == patient_id:
        still = missing_permissions(grant.scopes, lacking, levels=_PATIENT)
        if not still:
            return
        raise ForbiddenError(
            f"the access token may not {what}: missing scopes {_labels(still, 'patient')}"
            f" (or {_labels(still, 'user')})"
        )
    if has_level(grant.scopes, "patient"):
        if grant.patient is None:
            raise ForbiddenError(
                "the access token has patient scopes but no patient in context: launch the"
                " app from the patient's record"
            )
        raise ForbiddenError(
            "the access token is for another patient and reaches its own patient only; to"
            f" {what} it needs {_labels(lacking, 'user')}"
        )
    raise ForbiddenError(
        f"the access token may not {what}: missing scopes {_labels(lacking, 'user')}"
    )


def require_population(principal: Principal, *, write: bool) -> None:
    """Allow acting on many patients (the clinic page, population runs, posted Bundles), or 403.

    Patient scopes never suffice: the answer would hold other patients.
    """
    grant = principal.grant
    if grant is None:
        return
    needs = READS + WRITES if write else READS
    lacking = missing_permissions(grant.scopes, needs, levels=_WIDE)
    if lacking:
        what = "write plans for many patients" if write else "read many patients' records"
        raise ForbiddenError(
            f"the access token may not {what} (user-level scopes are needed): missing scopes"
            f" {_labels(lacking, 'user')}"
        )
