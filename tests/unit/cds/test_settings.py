"""config/cds.yaml: the shipped file loads; a bad edit fails with one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fhir_dm.cds.settings import DEFAULT_CDS_CONFIG, load_cds_config
from fhir_dm.common.errors import KnowledgeError


def test_shipped_config_loads() -> None:
    config = load_cds_config()
    assert config.service.id == "dm-cancer-screening"
    assert config.service.hook == "patient-view"
    assert config.cards.indicators == {"standard": "info", "moderate": "warning", "high": "warning"}
    assert config.override_reasons.display(config.override_reasons.system, "patient-declined")
    assert config.override_reasons.display("other-system", "patient-declined") is None


def _write(tmp_path: Path, mutate: object) -> Path:
    data = yaml.safe_load(DEFAULT_CDS_CONFIG.read_text(encoding="utf-8"))
    assert callable(mutate)
    mutate(data)
    path = tmp_path / "cds.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["service"].update(id="has space"), "service.id"),
        (lambda d: d["service"].update(hook="order-sign"), "service.hook"),
        (lambda d: d["cards"]["indicators"].update(high="red"), "cards.indicators.high"),
        (lambda d: d["prefetch"]["templates"]["patient"].update(use="data"), "use: patient"),
        (
            lambda d: d["override_reasons"]["reasons"].append(d["override_reasons"]["reasons"][0]),
            "distinct",
        ),
        (lambda d: d["cards"].update(colour="blue"), "cards.colour: Extra inputs"),
    ],
)
def test_bad_config(tmp_path: Path, mutate: object, message: str) -> None:
    with pytest.raises(KnowledgeError, match=message):
        load_cds_config(_write(tmp_path, mutate))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match="cannot read"):
        load_cds_config(tmp_path / "nope.yaml")
