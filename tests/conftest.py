from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from collector.devices import DeviceRegistry

from .helpers import SECRETS

# The machines that run this suite are shared and noisy: timing-based health checks and
# per-example deadlines would make it flaky without finding anything.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile("default")


@pytest.fixture
def devices() -> DeviceRegistry:
    return DeviceRegistry(SECRETS)
