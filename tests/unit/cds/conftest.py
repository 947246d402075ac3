"""CDS fixtures: the shipped config/cds.yaml, its templates and a card builder."""

from __future__ import annotations

import pytest

from fhir_dm.cds.cards import CardBuilder
from fhir_dm.cds.prefetch import PrefetchTemplate, build_templates
from fhir_dm.cds.settings import CdsConfig, load_cds_config
from fhir_dm.knowledge.models import Knowledge


@pytest.fixture(scope="session")
def cds_config() -> CdsConfig:
    return load_cds_config()


@pytest.fixture(scope="session")
def templates(cds_config: CdsConfig, knowledge: Knowledge) -> tuple[PrefetchTemplate, ...]:
    return build_templates(cds_config.prefetch, knowledge)


@pytest.fixture(scope="session")
def builder(cds_config: CdsConfig, knowledge: Knowledge) -> CardBuilder:
    return CardBuilder(knowledge, cds_config)
