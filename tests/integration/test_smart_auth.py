"""The clinician's app with inbound trust ON, through a real SMART authorization server.

`oidc-provider` (npm, tests/smart_auth/) plays the EHR's authorization server: SMART v2 scopes,
an EHR launch whose `launch` names the patient, JWT access tokens (RS384, `aud` = the FHIR
endpoint) for one app client and opaque, short-lived ones (checked by RFC 7662 introspection)
for another. The FHIR endpoint the app is launched with (`iss`) is the authorization server's
`/fhir`, where it serves the `.well-known/smart-configuration`; the service reads and writes the
local HAPI and is told where that smart-configuration is (`trust.smart.smart_configuration_url`)
and that `iss` is the tokens' audience. Headless Chromium logs in on the server's own login form.

Two services run under gunicorn: one as deployed by default (patient reads and writes plus
`user/*.rs`), one asking only for `patient/*.rs` (a patient-scoped, read-only token).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import requests

from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.load import load_knowledge
from tests import factories as f
from tests.integration.records import store
from tests.smart_auth_server import SmartApp, SmartAuthServer, launch_id
from tools.hapi_server import free_port

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.integration

NOW = "2024-09-15"
START_TIMEOUT_S = 60.0
WAIT_S = 60.0
NAVIGATING = (StaleElementReferenceException, NoSuchElementException)
# What the EHR lets these apps have (the resource server's scopes at the authorization server).
EHR_SCOPES = (
    "patient/*.rs patient/RiskAssessment.c patient/CarePlan.cu patient/ServiceRequest.cu"
    " patient/Provenance.c user/*.rs"
)
PATIENT_READ_ONLY = "launch/patient openid fhirUser patient/*.rs"
# The opaque tokens' lifetime: long enough for one launch and one call on a slow machine.
SHORT_TTL_S = 45
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@dataclass(frozen=True)
class Deployment:
    auth: SmartAuthServer
    full: str  # the service with the default scopes (JWT access tokens)
    patient_only: str  # the service asking for patient/*.rs only (opaque tokens)


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "4"]
    command += ["-b", f"127.0.0.1:{port}", "fhir_dm.web.wsgi:app"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return process
        except requests.RequestException:
            pass  # not listening yet
        if process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            raise RuntimeError("gunicorn did not start:\n" + log.read_text())
        time.sleep(0.2)


@pytest.fixture(scope="module")
def deployment(
    fhir_base_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("smart")
    full_port, patient_port, auth_port = free_port(), free_port(), free_port()
    full, patient_only = (f"http://127.0.0.1:{p}" for p in (full_port, patient_port))
    auth = SmartAuthServer(
        auth_port,
        apps=[
            SmartApp("fhir-dm", f"{full}/app/"),
            SmartApp("fhir-dm-patient", f"{patient_only}/app/", "opaque", SHORT_TTL_S),
        ],
        scopes=EHR_SCOPES,
        log=tmp / "auth.log",
        secret=secrets.token_urlsafe(32),
    )
    auth.start()
    common = {
        **os.environ,
        "FHIR_DM_FHIR__BASE_URL": fhir_base_url,
        "FHIR_DM_TRUST__MODE": "smart",
        "FHIR_DM_TRUST__SMART__SMART_CONFIGURATION_URL": auth.smart_configuration_url,
        "FHIR_DM_TRUST__SMART__AUDIENCES": f'["{auth.iss}"]',
        # The app's browser talks to the EHR's FHIR endpoint and token endpoint (another origin).
        "FHIR_DM_APP_CONNECT_ORIGINS": json.dumps([_origin(auth.iss)]),
        "FHIR_DM_LOG_LEVEL": "WARNING",
    }
    processes = []
    try:
        processes.append(
            _serve(
                {
                    **common,
                    "FHIR_DM_PUBLIC_BASE_URL": full,
                    "FHIR_DM_LOCK_DIR": str(tmp / "locks"),
                },
                full_port,
                tmp / "full.log",
            )
        )
        processes.append(
            _serve(
                {
                    **common,
                    "FHIR_DM_PUBLIC_BASE_URL": patient_only,
                    "FHIR_DM_LOCK_DIR": str(tmp / "locks"),
                    "FHIR_DM_SMART_CLIENT_ID": "fhir-dm-patient",
                    "FHIR_DM_SMART_SCOPE": PATIENT_READ_ONLY,
                    "FHIR_DM_TRUST__SMART__LEEWAY_SECONDS": "0",
                    "FHIR_DM_TRUST__SMART__INTROSPECTION__CLIENT_ID": auth.introspection_client,
                    "FHIR_DM_TRUST__SMART__INTROSPECTION__CLIENT_SECRET": (
                        auth.introspection_secret
                    ),
                },
                patient_port,
                tmp / "patient.log",
            )
        )
        yield Deployment(auth, full, patient_only)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        auth.stop()


def _high_risk(hapi: FhirClient) -> str:
    """A woman of 54 with DM and anti-TIF1-gamma (ids start with "0": the clinic keeps her)."""
    pid = f"0smart-{uuid.uuid4().hex[:10]}"
    p = f.patient(pid, birth_date="1970-01-01", name=[{"given": ["Ada"], "family": pid}])
    load_knowledge()
    store(hapi, p, f.iim_condition(p, id=f"{pid}-dm"), f.antibody(p, "tif1g", id=f"{pid}-ab"))
    return pid


def _settled(driver: Any) -> bool:
    """Log in and consent on the authorization server's pages; True once an app page settled."""
    logins = driver.find_elements(By.CSS_SELECTOR, "input[name=login]")
    if logins:
        logins[0].send_keys("dr-smart")
        driver.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys("any")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        return False
    consent = driver.find_elements(By.CSS_SELECTOR, "form input[name=prompt][value=consent]")
    if consent:
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        return False
    if not driver.find_elements(By.ID, "status"):
        return False
    loaded = driver.execute_script("return document.body.dataset.loaded") == "true"
    return loaded or "could not" in driver.find_element(By.ID, "status").text


def _wait(browser: Any) -> None:
    WebDriverWait(browser, WAIT_S, ignored_exceptions=NAVIGATING).until(_settled)


def _launch(browser: Any, service: str, auth: SmartAuthServer, pid: str) -> None:
    """An EHR launch of the app on `pid`: `iss` and a `launch` naming the patient."""
    query = f"iss={quote(auth.iss, safe='')}&launch={launch_id(pid)}&now={NOW}"
    browser.get(f"{service}/app/launch?{query}")
    _wait(browser)


def _loaded(browser: Any) -> bool:
    return bool(browser.execute_script("return document.body.dataset.loaded") == "true")


def _token_problem(browser: Any) -> tuple[str, str, str]:
    """The refused-token notice: its HTTP status, text, and the re-launch link."""
    box = browser.find_element(By.ID, "token-problem")
    assert box.is_displayed()
    link = box.find_element(By.ID, "relaunch").get_attribute("href")
    return box.get_attribute("data-status"), box.text, link


def _plans(hapi: FhirClient, pid: str) -> list[Any]:
    found = hapi.search("CarePlan", {"subject": f"Patient/{pid}"})
    return [p for p in found if p.get("status") == "active"]


def test_launch_view_write_and_clinic_through_the_authorization_server(
    browser: Any, deployment: Deployment, hapi: FhirClient
) -> None:
    pid = _high_risk(hapi)
    _launch(browser, deployment.full, deployment.auth, pid)
    assert _loaded(browser), browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "tier").text == "High risk"
    assert pid in browser.find_element(By.ID, "patient").text  # the launch's patient, by name

    browser.find_element(By.ID, "write").click()
    WebDriverWait(browser, WAIT_S, ignored_exceptions=NAVIGATING).until(
        lambda d: d.find_element(By.ID, "write-result").text.startswith(("Written", "Not"))
    )
    assert "; written" in browser.find_element(By.ID, "write-result").text
    assert len(_plans(hapi, pid)) == 1

    browser.find_element(By.ID, "to-clinic").click()
    WebDriverWait(browser, WAIT_S * 2, ignored_exceptions=NAVIGATING).until(
        lambda d: d.find_elements(By.ID, "patients") and _settled(d)
    )
    assert _loaded(browser), browser.find_element(By.ID, "status").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#patients tbody tr.patient-row")
    assert f"Patient/{pid}" in {r.get_attribute("data-patient") for r in rows}
    assert not browser.find_elements(By.ID, "token-problem")


def test_a_patient_scoped_read_only_token_reaches_its_patient_only_and_never_writes(
    browser: Any, deployment: Deployment, hapi: FhirClient
) -> None:
    own, other = _high_risk(hapi), _high_risk(hapi)
    service = deployment.patient_only
    _launch(browser, service, deployment.auth, own)
    assert _loaded(browser), browser.find_element(By.ID, "status").text  # introspected

    # The page for another patient, under the token for `own`.
    browser.get(f"{service}/app/?patient={other}")
    _wait(browser)
    assert not _loaded(browser)
    status, text, relaunch = _token_problem(browser)
    assert status == "403" and "another patient" in text
    assert relaunch.startswith(f"{service}/app/launch?iss=")

    # The write button of its own patient: refused, naming the write scopes it lacks.
    _launch(browser, service, deployment.auth, own)
    assert _loaded(browser)
    browser.find_element(By.ID, "write").click()
    WebDriverWait(browser, WAIT_S, ignored_exceptions=NAVIGATING).until(
        lambda d: d.find_element(By.ID, "write-result").text.startswith(("Written", "Not"))
    )
    result = browser.find_element(By.ID, "write-result").text
    assert result.startswith("Not written") and "patient/CarePlan.cu" in result
    assert _token_problem(browser)[0] == "403"

    # The clinic page: every IIM patient, never for a patient-scoped token.
    _launch(browser, service, deployment.auth, own)
    browser.get(f"{service}/app/clinic")
    _wait(browser)
    assert not _loaded(browser)
    status, text, _ = _token_problem(browser)
    assert status == "403" and "user-level" in text
    assert _plans(hapi, own) == [] and _plans(hapi, other) == []


def test_an_expired_token_says_so_and_offers_a_relaunch(
    browser: Any, deployment: Deployment, hapi: FhirClient
) -> None:
    pid = _high_risk(hapi)
    service = deployment.patient_only
    _launch(browser, service, deployment.auth, pid)
    assert _loaded(browser), browser.find_element(By.ID, "status").text

    def expired(driver: Any) -> bool:
        driver.refresh()  # the page asks the service again with the same (ageing) token
        _wait(driver)
        boxes = driver.find_elements(By.ID, "token-problem")
        return bool(boxes) and boxes[0].get_attribute("data-status") == "401"

    WebDriverWait(browser, SHORT_TTL_S * 4, poll_frequency=5, ignored_exceptions=NAVIGATING).until(
        expired
    )
    status, text, relaunch = _token_problem(browser)
    assert status == "401" and "expired or was not accepted" in text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "smart-expired-token.png"))
    # The link launches the app again against the same FHIR endpoint: the EHR's sign-in.
    assert quote(deployment.auth.iss, safe="") in relaunch
    browser.get(relaunch)
    WebDriverWait(browser, WAIT_S, ignored_exceptions=NAVIGATING).until(
        lambda d: d.current_url.startswith(deployment.auth.issuer) or _settled(d)
    )


def _origin(url: str) -> str:
    """scheme://host:port of a URL, as a CSP source names it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
