from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from collector.devices import DeviceRegistry

from .helpers import SECRETS

# The machines that run this suite are shared and noisy: timing-based health checks and
# per-example deadlines would make it flaky without finding anything.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
# The long fuzzing run (docs/SECURITY.md): HYPOTHESIS_PROFILE=fuzz python3 run.py test tests/test_fuzz.py
settings.register_profile(
    "fuzz",
    deadline=None,
    suppress_health_check=list(HealthCheck),
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def devices() -> DeviceRegistry:
    return DeviceRegistry(SECRETS)
