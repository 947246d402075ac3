"""The core's side of the terminology server: which codes to ask about, and the overlay."""

from __future__ import annotations

import pytest

from fhir_dm.core.terminology import Matcher, TerminologyOverlay
from fhir_dm.knowledge.models import Knowledge
from tests.factories import LOINC, SCT, concept, condition, observation, patient
from tests.terminology_server import TEST_SYSTEM, knowledge_with_test_checks

NSCLC = (TEST_SYSTEM, "nsclc")


@pytest.fixture(scope="module")
def tx_knowledge(tmp_path_factory: pytest.TempPathFactory) -> Knowledge:
    return knowledge_with_test_checks(tmp_path_factory.mktemp("tx"))


def test_only_unrecognised_condition_codes_are_worth_asking(tx_knowledge: Knowledge) -> None:
    matcher = Matcher(tx_knowledge.terminology)
    pat = patient()
    history = {
        "resourceType": "FamilyMemberHistory",
        "status": "completed",
        "patient": {"reference": f"Patient/{pat['id']}"},
        "relationship": concept("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "MTH"),
        "condition": [{"code": concept(TEST_SYSTEM, " lung-cancer ")}],
    }
    resources = [
        pat,
        condition(pat, concept(TEST_SYSTEM, "nsclc")),
        condition(pat, concept(SCT, "396230008")),  # DM: recognised offline
        # A concept recognised offline by one coding is not sent for its others.
        condition(
            pat,
            {
                "coding": [
                    {"system": SCT, "code": "363358000"},
                    {"system": TEST_SYSTEM, "code": "x"},
                ]
            },
        ),
        observation(pat, concept(TEST_SYSTEM, "in-an-observation")),
        observation(pat, concept(LOINC, "12345-6")),
        history,
    ]
    # The test config has expansions, so every system may be asked; SNOMED ones too.
    assert matcher.server_codes(resources) == {NSCLC, (TEST_SYSTEM, "lung-cancer")}


def test_the_shipped_config_asks_about_snomed_only(knowledge: Knowledge) -> None:
    matcher = Matcher(knowledge.terminology)
    pat = patient()
    resources = [
        condition(pat, concept(SCT, "999999999")),
        condition(pat, concept("http://hospital.example.org/problem-list", "UNKNOWN")),
    ]
    assert matcher.server_codes(resources) == {(SCT, "999999999")}


def test_without_server_checks_nothing_is_asked(knowledge: Knowledge) -> None:
    bare = knowledge.terminology.model_copy(update={"server_checks": {}})
    pat = patient()
    assert Matcher(bare).server_codes([condition(pat, concept(SCT, "999999999"))]) == frozenset()


def test_the_overlay_adds_value_sets_for_one_request_only(tx_knowledge: Knowledge) -> None:
    matcher = Matcher(tx_knowledge.terminology)
    overlay = TerminologyOverlay(members={NSCLC: frozenset({"malignancy"})})
    with_overlay = matcher.with_overlay(overlay)
    assert with_overlay.code(TEST_SYSTEM, " nsclc") == {"malignancy"}
    assert matcher.code(TEST_SYSTEM, "nsclc") == frozenset()
    # Offline matches are kept.
    assert "subtype-dm" in with_overlay.code(SCT, "396230008")


def test_unchecked_codes_name_their_resources_per_reason(tx_knowledge: Knowledge) -> None:
    pat = patient()
    first = condition(pat, concept(TEST_SYSTEM, "nsclc"), id="a")
    second = condition(pat, concept(TEST_SYSTEM, "other"), id="b")
    fine = condition(pat, concept(TEST_SYSTEM, "fine"), id="c")
    overlay = TerminologyOverlay(
        unchecked={NSCLC: "no answer in time", (TEST_SYSTEM, "other"): "server error"}
    )
    found = (
        Matcher(tx_knowledge.terminology)
        .with_overlay(overlay)
        .server_findings([("Condition/a", first), ("Condition/b", second), ("Condition/c", fine)])
    )
    assert found == {
        "code not checked with the terminology server (no answer in time);"
        " the facts it may record are unknown": ["Condition/a"],
        "code not checked with the terminology server (server error);"
        " the facts it may record are unknown": ["Condition/b"],
    }
    assert Matcher(tx_knowledge.terminology).server_findings([("Condition/a", first)]) == {}
