"""TEST DATA ONLY: a made-up code system and value set for the terminology-server tests.

Nothing here is a real code. The test knowledge base is the shipped config/ with its
`server.yaml` replaced: `malignancy` gets the made-up root `cancer` ($subsumes) and
`history-of-cancer` the made-up value set below ($expand).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from fhir_dm.knowledge.load import DEFAULT_CONFIG_DIR, load_knowledge
from fhir_dm.knowledge.models import Knowledge

TEST_SYSTEM = "http://example.org/fhir-dm-test/cs"
TEST_VALUE_SET = "http://example.org/fhir-dm-test/ValueSet/history-of-cancer"
TEST_ALIAS = "fhir-dm-test"
TEST_SOURCE = "TEST-ONLY"

Json = dict[str, Any]

# cancer > lung-cancer > nsclc; history-of-cancer > history-of-lung-cancer; sprain alone.
TEST_CODE_SYSTEM: Json = {
    "resourceType": "CodeSystem",
    "id": "fhir-dm-test-cs",
    "url": TEST_SYSTEM,
    "version": "1",
    "name": "FhirDmTestOnlyCodes",
    "title": "fhir-dm test-only codes (made up; not for clinical use)",
    "status": "draft",
    "experimental": True,
    "hierarchyMeaning": "is-a",
    "content": "complete",
    "concept": [
        {
            "code": "cancer",
            "display": "Test cancer (parent)",
            "concept": [
                {
                    "code": "lung-cancer",
                    "display": "Test lung cancer",
                    "concept": [{"code": "nsclc", "display": "Test non-small cell"}],
                }
            ],
        },
        {
            "code": "history-of-cancer",
            "display": "Test history of cancer",
            "concept": [{"code": "history-of-lung-cancer", "display": "Test history, lung"}],
        },
        {"code": "sprain", "display": "Test unrelated concept"},
    ],
}

TEST_VALUE_SET_RESOURCE: Json = {
    "resourceType": "ValueSet",
    "id": "fhir-dm-test-history",
    "url": TEST_VALUE_SET,
    "name": "FhirDmTestOnlyHistory",
    "status": "draft",
    "experimental": True,
    "compose": {
        "include": [
            {
                "system": TEST_SYSTEM,
                "filter": [{"property": "concept", "op": "is-a", "value": "history-of-cancer"}],
            }
        ]
    },
}

TEST_SERVER_CHECKS: Json = {
    "server_checks": {
        "malignancy": {
            "descendants_of": [
                {
                    "system": TEST_ALIAS,
                    "code": "cancer",
                    "display": "Test cancer (parent)",
                    "source": TEST_SOURCE,
                    "confidence": "judgment",
                }
            ]
        },
        "history-of-cancer": {"expansions": [TEST_VALUE_SET]},
    }
}


def knowledge_with_test_checks(directory: Path) -> Knowledge:
    """The shipped knowledge base with the test-only server checks, copied into `directory`."""
    root = directory / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, root)
    terminology = root / "terminology"
    systems_file = terminology / "systems.yaml"
    systems = yaml.safe_load(systems_file.read_text(encoding="utf-8"))
    systems["systems"][TEST_ALIAS] = TEST_SYSTEM
    systems["sources"][TEST_SOURCE] = "made-up test data (tests/terminology_server.py)"
    systems_file.write_text(yaml.safe_dump(systems), encoding="utf-8")
    (terminology / "server.yaml").write_text(yaml.safe_dump(TEST_SERVER_CHECKS), encoding="utf-8")
    return load_knowledge(root)
