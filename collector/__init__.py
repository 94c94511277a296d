"""trio-collector: a telemetry collector for IoT sensors.

Sensors register over TCP (or with an authenticated UDP HELLO) and send heartbeats and readings
as authenticated UDP datagrams; the collector keeps one session per device and knows at every
moment which devices are alive, and why the others are not.
"""

from collector._version import __version__
from collector.app import Addresses, Collector, ShutdownReport
from collector.config import Config, load_config
from collector.core.statistics import CollectorStatistics, DeviceStatistics
from collector.devices import DeviceRegistry

__all__ = [
    "Addresses",
    "Collector",
    "CollectorStatistics",
    "Config",
    "DeviceRegistry",
    "DeviceStatistics",
    "ShutdownReport",
    "__version__",
    "load_config",
]
