"""Settings of the FHIR server edge: where the server is, how long to wait, how to log in."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

DEFAULT_SMART_SCOPE = (
    "system/Patient.read system/Condition.read system/Observation.read"
    " system/MedicationRequest.read system/MedicationStatement.read"
    " system/FamilyMemberHistory.read system/Procedure.read system/DiagnosticReport.read"
    " system/ServiceRequest.* system/CarePlan.* system/RiskAssessment.* system/Provenance.write"
)
MAX_ASSERTION_LIFETIME_SECONDS = 300  # SMART Backend Services: exp at most five minutes ahead


class AuthConfig(BaseModel):
    """How the service authenticates to the FHIR server.

    Usage::

        AuthConfig()                                    # no authentication
        AuthConfig(kind="bearer", token="s3cr3t")       # a static token
        AuthConfig(kind="smart-backend", token_url="https://auth.example.org/token",
                   client_id="fhir-dm", key_id="key-1", private_key_file="/run/keys/fhir-dm.pem")
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["none", "bearer", "smart-backend"] = "none"
    token: SecretStr | None = None
    token_url: str | None = None
    client_id: str | None = None
    private_key_pem: SecretStr | None = None
    private_key_file: Path | None = None
    key_id: str | None = None
    algorithm: Literal["RS384", "ES384"] = "RS384"
    scope: str = DEFAULT_SMART_SCOPE
    token_lifetime_seconds: int = Field(
        default=MAX_ASSERTION_LIFETIME_SECONDS, ge=1, le=MAX_ASSERTION_LIFETIME_SECONDS
    )

    @model_validator(mode="after")
    def _check_kind_fields(self) -> AuthConfig:
        """Fail at startup, naming the missing field, rather than at the first FHIR call."""
        if self.kind == "none" and self.token is not None:
            raise ValueError("auth.token is set but auth.kind is 'none'; set auth.kind to 'bearer'")
        if self.kind == "bearer" and (self.token is None or not self.token.get_secret_value()):
            raise ValueError("auth.kind 'bearer' requires auth.token")
        if self.kind == "smart-backend":
            missing = [
                f"auth.{name}"
                for name in ("token_url", "client_id", "key_id")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"auth.kind 'smart-backend' requires {', '.join(missing)}")
            if (self.private_key_pem is None) == (self.private_key_file is None):
                raise ValueError(
                    "auth.kind 'smart-backend' requires exactly one of auth.private_key_pem"
                    " and auth.private_key_file"
                )
            check_http_url(self.token_url or "", "auth.token_url")
        return self


class FhirServerConfig(BaseModel):
    """The FHIR server the service reads from and writes to.

    Usage::

        FhirServerConfig(base_url="http://localhost:8080/fhir", read_timeout=60,
                         auth=AuthConfig(kind="bearer", token="s3cr3t"))
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    backoff_factor: float = Field(default=0.5, ge=0)
    max_backoff: float = Field(default=30.0, ge=0)
    page_size: int = Field(default=200, ge=1)
    max_pages: int = Field(default=100, ge=1)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    # `serve`, `worker` and `demo` read {base_url}/metadata before they start (reachable, FHIR
    # 4.0.x, the right path); off for a server that is not up yet when the service starts.
    check_at_startup: bool = True

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        """Paging links are checked against this host, so it must be an absolute URL."""
        check_http_url(value, "base_url")
        return value.rstrip("/")


def check_http_url(value: str, name: str) -> None:
    """Raise ValueError unless `value` is an absolute http(s) URL (shared by every setting)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must be an absolute http(s) URL")
