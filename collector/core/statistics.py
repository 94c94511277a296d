"""What the collector counts, as plain values: the answer of `Collector.statistics()`, read by
`/api/stats`, `/metrics`, `--stats-json` and the tools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from collector.core.sessions import SessionRecord


@attrs.frozen
class DeviceStatistics:
    device_id: str
    online: bool
    session_id: int | None
    transport: str | None
    address: str | None
    datagrams: int
    readings: int
    lost: int
    duplicates: int
    out_of_order: int
    malformed: int
    metrics_refused: int
    address_changes: int
    sessions: int
    last_seen: float | None
    online_since: float | None
    offline_since: float | None
    offline_reason: str | None
    history: tuple[SessionRecord, ...]

    @property
    def loss_ratio(self) -> float:
        expected = self.datagrams + self.lost
        return self.lost / expected if expected else 0.0


@attrs.frozen
class CollectorStatistics:
    uptime: float
    devices: Mapping[str, DeviceStatistics]
    devices_online: int
    datagrams_received: int
    datagrams_accepted: int
    readings: int
    rejected: Mapping[str, int]
    replies_sent: int
    send_errors: int
    address_changes: int
    sessions_opened: int
    sessions_ended: Mapping[str, int]
    tcp_connections_active: int
    tcp_connections_total: int
    control_errors: Mapping[str, int]
    commands: Mapping[str, int]
    command_retransmits: int
    recording: Mapping[str, Any] | None = None
    #: full garbage collections: count, pauses, freezes (collector.gcpolicy)
    gc: Mapping[str, float] | None = None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


def statistics_to_json(stats: CollectorStatistics) -> dict[str, Any]:
    out = attrs.asdict(stats, recurse=True)
    for device_id, d in stats.devices.items():
        out["devices"][device_id]["loss_ratio"] = d.loss_ratio
    return out
