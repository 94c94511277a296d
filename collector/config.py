"""Collector configuration: defaults, TOML loading and validation.

A config file has sections matching the groups below; every key is optional. Unknown sections
or keys are an error, so a typo never silently falls back to a default. See
docs/CONFIGURATION.md (and `collector serve --help`) for the list.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from collector.cluster.connect import BadRedisUrl, check_url
from collector.core.alarms import RULE_KEYS, AlarmConfigError, AlarmRule, parse_rules
from collector.outputs.config import OUTPUT_KEYS, OutputConfig, OutputConfigError, parse_outputs
from collector.wire.datagram import MAX_DATAGRAM, MIN_HELLO_LEN
from collector.wire.jsonio import JsonError, check_value

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


#: What a reload (SIGHUP) applies while running; everything else needs a restart.
LIVE_SETTINGS = frozenset(
    {
        "read_tokens", "command_tokens", "log_level", "device_config", "command_timeout",
        "command_expiry", "flapping_max", "flapping_window", "flapping_ban",
        "ratelimit_per_source", "ratelimit_burst", "ratelimit_total", "ratelimit_max_sources",
        "max_metrics_per_device", "stream_max_subscribers", "http_max_connections",
        "http_max_per_client", "http_header_timeout", "http_body_timeout", "http_send_timeout",
        "http_idle_timeout", "max_config_rules", "max_tcp_connections", "registration_timeout",
        "send_timeout",
    }
)  # fmt: skip


#: Largest configuration one push may carry, as JSON: it has to fit a control-channel line and
#: a COMMAND datagram to a UDP-only device.
MAX_CONFIG_BYTES = 1024


class ConfigPushError(Exception):
    """A configuration push that was refused (`code` and `message` go into the answer)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


NODE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,48}")


@attrs.frozen
class DeviceConfigRule:
    """Configuration sent to every device whose id matches the glob `match`."""

    match: str
    config: Mapping[str, Any]

    def applies_to(self, device_id: str) -> bool:
        return fnmatch.fnmatchcase(device_id, self.match)


MAX_METRIC_META = 1024


@attrs.frozen
class MetricMeta:
    """`[metrics."GLOB"]`: what the metrics whose names match mean, for dashboards."""

    match: str
    unit: str = ""
    description: str = ""

    def to_json(self) -> dict[str, str]:
        return {"match": self.match, "unit": self.unit, "description": self.description}


def parse_metric_meta(body: Any) -> tuple[MetricMeta, ...]:
    if not isinstance(body, Mapping):
        raise ConfigError('[metrics] must hold tables: [metrics."GLOB"] with unit, description')
    if len(body) > MAX_METRIC_META:
        raise ConfigError(f"[metrics]: at most {MAX_METRIC_META} tables")
    out = []
    for match, table in body.items():
        where = f"[metrics.{match!r}]"
        if not 0 < len(match) <= 128:
            raise ConfigError(f"{where}: the glob must have 1-128 characters")
        if not isinstance(table, Mapping) or not set(table) <= {"unit", "description"}:
            raise ConfigError(f"{where}: a table of unit and description")
        unit, description = table.get("unit", ""), table.get("description", "")
        if not isinstance(unit, str) or len(unit) > 32:
            raise ConfigError(f"{where}: unit must be text of at most 32 characters")
        if not isinstance(description, str) or len(description) > 500:
            raise ConfigError(f"{where}: description must be text of at most 500 characters")
        out.append(MetricMeta(match, unit, description))
    return tuple(out)


ARG_TYPES = ("number", "integer", "string", "boolean")
COMMAND_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_DECLARED_COMMANDS = 256


@attrs.frozen
class CommandDecl:
    """`[device_commands.NAME]`: a command the devices matching `devices` accept, for dashboards
    (a form instead of free text) and for the API (arguments checked before sending)."""

    name: str
    devices: tuple[str, ...] = ("*",)
    description: str = ""
    args: Mapping[str, str] = attrs.field(factory=dict)  # argument -> one of ARG_TYPES
    required: tuple[str, ...] = ()

    def applies_to(self, device_id: str) -> bool:
        return any(fnmatch.fnmatchcase(device_id, g) for g in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "devices": list(self.devices),
            "description": self.description,
            "args": dict(self.args),
            "required": list(self.required),
        }

    def check(self, args: Mapping[str, Any]) -> str | None:
        """What is wrong with `args` for this command, or None."""
        for key in self.required:
            if key not in args:
                return f"{self.name} needs the argument {key!r}"
        for key, value in args.items():
            kind = self.args.get(key)
            if kind is None:
                known = ", ".join(self.args) or "none"
                return f"{self.name} takes no argument {key[:60]!r} (arguments: {known})"
            ok = {
                "number": isinstance(value, int | float) and not isinstance(value, bool),
                "integer": isinstance(value, int) and not isinstance(value, bool),
                "string": isinstance(value, str),
                "boolean": isinstance(value, bool),
            }[kind]
            if not ok:
                return f"{self.name}: argument {key!r} must be {'an' if kind == 'integer' else 'a'} {kind}, not {value!r:.60}"
        return None


def parse_command_decls(body: Any) -> tuple[CommandDecl, ...]:
    if not isinstance(body, Mapping):
        raise ConfigError("[device_commands] must hold tables: [device_commands.NAME]")
    if len(body) > MAX_DECLARED_COMMANDS:
        raise ConfigError(f"[device_commands]: at most {MAX_DECLARED_COMMANDS} commands")
    out = []
    for name, table in body.items():
        where = f"[device_commands.{name}]"
        if not COMMAND_NAME.fullmatch(name):
            raise ConfigError(f"{where}: a command name is 1-128 of A-Z a-z 0-9 _ . : -")
        if not isinstance(table, Mapping) or not set(table) <= {
            "devices", "description", "args", "required",
        }:  # fmt: skip
            raise ConfigError(f"{where}: a table of devices, description, args and required")
        devices = table.get("devices", ["*"])
        if (
            not isinstance(devices, list)
            or not devices
            or not all(isinstance(g, str) and g for g in devices)
        ):
            raise ConfigError(f"{where}: devices must be a list of globs")
        description = table.get("description", "")
        if not isinstance(description, str) or len(description) > 500:
            raise ConfigError(f"{where}: description must be text of at most 500 characters")
        args = table.get("args", {})
        if not isinstance(args, Mapping) or not all(
            isinstance(k, str) and 0 < len(k) <= 64 and v in ARG_TYPES for k, v in args.items()
        ):
            raise ConfigError(
                f"{where}: args maps argument names to a type: {', '.join(ARG_TYPES)}"
            )
        required = table.get("required", [])
        if not isinstance(required, list) or not all(
            isinstance(r, str) and r in args for r in required
        ):
            raise ConfigError(f"{where}: required must list arguments named in args")
        out.append(CommandDecl(name, tuple(devices), description, dict(args), tuple(required)))
    return tuple(out)


@attrs.frozen(kw_only=True)
class Config:
    # [server]
    host: str = "0.0.0.0"
    tcp_port: int = 8080
    udp_port: int = 8081
    http_port: int | None = 8082  # None: no HTTP server (dashboards, API, metrics)
    udp_rcvbuf: int = 8 * 1024 * 1024
    udp_coalesce: float = 0.001
    gc_freeze_pause: float = 0.0
    # [tls]
    tls_cert: str = ""  # "" = no TLS: plain text on the TCP and HTTP ports
    tls_key: str = ""
    tls_client_ca: str = ""  # "" = no client certificates asked for
    tls_plaintext_tcp_port: int = -1  # -1 = none; with TLS, an extra plain-text control port
    tls_plaintext_http_port: int = -1
    # [http]
    read_tokens: tuple[str, ...] = ()
    command_tokens: tuple[str, ...] = ()
    http_max_connections: int = 256
    http_max_per_client: int = 32
    http_header_timeout: float = 10.0
    http_body_timeout: float = 10.0
    http_send_timeout: float = 10.0
    http_idle_timeout: float = 30.0
    http_max_body: int = 65536
    # [stream]
    stream_history: int = 300
    stream_queue: int = 5000
    stream_batch: int = 2000
    stream_stall_limit: float = 10.0
    stream_ping_interval: float = 10.0
    stream_ping_timeout: float = 10.0
    stream_heartbeat: float = 1.0
    stream_min_interval: float = 0.002
    stream_max_subscribers: int = 100
    stream_max_message: int = 65536
    stream_max_replies: int = 32
    stream_handshake_timeout: float = 10.0
    stream_max_handshakes: int = 32
    # [sessions]
    heartbeat_interval: float = 5.0
    timeout: float = 15.0
    replay_window_blocks: int = 16
    goodbye_linger: float = 2.0
    # [limits]
    max_tcp_connections: int = 1024
    max_line: int = 4096
    registration_timeout: float = 10.0
    max_datagram: int = MAX_DATAGRAM
    max_devices: int = 10_000
    command_queue: int = 32
    max_metrics_per_device: int = 256
    max_config_rules: int = 256
    send_timeout: float = 10.0
    flapping_max: int = 20
    flapping_window: float = 60.0
    flapping_ban: float = 120.0
    # [ratelimit]
    ratelimit_per_source: float = 500.0
    ratelimit_burst: float = 1000.0
    ratelimit_total: float = 20000.0
    ratelimit_max_sources: int = 4096
    # [commands]
    command_timeout: float = 30.0
    command_expiry: float = 300.0
    command_retransmit_initial: float = 0.5
    command_retransmit_max: float = 8.0
    # [recording]
    record_dir: str = ""  # "" = not recording
    record_flush_interval: float = 0.2
    record_buffer_mb: float = 16.0
    record_segment_mb: float = 64.0
    record_segment_minutes: float = 60.0
    record_retain_days: float = 7.0  # 0 = keep forever
    record_retain_gb: float = 1.0  # 0 = no size limit
    record_compress: bool = False
    record_raw: bool = False
    record_fsync: bool = False
    # [shutdown]
    shutdown_grace: float = 5.0
    shutdown_goodbye_timeout: float = 2.0
    shutdown_close_timeout: float = 2.0
    # [logging]
    log_level: str = "INFO"
    log_format: str = "text"
    log_rate_limit: float = 10.0  # lines per second per kind of problem, then suppressed
    # [cluster]
    workers: int = 1
    node: str = ""  # "" = the host name
    redis: str = ""  # "" = no cluster bus (one process on its own)
    node_heartbeat: float = 1.0
    node_timeout: float = 5.0
    cluster_stream_maxlen: int = 10_000
    cluster_buffer: int = 10_000
    cluster_prefix: str = "collector"
    cluster_shared_devices: bool = False
    # [[device_config]]
    device_config: tuple[DeviceConfigRule, ...] = ()
    # [outputs.NAME]
    outputs: tuple[OutputConfig, ...] = ()
    # [alarms.NAME]
    alarms: tuple[AlarmRule, ...] = ()
    # [metrics."GLOB"]
    metrics_meta: tuple[MetricMeta, ...] = ()
    # [device_commands.NAME]
    declared_commands: tuple[CommandDecl, ...] = ()

    def __attrs_post_init__(self) -> None:
        problems = []
        if self.heartbeat_interval <= 0:
            problems.append("heartbeat_interval must be positive")
        if self.timeout <= self.heartbeat_interval:
            problems.append("timeout must be longer than heartbeat_interval")
        if not MIN_HELLO_LEN <= self.max_datagram <= 65507:
            problems.append(f"max_datagram must be between {MIN_HELLO_LEN} and 65507")
        if self.max_line < 256:
            problems.append("max_line must be at least 256")
        for name in (
            "max_tcp_connections", "max_devices", "command_queue", "stream_queue",
            "stream_batch", "stream_max_subscribers", "stream_max_message", "stream_max_replies",
            "stream_max_handshakes", "http_max_connections", "http_max_per_client", "http_max_body",
            "max_metrics_per_device", "max_config_rules", "flapping_max", "ratelimit_max_sources",
            "workers", "cluster_stream_maxlen", "cluster_buffer",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in (
            "registration_timeout", "command_timeout", "command_expiry", "shutdown_grace",
            "stream_stall_limit", "stream_ping_interval", "stream_ping_timeout", "stream_heartbeat",
            "record_flush_interval", "record_buffer_mb", "record_segment_mb", "record_segment_minutes",
            "http_header_timeout", "http_body_timeout", "http_send_timeout", "http_idle_timeout",
            "stream_handshake_timeout", "send_timeout", "flapping_window", "flapping_ban",
            "ratelimit_per_source", "ratelimit_burst", "ratelimit_total",
            "shutdown_goodbye_timeout", "shutdown_close_timeout", "goodbye_linger",
            "node_heartbeat", "node_timeout",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if not 0 <= self.udp_coalesce <= 0.1:
            problems.append("udp_coalesce must be between 0 and 0.1 second")
        if not 0 <= self.gc_freeze_pause <= 60:
            problems.append("gc_freeze_pause must be between 0 and 60 seconds")
        if not 0 <= self.stream_min_interval <= 1:
            problems.append("stream min_interval must be between 0 and 1 second")
        if self.record_retain_days < 0 or self.record_retain_gb < 0:
            problems.append("record_retain_days and record_retain_gb must not be negative")
        if self.log_format not in ("text", "json"):
            problems.append("log_format must be 'text' or 'json'")
        if self.replay_window_blocks < 2 or self.replay_window_blocks & (
            self.replay_window_blocks - 1
        ):
            problems.append("replay_window_blocks must be a power of two >= 2")
        for name in ("tcp_port", "udp_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                problems.append(f"{name} must be a port from 0 to 65535, not {value}")
        for name in ("tls_plaintext_tcp_port", "tls_plaintext_http_port"):
            if not -1 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be -1 (none) or a port from 0 to 65535")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(
                f"log level must be DEBUG, INFO, WARNING or ERROR, not {self.log_level!r}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("[tls] needs both cert and key")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("[tls] client_ca needs cert and key")
        if not self.tls_cert and (
            self.tls_plaintext_tcp_port >= 0 or self.tls_plaintext_http_port >= 0
        ):
            problems.append("[tls] plaintext ports only make sense with a certificate")
        if self.node_timeout < 2 * self.node_heartbeat:
            problems.append("[cluster] node_timeout must be at least 2 node heartbeats")
        if self.node and not NODE_NAME.fullmatch(self.node):
            problems.append(f"[cluster] node must be 1-48 of A-Z a-z 0-9 _ . -, not {self.node!r}")
        if self.redis:
            try:
                check_url(self.redis)
            except BadRedisUrl as exc:
                problems.append(str(exc))
        if self.cluster_shared_devices and not self.redis and self.workers == 1:
            problems.append(
                "[cluster] shared_devices needs a cluster bus: redis, or workers above 1"
            )
        if self.workers > 1 and (
            self.tls_plaintext_tcp_port >= 0 or self.tls_plaintext_http_port >= 0
        ):
            problems.append("[tls] plaintext ports are not available with more than one worker")
        if problems:
            raise ConfigError("; ".join(problems))
        if (self.redis or self.workers > 1) and self.node_timeout < self.node_heartbeat + 3.0:
            log.warning(
                "[cluster] node_timeout %.1fs is under node_heartbeat + 3 s (%.1fs): a stalled "
                "Redis is noticed only after a command times out (2 s, plus a 1 s read), so "
                "a stall may mark other nodes lost before it is",
                self.node_timeout,
                self.node_heartbeat + 3.0,
            )
        if self.timeout < 2.5 * self.heartbeat_interval:
            log.warning(
                "timeout %.1fs is under 2.5 heartbeat intervals (%.1fs): one lost heartbeat "
                "may mark a device offline",
                self.timeout,
                2.5 * self.heartbeat_interval,
            )


@attrs.frozen
class Setting:
    """One key of the config file: where it lives, which Config field it sets, what it does."""

    section: str
    key: str
    field: str
    doc: str


#: Every key of the config file, in the order of examples/collector.toml: the one source of the
#: example file, docs/CONFIGURATION.md and the parser (`collector config example`, `docs`).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "server",
        "host",
        "host",
        "address to bind; 0.0.0.0 is every IPv4 address, :: every IPv6 one",
    ),
    Setting("server", "tcp_port", "tcp_port", "TCP control channel"),
    Setting("server", "udp_port", "udp_port", "UDP datagrams"),
    Setting("server", "http_port", "http_port", "dashboards and API (see docs/STREAM.md)"),
    Setting(
        "server",
        "udp_rcvbuf",
        "udp_rcvbuf",
        "bytes asked for the UDP receive buffer; the granted size is logged",
    ),
    Setting(
        "server",
        "udp_coalesce",
        "udp_coalesce",
        "seconds to wait after a small batch of datagrams, only while ingest is busy: fewer wake-ups under load, no delay when idle",
    ),
    Setting(
        "server",
        "gc_freeze_pause",
        "gc_freeze_pause",
        "seconds: after a full garbage collection that stopped the collector longer than this, the objects that survived it are left out of later collections (gc.freeze; short pauses with 100,000 devices); 0 (the default): never. Opt in for very large fleets: a reference cycle among objects frozen alive is never freed; the collector makes none, but with TLS each connection is one (trio's SSLStream), so a TLS connection alive at a freeze stays in memory after it closes (docs/PERFORMANCE.md)",
    ),
    Setting(
        "sessions",
        "heartbeat_interval",
        "heartbeat_interval",
        "seconds; devices heartbeat when otherwise idle",
    ),
    Setting(
        "sessions",
        "timeout",
        "timeout",
        'seconds of silence before a device is offline (reason "timeout"); defaults to 3 heartbeat intervals when only the interval is set',
    ),
    Setting(
        "sessions",
        "replay_window_blocks",
        "replay_window_blocks",
        "anti-replay window: (blocks - 1) * 64 sequence numbers",
    ),
    Setting(
        "sessions",
        "goodbye_linger",
        "goodbye_linger",
        "seconds a session stays open after a goodbye for datagrams still on their way",
    ),
    Setting(
        "limits",
        "max_tcp_connections",
        "max_tcp_connections",
        "open control connections at once (then `too_many_connections`)",
    ),
    Setting("limits", "max_line", "max_line", "bytes per control-channel line, newline included"),
    Setting(
        "limits",
        "registration_timeout",
        "registration_timeout",
        "seconds a new control connection has to register (then `registration_timeout`)",
    ),
    Setting(
        "limits",
        "max_datagram",
        "max_datagram",
        "bytes; larger datagrams are rejected as too_large",
    ),
    Setting("limits", "max_devices", "max_devices", "devices online at once"),
    Setting("limits", "command_queue", "command_queue", "open commands per device"),
    Setting(
        "limits",
        "max_metrics_per_device",
        "max_metrics_per_device",
        "metric names kept per device; readings of more names are refused and counted",
    ),
    Setting(
        "limits",
        "max_config_rules",
        "max_config_rules",
        "configuration rules (one per glob: a push to the same glob replaces it)",
    ),
    Setting(
        "limits",
        "send_timeout",
        "send_timeout",
        "seconds a send to a device's control connection may make no progress",
    ),
    Setting(
        "limits",
        "flapping_max",
        "flapping_max",
        "a device that registers more than this many times ...",
    ),
    Setting("limits", "flapping_window", "flapping_window", "... within this many seconds ..."),
    Setting(
        "limits", "flapping_ban", "flapping_ban", '... is refused ("banned") for this many seconds'
    ),
    Setting(
        "ratelimit",
        "per_source",
        "ratelimit_per_source",
        "datagrams per second per source address (IPv6: per /64) ...",
    ),
    Setting("ratelimit", "burst", "ratelimit_burst", "... with bursts up to this many"),
    Setting(
        "ratelimit", "total", "ratelimit_total", "datagrams per second from all sources together"
    ),
    Setting(
        "ratelimit",
        "max_sources",
        "ratelimit_max_sources",
        "source addresses tracked at once (then the idle, then the oldest, are forgotten)",
    ),
    Setting(
        "commands", "timeout", "command_timeout", "seconds from sending to the device's answer"
    ),
    Setting(
        "commands", "expiry", "command_expiry", "seconds a command may wait for an offline device"
    ),
    Setting(
        "commands",
        "retransmit_initial",
        "command_retransmit_initial",
        "UDP command retransmission: first wait, doubling ...",
    ),
    Setting("commands", "retransmit_max", "command_retransmit_max", "... up to this"),
    Setting("tls", "cert", "tls_cert", "PEM certificate chain (may also hold the key)"),
    Setting("tls", "key", "tls_key", "PEM private key"),
    Setting(
        "tls",
        "client_ca",
        "tls_client_ca",
        "PEM CA bundle: devices must present a client certificate it signed (mutual TLS)",
    ),
    Setting(
        "tls",
        "plaintext_tcp_port",
        "tls_plaintext_tcp_port",
        "with TLS, also listen for plain-text control connections here (-1 = no)",
    ),
    Setting(
        "tls",
        "plaintext_http_port",
        "tls_plaintext_http_port",
        "with TLS, also serve plain HTTP here (-1 = no)",
    ),
    Setting(
        "http", "read_tokens", "read_tokens", "may watch the stream, read the API and /metrics"
    ),
    Setting(
        "http",
        "command_tokens",
        "command_tokens",
        "may also send commands, kick devices, push configuration",
    ),
    Setting(
        "http", "max_connections", "http_max_connections", "open HTTP connections in all (then 503)"
    ),
    Setting(
        "http", "max_connections_per_client", "http_max_per_client", "... and per client address"
    ),
    Setting(
        "http",
        "header_timeout",
        "http_header_timeout",
        "seconds to send a request's head (then 408, closed)",
    ),
    Setting("http", "body_timeout", "http_body_timeout", "seconds to send its body after the head"),
    Setting(
        "http",
        "send_timeout",
        "http_send_timeout",
        "seconds an answer may make no progress (a client that does not read is dropped)",
    ),
    Setting(
        "http",
        "idle_timeout",
        "http_idle_timeout",
        "seconds a keep-alive connection may wait for its next request",
    ),
    Setting("http", "max_body", "http_max_body", "bytes in a request body (then 413)"),
    Setting("stream", "history", "stream_history", "points per series in a dashboard's snapshot"),
    Setting(
        "stream",
        "queue_limit",
        "stream_queue",
        "readings queued per dashboard before it coalesces (latest per series)",
    ),
    Setting("stream", "batch_limit", "stream_batch", "readings per `readings` message"),
    Setting(
        "stream",
        "stall_limit",
        "stream_stall_limit",
        "seconds a send may make no progress before the dashboard is closed (4002)",
    ),
    Setting("stream", "ping_interval", "stream_ping_interval", "seconds between WebSocket pings"),
    Setting(
        "stream",
        "ping_timeout",
        "stream_ping_timeout",
        "seconds to answer one (else closed with 4003)",
    ),
    Setting(
        "stream",
        "heartbeat_interval",
        "stream_heartbeat",
        "seconds between stream heartbeats (and per-device statistics)",
    ),
    Setting(
        "stream",
        "min_interval",
        "stream_min_interval",
        "seconds between two rounds of messages to one dashboard while the collector is busy (from when its loop used more than half a core over 0.1 s until it uses less than 0.35): batches readings under load; otherwise, and always with 0, a dashboard is sent what is new at once, batching only what gathers while its previous send is in flight",
    ),
    Setting(
        "stream",
        "max_subscribers",
        "stream_max_subscribers",
        "dashboards connected at once (then 503)",
    ),
    Setting(
        "stream",
        "max_message",
        "stream_max_message",
        "bytes a dashboard may send in one message (else closed with 1009)",
    ),
    Setting(
        "stream",
        "max_replies",
        "stream_max_replies",
        "pongs and errors queued for a dashboard that does not read; more are dropped",
    ),
    Setting(
        "stream",
        "handshake_timeout",
        "stream_handshake_timeout",
        "seconds for a WebSocket handshake",
    ),
    Setting(
        "stream",
        "max_handshakes",
        "stream_max_handshakes",
        "WebSocket handshakes in progress at once (then 503)",
    ),
    Setting(
        "recording",
        "dir",
        "record_dir",
        'where to record (docs/RECORDING.md); "" = off; --record DIR sets it',
    ),
    Setting(
        "recording",
        "flush_interval",
        "record_flush_interval",
        "seconds: bounds what a crash (kill -9) can lose",
    ),
    Setting(
        "recording",
        "buffer_mb",
        "record_buffer_mb",
        "in memory while the disk catches up; beyond it, records are dropped and counted",
    ),
    Setting("recording", "segment_mb", "record_segment_mb", "rotate segments at this size ..."),
    Setting("recording", "segment_minutes", "record_segment_minutes", "... or this age"),
    Setting(
        "recording",
        "retain_days",
        "record_retain_days",
        "delete closed segments older than this (0 = keep)",
    ),
    Setting(
        "recording",
        "retain_gb",
        "record_retain_gb",
        "and the oldest beyond this total (0 = no limit)",
    ),
    Setting("recording", "compress", "record_compress", "gzip closed segments"),
    Setting("recording", "raw", "record_raw", "also record every accepted datagram, byte for byte"),
    Setting(
        "recording",
        "fsync",
        "record_fsync",
        "fsync every batch (survives power loss, costs latency)",
    ),
    Setting(
        "shutdown",
        "grace",
        "shutdown_grace",
        "seconds commands already sent get to be answered on SIGINT/SIGTERM",
    ),
    Setting(
        "shutdown",
        "goodbye_timeout",
        "shutdown_goodbye_timeout",
        "then seconds for the goodbyes to devices",
    ),
    Setting(
        "shutdown",
        "close_timeout",
        "shutdown_close_timeout",
        "then seconds for the dashboards' final events and close frames",
    ),
    Setting(
        "cluster",
        "workers",
        "workers",
        "collector processes on this machine, sharing its ports (docs/SCALING.md); more than 1 needs a cluster bus: `redis`, or a private redis-server started for them",
    ),
    Setting(
        "cluster",
        "node",
        "node",
        'this node\'s name on the bus ("" = the host name; workers add -0, -1, ...)',
    ),
    Setting(
        "cluster",
        "redis",
        "redis",
        'the cluster bus: redis://[:PASSWORD@]HOST:PORT/DB, rediss:// (TLS), unix:///PATH, or redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB] (the primary that Redis Sentinel names; "" = none)',
    ),
    Setting(
        "cluster",
        "node_heartbeat",
        "node_heartbeat",
        "seconds between a node's heartbeats on the bus",
    ),
    Setting(
        "cluster",
        "node_timeout",
        "node_timeout",
        'seconds without a heartbeat before the other nodes mark a node lost (its devices go offline with reason "node_lost")',
    ),
    Setting(
        "cluster",
        "stream_maxlen",
        "cluster_stream_maxlen",
        "entries kept in each node's readings stream on Redis (one entry per publish round; XADD MAXLEN ~); its events and requests streams keep 1000",
    ),
    Setting(
        "cluster",
        "buffer",
        "cluster_buffer",
        "entries a node holds for the bus while Redis is away; beyond that the oldest are dropped and counted",
    ),
    Setting("cluster", "prefix", "cluster_prefix", "the prefix of every Redis key"),
    Setting(
        "cluster",
        "shared_devices",
        "cluster_shared_devices",
        "device credentials live in Redis: a device added, removed or rotated on any node (API, or `collector devices --redis`) reaches every node without a restart; the first node to join seeds them with its devices file, which is from then on this node's cache of them",
    ),
    Setting("logging", "level", "log_level", "DEBUG, INFO, WARNING or ERROR"),
    Setting("logging", "format", "log_format", 'or "json": one JSON object per line'),
    Setting(
        "logging",
        "rate_limit",
        "log_rate_limit",
        "lines per second per kind of problem; the rest are counted",
    ),
)
SECTION_DOCS: dict[str, str] = {
    "ratelimit": "Datagrams that no session vouches for (HELLOs, unknown sessions, a session's datagrams from a new address) are rate-limited per source address before any key lookup or MAC.",
    "tls": "With a certificate, the TCP control channel is TLS and the HTTP port HTTPS/WSS (one certificate for both); without one, both are plain text and the startup log says so. Reloaded on SIGHUP.",
    "http": "Bearer tokens (see docs/STREAM.md). With none, access control is off (and the log says so).",
    "logging": "",
    "cluster": "Several processes (`workers`) or machines (nodes on one Redis) as one collector: docs/SCALING.md.",
}

# section -> {toml key: Config field}
_SECTIONS: dict[str, dict[str, str]] = {}
for _s in SETTINGS:
    _SECTIONS.setdefault(_s.section, {})[_s.key] = _s.field


def _check_type(field: str, value: Any) -> Any:
    default = getattr(Config(), field)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{field}: expected a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(default, bool) or isinstance(value, bool):
        ok = type(value) is type(default)
    elif isinstance(default, float):
        ok = isinstance(value, int | float)
        value = float(value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{field}: expected {type(default).__name__}, got {value!r}")
    return value


def config_from_mapping(data: Mapping[str, Any], **overrides: Any) -> Config:
    kwargs: dict[str, Any] = {}
    rules: list[DeviceConfigRule] = []
    for section, body in data.items():
        if section == "device_config":
            if not isinstance(body, list):
                raise ConfigError("[[device_config]] must be an array of tables")
            for rule in body:
                if not isinstance(rule, dict) or set(rule) != {"match", "config"}:
                    raise ConfigError("each [[device_config]] needs exactly 'match' and 'config'")
                if not isinstance(rule["match"], str) or not isinstance(rule["config"], dict):
                    raise ConfigError("[[device_config]]: 'match' is a glob, 'config' a table")
                try:
                    check_value(rule["config"])
                except JsonError as exc:
                    raise ConfigError(
                        f"[[device_config]] {rule['match']!r}: {exc.message} (configuration "
                        "travels to devices as JSON: no dates, no inf or nan)"
                    ) from None
                rules.append(DeviceConfigRule(rule["match"], rule["config"]))
            continue
        if section == "outputs":
            try:
                kwargs["outputs"] = parse_outputs(body)
            except OutputConfigError as exc:
                raise ConfigError(str(exc)) from None
            continue
        if section == "alarms":
            try:
                kwargs["alarms"] = parse_rules(body)
            except AlarmConfigError as exc:
                raise ConfigError(str(exc)) from None
            continue
        if section == "metrics":
            kwargs["metrics_meta"] = parse_metric_meta(body)
            continue
        if section == "device_commands":
            kwargs["declared_commands"] = parse_command_decls(body)
            continue
        keys = _SECTIONS.get(section)
        if keys is None:
            raise ConfigError(f"unknown section [{section}]")
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in body.items():
            field = keys.get(key)
            if field is None:
                raise ConfigError(f"unknown key {key!r} in [{section}]")
            kwargs[field] = _check_type(field, value)
    if rules:
        kwargs["device_config"] = tuple(rules)
    if "timeout" not in kwargs and "heartbeat_interval" in kwargs and "timeout" not in overrides:
        kwargs["timeout"] = 3 * kwargs["heartbeat_interval"]
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**kwargs)


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Read a TOML file (if given) and apply command-line `overrides` (None means unset)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return config_from_mapping(data, **overrides)


# -- the example file and docs/CONFIGURATION.md, from SETTINGS ---------------------------------

_EXAMPLE_HEAD = """\
# The collector's configuration: every key, with its default (this file is written by
# `collector config example`; docs/CONFIGURATION.md is made from the same table).
# Use it with: collector serve --devices devices.toml --config collector.toml
# Command-line flags (--host, --tcp-port, --udp-port, --http-port, --record, --log-level,
# --log-format) win over this file. Unknown sections or keys are an error, so a typo never
# falls back to a default silently. `collector config check FILE` validates a file and prints
# the configuration it gives. A SIGHUP applies the keys marked "live" without a restart.
"""

_DEVICE_CONFIG_EXAMPLE = """\
# Configuration sent to devices: in the welcome (TCP and UDP-only alike), and pushed to those
# online when it changes (POST /api/config). Every rule whose glob matches the device id
# applies, later rules winning. Values are JSON values (no dates, no inf or nan).
[[device_config]]
match = "*"
config = { report_interval = 1.0 }

[[device_config]]
match = "greenhouse-*"
config = { report_interval = 5.0, unit = "C" }
"""


_OUTPUTS_EXAMPLE = """\
# Outputs: what the collector records, sent on to a database (docs/OUTPUTS.md). Each reads the
# recording from its checkpoint, so an outage or a restart loses nothing. Uncomment to use.
# [outputs.history]
# type = "influx"
# url = "http://127.0.0.1:8428"      # VictoriaMetrics; InfluxDB 1.x listens on 8086
# database = "telemetry"
"""


_ALARMS_EXAMPLE = """\
# Alarms: threshold rules on readings, evaluated as they arrive (docs/ALARMS.md). Each fires
# per (device, metric) it matches, on the page, the stream, /api/alarms and /metrics.
# [alarms.too-hot]
# metric = "temp*"
# devices = ["greenhouse-*"]
# above = 35.0
# hysteresis = 0.5
# severity = "critical"
# description = "greenhouse too hot for the seedlings"
#
# [alarms.silent]
# metric = "*"
# no_data = 60.0
"""

_COMMANDS_EXAMPLE = """\
# Commands the devices accept: dashboards offer them with a form for their arguments, and the
# API checks a declared command's arguments before sending it (names not declared here can
# still be sent, by anyone with a command token).
# [device_commands.set_interval]
# devices = ["greenhouse-*"]
# description = "how often to report, in seconds"
# args = { seconds = "number" }
# required = ["seconds"]
"""

_METRICS_EXAMPLE = """\
# What metrics mean: a unit and a description per glob of metric names, shown by dashboards
# on axes, tooltips and the device table. The first glob that matches a name wins.
# [metrics."temp*"]
# unit = "°C"
# description = "air temperature"
"""


def _toml_value(value: Any) -> str:
    """One TOML value on one line: tables inline, at any depth."""
    return _toml_item(value).as_string()


def _toml_item(value: Any) -> Any:
    import tomlkit

    if isinstance(value, dict):
        table = tomlkit.inline_table()
        for k, v in value.items():
            table.append(k, _toml_item(v))
        return table
    if isinstance(value, list | tuple):
        array = tomlkit.array()
        array.extend(_toml_item(v) for v in value)
        return array
    return tomlkit.item(value)


def render_toml(config: Config | None = None, *, example: bool = True) -> str:
    """The configuration as a TOML file with a comment on every key: the defaults (the example
    file), or the values of `config` (what `collector config check` prints)."""
    config = config if config is not None else Config()
    out = [_EXAMPLE_HEAD]
    section = None
    for s in SETTINGS:
        if s.section != section:
            section = s.section
            out.append(f"\n[{section}]")
            if SECTION_DOCS.get(section):
                out += [f"# {line}" for line in _wrap(SECTION_DOCS[section], 96)]
        value = _toml_value(getattr(config, s.field))
        live = " (live)" if s.field in LIVE_SETTINGS else ""
        line = f"{s.key} = {value}"
        doc = (s.doc + live).strip()
        out.append(f"{line:<26} # {doc}" if doc else line)
    out.append("")
    if example and not config.device_config:
        out.append(_DEVICE_CONFIG_EXAMPLE)
    else:
        for rule in config.device_config:
            out += ["[[device_config]]", f"match = {_toml_value(rule.match)}",
                    f"config = {_toml_value(dict(rule.config))}", ""]  # fmt: skip
    if example and not config.outputs:
        out.append(_OUTPUTS_EXAMPLE)
    for output in config.outputs:
        out.append(f"[outputs.{output.name}]")
        defaults = OutputConfig(output.name)
        for key in OUTPUT_KEYS:
            value = getattr(output, key)
            if key == "type" or value != getattr(defaults, key):
                out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    if example and not config.alarms:
        out.append(_ALARMS_EXAMPLE)
    for rule in config.alarms:
        out.append(f"[alarms.{rule.name}]")
        defaults = AlarmRule(rule.name)
        for key in RULE_KEYS:
            value = getattr(rule, key)
            if value is not None and (key == "metric" or value != getattr(defaults, key)):
                out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    if example and not config.metrics_meta:
        out.append(_METRICS_EXAMPLE)
    for meta in config.metrics_meta:
        out.append(f"[metrics.{_toml_value(meta.match)}]")
        out += [f"{k} = {_toml_value(getattr(meta, k))}" for k in ("unit", "description")]
        out.append("")
    if example and not config.declared_commands:
        out.append(_COMMANDS_EXAMPLE)
    for decl in config.declared_commands:
        out.append(f"[device_commands.{decl.name}]")
        out.append(f"devices = {_toml_value(list(decl.devices))}")
        if decl.description:
            out.append(f"description = {_toml_value(decl.description)}")
        if decl.args:
            out.append(f"args = {_toml_value(dict(decl.args))}")
        if decl.required:
            out.append(f"required = {_toml_value(list(decl.required))}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_markdown() -> str:
    """docs/CONFIGURATION.md."""
    defaults = Config()
    out = [
        "# Configuration",
        "",
        "The collector reads one TOML file (`collector serve --config FILE`). Every key is",
        "optional; unknown sections or keys are an error, so a typo never silently falls back to a",
        "default. This page and `examples/collector.toml` are both made from the same table in",
        "`collector/config.py` (`collector config docs`, `collector config example`), and a test",
        "keeps them equal. `collector config check FILE` validates a file and prints the",
        "configuration it gives, defaults included.",
        "",
        "Flags win over the file: `--host`, `--tcp-port`, `--udp-port`, `--http-port`, `--record",
        "DIR`, `--log-level`, `--log-format`. On SIGHUP (`systemctl reload`) the collector reads",
        "the devices file and the config file again and applies the keys marked **live**; the",
        "others need a restart, and the log says which changed.",
        "",
        "Exit statuses of every `collector` command: 0 it did what was asked; 1 it ran but did not",
        "(errors on the way, nothing received, a check failed); 2 bad usage or input (a flag, a",
        "config or devices file, a recording); 3 the environment (a port in use, a permission, a",
        "collector that does not answer, no terminal); 130 interrupted.",
    ]
    section = None
    for s in SETTINGS:
        if s.section != section:
            section = s.section
            out += ["", f"## [{section}]", ""]
            if SECTION_DOCS.get(section):
                out += [SECTION_DOCS[section], ""]
            out += ["| key | default | live | what it does |", "|---|---|---|---|"]
        default = _toml_value(getattr(defaults, s.field)).replace("|", "\\|")
        live = "yes" if s.field in LIVE_SETTINGS else ""
        doc = s.doc.replace("|", "\\|")
        out.append(f"| `{s.key}` | `{default}` | {live} | {doc} |")
    out += [
        "",
        "## [[device_config]]",
        "",
        "Configuration sent to devices, by glob of device ids: an array of tables with exactly",
        "`match` (a glob) and `config` (a table of JSON values). Every rule whose glob matches",
        "applies, later rules winning. It goes in the welcome and, when pushed with",
        "`POST /api/config`, to the devices online (docs/STREAM.md). Live: yes (rules pushed",
        "through the API are kept when the file's rules are reloaded).",
        "",
        "```toml",
        _DEVICE_CONFIG_EXAMPLE.rstrip(),
        "```",
        "",
        "## [outputs.NAME]",
        "",
        "Outputs send what the collector records to a database (docs/OUTPUTS.md): one table per",
        "output, named by you, several of one type allowed. Not live: a restart applies them.",
        "",
        "| key | default | what it does |",
        "|---|---|---|",
    ]
    output_defaults = OutputConfig("NAME")
    for key, doc in OUTPUT_KEYS.items():
        default = _toml_value(getattr(output_defaults, key)).replace("|", "\\|")
        out.append(f"| `{key}` | `{default}` | {doc.replace('|', chr(92) + '|')} |")
    out += [
        "",
        "## [alarms.NAME]",
        "",
        "Threshold rules on readings (docs/ALARMS.md): one table per rule, named by you, at most",
        "256. Each rule needs `metric` and at least one of `above`, `below`, `no_data`. Not live:",
        "a restart applies them.",
        "",
        "| key | what it does |",
        "|---|---|",
    ]
    for key, doc in RULE_KEYS.items():
        out.append(f"| `{key}` | {doc.replace('|', chr(92) + '|')} |")
    out += [
        "",
        '## [metrics."GLOB"]',
        "",
        "What metrics mean, for dashboards: `unit` (at most 32 characters) and `description` for",
        "the metric names that match the glob (the first matching table wins; at most 1024).",
        "Dashboards show the unit on axes, tooltips and the device table; `GET /api/meta` and the",
        "stream's `hello` carry them. Not live.",
        "",
        "```toml",
        '[metrics."temp*"]',
        'unit = "°C"',
        'description = "air temperature"',
        "```",
        "",
        "## [device_commands.NAME]",
        "",
        "Commands the devices accept, declared for dashboards and the API (at most 256). The",
        "page offers a device the commands whose `devices` globs match it, with a field per",
        "argument; `POST /api/devices/{id}/commands` checks a declared command's arguments",
        "(`400 bad_command` says what is wrong). Names not declared can still be sent. Not live.",
        "",
        "| key | default | what it does |",
        "|---|---|---|",
        '| `devices` | `["*"]` | globs of the device ids that accept it |',
        '| `description` | `""` | a sentence for the page |',
        '| `args` | `{}` | argument name -> type: `"number"`, `"integer"`, `"string"` or `"boolean"`; no other argument is accepted |',
        "| `required` | `[]` | the arguments that must be given |",
        "",
        "```toml",
        "[device_commands.set_interval]",
        'devices = ["greenhouse-*"]',
        'description = "how often to report, in seconds"',
        'args = { seconds = "number" }',
        'required = ["seconds"]',
        "```",
        "",
    ]
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
