"""The optional terminology server against a real HAPI FHIR, with a TEST-ONLY code system.

This module starts its own HAPI with the concept index on (`--testserver.terminology-index`),
which HAPI's `CodeSystem/$subsumes` and `ValueSet/$expand` need; the session's shared server
runs without it. The code system and value set are made up (tests/terminology_server.py).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_dm.core.assess import PatientResult
from fhir_dm.fhir.terminology import (
    ServerCheckedEngine,
    TerminologyServer,
    TerminologyServerConfig,
)
from fhir_dm.knowledge.models import Knowledge
from tests.conftest import NOW
from tests.factories import bundle, concept, condition, iim_condition, patient
from tests.terminology_server import (
    TEST_CODE_SYSTEM,
    TEST_SYSTEM,
    TEST_VALUE_SET_RESOURCE,
    knowledge_with_test_checks,
)

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 300
READY_TIMEOUT_S = 120
FHIR_JSON = "application/fhir+json"
NOT_CHECKED = "code not checked with the terminology server"

Json = dict[str, Any]


@pytest.fixture(scope="module")
def tx_base_url() -> Iterator[str]:
    """A HAPI server with the concept index on, holding the test code system and value set."""
    from tools.hapi_server import HapiServer

    server = HapiServer(extra_args=["--testserver.terminology-index=true"])
    try:
        base = server.start(timeout=START_TIMEOUT_S).rstrip("/")
    except Exception as exc:
        server.stop()
        raise RuntimeError(f"the HAPI FHIR test server did not start: {exc}") from exc
    try:
        with requests.Session() as http:
            http.headers.update({"Accept": FHIR_JSON, "Content-Type": FHIR_JSON})
            for resource in (TEST_CODE_SYSTEM, TEST_VALUE_SET_RESOURCE):
                where = f"{resource['resourceType']}/{resource['id']}"
                response = http.put(f"{base}/{where}", data=json.dumps(resource), timeout=120)
                assert response.status_code in (200, 201), response.text
            _wait_until_indexed(http, base)
        yield base
    finally:
        server.stop()


def _wait_until_indexed(http: requests.Session, base: str) -> None:
    """HAPI stores and indexes uploaded concepts in the background; wait for both operations."""
    subsumes = (f"{base}/CodeSystem/$subsumes", {"system": TEST_SYSTEM, "codeA": "cancer"})
    expand = (f"{base}/ValueSet/$expand", {"url": TEST_VALUE_SET_RESOURCE["url"]})
    ends = time.monotonic() + READY_TIMEOUT_S
    while True:
        a = http.get(subsumes[0], params={**subsumes[1], "codeB": "nsclc"}, timeout=60)
        b = http.get(expand[0], params=expand[1], timeout=60)
        if a.ok and a.json()["parameter"][0]["valueCode"] == "subsumes" and b.ok:
            return
        if time.monotonic() > ends:
            raise RuntimeError(f"terminology not ready: {a.status_code} {b.status_code}")
        time.sleep(1)


@pytest.fixture(scope="module")
def tx_knowledge(tmp_path_factory: pytest.TempPathFactory) -> Knowledge:
    return knowledge_with_test_checks(tmp_path_factory.mktemp("tx"))


def _assess(knowledge: Knowledge, base_url: str, *codes: str) -> PatientResult:
    server = TerminologyServer(
        TerminologyServerConfig(base_url=base_url, timeout_seconds=30, budget_seconds=60),
        knowledge.terminology,
    )
    engine = ServerCheckedEngine(knowledge, server, software_version="test")
    pat = patient()
    resources = [
        pat,
        iim_condition(pat),
        *(condition(pat, concept(TEST_SYSTEM, c), id=f"c-{c}") for c in codes),
    ]
    try:
        (result,) = engine.assess(bundle(*resources), now=NOW).results
    finally:
        server.close()
    return result


def test_subsumes_and_expand_on_hapi_recognise_unlisted_codes(
    tx_knowledge: Knowledge, tx_base_url: str
) -> None:
    result = _assess(tx_knowledge, tx_base_url, "nsclc", "history-of-lung-cancer", "sprain")
    facts = result.plan.assessment.facts
    assert facts.feature("active_malignancy").is_true()
    assert facts.feature("active_malignancy").sources == ("Condition/c-nsclc",)
    assert facts.feature("personal_history_cancer").is_true()
    assert facts.feature("personal_history_cancer").sources == (
        "Condition/c-history-of-lung-cancer",
    )
    assert not [f for f in facts.findings if NOT_CHECKED in f]
    assert any(
        "condition code not recognised" in f and "Condition/c-sprain" in f for f in facts.findings
    )


def test_a_code_hapi_does_not_know_is_reported_not_guessed(
    tx_knowledge: Knowledge, tx_base_url: str
) -> None:
    result = _assess(tx_knowledge, tx_base_url, "no-such-code")
    facts = result.plan.assessment.facts
    assert not facts.feature("active_malignancy").known
    assert [f for f in facts.findings if NOT_CHECKED in f] == [
        f"{NOT_CHECKED} (server refused the check); the facts it may record are unknown:"
        " Condition/c-no-such-code"
    ]


def test_an_unreachable_server_leaves_the_facts_unknown(tx_knowledge: Knowledge) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _assess(tx_knowledge, f"http://127.0.0.1:{port}/fhir", "nsclc")
    facts = result.plan.assessment.facts
    assert not facts.feature("active_malignancy").known
    assert [f for f in facts.findings if NOT_CHECKED in f] == [
        f"{NOT_CHECKED} (server unreachable); the facts it may record are unknown:"
        " Condition/c-nsclc"
    ]


def test_the_shipped_config_holds_no_test_code() -> None:
    config = Path(__file__).resolve().parents[2] / "config"
    assert TEST_CODE_SYSTEM["experimental"] is True
    assert not [p for p in config.rglob("*.yaml") if TEST_SYSTEM in p.read_text(encoding="utf-8")]
