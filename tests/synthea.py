"""Real-size records in the shape Synthea writes them (FHIR R4 transaction Bundles).

A real record holds hundreds to thousands of entries (encounters, claims, explanations of
benefit, vital signs, lab panels, notes, immunisations) of which the rules read a few percent.
`record(n)` builds one such Bundle of exactly `n` entries, deterministic for a seed: the
resources the rules read (`relevant(patient)`: an IIM diagnosis, myositis antibodies in every
shape the filter must keep, creatine kinase, smoking status, treatment, screening done), then
Synthea-shaped encounters around them until the size is reached. Noise codes are those the FHIR
vital-signs profile and Synthea's lab panels use; none of them is in the project's value sets.
"""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import Iterator
from typing import Any

from tests import factories as f

Json = dict[str, Any]

CVX = "http://hl7.org/fhir/sid/cvx"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CLAIM_TYPE = "http://terminology.hl7.org/CodeSystem/claim-type"
ADJUDICATION = "https://bluebutton.cms.gov/resources/codesystem/adjudication"
BB_VARIABLES = "https://bluebutton.cms.gov/resources/variables"
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition"

# (LOINC, display, unit, low, high): vital signs as the FHIR vital-signs profile codes them.
VITALS = [
    ("8302-2", "Body Height", "cm", 150.0, 190.0),
    ("29463-7", "Body Weight", "kg", 55.0, 95.0),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 19.0, 31.0),
    ("8867-4", "Heart rate", "/min", 55.0, 95.0),
    ("9279-1", "Respiratory rate", "/min", 12.0, 18.0),
    ("8310-5", "Body temperature", "Cel", 36.2, 37.4),
]
# Basic metabolic panel members as Synthea writes them.
METABOLIC = [
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 70.0, 110.0),
    ("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", 7.0, 20.0),
    ("38483-4", "Creatinine [Mass/volume] in Blood", "mg/dL", 0.6, 1.2),
    ("49765-1", "Calcium [Mass/volume] in Blood", "mg/dL", 8.6, 10.3),
    ("2947-0", "Sodium [Moles/volume] in Blood", "mmol/L", 136.0, 145.0),
    ("6298-4", "Potassium [Moles/volume] in Blood", "mmol/L", 3.5, 5.1),
    ("2069-3", "Chloride [Moles/volume] in Blood", "mmol/L", 98.0, 107.0),
    ("20565-8", "Carbon dioxide, total [Moles/volume] in Blood", "mmol/L", 22.0, 29.0),
]
ENCOUNTER_TYPES = [
    ("185349003", "Encounter for check up (procedure)"),
    ("162673000", "General examination of patient (procedure)"),
    ("185345009", "Encounter for symptom (procedure)"),
]
NOISE_CONDITIONS = [
    ("444814009", "Viral sinusitis (disorder)"),
    ("195662009", "Acute viral pharyngitis (disorder)"),
    ("10509002", "Acute bronchitis (disorder)"),
]
NOTE = (
    "Patient is a 75 year-old male. History of present illness: routine visit.\n"
    "Social history: never smoked. Allergies: none known. Medications: reviewed.\n"
    "Assessment and plan: continue current care; follow up in one year.\n"
) * 6


class _Maker:
    """Deterministic ids, dates and values for one generated record."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def day(self, first_year: int, last_year: int) -> str:
        year = self.rng.randint(first_year, last_year)
        return f"{year}-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d}"

    def value(self, low: float, high: float) -> float:
        return round(self.rng.uniform(low, high), 1)


def _coding(system: str, code: str, display: str) -> Json:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _money(value: float) -> Json:
    return {"value": round(value, 2), "currency": "USD"}


def synthea_patient(m: _Maker) -> Json:
    """A Patient with the US Core extensions and identifiers Synthea writes."""
    pid = m.uuid()
    race = {
        "url": f"{US_CORE}/us-core-race",
        "extension": [
            {
                "url": "ombCategory",
                "valueCoding": {
                    "system": "urn:oid:2.16.840.1.113883.6.238",
                    "code": "2106-3",
                    "display": "White",
                },
            },
            {"url": "text", "valueString": "White"},
        ],
    }
    ethnicity = {
        "url": f"{US_CORE}/us-core-ethnicity",
        "extension": [
            {
                "url": "ombCategory",
                "valueCoding": {
                    "system": "urn:oid:2.16.840.1.113883.6.238",
                    "code": "2186-5",
                    "display": "Not Hispanic or Latino",
                },
            },
            {"url": "text", "valueString": "Not Hispanic or Latino"},
        ],
    }
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"profile": [f"{US_CORE}/us-core-patient"]},
        "text": {
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">'
            "Generated by a Synthea-shaped test generator</div>",
        },
        "extension": [
            race,
            ethnicity,
            {"url": f"{US_CORE}/us-core-birthsex", "valueCode": "M"},
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                "valueAddress": {"city": "Springfield", "state": "MA", "country": "US"},
            },
        ],
        "identifier": [
            {"system": "https://github.com/synthetichealth/synthea", "value": pid},
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "MR",
                            "display": "Medical Record Number",
                        }
                    ],
                    "text": "Medical Record Number",
                },
                "system": "http://hospital.smarthealthit.org",
                "value": pid,
            },
        ],
        "name": [{"use": "official", "family": "Doe", "given": ["John"], "prefix": ["Mr."]}],
        "telecom": [{"system": "phone", "value": "555-010-0000", "use": "home"}],
        "gender": "male",
        "birthDate": "1940-06-15",
        "address": [
            {
                "line": ["1 Main Street"],
                "city": "Springfield",
                "state": "MA",
                "postalCode": "01101",
                "country": "US",
            }
        ],
        "maritalStatus": _coding(
            "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "M", "Married"
        ),
        "multipleBirthBoolean": False,
        "communication": [
            {"language": _coding("urn:ietf:bcp:47", "en-US", "English (United States)")}
        ],
    }


def relevant(p: Json) -> list[Json]:
    """What the rules read, in every shape the input filter must keep (the seed case and more).

    Panel members and report results have no subject: they are reached by reference only.
    """
    out = list(f.seed_case()[1:])  # IIM, dysphagia, smoking, CK, 15 antibodies
    for res in out:
        res["subject"] = f.ref(p)
    # A text-only Mi-2 result (lab-local code, no LOINC) and a line blot with components.
    out.append(
        f.observation(
            p,
            {"coding": [{"system": f.LOCAL_LAB, "code": "X-17"}], "text": "Anti-Mi-2 Ab"},
            effective="2015-10-22",
            valueString="negative",
        )
    )
    out.append(
        f.observation(
            p,
            {"text": "Myositis line blot"},
            effective="2015-10-22",
            component=[
                {"code": {"text": "MDA5"}, "valueString": "negative"},
                {"code": {"text": "NXP-2"}, "valueString": "negative"},
            ],
        )
    )
    # An antibody result no value set knows (reported as not recognised).
    out.append(f.observation(p, {"text": "Histone Ab"}, valueString="negative"))
    # A panel whose members (one noise-coded) are reached through hasMember only.
    member = f.observation(
        None, f.concept(f.LOCAL_LAB, "MYO-SAE1"), effective="2015-10-22", valueString="negative"
    )
    other = f.observation(None, {"text": "Specimen comment"}, valueString="haemolysed")
    out.append(
        f.observation(
            p,
            {"text": "Myositis panel"},
            effective="2015-10-22",
            hasMember=[f.ref(member), f.ref(other)],
        )
    )
    out += [member, other]
    # A DiagnosticReport whose result has no subject.
    result = f.observation(
        None, f.concept(f.LOINC, f.ANTIBODY_LOINC["hmgcr"]), valueString="negative"
    )
    out.append(
        {
            "resourceType": "DiagnosticReport",
            "id": "dr-myositis",
            "status": "final",
            "code": {"text": "Myositis antibody report"},
            "subject": f.ref(p),
            "effectiveDateTime": "2015-10-22",
            "result": [f.ref(result)],
        }
    )
    out.append(result)
    out.append(f.ck(p, 900, effective="2015-11-20"))
    out.append(f.medication(p, "prednisone 5 MG Oral Tablet"))
    out.append(
        {
            "resourceType": "Procedure",
            "id": "proc-colonoscopy",
            "status": "completed",
            "code": f.concept(f.SCT, "73761001", "Colonoscopy (procedure)"),
            "subject": f.ref(p),
            "performedDateTime": "2015-08-01",
        }
    )
    return out


def _observation(
    m: _Maker, subject: Json, enc: str, day: str, item: tuple[Any, ...], *, category: str
) -> Json:
    code, display, unit, low, high = item
    return {
        "resourceType": "Observation",
        "id": m.uuid(),
        "meta": {"profile": [f"{US_CORE}/us-core-observation-lab"]},
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": category}]}],
        "code": _coding(f.LOINC, code, display),
        "subject": subject,
        "encounter": {"reference": f"urn:uuid:{enc}"},
        "effectiveDateTime": f"{day}T09:30:00-05:00",
        "issued": f"{day}T09:30:00.000-05:00",
        "valueQuantity": {"value": m.value(low, high), "unit": unit, "system": UCUM, "code": unit},
    }


def _blood_pressure(m: _Maker, subject: Json, enc: str, day: str) -> Json:
    obs = _observation(
        m, subject, enc, day, ("85354-9", "Blood pressure panel", "", 0, 0), category="vital-signs"
    )
    del obs["valueQuantity"]
    obs["component"] = [
        {
            "code": _coding(f.LOINC, code, display),
            "valueQuantity": {
                "value": m.value(low, high),
                "unit": "mm[Hg]",
                "system": UCUM,
                "code": "mm[Hg]",
            },
        }
        for code, display, low, high in [
            ("8480-6", "Systolic blood pressure", 105.0, 140.0),
            ("8462-4", "Diastolic blood pressure", 65.0, 90.0),
        ]
    ]
    return obs


def _adjudication(m: _Maker, amount: float) -> list[Json]:
    parts = [
        ("line_coinsrnc_amt", "Line Beneficiary Coinsurance Amount", 0.2),
        ("line_prvdr_pmt_amt", "Line Provider Payment Amount", 0.8),
        ("line_sbmtd_chrg_amt", "Line Submitted Charge Amount", 1.0),
        ("line_alowd_chrg_amt", "Line Allowed Charge Amount", 1.0),
        ("line_bene_ptb_ddctbl_amt", "Line Beneficiary Part B Deductible Amount", 0.0),
        ("line_prcsg_ind_cd", "Line Processing Indicator Code", None),
    ]
    out = []
    for name, display, share in parts:
        entry: Json = {
            "category": {
                "coding": [
                    {"system": ADJUDICATION, "code": f"{BB_VARIABLES}/{name}", "display": display}
                ]
            }
        }
        if share is None:
            entry["reason"] = {
                "coding": [{"system": f"{BB_VARIABLES}/{name}", "code": "A", "display": "Allowed"}]
            }
        else:
            entry["amount"] = _money(amount * share)
        out.append(entry)
    return out


def _claim_and_eob(
    m: _Maker, subject: Json, enc: str, day: str, services: list[Json]
) -> list[Json]:
    """A Claim and its ExplanationOfBenefit, one item per service, as Synthea bills them."""
    claim_id = m.uuid()
    period = {"start": f"{day}T09:00:00-05:00", "end": f"{day}T09:45:00-05:00"}
    items: list[Json] = [
        {
            "sequence": n + 1,
            "productOrService": service,
            "encounter": [{"reference": f"urn:uuid:{enc}"}],
            "net": _money(m.value(50, 300)),
        }
        for n, service in enumerate(services)
    ]
    claim: Json = {
        "resourceType": "Claim",
        "id": claim_id,
        "status": "active",
        "type": {"coding": [{"system": CLAIM_TYPE, "code": "professional"}]},
        "use": "claim",
        "patient": subject,
        "billablePeriod": period,
        "created": period["end"],
        "provider": {"display": "Springfield Medical Group"},
        "priority": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/processpriority",
                    "code": "normal",
                }
            ]
        },
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "Medicare"}}],
        "item": items,
        "total": _money(sum(i["net"]["value"] for i in items)),
    }
    eob_items = []
    for item in items:
        eob_item = dict(item)
        eob_item.update(
            {
                "category": {
                    "coding": [
                        {
                            "system": f"{BB_VARIABLES}/line_cms_type_srvc_cd",
                            "code": "1",
                            "display": "Medical care",
                        }
                    ]
                },
                "servicedPeriod": period,
                "locationCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/ex-serviceplace",
                            "code": "19",
                            "display": "Off Campus-Outpatient Hospital",
                        }
                    ]
                },
                "adjudication": _adjudication(m, item["net"]["value"]),
            }
        )
        eob_items.append(eob_item)
    eob = {
        "resourceType": "ExplanationOfBenefit",
        "id": m.uuid(),
        "contained": [
            {
                "resourceType": "Coverage",
                "id": "coverage",
                "status": "active",
                "type": {"text": "Medicare"},
                "beneficiary": subject,
                "payor": [{"display": "Medicare"}],
            },
        ],
        "identifier": [{"system": f"{BB_VARIABLES}/clm_id", "value": claim_id}],
        "status": "active",
        "type": {"coding": [{"system": CLAIM_TYPE, "code": "professional"}]},
        "use": "claim",
        "patient": subject,
        "billablePeriod": period,
        "created": period["end"],
        "insurer": {"display": "Medicare"},
        "provider": {"display": "Springfield Medical Group"},
        "claim": {"reference": f"urn:uuid:{claim_id}"},
        "outcome": "complete",
        "insurance": [
            {"focal": True, "coverage": {"reference": "#coverage", "display": "Medicare"}}
        ],
        "item": eob_items,
        "total": [
            {
                "category": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/adjudication",
                            "code": "submitted",
                            "display": "Submitted Amount",
                        }
                    ]
                },
                "amount": claim["total"],
            }
        ],
        "payment": {"amount": _money(claim["total"]["value"] * 0.8)},
    }
    return [claim, eob]


def _encounter(m: _Maker, subject: Json, *, conditions: bool) -> Iterator[Json]:
    """One visit as Synthea writes it: the Encounter and what happened during it."""
    enc = m.uuid()
    day = m.day(2005, 2015)
    code, display = ENCOUNTER_TYPES[m.rng.randrange(len(ENCOUNTER_TYPES))]
    yield {
        "resourceType": "Encounter",
        "id": enc,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [_coding(f.SCT, code, display)],
        "subject": subject,
        "participant": [{"individual": {"display": "Dr. Jane Smith"}}],
        "period": {"start": f"{day}T09:00:00-05:00", "end": f"{day}T09:45:00-05:00"},
        "serviceProvider": {"display": "Springfield Medical Group"},
    }
    services = [_coding(f.SCT, code, display)]
    if m.rng.random() < 0.5:
        for item in VITALS:
            yield _observation(m, subject, enc, day, item, category="vital-signs")
        yield _blood_pressure(m, subject, enc, day)
    if m.rng.random() < 0.4:
        procedure = _coding(f.SCT, "430193006", "Medication Reconciliation (procedure)")
        services.append(procedure)
        yield {
            "resourceType": "Procedure",
            "id": m.uuid(),
            "status": "completed",
            "code": procedure,
            "subject": subject,
            "encounter": {"reference": f"urn:uuid:{enc}"},
            "performedPeriod": {"start": f"{day}T09:10:00-05:00", "end": f"{day}T09:25:00-05:00"},
        }
    if m.rng.random() < 0.2:
        medication = _coding(RXNORM, "314076", "lisinopril 10 MG Oral Tablet")
        services.append(medication)
        yield {
            "resourceType": "MedicationRequest",
            "id": m.uuid(),
            "status": "stopped",
            "intent": "order",
            "medicationCodeableConcept": medication,
            "subject": subject,
            "encounter": {"reference": f"urn:uuid:{enc}"},
            "authoredOn": f"{day}T09:30:00-05:00",
            "dosageInstruction": [
                {
                    "sequence": 1,
                    "asNeededBoolean": False,
                    "timing": {"repeat": {"frequency": 1, "period": 1.0, "periodUnit": "d"}},
                }
            ],
        }
    if m.rng.random() < 0.4:
        members = [
            _observation(m, subject, enc, day, item, category="laboratory") for item in METABOLIC
        ]
        yield {
            "resourceType": "DiagnosticReport",
            "id": m.uuid(),
            "status": "final",
            "category": [
                {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}
                    ]
                }
            ],
            "code": _coding(f.LOINC, "51990-0", "Basic metabolic panel - Blood"),
            "subject": subject,
            "encounter": {"reference": f"urn:uuid:{enc}"},
            "effectiveDateTime": f"{day}T09:30:00-05:00",
            "result": [{"reference": f"urn:uuid:{o['id']}"} for o in members],
        }
        yield from members
    if m.rng.random() < 0.3:
        vaccine = _coding(CVX, "140", "Influenza, seasonal, injectable, preservative free")
        services.append(vaccine)
        yield {
            "resourceType": "Immunization",
            "id": m.uuid(),
            "status": "completed",
            "vaccineCode": vaccine,
            "patient": subject,
            "encounter": {"reference": f"urn:uuid:{enc}"},
            "occurrenceDateTime": f"{day}T09:30:00-05:00",
            "primarySource": True,
        }
    if conditions and m.rng.random() < 0.15:
        code, display = NOISE_CONDITIONS[m.rng.randrange(len(NOISE_CONDITIONS))]
        yield {
            "resourceType": "Condition",
            "id": m.uuid(),
            "clinicalStatus": f.concept(
                "http://terminology.hl7.org/CodeSystem/condition-clinical", "resolved"
            ),
            "code": _coding(f.SCT, code, display),
            "subject": subject,
            "encounter": {"reference": f"urn:uuid:{enc}"},
            "onsetDateTime": f"{day}T09:30:00-05:00",
            "abatementDateTime": f"{day}T09:30:00-05:00",
        }
    note = base64.b64encode(NOTE.encode()).decode()
    yield {
        "resourceType": "DocumentReference",
        "id": m.uuid(),
        "status": "current",
        "type": {
            "coding": [
                {"system": f.LOINC, "code": "34117-2", "display": "History and physical note"}
            ]
        },
        "subject": subject,
        "date": f"{day}T09:45:00.000-05:00",
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "data": note}}],
        "context": {"encounter": [{"reference": f"urn:uuid:{enc}"}]},
    }
    yield from _claim_and_eob(m, subject, enc, day, services)


def _care_team(m: _Maker, subject: Json) -> Json:
    return {
        "resourceType": "CareTeam",
        "id": m.uuid(),
        "status": "inactive",
        "subject": subject,
        "participant": [
            {
                "role": [_coding(f.SCT, "116154003", "Patient (person)")],
                "member": {"display": "Dr. Jane Smith"},
            }
        ],
        "managingOrganization": [{"display": "Springfield Medical Group"}],
    }


def _entry(resource: Json) -> Json:
    """Synthea's entry shape: urn:uuid fullUrls, POSTed; the factories' resources keep theirs."""
    rid = resource["id"]
    url = (
        f"urn:uuid:{rid}"
        if len(rid) == 36
        else f"http://example.org/fhir/{resource['resourceType']}/{rid}"
    )
    return {
        "fullUrl": url,
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }


def record(
    entries: int, *, seed: int = 0, with_rules_data: bool = True, noise_conditions: bool = True
) -> Json:
    """A transaction Bundle of exactly `entries` entries shaped like a Synthea record.

    with_rules_data=False leaves out what the rules read (a record of noise around a Patient);
    noise_conditions=False leaves out the unrelated Conditions (which the rules do read).
    """
    m = _Maker(seed)
    patient = synthea_patient(m)
    subject = {"reference": f"urn:uuid:{patient['id']}"}
    resources = [patient]
    if with_rules_data:
        resources += relevant(patient)
    while len(resources) < entries:
        resources.extend(_encounter(m, subject, conditions=noise_conditions))
        if len(resources) % 10 == 0:
            resources.append(_care_team(m, subject))
    # Trim to the exact size without cutting a lab report from its results.
    out = resources[:entries]
    kept = {r["id"] for r in out}
    for res in out:
        if "result" in res and res["resourceType"] == "DiagnosticReport":
            res["result"] = [
                ref
                for ref in res["result"]
                if ref["reference"].split(":")[-1] in kept
                or not ref["reference"].startswith("urn:uuid:")
            ] or None
            if res["result"] is None:
                del res["result"]
    return {"resourceType": "Bundle", "type": "transaction", "entry": [_entry(r) for r in out]}
