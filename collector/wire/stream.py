"""The dashboard stream protocol (sans-IO): client messages in, server messages out.

JSON text messages over a WebSocket, specified in docs/STREAM.md. This module parses and
validates what clients send, matches subscriptions against device and metric names, and builds
the server's messages as plain dicts. It knows nothing of sockets or tasks; `collector.core.hub`
does the fan-out.
"""

from __future__ import annotations

import fnmatch
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import attrs

from collector.wire.jsonio import JsonError, dumps, dumps_rows, loads_object

PROTOCOL_VERSION = 1
MAX_PATTERNS = 64
MAX_PING_ID = 64

#: close codes (1000-1011 are the RFC 6455 ones)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the collector is shutting down
CLOSE_UNSUPPORTED = 1003  # a binary message
CLOSE_TOO_BIG = 1009  # a message over the size limit (sent by trio-websocket)
CLOSE_INTERNAL_ERROR = 1011  # a bug in the collector while serving this dashboard
CLOSE_STALLED = 4002
CLOSE_PING_TIMEOUT = 4003

_LEN16 = struct.Struct(">BBH").pack
_LEN64 = struct.Struct(">BBQ").pack


def server_text_frame(payload: bytes) -> bytes:
    """One unfragmented WebSocket text frame from the server (RFC 6455 section 5.2): FIN and
    opcode 1, no mask (a server never masks), the payload length in 7, 16 or 64 bits.

    The hot path of the stream writes these itself; wsproto still does the handshake, control
    frames and everything the client sends."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _LEN16(0x81, 126, n) + payload
    return _LEN64(0x81, 127, n) + payload


# A reading on the stream: [device, metric, collector receive time (epoch s), value]
Row: TypeAlias = tuple[str, str, float, Any]


class StreamError(Exception):
    """A client message that cannot be used; `code` goes back in an error message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@attrs.frozen
class Subscription:
    devices: tuple[str, ...] = ("*",)
    metrics: tuple[str, ...] = ("*",)
    max_rate: float | None = None  # updates per second per series; None = every update
    history: int = 300  # points per series in the snapshot

    def describe(self) -> dict[str, Any]:
        return {
            "devices": list(self.devices),
            "metrics": list(self.metrics),
            "max_rate": self.max_rate,
            "history": self.history,
        }


@attrs.frozen
class Subscribe:
    subscription: Subscription


@attrs.frozen
class Ping:
    id: Any = None


ClientMessage: TypeAlias = Subscribe | Ping


def _patterns(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = d.get(key, ["*"])
    if (
        not isinstance(v, list)
        or not v
        or len(v) > MAX_PATTERNS
        or not all(isinstance(p, str) and 0 < len(p) <= 128 for p in v)
    ):
        raise StreamError(
            "bad_message", f"{key!r} must be a list of 1 to {MAX_PATTERNS} names or globs"
        )
    return tuple(v)


def parse_client_message(data: str | bytes, *, history_max: int) -> ClientMessage:
    """Parse one client message; raises StreamError with a code from docs/STREAM.md."""
    if isinstance(data, bytes):
        raise StreamError("bad_message", "binary messages are not supported: send JSON text")
    try:
        d = loads_object(data)
    except JsonError as exc:
        raise StreamError("bad_json", f"a message must be a JSON object: {exc.message}") from None
    mtype = d.get("type")
    if mtype == "subscribe":
        rate = d.get("max_rate")
        if rate is not None and (
            isinstance(rate, bool)
            or not isinstance(rate, int | float)
            or not math.isfinite(rate)
            or rate <= 0
        ):
            raise StreamError("bad_message", "'max_rate' must be a positive number or null")
        history = d.get("history", history_max)
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise StreamError("bad_message", "'history' must be a non-negative integer")
        return Subscribe(
            Subscription(
                _patterns(d, "devices"),
                _patterns(d, "metrics"),
                float(rate) if rate is not None else None,
                min(history, history_max),
            )
        )
    if mtype == "ping":
        pid = d.get("id")
        if not (
            pid is None
            or isinstance(pid, bool | int | float)
            or (isinstance(pid, str) and len(pid) <= MAX_PING_ID)
        ):
            raise StreamError(
                "bad_message",
                f"'id' must be null, a number, or a string of at most {MAX_PING_ID} characters",
            )
        return Ping(pid)
    if isinstance(mtype, str):
        raise StreamError("unknown_type", f"unknown message type {mtype!r}")
    raise StreamError("bad_message", "a message needs a string 'type'")


class Matcher:
    """Glob matching for one subscription, with the answers cached per name."""

    __slots__ = ("_devices", "_metrics", "all_devices", "all_metrics", "subscription")

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.all_devices = "*" in subscription.devices
        self.all_metrics = "*" in subscription.metrics
        self._devices = _compile(subscription.devices)
        self._metrics = _compile(subscription.metrics)

    @property
    def everything(self) -> bool:
        return self.all_devices and self.all_metrics

    def device(self, name: str) -> bool:
        return self.all_devices or self._devices(name)

    def metric(self, name: str) -> bool:
        return self.all_metrics or self._metrics(name)


def _compile(patterns: Sequence[str]) -> Any:
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    cache: dict[str, bool] = {}

    def match(name: str) -> bool:
        hit = cache.get(name)
        if hit is None:
            if len(cache) > 100_000:
                cache.clear()
            hit = cache[name] = regex.match(name) is not None
        return hit

    return match


# ---------------------------------------------------------------------------------------------
# Server messages (dicts; the hub adds the per-connection "seq" and encodes)


def encode(message: Mapping[str, Any]) -> str:
    return dumps(message)


def hello_message(
    *, version: str, time: float, heartbeat_interval: float, history_max: int, can_command: bool
) -> dict[str, Any]:
    return {
        "type": "hello",
        "server": "trio-collector",
        "version": version,
        "protocol": PROTOCOL_VERSION,
        "time": time,
        "heartbeat_interval": heartbeat_interval,
        "history_max": history_max,
        "can_command": can_command,
        "mode": "live",
    }


def encode_rows(rows: Iterable[Row]) -> str:
    """Rows as the inside of a JSON array: `["d","m",t,v],["d","m",t,v]`."""
    return dumps_rows(rows if isinstance(rows, list) else list(rows))[1:-1]


def readings_text(fragments: Iterable[str], seq: int) -> str:
    """A whole `readings` message from encoded rows (see encode_rows)."""
    return '{"type":"readings","readings":[' + ",".join(fragments) + '],"seq":' + str(seq) + "}"


def missed_message(count: int, total: int) -> dict[str, Any]:
    return {"type": "missed", "count": count, "total": total}


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}
