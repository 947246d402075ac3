"""`fhir-dm demo` against the session's HAPI: writes, re-runs unchanged, links the app."""

from __future__ import annotations

import io

import pytest

from fhir_dm.cli import demo

pytestmark = pytest.mark.integration


def test_demo_writes_then_changes_nothing_and_prints_the_app_links(fhir_base_url: str) -> None:
    out = io.StringIO()
    assert demo.main(fhir_base_url, out=out) == 0
    text = out.getvalue()
    first, rerun = text.split("--- re-run ---")
    assert "HTTP" not in text  # no failed call
    written = f"CarePlan: {fhir_base_url}/CarePlan/"
    assert written in first  # plans written on the first run ...
    assert "(as before)" in rerun and written not in rerun  # ... and left alone on the re-run
    assert text.count("/app/launch?fhirServiceUrl=") == 6
