"""The local test HAPI (hapi/pom.xml) and docker-compose.yml run the same HAPI FHIR release."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def pom_hapi_version() -> str:
    root = ET.parse(ROOT / "hapi" / "pom.xml").getroot()  # our own file
    version = root.findtext("m:properties/m:hapi.fhir.version", namespaces=POM_NS)
    assert version, "hapi/pom.xml has no <hapi.fhir.version>"
    return version.strip()


def compose_hapi_version() -> str:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    image = compose["services"]["hapi"]["image"]
    match = re.fullmatch(r"hapiproject/hapi:v(\d+\.\d+\.\d+)(?:-\d+)?", image)
    assert match, f"unexpected HAPI image tag: {image}"
    return match.group(1)


def test_the_test_server_and_the_compose_image_run_the_same_hapi_release() -> None:
    assert compose_hapi_version() == pom_hapi_version()
