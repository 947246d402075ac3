"""Turn FHIR input (a Bundle of any type, or a list of resources) into one record per patient.

Structural validity is checked here, once, against the R4B models, so everything downstream
may trust the shape of what it reads. References may be relative (`Patient/1`), `urn:uuid:`
or absolute URLs; all three resolve.

A real record holds hundreds of claims, encounters and vital signs the rules never read, and
validating them costs far more than reading the JSON. With a `Relevance` (built once from the
knowledge) only what the rules can read is kept and validated, decided on the raw JSON by
resource type and code; the rest is counted per type and reported once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel, ValidationError

from fhir_dm.common.errors import NoPatientError, NotFhirError
from fhir_dm.core.terminology import normalise_name

if TYPE_CHECKING:
    from fhir_dm.core.terminology import Matcher
    from fhir_dm.knowledge.models import Knowledge

Resource = Mapping[str, Any]
Pair = tuple[Resource, str | None]  # a resource and its Bundle fullUrl

# Where each resource type points at its patient.
SUBJECT_FIELDS = ("subject", "patient")
# Read types that have no subject of their own: reached by reference only (medicationReference).
REACHED_BY_REFERENCE = frozenset({"Medication"})
# Patient.link types that join records of one person (clinical-logic §2, rev 3); "refer" does not.
JOINING_LINKS = frozenset({"replaced-by", "replaces", "seealso"})
# Why a resource the rules could read is not used for any patient of the input (a finding each).
SUBJECT_MISSING = "resource without a subject, not in a report or panel of this patient's; not used"
SUBJECT_OTHER = "resource about another patient (its subject is not this patient); not used"
SUBJECT_AMBIGUOUS = "resource whose subject identifier matches several patients; not used"
LINK_JOINED = "records joined by Patient.link: the linked record's data counts for this patient"
LINK_OUTSIDE = "Patient.link to a record not in the input: that record's data is not read"

# Resource types the facts reader reads whatever their code (keep in step with facts.py; a unit
# test checks that every type named there is kept by type or by code).
READ_TYPES = frozenset(
    {
        "Patient",
        "Condition",
        "FamilyMemberHistory",
        "Procedure",
        "ServiceRequest",
        "ImagingStudy",
        "Medication",
        "MedicationRequest",
        "MedicationStatement",
        "MedicationAdministration",
    }
)
# Types kept by code, and the references through which the rules read other resources from them
# (report results, panel members): such a resource is also kept when one of those targets is
# kept or is not in the input, and then every target is kept with it.
FOLLOWED_REFERENCES = {"DiagnosticReport": "result", "Observation": "hasMember"}


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """A Patient and every resource that refers to it (as `(reference, resource)` pairs).

    Records joined by `Patient.link` (replaced-by / replaces / seealso) are one record: the
    surviving Patient, with the data filed under every joined one (`joined` says which, and
    how). `unattributed` lists what the rules could read but no patient of the input owns
    (subject missing or another patient's, outside any report or panel): (message, reference).
    """

    patient: Resource
    reference: str
    resources: tuple[tuple[str, Resource], ...]
    index: Mapping[str, Resource] = field(repr=False)
    # Resources of this patient left out as unreadable by the rules: (type, count), most first.
    unused: tuple[tuple[str, int], ...] = ()
    # Every Patient resource of this record (the surviving one first): their references and
    # identifiers decide whether a subject is this patient.
    members: tuple[Resource, ...] = ()
    joined: tuple[tuple[str, str], ...] = ()  # (message, the link as references)
    unattributed: tuple[tuple[str, str], ...] = ()
    # References of the other Patient records joined into this one.
    linked_references: tuple[str, ...] = ()

    def resolve(self, reference: str) -> Resource | None:
        """The resource a reference points to, if it is in the input."""
        return self.index.get(normalise_reference(reference))

    def subject_is_other(self, subject: Any) -> bool:
        """True when a Reference names someone other than this patient (by reference or by
        identifier); a missing or display-only subject is not "other"."""
        members = self.members or (self.patient,)
        if not isinstance(subject, Mapping):
            return False
        if isinstance(subject.get("reference"), str):
            return not any(self.resolve(subject["reference"]) is m for m in members)
        if _identifier_of(subject) is None:
            return False
        return not any(_identifier_matches(subject, m) for m in members)

    def unused_summary(self) -> str | None:
        """One finding for everything left out: counts per type, never one line per resource."""
        if not self.unused:
            return None
        total = sum(n for _, n in self.unused)
        counts = ", ".join(f"{t} {n}" for t, n in self.unused)
        return f"{total} resource{'s' if total > 1 else ''} no rule reads ({counts})"


class Relevance:
    """Which input resources the rules can read, decided on the raw JSON before validation.

    Built once from the knowledge. READ_TYPES are kept whatever their code. An Observation or
    DiagnosticReport is kept when its code (or a component's) is in a configured value set (the
    value sets of codes that show a screening test done among them), a local code mapping or
    the screening tests' own codes, or its text names a value set the way the facts
    reader matches text, or names an antibody (an unrecognised one is reported); or when a
    result / panel member it references is kept or is not in the input; every result and member
    of a kept one is kept too. Anything of an unexpected shape is kept, so that validation
    reports it. The filter only drops what no rule could read.
    """

    def __init__(self, knowledge: Knowledge, matcher: Matcher) -> None:
        self._matcher = matcher
        system_url = knowledge.terminology.system_url
        self._test_codes = frozenset(
            (system_url(t.code.system), t.code.code) for t in knowledge.ruleset.tests.values()
        )
        # Words that mark a result as an antibody: an unrecognised one is reported, so kept.
        self._antibody_words = frozenset(
            normalise_name(w) for w in knowledge.terminology.antibody_name_words
        )

    def select(self, entries: Sequence[Pair]) -> list[bool]:
        """Which of the (resource, fullUrl) entries to keep."""
        keep = [self.keeps(resource) for resource, _ in entries]
        where = {key: n for n, (res, url) in enumerate(entries) for key in _aliases(res, url)}
        targets: dict[int, list[int | None]] = {}
        for n, (res, _) in enumerate(entries):
            found = [where.get(key) for key in _followed(res)]
            if found:
                targets[n] = found
        # Up: a report or panel whose result is kept, or not in the input (nested panels).
        changed = True
        while changed:
            changed = False
            for n, found in targets.items():
                if not keep[n] and any(t is None or keep[t] for t in found):
                    keep[n] = changed = True
        # Down: every result and member of a kept report or panel.
        todo = [n for n in targets if keep[n]]
        while todo:
            for t in targets.get(todo.pop(), ()):
                if t is not None and not keep[t]:
                    keep[t] = True
                    todo.append(t)
        return keep

    def keeps(self, resource: Resource) -> bool:
        """True if the rules could read this resource by its type, code or text alone."""
        resource_type = resource["resourceType"]
        if resource_type in READ_TYPES:
            return True
        if resource_type not in FOLLOWED_REFERENCES:
            return False
        followed = resource.get(FOLLOWED_REFERENCES[resource_type])
        components = resource.get("component") or []
        if not isinstance(followed, list | None) or not isinstance(components, list):
            return True  # malformed: keep, validation says why
        return any(
            self._could_match(item.get("code")) if isinstance(item, Mapping) else True
            for item in [resource, *components]
        )

    def _could_match(self, concept: Any) -> bool:
        if not isinstance(concept, Mapping) or not isinstance(concept.get("coding", []), list):
            return True  # missing or malformed: keep, validation says why
        for coding in concept.get("coding") or []:
            if not isinstance(coding, Mapping):
                return True  # malformed: keep, validation says why
            system, code = coding.get("system"), coding.get("code")
            if not isinstance(system, str | None) or not isinstance(code, str | None):
                return True
            if (system, code) in self._test_codes:
                return True
        try:
            if self._matcher.concept(concept, use_text=True).value_sets:
                return True
            texts = [concept.get("text")] + [c.get("display") for c in concept.get("coding") or []]
            words = {w for t in texts if t for w in normalise_name(t).split()}
        except (AttributeError, TypeError):
            return True
        return not self._antibody_words.isdisjoint(words)


def _followed(resource: Resource) -> Iterable[str]:
    """The references through which the rules may read other resources from this one."""
    targets = resource.get(FOLLOWED_REFERENCES.get(resource["resourceType"], ""))
    for target in targets if isinstance(targets, list) else ():
        if isinstance(target, Mapping) and isinstance(target.get("reference"), str):
            yield normalise_reference(target["reference"])


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


# Signs that a resource was written for FHIR STU3 (3.0), which fhir-dm does not read: types
# that R4 renamed or removed, elements R4 removed, and codes R4 turned into CodeableConcepts.
# Used only to explain a resource that fails R4 validation.
STU3_ONLY_TYPES = frozenset(
    {"ProcedureRequest", "ReferralRequest", "BodySite", "DataElement", "EligibilityRequest"}
)
STU3_ONLY_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Condition": ("assertedDate",),
    "Observation": ("comment", "context"),
    "Procedure": ("notDone", "notDoneReason", "definition", "context"),
    "MedicationStatement": ("taken", "notTaken"),
    "FamilyMemberHistory": ("notDone", "notDoneReason", "definition"),
    "DiagnosticReport": ("codedDiagnosis", "context"),
    "Patient": ("animal",),
}
STU3_CODE_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Condition": ("clinicalStatus", "verificationStatus"),
    "AllergyIntolerance": ("clinicalStatus", "verificationStatus"),
}
READS_FHIR = "fhir-dm reads FHIR R4 (4.0.x)"
JSON_KINDS = {
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true/false",
    list: "a list",
}


def stu3_sign(resource: Mapping[str, Any]) -> str | None:
    """Why `resource` looks like FHIR STU3 (for an error message), or None."""
    kind = resource.get("resourceType")
    if kind in STU3_ONLY_TYPES:
        return f"{kind} is an STU3 resource type"
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, Mapping) else None
    if isinstance(profiles, list) and any("/STU3/" in str(p) for p in profiles):
        return "meta.profile names an STU3 profile"
    for name in STU3_CODE_ELEMENTS.get(str(kind), ()):
        if isinstance(resource.get(name), str):
            return f"{kind}.{name} is a code, as in STU3; R4 has a CodeableConcept"
    for name in STU3_ONLY_ELEMENTS.get(str(kind), ()):
        if name in resource:
            return f"{kind}.{name} exists in STU3, not in R4"
    return None


def _stu3_hint(resource: Mapping[str, Any]) -> str:
    sign = stu3_sign(resource)
    return f"; this looks like FHIR STU3 ({sign}): {READS_FHIR}" if sign else ""


@cache
def _model_class(resource_type: str) -> type[BaseModel]:
    """The R4B model of a type (the library's lookup costs ~20 us a call; a record has 1,000)."""
    return get_fhir_model_class(resource_type)


def check_shape(resource: Any, path: str) -> type[BaseModel]:
    """A JSON object with a known resourceType (checked for every entry, used or not)."""
    if not isinstance(resource, Mapping):
        raise NotFhirError(f"{path} is not a JSON object", expression=[path])
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise NotFhirError(f"{path} has no resourceType", expression=[path])
    try:
        return _model_class(resource_type)
    except (KeyError, ValueError):
        raise NotFhirError(
            f"{path}: unknown resourceType '{resource_type}'{_stu3_hint(resource)}",
            expression=[path],
        ) from None


def validate_resource(resource: Any, path: str) -> None:
    """Check one resource against its R4B model; raise NotFhirError with the failing path."""
    model = check_shape(resource, path)
    resource_type = resource["resourceType"]
    try:
        model.model_validate(resource)
    except RecursionError:
        raise NotFhirError(f"{path} is nested too deeply", expression=[path]) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
        where = f"{path}.{loc}" if loc else path
        message = first["msg"]
        if message.startswith("Invalid JSON"):  # the model read a string where it wants an object
            found = JSON_KINDS.get(type(first.get("input")), "another kind of value")
            message = f"expected a JSON object, found {found}"
        raise NotFhirError(
            f"{where}: {message} ({exc.error_count()} problem(s) in {resource_type})"
            + _stu3_hint(resource),
            expression=[where],
        ) from None


def _bundle_entries(data: Any) -> list[tuple[int, Resource, str | None]]:
    """(position, resource, fullUrl) of every entry with a resource, each of a known type."""
    if not isinstance(data, Mapping) or "resourceType" not in data:
        raise NotFhirError("input is not a FHIR resource (no resourceType)")
    if data["resourceType"] != "Bundle":
        return [(0, data, None)]
    entries = data.get("entry") or []
    if not isinstance(entries, list):
        raise NotFhirError("Bundle.entry is not a list", expression=["Bundle.entry"])
    out = []
    for i, entry in enumerate(entries):
        path = f"Bundle.entry[{i}]"
        if not isinstance(entry, Mapping):
            raise NotFhirError(f"{path} is not a JSON object", expression=[path])
        resource = entry.get("resource")
        if resource is None:
            continue  # e.g. a DELETE entry of a transaction: nothing to assess
        check_shape(resource, f"{path}.resource")
        full_url = entry.get("fullUrl")
        out.append((i, resource, full_url if isinstance(full_url, str) else None))
    return out


def select_resources(
    data: Any, relevance: Relevance | None = None
) -> tuple[list[Pair], list[int], list[Resource]]:
    """Validate a Bundle (any type) or one resource, keeping only what `relevance` keeps.

    Returns the kept (resource, fullUrl) pairs, their entry positions, and the resources left
    out unvalidated (all kept when `relevance` is None). Every entry's shape and type is checked.
    """
    entries = _bundle_entries(data)
    if relevance is None or data["resourceType"] != "Bundle":
        keep = [True] * len(entries)
    else:
        keep = relevance.select([(resource, full_url) for _, resource, full_url in entries])
    pairs: list[Pair] = []
    positions: list[int] = []
    unused: list[Resource] = []
    for (position, resource, full_url), kept in zip(entries, keep, strict=True):
        if not kept:
            unused.append(resource)
            continue
        if resource is data:
            validate_resource(resource, resource["resourceType"])
        else:
            validate_resource(resource, f"Bundle.entry[{position}].resource")
        pairs.append((resource, full_url))
        positions.append(position)
    return pairs, positions, unused


def _subject(resource: Resource) -> Any:
    """The Reference naming a resource's patient (None if it has none)."""
    for name in SUBJECT_FIELDS:
        if name in resource:
            return resource[name]
    return None


def _identifier_of(reference: Mapping[str, Any]) -> tuple[str | None, str] | None:
    """(system, value) of a Reference given by identifier, if it is one."""
    ident = reference.get("identifier")
    if not isinstance(ident, Mapping) or not isinstance(ident.get("value"), str):
        return None
    system = ident.get("system")
    return (system if isinstance(system, str) else None), ident["value"].strip()


def _identifier_matches(reference: Mapping[str, Any], patient: Resource) -> bool:
    """A Reference by identifier names this Patient: same value and, when given, same system."""
    key = _identifier_of(reference)
    if key is None or reference.get("type") not in (None, "Patient"):
        return False
    system, value = key
    return any(
        isinstance(i, Mapping)
        and isinstance(i.get("value"), str)
        and i["value"].strip() == value
        and (system is None or i.get("system") == system)
        for i in patient.get("identifier") or []
    )


class _Patients:
    """Which Patient of the input a Reference names: by reference, or by identifier."""

    def __init__(self, patients: Sequence[tuple[Resource, list[str]]]) -> None:
        self.patients = [p for p, _ in patients]
        self.keys = {key: n for n, (_, keys) in enumerate(patients) for key in keys}
        # Identifier value -> the Patients holding it (a bulk input has many patients).
        self.by_value: dict[str, list[int]] = {}
        for n, patient in enumerate(self.patients):
            for ident in patient.get("identifier") or []:
                if isinstance(ident, Mapping) and isinstance(ident.get("value"), str):
                    holders = self.by_value.setdefault(ident["value"].strip(), [])
                    if n not in holders:
                        holders.append(n)

    def named(self, reference: Any) -> tuple[int | None, str]:
        """(patient index, "") or (None, why not: missing / other / ambiguous)."""
        if not isinstance(reference, Mapping):
            return None, SUBJECT_MISSING
        target = reference.get("reference")
        if isinstance(target, str):
            n = self.keys.get(normalise_reference(target))
            return (n, "") if n is not None else (None, SUBJECT_OTHER)
        key = _identifier_of(reference)
        if key is None:
            return None, SUBJECT_MISSING  # display only
        found = [
            n
            for n in self.by_value.get(key[1], ())
            if _identifier_matches(reference, self.patients[n])
        ]
        if len(found) > 1:
            return None, SUBJECT_AMBIGUOUS
        return (found[0], "") if found else (None, SUBJECT_OTHER)


def _join_links(
    patients: _Patients, names: Sequence[str]
) -> tuple[list[list[int]], dict[int, list[tuple[str, str]]]]:
    """Groups of Patients joined by Patient.link, the surviving one first, in input order; and
    per Patient the findings that name its links (`names`: how outputs cite each Patient)."""
    parent = list(range(len(patients.patients)))

    def root(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    replaced: set[int] = set()
    notes: dict[int, list[tuple[str, str]]] = {}
    for n, patient in enumerate(patients.patients):
        for link in patient.get("link") or []:
            kind = link.get("type") if isinstance(link, Mapping) else None
            if kind not in JOINING_LINKS:
                continue
            other, _ = patients.named(link.get("other"))
            if other is None:
                target = (link.get("other") or {}).get("reference")
                where = normalise_reference(target) if isinstance(target, str) else "identifier"
                notes.setdefault(n, []).append((LINK_OUTSIDE, f"{names[n]} {kind} {where}"))
                continue
            if other == n:
                continue
            notes.setdefault(n, []).append((LINK_JOINED, f"{names[n]} {kind} {names[other]}"))
            parent[root(other)] = root(n)
            if kind == "replaced-by":
                replaced.add(n)
            elif kind == "replaces":
                replaced.add(other)
    groups: dict[int, list[int]] = {}
    for n in range(len(patients.patients)):
        groups.setdefault(root(n), []).append(n)
    ordered = []
    for members in sorted(groups.values(), key=min):
        survivors = [n for n in members if n not in replaced] or members
        ordered.append([survivors[0], *(n for n in members if n != survivors[0])])
    return ordered, notes


def group_by_patient(
    pairs: Sequence[Pair],
    *,
    positions: Sequence[int] | None = None,
    unused: Iterable[Resource] = (),
) -> list[PatientRecord]:
    """Split resources by the Patient they refer to; the order of Patients is kept.

    A subject may name its Patient by reference or by identifier. Patients joined by
    `Patient.link` make one record (the surviving one's). `positions` are the pairs' places in
    the input (for resources with neither id nor fullUrl); `unused` resources are only counted,
    per type, for the patient they refer to (for the only patient when they name none).
    What the rules could read but no patient owns is listed on every record (`unattributed`).
    """
    index: dict[str, Resource] = {}
    found: list[tuple[Resource, list[str]]] = []
    for resource, full_url in pairs:
        keys = _aliases(resource, full_url)
        for key in keys:
            index[key] = resource
        if resource["resourceType"] == "Patient":
            found.append((resource, keys))
    if not found:
        raise NoPatientError("the input holds no Patient resource")
    patients = _Patients(found)
    names = [
        f"Patient/{p['id']}" if p.get("id") else (keys[0] if keys else f"Patient/input-{n + 1}")
        for n, (p, keys) in enumerate(found)
    ]
    groups, link_notes = _join_links(patients, names)
    group_of = {n: g for g, members in enumerate(groups) for n in members}

    buckets: list[list[tuple[str, Resource]]] = [[] for _ in groups]
    loose: list[tuple[str, str, Resource]] = []  # (reason, reference, resource)
    for n, (resource, full_url) in enumerate(pairs):
        if resource["resourceType"] == "Patient":
            continue
        owner, why = patients.named(_subject(resource))
        ref = reference_of(resource, full_url, positions[n] if positions is not None else n)
        if owner is not None:
            buckets[group_of[owner]].append((ref, resource))
        elif resource["resourceType"] not in REACHED_BY_REFERENCE:
            loose.append((why, ref, resource))
    # A result without a subject (or another's) in a report or panel of a patient's is read
    # through it; anything else the rules could read is reported, never dropped silently.
    reached = _reached(index, (r for bucket in buckets for _, r in bucket))
    unattributed = tuple((why, ref) for why, ref, r in loose if id(r) not in reached)

    counts: list[Counter[str]] = [Counter() for _ in groups]
    for resource in unused:
        owner, why = patients.named(_subject(resource))
        if owner is not None:
            counts[group_of[owner]][resource["resourceType"]] += 1
        elif why == SUBJECT_MISSING and len(groups) == 1:
            counts[0][resource["resourceType"]] += 1
    records = []
    for g, (members, bucket) in enumerate(zip(groups, buckets, strict=True)):
        patient = found[members[0]][0]
        # A server id is the most useful subject for written-back resources.
        reference = names[members[0]]
        notes = [note for n in members for note in link_notes.get(n, [])]
        unused_counts = tuple(sorted(counts[g].items(), key=lambda c: (-c[1], c[0])))
        records.append(
            PatientRecord(
                patient,
                reference,
                tuple(bucket),
                index,
                unused_counts,
                members=tuple(found[n][0] for n in members),
                joined=tuple(notes),
                unattributed=unattributed,
                linked_references=tuple(names[n] for n in members[1:]),
            )
        )
    return records


def _reached(index: Mapping[str, Resource], start: Iterable[Resource]) -> set[int]:
    """Ids of every resource reached from `start` through report results and panel members."""
    seen: set[int] = set()
    todo = list(start)
    while todo:
        resource = todo.pop()
        if id(resource) in seen:
            continue
        seen.add(id(resource))
        todo.extend(t for key in _followed(resource) if (t := index.get(key)) is not None)
    return seen


def read_patients(data: Any, relevance: Relevance | None = None) -> list[PatientRecord]:
    """Validate input and group it per patient: the entry point of the core for raw input.

    With a `relevance`, only what the rules can read is validated and kept (see `Relevance`).
    """
    pairs, positions, unused = select_resources(data, relevance)
    return group_by_patient(pairs, positions=positions, unused=unused)
