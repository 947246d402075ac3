"""The key every replay store (SQLite on one host, Redis on several) keeps for a token.

Shared by `fhir_dm.cds.state` and `fhir_dm.cds.redis_store`, so that neither imports the other
for it: a token seen by one store kind is keyed the same way by the other.
"""

from __future__ import annotations

import hashlib


def replay_key(iss: str, jti: str) -> str:
    """A fixed-length key: both values come from the token, whatever their length."""
    return hashlib.sha256(f"{iss}\n{jti}".encode()).hexdigest()
