"""Optional FHIR terminology server: recognise codes the offline value sets do not hold.

Offline, SNOMED CT has no hierarchy, so a cancer coded more specifically than the configured
list is not recognised. With a terminology server configured (off by default), the codes of
the input that nothing offline recognises are checked before the core runs:
`CodeSystem/$subsumes` against the value-set roots of `config/terminology/server.yaml`, and
`ValueSet/$expand` of the value sets named there. The answers reach the pure core as a
`TerminologyOverlay`. Every check is bounded: a per-call timeout, a per-request time budget
(at most half of what is left of the request's deadline, if it has one), a per-request limit
on codes and calls, and a pause after the server failed to answer. A check that fails leaves
the code unrecognised, so its facts stay unknown, and the findings say so. Answers are cached
(bounded size, time to live). Logs name the reason, never a code.

Usage::

    server = TerminologyServer(TerminologyServerConfig(base_url="https://tx.example.org/fhir"),
                               knowledge.terminology)
    engine = ServerCheckedEngine(knowledge, server)     # or engine_for(knowledge, config)
    engine.assess(bundle, now=today)                    # asks the server, then runs the core
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import requests
from cachetools import TTLCache
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fhir_dm.common import deadline as deadlines
from fhir_dm.common.errors import FhirDmError
from fhir_dm.core.assess import AssessmentRun, Engine
from fhir_dm.core.inputs import PatientRecord
from fhir_dm.core.terminology import Code, TerminologyOverlay
from fhir_dm.fhir.auth import auth_from_config
from fhir_dm.fhir.config import AuthConfig, check_http_url
from fhir_dm.knowledge.models import Knowledge, Terminology

__all__ = [
    "ServerCheckedEngine",
    "TerminologyServer",
    "TerminologyServerConfig",
    "engine_for",
]

_log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
# $subsumes outcomes that put codeB (the patient's code) under codeA (the value-set root).
MEMBER_OUTCOMES = frozenset({"equivalent", "subsumes"})
SUBSUMES_OUTCOMES = MEMBER_OUTCOMES | {"subsumed-by", "not-subsumed"}
# Share of the request deadline's remaining time the checks may use (the core and any
# write-back need the rest).
DEADLINE_SHARE = 0.5

# Reasons, as the findings show them (no patient data).
TIMEOUT = "no answer in time"
UNREACHABLE = "server unreachable"
SERVER_ERROR = "server error"
REFUSED = "server refused the check"
UNREADABLE = "unreadable answer"
AUTH_FAILED = "could not log in to the server"
BUDGET_SPENT = "time budget for the request spent"
TOO_MANY_CODES = "more unknown codes than the per-request limit"
TOO_MANY_CALLS = "more checks than the per-request limit"
INCOMPLETE = "value-set expansion larger than the limit"
PAUSED = "server failed recently; not asked"


class TerminologyServerConfig(BaseModel):
    """Where the terminology server is and how much one request may spend on it.

    Usage::

        TerminologyServerConfig(base_url="https://tx.example.org/fhir", budget_seconds=5)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    timeout_seconds: float = Field(default=3.0, gt=0)
    budget_seconds: float = Field(default=8.0, gt=0)
    max_codes_per_request: int = Field(default=50, ge=1)
    max_calls_per_request: int = Field(default=200, ge=1)
    cache_size: int = Field(default=10_000, ge=1)
    cache_ttl_seconds: float = Field(default=86_400.0, gt=0)
    max_expansion_size: int = Field(default=10_000, ge=1)
    pause_after_failure_seconds: float = Field(default=30.0, ge=0)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        check_http_url(value, "terminology.base_url")
        return value.rstrip("/")


class _Failed(Exception):
    """One check could not be answered; `stop` when asking further is pointless now."""

    def __init__(self, reason: str, *, stop: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stop = stop


@dataclass(frozen=True, slots=True)
class _Expansion:
    codes: frozenset[Code]
    complete: bool


class _Budget:
    """The time and calls one request may still spend."""

    def __init__(self, seconds: float, calls: int, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._ends = clock() + seconds
        self._calls = calls
        self.stopped: str | None = None

    def take(self, timeout: float) -> float:
        """Account for one call; its timeout, cut to the time left (or _Failed)."""
        if self.stopped is not None:
            raise _Failed(self.stopped, stop=True)
        left = self._ends - self._clock()
        if left < deadlines.MIN_CALL_SECONDS:
            raise _Failed(BUDGET_SPENT, stop=True)
        if self._calls <= 0:
            raise _Failed(TOO_MANY_CALLS, stop=True)
        self._calls -= 1
        return min(timeout, left)


class TerminologyServer:
    """Checks codes against the value-set roots and expansions of `server_checks` (thread-safe).

    Usage::

        overlay = server.overlay({(system_url, code)})   # codes nothing offline knows
    """

    def __init__(
        self,
        config: TerminologyServerConfig,
        terminology: Terminology,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._session = session if session is not None else requests.Session()
        self._session.headers["Accept"] = FHIR_JSON
        self._auth = auth_from_config(config.auth, self._session)
        self._clock = clock
        roots: dict[str, list[tuple[str, str]]] = {}
        expansions: list[tuple[str, str]] = []
        for vs_id, check in terminology.server_checks.items():
            for root in check.descendants_of:
                assert root.code is not None  # guaranteed by ServerCheck's validator
                system = terminology.system_url(root.system)
                roots.setdefault(system, []).append((vs_id, root.code))
            expansions.extend((vs_id, url) for url in check.expansions)
        self._roots = roots
        self._expansions = expansions
        self._cache: TTLCache[tuple[str, ...], bool | _Expansion] = TTLCache(
            maxsize=config.cache_size, ttl=config.cache_ttl_seconds, timer=clock
        )
        self._lock = threading.Lock()
        self._paused_until = float("-inf")

    def overlay(self, codes: Iterable[Code]) -> TerminologyOverlay:
        """What the server says about `codes` (the ones nothing offline recognises)."""
        members: dict[Code, frozenset[str]] = {}
        unchecked: dict[Code, str] = {}
        budget = self._budget()
        if self._clock() < self._paused_until:
            budget.stopped = PAUSED
        limit = self._config.max_codes_per_request
        for n, code in enumerate(sorted(set(codes))):
            if n >= limit:
                unchecked[code] = TOO_MANY_CODES
                continue
            found, reason = self._check(code, budget)
            if found:
                members[code] = frozenset(found)
            if reason is not None:
                unchecked[code] = reason
        if unchecked:
            reasons = sorted(set(unchecked.values()))
            _log.warning(
                "terminology server: %d code(s) not checked (%s)",
                len(unchecked),
                "; ".join(reasons),
            )
        return TerminologyOverlay(members=members, unchecked=unchecked)

    def close(self) -> None:
        """Release the session's pooled connections."""
        self._session.close()

    # --- one code ---

    def _budget(self) -> _Budget:
        seconds = self._config.budget_seconds
        request_deadline = deadlines.current()
        if request_deadline is not None:
            seconds = min(seconds, request_deadline.remaining() * DEADLINE_SHARE)
        return _Budget(seconds, self._config.max_calls_per_request, self._clock)

    def _check(self, code: Code, budget: _Budget) -> tuple[set[str], str | None]:
        """The value sets the server puts `code` in, and why the check is incomplete (if so)."""
        system, value = code
        found: set[str] = set()
        reason: str | None = None
        checks = [("subsumes", vs_id, root) for vs_id, root in self._roots.get(system, ())]
        checks += [("expand", vs_id, url) for vs_id, url in self._expansions]
        for kind, vs_id, target in checks:
            if vs_id in found:
                continue
            try:
                if kind == "subsumes":
                    member = self._subsumes(system, target, value, budget)
                else:
                    member = self._in_expansion(target, code, budget)
            except _Failed as failure:
                reason = reason or failure.reason
                if failure.stop:
                    break
                continue
            if member:
                found.add(vs_id)
        return found, reason

    def _subsumes(self, system: str, root: str, code: str, budget: _Budget) -> bool:
        """Whether the root subsumes (or is) the code; cached."""
        if code == root:
            return True
        key = ("subsumes", system, root, code)
        cached = self._cached(key)
        if isinstance(cached, bool):
            return cached
        answer = self._get(
            "CodeSystem/$subsumes",
            {"system": system, "codeA": root, "codeB": code},
            budget,
        )
        outcome = _parameter(answer, "outcome", "valueCode")
        if outcome not in SUBSUMES_OUTCOMES:
            raise _Failed(UNREADABLE)
        member = outcome in MEMBER_OUTCOMES
        self._store(key, member)
        return member

    def _in_expansion(self, url: str, code: Code, budget: _Budget) -> bool:
        """Whether the value set's expansion lists the code; the expansion is cached."""
        key = ("expand", url)
        cached = self._cached(key)
        if isinstance(cached, _Expansion):
            expansion = cached
        else:
            answer = self._get(
                "ValueSet/$expand",
                {"url": url, "count": str(self._config.max_expansion_size)},
                budget,
            )
            expansion = _read_expansion(answer)
            self._store(key, expansion)
        if code in expansion.codes:
            return True
        if not expansion.complete:
            raise _Failed(INCOMPLETE)
        return False

    # --- HTTP ---

    def _get(self, operation: str, params: Mapping[str, str], budget: _Budget) -> Any:
        timeout = budget.take(self._config.timeout_seconds)
        try:
            response = self._session.get(
                f"{self._config.base_url}/{operation}",
                params=dict(params),
                timeout=(timeout, timeout),
                auth=self._auth,
            )
        except requests.Timeout:
            self._pause()
            budget.stopped = TIMEOUT
            raise _Failed(TIMEOUT, stop=True) from None
        except requests.RequestException:
            self._pause()
            budget.stopped = UNREACHABLE
            raise _Failed(UNREACHABLE, stop=True) from None
        except FhirDmError:  # the token request of SMART Backend Services failed
            self._pause()
            budget.stopped = AUTH_FAILED
            raise _Failed(AUTH_FAILED, stop=True) from None
        if response.status_code >= 500:
            raise _Failed(SERVER_ERROR)
        if response.status_code != 200:
            raise _Failed(REFUSED)
        try:
            return response.json()
        except ValueError:
            raise _Failed(UNREADABLE) from None

    def _pause(self) -> None:
        """After a timeout or a connection failure, leave the server alone for a while."""
        self._paused_until = self._clock() + self._config.pause_after_failure_seconds

    def _cached(self, key: tuple[str, ...]) -> bool | _Expansion | None:
        with self._lock:
            return self._cache.get(key)

    def _store(self, key: tuple[str, ...], value: bool | _Expansion) -> None:
        with self._lock:
            self._cache[key] = value


def _parameter(answer: Any, name: str, value_field: str) -> Any:
    """The value of one named parameter of a Parameters resource (None if absent)."""
    if not isinstance(answer, dict) or answer.get("resourceType") != "Parameters":
        raise _Failed(UNREADABLE)
    parameters = answer.get("parameter")
    if not isinstance(parameters, list):
        raise _Failed(UNREADABLE)
    for parameter in parameters:
        if isinstance(parameter, dict) and parameter.get("name") == name:
            return parameter.get(value_field)
    return None


def _read_expansion(answer: Any) -> _Expansion:
    """Every (system, code) of an expanded ValueSet, nested `contains` included."""
    if not isinstance(answer, dict) or answer.get("resourceType") != "ValueSet":
        raise _Failed(UNREADABLE)
    expansion = answer.get("expansion")
    if not isinstance(expansion, dict):
        raise _Failed(UNREADABLE)
    codes: set[Code] = set()
    todo = [expansion.get("contains") or []]
    while todo:
        items = todo.pop()
        if not isinstance(items, list):
            raise _Failed(UNREADABLE)
        for item in items:
            if not isinstance(item, dict):
                raise _Failed(UNREADABLE)
            system, code = item.get("system"), item.get("code")
            if isinstance(system, str) and isinstance(code, str):
                codes.add((system, code))
            todo.append(item.get("contains") or [])
    total = expansion.get("total")
    offset = expansion.get("offset") or 0
    complete = isinstance(total, int) and offset == 0 and total <= len(codes)
    return _Expansion(frozenset(codes), complete)


class ServerCheckedEngine(Engine):
    """The core `Engine`, after asking a terminology server about the codes it would miss.

    Every entry point (`assess`, `assess_records`) first collects the unrecognised codes of
    the input (`Matcher.server_codes`), asks the server, and passes the answers to the core
    as its `terminology` overlay. An overlay given by the caller is used as it is.
    """

    def __init__(self, knowledge: Knowledge, server: TerminologyServer, **options: Any) -> None:
        super().__init__(knowledge, **options)
        self.terminology_server = server

    def assess_records(
        self,
        records: list[PatientRecord],
        *,
        now: date | datetime,
        terminology: TerminologyOverlay | None = None,
    ) -> AssessmentRun:
        if terminology is None:
            codes = self.matcher.server_codes(
                resource for record in records for _, resource in record.resources
            )
            terminology = self.terminology_server.overlay(codes) if codes else None
        return super().assess_records(records, now=now, terminology=terminology)


def engine_for(
    knowledge: Knowledge, config: TerminologyServerConfig | None, **options: Any
) -> Engine:
    """An `Engine`, checking unknown codes with a terminology server when one is configured."""
    if config is None:
        return Engine(knowledge, **options)
    return ServerCheckedEngine(
        knowledge, TerminologyServer(config, knowledge.terminology), **options
    )
