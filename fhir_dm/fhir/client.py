"""The service's only HTTP I/O: reads, paged searches and transactions against one FHIR server."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import urljoin, urlsplit

import requests
import tenacity
from requests.auth import AuthBase

from fhir_dm.common import deadline as deadlines
from fhir_dm.common.deadline import Deadline
from fhir_dm.common.errors import (
    DeadlineExceededError,
    FhirBaseUnreachableError,
    KnowledgeError,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamThrottledError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from fhir_dm.common.metrics import FHIR_ERRORS
from fhir_dm.core.ids import check_fhir_id
from fhir_dm.fhir.auth import NoAuth, auth_from_config
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.fhir.retry import RetryPolicy, is_idempotent_bundle, parse_retry_after

__all__ = ["FhirClient", "check_fhir_base", "client_from_config", "upstream_status"]

# The FHIR versions fhir-dm reads (R4); the names of the others, for a message that says why.
READS_FHIR_VERSION = "4.0."
FHIR_RELEASES = {"1.0.": "DSTU2", "3.0.": "STU3", "4.0.": "R4", "4.3.": "R4B", "5.0.": "R5"}

_log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
DEFAULT_TIMEOUT = (5.0, 30.0)
DEFAULT_PAGE_SIZE = 200
DEFAULT_MAX_PAGES = 100
MAX_DIAGNOSTICS_CHARS = 300
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_DEFAULT_PORTS = {"http": 80, "https": 443}

Resource = dict[str, Any]
SearchParams = Mapping[str, str | Sequence[str]]


# Statuses worth repeating for an idempotent transaction only (see `FhirClient.transaction`).
TRANSIENT_TRANSACTION_STATUSES = frozenset({500})


class FhirClient:
    """A FHIR R4 REST client over one `requests.Session`, with every verb on one request path.

    Usage::

        with FhirClient("http://localhost:8080/fhir", auth=BearerAuth(token)) as fhir:
            patient = fhir.read("Patient", patient_id)              # None when 404/410
            conditions = fhir.search("Condition", {"patient": patient_id})
            response = fhir.transaction(bundle, idempotent=True)    # retried: all conditional

    GETs, and transactions declared idempotent, are retried on 429/502/503/504, timeouts and
    connection errors; everything else fails on the first error. Failures raise the
    `UpstreamError` tree; messages and logs name the call, never ids, query values or bodies.
    The client owns `session` and closes it in `close()`.

    Every call respects a deadline (`deadline`, else the current one of `fhir_dm.common.deadline`):
    timeouts are cut to the time left, and a retry is not made when its wait would outlast it
    or when the server's `Retry-After` asks for more than `max_backoff`; a 429/503 then raises
    `UpstreamUnavailableError` carrying that `Retry-After`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        auth: AuthBase | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        max_pages: int = DEFAULT_MAX_PAGES,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        deadline: Deadline | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._origin = url_origin(self._base_url)
        self._session = session if session is not None else requests.Session()
        self._session.headers["Accept"] = FHIR_JSON
        self._auth = auth if auth is not None else NoAuth()
        self._timeout = timeout
        self._retry = retry if retry is not None else RetryPolicy()
        self._page_size = page_size
        self._max_pages = max_pages
        self._sleep = sleep
        self._clock = clock
        self._deadline = deadline

    @property
    def base_url(self) -> str:
        """The server's base URL, without a trailing slash."""
        return self._base_url

    def read(self, resource_type: str, id: str) -> Resource | None:
        """GET one resource; None when the server says it does not exist (404) or is gone (410)."""
        _check_resource_type(resource_type)
        check_fhir_id(id, f"{resource_type} id")
        response = self._request(
            "GET",
            f"{self._base_url}/{resource_type}/{id}",
            call=f"GET {resource_type}/{{id}}",
            resource_type=resource_type,
            safe=True,
            absent_statuses=frozenset({404, 410}),
        )
        if response is None:
            return None
        return _fhir_json(response, f"GET {resource_type}/{{id}}")

    def search(self, resource_type: str, params: SearchParams) -> list[Resource]:
        """Every resource of every page (matches and `_include`s; `outcome` entries dropped)."""
        return [
            entry["resource"]
            for entry in self.search_bundle_entries(resource_type, params)
            if isinstance(entry.get("resource"), dict)
            and _search_mode(entry) in ("match", "include")
        ]

    def search_bundle_entries(self, resource_type: str, params: SearchParams) -> list[Resource]:
        """Every Bundle entry of every page, following `next` links on the server's own host.

        `_count` is set to the page size unless given. A `next` link to another host is refused
        (credentials go to the configured server only) and more than `max_pages` pages fail,
        so a server that pages forever cannot hold a request forever.
        """
        _check_resource_type(resource_type)
        call = f"GET {resource_type}?…"
        query = _query_pairs(params)
        if not any(name == "_count" for name, _ in query):
            query.append(("_count", str(self._page_size)))
        url: str | None = f"{self._base_url}/{resource_type}"
        query_or_none: list[tuple[str, str]] | None = query
        entries: list[Resource] = []
        pages = 0
        while url is not None:
            if pages >= self._max_pages:
                raise _upstream_error(
                    UpstreamError,
                    f"{call} failed: paging limit exceeded ({self._max_pages} pages)",
                    None,
                )
            response = self._request(
                "GET", url, call=call, resource_type=resource_type, safe=True, params=query_or_none
            )
            assert response is not None
            bundle = _fhir_json(response, call, expected_type="Bundle")
            pages += 1
            page_entries = bundle.get("entry") or []
            if not isinstance(page_entries, list):
                raise _not_fhir(call, response.status_code)
            entries.extend(entry for entry in page_entries if isinstance(entry, dict))
            url = self._next_link(bundle, call)
            query_or_none = None  # the next link carries the whole query
        return entries

    def transaction(self, bundle: Mapping[str, Any], *, idempotent: bool) -> Resource:
        """POST a transaction Bundle to the base URL; returns the transaction-response Bundle.

        Pass `idempotent=True` only when every entry is conditional (see
        `is_idempotent_bundle`); only then is a failed POST repeated, because repeating any
        other write could apply it twice.
        """
        if idempotent and not is_idempotent_bundle(bundle):
            raise ValueError("idempotent=True but the bundle holds a non-conditional write")
        call = "POST transaction bundle"
        response = self._request(
            "POST",
            self._base_url,
            call=call,
            resource_type="transaction",
            safe=idempotent,
            body=json.dumps(bundle, ensure_ascii=False).encode("utf-8"),
            rejected_on_5xx=True,
            # HAPI answers 500 when concurrent transactions collide (e.g. creating the same
            # tag row) and rolls the whole transaction back; an all-conditional one is safe to
            # repeat.
            extra_retry_statuses=TRANSIENT_TRANSACTION_STATUSES if idempotent else frozenset(),
        )
        assert response is not None
        return _fhir_json(response, call, expected_type="Bundle")

    def capabilities(self, *, retry: bool = True) -> Resource:
        """The server's CapabilityStatement; a cheap call that proves the server answers.

        A readiness probe passes `retry=False`: the probe repeats itself, and backing off
        inside it would hold a worker for the whole retry budget.
        """
        call = "GET metadata"
        response = self._request(
            "GET", f"{self._base_url}/metadata", call=call, resource_type="metadata", safe=retry
        )
        assert response is not None
        return _fhir_json(response, call)

    def close(self) -> None:
        """Release the session's pooled connections."""
        self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(
        self,
        method: str,
        url: str,
        *,
        call: str,
        resource_type: str,
        safe: bool,
        params: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        absent_statuses: frozenset[int] = frozenset(),
        rejected_on_5xx: bool = False,
        extra_retry_statuses: frozenset[int] = frozenset(),
    ) -> requests.Response | None:
        """Send one call, retrying when `safe`; None for an `absent_statuses` answer.

        Every verb comes through here, so headers, timeouts, auth, retries, logging and error
        mapping cannot drift apart between verbs.
        """
        headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8"} if body is not None else {}
        if method == "GET":
            # Servers may answer a repeated search from a cache (HAPI: 60 s by default); a
            # write-back decision must see what was written a moment ago.
            headers["Cache-Control"] = "no-cache"
        deadline = self._deadline if self._deadline is not None else deadlines.current()
        retry_statuses = (
            frozenset(self._retry.retry_statuses) | extra_retry_statuses if safe else frozenset()
        )

        def attempt() -> requests.Response | None:
            """One call; _Transient for a failure worth repeating, else the final answer."""
            timeout = deadlines.cap_timeout(self._timeout, deadline, call)
            started = time.monotonic()
            try:
                response = self._session.request(
                    method,
                    url,
                    params=params,
                    data=body,
                    headers=headers,
                    timeout=timeout,
                    auth=self._auth,
                    # A redirected POST would silently become a GET; reads may follow one
                    # (requests drops the Authorization header when the host changes).
                    allow_redirects=method == "GET",
                )
            except requests.Timeout as exc:
                self._log_call(method, resource_type, "timeout", started)
                raise _Transient("timeout", error=exc, cut=timeout[1] < self._timeout[1]) from exc
            except requests.ConnectionError as exc:
                self._log_call(method, resource_type, "connection error", started)
                raise _Transient("connection", error=exc) from exc
            except requests.RequestException as exc:
                self._log_call(method, resource_type, type(exc).__name__, started)
                raise _upstream_error(
                    UpstreamError, f"{call} failed: {type(exc).__name__}", None
                ) from exc
            status = response.status_code
            self._log_call(method, resource_type, status, started)
            if 200 <= status < 300:
                return response
            if status in absent_statuses:
                return None
            if status in retry_statuses:
                raise _Transient(status, response=response)
            raise _status_error(call, response, rejected_on_5xx=rejected_on_5xx, now=self._clock())

        # tenacity repeats the attempt; the policy and the deadline decide whether a transient
        # failure is worth another one, and how long to wait first.
        decided: dict[int, float | None] = {}  # per attempt number: the wait, or None (stop)

        def decide(state: tenacity.RetryCallState) -> float | None:
            """Once per failed attempt (tenacity asks `wait` and `stop`, in either order)."""
            if state.attempt_number not in decided:
                failure = _transient_of(state)
                delay = None
                if safe and failure is not None:
                    response = failure.response
                    delay = self._retry_delay(
                        state.attempt_number - 1,
                        method,
                        resource_type,
                        failure.reason,
                        response.headers.get("Retry-After") if response is not None else None,
                        deadline,
                    )
                decided[state.attempt_number] = delay
            return decided[state.attempt_number]

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=lambda state: decide(state) is None,
            wait=lambda state: decide(state) or 0.0,
            sleep=self._sleep,
            before_sleep=_close_response,
            reraise=True,
        )
        try:
            result: requests.Response | None = retrying(attempt)
        except _Transient as failure:
            raise self._final_error(failure, call, deadline, rejected_on_5xx) from failure.error
        return result

    def _final_error(
        self, failure: _Transient, call: str, deadline: Deadline | None, rejected_on_5xx: bool
    ) -> UpstreamError:
        """The error of a transient failure that is not repeated (any more)."""
        if failure.response is not None:
            return _status_error(
                call, failure.response, rejected_on_5xx=rejected_on_5xx, now=self._clock()
            )
        if failure.reason == "timeout":
            if deadline is not None and failure.cut:
                return _upstream_error(
                    DeadlineExceededError,
                    f"{call} timed out: the request's time limit of {deadline.seconds:g} s ran out",
                    None,
                )
            return _upstream_error(UpstreamTimeoutError, f"{call} timed out", None)
        return _upstream_error(
            UpstreamError, f"{call} failed: cannot connect to the FHIR server", None
        )

    def _retry_delay(
        self,
        attempt: int,
        method: str,
        resource_type: str,
        reason: int | str,
        retry_after: str | None,
        deadline: Deadline | None,
    ) -> float | None:
        """Seconds to wait before retry number `attempt` (0-based), or None: not worth it.

        Not worth it: retries used up, a `Retry-After` longer than `max_backoff` (retrying
        sooner than the server asked is pointless), or a wait that would outlast the deadline.
        """
        if attempt >= self._retry.max_retries:
            return None
        now = self._clock()
        asked = parse_retry_after(retry_after, now=now)
        delay = self._retry.delay(attempt, retry_after, now=now)
        too_long = asked is not None and asked > self._retry.max_backoff
        if too_long or (
            deadline is not None and delay + deadlines.MIN_CALL_SECONDS >= deadline.remaining()
        ):
            _log.warning(
                "FHIR %s %s -> %s; not retried: waiting %.1f s would exceed the %s",
                method,
                resource_type,
                reason,
                asked if too_long and asked is not None else delay,
                "longest back-off" if too_long else "request's deadline",
            )
            return None
        _log.warning(
            "FHIR %s %s -> %s; retry %d of %d in %.1f s",
            method,
            resource_type,
            reason,
            attempt + 1,
            self._retry.max_retries,
            delay,
        )
        return delay

    def _next_link(self, bundle: Resource, call: str) -> str | None:
        """The `next` link of a searchset page, only if it stays on the configured server."""
        links = bundle.get("link") or []
        if not isinstance(links, list):
            return None
        for link in links:
            if isinstance(link, dict) and link.get("relation") == "next":
                href = link.get("url")
                if not isinstance(href, str) or not href:
                    return None
                absolute = urljoin(f"{self._base_url}/", href)
                origin = url_origin(absolute)
                if origin is None or origin != self._origin:
                    raise _upstream_error(
                        UpstreamError,
                        f"{call} failed: the server's next-page link points to another host;"
                        " refusing to follow it",
                        None,
                    )
                return absolute
        return None

    @staticmethod
    def _log_call(method: str, resource_type: str, outcome: int | str, started: float) -> None:
        """One line per HTTP exchange: never ids, query values, bodies or tokens."""
        elapsed_ms = (time.monotonic() - started) * 1000
        _log.info("FHIR %s %s -> %s in %.0f ms", method, resource_type, outcome, elapsed_ms)


def client_from_config(cfg: FhirServerConfig) -> FhirClient:
    """Build the client, its session and its auth from settings."""
    session = requests.Session()
    return FhirClient(
        cfg.base_url,
        session=session,
        auth=auth_from_config(cfg.auth, session),
        timeout=(cfg.connect_timeout, cfg.read_timeout),
        retry=RetryPolicy(
            max_retries=cfg.max_retries,
            backoff_factor=cfg.backoff_factor,
            max_backoff=cfg.max_backoff,
        ),
        page_size=cfg.page_size,
        max_pages=cfg.max_pages,
    )


class _Transient(Exception):
    """One attempt's failure that another attempt may cure: a timeout, no connection, or a
    transient status (with its response, for Retry-After and the final error)."""

    def __init__(
        self,
        reason: int | str,
        *,
        response: requests.Response | None = None,
        error: Exception | None = None,
        cut: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response
        self.error = error
        self.cut = cut  # the timeout was cut short by the request's deadline


def _transient_of(state: tenacity.RetryCallState) -> _Transient | None:
    outcome = state.outcome
    failure = outcome.exception() if outcome is not None and outcome.failed else None
    return failure if isinstance(failure, _Transient) else None


def _close_response(state: tenacity.RetryCallState) -> None:
    """Before waiting: give the failed answer's connection back to the pool."""
    failure = _transient_of(state)
    if failure is not None and failure.response is not None:
        failure.response.close()


def check_fhir_base(client: FhirClient) -> str:
    """Read {base}/metadata once at start-up; the server's FHIR version, or KnowledgeError
    (FhirBaseUnreachableError when nothing answered).

    A wrong base URL otherwise shows up much later as "no Patient with this id" (a 404 from a
    wrong path) or as unreadable resources (another FHIR version); this names the problem.
    """
    base = client.base_url
    try:
        capability = client.capabilities(retry=False)
    except UpstreamError as exc:
        status = upstream_status(exc)
        if status is None:
            raise FhirBaseUnreachableError(
                f"FHIR base {base} is not reachable: {exc.message}"
            ) from None
        if status == 404:
            raise KnowledgeError(
                f"FHIR base {base} answered 404 to /metadata: wrong path? (the base URL is the"
                " part before /Patient, e.g. http://host:8080/fhir for HAPI)"
            ) from None
        if status in (401, 403):
            raise KnowledgeError(
                f"FHIR base {base} answered {status} to /metadata: check fhir.auth"
            ) from None
        if 200 <= status < 300:  # an answer, but no FHIR resource: a web page, another API
            raise KnowledgeError(
                f"FHIR base {base} answered /metadata with something that is not FHIR JSON:"
                " wrong path?"
            ) from None
        raise KnowledgeError(f"FHIR base {base}: {exc.message}") from None
    kind = capability.get("resourceType")
    if kind != "CapabilityStatement":
        raise KnowledgeError(
            f"FHIR base {base} answered /metadata with a {kind}, not a CapabilityStatement:"
            " wrong path?"
        )
    version = capability.get("fhirVersion")
    if not isinstance(version, str) or not version.startswith(READS_FHIR_VERSION):
        release = next(
            (name for prefix, name in FHIR_RELEASES.items() if str(version).startswith(prefix)),
            "unknown release",
        )
        raise KnowledgeError(
            f"FHIR base {base}: server speaks FHIR {version} ({release}); fhir-dm reads R4 (4.0.x)"
        )
    return version


def upstream_status(exc: BaseException) -> int | None:
    """The HTTP status the FHIR or token server answered with, if the error came from one."""
    status = getattr(exc, "upstream_status", None)
    return status if isinstance(status, int) else None


def _upstream_error(cls: type[UpstreamError], message: str, status: int | None) -> UpstreamError:
    """An UpstreamError with `upstream_status` set, for callers that care about the code."""
    exc = cls(message)
    setattr(exc, "upstream_status", status)  # noqa: B010 - not declared in errors.py
    FHIR_ERRORS.labels(error=cls.__name__).inc()
    return exc


def _status_error(
    call: str, response: requests.Response, *, rejected_on_5xx: bool, now: float | None = None
) -> UpstreamError:
    """Map a final non-2xx answer: 504 timed out, 429/503 unavailable (with the server's
    Retry-After), other 4xx rejected, 5xx failed (rejected for writes)."""
    status = response.status_code
    message = f"{call} failed: HTTP {status}"
    cls: type[UpstreamError]
    if status in (429, 503):
        cls = UpstreamThrottledError if status == 429 else UpstreamUnavailableError
        exc = _upstream_error(cls, message, status)
        asked = parse_retry_after(response.headers.get("Retry-After"), now=now)
        exc.retry_after = None if asked is None else max(1, math.ceil(asked))
        return exc
    if status == 504:
        cls = UpstreamTimeoutError
    elif status < 500 or rejected_on_5xx:
        cls = UpstreamRejectedError
    else:
        cls = UpstreamError
    if rejected_on_5xx:
        # Only a write's OperationOutcome is quoted: a read's diagnostics may echo ids or
        # query values, which must not reach logs.
        diagnostics = _diagnostics(response)
        if diagnostics:
            message = f"{message}: {diagnostics}"
    return _upstream_error(cls, message, status)


def _diagnostics(response: requests.Response) -> str:
    """The OperationOutcome's issue texts, joined and cut to MAX_DIAGNOSTICS_CHARS."""
    try:
        body: Any = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    texts: list[str] = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics")
        if not isinstance(text, str):
            details = issue.get("details")
            text = details.get("text") if isinstance(details, dict) else None
        if isinstance(text, str) and text.strip():
            texts.append(" ".join(text.split()))
    joined = "; ".join(texts)
    if len(joined) > MAX_DIAGNOSTICS_CHARS:
        joined = joined[: MAX_DIAGNOSTICS_CHARS - 1] + "…"
    return joined


def _fhir_json(
    response: requests.Response, call: str, *, expected_type: str | None = None
) -> Resource:
    """The body as a FHIR resource dict, or UpstreamError when it is not FHIR JSON."""
    try:
        body: Any = response.json()
    except ValueError as exc:
        raise _not_fhir(call, response.status_code) from exc
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise _not_fhir(call, response.status_code)
    if expected_type is not None and body["resourceType"] != expected_type:
        raise _upstream_error(
            UpstreamError,
            f"{call} returned {body['resourceType']} instead of a {expected_type}",
            response.status_code,
        )
    return body


def _not_fhir(call: str, status: int) -> UpstreamError:
    return _upstream_error(UpstreamError, f"{call} returned a body that is not FHIR JSON", status)


def _search_mode(entry: Mapping[str, Any]) -> str:
    """An entry's search.mode; absent means match (FHIR R4 3.1.1.4)."""
    search = entry.get("search")
    mode = search.get("mode") if isinstance(search, dict) else None
    return mode if isinstance(mode, str) else "match"


def _query_pairs(params: SearchParams) -> list[tuple[str, str]]:
    """Search params as (name, value) pairs; a sequence value repeats the name (AND)."""
    pairs: list[tuple[str, str]] = []
    for name, value in params.items():
        if isinstance(value, str):
            pairs.append((name, value))
        else:
            pairs.extend((name, item) for item in value)
    return pairs


def _check_resource_type(resource_type: str) -> None:
    """Resource types are code constants; anything else would let a caller rewrite the path."""
    if not _RESOURCE_TYPE.fullmatch(resource_type):
        raise ValueError("not a FHIR resource type name")


def url_origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with default ports filled in; None for a URL not to be trusted.

    Backslashes, user info and encoded separators are refused outright: parsers disagree on
    them (urllib and urllib3 read `https://a\\@b/` differently), which is how a token leaks.
    """
    if "\\" in url or any(c.isspace() for c in url):
        return None
    parts = urlsplit(url)
    netloc = parts.netloc.lower()
    if "@" in netloc or "%" in netloc:
        return None
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    return scheme, (parts.hostname or "").lower(), port
