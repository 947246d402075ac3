"""Shared fixtures: the real knowledge base, one engine, and a pinned evaluation date."""

from __future__ import annotations

from datetime import date

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fhir_dm.core.assess import Engine
from fhir_dm.knowledge.load import load_knowledge
from fhir_dm.knowledge.models import Knowledge
from tests import server_guard

# A pinned evaluation date a few months after the factories' default onset (2024-03-01).
NOW = date(2024, 4, 15)


@pytest.fixture(scope="session")
def knowledge() -> Knowledge:
    return load_knowledge()


@pytest.fixture(scope="session")
def engine(knowledge: Knowledge) -> Engine:
    return Engine(knowledge, software_version="test")


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    """One RSA signing key for the tests that sign tokens (generating one is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test's fixtures: may it start servers (tests/server_guard.py)?"""
    marked = item.get_closest_marker("integration") is not None
    server_guard.unmarked_test = None if marked else item.nodeid
