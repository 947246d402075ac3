"""`fhir-dm demo` against the session's HAPI: writes, re-runs unchanged, links the app."""

from __future__ import annotations

import io
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from fhir_dm.cli import demo

pytestmark = pytest.mark.integration


def test_demo_writes_then_changes_nothing_and_prints_the_app_links(fhir_base_url: str) -> None:
    out = io.StringIO()
    assert demo.main(fhir_base_url, keep_running=False, out=out) == 0
    text = out.getvalue()
    first, rerun = text.split("--- re-run ---")
    assert "HTTP" not in text  # no failed call
    written = f"CarePlan: {fhir_base_url}/CarePlan/"
    assert written in first  # plans written on the first run ...
    assert "(as before)" in rerun and written not in rerun  # ... and left alone on the re-run
    assert text.count("/app/launch?fhirServiceUrl=") == 6
    assert "Arthur Whitfield (MRN MRN-400175)" in text  # named patients, not ids
    assert "these links no longer work" in text  # says plainly that the links die with it


def test_demo_keeps_serving_the_links_until_ctrl_c(
    fhir_base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    answers: list[int] = []

    def follow_a_link_then_press_ctrl_c() -> None:
        link = next(line.strip() for line in out.getvalue().splitlines() if "/app/launch?" in line)
        answers.append(requests.get(link, timeout=30).status_code)
        patient = parse_qs(urlsplit(link).query)["patientId"][0]
        read = requests.get(f"{fhir_base_url}/Patient/{patient}", timeout=30)
        answers.append(read.status_code)
        assert read.json()["name"][0]["family"]  # the app shows a name

    monkeypatch.setattr(demo, "wait_for_interrupt", follow_a_link_then_press_ctrl_c)
    assert demo.main(fhir_base_url, out=out) == 0  # keeps running by default
    assert answers == [200, 200]
    text = out.getvalue()
    assert "Serving until Ctrl-C; the links stop working then." in text
    assert text.rstrip().endswith("Stopped.")
