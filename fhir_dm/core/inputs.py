"""Turn FHIR input (a Bundle of any type, or a list of resources) into one record per patient.

Structural validity is checked here, once, against the R4B models, so everything downstream
may trust the shape of what it reads. References may be relative (`Patient/1`), `urn:uuid:`
or absolute URLs; all three resolve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from fhir_dm.errors import NoPatientError, NotFhirError

Resource = Mapping[str, Any]

# Where each resource type points at its patient.
SUBJECT_FIELDS = ("subject", "patient")


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """A Patient and every resource that refers to it (as `(reference, resource)` pairs)."""

    patient: Resource
    reference: str
    resources: tuple[tuple[str, Resource], ...]
    index: Mapping[str, Resource] = field(repr=False)

    def resolve(self, reference: str) -> Resource | None:
        """The resource a reference points to, if it is in the input."""
        return self.index.get(normalise_reference(reference))


def normalise_reference(reference: str) -> str:
    """Reduce a reference to the form used as index key (`Type/id` or `urn:uuid:...`)."""
    ref = reference.strip()
    if ref.startswith("urn:"):
        return ref
    ref = ref.split("/_history/", 1)[0]
    parts = ref.rstrip("/").split("/")
    if len(parts) >= 2:
        return f"{parts[-2]}/{parts[-1]}"
    return ref


def _aliases(resource: Resource, full_url: str | None) -> list[str]:
    keys = []
    if full_url:
        keys.append(normalise_reference(full_url))
    if resource.get("id"):
        keys.append(f"{resource['resourceType']}/{resource['id']}")
    return keys


def reference_of(resource: Resource, full_url: str | None, position: int) -> str:
    """How outputs cite an input resource: `Type/id`, else its fullUrl, else its position."""
    if resource.get("id"):
        return f"{resource['resourceType']}/{resource['id']}"
    if full_url:
        return normalise_reference(full_url)
    return f"{resource['resourceType']}/#entry{position}"


def validate_resource(resource: Any, path: str) -> None:
    """Check one resource against its R4B model; raise NotFhirError with the failing path."""
    if not isinstance(resource, Mapping):
        raise NotFhirError(f"{path} is not a JSON object", expression=[path])
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise NotFhirError(f"{path} has no resourceType", expression=[path])
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        raise NotFhirError(
            f"{path}: unknown resourceType '{resource_type}'", expression=[path]
        ) from None
    try:
        model.model_validate(resource)
    except RecursionError:
        raise NotFhirError(f"{path} is nested too deeply", expression=[path]) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
        where = f"{path}.{loc}" if loc else path
        raise NotFhirError(
            f"{where}: {first['msg']} ({exc.error_count()} problem(s) in {resource_type})",
            expression=[where],
        ) from None


def read_resources(data: Any) -> list[tuple[Resource, str | None]]:
    """Validate a Bundle (any type) or a single resource; return (resource, fullUrl) pairs."""
    if not isinstance(data, Mapping) or "resourceType" not in data:
        raise NotFhirError("input is not a FHIR resource (no resourceType)")
    if data["resourceType"] != "Bundle":
        validate_resource(data, data["resourceType"])
        return [(data, None)]
    entries = data.get("entry") or []
    if not isinstance(entries, list):
        raise NotFhirError("Bundle.entry is not a list", expression=["Bundle.entry"])
    out: list[tuple[Resource, str | None]] = []
    for i, entry in enumerate(entries):
        path = f"Bundle.entry[{i}]"
        if not isinstance(entry, Mapping):
            raise NotFhirError(f"{path} is not a JSON object", expression=[path])
        resource = entry.get("resource")
        if resource is None:
            continue  # e.g. a DELETE entry of a transaction: nothing to assess
        validate_resource(resource, f"{path}.resource")
        full_url = entry.get("fullUrl")
        out.append((resource, full_url if isinstance(full_url, str) else None))
    return out


def _subject_reference(resource: Resource) -> str | None:
    for name in SUBJECT_FIELDS:
        value = resource.get(name)
        if isinstance(value, Mapping) and isinstance(value.get("reference"), str):
            return normalise_reference(value["reference"])
    return None


def group_by_patient(pairs: Sequence[tuple[Resource, str | None]]) -> list[PatientRecord]:
    """Split resources by the Patient they refer to; the order of Patients is kept."""
    index: dict[str, Resource] = {}
    patients: list[tuple[Resource, list[str]]] = []
    for resource, full_url in pairs:
        keys = _aliases(resource, full_url)
        for key in keys:
            index[key] = resource
        if resource["resourceType"] == "Patient":
            patients.append((resource, keys))
    if not patients:
        raise NoPatientError("the input holds no Patient resource")

    owner: dict[str, int] = {}
    for n, (_, keys) in enumerate(patients):
        for key in keys:
            owner[key] = n
    buckets: list[list[tuple[str, Resource]]] = [[] for _ in patients]
    for n, (resource, full_url) in enumerate(pairs):
        if resource["resourceType"] == "Patient":
            continue
        ref = _subject_reference(resource)
        if ref is not None and ref in owner:
            buckets[owner[ref]].append((reference_of(resource, full_url, n), resource))
        # Anything else (e.g. panel members without a subject) is reached by reference only.
    records = []
    for n, ((patient, keys), bucket) in enumerate(zip(patients, buckets, strict=True)):
        # A server id is the most useful subject for written-back resources.
        if patient.get("id"):
            reference = f"Patient/{patient['id']}"
        else:
            reference = keys[0] if keys else f"Patient/input-{n + 1}"
        records.append(PatientRecord(patient, reference, tuple(bucket), index))
    return records


def read_patients(data: Any) -> list[PatientRecord]:
    """Validate input and group it per patient: the entry point of the core for raw input."""
    return group_by_patient(read_resources(data))
