"""Shared fixtures: a real registry per test session (and fresh ones where a test needs to stop it)."""

from __future__ import annotations

import pytest

from tests.support.oci import Pusher
from tests.support.registry import RegistryProcess, start_registry

pytest_plugins = ["tests.support.signing_fixtures"]


@pytest.fixture(scope="session")
def registry() -> RegistryProcess:
    reg = start_registry()
    yield reg
    reg.cleanup()


@pytest.fixture
def fresh_registry() -> RegistryProcess:
    """A registry of the test's own, for tests that stop it, corrupt it or fill it."""
    reg = start_registry()
    yield reg
    reg.cleanup()


@pytest.fixture(scope="session")
def pusher(registry) -> Pusher:
    return Pusher(registry.url)
