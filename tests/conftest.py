from __future__ import annotations

import pytest

from collector.devices import DeviceRegistry

from .helpers import SECRETS


@pytest.fixture
def devices() -> DeviceRegistry:
    return DeviceRegistry(SECRETS)
