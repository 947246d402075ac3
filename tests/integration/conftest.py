"""Integration fixtures: one real HAPI FHIR server per test session, with profiles/ loaded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.web.app import create_app
from fhir_dm.web.settings import Settings
from fhir_dm.web.trust import TrustConfig
from tests import server_guard

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
FHIR_JSON = "application/fhir+json"
# Terminology first, so the profiles' bindings resolve as soon as the profiles arrive.
LOAD_ORDER = ("CodeSystem", "ValueSet", "StructureDefinition")

Json = dict[str, Any]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def fhir_base_url() -> Iterator[str]:
    """Start HAPI FHIR once per session (building it if needed); fail loudly if it cannot start."""
    # Imported here, so a broken server module fails the integration tests, not collection.
    from tools.hapi_server import HapiServer

    server_guard.check("the HAPI FHIR server")
    server = HapiServer()
    try:
        base_url = server.start(timeout=START_TIMEOUT_S)
    except Exception as exc:
        server.stop()
        raise RuntimeError(f"the HAPI FHIR test server did not start: {exc}") from exc
    try:
        yield base_url.rstrip("/")
    finally:
        server.stop()


@pytest.fixture
def open_app(fhir_base_url: str, tmp_path: Path) -> Flask:
    """The web service on the test server with inbound trust off (a test's own lock dir)."""
    settings = Settings(
        fhir=FhirServerConfig(base_url=fhir_base_url),
        trust=TrustConfig(mode="off"),
        lock_dir=tmp_path / "locks",
    )
    return create_app(settings)


@pytest.fixture(scope="module")
def hapi(fhir_base_url: str) -> Iterator[FhirClient]:
    """A FHIR client of the test server, for setting up records and reading results.

    One per module, so that module-scoped fixtures (a browser session's patients) can use it.
    """
    with FhirClient(fhir_base_url) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven through its chromedriver, one per test module."""
    # Imported here, so only the browser tests need selenium.
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as ChromeService

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver")
    server_guard.check("Chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def fhir_http() -> Iterator[requests.Session]:
    """A plain HTTP session speaking FHIR JSON (for PUT and $validate, which FhirClient lacks)."""
    with requests.Session() as session:
        session.headers.update({"Accept": FHIR_JSON, "Content-Type": FHIR_JSON})
        yield session


def profile_artifacts() -> list[Json]:
    """Every artifact in profiles/, terminology first."""
    artifacts = [
        json.loads(p.read_text(encoding="utf-8")) for p in sorted(PROFILES_DIR.glob("*.json"))
    ]

    def rank(resource: Json) -> int:
        kind = resource["resourceType"]
        return LOAD_ORDER.index(kind) if kind in LOAD_ORDER else len(LOAD_ORDER)

    return sorted(artifacts, key=rank)


@pytest.fixture(scope="session")
def loaded_profiles(fhir_base_url: str, fhir_http: requests.Session) -> dict[str, Json]:
    """PUT every artifact of profiles/ to ``{type}/{id}``; returns them by canonical url."""
    loaded: dict[str, Json] = {}
    for resource in profile_artifacts():
        where = f"{resource['resourceType']}/{resource['id']}"
        response = fhir_http.put(
            f"{fhir_base_url}/{where}", data=json.dumps(resource), timeout=REQUEST_TIMEOUT_S
        )
        if response.status_code not in (200, 201):
            raise RuntimeError(f"PUT {where} failed: HTTP {response.status_code}: {response.text}")
        loaded[resource["url"]] = resource
    return loaded
