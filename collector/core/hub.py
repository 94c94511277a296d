"""The stream hub: keeps what dashboards need (last values, short histories) and fans updates
out to subscribers without ever making ingest wait.

Ingest calls `on_telemetry` / `on_event` synchronously. For each subscriber the hub appends to
a bounded queue and sets its wake-up event; nothing here awaits. Each subscriber has its own
sender task that drains everything queued as few messages as possible (one `readings` message
per wake-up, however many readings), so batches grow with load and latency stays minimal at low
load. While a subscriber's sender is idle and its socket has room, one task of the hub writes
its messages for it instead (`_write_or_wake`): one task switch for all dashboards rather than
one each, and the sender wakes only for what must wait (a full socket, a new subscription, a
close).

When a subscriber's queue is full it coalesces: from then on only the latest reading per series
is kept, and every reading replaced that way is counted and reported to the client in a
`missed` message. Too many queued events (online/offline/commands) make it resynchronise from a
fresh snapshot instead. A subscriber whose send makes no progress for `stall_limit` seconds, or
that does not answer a ping in time, is closed with a code and a reason.
"""

from __future__ import annotations

import array
import collections
import functools
import itertools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio
import trio_websocket

from collector._version import __version__
from collector.core.commands import command_json
from collector.core.events import CommandUpdate, DeviceOffline, DeviceOnline, Event, Telemetry
from collector.core.load import BusyMeter
from collector.logs import RateLimitedLog
from collector.wire import stream
from collector.wire.stream import Matcher, Row, StreamError, Subscription

if TYPE_CHECKING:
    from collector.config import Config
    from collector.core.boundary import ErrorBoundary
    from collector.core.commands import CommandManager
    from collector.core.sessions import DeviceState, SessionRegistry
    from collector.devices import DeviceRegistry

log = logging.getLogger("collector.stream")

EVENT_LIMIT = 1000  # queued events per subscriber before it resynchronises from a snapshot
#: At most this many history points in one snapshot in all: with many devices, each series
#: gets fewer points (the page draws at once, and a snapshot stays a few megabytes).
SNAPSHOT_POINTS = 200_000
RATE_WINDOW = 5.0  # seconds over which a device's datagram rate is measured
SNAPSHOT_DEVICES_PER_MESSAGE = 50
RECENT_COMMANDS = 10


class DirectWriter(Protocol):
    """Sends a dashboard's text messages (collector.servers.http.StreamWriter)."""

    async def send_text(self, text: str) -> None:
        """Send one message, waiting as long as the socket needs."""

    @property
    def can_offer(self) -> bool:
        """`offer` can write at all (not on TLS, where every write goes through the TLS
        layer's task)."""

    def offer(self, text: str) -> bool:
        """Write one message now if the socket takes it; False if not a byte of it was
        written. Part of a frame the socket did not take is kept, and written before
        anything else (`flush`)."""

    @property
    def pending(self) -> bool:
        """Part of a frame `offer` began is still to be written."""

    async def flush(self) -> None:
        """Write what is left of a frame `offer` began."""


@attrs.frozen(kw_only=True)
class StreamConfig:
    history: int = 300
    queue_limit: int = 5000  # readings queued per subscriber before coalescing
    batch_limit: int = 2000  # readings per `readings` message
    stall_limit: float = 10.0
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    min_interval: float = 0.002  # seconds between two rounds while busy (0: group commit always)
    max_subscribers: int = 100
    max_message: int = 65536  # largest message a client may send
    max_replies: int = 32  # pongs and errors queued for a subscriber before more are dropped
    max_metrics: int = 256  # metric names kept per device; readings of further names are refused


class RowBatch(list):  # type: ignore[type-arg]
    """The rows of one ingest batch, shared by every subscriber that takes all of them, with
    their JSON encoded at most once however many dashboards receive them."""

    __slots__ = ("_json",)

    def json_fragment(self) -> str:
        try:
            return self._json
        except AttributeError:
            self._json: str = stream.encode_rows(self)
            return self._json


class ReadingsText:
    """A `readings` message whose readings are already JSON (the sender adds only the seq)."""

    __slots__ = ("fragments",)

    def __init__(self, fragments: list[str]) -> None:
        self.fragments = fragments


class StatsText:
    """A `stats` message encoded once for every subscriber that takes all devices."""

    __slots__ = ("devices_json",)

    def __init__(self, devices_json: str) -> None:
        self.devices_json = devices_json


class SeriesRing:
    """The last `maxlen` (time, value) points of one numeric series, in two flat arrays.

    Appending is two C-level array appends; the arrays are cut back to `maxlen` only when they
    reach twice that, so the cost per point stays constant and small (the hub appends one
    point per reading on the ingest path).
    """

    __slots__ = ("maxlen", "t", "v")

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.t = array.array("d")
        self.v = array.array("d")

    def append(self, t: float, v: float) -> None:
        self.t.append(t)
        self.v.append(v)
        if len(self.t) >= 2 * self.maxlen:
            self.trim()

    def trim(self) -> None:
        del self.t[: -self.maxlen]
        del self.v[: -self.maxlen]

    def last(self, n: int) -> tuple[list[float], list[float]]:
        n = min(n, self.maxlen)
        return (self.t[-n:].tolist(), self.v[-n:].tolist()) if n else ([], [])


@attrs.define(eq=False)
class DeviceView:
    values: dict[str, Row] = attrs.field(factory=dict)  # metric -> its latest row
    history: dict[str, SeriesRing] = attrs.field(factory=dict)


@attrs.define(eq=False)
class Subscriber:
    id: int
    remote: str
    queue_limit: int
    batch_limit: int
    connected_at: float
    matcher: Matcher | None = None
    items: collections.deque[tuple[str, Any]] = attrs.field(factory=collections.deque)
    queued_rows: int = 0
    queued_events: int = 0
    coalesced: dict[tuple[str, str], Row] | None = None
    resync: bool = False
    missed_pending: int = 0
    missed_total: int = 0
    pending_stats: dict[str, Any] = attrs.field(factory=dict)
    pending_stats_text: StatsText | None = None  # the shared encoding, if nothing else is pending
    pending_heartbeat: dict[str, Any] | None = None
    last_sent: dict[tuple[str, str], float] = attrs.field(factory=dict)
    deferred: dict[tuple[str, str], Row] = attrs.field(factory=dict)
    thinned: int = 0
    seq: int = 0
    messages_sent: int = 0
    messages_received: int = 0  # from the client
    unsent: int = 0  # taken from the queue for the send in progress, not sent yet
    readings_sent: int = 0
    bytes_sent: int = 0
    errors: int = 0
    wake: trio.Event = attrs.field(factory=trio.Event)
    closing: tuple[int, str, str] | None = None  # (code, kind, reason): close once drained
    send_started: float | None = None  # trio time the send in progress began
    #: called instead of setting `wake` at once: the hub wakes senders in rounds (see _flusher)
    notify: Callable[[Subscriber], None] | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    close_code: int | None = None
    close_reason: str | None = None
    max_replies: int = 32
    queued_replies: int = 0
    replies_dropped: int = 0
    #: a subscribe not acted on yet: the sender builds its snapshot when it next runs, so a
    #: client that sends subscribe after subscribe without reading costs one snapshot, not many
    pending_subscription: Subscription | None = None
    #: writes frames without waiting, so the hub can send for an idle sender (None: none can,
    #: as on TLS, and the sender task sends everything)
    writer: DirectWriter | None = None
    parked: bool = False  # the sender task waits for `wake` with nothing in hand
    #: messages the hub took for the sender but could not write: it sends them first (after
    #: the rest of a frame the socket took only in part, which the writer keeps)
    backlog: list[dict[str, Any] | ReadingsText | StatsText] | None = None

    @property
    def queued(self) -> int:
        return self.queued_rows + (len(self.coalesced) if self.coalesced else 0)

    def _wake(self) -> None:
        if not self.wake.is_set():
            if self.notify is None:
                self.wake.set()
            else:
                self.notify(self)

    def offer_rows(self, rows: list[Row]) -> None:
        m = self.matcher
        if m is None or self.resync:
            return
        if not m.everything:
            rows = [r for r in rows if m.device(r[0]) and m.metric(r[1])]
            if not rows:
                return
        c = self.coalesced
        if c is None:
            if self.queued_rows + len(rows) <= self.queue_limit:
                self.items.append(("r", rows))
                self.queued_rows += len(rows)
                self._wake()
                return
            # Full: from now on keep only the latest value per series, and count the rest.
            c = self.coalesced = {}
            kept: collections.deque[tuple[str, Any]] = collections.deque()
            for kind, body in self.items:
                if kind == "r":
                    for r in body:
                        self._coalesce(c, r)
                else:
                    kept.append((kind, body))
            self.items = kept
            self.queued_rows = 0
        for r in rows:
            self._coalesce(c, r)
        self._wake()

    def _coalesce(self, c: dict[tuple[str, str], Row], r: Row) -> None:
        key = (r[0], r[1])
        if key in c:
            self.missed_pending += 1
            self.missed_total += 1
        c[key] = r

    def offer_reply(self, message: dict[str, Any]) -> bool:
        """Queue an answer to the client (a pong, an error). A client that sends faster than it
        reads gets at most `max_replies` of them queued; the rest are counted and dropped."""
        if self.queued_replies >= self.max_replies:
            self.replies_dropped += 1
            return False
        self.queued_replies += 1
        self.items.append(("m", message))
        self.queued_events += 1
        self._wake()
        return True

    def offer_message(self, message: dict[str, Any], device_id: str | None = None) -> None:
        m = self.matcher
        if device_id is not None and (m is None or not m.device(device_id)):
            return
        if self.resync:
            return
        if self.queued_events >= EVENT_LIMIT:
            # Too far behind to replay event by event: start over from a snapshot.
            dropped = self.queued_events + self.queued_rows + (len(self.coalesced or ()))
            self.missed_pending += dropped
            self.missed_total += dropped
            self.items.clear()
            self.queued_rows = self.queued_events = self.queued_replies = 0
            self.coalesced = None
            self.resync = True
            self._wake()
            return
        self.items.append(("m", message))
        self.queued_events += 1
        self._wake()

    def offer_stats(self, stats: dict[str, Any], shared: StatsText | None = None) -> None:
        m = self.matcher
        if m is None:
            return
        if (
            shared is not None
            and m.all_devices
            and not self.pending_stats
            and self.pending_stats_text is None
        ):
            self.pending_stats_text = shared  # the usual case: encoded once for everybody
            self._wake()
            return
        if self.pending_stats_text is not None:  # a tick not sent yet: merge into a dict
            self.pending_stats.update(json.loads(self.pending_stats_text.devices_json))
            self.pending_stats_text = None
        for device_id, s in stats.items():
            if m.device(device_id):
                self.pending_stats[device_id] = s
        if self.pending_stats:
            self._wake()

    def offer_heartbeat(self, message: dict[str, Any]) -> None:
        self.pending_heartbeat = message
        self._wake()

    # -- draining (called by the sender task) -------------------------------------------------

    def next_due(self) -> float:
        if not self.deferred or self.matcher is None:
            return math.inf
        rate = self.matcher.subscription.max_rate
        assert rate is not None
        return min(self.last_sent[k] for k in self.deferred) + 1.0 / rate

    def take(self, now: float) -> Iterator[dict[str, Any] | ReadingsText]:
        """Everything queued, as messages in order. The queue is empty afterwards."""
        if self.missed_pending:
            yield stream.missed_message(self.missed_pending, self.missed_total)
            self.missed_pending = 0
        items, self.items = self.items, collections.deque()
        self.queued_rows = self.queued_events = self.queued_replies = 0
        coalesced, self.coalesced = self.coalesced, None
        batches: list[list[Row]] = []
        for kind, body in items:
            if kind == "r":
                batches.append(body)
                continue
            yield from self._readings(batches, now)
            batches = []
            yield body
        if coalesced:
            batches.append(list(coalesced.values()))
        yield from self._readings(batches, now)
        if self.pending_stats_text is not None:
            yield self.pending_stats_text
            self.pending_stats_text = None
        if self.pending_stats:
            yield {"type": "stats", "devices": self.pending_stats}
            self.pending_stats = {}
        if self.pending_heartbeat is not None:
            hb = self.pending_heartbeat
            self.pending_heartbeat = None
            yield {**hb, "missed": self.missed_total, "queued": self.queued}

    def _readings(self, batches: list[list[Row]], now: float) -> Iterator[ReadingsText]:
        """One message for everything (up to batch_limit readings each), from JSON fragments:
        a batch every subscriber takes whole is encoded once for all of them."""
        if not batches and not self.deferred:
            return
        rate = self.matcher.subscription.max_rate if self.matcher else None
        if rate is not None:
            rows = self._thin([r for b in batches for r in b], now, 1.0 / rate)
            batches = [rows] if rows else []
        limit = self.batch_limit
        fragments: list[str] = []
        count = 0
        for batch in batches:
            if len(batch) > limit:  # only when one ingest batch alone exceeds the limit
                chunks: list[list[Row]] = [
                    batch[i : i + limit] for i in range(0, len(batch), limit)
                ]
            else:
                chunks = [batch]
            for chunk in chunks:
                if count and count + len(chunk) > limit:
                    self.readings_sent += count
                    yield ReadingsText(fragments)
                    fragments, count = [], 0
                fragments.append(
                    chunk.json_fragment()
                    if isinstance(chunk, RowBatch)
                    else stream.encode_rows(chunk)
                )
                count += len(chunk)
        if count:
            self.readings_sent += count
            yield ReadingsText(fragments)

    def _thin(self, rows: list[Row], now: float, interval: float) -> list[Row]:
        """At most one update per series per interval: the latest one, when it is due."""
        last_sent, deferred = self.last_sent, self.deferred
        for r in rows:
            key = (r[0], r[1])
            if key in deferred:
                self.thinned += 1
            deferred[key] = r
        out = []
        for key in list(deferred):
            if now - last_sent.get(key, -math.inf) >= interval:
                out.append(deferred.pop(key))
                last_sent[key] = now
        return out


class _Closed(Exception):
    """Why a subscriber is closed: a close code (None when the client closed or vanished), a
    short `kind` for the counters, and the reason text sent with the close frame."""

    def __init__(self, code: int | None, kind: str, reason: str | None = None) -> None:
        super().__init__(reason or kind)
        self.code = code
        self.kind = kind
        self.reason = reason or kind


class HubHost(Protocol):
    """What the hub reads of the collector (`collector.app.Collector` is one; so is the
    stand-in collector of `collector replay serve`)."""

    boundary: ErrorBoundary
    commands: CommandManager
    config: Config
    devices: DeviceRegistry
    playback: Any
    registry: SessionRegistry
    cluster: Any  # a collector.cluster.bus.ClusterBus, or None
    alarms: Any  # a collector.core.alarms.AlarmEngine, or None


class StreamHub:
    def __init__(
        self,
        app: HubHost,
        config: StreamConfig,
        *,
        wall: Callable[[], float],
        load: BusyMeter | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.wall = wall
        self.load = load if load is not None else BusyMeter()
        self.views: dict[str, DeviceView] = {}
        self.subscribers: set[Subscriber] = set()
        self.stream_seq = 0
        self.readings_in = 0
        self.connections = 0
        self.closed_by_reason: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.missed_closed = 0  # missed updates of subscribers that are gone
        self.metrics_refused = 0  # readings of metric names beyond a device's limit
        self.replies_dropped_closed = 0
        self.messages_sent_closed = 0
        self.readings_sent_closed = 0
        self.rlog = RateLimitedLog(log, app.config.log_rate_limit)
        self._ids = itertools.count(1)
        # per device: (wall time, datagrams) at the last ticks, for a rate over RATE_WINDOW
        self._samples: dict[str, collections.deque[tuple[float, int]]] = {}
        self._due: set[Subscriber] = set()  # subscribers with something new, to wake next round
        self._direct: dict[Subscriber, None] = {}  # with something new, to write for at once
        self.messages_direct = 0  # of messages_sent, those the hub wrote for an idle sender
        self._direct_wake = trio.Event()
        self._round = trio.Event()
        self._last_round = -math.inf
        self._rates: dict[str, float] = {}

    # -- listener: called synchronously from ingest ----------------------------------------------

    def on_telemetry(self, batch: Sequence[Telemetry]) -> None:
        rows: RowBatch = RowBatch()
        add_row = rows.append
        views = self.views
        hist = self.config.history
        max_metrics = self.config.max_metrics
        for time, device_id, _seq, _dt, readings, _payload in batch:
            if not readings:
                continue
            view = views.get(device_id)
            if view is None:
                view = views[device_id] = DeviceView()
            values = view.values
            history = view.history
            for name, value in readings:
                if len(values) >= max_metrics and name not in values:
                    self._refuse_metric(device_id, name)
                    continue
                row = (device_id, name, time, value)
                add_row(row)
                values[name] = row
                if hist and value.__class__ is not str:
                    ring = history.get(name)
                    if ring is None:
                        ring = history[name] = SeriesRing(hist)
                    ring.t.append(time)
                    ring.v.append(value)
                    if len(ring.t) >= 2 * hist:
                        ring.trim()
        if not rows:
            return
        self.stream_seq += len(rows)
        self.readings_in += len(rows)
        for sub in self.subscribers:
            sub.offer_rows(rows)

    def _refuse_metric(self, device_id: str, name: str) -> None:
        self.metrics_refused += 1
        state = self.app.registry.devices.get(device_id)
        if state is not None:
            state.metrics_refused += 1
        self.rlog.warning(
            "metrics_refused",
            trio.current_time(),
            "device %s: reading %r refused: it already has %d metrics ([limits] max_metrics_per_device)",
            device_id,
            name,
            self.config.max_metrics,
        )

    def on_event(self, event: Event) -> None:
        cluster = self.app.cluster
        if cluster is not None and isinstance(event, DeviceOffline) and event.reason != "node_lost":
            if not cluster.shows(event):
                return  # the device has a newer session, on this node or another one
        self.stream_seq += 1
        if isinstance(event, DeviceOnline | DeviceOffline):
            message = device_event_message(event)
        elif isinstance(event, CommandUpdate):
            message = command_message(event)
        else:  # pragma: no cover
            return
        for sub in self.subscribers:
            sub.offer_message(message, event.device_id)

    def on_alarm(self, change: Any) -> None:
        """An alarm raised, cleared, acknowledged or removed (collector.core.alarms)."""
        self.stream_seq += 1
        message = {"type": "alarm", "change": change.change, "alarm": change.alarm}
        for sub in self.subscribers:
            sub.offer_message(message, change.alarm["device"])

    # -- views for snapshots and the API -------------------------------------------------------

    def device_stats(self, device_id: str) -> dict[str, Any]:
        return _stats_of(self.app.registry.devices.get(device_id), self._rates.get(device_id, 0.0))

    def device_summary(self, device_id: str, *, history: int = 0) -> dict[str, Any]:
        state = self.app.registry.devices.get(device_id)
        view = self.views.get(device_id)
        out: dict[str, Any] = {"id": device_id}
        cluster = self.app.cluster
        remote = cluster.remote_summary(device_id) if cluster is not None else None
        if remote is not None:  # its current (or last) session is on another node
            stats = remote.pop("stats") or _stats_of(None, 0.0)
            out.update(remote)
            out["stats"] = stats
        elif state is None:  # in the credentials file, never connected: the same fields, empty
            out.update(
                online=False,
                reason=None,
                transport=None,
                address=None,
                since=None,
                last_seen=None,
                session_id=None,
                sessions=0,
            )
            out["stats"] = _stats_of(None, 0.0)
        else:
            session = state.session
            out.update(
                online=session is not None,
                reason=None if session is not None else state.offline_reason,
                transport=session.transport if session is not None else None,
                address=state.address,
                since=state.online_since if session is not None else state.offline_since,
                last_seen=state.last_seen,
                session_id=session.session_id if session is not None else None,
                sessions=state.sessions,
            )
            out["stats"] = _stats_of(state, self._rates.get(device_id, 0.0))
        if cluster is not None and remote is None:
            out["node"] = cluster.node
        out["values"] = {k: [row[2], row[3]] for k, row in (view.values.items() if view else ())}
        if history:  # asked for: always there, empty for a device with no numeric series yet
            out["history"] = (
                {k: list(ring.last(history)) for k, ring in view.history.items()} if view else {}
            )
        cmds = [c for c in self.app.commands.commands.values() if c.device_id == device_id]
        out["commands"] = [command_json(c) for c in cmds[-RECENT_COMMANDS:]]
        return out

    def known_devices(self) -> list[str]:
        ids = dict.fromkeys(self.app.devices)
        ids.update(dict.fromkeys(self.app.registry.devices))
        if self.app.cluster is not None:
            ids.update(dict.fromkeys(self.app.cluster.device_ids()))
        return sorted(ids)

    def snapshot_messages(self, sub: Subscriber) -> list[dict[str, Any]]:
        assert sub.matcher is not None
        m = sub.matcher
        subscription = m.subscription
        matched = [d for d in self.known_devices() if m.device(d)]
        series = sum(
            sum(1 for name in view.history if m.metric(name))
            for d in matched
            if (view := self.views.get(d)) is not None
        )
        history = min(subscription.history, SNAPSHOT_POINTS // max(1, series))
        devices = []
        for device_id in matched:
            d = self.device_summary(device_id, history=history)
            if not m.all_metrics:
                d["values"] = {k: v for k, v in d["values"].items() if m.metric(k)}
                if "history" in d:
                    d["history"] = {k: v for k, v in d["history"].items() if m.metric(k)}
            devices.append(d)
        parts = max(1, math.ceil(len(devices) / SNAPSHOT_DEVICES_PER_MESSAGE))
        base = {
            "type": "snapshot",
            "subscription": subscription.describe(),
            "time": self.wall(),
            "stream_seq": self.stream_seq,
            "parts": parts,
        }
        return [
            {
                **base,
                "part": i + 1,
                "devices": devices[
                    i * SNAPSHOT_DEVICES_PER_MESSAGE : (i + 1) * SNAPSHOT_DEVICES_PER_MESSAGE
                ],
            }
            for i in range(parts)
        ]

    # -- periodic: heartbeats and per-device statistics ------------------------------------------

    def _notify(self, sub: Subscriber) -> None:
        if not self.config.min_interval or not self.load.busy(trio.current_time()):
            # Group commit: wake the sender now. Whatever arrives while it waits for its turn
            # or while its send is in flight goes out together in its next message, so an
            # idle stream sends at once. Only while the collector is busy (the measure the UDP
            # loop batches by) do updates wait for the next round: with cheap sends nothing is
            # in flight for long, so group commit alone would send a message per wake-up.
            if sub.parked and sub.writer is not None:  # written for it by _direct_writer
                self._direct[sub] = None
                if not self._direct_wake.is_set():
                    self._direct_wake.set()
            elif not sub.wake.is_set():
                sub.wake.set()
            return
        self._due.add(sub)
        if not self._round.is_set():
            self._round.set()

    async def _flusher(self) -> None:
        """While the collector is busy, wake the senders of subscribers with something new in
        rounds at most `min_interval` apart: updates gather into fewer, bigger messages (each
        message costs tens of microseconds however little it carries), with one timer for all
        subscribers instead of one each."""
        interval = self.config.min_interval
        while True:
            await self._round.wait()
            if trio.current_time() < self._last_round + interval:
                await trio.sleep_until(self._last_round + interval)
            self._round = trio.Event()
            self._last_round = trio.current_time()
            due, self._due = self._due, set()
            now = trio.current_time()
            for sub in due:
                self._write_or_wake(sub, now)

    async def _direct_writer(self) -> None:
        """Write, at once, for the subscribers with something new whose senders are idle."""
        while True:
            await self._direct_wake.wait()
            self._direct_wake = trio.Event()
            due, self._direct = self._direct, {}
            now = trio.current_time()
            for sub in due:
                self._write_or_wake(sub, now)

    def _write_or_wake(self, sub: Subscriber, now: float) -> None:
        """Send what is queued for `sub` here and now if its sender is idle and its socket
        takes it; otherwise (or for what the socket does not take) wake its sender."""
        if sub.wake.is_set():
            return
        if (
            not sub.parked
            or sub.writer is None
            or sub.backlog is not None
            or sub.pending_subscription is not None
            or sub.resync
            or sub.closing is not None
        ):
            sub.wake.set()
            return
        try:
            messages = list(sub.take(now))
            for i, message in enumerate(messages):
                text = self._text(sub, message)
                if not sub.writer.offer(text):  # the socket is full (or closed): the sender
                    sub.seq -= 1  # numbered again when it is sent
                    sub.backlog = messages[i:]
                    sub.wake.set()
                    return
                self._sent(sub, text)
                self.messages_direct += 1
                if sub.writer.pending:  # taken in part: the sender writes the rest, then more
                    sub.backlog = messages[i + 1 :]
                    sub.wake.set()
                    return
            if sub.deferred:  # max_rate held some back: the sender sets its timer for them
                sub.wake.set()
        except Exception as exc:  # the boundary of one dashboard, as in its sender task
            self.app.boundary.report("subscriber", exc, f"subscriber {sub.id} {sub.remote}")
            sub.closing = (stream.CLOSE_INTERNAL_ERROR, "internal error", "internal error")
            sub.wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flusher)
            nursery.start_soon(self._direct_writer)
            await self._tick_forever(task_status=task_status)

    async def _tick_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        interval = self.config.heartbeat_interval
        next_tick = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_tick)
            next_tick += interval
            with self.app.boundary.guard("task", "stream statistics"):
                self.tick()

    def tick(self) -> None:
        # Wall time, not trio time: on a replay's virtual clock this gives replay rates.
        now = self.wall()
        changed: dict[str, Any] = {}
        keep = max(2, round(RATE_WINDOW / self.config.heartbeat_interval) + 1)
        for device_id, state in self.app.registry.devices.items():
            samples = self._samples.get(device_id)
            if samples is None:
                samples = self._samples[device_id] = collections.deque(maxlen=keep)
            samples.append((now, state.datagrams))
            (t0, n0), (t1, n1) = samples[0], samples[-1]
            rate = round((n1 - n0) / (t1 - t0), 3) if t1 > t0 else 0.0
            last = samples[-2][1] if len(samples) > 1 else None
            if last is None or n1 != last or self._rates.get(device_id) != rate:
                self._rates[device_id] = rate
                if self.subscribers:  # nobody to tell: the API computes its answer on demand
                    changed[device_id] = _stats_of(state, rate)
        if self.app.cluster is not None:
            remote = self.app.cluster.take_changed_stats()
            if self.subscribers:
                changed.update(remote)
        heartbeat: dict[str, Any] = {
            "type": "heartbeat",
            "time": self.wall(),
            "stream_seq": self.stream_seq,
        }
        if self.app.playback is not None:
            heartbeat["replay"] = self.app.playback.status()
        shared = StatsText(stream.encode(changed)) if changed else None
        for sub in self.subscribers:
            if sub.matcher is None:
                continue  # nothing but hello (and answers) before the first subscribe
            if changed:
                sub.offer_stats(changed, shared)
            sub.offer_heartbeat(heartbeat)

    # -- one WebSocket subscriber ------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        subs = list(self.subscribers)
        return {
            "subscribers": len(subs),
            "connections_total": self.connections,
            "readings_in": self.readings_in,
            "stream_seq": self.stream_seq,
            "messages_sent": self.messages_sent_closed + sum(s.messages_sent for s in subs),
            "messages_direct": self.messages_direct,
            "readings_sent": self.readings_sent_closed + sum(s.readings_sent for s in subs),
            "missed": self.missed_closed + sum(s.missed_total for s in subs),
            "replies_dropped": self.replies_dropped_closed + sum(s.replies_dropped for s in subs),
            "metrics_refused": self.metrics_refused,
            "closed": dict(self.closed_by_reason),
            "errors": dict(self.errors),
            "per_subscriber": [
                {
                    "id": s.id,
                    "remote": s.remote,
                    "queued": s.queued,
                    "missed": s.missed_total,
                    "messages_sent": s.messages_sent,
                    "readings_sent": s.readings_sent,
                    "bytes_sent": s.bytes_sent,
                    "thinned": s.thinned,
                }
                for s in sorted(subs, key=lambda s: s.id)
            ],
        }

    def can_accept(self) -> bool:
        return len(self.subscribers) < self.config.max_subscribers

    async def run_subscriber(
        self,
        ws: trio_websocket.WebSocketConnection,
        remote: str,
        *,
        can_command: bool,
        writer: DirectWriter | None = None,
    ) -> Subscriber:
        """Serve one connected dashboard until it leaves or is closed; returns it.

        `writer` sends its text messages (default: `ws.send_message`, and no writes for an
        idle sender); the HTTP server passes one that writes the frames itself."""
        cfg = self.config
        now = trio.current_time()
        sub = Subscriber(
            next(self._ids),
            remote,
            cfg.queue_limit,
            cfg.batch_limit,
            now,
            notify=self._notify,
            max_replies=cfg.max_replies,
            writer=writer if writer is not None and writer.can_offer else None,
        )
        self.connections += 1
        self.subscribers.add(sub)
        if self.app.cluster is not None:
            self.app.cluster.subscribers_changed()
        log.info("stream subscriber %d connected from %s", sub.id, remote)
        hello = stream.hello_message(
            version=__version__,
            time=self.wall(),
            heartbeat_interval=cfg.heartbeat_interval,
            history_max=cfg.history,
            can_command=can_command and self.app.playback is None,
        )
        hello["metrics"] = [m.to_json() for m in self.app.config.metrics_meta]
        hello["alarms"] = getattr(self.app, "alarms", None) is not None
        if self.app.playback is not None:
            hello["mode"] = "replay"
            hello["replay"] = self.app.playback.status()
            hello["can_control"] = can_command  # pause, seek and speed need a command token
        sub.offer_message(hello)
        closed = _Closed(None, "closed by the client")
        try:
            async with trio.open_nursery() as nursery:

                async def run(fn: Callable[..., Any]) -> None:
                    nonlocal closed
                    try:
                        await fn(sub, ws)
                    except _Closed as exc:
                        # A copy without the traceback, which holds this frame and so the
                        # cell of `closed`: a reference cycle.
                        closed = _Closed(exc.code, exc.kind, exc.reason)
                    except trio_websocket.ConnectionClosed as exc:
                        reason = exc.reason
                        if reason is not None and reason.code == stream.CLOSE_TOO_BIG:
                            closed = _Closed(None, "message too big", "message too big (1009)")
                        else:
                            closed = _Closed(None, "closed by the client")
                    except Exception as exc:
                        # The boundary of one dashboard: a bug in serving it closes it (1011).
                        self.app.boundary.report("subscriber", exc, f"subscriber {sub.id} {remote}")
                        closed = _Closed(
                            stream.CLOSE_INTERNAL_ERROR, "internal error", "internal error"
                        )
                    nursery.cancel_scope.cancel()

                nursery.start_soon(run, self._reader)
                send = writer.send_text if writer is not None else ws.send_message
                nursery.start_soon(run, functools.partial(self._sender, send=send))
                nursery.start_soon(run, self._pinger)
                nursery.start_soon(run, self._watchdog)
        finally:
            self.subscribers.discard(sub)
            if self.app.cluster is not None:
                self.app.cluster.subscribers_changed()
            self.missed_closed += sub.missed_total
            self.replies_dropped_closed += sub.replies_dropped
            self.messages_sent_closed += sub.messages_sent
            self.readings_sent_closed += sub.readings_sent
        sub.close_code, sub.close_reason = closed.code, closed.reason
        self.closed_by_reason[closed.kind] += 1
        try:
            if closed.code is not None:
                with trio.move_on_after(1.0):  # a peer that stopped reading cannot block this
                    await ws.aclose(closed.code, closed.reason)
        finally:
            sub.done.set()  # after the close frame: shutdown waits for it
        log.info(
            "stream subscriber %d from %s gone after %.1fs: %s%s; %d messages, %d readings, %d missed",
            sub.id,
            remote,
            trio.current_time() - sub.connected_at,
            closed.reason,
            f" (close code {closed.code})" if closed.code else "",
            sub.messages_sent,
            sub.readings_sent,
            sub.missed_total,
        )
        return sub

    async def close_all(self, code: int, reason: str) -> None:
        """Send every subscriber what is queued for it, then close it with `code` and `reason`.

        A subscriber that does not read is closed by the stall limit; callers put a deadline
        around this as well.
        """
        subs = list(self.subscribers)
        for sub in subs:
            sub.closing = (code, "shutdown", reason)
            sub._wake()
        for sub in subs:
            await sub.done.wait()

    async def _reader(self, sub: Subscriber, ws: trio_websocket.WebSocketConnection) -> None:
        # Keep draining: trio-websocket stops answering pings when its message queue is full.
        while True:
            data = await ws.get_message()
            sub.messages_received += 1
            try:
                msg = stream.parse_client_message(data, history_max=self.config.history)
            except StreamError as exc:
                self._error(sub, exc.code, exc.message)
                continue
            if isinstance(msg, stream.Ping):
                sub.offer_reply({"type": "pong", "id": msg.id})
            else:
                sub.pending_subscription = msg.subscription
                sub._wake()

    def _error(self, sub: Subscriber, code: str, message: str) -> None:
        sub.errors += 1
        self.errors[code] += 1
        self.rlog.warning(
            code, trio.current_time(), "stream subscriber %d: %s: %s", sub.id, code, message
        )
        sub.offer_reply(stream.error_message(code, message))

    def _subscribe(self, sub: Subscriber, subscription: Subscription) -> None:
        sub.matcher = Matcher(subscription)
        sub.items = collections.deque(
            it for it in sub.items if it[0] == "m" and it[1]["type"] in ("hello", "error", "pong")
        )
        sub.queued_rows = 0
        sub.queued_events = len(sub.items)
        sub.queued_replies = sum(1 for it in sub.items if it[1]["type"] != "hello")
        sub.coalesced = None
        sub.resync = False
        sub.deferred.clear()
        sub.last_sent.clear()
        sub.pending_stats = {}
        sub.pending_stats_text = None
        snapshot = self.snapshot_messages(sub)
        for message in snapshot:
            sub.items.append(("m", message))
        sub.queued_events += len(snapshot)
        if not any(message["devices"] for message in snapshot):
            self._error(
                sub,
                "no_match",
                f"no device matches {', '.join(subscription.devices)} yet: updates will come when one does",
            )
        log.info("stream subscriber %d subscribed to %s", sub.id, subscription.describe())
        sub._wake()

    async def _sender(
        self,
        sub: Subscriber,
        ws: trio_websocket.WebSocketConnection,
        *,
        send: Callable[[str], Awaitable[None]],
    ) -> None:
        while True:
            if sub.backlog is None:
                due = sub.next_due()
                sub.parked = True  # from here until it wakes, the hub may write for it
                try:
                    if due == math.inf:
                        await sub.wake.wait()
                    else:  # readings held back by max_rate fall due then
                        with trio.move_on_at(due):
                            await sub.wake.wait()
                finally:
                    sub.parked = False
            sub.wake = trio.Event()
            if sub.backlog is not None:  # the hub began, the socket was full: finish, in order
                backlog, sub.backlog = sub.backlog, None
                assert sub.writer is not None
                sub.send_started = trio.current_time()  # the watchdog times this send
                await sub.writer.flush()
                sub.send_started = None
                await self._send_all(sub, backlog, send)
            if sub.pending_subscription is not None:
                subscription, sub.pending_subscription = sub.pending_subscription, None
                self._subscribe(sub, subscription)
                sub.wake = trio.Event()
            elif sub.resync and sub.matcher is not None:
                self._subscribe(sub, sub.matcher.subscription)
                sub.wake = trio.Event()
            await self._send_all(sub, list(sub.take(trio.current_time())), send)
            if sub.closing is not None:
                raise _Closed(*sub.closing)

    @staticmethod
    def _text(sub: Subscriber, message: dict[str, Any] | ReadingsText | StatsText) -> str:
        """A message taken from the queue, numbered, as text (encoded only now: a large
        snapshot in parts is encoded a part at a time, as each can be sent)."""
        sub.seq += 1
        if isinstance(message, ReadingsText):
            return stream.readings_text(message.fragments, sub.seq)
        if isinstance(message, StatsText):
            return (
                '{"type":"stats","devices":' + message.devices_json + ',"seq":' + str(sub.seq) + "}"
            )
        message["seq"] = sub.seq
        return stream.encode(message)

    async def _send_all(
        self,
        sub: Subscriber,
        messages: list[dict[str, Any] | ReadingsText | StatsText],
        send: Callable[[str], Awaitable[None]],
    ) -> None:
        sub.unsent = len(messages)
        for message in messages:
            text = self._text(sub, message)
            sub.send_started = trio.current_time()  # the watchdog times this send
            await send(text)
            sub.send_started = None
            sub.unsent -= 1
            self._sent(sub, text)

    @staticmethod
    def _sent(sub: Subscriber, text: str) -> None:
        sub.messages_sent += 1
        # UTF-8 bytes of the payload (isascii is a flag: free for the usual rows)
        sub.bytes_sent += len(text) if text.isascii() else len(text.encode())

    async def _watchdog(self, sub: Subscriber, ws: trio_websocket.WebSocketConnection) -> None:
        """Close a subscriber whose current send has made no progress for `stall_limit`.

        One timer per subscriber, checking a quarter of the limit at a time, instead of a
        cancel scope around every send (which costs more than the send itself): the close
        comes between 1 and 1.25 times the limit after the send began."""
        stall = self.config.stall_limit
        while True:
            await trio.sleep(stall / 4)
            started = sub.send_started
            if started is not None and trio.current_time() - started >= stall:
                raise _Closed(
                    stream.CLOSE_STALLED, "stalled", f"stalled: no progress sending for {stall:g}s"
                )

    async def _pinger(self, sub: Subscriber, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            await trio.sleep(self.config.ping_interval)
            with trio.move_on_after(self.config.ping_timeout) as cs:
                await ws.ping()
            if cs.cancelled_caught:
                raise _Closed(
                    stream.CLOSE_PING_TIMEOUT,
                    "ping timeout",
                    f"ping timeout: no pong within {self.config.ping_timeout:g}s",
                )


def _stats_of(state: DeviceState | None, rate: float) -> dict[str, Any]:
    if state is None:
        return {
            "rate": 0.0,
            "loss": 0.0,
            "last_seen": None,
            "datagrams": 0,
            "lost": 0,
            "duplicates": 0,
            "out_of_order": 0,
            "readings": 0,
            "metrics_refused": 0,
        }
    expected = state.datagrams + state.lost
    return {
        "rate": round(rate, 3),
        "loss": round(state.lost / expected, 6) if expected else 0.0,
        "last_seen": state.last_seen,
        "datagrams": state.datagrams,
        "lost": state.lost,
        "duplicates": state.duplicates,
        "out_of_order": state.out_of_order,
        "readings": state.readings,
        "metrics_refused": state.metrics_refused,
    }


def device_event_message(event: DeviceOnline | DeviceOffline) -> dict[str, Any]:
    if isinstance(event, DeviceOnline):
        return {
            "type": "device",
            "device": event.device_id,
            "online": True,
            "reason": None,
            "time": event.time,
            "transport": event.transport,
            "address": event.address,
            "session_id": event.session_id,
        }
    return {
        "type": "device",
        "device": event.device_id,
        "online": False,
        "reason": event.reason,
        "time": event.time,
        "duration": event.duration,
    }


def command_message(update: CommandUpdate) -> dict[str, Any]:
    return {
        "type": "command",
        "device": update.device_id,
        "id": update.command_id,
        "name": update.name,
        "args": update.args,
        "state": update.state,
        "result": update.result,
        "error": update.error,
        "time": update.time,
    }
