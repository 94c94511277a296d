"""`type = "prometheus"`: the last value of each device's metrics as gauges on /metrics.

    collector_reading{output="NAME",device="greenhouse-1",metric="temperature"} 21.5

A listener of the collector: each accepted reading that the output's globs take replaces the
series' value (a bool is 1 or 0; text values are not numbers and are left out). The series
are capped at `max_series`: a reading of a new series beyond the cap is refused and counted
(`collector_reading_refused_total{output,reason="max_series"}`), so that a device inventing
metric names cannot grow the scrape without bound. Series of a device that is removed stay
until the collector restarts; the cap bounds them.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from collector.core.events import Event, Telemetry
from collector.outputs.config import OutputConfig
from collector.outputs.runner import Filter


class Gauges:
    def __init__(self, cfg: OutputConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.filter = Filter(cfg.devices, cfg.metrics)
        #: (device, metric) -> (value, receive time)
        self.values: dict[tuple[str, str], tuple[float, float]] = {}
        self.refused: collections.Counter[str] = collections.Counter()
        self.state = "sending"

    def on_telemetry(self, batch: Sequence[Telemetry]) -> None:
        values, cap, keep = self.values, self.cfg.max_series, self.filter.keep_fn()
        for t in batch:
            for metric, value in t.readings:
                if keep is not None and not keep(t.device_id, metric):
                    continue
                if isinstance(value, str):
                    self.refused["not_a_number"] += 1
                    continue
                key = (t.device_id, metric)
                if key not in values and len(values) >= cap:
                    self.refused["max_series"] += 1
                    continue
                values[key] = (float(value), t.time)

    def on_event(self, event: Event) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": "prometheus",
            "destination": "/metrics",
            "state": self.state,
            "series": len(self.values),
            "max_series": self.cfg.max_series,
            "refused": dict(self.refused),
        }

    async def serve(self, boundary: Any, *, task_status: Any) -> None:
        task_status.started()  # nothing to run: /metrics reads the values when scraped
