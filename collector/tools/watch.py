"""Watch a collector's devices live in the terminal, over its WebSocket stream.

    collector watch                                   # http://127.0.0.1:8082/
    collector watch http://collector.local:8082/ --token dashboard-token
    collector watch 127.0.0.1:18083 --devices 'greenhouse-*' --metrics temperature --max-rate 1

Keys: / filter the rows (a substring or a glob of the id; Enter or Escape leaves the input,
Escape with an empty filter clears it), o offline only, r reconnect now, q quit. It
reconnects by itself, with capped backoff, and resynchronises from the new snapshot. The
token can come from $COLLECTOR_TOKEN instead of --token. The stream is docs/STREAM.md.

Three layers, each testable alone: `StreamModel` (sans-IO: stream messages in, device rows and
a status out; no event loop, no clock of its own), `follow_stream` (the asyncio WebSocket
client that feeds it and reconnects) and `WatchApp` (the textual screen, which only renders).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import json
import math
import os
import random
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Input, Static
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from collector.tools import options

DEFAULT_URL = "http://127.0.0.1:8082/"
DEFAULT_PORT = 8082
PROTOCOL_VERSION = 1
TOKEN_ENV = "COLLECTOR_TOKEN"


# ---------------------------------------------------------------------------------------------
# The model (sans-IO)


@attrs.frozen
class Subscription:
    """What to ask the collector for; history is never needed here, so it asks for none."""

    devices: tuple[str, ...] = ("*",)
    metrics: tuple[str, ...] = ("*",)
    max_rate: float | None = None

    def message(self) -> dict[str, Any]:
        return {
            "type": "subscribe",
            "devices": list(self.devices),
            "metrics": list(self.metrics),
            "max_rate": self.max_rate,
            "history": 0,
        }


@attrs.define(eq=False)
class Device:
    """What the dashboard knows about one device."""

    id: str
    online: bool = False
    reason: str | None = None  # why the last session ended, while offline
    transport: str | None = None
    address: str | None = None
    since: float | None = None
    last_seen: float | None = None
    rate: float | None = None  # datagrams/s over the collector's last interval
    loss: float | None = None  # lifetime share of datagrams lost
    datagrams: int = 0
    lost: int = 0
    values: dict[str, tuple[float, Any]] = attrs.field(factory=dict)


@attrs.frozen
class Row:
    """One line of the table, formatted."""

    id: str
    online: bool
    state: str
    transport: str
    rate: str
    loss: str
    seen: str
    values: str


#: Link states: connecting -> connected -> reconnecting -> connecting ...; stopped is final.
CONNECTING, CONNECTED, RECONNECTING, STOPPED = "connecting", "connected", "reconnecting", "stopped"


@attrs.define
class Link:
    state: str = CONNECTING
    url: str = ""
    detail: str = ""  # why the last attempt failed (or why we stopped)
    closed: str | None = None  # how the last open connection ended: "closed 1001 (...)"
    closed_at: float | None = None
    retry_at: float | None = None
    attempts: int = 0  # connection attempts since the stream was last in sync
    connections: int = 0  # connections opened in all


class StreamModel:
    """The stream's state as a plain synchronous object: messages in, rows and status out.

    It never reads a clock: every method that needs the time takes `now` (local wall-clock
    seconds), so a test can replay a conversation byte for byte. The network layer tells it
    about the connection (`connecting`, `connected`, `disconnected`, `stopped`) and hands it
    every text message (`receive_text`); `connected` returns the message to send.
    """

    def __init__(self, subscription: Subscription | None = None) -> None:
        self.subscription = subscription or Subscription()
        self.devices: dict[str, Device] = {}
        self.link = Link()
        self.server: str | None = None
        self.mode = "live"  # or "replay": the collector plays a recording back
        self.heartbeat_interval = 1.0
        self.can_command = False
        self.clock_offset = 0.0  # collector's clock minus ours, measured at hello
        self.synced = False  # a complete snapshot has been applied on this connection
        self.seq = 0
        self.seq_gaps = 0
        self.newest_reading: float | None = None
        self.last_heartbeat: float | None = None  # our time when the last heartbeat came
        self.missed_here = 0  # updates the collector dropped for this connection (its "total")
        self.missed_before = 0  # ... and for the connections before it
        self.queued = 0
        self.messages = 0
        self.last_event: str | None = None  # the latest error or command state change
        self.last_event_at: float | None = None
        self._parts: list[list[Mapping[str, Any]]] = []  # a snapshot coming in parts
        self._parts_expected = 0
        self._held: list[Mapping[str, Any]] = []

    # -- the connection ----------------------------------------------------------------------

    def connecting(self, url: str, now: float) -> None:
        self.link.state = CONNECTING
        self.link.url = url
        self.link.retry_at = None
        self.link.attempts += 1

    def connected(self, now: float) -> str:
        """A new connection is open: start over on it; returns the `subscribe` to send."""
        self.link.state = CONNECTED
        self.link.detail = ""
        self.link.connections += 1
        self.synced = False
        self.seq = 0
        self.missed_before += self.missed_here
        self.missed_here = 0
        self.last_heartbeat = now
        self._parts, self._parts_expected, self._held = [], 0, []
        return json.dumps(self.subscription.message(), separators=(",", ":"))

    def disconnected(self, detail: str, retry_in: float, now: float) -> None:
        """The connection failed or ended (`detail` says how); retrying in `retry_in` s."""
        if self.link.state == CONNECTED:
            self.link.closed, self.link.closed_at = detail, now
        self.link.state = RECONNECTING
        self.link.detail = detail
        self.link.retry_at = now + retry_in
        self.synced = False

    def stopped(self, detail: str, now: float) -> None:
        self.link.state = STOPPED
        self.link.detail = detail
        self.link.retry_at = None
        self.synced = False

    # -- messages ------------------------------------------------------------------------------

    def receive_text(self, text: str | bytes, now: float) -> None:
        """One WebSocket message from the collector."""
        if isinstance(text, bytes):
            self._event("protocol: a binary message (the stream sends JSON text)", now)
            return
        try:
            message = json.loads(text)
        except ValueError:
            self._event("protocol: a message that is not JSON", now)
            return
        if not isinstance(message, dict):
            self._event("protocol: a message that is not a JSON object", now)
            return
        self.apply(message, now)

    def apply(self, m: Mapping[str, Any], now: float) -> None:
        """Apply one decoded server message. Unknown types are ignored (newer servers)."""
        self.messages += 1
        seq = m.get("seq")
        if isinstance(seq, int):
            if self.seq and seq != self.seq + 1:
                self.seq_gaps += 1
                self._event(f"protocol: seq jumped from {self.seq} to {seq}", now)
            self.seq = seq
        if m.get("type") in ("readings", "device", "stats", "command") and self._parts:
            self._held.append(m)  # a snapshot is half-way in: apply this after it
            return
        self._dispatch(m, now)

    def _dispatch(self, m: Mapping[str, Any], now: float) -> None:
        kind = m.get("type")
        try:
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is not None:
                handler(self, m, now)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            self._event(f"protocol: a bad {kind!r} message ({type(exc).__name__}: {exc})", now)

    def _hello(self, m: Mapping[str, Any], now: float) -> None:
        self.server = f"{m.get('server', '?')} {m.get('version', '?')}"
        self.heartbeat_interval = float(m.get("heartbeat_interval", 1.0))
        self.can_command = bool(m.get("can_command"))
        self.mode = str(m.get("mode", "live"))
        if isinstance(m.get("time"), int | float):
            self.clock_offset = float(m["time"]) - now
        if m.get("protocol") != PROTOCOL_VERSION:
            self._event(
                f"protocol: the collector speaks stream protocol {m.get('protocol')!r}, "
                f"this watch knows {PROTOCOL_VERSION}",
                now,
            )

    def _snapshot(self, m: Mapping[str, Any], now: float) -> None:
        part, parts = int(m["part"]), int(m["parts"])
        devices = list(m["devices"])
        if part == 1:
            self._parts, self._parts_expected = [], parts
        elif parts != self._parts_expected or part != len(self._parts) + 1:
            self._event(f"protocol: snapshot part {part} of {parts} out of order", now)
            return
        self._parts.append(devices)
        if part < parts:
            return
        fresh: dict[str, Device] = {}
        newest: float | None = None
        for chunk in self._parts:
            for d in chunk:
                dev = _device_from_json(d)
                fresh[dev.id] = dev
                for t, _ in dev.values.values():
                    newest = t if newest is None or t > newest else newest
        self.devices = fresh
        self.newest_reading = newest
        self.synced = True
        self.link.attempts = 0
        held, self._parts, self._parts_expected, self._held = self._held, [], 0, []
        for h in held:
            self._dispatch(h, now)

    def _readings(self, m: Mapping[str, Any], now: float) -> None:
        newest = self.newest_reading
        for device_id, metric, t, value in m["readings"]:
            dev = self.devices.get(device_id)
            if dev is None:  # not in the snapshot: it has just been added to the collector
                dev = self.devices[device_id] = Device(device_id, online=True)
            old = dev.values.get(metric)
            if old is None or t >= old[0]:
                dev.values[metric] = (t, value)
            if dev.last_seen is None or t > dev.last_seen:
                dev.last_seen = t
            if newest is None or t > newest:
                newest = t
        self.newest_reading = newest

    def _device(self, m: Mapping[str, Any], now: float) -> None:
        device_id = m["device"]
        dev = self.devices.get(device_id)
        if dev is None:
            dev = self.devices[device_id] = Device(device_id)
        dev.online = bool(m["online"])
        dev.since = m.get("time")
        if dev.online:
            dev.reason = None
            dev.transport = m.get("transport")
            dev.address = m.get("address")
        else:
            dev.reason = m.get("reason")
            dev.transport = None  # as in a snapshot: an offline device has no transport

    def _command(self, m: Mapping[str, Any], now: float) -> None:
        text = f"command {m.get('id')} {m.get('name')!s} on {m.get('device')}: {m.get('state')}"
        if m.get("error"):
            text += f" ({m['error']})"
        elif m.get("result") is not None:
            text += f" {_clip(json.dumps(m['result'], separators=(',', ':')), 32)}"
        self._event(text, now)

    def _stats(self, m: Mapping[str, Any], now: float) -> None:
        for device_id, s in m["devices"].items():
            dev = self.devices.get(device_id)
            if dev is None:
                dev = self.devices[device_id] = Device(device_id)
            _apply_stats(dev, s)

    def _heartbeat(self, m: Mapping[str, Any], now: float) -> None:
        self.last_heartbeat = now
        if self.mode != "live" and isinstance(m.get("time"), int | float):
            # A replay's clock may run at another speed than ours: follow it.
            self.clock_offset = float(m["time"]) - now
        self.missed_here = max(self.missed_here, int(m.get("missed", 0)))
        self.queued = int(m.get("queued", 0))

    def _missed(self, m: Mapping[str, Any], now: float) -> None:
        self.missed_here = max(self.missed_here, int(m["total"]))

    def _error(self, m: Mapping[str, Any], now: float) -> None:
        self._event(f"error {m.get('code')}: {m.get('message')}", now)

    _handlers: dict[str, Callable[[StreamModel, Mapping[str, Any], float], None]] = {
        "hello": _hello,
        "snapshot": _snapshot,
        "readings": _readings,
        "device": _device,
        "command": _command,
        "stats": _stats,
        "heartbeat": _heartbeat,
        "missed": _missed,
        "error": _error,
    }

    def _event(self, text: str, now: float) -> None:
        self.last_event = text
        self.last_event_at = now

    # -- what the screen shows -----------------------------------------------------------------

    def server_now(self, now: float) -> float:
        """Our time `now` on the collector's clock (as measured when it said hello)."""
        return now + self.clock_offset

    def rows(self, now: float, *, filter: str = "", offline_only: bool = False) -> list[Row]:
        """The table, sorted by device id, with the filter and "offline only" applied."""
        server_now = self.server_now(now)
        out = []
        for device_id in sorted(self.devices):
            dev = self.devices[device_id]
            if (offline_only and dev.online) or not matches(filter, device_id):
                continue
            out.append(
                Row(
                    id=device_id,
                    online=dev.online,
                    state=state_text(dev),
                    transport=dev.transport or "-",
                    rate="-" if dev.rate is None or not dev.online else f"{dev.rate:.1f}/s",
                    loss=format_loss(dev.loss),
                    seen="-" if dev.last_seen is None else format_age(server_now - dev.last_seen),
                    values=format_values(dev.values),
                )
            )
        return out

    @property
    def missed_total(self) -> int:
        """Updates the collector dropped for us (backpressure), over every connection."""
        return self.missed_before + self.missed_here

    @property
    def online_count(self) -> int:
        return sum(d.online for d in self.devices.values())

    def reading_lag(self, now: float) -> float | None:
        """Seconds between the newest reading's time and now, on the collector's clock."""
        if self.newest_reading is None:
            return None
        return max(0.0, self.server_now(now) - self.newest_reading)

    def heartbeat_age(self, now: float) -> float | None:
        if self.last_heartbeat is None or self.link.state != CONNECTED:
            return None
        return max(0.0, now - self.last_heartbeat)

    def heartbeat_late(self, now: float) -> bool:
        age = self.heartbeat_age(now)
        return age is not None and age > 3 * self.heartbeat_interval

    def link_text(self, now: float) -> str:
        link = self.link
        if link.state == CONNECTING:
            again = f" (attempt {link.attempts})" if link.attempts > 1 else ""
            return f"connecting to {link.url}{again}"
        if link.state == CONNECTED:
            if not self.synced:
                got = f" (part {len(self._parts)} of {self._parts_expected})" if self._parts else ""
                return f"connected to {link.url}, waiting for the snapshot{got}"
            mode = "" if self.mode == "live" else f", {self.mode}"
            return f"connected to {link.url}" + (f" ({self.server}{mode})" if self.server else "")
        if link.state == RECONNECTING:
            wait = max(0, math.ceil((link.retry_at or now) - now))
            text = f"reconnecting in {wait}s: {link.detail}"
            if link.closed is not None and link.closed != link.detail:
                ago = format_age(now - (link.closed_at or now))
                text += f" (before that: {link.closed}, {ago} ago)"
            return text
        return f"stopped: {link.detail}"

    def status_lines(self, now: float) -> tuple[str, str, str]:
        """The header: the connection; devices, lag and missed updates; the last event."""
        lag = self.reading_lag(now)
        hb = self.heartbeat_age(now)
        figures = [
            f"online {self.online_count}/{len(self.devices)}",
            "lag " + ("-" if lag is None else format_seconds(lag)),
            "heartbeat " + ("-" if hb is None else format_seconds(hb) + " ago"),
            f"missed {self.missed_total}",
        ]
        if self.queued:
            figures.append(f"queued {self.queued}")
        if self.last_event is None:
            event = "last event: none (errors and command state changes show here)"
        else:
            ago = format_age(now - (self.last_event_at or now))
            event = f"last event: {self.last_event} ({ago} ago)"
        return self.link_text(now), "  |  ".join(figures), event


def _device_from_json(d: Mapping[str, Any]) -> Device:
    dev = Device(
        id=str(d["id"]),
        online=bool(d.get("online")),
        reason=d.get("reason"),
        transport=d.get("transport"),
        address=d.get("address"),
        since=d.get("since"),
        last_seen=d.get("last_seen"),
        values={k: (float(tv[0]), tv[1]) for k, tv in (d.get("values") or {}).items()},
    )
    if d.get("stats"):
        _apply_stats(dev, d["stats"])
    return dev


def _apply_stats(dev: Device, s: Mapping[str, Any]) -> None:
    dev.rate = s.get("rate", dev.rate)
    dev.loss = s.get("loss", dev.loss)
    dev.datagrams = s.get("datagrams", dev.datagrams)
    dev.lost = s.get("lost", dev.lost)
    seen = s.get("last_seen")
    if seen is not None and (dev.last_seen is None or seen > dev.last_seen):
        dev.last_seen = seen


def state_text(dev: Device) -> str:
    if dev.online:
        return "online"
    if dev.reason:
        return f"offline ({dev.reason})"
    return "offline"  # not connected since the collector started


def matches(pattern: str, device_id: str) -> bool:
    """The row filter: a glob if it has glob characters, a substring otherwise; any case."""
    p = pattern.strip().lower()
    if not p:
        return True
    if any(c in p for c in "*?["):
        return fnmatch.fnmatchcase(device_id.lower(), p)
    return p in device_id.lower()


def format_age(seconds: float) -> str:
    """Seconds, then whole minutes, hours, days: three characters wide up to 99 days."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def format_seconds(seconds: float) -> str:
    """A lag: tenths below 10 s, then like an age."""
    return f"{seconds:.1f}s" if seconds < 10 else format_age(seconds)


def format_loss(loss: float | None) -> str:
    if loss is None:
        return "-"
    pct = loss * 100
    if pct == 0:
        return "0%"  # exactly none; a tiny loss shows as 0.0%
    return f"{pct:.1f}%" if pct < 9.95 else f"{pct:.0f}%"


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        # Three significant digits, never in exponent form between 0.001 and a million.
        a = abs(v)
        if a == 0:
            return "0.0"
        if not math.isfinite(v) or a >= 1e6 or a < 1e-3:
            return f"{v:.3g}"
        return f"{v:.{max(0, 2 - math.floor(math.log10(a)))}f}"
    if isinstance(v, str):
        return _clip(v if v and " " not in v and "=" not in v else json.dumps(v), 24)
    return _clip(json.dumps(v, separators=(",", ":")), 24)


def format_values(values: Mapping[str, tuple[float, Any]]) -> str:
    return " ".join(f"{k}={format_value(tv[1])}" for k, tv in values.items())


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _clip_values(text: str, n: int) -> str:
    """Clip "a=1 b=2 c=3" to n characters, dropping whole values where possible."""
    if len(text) <= n:
        return text
    cut = text[: n - 1]
    if " " in cut:
        cut = cut[: cut.rindex(" ") + 1]
    return cut + "…"


# ---------------------------------------------------------------------------------------------
# The network: an asyncio WebSocket client that feeds the model and reconnects


def stream_url(url: str) -> str:
    """http://h:p/, ws://h:p, h:p or h -> ws://h:p/stream (https -> wss; h alone -> port 8082)."""
    url = url.strip()
    bare = "://" not in url
    parts = urllib.parse.urlsplit("ws://" + url if bare else url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"{url!r}: use http://, https://, ws://, wss:// or HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    netloc = parts.netloc
    if bare and port is None:
        netloc += f":{DEFAULT_PORT}"  # a bare host means the collector's default port
    path = parts.path
    if not path.endswith("/stream"):
        path = path.rstrip("/") + "/stream"
    return urllib.parse.urlunsplit((scheme, netloc, path, parts.query, ""))


class Fatal(Exception):
    """The collector refused us in a way that retrying cannot fix (a bad token)."""


def _rejection(exc: InvalidStatus) -> tuple[bool, str]:
    """(fatal, text) for an HTTP answer that refused the WebSocket upgrade."""
    status = exc.response.status_code
    message = ""
    try:
        message = json.loads(exc.response.body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    if status == 401:
        return True, f"HTTP 401 unauthorized: {message or 'a token is needed'} (pass --token TOKEN)"
    if status == 403:
        return True, f"HTTP 403 forbidden: {message or 'this token may not read the stream'}"
    return False, f"HTTP {status}" + (f": {message}" if message else "")


def close_text(code: int | None, reason: str | None) -> str:
    if code is None or code == 1006:
        return "connection lost (no close frame)"
    return f"closed {code}" + (f" ({reason})" if reason else "")


async def follow_stream(
    model: StreamModel,
    url: str,
    *,
    token: str | None = None,
    on_update: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.time,
    backoff: tuple[float, float] = (0.5, 10.0),
    stall_after: float | None = None,
    open_timeout: float = 10.0,
    retry_now: asyncio.Event | None = None,
    ca: str | None = None,
) -> None:
    """Keep a connection to the stream at `url`, feeding `model`, until cancelled.

    Reconnects with exponential backoff (with jitter, capped at `backoff[1]`; back to
    `backoff[0]` once a snapshot has been applied). A connection that brings nothing for
    `stall_after` seconds (default: 5 heartbeats, at least 10 s) is dropped and reopened.
    Setting `retry_now` cuts a wait short. Raises Fatal when the collector refuses the token.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    extra: dict[str, Any] = {}
    if url.startswith("wss:"):
        import ssl

        extra["ssl"] = ssl.create_default_context(cafile=ca)
    delay = backoff[0]
    while True:
        model.connecting(url, clock())
        on_update()
        detail = "?"
        try:
            async with connect(
                url,
                additional_headers=headers,
                compression=None,
                open_timeout=open_timeout,
                max_size=2**24,
                close_timeout=2.0,
                user_agent_header="trio-collector-watch",
                **extra,
            ) as ws:
                await ws.send(model.connected(clock()))
                on_update()
                while True:
                    limit = stall_after or max(10.0, 5 * model.heartbeat_interval)
                    try:
                        async with asyncio.timeout(limit):
                            text = await ws.recv()
                    except TimeoutError:
                        detail = f"nothing received for {limit:g}s"
                        break
                    model.receive_text(text, clock())
                    if model.synced:
                        delay = backoff[0]
                    on_update()
        except InvalidStatus as exc:
            fatal, detail = _rejection(exc)
            if fatal:
                model.stopped(detail, clock())
                on_update()
                raise Fatal(detail) from None
        except InvalidURI as exc:
            model.stopped(str(exc), clock())
            on_update()
            raise Fatal(str(exc)) from None
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                detail = close_text(exc.rcvd.code, exc.rcvd.reason)
            elif exc.sent is not None:  # we closed it: a keepalive ping went unanswered
                detail = f"closed by this end: {exc.sent.code} ({exc.sent.reason})"
            else:
                detail = close_text(None, None)
        except (OSError, TimeoutError, InvalidHandshake, EOFError) as exc:
            detail = _os_error_text(exc)
        wait = min(delay * random.uniform(0.8, 1.2), backoff[1])  # jitter: not all at once
        model.disconnected(detail, wait, clock())
        on_update()
        retry_now = retry_now or asyncio.Event()
        retry_now.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await retry_now.wait()
        delay = min(delay * 2, backoff[1])


def _os_error_text(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out opening the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The screen (textual)

COLUMNS = [
    ("id", "device"),
    ("state", "state"),
    ("transport", "via"),
    ("rate", "rate"),
    ("loss", "loss"),
    ("seen", "seen"),
    ("values", "last values"),
]
CELL_PADDING = 1  # DataTable's, on each side of every cell


class FilterInput(Input):
    BINDINGS = [Binding("escape", "leave", "leave the filter", show=False)]

    def action_leave(self) -> None:
        self.app.leave_filter()  # type: ignore[attr-defined]


class WatchApp(App[None]):
    """The terminal dashboard. It renders `self.model` four times a second."""

    TITLE = "collector watch"
    CSS = """
    #status { height: auto; padding: 0 1; background: $panel; }
    #status.bad { background: $error 40%; }
    #devices { height: 1fr; }
    #devices.stale { opacity: 60%; }
    #filterbar { height: 1; display: none; background: $panel; }
    #filterbar.shown { display: block; }
    #filterbar Static { width: auto; padding: 0 1; }
    #filter { width: 1fr; height: 1; border: none; padding: 0; }
    """
    BINDINGS = [
        Binding("slash", "start_filter", "filter"),
        Binding("o", "toggle_offline", "offline only"),
        Binding("escape", "clear_filter", "show all", show=False),
        Binding("r", "retry_now", "reconnect now", show=False),
        Binding("q", "quit", "quit"),
    ]

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        subscription: Subscription | None = None,
        clock: Callable[[], float] = time.time,
        follow: Callable[..., Any] = follow_stream,
        backoff: tuple[float, float] = (0.5, 10.0),
        ca: str | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.ca = ca
        self.token = token
        self.clock = clock
        self.model = StreamModel(subscription)
        self.model.link.url = url
        self.follow = follow
        self.backoff = backoff
        self.filter = ""
        self.offline_only = False
        self.editing = False  # the filter input has the keyboard
        self.status_text = ""  # the header as last rendered
        self.retry_now = asyncio.Event()
        self.fatal: str | None = None  # why the stream stopped for good (a refused token)
        self.shown: list[str] = []  # the device ids in the table, in order
        self._cells: dict[str, list[Text]] = {}
        self._column_widths: tuple[int, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield DataTable(id="devices", cursor_type="none", cell_padding=CELL_PADDING)
        with Horizontal(id="filterbar"):
            yield Static("filter", id="filterlabel")
            yield FilterInput(placeholder="a substring or a glob of the device id", id="filter")
            yield Static(id="shown")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.render_model()
        self.set_interval(0.25, self.render_model)
        self.run_worker(self._follow(), name="stream", exclusive=True)

    async def _follow(self) -> None:
        try:
            await self.follow(
                self.model,
                self.url,
                token=self.token,
                clock=self.clock,
                backoff=self.backoff,
                retry_now=self.retry_now,
                **({"ca": self.ca} if self.ca else {}),
            )
        except Fatal as exc:
            self.fatal = str(exc)
            self.exit(return_code=1)

    # -- keys --------------------------------------------------------------------------------

    def action_start_filter(self) -> None:
        self.editing = True
        self.query_one("#filterbar").add_class("shown")
        self.query_one(FilterInput).focus()

    def action_retry_now(self) -> None:
        self.retry_now.set()

    def action_toggle_offline(self) -> None:
        self.offline_only = not self.offline_only
        self.render_model()

    def action_clear_filter(self) -> None:
        """Escape outside the input: show every device again."""
        self.offline_only = False
        self.query_one(FilterInput).value = ""
        self.filter = ""
        self.leave_filter()

    def leave_filter(self) -> None:
        self.editing = False
        box = self.query_one(FilterInput)
        if not box.value.strip():
            box.value = ""
            self.filter = ""
        self.query_one(DataTable).focus()
        self.render_model()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter = event.value
        self.render_model()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.leave_filter()

    # -- rendering -----------------------------------------------------------------------------

    def render_model(self) -> None:
        now = self.clock()
        model = self.model
        rows = model.rows(now, filter=self.filter, offline_only=self.offline_only)

        status = self.query_one("#status", Static)
        lines = list(model.status_lines(now))
        if model.link.state == RECONNECTING:
            lines[0] += "  [r: now]"
        width = max(20, self.size.width - 2)
        self.status_text = "\n".join(_clip(line, width) for line in lines)
        status.update(Text(self.status_text))
        status.set_class(model.link.state != CONNECTED or model.heartbeat_late(now), "bad")

        filtering = bool(self.filter.strip()) or self.offline_only
        bar = self.query_one("#filterbar")
        bar.set_class(filtering or self.editing, "shown")
        shown = f"{len(rows)} of {len(model.devices)} shown"
        self.query_one("#shown", Static).update(
            shown + (", offline only (o)" if self.offline_only else "")
        )

        table = self.query_one(DataTable)
        table.set_class(not model.synced, "stale")
        widths = self._widths(rows)
        cells = {r.id: _cells(r, widths[-1]) for r in rows}
        ids = [r.id for r in rows]
        if ids != self.shown or widths != self._column_widths:
            # Fixed column widths, computed here: DataTable's automatic ones only ever grow.
            scrolled = table.scroll_y
            table.clear(columns=True)
            for (key, label), width in zip(COLUMNS, widths, strict=True):
                table.add_column(label, key=key, width=width)
            for row_id in ids:
                table.add_row(*cells[row_id], key=row_id)
            self.shown, self._column_widths = ids, widths
            if scrolled:
                self.call_after_refresh(table.scroll_to, y=scrolled, animate=False)
        else:
            for row_id, new in cells.items():
                old = self._cells[row_id]
                for (key, _), a, b in zip(COLUMNS, new, old, strict=True):
                    if a.plain != b.plain or a.style != b.style:
                        table.update_cell(row_id, key, a)
        self._cells = cells

    def _widths(self, rows: list[Row]) -> tuple[int, ...]:
        """Each column as wide as its widest cell; the last one gets what is left of the
        screen, so that the table never scrolls sideways."""
        widths = [
            max([len(label), *(len(_texts(r)[i]) for r in rows)])
            for i, (_, label) in enumerate(COLUMNS[:-1])
        ]
        used = sum(widths) + 2 * CELL_PADDING * len(COLUMNS)
        table = self.query_one(DataTable)
        if len(rows) > table.size.height - 1:  # 1: the header
            used += table.styles.scrollbar_size_vertical
        return (*widths, max(20, self.size.width - used))


def _texts(row: Row) -> tuple[str, ...]:
    return (row.id, row.state, row.transport, row.rate, row.loss, row.seen, row.values)


def _cells(row: Row, values_width: int) -> list[Text]:
    values = _clip_values(row.values, values_width)
    if row.online:
        return [
            Text(row.id, style="bold"),
            Text(row.state, style="green"),
            Text(row.transport),
            Text(row.rate, justify="right"),
            Text(row.loss, justify="right"),
            Text(row.seen, justify="right"),
            Text(values),
        ]
    return [
        Text(row.id, style="bold red"),
        Text(row.state, style="bold red"),
        Text(row.transport, style="dim"),
        Text(row.rate, style="dim", justify="right"),
        Text(row.loss, style="dim", justify="right"),
        Text(row.seen, style="red", justify="right"),
        Text(values, style="dim"),
    ]


# ---------------------------------------------------------------------------------------------
# The command


def build_parser(prog: str = "collector watch") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "url",
        nargs="?",
        default=DEFAULT_URL,
        metavar="URL",
        help=f"the collector's dashboard URL, ws:// URL or HOST:PORT (default {DEFAULT_URL})",
    )
    p.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"a read token ([http] read_tokens); default ${TOKEN_ENV}",
    )
    p.add_argument(
        "--ca",
        metavar="FILE",
        help="verify an https:// (wss://) collector's certificate with this CA bundle",
    )
    p.add_argument(
        "--device",
        action="append",
        metavar="GLOB",
        help="devices to watch (repeatable; default all)",
    )
    p.add_argument(
        "--metric",
        action="append",
        metavar="GLOB",
        help="metrics to show (repeatable; default all)",
    )
    p.add_argument(
        "--max-rate",
        type=options.positive,
        metavar="N",
        help="at most N updates per second per series (default: every update)",
    )
    return p


def main(argv: Iterable[str] | None = None, prog: str = "collector watch") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        url = stream_url(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        # A full-screen dashboard in a pipe would spin writing escape codes nobody sees.
        print(
            f"{prog}: needs a terminal (standard input and output are not one); to record the "
            "stream instead, use: collector record-stream URL --out DIR",
            file=sys.stderr,
        )
        return options.EXIT_ENVIRONMENT
    app = WatchApp(
        url,
        token=args.token or None,
        subscription=Subscription(
            tuple(args.device or ["*"]), tuple(args.metric or ["*"]), args.max_rate
        ),
        ca=args.ca,
    )
    app.run()
    if app.fatal is not None:
        print(f"{prog}: {url}: {app.fatal}", file=sys.stderr)
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
