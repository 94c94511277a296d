"""What the collector tells its listeners (stream hub, recorder): plain values.

Listeners are called synchronously from the ingest path and must never block: they copy what
they need into their own bounded buffers and count what does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias

import attrs

from collector.wire.datagram import ReadingPair


class Telemetry(NamedTuple):
    """The readings of one accepted TELEMETRY datagram (none for a HEARTBEAT).

    A NamedTuple: one is made per datagram on the ingest path."""

    time: float  # collector wall clock, seconds since the epoch
    device_id: str
    seq: int
    device_time_us: int
    readings: Sequence[ReadingPair]  # a tuple, or a list straight from the decoder
    payload: bytes = b""  # the TELEMETRY payload as received (the recorder stores it as is)


@attrs.frozen
class DeviceOnline:
    time: float
    device_id: str
    session_id: int
    transport: str  # "tcp" or "udp"
    address: str | None


@attrs.frozen
class DeviceOffline:
    time: float
    device_id: str
    session_id: int
    reason: str  # timeout | closed | superseded | kicked | revoked | shutdown
    duration: float  # seconds the session lasted


@attrs.frozen
class CommandUpdate:
    time: float
    device_id: str
    command_id: str
    name: str
    state: str  # queued | sent | acked | failed | timed_out | expired
    result: Any = None
    error: str | None = None
    args: Any = None


Event: TypeAlias = DeviceOnline | DeviceOffline | CommandUpdate

SESSION_END_REASONS = ("timeout", "closed", "superseded", "kicked", "revoked", "shutdown")


class Listener(Protocol):
    def on_telemetry(self, batch: Sequence[Telemetry]) -> None: ...

    def on_event(self, event: Event) -> None: ...


def format_address(addr: Any) -> str | None:
    if addr is None:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
