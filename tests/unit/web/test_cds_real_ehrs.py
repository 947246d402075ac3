"""What real EHRs (the public CDS Hooks sandbox among them) do, and how fhir-dm copes.

- HAPI pages at 20 and a client forwards the first page without a token: the 412 says which
  key, why, and what was and was not sent; every search template asks for a page size.
- An EHR whose `jku` fhir-dm cannot reach: pinned keys with `jku_policy: ignore`.
- An EHR that records "accepted" and applies nothing: `write_on_accept` writes the plan, once.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import responses
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from fhir_dm.cds.state import StateSettings
from fhir_dm.common.errors import KnowledgeError
from fhir_dm.core.assess import Engine
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.web.app import create_app
from fhir_dm.web.cds_hooks import CdsSettings, current_cds
from fhir_dm.web.settings import Settings
from fhir_dm.web.trust import IssuerTrust, TrustConfig
from tests.unit.cds import scenarios
from tests.unit.web.conftest import BASE, FakeFhirServer, transaction_calls
from tests.unit.web.test_cds_hooks import (
    EHR_FHIR,
    FHIR_TOKEN,
    ISS,
    NOW_EPOCH,
    PUBLIC,
    SERVICE,
    SERVICE_URL,
    EhrFhir,
    auth,
    ec_key,
    first_page,
    full_request,
    incomplete_detail,
    make_app,
    rsps,
    templates_of,
    writing_app,
)

__all__ = ["ec_key", "rsps"]  # fixtures shared with test_cds_hooks

DOCS = Path(__file__).resolve().parents[3] / "docs"
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
Json = dict[str, Any]


# --- paged prefetch and precise 412 answers -----------------------------------------------


def test_every_search_template_in_discovery_asks_for_a_page_size(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    client = make_app(engine).test_client()
    response = client.get("/cds-services", headers=auth(ec_key, aud=f"{PUBLIC}/cds-services"))
    prefetch = response.get_json()["services"][0]["prefetch"]
    searches = {key: query for key, query in prefetch.items() if "?" in query}
    assert searches and all("&_count=200" in query for query in searches.values())


def test_a_first_page_without_a_token_is_an_incomplete_card_naming_the_key_and_what_was_sent(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    """The sandbox on HAPI: 21 conditions, page 1 of 20 forwarded, fhirServer but no token."""
    app = make_app(engine)
    resources = scenarios.high_risk()
    body = full_request(templates_of(app), resources, fhir_server=EHR_FHIR)
    body["prefetch"]["conditions"] = first_page(resources, 20)
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key))
    text = incomplete_detail(response).replace("\\", "")
    assert "prefetch key 'conditions' is incomplete" in text
    assert "next link" in text
    assert "sent fhirServer but no fhirAuthorization" in text
    assert "no fhirServer" not in text and "is missing" not in text
    assert f"had {len(templates_of(app))} of {len(templates_of(app))} keys" in text
    assert "All clear" not in text


def test_missing_keys_and_nothing_to_fetch_with_are_named_each(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    app = make_app(engine)
    resources = scenarios.high_risk()
    body = full_request(templates_of(app), resources)
    del body["prefetch"]["conditions"]
    body["prefetch"]["procedures"] = {"resourceType": "OperationOutcome", "issue": []}
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key))
    text = incomplete_detail(response).replace("\\", "")
    assert "prefetch key 'conditions' is missing" in text
    assert "prefetch key 'procedures' holds an OperationOutcome" in text
    assert "sent neither fhirServer nor fhirAuthorization" in text
    assert "(not sent: conditions)" in text


def test_a_server_not_on_the_list_is_named_as_such(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    app = make_app(engine)
    resources = scenarios.high_risk()
    body = full_request(
        templates_of(app), resources, fhir_server="https://other.example.net/fhir", token="t"
    )
    del body["prefetch"]["conditions"]
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key))
    assert "not on this service's allowed list" in incomplete_detail(response)


def test_a_fetch_follows_every_page_under_the_fhir_server(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    app = make_app(engine, fetch_page_size=2)
    ehr = EhrFhir(rsps)
    resources = scenarios.high_risk()
    patient = resources[0]
    extra = [
        {
            "resourceType": "Condition",
            "id": f"extra-{n}",
            "subject": {"reference": f"Patient/{patient['id']}"},
            "code": {"text": "Seasonal allergy"},
        }
        for n in range(5)
    ]
    ehr.resources = [*resources, *extra]
    body = full_request(templates_of(app), resources, fhir_server=EHR_FHIR, token=FHIR_TOKEN)
    del body["prefetch"]["conditions"]
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key))
    assert response.status_code == 200
    assert response.get_json()["cards"][0]["summary"].startswith("IIM cancer screening: High")
    assert len(ehr.calls) >= 3  # the query, then its pages
    assert all(c[2] == f"Bearer {FHIR_TOKEN}" for c in ehr.calls)
    assert all(c[1].get("_count") in (None, "2") for c in ehr.calls)


# --- pinned keys ----------------------------------------------------------------------------


def _jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> Json:
    public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**public, "kid": kid, "use": "sig", "alg": "ES384"}


def _token_with_jku(key: Any, kid: str, *, iss: str = ISS, jku: str = SANDBOX_JKU) -> str:
    claims = {
        "iss": iss,
        "aud": SERVICE_URL,
        "iat": int(NOW_EPOCH),
        "exp": int(NOW_EPOCH) + 300,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": kid, "jku": jku})


@pytest.mark.parametrize("where", ["inline", "file"])
def test_pinned_keys_trust_an_ehr_whose_jku_cannot_be_reached(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, tmp_path: Path, where: str
) -> None:
    key_set = {"keys": [_jwk(ec_key, "pinned-1")]}
    pin: Json = {"jwks": key_set}
    if where == "file":
        (tmp_path / "keys.json").write_text(json.dumps(key_set))
        pin = {"jwks_file": tmp_path / "keys.json"}
    trust = TrustConfig(issuers=(IssuerTrust(iss=ISS, jku_policy="ignore", **pin),))
    app = make_app(engine, trust=trust)
    body = full_request(templates_of(app), scenarios.high_risk())
    bearer = _token_with_jku(ec_key, "pinned-1")  # its jku is not served: no network
    response = app.test_client().post(
        f"/cds-services/{SERVICE}", json=body, headers={"Authorization": f"Bearer {bearer}"}
    )
    assert response.status_code == 200
    assert not any(SANDBOX_JKU in str(c.request.url) for c in rsps.calls)
    replayed = app.test_client().post(
        f"/cds-services/{SERVICE}", json=body, headers={"Authorization": f"Bearer {bearer}"}
    )
    assert replayed.status_code == 401  # pinned keys change nothing else
    other_key = ec.generate_private_key(ec.SECP384R1())
    forged = _token_with_jku(other_key, "pinned-1")
    assert (
        app.test_client()
        .post(f"/cds-services/{SERVICE}", json=body, headers={"Authorization": f"Bearer {forged}"})
        .status_code
        == 401
    )


def test_with_the_fetch_policy_an_unlisted_jku_is_refused_even_with_pinned_keys(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any
) -> None:
    trust = TrustConfig(issuers=(IssuerTrust(iss=ISS, jwks={"keys": [_jwk(ec_key, "p")]}),))
    app = make_app(engine, trust=trust)
    body = full_request(templates_of(app), scenarios.high_risk())
    bearer = _token_with_jku(ec_key, "p")
    response = app.test_client().post(
        f"/cds-services/{SERVICE}", json=body, headers={"Authorization": f"Bearer {bearer}"}
    )
    assert response.status_code == 401
    no_jku = jwt.encode(
        {
            "iss": ISS,
            "aud": SERVICE_URL,
            "iat": int(NOW_EPOCH),
            "exp": int(NOW_EPOCH) + 300,
            "jti": "j",
        },
        ec_key,
        algorithm="ES384",
        headers={"kid": "p"},
    )
    ok = app.test_client().post(
        f"/cds-services/{SERVICE}", json=body, headers={"Authorization": f"Bearer {no_jku}"}
    )
    assert ok.status_code == 200


def test_pinned_key_settings_are_checked_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs pinned keys"):
        IssuerTrust(iss=ISS, allowed_jku=(SANDBOX_JKU,), jku_policy="ignore")
    key_set = {"keys": [_jwk(ec.generate_private_key(ec.SECP384R1()), "k")]}
    with pytest.raises(ValueError, match="not both"):
        IssuerTrust(iss=ISS, jwks=key_set, jwks_file=tmp_path / "k.json")
    with pytest.raises(ValueError, match="pinned key set"):
        IssuerTrust(iss=ISS, jwks={"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"}]})
    unreadable = TrustConfig(issuers=(IssuerTrust(iss=ISS, jwks_file=tmp_path / "none.json"),))
    with pytest.raises(KnowledgeError, match="jwks_file cannot be read"):
        from fhir_dm.web.trust import InboundAuth

        InboundAuth(unreadable, session=requests.Session())


def test_the_documented_sandbox_example_is_valid_settings() -> None:
    """docs/examples/cds-sandbox.yaml: the public sandbox's public key, pinned, jku ignored."""
    example = yaml.safe_load((DOCS / "examples" / "cds-sandbox.yaml").read_text())
    cds = CdsSettings.model_validate(example["cds"])
    [issuer] = cds.trust.issuers
    assert issuer.iss == SANDBOX_ISS and issuer.jku_policy == "ignore"
    keys = issuer.pinned_keys()
    assert keys is not None and "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f" in keys


def test_the_sandbox_example_keeps_security_and_one_public_base_url(tmp_path: Path) -> None:
    """The sandbox signs discovery: the example must not switch its JWT check off, nor set a
    CDS-only base URL that the card's smart link (the top-level one) does not use."""
    text = (DOCS / "examples" / "cds-sandbox.yaml").read_text()
    example = yaml.safe_load(text)
    assert "discovery_requires_auth" not in example["cds"]
    assert "public_base_url" not in example["cds"]
    assert "without a JWT" not in text
    settings = Settings(**example, lock_dir=tmp_path / "locks")
    assert settings.cds is not None
    assert settings.cds.discovery_requires_auth is True
    assert settings.cds.public_base_url == settings.public_base_url == "http://localhost:8000"
    # The sandbox's server under either name is the same one, and it is read without a token.
    names = settings.cds.server_names
    assert names.same("http://127.0.0.1:8080/fhir/", "http://localhost:8080/fhir")
    assert settings.cds.server_open("http://127.0.0.1:8080/fhir")


# --- write on accept ------------------------------------------------------------------------


def test_an_accepted_suggestion_is_written_once_when_the_site_asks_for_it(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, tmp_path: Path
) -> None:
    fhir = FakeFhirServer(rsps)
    resources = scenarios.high_risk()
    fhir.put(*resources)
    app = writing_app(engine, tmp_path)
    client = app.test_client()
    body = full_request(templates_of(app), resources, fhir_server=BASE, token=FHIR_TOKEN)
    card = client.post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key)).get_json()[
        "cards"
    ][0]
    url = f"/cds-services/{SERVICE}/feedback"
    first = client.post(
        url,
        json=scenarios.accepted(card, "2024-04-15T10:01:00Z"),
        headers=auth(ec_key, aud=PUBLIC + url),
    )
    assert first.status_code == 200
    assert first.get_json()["plans"] == {
        "written": 1,
        "unchanged": 0,
        "alreadyHandled": 0,
        "skipped": 0,
        "failed": 0,
    }
    [done] = first.get_json()["details"]
    assert done["outcome"] == "written" and BASE in done["reason"]
    assert transaction_calls(rsps) == 1
    [plan] = fhir.all("CarePlan")
    suggested = scenarios.suggested_plan(card)
    assert plan["identifier"] == suggested["identifier"]  # the plan the card proposed
    # The sandbox sends "accepted" on every click, with a new timestamp each time.
    again = client.post(
        url,
        json=scenarios.accepted(card, "2024-04-15T10:05:00Z"),
        headers=auth(ec_key, aud=PUBLIC + url),
    )
    assert again.get_json()["plans"]["alreadyHandled"] == 1
    assert again.get_json()["details"][0]["reason"] == "the plan of this card was written before"
    assert transaction_calls(rsps) == 1
    assert len(fhir.all("CarePlan")) == 1
    # The next chart opening shows the plan on file, not the same suggestion again.
    body["prefetch"]["existingPlans"] = scenarios.searchset(fhir.all("CarePlan"))
    body["hookInstance"] = str(uuid.uuid4())
    [on_file] = client.post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key)).get_json()[
        "cards"
    ]
    assert "suggestions" not in on_file


def test_a_failed_write_is_tried_again_by_the_next_accepted_feedback(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, tmp_path: Path
) -> None:
    fhir = FakeFhirServer(rsps)
    resources = scenarios.high_risk()
    fhir.put(*resources)
    fhir.reject_transaction = (503, {"resourceType": "OperationOutcome", "issue": []})
    app = writing_app(engine, tmp_path)
    client = app.test_client()
    body = full_request(templates_of(app), resources, fhir_server=BASE, token=FHIR_TOKEN)
    card = client.post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key)).get_json()[
        "cards"
    ][0]
    url = f"/cds-services/{SERVICE}/feedback"
    failed = client.post(
        url,
        json=scenarios.accepted(card, "2024-04-15T10:01:00Z"),
        headers=auth(ec_key, aud=PUBLIC + url),
    )
    assert failed.status_code == 200 and failed.get_json()["plans"]["failed"] == 1
    fhir.reject_transaction = None
    retried = client.post(
        url,
        json=scenarios.accepted(card, "2024-04-15T10:02:00Z"),
        headers=auth(ec_key, aud=PUBLIC + url),
    )
    assert retried.get_json()["plans"]["written"] == 1
    assert len(fhir.all("CarePlan")) == 1


@pytest.mark.parametrize("case", ["option-off", "overridden", "other-fhir-server"])
def test_nothing_is_written_unless_asked_for(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, tmp_path: Path, case: str
) -> None:
    fhir = FakeFhirServer(rsps)
    resources = scenarios.high_risk()
    fhir.put(*resources)
    app = writing_app(engine, tmp_path, write_on_accept=case != "option-off")
    client = app.test_client()
    server = EHR_FHIR if case == "other-fhir-server" else BASE
    body = full_request(templates_of(app), resources, fhir_server=server, token=FHIR_TOKEN)
    card = client.post(f"/cds-services/{SERVICE}", json=body, headers=auth(ec_key)).get_json()[
        "cards"
    ][0]
    feedback = scenarios.accepted(card, "2024-04-15T10:01:00Z")
    if case == "overridden":
        feedback["feedback"][0] = {
            "card": card["uuid"],
            "outcome": "overridden",
            "outcomeTimestamp": "2024-04-15T10:01:00Z",
        }
    url = f"/cds-services/{SERVICE}/feedback"
    response = client.post(url, json=feedback, headers=auth(ec_key, aud=PUBLIC + url))
    assert response.status_code == 200
    assert response.get_json()["stored"] == 1
    assert transaction_calls(rsps) == 0
    if case == "option-off":
        assert "plans" not in response.get_json()


def test_create_app_wires_the_write_back_into_the_cds_edge(
    rsps: responses.RequestsMock, tmp_path: Path
) -> None:
    cds = CdsSettings(
        public_base_url=PUBLIC,
        trust=TrustConfig(mode="off"),
        state=StateSettings(sqlite_path=Path(tempfile.mkdtemp()) / "s.db"),
        write_on_accept=True,
    )
    app = create_app(
        Settings(
            fhir=FhirServerConfig(base_url=BASE),
            trust=TrustConfig(mode="off"),
            lock_dir=tmp_path / "locks",
            public_base_url=PUBLIC,
            cds=cds,
        )
    )
    with app.app_context():
        writer = current_cds().plan_writer
    assert writer is not None and writer.fhir_base_url == BASE
