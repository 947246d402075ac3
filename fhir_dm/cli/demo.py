"""`fhir-dm demo`: load synthetic patients into a FHIR server, assess and write back, twice.

Runs the real service (the Flask app, in process) against a real FHIR server: the one named by
`--fhir-base-url` (for example the HAPI of docker-compose.yml), or else a local HAPI FHIR JPA
server that a clone of the repository builds with Maven (`hapi/`, `tools/hapi_server.py`) and
starts on a free loopback port. The second run shows that nothing changes.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import requests
import yaml
from fhir.resources.R4B import get_fhir_model_class
from flask import Flask
from werkzeug.serving import make_server

from fhir_dm.common.errors import FhirDmError
from fhir_dm.fhir.client import FhirClient, check_fhir_base
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.web.app import create_app
from fhir_dm.web.settings import Settings
from fhir_dm.web.trust import TrustConfig

Json = dict[str, Any]
PATIENTS_FILE = "demo_patients.yaml"
LOAD_TIMEOUT_S = 120
ONSET_DAYS_AGO = 60
RECORDED_DAYS_AGO = 20
OBSERVED_DAYS_AGO = 15
# A clone of the repository holds these; an installed wheel does not.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
HAPI_TOOL = ("tools", "hapi_server.py")
HAPI_POM = ("hapi", "pom.xml")
CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
# HL7 v2 table 0203 "Identifier Type", code MR: a medical record number.
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
APP_HOST = "127.0.0.1"


class DemoError(FhirDmError):
    """The demo cannot run here (no FHIR server to use); the message says what to do."""


def _valid(resource: Json) -> Json:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


class DemoPatient:
    """One synthetic patient's FHIR resources, with dates relative to `today`."""

    def __init__(self, spec: Json, data: Json, today: date) -> None:
        self.pid: str = spec["id"]
        self.name: str = f"{spec['name']['given']} {spec['name']['family']}"
        self.mrn: str = spec["mrn"]
        self.label: str = f"{self.name} (MRN {self.mrn}): {spec['label']}"
        self._systems: dict[str, str] = data["systems"]
        self._today = today
        onset = today - timedelta(days=ONSET_DAYS_AGO)
        self.birth_date = birth_date(onset, int(spec["age"]), spec["birthday"])
        identifier_type = {"coding": [{"system": IDENTIFIER_TYPE, "code": "MR"}]}
        self.resources: list[Json] = [
            _valid(
                {
                    "resourceType": "Patient",
                    "id": self.pid,
                    "identifier": [
                        {
                            "use": "usual",
                            "type": {**identifier_type, "text": "Medical record number"},
                            "system": data["mrn_system"],
                            "value": self.mrn,
                        }
                    ],
                    "name": [
                        {
                            "use": "official",
                            "family": spec["name"]["family"],
                            "given": [spec["name"]["given"]],
                        }
                    ],
                    "gender": spec["gender"],
                    "birthDate": self.birth_date.isoformat(),
                }
            )
        ]
        self._n = 0
        for cond in spec.get("conditions", ()):
            self._condition(cond, onset if cond.get("onset") else None)
        for obs in spec.get("coded_observations", ()):
            self._observation(obs["code"], valueCodeableConcept=self._concept(obs["value"]))
        for obs in spec.get("quantities", ()):
            quantity = {
                "value": obs["value"],
                "unit": obs["unit"],
                "system": self._systems["ucum"],
                "code": obs["ucum"],
            }
            self._observation(obs["code"], valueQuantity=quantity)
        antibodies = spec.get("antibodies", {})
        for result in ("positive", "negative"):
            for name in antibodies.get(result, ()):
                self._observation(
                    data["antibodies"][name],
                    valueCodeableConcept=self._concept(data["results"][result]),
                )

    def _id(self) -> str:
        self._n += 1
        return f"{self.pid}-{self._n}"

    def _concept(self, coding: Json) -> Json:
        return {"coding": [{**coding, "system": self._systems[coding["system"]]}]}

    def _condition(self, spec: Json, onset: date | None) -> None:
        res: Json = {
            "resourceType": "Condition",
            "id": self._id(),
            "subject": {"reference": f"Patient/{self.pid}"},
            "clinicalStatus": {"coding": [{"system": CLINICAL_STATUS, "code": "active"}]},
            "code": self._concept({k: spec[k] for k in ("system", "code", "display")}),
            "recordedDate": (self._today - timedelta(days=RECORDED_DAYS_AGO)).isoformat(),
        }
        if onset is not None:
            res["onsetDateTime"] = onset.isoformat()
        self.resources.append(_valid(res))

    def _observation(self, code: str, **value: Any) -> None:
        res: Json = {
            "resourceType": "Observation",
            "id": self._id(),
            "status": "final",
            "subject": {"reference": f"Patient/{self.pid}"},
            "code": self._concept({"system": "loinc", "code": code}),
            "effectiveDateTime": (self._today - timedelta(days=OBSERVED_DAYS_AGO)).isoformat(),
            **value,
        }
        self.resources.append(_valid(res))


def birth_date(onset: date, age: int, birthday: str) -> date:
    """The birth date on `birthday` ("MM-DD") that makes the patient `age` at onset, exactly."""
    month, day = (int(part) for part in birthday.split("-"))
    born = date(onset.year - age, month, day)
    if (month, day) > (onset.month, onset.day):  # no birthday yet in the onset's year
        born = born.replace(year=born.year - 1)
    return born


def demo_patients(today: date) -> list[DemoPatient]:
    """The synthetic patients of demo_patients.yaml, one for each kind of outcome."""
    data = yaml.safe_load(resources.files(__package__).joinpath(PATIENTS_FILE).read_text("utf-8"))
    return [DemoPatient(spec, data, today) for spec in data["patients"]]


def load(base_url: str, patients: list[DemoPatient]) -> None:
    """PUT every demo resource in one transaction, as an EHR would hold them."""
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for p in patients
        for r in p.resources
    ]
    try:
        response = requests.post(
            base_url,
            json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
            headers={"Content-Type": "application/fhir+json"},
            timeout=LOAD_TIMEOUT_S,
        )
        response.raise_for_status()
    except requests.RequestException as exc:
        raise DemoError(
            f"cannot load the demo patients into {base_url}: {type(exc).__name__}"
        ) from None


def demo_app(base_url: str, config_dir: Path | None = None) -> Flask:
    """The service for the demo: the given FHIR server, no inbound authentication."""
    settings = Settings(
        config_dir=config_dir,
        fhir=FhirServerConfig(base_url=base_url),
        trust=TrustConfig(mode="off"),
        log_level="WARNING",
    )
    return create_app(settings)


def run(
    base_url: str, today: date, out: TextIO, config_dir: Path | None = None
) -> tuple[int, list[DemoPatient]]:
    """Load the patients, then assess each twice through the service; 1 if any call failed."""
    patients = demo_patients(today)
    load(base_url, patients)
    client = demo_app(base_url, config_dir).test_client()
    out.write(
        f"\nLoaded {len(patients)} synthetic patients into {base_url}; assessing on {today}.\n"
    )
    failures = 0
    for attempt in ("first run", "re-run"):
        out.write(f"\n--- {attempt} ---\n")
        for p in patients:
            started = time.perf_counter()
            response = client.post(f"/Patient/{p.pid}/$dm-cancer-screening?now={today.isoformat()}")
            ms = (time.perf_counter() - started) * 1000
            body = response.get_json()
            if response.status_code != 200:
                failures += 1
                detail = body["issue"][0].get("diagnostics")
                out.write(f"{p.pid}: HTTP {response.status_code}: {detail}\n")
                continue
            summary = body["entry"][0]["resource"]["issue"][0]["diagnostics"]
            plans = [
                e["fullUrl"]
                for e in body["entry"][1:]
                if e["resource"]["resourceType"] == "CarePlan"
            ]
            where = plans[0] if plans and not plans[0].startswith("urn:") else "(as before)"
            out.write(f"{p.label}\n    {summary}\n    CarePlan: {where if plans else '(none)'}\n")
            out.write(f"    [{ms:.0f} ms]\n")
    return (1 if failures else 0), patients


@contextlib.contextmanager
def serve_app(app: Flask) -> Iterator[str]:
    """Serve the service (and its SMART app) on a free loopback port; yield its base URL."""
    server = make_server(APP_HOST, 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="demo-app", daemon=True)
    thread.start()
    try:
        yield f"http://{APP_HOST}:{server.server_port}"
    finally:
        server.shutdown()


def app_links(app_url: str, base_url: str, patients: list[DemoPatient]) -> list[str]:
    """The SMART app's launch URL for each demo patient (open server: no authorisation)."""
    links = []
    for p in patients:
        query = urlencode({"fhirServiceUrl": base_url, "patientId": p.pid})
        links.append(f"{p.label}\n    {app_url}/app/launch?{query}")
    return links


@contextlib.contextmanager
def local_hapi(out: TextIO) -> Iterator[str]:
    """Build (first time only) and start the clone's local HAPI FHIR server; yield its base URL.

    The server's build lives in the repository (Maven project `hapi/`, developer tool
    `tools/hapi_server.py`), not in the wheel, so this needs a clone. Progress (the Maven
    build, then the wait for the server) goes to `out` as it happens.
    """
    if not (
        SOURCE_ROOT.joinpath(*HAPI_TOOL).is_file() and SOURCE_ROOT.joinpath(*HAPI_POM).is_file()
    ):
        raise DemoError(
            "no FHIR server to use: pass --fhir-base-url URL, or run from a clone of the"
            " repository (installed with pip install -e), which builds a local HAPI FHIR"
        )
    if str(SOURCE_ROOT) not in sys.path:
        sys.path.insert(0, str(SOURCE_ROOT))
    hapi = importlib.import_module("tools.hapi_server")
    with hapi.HapiServer(progress_out=out) as server:
        yield str(server.start())


def wait_for_interrupt() -> None:
    """Block until Ctrl-C."""
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def main(
    fhir_base_url: str | None,
    *,
    keep_running: bool = True,
    config_dir: Path | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run the demo against `fhir_base_url`, or a local HAPI started for it; the exit code.

    By default it then keeps the service (and the local HAPI) up until Ctrl-C, so that the
    printed links work; `keep_running=False` (`--no-keep-running`) ends at once and says so.
    """
    started = time.perf_counter()
    server: contextlib.AbstractContextManager[str] = (
        contextlib.nullcontext(fhir_base_url.rstrip("/")) if fhir_base_url else local_hapi(out)
    )
    with server as base_url:
        with FhirClient(base_url) as fhir:
            check_fhir_base(fhir)  # wrong path, not FHIR R4: say so before loading anything
        out.write(f"FHIR server ready at {base_url} after {time.perf_counter() - started:.0f} s\n")
        code, patients = run(base_url, datetime.now(UTC).date(), out, config_dir)
        out.write(f"\nDemo finished in {time.perf_counter() - started:.0f} s.\n")
        with serve_app(demo_app(base_url, config_dir)) as app_url:
            out.write("\nThe clinician's app (SMART on FHIR) for each demo patient:\n")
            out.write("\n".join(app_links(app_url, base_url, patients)) + "\n")
            if keep_running:
                out.write(
                    f"\nService at {app_url}, FHIR server at {base_url}. Serving until Ctrl-C;"
                    " the links stop working then.\n"
                )
                out.flush()
                wait_for_interrupt()
                out.write("\nStopped.\n")
            else:
                out.write(
                    "\nExiting now (--no-keep-running): the service and the local FHIR server"
                    " stop, so these links no longer work.\n"
                )
    return code
