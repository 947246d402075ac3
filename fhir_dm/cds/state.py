"""State every worker and host of the CDS Hooks edge must share: seen JWT ids and feedback.

A JWT is valid once (`jti`), and feedback counts must not depend on which worker answered, so
neither may live in one process's memory. Two backends:

- `sqlite` (default): one file per host, shared by its worker processes (WAL, busy timeout).
  Its `jti` check is one atomic statement: insert, or take over a row whose token expired.
- `redis`: shared by every host; `SET key 1 NX EX ttl` for the `jti`, see `redis_store`.

Usage::

    state = open_state(StateSettings(), keep_comments=False, retention_days=365)
    InboundAuth(trust, session=session, replay=state.replay)
    state.store.record_issued(...)
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from fhir_dm.cds.feedback import BUSY_TIMEOUT_SECONDS, CdsStore, FeedbackStore
from fhir_dm.cds.replay import ReplayGuard, replay_key
from fhir_dm.common.errors import AuthError, KnowledgeError

logger = logging.getLogger(__name__)

Backend = Literal["sqlite", "redis"]
DEFAULT_KEY_PREFIX = "fhir-dm"
# Expired rows are purged on one insert in this many, so the table stays small.
PURGE_EVERY = 256

_REPLAY_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_jti (
    key TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_jti_expires ON seen_jti (expires_at);
"""


def default_state_path() -> Path:
    """A per-host file every worker of this host agrees on (set `sqlite_path` to keep it)."""
    return Path(tempfile.gettempdir()) / "fhir-dm-state" / "cds.sqlite3"


class StateSettings(BaseModel):
    """Where the shared CDS state lives.

    Usage::

        StateSettings()                                     # SQLite file in the temp directory
        StateSettings(sqlite_path=Path("/var/lib/fhir-dm/cds.sqlite3"))
        StateSettings(backend="redis", redis_url="redis://cache.internal:6379/0")

    The SQLite file is shared by the worker processes of one host; several hosts need Redis.
    `redis_url` may carry a password, so it is a secret (never logged).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend = "sqlite"
    sqlite_path: Path = Field(default_factory=default_state_path)
    redis_url: SecretStr | None = None
    key_prefix: str = Field(default=DEFAULT_KEY_PREFIX, min_length=1, pattern=r"^[A-Za-z0-9:_.-]+$")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> StateSettings:
        if self.backend == "redis" and self.redis_url is None:
            raise ValueError("state.backend 'redis' needs state.redis_url")
        return self


class SqliteReplayStore:
    """Remembers (iss, jti) in a SQLite file until the token expires, for every process.

    Usage::

        replay = SqliteReplayStore(Path("/var/lib/fhir-dm/cds.sqlite3"), leeway_seconds=30)
        replay.check_and_remember(iss, jti, exp)   # AuthError the second time
    """

    def __init__(
        self, path: Path, *, leeway_seconds: float = 0, clock: Callable[[], float] = time.time
    ) -> None:
        self._path = path
        self._leeway = leeway_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._inserts = 0
        self._pid = os.getpid()
        self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self._path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_REPLAY_SCHEMA)
        return db

    def _db(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # never use a connection inherited through fork()
            self._pid = os.getpid()
            self._conn = self._open()
        return self._conn

    def check_and_remember(self, iss: str, jti: str, exp: float) -> None:
        """Insert-if-absent in one statement; an expired row counts as absent."""
        now = self._clock()
        with self._lock:
            db = self._db()
            try:
                cursor = db.execute(
                    "INSERT INTO seen_jti (key, expires_at) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at"
                    " WHERE seen_jti.expires_at < ?",
                    (replay_key(iss, jti), exp + self._leeway, now),
                )
            except sqlite3.Error as exc:
                # Fail closed: a token that cannot be remembered could be replayed.
                logger.error("replay store unavailable: %s", type(exc).__name__)
                raise AuthError("jwt rejected: replay store unavailable") from exc
            if cursor.rowcount != 1:
                raise AuthError("jwt rejected: jti replayed")
            self._inserts += 1
            if self._inserts % PURGE_EVERY == 0:
                db.execute("DELETE FROM seen_jti WHERE expires_at < ?", (now,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass(frozen=True, slots=True)
class SharedState:
    """The replay guard and the card/feedback store, from the same backend."""

    replay: ReplayGuard
    store: CdsStore
    description: str


def open_replay(
    settings: StateSettings, *, leeway_seconds: float = 0, clock: Callable[[], float] = time.time
) -> ReplayGuard:
    """Only the shared `jti` store (the FHIR operations' JWTs); KnowledgeError when unusable."""
    if settings.backend == "redis":
        from fhir_dm.cds.redis_store import RedisReplayStore, connect

        assert settings.redis_url is not None  # guaranteed by the validator
        client = connect(settings.redis_url.get_secret_value())
        return RedisReplayStore(
            client, prefix=settings.key_prefix, leeway_seconds=leeway_seconds, clock=clock
        )
    try:
        return SqliteReplayStore(settings.sqlite_path, leeway_seconds=leeway_seconds, clock=clock)
    except (OSError, sqlite3.Error) as exc:
        raise KnowledgeError(
            f"state: the SQLite file cannot be opened: {type(exc).__name__}"
        ) from None


def open_state(
    settings: StateSettings,
    *,
    keep_comments: bool,
    retention_days: int,
    leeway_seconds: float = 0,
    clock: Callable[[], float] = time.time,
) -> SharedState:
    """Open the configured backend; KnowledgeError (start-up fails) when it is unusable."""
    if settings.backend == "redis":
        from fhir_dm.cds.redis_store import (
            RedisFeedbackStore,
            RedisReplayStore,
            connect,
        )

        assert settings.redis_url is not None  # guaranteed by the validator
        client = connect(settings.redis_url.get_secret_value())
        return SharedState(
            replay=RedisReplayStore(
                client, prefix=settings.key_prefix, leeway_seconds=leeway_seconds, clock=clock
            ),
            store=RedisFeedbackStore(
                client,
                prefix=settings.key_prefix,
                keep_comments=keep_comments,
                retention_days=retention_days,
                clock=clock,
            ),
            description="redis",
        )
    path = settings.sqlite_path
    try:
        replay = SqliteReplayStore(path, leeway_seconds=leeway_seconds, clock=clock)
        store = FeedbackStore(
            str(path), keep_comments=keep_comments, retention_days=retention_days, clock=clock
        )
    except (OSError, sqlite3.Error) as exc:
        raise KnowledgeError(
            f"cds.state: the SQLite file cannot be opened: {type(exc).__name__}"
        ) from None
    return SharedState(replay=replay, store=store, description="sqlite file")
