"""Demo: start a local HAPI FHIR server, load synthetic patients, assess and write back.

Runs the real service (the Flask app, in process) against a real HAPI FHIR JPA server that
this script builds with Maven and starts on a free loopback port; no Docker, no internet beyond
Maven Central. Usage: python -m tools.demo [--keep-running]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import requests
from fhir.resources.R4B import get_fhir_model_class

from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.web.app import create_app
from fhir_dm.web.settings import Settings
from fhir_dm.web.trust import TrustConfig
from tools.hapi_server import HapiServer

Json = dict[str, Any]
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
POSITIVE = {
    "coding": [{"system": SCT, "code": "10828004", "display": "Positive (qualifier value)"}]
}
NEGATIVE = {
    "coding": [{"system": SCT, "code": "260385009", "display": "Negative (qualifier value)"}]
}
ANTIBODIES = {"tif1g": "107562-1", "nxp2": "105528-4", "sae1": "101220-2", "mda5": "82424-3"}


def _valid(resource: Json) -> Json:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


class DemoPatient:
    """One synthetic patient, with dates relative to today so the demo never ages out."""

    def __init__(self, pid: str, label: str, gender: str, age: int, today: date) -> None:
        self.pid, self.label, self.today = pid, label, today
        self.onset = today - timedelta(days=60)
        birth = self.onset.replace(year=self.onset.year - age) - timedelta(days=30)
        self.resources: list[Json] = [
            _valid(
                {
                    "resourceType": "Patient",
                    "id": pid,
                    "gender": gender,
                    "birthDate": birth.isoformat(),
                    "identifier": [{"system": "urn:demo:mrn", "value": pid}],
                }
            )
        ]
        self._n = 0

    def _id(self) -> str:
        self._n += 1
        return f"{self.pid}-{self._n}"

    def condition(
        self, system: str, code: str, display: str, *, onset: bool = False
    ) -> DemoPatient:
        res: Json = {
            "resourceType": "Condition",
            "id": self._id(),
            "subject": {"reference": f"Patient/{self.pid}"},
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "active",
                    }
                ]
            },
            "code": {"coding": [{"system": system, "code": code, "display": display}]},
            "recordedDate": (self.today - timedelta(days=20)).isoformat(),
        }
        if onset:
            res["onsetDateTime"] = self.onset.isoformat()
        self.resources.append(_valid(res))
        return self

    def observation(self, code: str, **value: Any) -> DemoPatient:
        res: Json = {
            "resourceType": "Observation",
            "id": self._id(),
            "status": "final",
            "subject": {"reference": f"Patient/{self.pid}"},
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "effectiveDateTime": (self.today - timedelta(days=15)).isoformat(),
            **value,
        }
        self.resources.append(_valid(res))
        return self

    def antibodies(self, positive: tuple[str, ...], negative: tuple[str, ...] = ()) -> DemoPatient:
        for name in positive:
            self.observation(ANTIBODIES[name], valueCodeableConcept=POSITIVE)
        for name in negative:
            self.observation(ANTIBODIES[name], valueCodeableConcept=NEGATIVE)
        return self


def demo_patients(today: date) -> list[DemoPatient]:
    """Six patients covering every kind of outcome."""
    dm = (SCT, "396230008", "Dermatomyositis (disorder)")
    return [
        DemoPatient(
            "demo-seed", "75-year-old man, TIF1-gamma+, dysphagia, heavy smoker", "male", 75, today
        )
        .condition(*dm, onset=True)
        .condition(SCT, "40739000", "Dysphagia (disorder)")
        .observation(
            "72166-2", valueCodeableConcept={"coding": [{"system": SCT, "code": "428071000124103"}]}
        )
        .observation(
            "2157-6",
            valueQuantity={
                "value": 15242,
                "unit": "IU/L",
                "system": "http://unitsofmeasure.org",
                "code": "[IU]/L",
            },
        )
        .antibodies(("tif1g",), ("nxp2", "sae1", "mda5")),
        DemoPatient(
            "demo-38f", "38-year-old woman with DM, antibodies not yet tested", "female", 38, today
        ).condition(*dm, onset=True),
        DemoPatient("demo-mda5", "52-year-old woman, anti-MDA5+ DM with ILD", "female", 52, today)
        .condition(*dm, onset=True)
        .condition(SCT, "233703007", "Interstitial lung disease (disorder)")
        .antibodies(("mda5",), ("tif1g", "nxp2", "sae1")),
        DemoPatient(
            "demo-pm", "30-year-old man, polymyositis, antibodies negative", "male", 30, today
        )
        .condition(SCT, "31384009", "Polymyositis (disorder)", onset=True)
        .antibodies((), ("tif1g", "nxp2", "sae1")),
        DemoPatient("demo-jdm", "12-year-old with juvenile DM", "male", 12, today).condition(
            ICD10CM, "M33.02", "Juvenile dermatomyositis with myopathy", onset=True
        ),
        DemoPatient(
            "demo-ibm", "70-year-old with inclusion body myositis", "male", 70, today
        ).condition(SCT, "72315009", "Inclusion body myositis (disorder)", onset=True),
    ]


def load(base_url: str, patients: list[DemoPatient]) -> None:
    """PUT every demo resource in one transaction, as an EHR would hold them."""
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for p in patients
        for r in p.resources
    ]
    response = requests.post(
        base_url,
        json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
        headers={"Content-Type": "application/fhir+json"},
        timeout=120,
    )
    response.raise_for_status()


def run(base_url: str, today: date) -> int:
    patients = demo_patients(today)
    load(base_url, patients)
    settings = Settings(
        fhir=FhirServerConfig(base_url=base_url), trust=TrustConfig(mode="off"), log_level="WARNING"
    )
    client = create_app(settings).test_client()
    print(f"\nLoaded {len(patients)} synthetic patients into {base_url}; assessing on {today}.\n")
    failures = 0
    for attempt in ("first run", "re-run"):
        print(f"--- {attempt} ---")
        for p in patients:
            started = time.perf_counter()
            response = client.post(f"/Patient/{p.pid}/$dm-cancer-screening?now={today.isoformat()}")
            ms = (time.perf_counter() - started) * 1000
            body = response.get_json()
            if response.status_code != 200:
                failures += 1
                print(
                    f"{p.pid}: HTTP {response.status_code}: {body['issue'][0].get('diagnostics')}"
                )
                continue
            summary = body["entry"][0]["resource"]["issue"][0]["diagnostics"]
            plans = [
                e["fullUrl"]
                for e in body["entry"][1:]
                if e["resource"]["resourceType"] == "CarePlan"
            ]
            where = plans[0] if plans and not plans[0].startswith("urn:") else "(as before)"
            print(f"{p.label}\n    {summary}\n    CarePlan: {where if plans else '(none)'}")
            print(f"    [{ms:.0f} ms]")
        print()
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep-running", action="store_true", help="leave HAPI running; Ctrl-C stops it"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    print("Building (first time only) and starting the local HAPI FHIR server ...", flush=True)
    with HapiServer() as server:
        base_url = server.start()
        print(f"HAPI FHIR ready at {base_url} after {time.perf_counter() - started:.0f} s")
        code = run(base_url, datetime.now(UTC).date())
        print(f"Demo finished in {time.perf_counter() - started:.0f} s.")
        if args.keep_running:
            print(f"HAPI keeps running at {base_url}; press Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return code


if __name__ == "__main__":
    sys.exit(main())
