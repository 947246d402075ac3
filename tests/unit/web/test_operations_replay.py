"""The FHIR operations' JWT `jti` store is shared by every worker, like the CDS Hooks one."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_dm.cds.state import SqliteReplayStore, StateSettings
from fhir_dm.web.app import create_app
from fhir_dm.web.cds_hooks import CdsSettings
from fhir_dm.web.trust import AuthError, IssuerTrust, TrustConfig
from tests.unit.web.conftest import make_settings, service_of

ISS = "https://ehr.example.org"


def test_two_workers_share_the_operations_jti_store(tmp_path: Path) -> None:
    """Two app instances (two workers) with JWT trust: a jti seen by one is a replay for both."""
    state = StateSettings(sqlite_path=tmp_path / "state.sqlite3")
    trust = TrustConfig(mode="jwt", issuers=(IssuerTrust(iss=ISS, jwks_url=f"{ISS}/jwks"),))
    settings = make_settings(
        tmp_path, trust=trust, cds=CdsSettings(enabled=False, trust=trust, state=state)
    )
    first, second = (service_of(create_app(settings)).auth for _ in range(2))
    replay_first = first._verifier._replay  # type: ignore[union-attr]
    replay_second = second._verifier._replay  # type: ignore[union-attr]
    assert isinstance(replay_first, SqliteReplayStore)
    replay_first.check_and_remember(ISS, "jti-1", 4102444800)
    with pytest.raises(AuthError, match="replayed"):
        replay_second.check_and_remember(ISS, "jti-1", 4102444800)
