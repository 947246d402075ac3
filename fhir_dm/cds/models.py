"""CDS Hooks 2.0 wire models: service request, response cards, discovery and feedback.

Responses are built from these models and serialised with `dump()`, which leaves out every
optional attribute without a value (the spec forbids `null`, `""`, `[]` and `{}` there), while
`cards: []` stays. Requests are parsed leniently about unknown members (`extension`, newer
fields) but strictly about the fields the service relies on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from fhir_dm.cds.fetch import has_dot_segment
from fhir_dm.core.ids import NOT_A_SAFE_ID, is_fhir_id

Indicator = Literal["info", "warning", "critical"]
ActionType = Literal["create", "update", "delete"]

MAX_SUMMARY_CHARS = 139  # the spec: a "<140-character summary"
MAX_HOOK_INSTANCE_CHARS = 256
MAX_FEEDBACK_ITEMS = 100


def is_safe_fhir_id(value: str) -> bool:
    """A FHIR id that is safe as a URL path segment (not `.` or `..`): the one shared check."""
    return is_fhir_id(value)


class _Wire(BaseModel):
    """A response object: closed, immutable, camelCase on the wire."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        """JSON-ready dict with wire names and without unset optional attributes."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class _Inbound(BaseModel):
    """A request object: unknown members (e.g. `extension`) are ignored, not rejected."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


# --- shared ---------------------------------------------------------------------------------


class Coding(_Wire):
    """The CDS Hooks Coding: code and system required, display required for override reasons."""

    system: str = Field(min_length=1)
    code: str = Field(min_length=1)
    display: str | None = Field(default=None, min_length=1)


# --- discovery ------------------------------------------------------------------------------


class ServiceDescriptor(_Wire):
    """One entry of `GET /cds-services`."""

    hook: str
    title: str | None = None
    description: str
    id: str
    prefetch: dict[str, str] | None = None
    usage_requirements: str | None = Field(default=None, alias="usageRequirements")


class Discovery(_Wire):
    services: list[ServiceDescriptor]


# --- response -------------------------------------------------------------------------------


class Source(_Wire):
    label: str = Field(min_length=1)
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


class Action(_Wire):
    """A suggested change; `create` and `update` carry the whole resource."""

    type: ActionType
    description: str = Field(min_length=1)
    resource: dict[str, Any] | None = None
    resource_id: str | None = Field(default=None, alias="resourceId")

    @model_validator(mode="after")
    def _resource_for_writes(self) -> Action:
        if self.type in ("create", "update") and not self.resource:
            raise ValueError(f"a {self.type} action needs a resource")
        if self.type == "delete" and not self.resource_id:
            raise ValueError("a delete action needs a resourceId")
        return self


class Suggestion(_Wire):
    label: str = Field(min_length=1)
    uuid: str | None = None
    is_recommended: bool | None = Field(default=None, alias="isRecommended")
    actions: list[Action] | None = Field(default=None, min_length=1)


class Link(_Wire):
    label: str = Field(min_length=1)
    url: str = Field(min_length=1)
    type: Literal["absolute", "smart"]
    app_context: str | None = Field(default=None, alias="appContext")
    autolaunchable: bool | None = None


class Card(_Wire):
    """One card; checks the spec's rules that a schema alone cannot say."""

    uuid: str | None = None
    summary: str = Field(min_length=1, max_length=MAX_SUMMARY_CHARS)
    detail: str | None = Field(default=None, min_length=1)
    indicator: Indicator
    source: Source
    suggestions: list[Suggestion] | None = Field(default=None, min_length=1)
    selection_behavior: Literal["at-most-one", "any"] | None = Field(
        default=None, alias="selectionBehavior"
    )
    override_reasons: list[Coding] | None = Field(
        default=None, alias="overrideReasons", min_length=1
    )
    links: list[Link] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _spec_rules(self) -> Card:
        if self.suggestions and self.selection_behavior is None:
            raise ValueError("selectionBehavior is required when there are suggestions")
        for reason in self.override_reasons or ():
            if not reason.display:
                raise ValueError("every override reason needs a display")
        return self


class CdsResponse(_Wire):
    cards: list[Card]
    system_actions: list[Action] | None = Field(default=None, alias="systemActions", min_length=1)


# --- request --------------------------------------------------------------------------------


def _check_base_url(value: str) -> str:
    """An absolute http(s) base URL without credentials, query or fragment."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if has_dot_segment(parts.path):
        # Servers and HTTP libraries resolve `..` (and `%2e%2e`) at different moments: the URL
        # checked would not be the URL requested.
        raise ValueError("must not contain '.' or '..' path segments (plain or percent-encoded)")
    return value.rstrip("/")


class FhirAuthorization(_Inbound):
    """The bearer token the EHR lends the service for this call; never logged or stored."""

    access_token: SecretStr
    token_type: str
    expires_in: int | None = Field(default=None, ge=0)
    scope: str | None = None
    subject: str | None = None
    patient: str | None = None

    @field_validator("access_token")
    @classmethod
    def _token_usable(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if not secret or secret != secret.strip() or any(c in secret for c in "\r\n"):
            raise ValueError("must be a non-empty token without whitespace around or line breaks")
        return value

    @field_validator("token_type")
    @classmethod
    def _bearer_only(cls, value: str) -> str:
        if value.lower() != "bearer":
            raise ValueError("must be 'Bearer'")
        return "Bearer"


class PatientViewContext(_Inbound):
    """`patient-view` context; other members are kept for prefetch tokens."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    user_id: str | None = Field(default=None, alias="userId")
    patient_id: str = Field(alias="patientId")
    encounter_id: str | None = Field(default=None, alias="encounterId")

    @field_validator("patient_id")
    @classmethod
    def _fhir_id(cls, value: str) -> str:
        # It is substituted into FHIR query URLs: only a valid FHIR id may get there.
        if not is_safe_fhir_id(value):
            raise ValueError(NOT_A_SAFE_ID)
        return value

    @field_validator("encounter_id")
    @classmethod
    def _encounter_fhir_id(cls, value: str | None) -> str | None:
        if value is not None and not is_safe_fhir_id(value):
            raise ValueError(NOT_A_SAFE_ID)
        return value

    def tokens(self) -> dict[str, Any]:
        """Root-level members by their wire names, for `{{context.<name>}}` tokens."""
        return self.model_dump(by_alias=True, exclude_none=True)


class CdsRequest(_Inbound):
    """`POST {base}/cds-services/{id}`."""

    hook: str = Field(min_length=1)
    hook_instance: str = Field(
        alias="hookInstance", min_length=1, max_length=MAX_HOOK_INSTANCE_CHARS
    )
    fhir_server: str | None = Field(default=None, alias="fhirServer")
    fhir_authorization: FhirAuthorization | None = Field(default=None, alias="fhirAuthorization")
    context: PatientViewContext
    prefetch: dict[str, Any] | None = None

    @field_validator("fhir_server")
    @classmethod
    def _fhir_server_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_base_url(value)

    @model_validator(mode="after")
    def _server_with_token(self) -> CdsRequest:
        if self.fhir_authorization is not None and self.fhir_server is None:
            raise ValueError("fhirServer is required when fhirAuthorization is given")
        return self


# --- feedback -------------------------------------------------------------------------------


class InboundCoding(_Inbound):
    system: str = Field(min_length=1)
    code: str = Field(min_length=1)
    display: str | None = None


class OverrideReason(_Inbound):
    reason: InboundCoding | None = None
    user_comment: str | None = Field(default=None, alias="userComment")


class AcceptedSuggestion(_Inbound):
    id: str = Field(min_length=1)


class FeedbackItem(_Inbound):
    """One clinician interaction with one card."""

    card: str = Field(min_length=1, max_length=MAX_HOOK_INSTANCE_CHARS)
    outcome: Literal["accepted", "overridden"]
    accepted_suggestions: list[AcceptedSuggestion] | None = Field(
        default=None, alias="acceptedSuggestions"
    )
    override_reason: OverrideReason | None = Field(default=None, alias="overrideReason")
    outcome_timestamp: datetime = Field(alias="outcomeTimestamp")


class FeedbackRequest(_Inbound):
    """`POST {base}/cds-services/{id}/feedback`."""

    feedback: list[FeedbackItem] = Field(min_length=1, max_length=MAX_FEEDBACK_ITEMS)
