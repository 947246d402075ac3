"""CDS Hooks wire models: the spec's rules on cards, requests and feedback."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fhir_dm.cds.models import (
    Action,
    Card,
    CdsRequest,
    CdsResponse,
    Coding,
    FeedbackRequest,
    Source,
    Suggestion,
)

SOURCE = Source(label="x")


def test_optional_attributes_are_left_out_and_empty_cards_kept() -> None:
    assert CdsResponse(cards=[]).dump() == {"cards": []}
    card = Card(summary="s", indicator="info", source=SOURCE)
    assert card.dump() == {"summary": "s", "indicator": "info", "source": {"label": "x"}}


def test_card_rules() -> None:
    with pytest.raises(ValidationError, match="at most 139 characters"):
        Card(summary="x" * 140, indicator="info", source=SOURCE)
    suggestion = Suggestion(
        label="do", actions=[Action(type="delete", description="d", resourceId="X/1")]
    )
    with pytest.raises(ValidationError, match="selectionBehavior is required"):
        Card(summary="s", indicator="info", source=SOURCE, suggestions=[suggestion])
    with pytest.raises(ValidationError, match="needs a display"):
        Card(
            summary="s",
            indicator="info",
            source=SOURCE,
            overrideReasons=[Coding(system="s", code="c")],
        )
    with pytest.raises(ValidationError, match="needs a resource"):
        Action(type="create", description="d")
    with pytest.raises(ValidationError):
        Card(summary="s", indicator="urgent", source=SOURCE)  # type: ignore[arg-type]


def request(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "fhirServer": "https://ehr.example.org/fhir/",
        "fhirAuthorization": {
            "access_token": "zq-secret-7f",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "svc",
        },
        "context": {"userId": "Practitioner/1", "patientId": "p1", "encounterId": "e1"},
        "prefetch": {"patient": None},
        "extension": {"com.example": 1},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def test_request_parses_and_hides_the_token() -> None:
    call = CdsRequest.model_validate(request())
    assert call.fhir_server == "https://ehr.example.org/fhir"
    assert call.context.tokens() == {
        "userId": "Practitioner/1",
        "patientId": "p1",
        "encounterId": "e1",
    }
    assert call.fhir_authorization is not None
    assert "zq-secret-7f" not in repr(call)
    assert call.fhir_authorization.access_token.get_secret_value() == "zq-secret-7f"


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"hookInstance": None}, "hookInstance"),
        ({"context": {"patientId": "../Observation?x=1"}}, "context.patientId"),
        ({"context": {}}, "context.patientId"),
        ({"fhirServer": None}, "fhirServer is required"),
        ({"fhirServer": "ftp://x"}, "fhirServer"),
        ({"fhirServer": "https://user:pw@ehr.example.org"}, "credentials"),
        ({"fhirAuthorization": {"access_token": "t", "token_type": "MAC"}}, "Bearer"),
        ({"fhirAuthorization": {"access_token": "", "token_type": "Bearer"}}, "access_token"),
    ],
)
def test_bad_requests(changes: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError, match=where.replace(".", r"\.")):
        CdsRequest.model_validate(request(**changes))


def test_bad_request_messages_do_not_echo_the_token() -> None:
    body = request(fhirAuthorization={"access_token": "sekrit-token", "token_type": "MAC"})
    with pytest.raises(ValidationError) as err:
        CdsRequest.model_validate(body)
    assert "sekrit" not in str(err.value.errors(include_input=False))


def test_feedback_request() -> None:
    parsed = FeedbackRequest.model_validate(
        {
            "feedback": [
                {
                    "card": "c",
                    "outcome": "overridden",
                    "outcomeTimestamp": "2020-12-11T00:00:00Z",
                    "overrideReason": {"reason": {"system": "s", "code": "k"}, "userComment": "u"},
                }
            ]
        }
    )
    assert parsed.feedback[0].override_reason is not None
    with pytest.raises(ValidationError):
        FeedbackRequest.model_validate(
            {
                "feedback": [
                    {"card": "c", "outcome": "ignored", "outcomeTimestamp": "2020-12-11T00:00:00Z"}
                ]
            }
        )
    with pytest.raises(ValidationError):
        FeedbackRequest.model_validate({"feedback": []})
