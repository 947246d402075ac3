"""Service settings (FHIR_DM_* variables, an optional file) and the objects built from them."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from flask import current_app
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from fhir_dm import __version__
from fhir_dm.common.errors import KnowledgeError
from fhir_dm.core.assess import Engine
from fhir_dm.events.settings import JobsSettings
from fhir_dm.fhir.client import FhirClient
from fhir_dm.fhir.config import FhirServerConfig, check_http_url
from fhir_dm.fhir.terminology import TerminologyServerConfig, engine_for
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.web.cds_hooks import CdsSettings
from fhir_dm.web.trust import InboundAuth, TrustConfig
from fhir_dm.writeback.locks import PatientLocks
from fhir_dm.writeback.writer import WriteBack

ENV_PREFIX = "FHIR_DM_"
SETTINGS_FILE_VARIABLE = "FHIR_DM_SETTINGS_FILE"
EXTENSION_KEY = "fhir_dm"
logger = logging.getLogger(__name__)

DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_MAX_REQUEST_BYTES = 5 * 1024 * 1024
# Below gunicorn's worker timeout (30 s in fhir_dm.web.gunicorn_conf), so the service always
# answers with its own OperationOutcome first.
DEFAULT_REQUEST_DEADLINE_SECONDS = 25.0
# 100 patients like the seed case answer about 9.5 MiB in about 1 s on one core; more belongs
# to an offline run.
DEFAULT_MAX_PATIENTS_PER_REQUEST = 100
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
DEFAULT_SMART_CLIENT_ID = "fhir-dm"
# SMART App Launch 2 scopes (docs/app.md): the patient in context and everything the
# assessment reads (`patient/*.rs`); what the write button writes (create/update of the
# assessment, plan, orders, provenance); `user/*.rs` for the clinic page, which reads every
# IIM patient. `launch` is added on an EHR launch.
DEFAULT_SMART_SCOPE = (
    "launch/patient openid fhirUser patient/*.rs patient/RiskAssessment.c patient/CarePlan.cu "
    "patient/ServiceRequest.cu patient/Provenance.c user/*.rs"
)
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(?::[0-9]{1,5})?/?")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
DEFAULT_LOG_LEVEL: LogLevel = "INFO"


def default_lock_dir() -> Path:
    """A per-host directory every worker of this host agrees on."""
    return Path(tempfile.gettempdir()) / "fhir-dm-locks"


class _SettingsFile(InitSettingsSource):
    """The YAML (or JSON, a subset of YAML) file named by FHIR_DM_SETTINGS_FILE."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls, _read_settings_file(path))


def _read_settings_file(path: Path) -> dict[str, Any]:
    """Unlike pydantic-settings' own file sources, a missing file is an error, not ignored."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KnowledgeError(f"settings file {path.name}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError:
        raise KnowledgeError(f"settings file {path.name}: not valid YAML or JSON") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KnowledgeError(f"settings file {path.name}: expected a mapping at the top level")
    return data


class Settings(BaseSettings):
    """Everything the web service needs to start; invalid settings stop it at start-up.

    Usage::

        Settings(fhir=FhirServerConfig(base_url="http://localhost:8080/fhir"),
                 trust=TrustConfig(mode="static", static_tokens=("<32+ characters>",)),
                 public_base_url="https://dm.example.org")

    From the environment: `FHIR_DM_FHIR__BASE_URL=...`, `FHIR_DM_TRUST__MODE=off`, ...
    (`__` separates nested fields); `FHIR_DM_SETTINGS_FILE` names a YAML/JSON file with the
    same structure. Environment variables win over the file. Inbound trust has no usable
    default on purpose: JWT mode without issuers fails, and "off" must be chosen explicitly.
    `cds` (CDS Hooks, its own trust and limits) is optional: without it the app serves no
    /cds-services endpoints. `terminology` (a FHIR terminology server, e.g.
    `FHIR_DM_TERMINOLOGY__BASE_URL`) is optional: without it codes are matched offline only.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    config_dir: Path | None = None
    fhir: FhirServerConfig
    trust: TrustConfig
    public_base_url: str = DEFAULT_PUBLIC_BASE_URL
    max_request_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BYTES, gt=0)
    request_deadline_seconds: float = Field(default=DEFAULT_REQUEST_DEADLINE_SECONDS, gt=0)
    max_patients_per_request: int = Field(default=DEFAULT_MAX_PATIENTS_PER_REQUEST, gt=0)
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, gt=0)
    lock_dir: Path = Field(default_factory=default_lock_dir)
    log_level: LogLevel = DEFAULT_LOG_LEVEL
    validate_output: bool = False
    cds: CdsSettings | None = None
    # Optional terminology server for codes the offline value sets miss (off when unset).
    terminology: TerminologyServerConfig | None = None
    # Event-driven re-assessment (a job queue, the notification endpoint); off when unset.
    jobs: JobsSettings | None = None
    # The clinician's app (/app): its SMART client id at the EHR and the scopes it asks for.
    smart_client_id: str = Field(
        default=DEFAULT_SMART_CLIENT_ID,
        min_length=1,
        description="The clinician's app's SMART client id, as registered at the EHR.",
    )
    smart_scope: str = Field(
        default=DEFAULT_SMART_SCOPE,
        min_length=1,
        description="The scopes the app asks for (SMART App Launch 2; `launch` is added on an "
        "EHR launch).",
    )

    app_frame_ancestors: tuple[str, ...] = Field(
        default=(),
        description="Origins (`https://ehr.example.org`) that may frame the app's pages: the"
        " EHRs that embed it. The app's own origin always may; unset, no other site.",
    )
    app_connect_origins: tuple[str, ...] = Field(
        default=(),
        description="Origins the app's pages may call besides the service and the FHIR server"
        " (`fhir.base_url`): the EHR's authorization server when it has another origin.",
    )

    @field_validator("app_frame_ancestors", "app_connect_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Each an http(s) origin: no path, query, wildcard or quote can widen the CSP."""
        for origin in value:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError("each entry must be an origin like https://ehr.example.org[:port]")
        return tuple(o.rstrip("/") for o in value)

    @model_validator(mode="before")
    @classmethod
    def _trust_defaults_to_jwt(cls, data: Any) -> Any:
        """Validate a missing `trust` as TrustConfig(), whose error explains what to set."""
        if isinstance(data, dict) and "trust" not in data:
            return {**data, "trust": {}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _one_public_base_url(cls, data: Any) -> Any:
        """One public base URL for every link: `cds.public_base_url` is deprecated.

        Set alone, it fills in the top-level value (a warning says so); set to another value
        than the top-level one, start-up stops. Either way the CDS edge uses the top-level one.
        """
        if not isinstance(data, dict) or data.get("cds") is None:
            return data
        cds = data["cds"]
        given = (
            cds.get("public_base_url")
            if isinstance(cds, dict)
            else cds.public_base_url
            if isinstance(cds, CdsSettings) and "public_base_url" in cds.model_fields_set
            else None
        )
        top = data.get("public_base_url")
        if given is not None:
            if top is not None and str(top).rstrip("/") != str(given).rstrip("/"):
                raise ValueError(
                    "cds.public_base_url is deprecated and differs from public_base_url: set"
                    " only public_base_url (one URL for every link, the app's and the cards')"
                )
            if top is None:
                logger.warning(
                    "settings: cds.public_base_url is deprecated; set public_base_url instead"
                )
                top = given
        top = top if top is not None else DEFAULT_PUBLIC_BASE_URL
        if isinstance(cds, dict):
            cds = {**cds, "public_base_url": top}
        elif isinstance(cds, CdsSettings):
            cds = cds.model_copy(update={"public_base_url": str(top).rstrip("/")})
        return {**data, "public_base_url": top, "cds": cds}

    @field_validator("public_base_url")
    @classmethod
    def _check_public_base_url(cls, value: str) -> str:
        """JWT audiences are this URL plus the path, so it must be absolute and slash-free."""
        check_http_url(value, "public_base_url")
        return value.rstrip("/")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then FHIR_DM_* variables, then the settings file; no .env, no secrets dir."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        file_name = os.environ.get(SETTINGS_FILE_VARIABLE)
        if file_name:
            sources.append(_SettingsFile(settings_cls, Path(file_name)))
        return tuple(sources)


def load_settings() -> Settings:
    """Settings from the environment; KnowledgeError (one line per problem, no values) if bad.

    Values are left out of the message because they may be secrets (tokens, keys).
    """
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"])
            lines.append(f"settings: {loc}: {err['msg']}" if loc else f"settings: {err['msg']}")
        raise KnowledgeError("\n".join(lines)) from None
    except SettingsError as exc:
        # pydantic-settings stops at a variable it cannot decode (a list or mapping that is
        # not JSON) and names only the top-level field: name the variables instead.
        raise KnowledgeError("\n".join(undecodable_variables(str(exc)))) from None


_FIELD_IN_SETTINGS_ERROR = re.compile(r'field "([^"]+)"')


def undecodable_variables(message: str) -> list[str]:
    """One line per FHIR_DM_* variable that must hold JSON and does not (never its value)."""
    match = _FIELD_IN_SETTINGS_ERROR.search(message)
    field = match.group(1) if match else None
    lines = []
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if field is not None and path[0] != field:
            continue
        if not _wants_json(Settings, path):
            continue
        try:
            json.loads(value)
        except ValueError:
            lines.append(
                f"settings: {name}: not valid JSON; a list or mapping is written in JSON,"
                ' e.g. \'["first", "second"]\''
            )
    if not lines:
        where = f"{ENV_PREFIX}{field.upper()}__*" if field else f"{ENV_PREFIX}*"
        lines.append(f"settings: a {where} variable could not be read (lists, mappings: JSON)")
    return lines


def _wants_json(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the field at `path` is a list, set or mapping, which variables give as JSON."""
    annotation: Any = model
    for part in path:
        model_type = _model_in(annotation)
        if model_type is None or part not in model_type.model_fields:
            return False
        annotation = model_type.model_fields[part].annotation
    return _is_collection(annotation) or _model_in(annotation) is not None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation names (also inside `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _is_collection(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_collection(arg) for arg in typing.get_args(annotation))
    target = origin or annotation
    return isinstance(target, type) and (
        issubclass(target, (list, tuple, set, frozenset, dict, Mapping))
    )


@dataclass(frozen=True, slots=True)
class Service:
    """The app's typed state: settings and the long-lived objects built once from them."""

    settings: Settings
    knowledge: Knowledge
    engine: Engine
    fhir: FhirClient
    auth: InboundAuth
    locks: PatientLocks
    writeback: WriteBack
    capability_statement: dict[str, Any]


def current_service() -> Service:
    """The Service of the app handling the current request."""
    service = current_app.extensions[EXTENSION_KEY]
    if not isinstance(service, Service):
        raise TypeError("app.extensions['fhir_dm'] is not a Service")
    return service


def load_engine(settings: Settings) -> tuple[Knowledge, Engine]:
    """The knowledge base and the engine the service and its workers build from one settings."""
    knowledge = load_knowledge(settings.config_dir)
    engine = engine_for(
        knowledge,
        settings.terminology,
        software_version=__version__,
        validate_output=settings.validate_output,
    )
    return knowledge, engine
