"""Replay of one-shot client JWTs: the guard every store implements, and the key it keeps.

Shared by `fhir_dm.cds.state`, `fhir_dm.cds.redis_store` and the inbound trust of
`fhir_dm.web.trust`, so that none imports another for it: a token seen by one store kind is
keyed the same way by the other.
"""

from __future__ import annotations

import hashlib
from typing import Protocol


def replay_key(iss: str, jti: str) -> str:
    """A fixed-length key: both values come from the token, whatever their length."""
    return hashlib.sha256(f"{iss}\n{jti}".encode()).hexdigest()


class ReplayGuard(Protocol):
    """Remembers (iss, jti) until `exp`; raises AuthError("jwt rejected: jti replayed") if seen.

    `fhir_dm.web.trust.ReplayCache` is per process; `fhir_dm.cds.state` has stores every
    worker and host share.
    """

    def check_and_remember(self, iss: str, jti: str, exp: float) -> None: ...
