"""Shared CDS state: a JWT is accepted once across processes; feedback is counted once for all.

Both backends run for real: a SQLite file, and a `redis-server` this module starts on a free
loopback port.
"""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import responses
from cryptography.hazmat.primitives.asymmetric import ec

from fhir_dm.cds.feedback import FeedbackStore, IssuedCardRecord
from fhir_dm.cds.models import FeedbackRequest
from fhir_dm.cds.redis_store import RedisFeedbackStore, RedisReplayStore
from fhir_dm.cds.state import SqliteReplayStore, StateSettings, open_state
from fhir_dm.common.errors import AuthError, KnowledgeError
from fhir_dm.core.assess import Engine
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.web.cds_hooks import current_cds
from tests.redis_server import RedisServer
from tests.unit.cds import scenarios
from tests.unit.web.test_cds_hooks import (
    JWKS_URL,
    NOW_EPOCH,
    PUBLIC,
    SERVICE,
    auth,
    ec_key,
    full_request,
    make_app,
    rsps,
    token,
)

__all__ = ["ec_key", "rsps"]  # fixtures shared with test_cds_hooks

WORKERS = 4
SERVICE_ID = "dm-cancer-screening"

Json = dict[str, Any]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.integration)])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> StateSettings:
    """One backend's settings, isolated per test (own file, or own key prefix)."""
    if request.param == "sqlite":
        return StateSettings(sqlite_path=tmp_path / "state" / "cds.sqlite3")
    url = request.getfixturevalue("redis_url")
    return StateSettings(backend="redis", redis_url=url, key_prefix=f"t-{uuid.uuid4().hex}")


def _public_jwk(key: ec.EllipticCurvePrivateKey) -> Json:
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": "ec-1", "use": "sig", "alg": "ES384"}


def _post_hook_once(
    state: Json, jwk: Json, bearer: str, body: Json, barrier: Any, results: Any
) -> None:
    """One worker process: its own app, replay guard and store; posts when all are ready."""
    engine = Engine(load_knowledge(), software_version="test")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(JWKS_URL, json={"keys": [jwk]})
        app = make_app(engine, state=StateSettings.model_validate(state))
        client = app.test_client()
        barrier.wait(timeout=120)
        response = client.post(
            f"/cds-services/{SERVICE}", json=body, headers={"Authorization": f"Bearer {bearer}"}
        )
        results.put(response.status_code)


def test_one_jwt_posted_by_four_processes_at_once_is_accepted_once(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, state: StateSettings
) -> None:
    app = make_app(engine)
    with app.app_context():
        templates = current_cds().templates
    body = full_request(templates, scenarios.high_risk())
    bearer = token(ec_key)
    settings = state.model_dump(mode="json")
    if state.redis_url is not None:
        settings["redis_url"] = state.redis_url.get_secret_value()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    results = context.Queue()
    workers = [
        context.Process(
            target=_post_hook_once,
            args=(settings, _public_jwk(ec_key), bearer, body, barrier, results),
        )
        for _ in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    statuses = sorted(results.get(timeout=180) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert statuses == [200, 401, 401, 401]


def test_feedback_counts_are_the_same_whichever_worker_answers(
    engine: Engine, rsps: responses.RequestsMock, ec_key: Any, state: StateSettings
) -> None:
    first = make_app(engine, state=state).test_client()  # two "workers", one store
    second = make_app(engine, state=state).test_client()
    with first.application.app_context():
        templates = current_cds().templates
    hook = f"/cds-services/{SERVICE}"
    cards = [
        first.post(hook, json=full_request(templates, s()), headers=auth(ec_key)).get_json()[
            "cards"
        ][0]
        for s in (scenarios.high_risk, scenarios.standard_risk)
    ]
    url = f"{hook}/feedback"
    body = {
        "feedback": [
            {
                "card": cards[0]["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": cards[0]["suggestions"][0]["uuid"]}],
                "outcomeTimestamp": "2024-04-15T10:01:00Z",
            },
            {
                "card": cards[1]["uuid"],
                "outcome": "overridden",
                "outcomeTimestamp": "2024-04-15T10:02:00Z",
            },
        ]
    }
    assert second.post(url, json=body, headers=auth(ec_key, aud=PUBLIC + url)).get_json() == {
        "stored": 2,
        "duplicates": 0,
    }
    assert first.post(url, json=body, headers=auth(ec_key, aud=PUBLIC + url)).get_json() == {
        "stored": 0,
        "duplicates": 2,
    }
    summary_url = f"{url}/summary"
    summaries = [
        c.get(summary_url, headers=auth(ec_key, aud=PUBLIC + summary_url)).get_json()
        for c in (first, second, first, second)
    ]
    assert all(s == summaries[0] for s in summaries)
    assert summaries[0]["cardTypes"] == {
        "screening-plan": {"issued": 2, "accepted": 1, "overridden": 1}
    }


def test_a_jti_is_remembered_until_the_token_expires(
    state: StateSettings, request: pytest.FixtureRequest
) -> None:
    now = [NOW_EPOCH]
    shared = open_state(
        state, keep_comments=False, retention_days=1, leeway_seconds=30, clock=lambda: now[0]
    )
    other = open_state(
        state, keep_comments=False, retention_days=1, leeway_seconds=30, clock=lambda: now[0]
    )
    shared.replay.check_and_remember("iss", "jti-1", NOW_EPOCH + 300)
    with pytest.raises(AuthError, match="replayed"):
        other.replay.check_and_remember("iss", "jti-1", NOW_EPOCH + 300)
    other.replay.check_and_remember("other-iss", "jti-1", NOW_EPOCH + 300)  # per issuer
    if isinstance(shared.replay, SqliteReplayStore):
        now[0] = NOW_EPOCH + 331  # expired (with leeway): the row is taken over
        other.replay.check_and_remember("iss", "jti-1", NOW_EPOCH + 600)
        with pytest.raises(AuthError, match="replayed"):
            shared.replay.check_and_remember("iss", "jti-1", NOW_EPOCH + 600)
    else:
        assert isinstance(shared.replay, RedisReplayStore)
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        [key] = client.keys(f"{state.key_prefix}:jti:*")[:1]
        assert 320 <= client.ttl(key) <= 330  # SET NX EX: exp + leeway - now
        client.close()


def test_an_unreachable_redis_stops_start_up() -> None:
    dead = StateSettings(backend="redis", redis_url="redis://127.0.0.1:9/0")
    with pytest.raises(KnowledgeError, match="Redis is not reachable"):
        open_state(dead, keep_comments=False, retention_days=1)
    with pytest.raises(ValueError, match=r"needs state\.redis_url"):
        StateSettings(backend="redis")


def _items(*feedback: Json) -> Any:
    return FeedbackRequest.model_validate({"feedback": list(feedback)}).feedback


@pytest.mark.integration  # a real redis-server
def test_the_redis_store_counts_like_the_sqlite_store(redis_url: str) -> None:
    reasons = "http://fhir-dm.org/fhir/CodeSystem/dm-cds-override-reason"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stores = [
        FeedbackStore(clock=lambda: NOW_EPOCH),
        RedisFeedbackStore(client, prefix=f"t-{uuid.uuid4().hex}", clock=lambda: NOW_EPOCH),
    ]
    summaries = []
    for store in stores:
        store.record_issued(
            SERVICE_ID,
            [
                IssuedCardRecord("c1", "screening-plan", "high", "s1", "p1"),
                IssuedCardRecord("c2", "screening-plan", "moderate", "s2"),
                IssuedCardRecord("c3", "plan-on-file", "high"),
            ],
        )
        items = _items(
            {
                "card": "c1",
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": "s1"}],
                "outcomeTimestamp": "2024-04-15T10:00:00Z",
            },
            {
                "card": "c2",
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {"system": reasons, "code": "patient-declined"},
                    "userComment": "x",
                },
                "outcomeTimestamp": "2024-04-15T10:00:00Z",
            },
            {"card": "c3", "outcome": "overridden", "outcomeTimestamp": "2024-04-15T10:00:00Z"},
            {"card": "zz", "outcome": "overridden", "outcomeTimestamp": "2024-04-15T10:00:00Z"},
        )
        receipt = store.record_feedback(
            SERVICE_ID, items, reason_display=lambda s, c: "Patient declined"
        )
        assert (receipt.stored, receipt.duplicates, receipt.unattributed) == (4, 0, 1)
        again = store.record_feedback(SERVICE_ID, items)
        assert (again.stored, again.duplicates) == (0, 4)
        summaries.append(store.summary(SERVICE_ID).as_json())
        record = store.issued_card(SERVICE_ID, "c1")
        assert record == IssuedCardRecord("c1", "screening-plan", "high", "s1", "p1")
        assert store.issued_card(SERVICE_ID, "nope") is None
        # Claims: one winner; a released claim can be taken again; a finished one never.
        assert store.claim_write(SERVICE_ID, "c1", stale_after=60)
        assert not store.claim_write(SERVICE_ID, "c1", stale_after=60)
        store.release_write(SERVICE_ID, "c1")
        assert store.claim_write(SERVICE_ID, "c1", stale_after=60)
        store.finish_write(SERVICE_ID, "c1")
        assert not store.claim_write(SERVICE_ID, "c1", stale_after=60)
        finished = store.issued_card(SERVICE_ID, "c1")
        assert finished is not None and finished.patient_id is None  # forgotten once written
    assert summaries[0] == summaries[1]
    assert summaries[0]["cardTypes"]["unknown"] == {"issued": 0, "accepted": 0, "overridden": 1}
    assert summaries[0]["overrideReasons"][0]["count"] == 1
    client.close()


@pytest.mark.integration  # starts a real redis-server
def test_both_stores_count_cards_not_clicks_and_keep_the_write_note(redis_url: str) -> None:
    """The sandbox sends `accepted` on every click: one card accepted three times counts once."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stores = [
        FeedbackStore(clock=lambda: NOW_EPOCH),
        RedisFeedbackStore(client, prefix=f"t-{uuid.uuid4().hex}", clock=lambda: NOW_EPOCH),
    ]
    note = "FHIR server differs: the EHR named http://a/fhir, this service writes to http://b/fhir"
    for store in stores:
        store.record_issued(
            SERVICE_ID,
            [
                IssuedCardRecord("c1", "screening-plan", "high", "s1", None, note),
                IssuedCardRecord("c2", "screening-plan", "high", "s2"),
            ],
        )
        clicks = [
            {
                "card": "c1",
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": "s1"}],
                "outcomeTimestamp": f"2024-04-15T10:0{n}:00Z",
            }
            for n in range(3)
        ]
        store.record_feedback(SERVICE_ID, _items(*clicks))
        summary = store.summary(SERVICE_ID).as_json()
        assert summary["cardTypes"]["screening-plan"] == {
            "issued": 2,
            "accepted": 1,
            "overridden": 0,
        }
        record = store.issued_card(SERVICE_ID, "c1")
        assert record is not None and record.write_note == note and record.patient_id is None
    client.close()
