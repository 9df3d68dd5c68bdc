"""Test-suite settings."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Generation speed depends on how busy the machine is; the properties do not.
settings.register_profile(
    "suite", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("suite")
