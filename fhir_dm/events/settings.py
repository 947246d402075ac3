"""Settings of event-driven re-assessment: the job queue, its retries, the notification secret."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from fhir_dm.fhir.config import check_http_url

MIN_SECRET_LENGTH = 32
QueueBackend = Literal["sqlite", "redis"]
WorkerType = Literal["process", "thread"]


def default_queue_file() -> Path:
    """A per-host file the web workers and the queue workers of this host agree on."""
    return Path(tempfile.gettempdir()) / "fhir-dm-jobs.sqlite3"


class JobsSettings(BaseModel):
    """The re-assessment queue (section `jobs.*`); absent, fhir-dm re-assesses only when called.

    Usage::

        JobsSettings(notification_secret="<32+ characters>")                 # one host, SQLite
        JobsSettings(backend="redis", redis_url="redis://queue:6379/0", ...)  # several hosts
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: QueueBackend = "sqlite"
    sqlite_file: Path = Field(default_factory=default_queue_file)
    redis_url: str | None = None
    queue_name: str = Field(default="fhir-dm", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    debounce_seconds: float = Field(default=0.0, ge=0)
    pending_ttl_seconds: float = Field(default=600.0, gt=0)
    retries: int = Field(default=6, ge=0, le=50)
    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=900.0, gt=0)
    lock_lease_seconds: float = Field(default=300.0, gt=0)
    lock_wait_seconds: float = Field(default=30.0, ge=0)
    workers: int = Field(default=2, gt=0, le=64)
    poll_seconds: float = Field(default=0.1, gt=0, le=10)
    worker_type: WorkerType = "process"
    sweep_hour: int = Field(default=2, ge=0, le=23)
    sweep_minute: int = Field(default=30, ge=0, le=59)
    notification_secret: SecretStr | None = None
    max_patients_per_notification: int = Field(
        default=20,
        gt=0,
        le=10_000,
        description="Patients one notification may name; over it the whole notification is"
        " refused (413, nothing queued, a warning logged). A change notifies one resource.",
    )
    notification_base_url: str | None = None

    @field_validator("notification_secret")
    @classmethod
    def _secret_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        """A short secret could be guessed; the value itself is never echoed."""
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(f"notification_secret must have at least {MIN_SECRET_LENGTH} chars")
        return value

    @field_validator("notification_base_url", "redis_url")
    @classmethod
    def _check_urls(cls, value: str | None, info: object) -> str | None:
        if value is None:
            return None
        name = getattr(info, "field_name", "url")
        if name == "redis_url":
            if not value.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError("redis_url must be a redis://, rediss:// or unix:// URL")
            return value
        check_http_url(value, name)
        return value.rstrip("/")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> JobsSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend redis needs redis_url")
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("retry_max_seconds must not be below retry_base_seconds")
        return self
