"""CDS Hooks 2.0 endpoints: discovery, the patient-view service, feedback and its summary.

Routes (under the app root)::

    GET  /cds-services                              discovery
    POST /cds-services/{id}                         the patient-view hook -> cards
    POST /cds-services/{id}/feedback                CDS Hooks feedback (accepted / overridden)
    GET  /cds-services/{id}/feedback/summary        counts per card type and override reason

Every call is authenticated with the EHR's signed JWT (`aud` = `public_base_url` + the path
called); any failure is a bare 401 without a body. Wire it into an app with `init_app`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from flask import Blueprint, Flask, Response, current_app, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from redis import RedisError
from werkzeug.exceptions import NotFound

from fhir_dm.cds.cards import CardBuilder, IssuedCard
from fhir_dm.cds.feedback import CdsStore, IssuedCardRecord
from fhir_dm.cds.fetch import (
    AllowedServerSession,
    ServerNames,
    fhir_server_allowed,
    has_dot_segment,
)
from fhir_dm.cds.models import (
    CdsRequest,
    CdsResponse,
    Discovery,
    FeedbackItem,
    FeedbackRequest,
    ServiceDescriptor,
)
from fhir_dm.cds.prefetch import (
    DEFAULT_FETCH_WORKERS,
    Fetcher,
    FetcherFactory,
    PrefetchTemplate,
    build_templates,
    discovery_prefetch,
    resolve_prefetch,
)
from fhir_dm.cds.settings import CdsConfig, load_cds_config
from fhir_dm.cds.state import StateSettings, open_state
from fhir_dm.common import deadline as deadlines
from fhir_dm.common.errors import (
    AuthError,
    FhirDmError,
    InputError,
    KnowledgeError,
    PreconditionFailedError,
)
from fhir_dm.core.assess import Engine
from fhir_dm.fhir.auth import BearerAuth
from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.config import check_http_url
from fhir_dm.fhir.retry import RetryPolicy
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.web.outcomes import read_json_body
from fhir_dm.web.trust import InboundAuth, TrustConfig
from fhir_dm.writeback.writer import WriteBack

logger = logging.getLogger(__name__)

bp = Blueprint("cds_hooks", __name__)

EXTENSION_KEY = "fhir_dm_cds"
DISCOVERY_PATH = "/cds-services"
JSON_UTF8 = "application/json; charset=utf-8"
DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT = (3.0, 10.0)
DEFAULT_FETCH_MAX_RETRIES = 1
DEFAULT_FETCH_PAGE_SIZE = 200
DEFAULT_FETCH_MAX_PAGES = 20
DEFAULT_WRITE_CLAIM_SECONDS = 300.0
CORS_MAX_AGE_SECONDS = 600

Clock = Callable[[], date | datetime]
_Model = TypeVar("_Model", bound=BaseModel)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _check_server_entry(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an absolute http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{value!r} must not carry credentials, a query or a fragment")
    if has_dot_segment(parts.path):
        raise ValueError(f"{value!r} must not contain '.' or '..' path segments")
    return value.rstrip("/")


class CdsSettings(BaseModel):
    """Settings of the CDS Hooks edge; clinical content (cards, prefetch) is in config/cds.yaml.

    Usage::

        CdsSettings(
            public_base_url="https://dm.example.org",
            trust=TrustConfig(mode="jwt", issuers=(IssuerTrust(iss=..., jwks_url=...),)),
            allowed_fhir_servers=("https://ehr.example.org/fhir/r4",),
            state=StateSettings(sqlite_path=Path("/var/lib/fhir-dm/cds.sqlite3")),
        )
        CdsSettings(trust=TrustConfig(mode="off"))   # development: any fhirServer, no JWT

    `public_base_url` is the externally visible URL of the app root: JWT audiences are it plus
    the path called. Within `Settings` it is always the top-level `public_base_url` (one
    setting for every link); setting `cds.public_base_url` there is deprecated. Standalone
    (tests, embedding) it is set here. `allowed_fhir_servers` lists base URLs the EHR's access
    token may be sent to (scheme, host and port exact after normalisation, path a segment
    prefix); an empty list accepts any server only when trust is off. `open_fhir_servers`
    (each under an allowed entry) are read without a token when the EHR sends none.
    `fhir_server_aliases` lists groups of base URLs that name the same server (`localhost` and
    `127.0.0.1` are different names unless a group says they are the same).

    `state` is where seen JWT ids, issued cards and feedback live, shared by all workers (a
    SQLite file per host, or Redis for several hosts). `write_on_accept` (off by default) makes
    an `accepted` feedback for a card's suggestion write that patient's plan through the
    write-back to the service's FHIR server (`fhir` settings), once, for EHRs that record the
    acceptance but do not apply the suggestion's actions.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    config_file: Path | None = None
    public_base_url: str = DEFAULT_PUBLIC_BASE_URL
    trust: TrustConfig
    discovery_requires_auth: bool = True
    allowed_fhir_servers: tuple[str, ...] = ()
    open_fhir_servers: tuple[str, ...] = ()
    fhir_server_aliases: tuple[tuple[str, ...], ...] = ()
    fetch_connect_timeout: float = Field(default=DEFAULT_FETCH_TIMEOUT[0], gt=0)
    fetch_read_timeout: float = Field(default=DEFAULT_FETCH_TIMEOUT[1], gt=0)
    fetch_max_retries: int = Field(default=DEFAULT_FETCH_MAX_RETRIES, ge=0, le=5)
    fetch_page_size: int = Field(default=DEFAULT_FETCH_PAGE_SIZE, ge=1, le=1000)
    fetch_max_pages: int = Field(default=DEFAULT_FETCH_MAX_PAGES, ge=1)
    fetch_workers: int = Field(default=DEFAULT_FETCH_WORKERS, ge=1, le=16)
    state: StateSettings = Field(default_factory=StateSettings)
    feedback_retention_days: int = Field(default=365, ge=1)
    keep_override_comments: bool = False
    cors_allowed_origins: tuple[str, ...] = ()
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, gt=0)
    write_on_accept: bool = False
    write_claim_seconds: float = Field(default=DEFAULT_WRITE_CLAIM_SECONDS, gt=0)

    @field_validator("public_base_url")
    @classmethod
    def _absolute_base(cls, value: str) -> str:
        check_http_url(value, "public_base_url")
        return value.rstrip("/")

    @field_validator("allowed_fhir_servers", "open_fhir_servers")
    @classmethod
    def _server_entries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_server_entry(v) for v in value)

    @field_validator("fhir_server_aliases")
    @classmethod
    def _alias_groups(cls, value: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        for group in value:
            if len(group) < 2:
                raise ValueError("each alias group names at least two base URLs")
        return tuple(tuple(_check_server_entry(v) for v in group) for group in value)

    @model_validator(mode="after")
    def _open_servers_are_allowed(self) -> CdsSettings:
        names = self.server_names
        for entry in self.open_fhir_servers:
            if not any(names.under(entry, allowed) for allowed in self.allowed_fhir_servers):
                raise ValueError(
                    f"open_fhir_servers: {entry} is not under an allowed_fhir_servers entry"
                )
        return self

    @property
    def server_names(self) -> ServerNames:
        """Base URLs compared after normalisation and through the configured aliases."""
        return ServerNames(self.fhir_server_aliases)

    def server_open(self, url: str) -> bool:
        """Whether fhir-dm may read `url` without the EHR's token (marked open by the site)."""
        names = self.server_names
        return fhir_server_allowed(
            url, self.allowed_fhir_servers, development=self.development, names=names
        ) and any(names.under(url, entry) for entry in self.open_fhir_servers)

    @model_validator(mode="after")
    def _jwt_or_off(self) -> CdsSettings:
        if self.trust.mode in ("static", "smart"):
            raise ValueError(
                "CDS clients authenticate with signed JWTs (CDS Hooks 2.0): set trust.mode to"
                " 'jwt', or 'off' for development"
            )
        return self

    @property
    def development(self) -> bool:
        return self.trust.mode == "off"


@dataclass(frozen=True, slots=True)
class PlanWriter:
    """The write-back to the service's FHIR server, for plans whose suggestion was accepted."""

    writeback: WriteBack
    fhir_base_url: str


@dataclass(frozen=True, slots=True)
class CdsHooksService:
    """Everything the CDS Hooks views need, built once by `init_app`."""

    settings: CdsSettings
    config: CdsConfig
    templates: tuple[PrefetchTemplate, ...]
    engine: Engine
    knowledge: Knowledge
    auth: InboundAuth
    cards: CardBuilder
    store: CdsStore
    clock: Clock
    descriptor: ServiceDescriptor
    plan_writer: PlanWriter | None = None

    @property
    def service_id(self) -> str:
        return self.config.service.id

    def audience(self, path: str) -> str:
        return self.settings.public_base_url + path


def init_app(
    app: Flask,
    cds_settings: CdsSettings,
    *,
    engine: Engine,
    knowledge: Knowledge,
    clock: Clock | None = None,
    http_session: requests.Session | None = None,
    trust_clock: Callable[[], float] = time.time,
    feedback_store: CdsStore | None = None,
    plan_writer: PlanWriter | None = None,
    app_launch_url: str | None = None,
) -> None:
    """Register the CDS Hooks blueprint; raise KnowledgeError when config/cds.yaml is unusable.

    `clock` gives the evaluation instant (default: now, UTC); `http_session` fetches the
    EHRs' JWK Sets; `trust_clock` is the JWT verifier's clock (epoch seconds). `plan_writer`
    is needed when `write_on_accept` is on; `app_launch_url` adds a smart link to the app.
    `feedback_store` replaces the configured store (tests); the `jti` cache is always the
    configured shared one.
    """
    if not cds_settings.enabled:
        logger.info("CDS Hooks disabled")
        return
    config = load_cds_config(cds_settings.config_file)
    templates = build_templates(config.prefetch, knowledge)
    cards = CardBuilder(knowledge, config, app_launch_url=app_launch_url)
    if cds_settings.development:
        logger.warning("CDS Hooks in development mode: no JWT checks, any fhirServer accepted")
    elif not cds_settings.allowed_fhir_servers:
        logger.warning("CDS Hooks: no allowed_fhir_servers; incomplete prefetch is answered 412")
    if cds_settings.write_on_accept and plan_writer is None:
        raise KnowledgeError("cds.write_on_accept needs the write-back (a configured FHIR server)")
    state = open_state(
        cds_settings.state,
        keep_comments=cds_settings.keep_override_comments,
        retention_days=cds_settings.feedback_retention_days,
        leeway_seconds=cds_settings.trust.leeway_seconds,
        clock=trust_clock,
    )
    logger.info("CDS Hooks shared state: %s", state.description)
    store = feedback_store or state.store
    service_info = config.service
    service = CdsHooksService(
        settings=cds_settings,
        config=config,
        templates=templates,
        engine=engine,
        knowledge=knowledge,
        auth=InboundAuth(
            cds_settings.trust,
            session=http_session or requests.Session(),
            clock=trust_clock,
            replay=state.replay,
        ),
        cards=cards,
        store=store,
        clock=clock or _utc_now,
        descriptor=ServiceDescriptor(
            hook=service_info.hook,
            title=service_info.title,
            description=service_info.description,
            id=service_info.id,
            prefetch=discovery_prefetch(templates),
            usage_requirements=service_info.usage_requirements,
        ),
        plan_writer=plan_writer if cds_settings.write_on_accept else None,
    )
    if service.plan_writer is not None:
        logger.info("CDS Hooks: accepted suggestions are written by fhir-dm (write_on_accept)")
    app.extensions[EXTENSION_KEY] = service
    app.register_blueprint(bp)


def current_cds() -> CdsHooksService:
    service = current_app.extensions[EXTENSION_KEY]
    if not isinstance(service, CdsHooksService):
        raise TypeError(f"app.extensions[{EXTENSION_KEY!r}] is not a CdsHooksService")
    return service


# --- request plumbing ---------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return Response(body, status=status, content_type=JSON_UTF8)


def _unauthorized() -> Response:
    """CDS Hooks best practice: a bare 401, saying nothing about why."""
    return Response(status=401, headers={"WWW-Authenticate": "Bearer"})


def _authenticated(service: CdsHooksService, path: str) -> bool:
    try:
        service.auth.authenticate(
            request.headers.get("Authorization"), audience=service.audience(path)
        )
    except AuthError:
        return False
    return True


def _parse(model: type[_Model], data: Any, what: str) -> _Model:
    """Validate a request body; the message names paths and problems, never values."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        paths = []
        problems = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"])
            paths.append(loc or what)
            problems.append(f"{loc or what}: {err['msg']}")
        raise InputError(f"invalid {what}: " + "; ".join(problems), expression=paths) from None


def _service_or_404(service: CdsHooksService, service_id: str) -> None:
    if service_id != service.service_id:
        raise NotFound()


def _fetcher_factory(service: CdsHooksService, call: CdsRequest) -> FetcherFactory:
    """Clients for the EHR's FHIR server, with the EHR's token, only if the server is allowed."""
    settings = service.settings
    # Fetches run in a thread pool, which does not see the request's deadline: hand it over.
    request_deadline = deadlines.current()

    def make() -> Fetcher:
        if call.fhir_server is None:
            raise PreconditionFailedError(
                "the request sent neither fhirServer nor fhirAuthorization"
                if call.fhir_authorization is None
                else "the request sent no fhirServer"
            )
        names = settings.server_names
        if call.fhir_authorization is None and not settings.server_open(call.fhir_server):
            raise PreconditionFailedError(
                "the request sent fhirServer but no fhirAuthorization (no access token to"
                " read with), and that server is not marked open (open_fhir_servers)"
            )
        if not fhir_server_allowed(
            call.fhir_server,
            settings.allowed_fhir_servers,
            development=settings.development,
            names=names,
        ):
            logger.warning("CDS call names a fhirServer that is not allowed; not contacted")
            raise PreconditionFailedError(
                "the request sent fhirServer, but that fhirServer is not on this service's"
                " allowed list (allowed_fhir_servers)"
            )
        token = (
            None
            if call.fhir_authorization is None
            else call.fhir_authorization.access_token.get_secret_value()
        )
        return FhirClient(
            call.fhir_server,
            # Every URL sent (next links too) must stay under fhirServer or one of its
            # configured aliases; no redirects.
            session=AllowedServerSession(call.fhir_server, names.aliases(call.fhir_server)),
            auth=BearerAuth(token) if token is not None else None,
            timeout=(settings.fetch_connect_timeout, settings.fetch_read_timeout),
            retry=RetryPolicy(max_retries=settings.fetch_max_retries, max_backoff=1.0),
            page_size=settings.fetch_page_size,
            max_pages=settings.fetch_max_pages,
            deadline=request_deadline,
        )

    return make


# --- views ----------------------------------------------------------------------------------


@bp.before_request
def _body_limit() -> None:
    request.max_content_length = current_cds().settings.max_request_bytes


@bp.after_request
def _cors(response: Response) -> Response:
    """CORS for browser-based CDS clients, only for configured origins."""
    origin = request.headers.get("Origin")
    allowed = current_cds().settings.cors_allowed_origins
    if origin and (origin in allowed or "*" in allowed):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE_SECONDS)
        response.vary.add("Origin")
    return response


@bp.get(DISCOVERY_PATH)
def discovery() -> Response:
    """`GET /cds-services`: the one patient-view service and its prefetch templates."""
    service = current_cds()
    if service.settings.discovery_requires_auth and not _authenticated(service, DISCOVERY_PATH):
        return _unauthorized()
    return _json(Discovery(services=[service.descriptor]).dump())


@bp.post(f"{DISCOVERY_PATH}/<service_id>")
def call_service(service_id: str) -> Response:
    """`POST /cds-services/{id}`: assess the context patient and answer with cards."""
    service = current_cds()
    if not _authenticated(service, f"{DISCOVERY_PATH}/{service_id}"):
        return _unauthorized()
    _service_or_404(service, service_id)
    started = time.perf_counter()
    call = _parse(
        CdsRequest, read_json_body(service.settings.max_request_bytes), "CDS Hooks request"
    )
    if call.hook != service.config.service.hook:
        raise InputError(
            f"this service answers the '{service.config.service.hook}' hook", expression=["hook"]
        )
    data = resolve_prefetch(
        service.templates,
        call.prefetch,
        call.context.tokens(),
        _fetcher_factory(service, call),
        workers=service.settings.fetch_workers,
    )
    fetched_ms = (time.perf_counter() - started) * 1000
    run = service.engine.assess(data.bundle(), now=service.clock())
    result = run.results[0]
    write_note = _write_note(service, call)
    issued: list[IssuedCard]
    if data.incomplete:
        # Part of the record is missing: no tier, no plan; say so unless the data at hand
        # already shows no IIM and the Conditions were read in full.
        no_iim = result.plan.assessment.facts.iim is None
        if no_iim and "Condition" not in data.incomplete_types:
            issued = []
        else:
            issued = [service.cards.incomplete(call.hook_instance, data.incomplete)]
    else:
        issued = service.cards.cards(
            result,
            hook_instance=call.hook_instance,
            existing_plans=data.existing_plans,
            unavailable=data.unavailable,
            revise_on_accept=service.plan_writer is not None and write_note is None,
        )
    patient_to_write = (
        call.context.patient_id if service.plan_writer is not None and write_note is None else None
    )
    try:
        service.store.record_issued(
            service.service_id,
            [
                IssuedCardRecord(
                    i.card.uuid or "",
                    i.card_type,
                    i.tier,
                    i.suggestion_uuid,
                    patient_to_write if i.suggestion_uuid else None,
                    write_note if i.suggestion_uuid and service.plan_writer is not None else None,
                )
                for i in issued
                if i.card.uuid
            ],
        )
    except (sqlite3.Error, RedisError) as exc:  # attribution is secondary to answering the EHR
        logger.error("CDS card record failed: %s", type(exc).__name__)
    response = CdsResponse(cards=[i.card for i in issued]).dump()
    logger.info(
        "CDS %s: %d card(s) %s; %d key(s) fetched; data %.0f ms, total %.0f ms",
        service.service_id,
        len(issued),
        ",".join(i.card_type for i in issued) or "none",
        len(data.fetched),
        fetched_ms,
        (time.perf_counter() - started) * 1000,
    )
    return _json(response)


@bp.post(f"{DISCOVERY_PATH}/<service_id>/feedback")
def feedback(service_id: str) -> Response:
    """`POST /cds-services/{id}/feedback`: store what the clinician did with a card."""
    service = current_cds()
    if not _authenticated(service, f"{DISCOVERY_PATH}/{service_id}/feedback"):
        return _unauthorized()
    _service_or_404(service, service_id)
    body = _parse(FeedbackRequest, read_json_body(service.settings.max_request_bytes), "feedback")
    receipt = service.store.record_feedback(
        service.service_id, body.feedback, reason_display=service.config.override_reasons.display
    )
    logger.info(
        "CDS feedback: %d stored, %d duplicate(s), %d for unknown cards",
        receipt.stored,
        receipt.duplicates,
        receipt.unattributed,
    )
    answer: dict[str, Any] = {"stored": receipt.stored, "duplicates": receipt.duplicates}
    if service.plan_writer is not None:
        plans = {"written": 0, "unchanged": 0, "alreadyHandled": 0, "skipped": 0, "failed": 0}
        details: list[dict[str, str]] = []
        for item in body.feedback:
            outcome = _write_accepted_plan(service, service.plan_writer, item)
            if outcome is not None:
                plans[outcome.outcome] += 1
                details.append({"card": item.card, **outcome.as_json()})
        answer["plans"] = plans
        answer["details"] = details
    return _json(answer)


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What was done with one accepted suggestion, and why (said in the feedback answer)."""

    outcome: str  # written / unchanged / alreadyHandled / skipped / failed
    reason: str

    def as_json(self) -> dict[str, str]:
        return {"outcome": self.outcome, "reason": self.reason}


def _write_note(service: CdsHooksService, call: CdsRequest) -> str | None:
    """Why accepted suggestions of this call will not be written by fhir-dm, or None.

    Only a call whose patient lives on the write-back's server is written: a call naming
    another fhirServer has patient ids of another server. Servers are compared after
    normalisation and through `fhir_server_aliases`.
    """
    writer = service.plan_writer
    if writer is None:
        return "this service does not write accepted suggestions (write_on_accept is off)"
    if call.fhir_server is not None and not service.settings.server_names.same(
        call.fhir_server, writer.fhir_base_url
    ):
        logger.warning(
            "CDS write_on_accept: the call's fhirServer is not the write-back's FHIR server;"
            " accepted plans of this call will not be written"
        )
        return (
            f"FHIR server differs: the EHR named {call.fhir_server}, this service writes to"
            f" {writer.fhir_base_url} (add both to cds.fhir_server_aliases if they are the"
            " same server)"
        )
    return None


def _write_accepted_plan(
    service: CdsHooksService, writer: PlanWriter, item: FeedbackItem
) -> WriteOutcome | None:
    """Write the plan of an accepted suggestion once; None when the item asks for nothing.

    The claim in the shared store makes exactly one worker write; a failed write releases it,
    so a later accepted feedback tries again. The write-back itself writes nothing when the
    same plan is already on the server. `alreadyHandled` only when a write was done (or is
    under way) for this card; a card whose plan will not be written is `skipped`, with why.
    """
    if item.outcome != "accepted":
        return None
    record = service.store.issued_card(service.service_id, item.card)
    accepted = {s.id for s in item.accepted_suggestions or ()}
    if record is None:
        return WriteOutcome(
            "skipped", "unknown card (not issued by this service, or past retention)"
        )
    if not record.suggestion_uuid or record.suggestion_uuid not in accepted:
        return None
    if record.patient_id is None and record.write_note is not None:
        return WriteOutcome("skipped", record.write_note)
    if not service.store.claim_write(
        service.service_id, item.card, stale_after=service.settings.write_claim_seconds
    ):
        return WriteOutcome("alreadyHandled", "the plan of this card was written before")
    if record.patient_id is None:  # written before (the id is forgotten then)
        service.store.release_write(service.service_id, item.card)
        return WriteOutcome("alreadyHandled", "the plan of this card was written before")
    try:
        write = writer.writeback.assess_patient(
            record.patient_id, now=service.clock(), preview=False
        )
    except FhirDmError as exc:
        service.store.release_write(service.service_id, item.card)
        logger.error("CDS accepted plan not written: %s", exc.message)
        return WriteOutcome("failed", f"the write-back failed: {exc.message}")
    except BaseException:
        service.store.release_write(service.service_id, item.card)
        raise
    service.store.finish_write(service.service_id, item.card)
    if record.tier and write.result.tier != record.tier:
        logger.warning(
            "CDS accepted plan written for tier %s; the card showed tier %s (the record changed)",
            write.result.tier,
            record.tier,
        )
    logger.info("CDS accepted plan: %s", write.status)
    if write.status == "written":
        return WriteOutcome("written", f"the plan was written to {writer.fhir_base_url}")
    return WriteOutcome("unchanged", "the same plan is already on the FHIR server")


@bp.get(f"{DISCOVERY_PATH}/<service_id>/feedback/summary")
def feedback_summary(service_id: str) -> Response:
    """Accepted / overridden counts per card type and override-reason counts."""
    service = current_cds()
    if not _authenticated(service, f"{DISCOVERY_PATH}/{service_id}/feedback/summary"):
        return _unauthorized()
    _service_or_404(service, service_id)
    return _json(service.store.summary(service.service_id).as_json())
