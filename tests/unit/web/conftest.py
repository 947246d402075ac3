"""Web fixtures: an app per test, and a small stateful FHIR server faked with `responses`."""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.web import logs
from fhir_dm.web.app import create_app
from fhir_dm.web.settings import Service, Settings, current_service
from fhir_dm.web.trust import TrustConfig
from fhir_dm.writeback.writer import PATIENT_SEARCHES

BASE = "https://fhir.example.org/r4"
PAGE_SIZE = 3
STATIC_TOKEN = "web-test-static-token-0123456789abcdef"
FHIR_JSON = "application/fhir+json"

Json = dict[str, Any]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for tests: the fake server, no retries, small pages, locks in tmp_path."""
    fhir = overrides.pop("fhir", None) or FhirServerConfig(
        base_url=BASE, max_retries=0, page_size=PAGE_SIZE
    )
    trust = overrides.pop("trust", None) or TrustConfig(mode="off")
    return Settings(
        fhir=fhir,
        trust=trust,
        lock_dir=tmp_path / "locks",
        public_base_url="https://dm.example.org",
        **overrides,
    )


def service_of(app: Flask) -> Service:
    with app.app_context():
        return current_service()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The factory installs a JSON handler on the root logger; take it away after each test."""
    root = logging.getLogger()
    level = root.level
    before = list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def log_stream() -> io.StringIO:
    """Every JSON log line the service writes during the test (set up before the app)."""
    stream = io.StringIO()
    logs.configure_logging("INFO", stream=stream)
    return stream


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def app(settings: Settings) -> Flask:
    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def client_static(tmp_path: Path) -> FlaskClient:
    """A client of an app that accepts only STATIC_TOKEN."""
    trust = TrustConfig(mode="static", static_tokens=(STATIC_TOKEN,))
    return create_app(make_settings(tmp_path, trust=trust)).test_client()


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


class FakeFhirServer:
    """Just enough of a FHIR server: read, paged search, and transactions like HAPI's.

    Searches: `_id`, `patient`, `subject`, `identifier` (`system|` matches any value), `based-on`,
    `status`, `_count`, comma-separated values ORed; transactions: conditional create
    (`ifNoneExist` with the same parameters), PUT by id (If-Match mismatch: 412, as HAPI),
    urn:uuid references rewritten to the assigned ids.
    """

    def __init__(self, mock: responses.RequestsMock, base: str = BASE) -> None:
        self.base = base
        self.store: dict[str, dict[str, Json]] = {}
        self.transactions: list[Json] = []
        self.searches: list[tuple[str, dict[str, str]]] = []
        self._ids = itertools.count(1)
        self.reject_transaction: tuple[int, Json] | None = None
        self.reject_times: int | None = None  # how many transactions to reject (None: all)
        mock.add_callback(responses.POST, base, callback=self._transaction)
        mock.add_callback(responses.GET, f"{base}/metadata", callback=self._metadata)
        for resource_type in (
            "Patient",
            *PATIENT_SEARCHES,
            "CarePlan",
            "RiskAssessment",
            "Provenance",
            "List",
            "Organization",
            "Practitioner",
        ):
            mock.add_callback(responses.GET, f"{base}/{resource_type}", callback=self._search)
            mock.add_callback(
                responses.GET,
                re.compile(rf"{re.escape(base)}/{resource_type}/[^/?]+$"),
                callback=self._read,
            )

    # -- state -------------------------------------------------------------------------------
    def put(self, *resources: Json) -> None:
        """Load resources as an EHR holds them (their own ids, version 1)."""
        for resource in resources:
            stored = copy.deepcopy(resource)
            stored.setdefault("meta", {})["versionId"] = "1"
            self.store.setdefault(stored["resourceType"], {})[stored["id"]] = stored

    def all(self, resource_type: str) -> list[Json]:
        return list(self.store.get(resource_type, {}).values())

    # -- handlers ----------------------------------------------------------------------------
    @staticmethod
    def _json(status: int, body: Json) -> tuple[int, dict[str, str], str]:
        return status, {"Content-Type": FHIR_JSON}, json.dumps(body)

    def _metadata(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        return self._json(200, {"resourceType": "CapabilityStatement", "status": "active"})

    def _read(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        path = urlsplit(str(request.url)).path.rsplit("/", 2)
        resource = self.store.get(path[-2], {}).get(path[-1])
        if resource is None:
            return self._json(404, _outcome("not found"))
        return self._json(200, resource)

    def _search(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        parts = urlsplit(str(request.url))
        resource_type = parts.path.rsplit("/", 1)[-1]
        params = dict(parse_qsl(parts.query))
        offset = int(params.pop("_offset", "0"))
        count = int(params.pop("_count", "20"))
        params.pop("_elements", None)  # the whole resource is returned, as a server may
        self.searches.append((resource_type, dict(params)))
        matches = [r for r in self.all(resource_type) if _matches(r, params)]
        page = matches[offset : offset + count]
        bundle: Json = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "entry": [
                {"fullUrl": f"{self.base}/{resource_type}/{r['id']}", "resource": r} for r in page
            ],
        }
        if offset + count < len(matches):
            query = urlencode({**params, "_count": count, "_offset": offset + count})
            bundle["link"] = [{"relation": "next", "url": f"{self.base}/{resource_type}?{query}"}]
        return self._json(200, bundle)

    def _transaction(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body or b"{}")
        self.transactions.append(body)
        if self.reject_transaction is not None and self.reject_times != 0:
            status, outcome = self.reject_transaction
            if self.reject_times is not None:
                self.reject_times -= 1
            return self._json(status, outcome)
        assigned: dict[str, str] = {}
        answers: list[Json] = []
        written: list[Json] = []
        for entry in body["entry"]:
            resource = copy.deepcopy(entry["resource"])
            req = entry["request"]
            resource_type = resource["resourceType"]
            if req["method"] == "POST":
                criteria = dict(parse_qsl(req["ifNoneExist"]))
                found = [r for r in self.all(resource_type) if _matches(r, criteria)]
                if found:
                    existing = found[0]
                    assigned[entry["fullUrl"]] = f"{resource_type}/{existing['id']}"
                    answers.append(_answer("200 OK", existing))
                    continue
                resource["id"] = f"{resource_type.lower()}-{next(self._ids)}"
                resource["meta"] = {"versionId": "1"}
                status = "201 Created"
            else:
                resource_id = req["url"].split("/", 1)[1]
                old = self.store.get(resource_type, {}).get(resource_id)
                expected = f'W/"{old["meta"]["versionId"]}"' if old else None
                if old is not None and req.get("ifMatch") and req["ifMatch"] != expected:
                    return self._json(412, _outcome("version conflict"))
                version = int(old["meta"]["versionId"]) + 1 if old else 1
                resource["id"] = resource_id
                resource["meta"] = {"versionId": str(version)}
                status = "200 OK" if old else "201 Created"
            assigned[entry["fullUrl"]] = f"{resource_type}/{resource['id']}"
            written.append(resource)
            answers.append(_answer(status, resource))
        for resource in written:
            _rewrite(resource, assigned)
            self.store.setdefault(resource["resourceType"], {})[resource["id"]] = resource
        return self._json(
            200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        )


def _outcome(text: str) -> Json:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }


def _answer(status: str, resource: Json) -> Json:
    location = (
        f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"
    )
    return {"response": {"status": status, "location": location}}


def _has_identifier(resource: Json, token: str) -> bool:
    if token.endswith("|"):
        return any(f"{i.get('system')}|" == token for i in resource.get("identifier", []))
    return any(
        f"{i.get('system')}|{i.get('value')}" == token for i in resource.get("identifier", [])
    )


def _references(resource: Json, field: str) -> list[str]:
    value = resource.get(field)
    items = value if isinstance(value, list) else [value] if value else []
    return [i.get("reference", "") for i in items if isinstance(i, dict)]


def _matches(resource: Json, params: dict[str, str]) -> bool:
    return all(
        any(_matches_one(resource, name, value) for value in values.split(","))
        for name, values in params.items()
    )


def _matches_one(resource: Json, name: str, value: str) -> bool:
    if name == "_id":
        return bool(resource.get("id") == value)
    if name == "patient":
        refs = _references(resource, "subject") + _references(resource, "patient")
        return f"Patient/{value}" in refs
    if name == "subject":
        return value in _references(resource, "subject")
    if name == "identifier":
        return _has_identifier(resource, value)
    if name == "based-on":
        return value in _references(resource, "basedOn")
    if name == "status":
        return bool(resource.get("status") == value)
    if name == "code":  # system|code tokens only
        system, _, code = value.partition("|")
        codings = (resource.get("code") or {}).get("coding") or []
        return any(c.get("system") == system and c.get("code") == code for c in codings)
    raise AssertionError(f"the fake server does not support search parameter {name}")


def _rewrite(value: Any, assigned: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and item in assigned:
                value[key] = assigned[item]
            else:
                _rewrite(item, assigned)
    elif isinstance(value, list):
        for item in value:
            _rewrite(item, assigned)


@pytest.fixture
def fhir_server(rsps: responses.RequestsMock) -> FakeFhirServer:
    return FakeFhirServer(rsps)


def transaction_calls(mock: responses.RequestsMock) -> int:
    """How many transactions were POSTed to the fake server."""
    return sum(1 for call in mock.calls if call.request.method == "POST")
