"""Test-suite settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import RUNNING, kill_leftovers

# Generation speed depends on how busy the machine is; the properties do not.
settings.register_profile(
    "suite", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("suite")


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    started_before = len(RUNNING)  # those of module fixtures, started earlier, stay up
    yield
    kill_leftovers(keep=started_before)


@pytest.fixture(autouse=True, scope="session")
def _no_daemon_outlives_the_suite() -> Iterator[None]:
    yield
    kill_leftovers()
