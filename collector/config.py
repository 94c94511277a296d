"""Collector configuration: defaults, TOML loading and validation.

A config file has sections matching the groups below; every key is optional. Unknown sections
or keys are an error, so a typo never silently falls back to a default. See
docs/CONFIGURATION.md (and `collector serve --help`) for the list.
"""

from __future__ import annotations

import fnmatch
import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from collector.wire.datagram import MAX_DATAGRAM, MIN_HELLO_LEN
from collector.wire.jsonio import JsonError, check_value

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


#: Largest configuration one push may carry, as JSON: it has to fit a control-channel line and
#: a COMMAND datagram to a UDP-only device.
MAX_CONFIG_BYTES = 1024


class ConfigPushError(Exception):
    """A configuration push that was refused (`code` and `message` go into the answer)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class DeviceConfigRule:
    """Configuration sent to every device whose id matches the glob `match`."""

    match: str
    config: Mapping[str, Any]

    def applies_to(self, device_id: str) -> bool:
        return fnmatch.fnmatchcase(device_id, self.match)


@attrs.frozen(kw_only=True)
class Config:
    # [server]
    host: str = "0.0.0.0"
    tcp_port: int = 8080
    udp_port: int = 8081
    http_port: int | None = 8082  # None: no HTTP server (dashboards, API, metrics)
    udp_rcvbuf: int = 8 * 1024 * 1024
    udp_coalesce: float = 0.001
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
    # [[device_config]]
    device_config: tuple[DeviceConfigRule, ...] = ()

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
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if not 0 <= self.udp_coalesce <= 0.1:
            problems.append("udp_coalesce must be between 0 and 0.1 second")
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
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("[tls] needs both cert and key")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("[tls] client_ca needs cert and key")
        if not self.tls_cert and (
            self.tls_plaintext_tcp_port >= 0 or self.tls_plaintext_http_port >= 0
        ):
            problems.append("[tls] plaintext ports only make sense with a certificate")
        if problems:
            raise ConfigError("; ".join(problems))
        if self.timeout < 2.5 * self.heartbeat_interval:
            log.warning(
                "timeout %.1fs is under 2.5 heartbeat intervals (%.1fs): one lost heartbeat "
                "may mark a device offline",
                self.timeout,
                2.5 * self.heartbeat_interval,
            )


# section -> {toml key: Config field}
_SECTIONS: dict[str, dict[str, str]] = {
    "server": {
        k: k for k in ("host", "tcp_port", "udp_port", "http_port", "udp_rcvbuf", "udp_coalesce")
    },
    "sessions": {
        k: k for k in ("heartbeat_interval", "timeout", "replay_window_blocks", "goodbye_linger")
    },
    "limits": {
        k: k
        for k in (
            "max_tcp_connections",
            "max_line",
            "registration_timeout",
            "max_datagram",
            "max_devices",
            "command_queue",
            "max_metrics_per_device",
            "max_config_rules",
            "send_timeout",
            "flapping_max",
            "flapping_window",
            "flapping_ban",
        )
    },
    "ratelimit": {
        "per_source": "ratelimit_per_source",
        "burst": "ratelimit_burst",
        "total": "ratelimit_total",
        "max_sources": "ratelimit_max_sources",
    },
    "commands": {
        "timeout": "command_timeout",
        "expiry": "command_expiry",
        "retransmit_initial": "command_retransmit_initial",
        "retransmit_max": "command_retransmit_max",
    },
    "tls": {
        "cert": "tls_cert",
        "key": "tls_key",
        "client_ca": "tls_client_ca",
        "plaintext_tcp_port": "tls_plaintext_tcp_port",
        "plaintext_http_port": "tls_plaintext_http_port",
    },
    "http": {
        "read_tokens": "read_tokens",
        "command_tokens": "command_tokens",
        "max_connections": "http_max_connections",
        "max_connections_per_client": "http_max_per_client",
        "header_timeout": "http_header_timeout",
        "body_timeout": "http_body_timeout",
        "send_timeout": "http_send_timeout",
        "idle_timeout": "http_idle_timeout",
        "max_body": "http_max_body",
    },
    "stream": {
        "history": "stream_history",
        "queue_limit": "stream_queue",
        "batch_limit": "stream_batch",
        "stall_limit": "stream_stall_limit",
        "ping_interval": "stream_ping_interval",
        "ping_timeout": "stream_ping_timeout",
        "heartbeat_interval": "stream_heartbeat",
        "min_interval": "stream_min_interval",
        "max_subscribers": "stream_max_subscribers",
        "max_message": "stream_max_message",
        "max_replies": "stream_max_replies",
        "handshake_timeout": "stream_handshake_timeout",
        "max_handshakes": "stream_max_handshakes",
    },
    "recording": {
        "dir": "record_dir",
        "flush_interval": "record_flush_interval",
        "buffer_mb": "record_buffer_mb",
        "segment_mb": "record_segment_mb",
        "segment_minutes": "record_segment_minutes",
        "retain_days": "record_retain_days",
        "retain_gb": "record_retain_gb",
        "compress": "record_compress",
        "raw": "record_raw",
        "fsync": "record_fsync",
    },
    "shutdown": {
        "grace": "shutdown_grace",
        "goodbye_timeout": "shutdown_goodbye_timeout",
        "close_timeout": "shutdown_close_timeout",
    },
    "logging": {"level": "log_level", "format": "log_format", "rate_limit": "log_rate_limit"},
}


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
