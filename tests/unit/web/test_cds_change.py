"""Cards that act on change, found with the real CDS Hooks sandbox (issue: CDS Hooks block).

- A tier rise after the plan was written: a warning naming both plans, with a suggestion to
  revise that the write-back applies (it was an info card with nothing to do).
- A paged prefetch key without `fhirAuthorization` from a server the site marks open: the
  rest is fetched without a token (it was a 412, which the sandbox shows as "All clear").
- Feedback that writes nothing says so and why (it said `alreadyHandled`), servers compared
  after normalisation and through the alias list.
- Feedback counted per card, not per click.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import responses
from flask import Flask

from fhir_dm.core.assess import Engine
from tests import factories as f
from tests.unit.cds import scenarios
from tests.unit.web.conftest import BASE, FakeFhirServer
from tests.unit.web.test_cds_hooks import (
    EHR_FHIR,
    FHIR_TOKEN,
    PUBLIC,
    SERVICE,
    EhrFhir,
    auth,
    ec_key,
    first_page,
    full_request,
    make_app,
    rsps,
    templates_of,
    writing_app,
)

__all__ = ["ec_key", "rsps"]  # fixtures shared with test_cds_hooks

Json = dict[str, Any]
FEEDBACK = f"/cds-services/{SERVICE}/feedback"
OTHER_NAME = "https://fhir-internal.example.org/r4"  # the same server under another name


def _call(app: Flask, ec_key: Any, body: Json, hook_instance: str) -> list[Json]:
    body = {**body, "hookInstance": hook_instance}
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key))
    assert response.status_code == 200, response.get_json()
    cards: list[Json] = response.get_json()["cards"]
    return cards


def _feedback(app: Flask, ec_key: Any, payload: Json) -> Json:
    response = app.test_client().post(
        FEEDBACK, json=payload, headers=auth(ec_key, aud=PUBLIC + FEEDBACK)
    )
    assert response.status_code == 200
    answer: Json = response.get_json()
    return answer


def test_a_tier_rise_after_the_plan_is_written_is_a_warning_naming_both_with_a_revision(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, tmp_path: Path
) -> None:
    fhir = FakeFhirServer(rsps)
    resources = scenarios.moderate_preliminary()
    fhir.put(*resources)
    app = writing_app(engine, tmp_path)
    templates = templates_of(app)
    body = full_request(templates, resources, fhir_server=BASE, token=FHIR_TOKEN)
    [first] = _call(app, ec_key, body, "00000000-0000-4000-8000-000000000001")
    orders_on_file = first["suggestions"][0]["label"].split("(")[1].split(" ")[0]
    assert (
        _feedback(app, ec_key, scenarios.accepted(first, "2024-04-15T10:01:00Z"))["plans"][
            "written"
        ]
        == 1
    )
    [plan] = fhir.all("CarePlan")

    # A TIF1-gamma result arrives: the record now gives High risk.
    tif1g = f.antibody(resources[0], "tif1g", "positive")
    fhir.put(tif1g)
    body = full_request(
        templates, [*resources, tif1g], fhir_server=BASE, token=FHIR_TOKEN, plans=[plan]
    )
    [card] = _call(app, ec_key, body, "00000000-0000-4000-8000-000000000002")
    assert card["indicator"] == "warning"
    assert card["summary"].startswith(
        f"Plan on file: Moderate risk (preliminary), {orders_on_file} orders;"
        " record now gives: High risk"
    )
    [suggestion] = card["suggestions"]
    assert suggestion["label"].startswith("Revise the plan on file to High risk")
    assert "actions" not in suggestion  # the write-back applies it (write_on_accept)

    answer = _feedback(app, ec_key, scenarios.accepted(card, "2024-04-15T10:02:00Z"))
    assert answer["plans"]["written"] == 1, answer
    [revised] = [p for p in fhir.all("CarePlan") if p.get("status") == "active"]
    assert "High risk" in revised["title"]


def test_without_write_on_accept_the_changed_plan_card_offers_no_empty_suggestion(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, tmp_path: Path
) -> None:
    app = make_app(engine)
    resources = scenarios.moderate_preliminary()
    templates = templates_of(app)
    [first] = _call(app, ec_key, full_request(templates, resources), "h-1")
    plan = scenarios.suggested_plan(first)
    stored = {**plan, "id": "cp-1"}
    tif1g = f.antibody(resources[0], "tif1g", "positive")
    [card] = _call(app, ec_key, full_request(templates, [*resources, tif1g], plans=[stored]), "h-2")
    assert card["indicator"] == "warning"
    assert "record now gives: High risk" in card["summary"]
    assert "suggestions" not in card
    assert "Review the plan on file" in card["detail"]


def test_a_paged_key_without_a_token_is_fetched_from_a_server_marked_open(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    """The sandbox on HAPI: 201 conditions, page 1 of 200 forwarded, no fhirAuthorization."""
    app = make_app(engine, open_fhir_servers=(EHR_FHIR,))
    ehr = EhrFhir(rsps)
    resources = scenarios.high_risk()
    patient = resources[0]
    extra = [f.condition(patient, f.concept(f.SCT, "38341003", "Hypertension")) for _ in range(201)]
    ehr.resources = [*resources, *extra]
    body = full_request(templates_of(app), [*resources, *extra], fhir_server=EHR_FHIR)
    body["prefetch"]["conditions"] = first_page(resources, 200)
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key))
    assert response.status_code == 200
    [card] = response.get_json()["cards"]
    assert card["summary"].startswith("IIM cancer screening: High risk")
    assert ehr.calls, "the rest was fetched from the open server"
    assert all(authorization is None for _, _, authorization in ehr.calls)


def test_a_paged_key_that_cannot_be_fetched_is_an_incomplete_card_never_all_clear(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    app = make_app(engine)
    resources = scenarios.high_risk()
    body = full_request(templates_of(app), resources, fhir_server=EHR_FHIR)
    body["prefetch"]["conditions"] = first_page(resources, 200)
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key))
    assert response.status_code == 200
    [card] = response.get_json()["cards"]
    assert card["indicator"] == "warning"
    assert "assessment incomplete" in card["summary"]
    assert "not marked open" in card["detail"]


def test_feedback_for_another_server_name_says_skipped_naming_both_never_already_handled(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, tmp_path: Path
) -> None:
    """As the sandbox: the EHR named the server `localhost`, the settings `127.0.0.1`."""
    fhir = FakeFhirServer(rsps)
    resources = scenarios.high_risk()
    fhir.put(*resources)
    app = writing_app(engine, tmp_path)
    other_name = OTHER_NAME
    body = full_request(templates_of(app), resources, fhir_server=other_name, token=FHIR_TOKEN)
    [card] = _call(app, ec_key, body, "00000000-0000-4000-8000-000000000003")
    answer = _feedback(app, ec_key, scenarios.accepted(card, "2024-04-15T10:01:00Z"))
    assert answer["plans"]["alreadyHandled"] == 0
    assert answer["plans"]["skipped"] == 1
    [detail] = answer["details"]
    assert detail["outcome"] == "skipped"
    assert "FHIR server differs" in detail["reason"]
    assert other_name in detail["reason"] and BASE in detail["reason"]
    assert fhir.all("CarePlan") == []


def test_feedback_for_an_aliased_server_name_is_written(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, tmp_path: Path
) -> None:
    fhir = FakeFhirServer(rsps)
    resources = scenarios.high_risk()
    fhir.put(*resources)
    # Another name of the same server, spelled with upper case, a default port and a slash.
    other_name = "https://FHIR-INTERNAL.example.org:443/r4/"
    app = writing_app(engine, tmp_path, fhir_server_aliases=((BASE, OTHER_NAME),))
    body = full_request(templates_of(app), resources, fhir_server=other_name, token=FHIR_TOKEN)
    [card] = _call(app, ec_key, body, "00000000-0000-4000-8000-000000000004")
    answer = _feedback(app, ec_key, scenarios.accepted(card, "2024-04-15T10:01:00Z"))
    assert answer["plans"]["written"] == 1, answer
    assert len(fhir.all("CarePlan")) == 1


def test_feedback_summary_counts_cards_not_clicks(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    app = make_app(engine)
    [card] = _call(app, ec_key, full_request(templates_of(app), scenarios.high_risk()), "h-9")
    for at in ("2024-04-15T10:01:00Z", "2024-04-15T10:02:00Z", "2024-04-15T10:03:00Z"):
        _feedback(app, ec_key, scenarios.accepted(card, at))  # the sandbox sends one per click
    summary_url = f"/cds-services/{SERVICE}/feedback/summary"
    summary = (
        app.test_client()
        .get(summary_url, headers=auth(ec_key, aud=PUBLIC + summary_url))
        .get_json()
    )
    assert summary["cardTypes"]["screening-plan"]["accepted"] == 1


@pytest.mark.parametrize(("missing", "card"), [("observations", False), ("conditions", True)])
def test_a_patient_whose_complete_conditions_show_no_iim_gets_no_incomplete_card(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, missing: str, card: bool
) -> None:
    """No nagging: missing observations cannot make an IIM; missing conditions could."""
    app = make_app(engine)
    body = full_request(templates_of(app), scenarios.no_iim())
    del body["prefetch"][missing]
    cards = _call(app, ec_key, body, f"h-{missing}")
    assert (len(cards) == 1) is card
    if card:
        assert "assessment incomplete" in cards[0]["summary"]
