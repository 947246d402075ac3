"""Service settings (FHIR_DM_* variables, an optional file) and the objects built from them."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from flask import current_app
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
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
# SMART App Launch 2 scopes: the patient in context, read what the page shows; `launch` is
# added by the client library on an EHR launch.
DEFAULT_SMART_SCOPE = (
    "launch/patient openid fhirUser patient/Patient.rs patient/CarePlan.rs "
    "patient/RiskAssessment.rs patient/ServiceRequest.rs"
)
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

    @model_validator(mode="before")
    @classmethod
    def _trust_defaults_to_jwt(cls, data: Any) -> Any:
        """Validate a missing `trust` as TrustConfig(), whose error explains what to set."""
        if isinstance(data, dict) and "trust" not in data:
            return {**data, "trust": {}}
        return data

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
