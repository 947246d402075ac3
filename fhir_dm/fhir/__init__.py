"""The FHIR server edge: one client (read, paged search, transaction), its retries and its auth."""

from __future__ import annotations

from fhir_dm.fhir.auth import BearerAuth, NoAuth, SmartBackendAuth, auth_from_config
from fhir_dm.fhir.client import FhirClient, client_from_config, upstream_status
from fhir_dm.fhir.config import AuthConfig, FhirServerConfig
from fhir_dm.fhir.retry import RetryPolicy, is_idempotent_bundle

__all__ = [
    "AuthConfig",
    "BearerAuth",
    "FhirClient",
    "FhirServerConfig",
    "NoAuth",
    "RetryPolicy",
    "SmartBackendAuth",
    "auth_from_config",
    "client_from_config",
    "is_idempotent_bundle",
    "upstream_status",
]
