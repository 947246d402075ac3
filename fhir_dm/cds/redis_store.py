"""The shared CDS state in Redis, for several hosts: seen JWT ids, issued cards, feedback.

Keys (all under `prefix`, e.g. `fhir-dm`):

- `{p}:jti:{sha256}`                     `SET NX EX`: one use per token, forgotten at expiry
- `{p}:card:{service}:{uuid}`            hash of an issued card, expires after retention
- `{p}:issued:{service}:{type}`          sorted set of card uuids by time issued (counts)
- `{p}:feedback:{service}:{sha256}`      de-duplication mark of one feedback item
- `{p}:counts:{service}`                 hash of counters (reasons, comments)
- `{p}:cards:{service}:{type}:{outcome}` set of card uuids with that outcome (counted per card)
- `{p}:reason-display:{service}`         hash of the display of each override reason
- `{p}:comments:{service}`               list of override comments (only if kept)
- `{p}:write:{service}:{uuid}`           claim of writing an accepted plan (pending/done)

Feedback is recorded by a Lua script, so its de-duplication mark and its counters change
together or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import redis

from fhir_dm.cds.feedback import (
    DEFAULT_RETENTION_DAYS,
    MAX_COMMENT_CHARS,
    UNKNOWN_CARD_TYPE,
    CardTypeCounts,
    FeedbackReceipt,
    FeedbackSummary,
    IssuedCardRecord,
    ReasonCount,
)
from fhir_dm.cds.models import FeedbackItem
from fhir_dm.cds.replay import replay_key
from fhir_dm.common.errors import AuthError, KnowledgeError

logger = logging.getLogger(__name__)

_DAY_SECONDS = 86400
SOCKET_TIMEOUT_SECONDS = 5.0
WRITE_DONE = "done"
WRITE_PENDING = "pending"

# KEYS: mark, counts, displays, comments. ARGV: ttl, outcome field, reason field ('' if none),
# reason display, has comment (0/1), comment json ('' if not kept).
_RECORD_FEEDBACK = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if ARGV[3] ~= '' then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[3], ARGV[4]) end
end
if ARGV[5] == '1' then redis.call('HINCRBY', KEYS[2], 'comments', 1) end
if ARGV[6] ~= '' then redis.call('RPUSH', KEYS[4], ARGV[6]) end
return 1
"""


def connect(url: str) -> redis.Redis:
    """A client for `url`; KnowledgeError when the server does not answer (start-up fails)."""
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
            decode_responses=True,
        )
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        # The URL may hold a password: only the kind of failure is reported.
        raise KnowledgeError(f"cds.state: Redis is not reachable: {type(exc).__name__}") from None
    return client


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


class RedisReplayStore:
    """Remembers (iss, jti) in Redis until the token expires (`SET NX EX`), for every host."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        leeway_seconds: float = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._leeway = leeway_seconds
        self._clock = clock

    def check_and_remember(self, iss: str, jti: str, exp: float) -> None:
        """Raise AuthError when the key exists (replayed) or Redis cannot say (fail closed)."""
        ttl = max(1, math.ceil(exp + self._leeway - self._clock()))
        key = f"{self._prefix}:jti:{replay_key(iss, jti)}"
        try:
            first = self._client.set(key, "1", nx=True, ex=ttl)
        except redis.RedisError as exc:
            logger.error("replay store unavailable: %s", type(exc).__name__)
            raise AuthError("jwt rejected: replay store unavailable") from exc
        if not first:
            raise AuthError("jwt rejected: jti replayed")


class RedisFeedbackStore:
    """`FeedbackStore`'s contract (see `fhir_dm.cds.feedback.CdsStore`) on Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        keep_comments: bool = False,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._keep_comments = keep_comments
        self._retention = retention_days * _DAY_SECONDS
        self._clock = clock
        self._record = client.register_script(_RECORD_FEEDBACK)

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    def record_issued(self, service_id: str, cards: Iterable[IssuedCardRecord]) -> None:
        """Remember returned cards (idempotent per card uuid); drop counts past retention."""
        now = self._clock()
        pipe = self._client.pipeline(transaction=True)
        types: set[str] = set()
        for card in cards:
            types.add(card.card_type)
            key = self._key("card", service_id, card.card_uuid)
            pipe.hsetnx(key, "type", card.card_type)
            pipe.hsetnx(key, "tier", card.tier or "")
            pipe.hsetnx(key, "suggestion", card.suggestion_uuid or "")
            pipe.hsetnx(key, "patient", card.patient_id or "")
            pipe.hsetnx(key, "note", card.write_note or "")
            pipe.expire(key, self._retention)
            issued = self._key("issued", service_id, card.card_type)
            pipe.zadd(issued, {card.card_uuid: now}, nx=True)
        if not types:
            return
        pipe.sadd(self._key("issued-types", service_id), *sorted(types))
        pipe.execute()

    def record_feedback(
        self,
        service_id: str,
        items: Sequence[FeedbackItem],
        *,
        reason_display: Callable[[str | None, str | None], str | None] = lambda s, c: None,
    ) -> FeedbackReceipt:
        """Store feedback items; duplicates are counted, not stored again."""
        stored = duplicates = unattributed = 0
        for item in items:
            found = cast(
                str | None, self._client.hget(self._key("card", service_id, item.card), "type")
            )
            card_type = found or UNKNOWN_CARD_TYPE
            if found is None:
                unattributed += 1
            reason = item.override_reason.reason if item.override_reason else None
            comment = item.override_reason.user_comment if item.override_reason else None
            system = reason.system if reason else ""
            code = reason.code if reason else ""
            display = reason_display(system, code) or (reason.display if reason else "") or ""
            timestamp = item.outcome_timestamp.isoformat()
            mark = _digest(item.card, item.outcome, timestamp, system, code)
            reason_field = ""
            if item.outcome == "overridden":
                reason_field = f"reason\n{system}\n{code}" if code else "no-reason"
            has_comment = bool(comment and comment.strip())
            kept = ""
            if has_comment and self._keep_comments and comment:
                kept = json.dumps({"card": item.card, "comment": comment[:MAX_COMMENT_CHARS]})
            result = self._record(
                keys=[
                    self._key("feedback", service_id, mark),
                    self._key("counts", service_id),
                    self._key("reason-display", service_id),
                    self._key("comments", service_id),
                ],
                args=[
                    self._retention,
                    f"outcome\n{card_type}\n{item.outcome}",
                    reason_field,
                    display if code else "",
                    "1" if has_comment else "0",
                    kept,
                ],
            )
            if result == 1:
                stored += 1
                # Per card, not per click: the same card accepted twice counts once.
                outcome_cards = self._key("cards", service_id, card_type, item.outcome)
                pipe = self._client.pipeline(transaction=True)
                pipe.sadd(outcome_cards, item.card)
                pipe.expire(outcome_cards, self._retention)
                pipe.execute()
            else:
                duplicates += 1
        return FeedbackReceipt(stored, duplicates, unattributed)

    def summary(self, service_id: str) -> FeedbackSummary:
        """Issued / accepted / overridden per card type, and override reasons by count."""
        now = self._clock()
        counts: dict[str, CardTypeCounts] = {}
        types = cast(set[str], self._client.smembers(self._key("issued-types", service_id)))
        for card_type in sorted(types):
            key = self._key("issued", service_id, card_type)
            self._client.zremrangebyscore(key, "-inf", now - self._retention)
            counts.setdefault(card_type, CardTypeCounts()).issued = int(self._client.zcard(key))
        raw = cast(dict[str, str], self._client.hgetall(self._key("counts", service_id)))
        displays = cast(
            dict[str, str], self._client.hgetall(self._key("reason-display", service_id))
        )
        reasons: list[ReasonCount] = []
        for name, value in raw.items():
            kind, _, rest = name.partition("\n")
            if kind == "outcome":
                card_type, _, outcome = rest.partition("\n")
                entry = counts.setdefault(card_type, CardTypeCounts())
                cards = int(self._client.scard(self._key("cards", service_id, card_type, outcome)))
                if outcome == "accepted":
                    entry.accepted = cards
                else:
                    entry.overridden = cards
            elif kind == "reason":
                system, _, code = rest.partition("\n")
                reasons.append(ReasonCount(system, code, displays.get(name, ""), int(value)))
        reasons.sort(key=lambda r: (-r.count, r.code))
        return FeedbackSummary(
            service_id=service_id,
            card_types=counts,
            override_reasons=tuple(reasons),
            overridden_without_reason=int(raw.get("no-reason", 0)),
            comments=int(raw.get("comments", 0)),
        )

    def issued_card(self, service_id: str, card_uuid: str) -> IssuedCardRecord | None:
        """The record of a returned card, or None (unknown, or past retention)."""
        data = cast(dict[str, str], self._client.hgetall(self._key("card", service_id, card_uuid)))
        if not data.get("type"):
            return None
        return IssuedCardRecord(
            card_uuid,
            data["type"],
            data.get("tier") or None,
            data.get("suggestion") or None,
            data.get("patient") or None,
            data.get("note") or None,
        )

    def claim_write(self, service_id: str, card_uuid: str, *, stale_after: float) -> bool:
        """`SET NX`: True for exactly one caller; a pending claim lapses after `stale_after`."""
        key = self._key("write", service_id, card_uuid)
        return bool(
            self._client.set(key, WRITE_PENDING, nx=True, ex=max(1, math.ceil(stale_after)))
        )

    def finish_write(self, service_id: str, card_uuid: str) -> None:
        """Keep the claim for the retention period; forget the card's patient id."""
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._key("write", service_id, card_uuid), WRITE_DONE, ex=self._retention)
        pipe.hset(self._key("card", service_id, card_uuid), "patient", "")
        pipe.execute()

    def release_write(self, service_id: str, card_uuid: str) -> None:
        """The write failed: let a later accepted feedback try again."""
        key = self._key("write", service_id, card_uuid)
        if self._client.get(key) == WRITE_PENDING:
            self._client.delete(key)

    def close(self) -> None:
        self._client.close()
