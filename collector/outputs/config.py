"""`[outputs.NAME]` tables: one output each (several of a kind allowed). docs/OUTPUTS.md."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

OUTPUT_NAME = re.compile(r"[A-Za-z0-9_-]{1,48}")
TYPES = ("influx", "mqtt", "prometheus")
DEFAULT_URLS = {"influx": "http://127.0.0.1:8086", "mqtt": "mqtt://127.0.0.1:1883"}


class OutputConfigError(ValueError):
    pass


@attrs.frozen
class OutputConfig:
    name: str
    type: str = "influx"
    #: influx: the server's base URL (InfluxDB 1.x or 2/3, VictoriaMetrics)
    url: str = "http://127.0.0.1:8086"
    #: "v1": POST /write?db=DATABASE (InfluxDB 1.x, VictoriaMetrics); "v2": /api/v2/write
    api: str = "v1"
    database: str = "telemetry"
    org: str = ""
    bucket: str = ""
    token: str = ""
    username: str = ""
    password: str = ""
    measurement: str = "telemetry"
    layout: str = "fields"
    device_time: bool = False
    gzip: bool = True
    devices: tuple[str, ...] = ("*",)
    metrics: tuple[str, ...] = ("*",)
    #: "" = DIR/outputs/NAME.checkpoint in the recording directory
    checkpoint: str = ""
    #: where an output without a checkpoint starts: "now" (the end of the recording) or "oldest"
    start: str = "now"
    batch_size: int = 5000
    flush_interval: float = 1.0
    max_rate: float = 0.0
    timeout: float = 10.0
    retry_max: float = 30.0
    buffer: int = 100_000
    #: prometheus: series kept at most
    max_series: int = 10_000
    #: mqtt
    topic: str = "collector/{device}/{metric}"
    payload: str = "json"
    qos: int = 1
    retain: bool = False
    events_topic: str = "collector/{device}/events"
    client_id: str = ""
    ca: str = ""


#: key -> what it does (docs/CONFIGURATION.md and docs/OUTPUTS.md are made from this)
OUTPUT_KEYS: dict[str, str] = {
    "type": '"influx": InfluxDB line protocol over HTTP (InfluxDB 1.x, 2, 3; VictoriaMetrics); "prometheus": last-value gauges collector_reading{output,device,metric} on /metrics',
    "devices": "globs of the device ids sent",
    "metrics": "globs of the metric names sent",
    "url": 'influx: the database\'s base URL, http:// or https:// (default "http://127.0.0.1:8086"); mqtt: mqtt://[USER[:PASSWORD]@]HOST[:PORT] or mqtts:// (TLS; default "mqtt://127.0.0.1:1883")',
    "api": '"v1": POST /write?db=DATABASE (InfluxDB 1.x, VictoriaMetrics); "v2": POST /api/v2/write?org=ORG&bucket=BUCKET (InfluxDB 2 and 3)',
    "database": "influx v1: the database",
    "org": "v2: the organisation",
    "bucket": "v2: the bucket",
    "token": "v2: an API token (Authorization: Token ...)",
    "username": "influx v1: a user (HTTP basic authentication); mqtt: the broker user (or in the URL)",
    "password": "its password",
    "measurement": "the measurement of every line",
    "layout": '"fields": one line per datagram, a field per metric; "metric": one line per reading, tag metric, field value',
    "device_time": "add the device's own time as an integer field device_time_us",
    "gzip": "send request bodies gzip-compressed",
    "checkpoint": 'the checkpoint file ("" = DIR/outputs/NAME.checkpoint in the recording directory)',
    "start": 'where an output with no checkpoint starts: "now" (the end of the recording) or "oldest" (all of it)',
    "batch_size": "readings per request at most",
    "flush_interval": "seconds a partial batch waits for more readings",
    "max_rate": "readings per second at most, catching up included (0 = no cap)",
    "timeout": "seconds a request may take before it is retried",
    "retry_max": "the longest wait between retries, in seconds (backoff from 0.5 s, doubling, with jitter)",
    "buffer": "readings held in memory when the collector does not record (beyond: dropped and counted)",
    "max_series": "prometheus: series kept at most; readings of new series beyond are refused and counted",
    "topic": "mqtt: the topic of each reading; {device} and {metric} are replaced",
    "payload": 'mqtt: "json" ({"device", "metric", "value", "time", "seq"}) or "plain" (the value alone: 21.5, 3, true)',
    "qos": "mqtt: 0, 1 (the checkpoint moves on PUBACK) or 2",
    "retain": "mqtt: publish readings retained (the broker keeps the last value of each topic)",
    "events_topic": 'mqtt: where session events go (online, offline with its reason), {device} replaced; "" = not sent',
    "client_id": 'mqtt: the client id ("" = collector-NAME-HOSTNAME)',
    "ca": "mqtt over mqtts://: the CA bundle that verifies the broker (default: the system's)",
}

#: the keys each type takes besides type, devices and metrics
_MQTT_KEYS = frozenset({"topic", "payload", "qos", "retain", "events_topic", "client_id", "ca"})
_RUNNER_KEYS = frozenset(
    {"url", "username", "password", "checkpoint", "start", "batch_size", "flush_interval",
     "max_rate", "timeout", "retry_max", "buffer"}
)  # fmt: skip
TYPE_KEYS: dict[str, frozenset[str]] = {
    "influx": frozenset(OUTPUT_KEYS) - _MQTT_KEYS - {"type", "devices", "metrics", "max_series"},
    "mqtt": _RUNNER_KEYS | _MQTT_KEYS,
    "prometheus": frozenset({"max_series"}),
}


def parse_outputs(body: Any) -> tuple[OutputConfig, ...]:
    if not isinstance(body, Mapping):
        raise OutputConfigError("[outputs] holds one table per output: [outputs.NAME]")
    out = []
    for name, table in body.items():
        where = f"[outputs.{name}]"
        if not OUTPUT_NAME.fullmatch(name):
            raise OutputConfigError(f"{where}: a name is 1-48 of A-Z a-z 0-9 _ -")
        if not isinstance(table, Mapping):
            raise OutputConfigError(f"{where} must be a table")
        kwargs: dict[str, Any] = {}
        defaults = OutputConfig(name)
        for key, value in table.items():
            if key not in OUTPUT_KEYS:
                raise OutputConfigError(f"{where}: unknown key {key!r}")
            default = getattr(defaults, key)
            if isinstance(default, tuple):
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise OutputConfigError(f"{where} {key}: expected a list of globs")
                value = tuple(value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise OutputConfigError(f"{where} {key}: expected true or false")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise OutputConfigError(f"{where} {key}: expected a number")
                value = float(value)
            elif not isinstance(value, type(default)) or isinstance(value, bool):
                raise OutputConfigError(
                    f"{where} {key}: expected {type(default).__name__}, got {value!r}"
                )
            kwargs[key] = value
        kind = kwargs.get("type", "influx")
        if kind in DEFAULT_URLS and "url" not in kwargs:
            kwargs["url"] = DEFAULT_URLS[kind]
        cfg = OutputConfig(name, **kwargs)
        kind = cfg.type if cfg.type in TYPE_KEYS else "influx"
        for key in kwargs:
            if key not in ("type", "devices", "metrics") and key not in TYPE_KEYS[kind]:
                raise OutputConfigError(f"{where}: {key!r} is not a key of {kind} outputs")
        check(cfg, where)
        out.append(cfg)
    return tuple(out)


def check(cfg: OutputConfig, where: str) -> None:
    problems = []
    if cfg.type not in TYPES:
        problems.append(f"type must be one of {', '.join(TYPES)}, not {cfg.type!r}")
    if cfg.type == "mqtt":
        if not cfg.url.startswith(("mqtt://", "mqtts://")):
            problems.append(f"url must be mqtt:// or mqtts://, not {cfg.url!r}")
        if cfg.qos not in (0, 1, 2):
            problems.append(f"qos must be 0, 1 or 2, not {cfg.qos}")
        if cfg.payload not in ("json", "plain"):
            problems.append(f'payload must be "json" or "plain", not {cfg.payload!r}')
        if not cfg.topic or "#" in cfg.topic or "+" in cfg.topic:
            problems.append("topic must be a topic name (no wildcards)")
    elif cfg.type == "influx" and not cfg.url.startswith(("http://", "https://")):
        problems.append(f"url must be http:// or https://, not {cfg.url!r}")
    if cfg.api not in ("v1", "v2"):
        problems.append(f'api must be "v1" or "v2", not {cfg.api!r}')
    if cfg.api == "v2" and not (cfg.org and cfg.bucket):
        problems.append('api "v2" needs org and bucket')
    if cfg.layout not in ("fields", "metric"):
        problems.append(f'layout must be "fields" or "metric", not {cfg.layout!r}')
    if cfg.start not in ("now", "oldest"):
        problems.append(f'start must be "now" or "oldest", not {cfg.start!r}')
    if not cfg.measurement:
        problems.append("measurement must not be empty")
    for key in ("batch_size", "buffer", "max_series"):
        if getattr(cfg, key) < 1:
            problems.append(f"{key} must be at least 1")
    for key in ("flush_interval", "timeout", "retry_max"):
        if getattr(cfg, key) <= 0:
            problems.append(f"{key} must be positive")
    if cfg.max_rate < 0:
        problems.append("max_rate must not be negative (0 = no cap)")
    if problems:
        raise OutputConfigError(f"{where}: " + "; ".join(problems))
