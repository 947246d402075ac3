"""Settings: FHIR_DM_* variables, an optional YAML/JSON file (env wins), failing early, safely."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from fhir_dm.common.errors import KnowledgeError
from fhir_dm.fhir.config import FhirServerConfig
from fhir_dm.web.app import create_app
from fhir_dm.web.settings import (
    DEFAULT_MAX_REQUEST_BYTES,
    SETTINGS_FILE_VARIABLE,
    Settings,
    load_settings,
)
from fhir_dm.web.trust import TrustConfig
from tests.unit.web.conftest import STATIC_TOKEN, make_settings, service_of

SECRET = "upstream-token-that-must-never-be-shown"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests see only the FHIR_DM_* variables they set."""
    for name in list(os.environ):
        if name.upper().startswith("FHIR_DM_"):
            monkeypatch.delenv(name)
    yield


def test_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://hapi.local:8080/fhir/")
    monkeypatch.setenv("FHIR_DM_FHIR__READ_TIMEOUT", "60")
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "static")
    monkeypatch.setenv("FHIR_DM_TRUST__STATIC_TOKENS", json.dumps([STATIC_TOKEN]))
    monkeypatch.setenv("FHIR_DM_PUBLIC_BASE_URL", "https://dm.example.org/")
    monkeypatch.setenv("FHIR_DM_MAX_REQUEST_BYTES", "1000")
    monkeypatch.setenv("FHIR_DM_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("FHIR_DM_LOG_LEVEL", "WARNING")
    settings = load_settings()
    assert settings.fhir.base_url == "http://hapi.local:8080/fhir"
    assert settings.fhir.read_timeout == 60
    assert settings.trust.mode == "static"
    assert settings.public_base_url == "https://dm.example.org"
    assert settings.max_request_bytes == 1000
    assert settings.lock_dir == tmp_path
    assert settings.log_level == "WARNING"
    assert settings.config_dir is None


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://hapi.local/fhir")
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "off")
    settings = load_settings()
    assert settings.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 5 * 1024 * 1024
    assert settings.log_level == "INFO"
    assert settings.lock_dir.name == "fhir-dm-locks"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_from_a_file_with_the_environment_winning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, suffix: str
) -> None:
    content = {
        "fhir": {"base_url": "http://from-file/fhir", "read_timeout": 45},
        "trust": {"mode": "off"},
        "log_level": "DEBUG",
    }
    path = tmp_path / f"settings{suffix}"
    path.write_text(json.dumps(content), encoding="utf-8")  # JSON is also YAML
    monkeypatch.setenv(SETTINGS_FILE_VARIABLE, str(path))
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://from-env/fhir")
    settings = load_settings()
    assert settings.fhir.base_url == "http://from-env/fhir"
    assert settings.fhir.read_timeout == 45  # nested values merge
    assert settings.trust.mode == "off"
    assert settings.log_level == "DEBUG"


def test_a_missing_settings_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(SETTINGS_FILE_VARIABLE, str(tmp_path / "nope.yaml"))
    with pytest.raises(KnowledgeError, match=r"nope\.yaml: cannot read"):
        load_settings()


def test_a_settings_file_that_is_not_a_mapping(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    monkeypatch.setenv(SETTINGS_FILE_VARIABLE, str(path))
    with pytest.raises(KnowledgeError, match="expected a mapping"):
        load_settings()


def test_trust_must_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://hapi.local/fhir")
    with pytest.raises(KnowledgeError, match="mode 'jwt' needs at least one trusted issuer"):
        load_settings()


def test_errors_name_the_field_never_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "not a url")
    monkeypatch.setenv("FHIR_DM_FHIR__AUTH__TOKEN", SECRET)
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "off")
    monkeypatch.setenv("FHIR_DM_PUBLIC_BASE_URL", "dm.example.org")
    with pytest.raises(KnowledgeError) as caught:
        load_settings()
    message = caught.value.message
    assert "settings: fhir.base_url" in message
    assert "settings: public_base_url" in message
    assert SECRET not in message and "not a url" not in message


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_body"):
        Settings(  # type: ignore[call-arg]
            fhir=FhirServerConfig(base_url="http://x/fhir"),
            trust=TrustConfig(mode="off"),
            max_body=1,
        )


def test_a_bad_knowledge_base_stops_the_factory(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="configuration directory not found"):
        create_app(make_settings(tmp_path, config_dir=tmp_path / "missing"))


def test_the_app_keeps_its_typed_state(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    app = create_app(settings)
    service = service_of(app)
    assert service.settings is settings
    assert service.fhir.base_url == settings.fhir.base_url
    assert service.locks.directory == settings.lock_dir
    assert app.config["MAX_CONTENT_LENGTH"] == settings.max_request_bytes


def test_factory_and_wsgi_read_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://hapi.local/fhir")
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "off")
    monkeypatch.setenv("FHIR_DM_LOCK_DIR", str(tmp_path))
    assert service_of(create_app()).settings.fhir.base_url == "http://hapi.local/fhir"
    monkeypatch.delitem(sys.modules, "fhir_dm.web.wsgi", raising=False)
    wsgi = importlib.import_module("fhir_dm.web.wsgi")
    assert isinstance(wsgi.app, Flask)
    assert wsgi.app.test_client().get("/healthz").status_code == 200


def test_cds_hooks_are_served_only_when_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert create_app(make_settings(tmp_path)).test_client().get("/cds-services").status_code == 404
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://hapi.local/fhir")
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "off")
    monkeypatch.setenv("FHIR_DM_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("FHIR_DM_CDS__TRUST__MODE", "off")
    settings = load_settings()
    assert settings.cds is not None and settings.cds.trust.mode == "off"
    response = create_app(settings).test_client().get("/cds-services")
    assert response.status_code == 200
    assert response.get_json()["services"][0]["hook"] == "patient-view"


# --- one public base URL for every link -----------------------------------------------------

CDS_OFF_TRUST = {"trust": {"mode": "off"}}


def test_the_cds_edge_and_the_smart_link_use_the_one_public_base_url(tmp_path: Path) -> None:
    """The sandbox run: the smart link used `public_base_url`, the example set only
    `cds.public_base_url`, so the card linked to a dead port."""
    settings = Settings(
        fhir=FhirServerConfig(base_url="http://hapi.local/fhir"),
        trust=TrustConfig(mode="off"),
        lock_dir=tmp_path / "locks",
        cds={**CDS_OFF_TRUST, "public_base_url": "http://localhost:8000/"},
    )
    assert settings.public_base_url == "http://localhost:8000"
    assert settings.cds is not None and settings.cds.public_base_url == "http://localhost:8000"


def test_the_top_level_public_base_url_is_the_cds_audience_too(tmp_path: Path) -> None:
    settings = Settings(
        fhir=FhirServerConfig(base_url="http://hapi.local/fhir"),
        trust=TrustConfig(mode="off"),
        lock_dir=tmp_path / "locks",
        public_base_url="https://dm.example.org",
        cds=CDS_OFF_TRUST,
    )
    assert settings.cds is not None and settings.cds.public_base_url == "https://dm.example.org"


def test_two_different_public_base_urls_stop_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_DM_FHIR__BASE_URL", "http://hapi.local/fhir")
    monkeypatch.setenv("FHIR_DM_TRUST__MODE", "off")
    monkeypatch.setenv("FHIR_DM_PUBLIC_BASE_URL", "https://dm.example.org")
    monkeypatch.setenv("FHIR_DM_CDS__TRUST__MODE", "off")
    monkeypatch.setenv("FHIR_DM_CDS__PUBLIC_BASE_URL", "http://localhost:8000")
    with pytest.raises(KnowledgeError, match=r"cds\.public_base_url is deprecated and differs"):
        load_settings()
