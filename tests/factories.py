"""Wire-format FHIR test data: one factory per resource shape, keyword overrides per axis.

Every factory validates its output through the R4B model, so a test can never feed the
service something that is not FHIR by accident.
"""

from __future__ import annotations

import itertools
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

SCT = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
LOINC = "http://loinc.org"
V3_INTERP = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
LOCAL_LAB = "http://hospital.example.org/lab-codes"
LOCAL_PROBLEMS = "http://hospital.example.org/problem-list"

# Presence LOINCs used by the tests (see config/terminology/observations.yaml).
ANTIBODY_LOINC = {
    "tif1g": "107562-1",
    "nxp2": "105528-4",
    "sae1": "101220-2",
    "mda5": "82424-3",
    "mi2": "82997-8",
    "jo1": "8076-2",
    "pl7": "33772-5",
    "pl12": "33771-7",
    "ej": "45149-2",
    "oj": "45152-6",
    "srp": "33921-8",
    "hmgcr": "93493-5",
    "ku": "18484-6",
    "pmscl": "105554-0",
    "ro52": "53016-2",
}
DM_SNOMED = "396230008"

_ids = itertools.count(1)

Json = dict[str, Any]


def _valid(resource: Json) -> Json:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


def _next_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def concept(system: str, code: str, display: str | None = None, text: str | None = None) -> Json:
    c: Json = {
        "coding": [{"system": system, "code": code, **({"display": display} if display else {})}]
    }
    if text:
        c["text"] = text
    return c


def patient(
    id: str | None = None,
    *,
    gender: str | None = "female",
    birth_date: str | None = "1980-05-10",
    identifier: str | None = None,
    **extra: Any,
) -> Json:
    res: Json = {"resourceType": "Patient", "id": id or _next_id("pat")}
    if gender:
        res["gender"] = gender
    if birth_date:
        res["birthDate"] = birth_date
    if identifier:
        res["identifier"] = [{"system": "http://hospital.example.org/mrn", "value": identifier}]
    res.update(extra)
    return _valid(res)


def ref(resource: Json) -> Json:
    return {"reference": f"{resource['resourceType']}/{resource['id']}"}


def condition(
    subject: Json,
    code: Json | None,
    *,
    onset: str | None = None,
    recorded: str | None = None,
    clinical_status: str | None = "active",
    verification: str | None = None,
    id: str | None = None,
    **extra: Any,
) -> Json:
    res: Json = {"resourceType": "Condition", "id": id or _next_id("cond"), "subject": ref(subject)}
    if code is not None:
        res["code"] = code
    if clinical_status:
        res["clinicalStatus"] = concept(
            "http://terminology.hl7.org/CodeSystem/condition-clinical", clinical_status
        )
    if verification:
        res["verificationStatus"] = concept(
            "http://terminology.hl7.org/CodeSystem/condition-ver-status", verification
        )
    if onset:
        res["onsetDateTime"] = onset
    if recorded:
        res["recordedDate"] = recorded
    res.update(extra)
    return _valid(res)


def iim_condition(
    subject: Json,
    *,
    code: str = DM_SNOMED,
    system: str = SCT,
    onset: str | None = "2024-03-01",
    **kw: Any,
) -> Json:
    return condition(subject, concept(system, code), onset=onset, **kw)


def observation(
    subject: Json | None,
    code: Json,
    *,
    status: str = "final",
    effective: str | None = "2024-03-05",
    id: str | None = None,
    **value: Any,
) -> Json:
    res: Json = {
        "resourceType": "Observation",
        "id": id or _next_id("obs"),
        "status": status,
        "code": code,
    }
    if subject is not None:
        res["subject"] = ref(subject)
    if effective:
        res["effectiveDateTime"] = effective
    res.update(value)
    return _valid(res)


POSITIVE = concept(SCT, "10828004", "Positive (qualifier value)")
NEGATIVE = concept(SCT, "260385009", "Negative (qualifier value)")


def antibody(
    subject: Json | None, name: str, result: str = "positive", *, shape: str = "coded", **kw: Any
) -> Json:
    """An antibody result. shape: coded | string | interpretation | quantity | loinc-answer."""
    code = concept(LOINC, ANTIBODY_LOINC[name])
    positive = result == "positive"
    value: Json
    if shape == "coded":
        value = {"valueCodeableConcept": POSITIVE if positive else NEGATIVE}
    elif shape == "loinc-answer":
        value = {"valueCodeableConcept": concept(LOINC, "LA6576-8" if positive else "LA6577-6")}
    elif shape == "string":
        value = {"valueString": result}
    elif shape == "interpretation":
        value = {"interpretation": [concept(V3_INTERP, "POS" if positive else "NEG")]}
    elif shape == "quantity":
        value = {
            "valueQuantity": {"value": 85 if positive else 4, "unit": "U/mL"},
            "referenceRange": [{"high": {"value": 20, "unit": "U/mL"}}],
        }
    else:
        raise ValueError(shape)
    value.update(kw)
    return observation(subject, code, **value)


def ck(
    subject: Json,
    value: float,
    *,
    unit: str = "U/L",
    effective: str = "2024-03-05",
    high: float | None = 200,
    **kw: Any,
) -> Json:
    extra: Json = {
        "valueQuantity": {
            "value": value,
            "unit": unit,
            "system": "http://unitsofmeasure.org",
            "code": unit,
        }
    }
    if high is not None:
        extra["referenceRange"] = [
            {
                "high": {
                    "value": high,
                    "unit": unit,
                    "system": "http://unitsofmeasure.org",
                    "code": unit,
                }
            }
        ]
    extra.update(kw)
    return observation(subject, concept(LOINC, "2157-6"), effective=effective, **extra)


def smoking(subject: Json, code: str = "428071000124103", **kw: Any) -> Json:
    return observation(
        subject, concept(LOINC, "72166-2"), valueCodeableConcept=concept(SCT, code), **kw
    )


def medication(subject: Json, text: str = "Prednisone 20 mg", *, status: str = "active") -> Json:
    return _valid(
        {
            "resourceType": "MedicationRequest",
            "id": _next_id("med"),
            "status": status,
            "intent": "order",
            "subject": ref(subject),
            "medicationCodeableConcept": {"text": text},
        }
    )


def done_request(subject: Json, knowledge: Any, test_id: str, when: str) -> Json:
    """A completed ServiceRequest for one of the rule set's tests (the test was done)."""
    test = knowledge.ruleset.tests[test_id]
    system = knowledge.terminology.system_url(test.code.system)
    return _valid(
        {
            "resourceType": "ServiceRequest",
            "id": _next_id("done"),
            "status": "completed",
            "intent": "order",
            "subject": ref(subject),
            "code": concept(system, test.code.code),
            "occurrenceDateTime": when,
        }
    )


def lung_screened(subject: Json, when: str = "2024-02-01") -> list[Json]:
    """An HRCT and PFTs done before the diagnosis (default: a month before the factories' IIM
    diagnosis), so that no ILD screening round is planned (rule set 1.2.0)."""
    return [
        _valid(
            {
                "resourceType": "Procedure",
                "id": _next_id("lung"),
                "status": "completed",
                "code": concept(system, code),
                "subject": ref(subject),
                "performedDateTime": when,
            }
        )
        for system, code in ((SCT, "16335031000119100"), (LOINC, "58477-1"))
    ]


def medication_reference(
    subject: Json, medication_id: str, *, contained: Json | None = None, status: str = "active"
) -> Json:
    """A MedicationRequest naming its drug by medicationReference (contained or bundled)."""
    res: Json = {
        "resourceType": "MedicationRequest",
        "id": _next_id("med"),
        "status": status,
        "intent": "order",
        "subject": ref(subject),
        "medicationReference": {"reference": medication_id},
    }
    if contained is not None:
        res["contained"] = [contained]
    return _valid(res)


def medication_resource(text: str, id: str | None = None) -> Json:
    return _valid(
        {"resourceType": "Medication", "id": id or _next_id("drug"), "code": {"text": text}}
    )


def bundle(*resources: Json, type: str = "collection", full_urls: str = "relative") -> Json:
    entries = []
    for r in resources:
        entry: Json = {"resource": r}
        if full_urls == "relative":
            entry["fullUrl"] = f"http://example.org/fhir/{r['resourceType']}/{r['id']}"
        entries.append(entry)
    b: Json = {"resourceType": "Bundle", "type": type, "entry": entries}
    if type == "transaction":
        for entry in entries:
            entry["request"] = {
                "method": "PUT",
                "url": f"{entry['resource']['resourceType']}/{entry['resource']['id']}",
            }
    return _valid(b)


def seed_case() -> list[Json]:
    """Intern Med 2017;56:719: 75-year-old man, heavy smoker, dysphagia, CK 15,242 IU/L, TIF1-γ+."""
    p = patient("seed-case", gender="male", birth_date="1940-06-15")
    resources = [
        p,
        iim_condition(p, onset="2015-09-01", recorded="2015-10-20"),
        condition(p, concept(SCT, "40739000", "Dysphagia (disorder)"), onset="2015-10-01"),
        smoking(p, effective="2015-10-20"),
        ck(p, 15242, unit="IU/L", effective="2015-10-20", high=None),
        antibody(p, "tif1g", "positive", effective="2015-10-22"),
    ]
    for name in ANTIBODY_LOINC:
        if name != "tif1g":
            resources.append(antibody(p, name, "negative", effective="2015-10-22"))
    return resources
