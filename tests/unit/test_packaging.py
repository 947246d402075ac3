"""The package ships its knowledge base and FHIR artifacts, and the deployment files agree."""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from setuptools import find_packages

from fhir_dm import _data
from fhir_dm.web.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
DATA_DIRS = {"fhir_dm._data.config": "config", "fhir_dm._data.profiles": "profiles"}


def _data_packages() -> dict[str, Path]:
    """Every directory of config/ and profiles/ as the package setuptools makes of it."""
    found: dict[str, Path] = {}
    for package, top in DATA_DIRS.items():
        for directory in [ROOT / top, *sorted(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            if "__pycache__" in directory.parts:
                continue
            rel = directory.relative_to(ROOT / top)
            found[".".join([package, *rel.parts])] = directory
    return found


def test_the_package_list_names_every_package_and_data_directory() -> None:
    code = set(find_packages(where=str(ROOT), include=["fhir_dm", "fhir_dm.*"]))
    assert set(SETUPTOOLS["packages"]) == code | set(_data_packages())


def test_the_data_directories_are_mapped_into_the_package() -> None:
    assert SETUPTOOLS["package-dir"] == DATA_DIRS


def test_every_file_of_config_and_profiles_is_package_data() -> None:
    patterns = SETUPTOOLS["package-data"]
    for package, directory in _data_packages().items():
        for path in directory.iterdir():
            if path.is_file():
                assert any(fnmatch.fnmatch(path.name, p) for p in patterns.get(package, ())), (
                    f"{path.relative_to(ROOT)} would be left out of the wheel"
                )


def test_every_file_of_the_app_is_package_data() -> None:
    """The clinician's app is served from fhir_dm/web/static, so the wheel must hold it."""
    patterns = SETUPTOOLS["package-data"]["fhir_dm.web"]
    web = ROOT / "fhir_dm" / "web"
    files = [p for p in (web / "static").rglob("*") if p.is_file()]
    assert files
    for path in files:
        rel = path.relative_to(web).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} would be left out"


def test_from_a_clone_the_top_level_directories_are_used() -> None:
    assert _data.bundled_dir("config") == ROOT / "config"
    assert _data.bundled_dir("profiles") == ROOT / "profiles"


def test_in_a_wheel_the_copies_inside_the_package_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config").mkdir()
    monkeypatch.setattr(_data.resources, "files", lambda _package: tmp_path)
    assert _data.bundled_dir("config") == tmp_path / "config"
    assert _data.bundled_dir("profiles") == ROOT / "profiles"  # not in this fake wheel


# --- container image and local stack --------------------------------------------------------


def test_the_image_runs_as_a_user_and_probes_a_real_route() -> None:
    from fhir_dm.web.app import create_app
    from fhir_dm.web.trust import TrustConfig

    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    probe = re.search(r"^HEALTHCHECK .*?http://127\.0\.0\.1:8080(/\w+)", dockerfile, re.M | re.S)
    assert probe is not None
    app = create_app(
        Settings(fhir={"base_url": "http://127.0.0.1:9/fhir"}, trust=TrustConfig(mode="off"))
    )
    assert app.test_client().get(probe.group(1)).status_code == 200


def test_the_compose_environment_is_valid_settings_with_cds_hooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    for name in [n for n in os.environ if n.startswith("FHIR_DM_")]:
        monkeypatch.delenv(name)
    for name, value in compose["services"]["fhir-dm"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = Settings()  # type: ignore[call-arg]  # from the environment
    assert settings.cds is not None and settings.cds.enabled
    assert settings.cds.state.backend == "redis"
    assert {"redis", "hapi", "hapi-db"} <= set(compose["services"])
