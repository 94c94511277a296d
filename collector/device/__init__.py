"""The device side: the Trio client library for Python sensors, and simulated sensors."""

from collector.device.client import (
    AckTimeout,
    DeviceClient,
    RegistrationError,
    SessionEnded,
    open_device,
    open_udp_device,
)

__all__ = [
    "AckTimeout",
    "DeviceClient",
    "RegistrationError",
    "SessionEnded",
    "open_device",
    "open_udp_device",
]
