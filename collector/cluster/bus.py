"""The cluster bus: collector nodes (worker processes, or machines) sharing one Redis.

What a node puts on the bus (keys under `[cluster] prefix`, P):

    P:nodes                  hash   node -> {"incarnation", "started", "pid", "host"}
    P:node:NAME:alive        string the node's heartbeat, expiring after node_timeout
    P:node:NAME:events       stream hb | online | offline | cmd | stats   (always followed)
    P:node:NAME:readings     stream one entry per ingest batch            (followed while
                                    the reading node has dashboards)
    P:node:NAME:requests     stream commands, kicks and config pushes for this node
    P:devices                hash   device -> where it is: node, online, session, stats

An entry of a readings stream carries, in field `r`, the batch's READINGS records in the
recording format (docs/RECORDING.md: the TELEMETRY payload as received, behind a CRC); every
other entry one JSON document in field `d` (through collector.wire.jsonio). A node's own
entries get ids it makes itself (milliseconds-counter, increasing), so an XADD sent again
after a timeout is refused by Redis as a duplicate instead of being stored twice: what the
node owes the bus reaches it exactly once.

What a node does with the others' entries:

* readings go to its hub (dashboards on this node see every device); session events update
  its view of remote devices (`remote`) and go to its hub; a device that registers on another
  node while it has a session here loses the older session (`superseded`), as on one node;
* every entry of a node pushes that node's deadline (`node_timeout`); when it passes, the node
  is lost: its devices go offline with reason `node_lost`, here and in P:devices. A node that
  comes back with a new incarnation (restarted) loses its old sessions the same way;
* requests to this node (a command for a device whose session is here, a kick, a config push)
  are carried out here, and their outcome travels back as `cmd` events.

Redis away does not stop ingest: entries wait in a bounded buffer (`[cluster] buffer`; the
oldest are dropped and counted when it is full), remote nodes' deadlines are suspended (a node
cannot tell a lost node from a lost Redis), `/healthz` and `/metrics` say `redis: down`, and
the buffer drains in order when Redis answers again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from collector.cluster import credentials
from collector.cluster.connect import redis_client
from collector.core.events import (
    CommandUpdate,
    DeviceOffline,
    DeviceOnline,
    Event,
    Telemetry,
)
from collector.devices import DeviceRegistry, DevicesError
from collector.logs import RateLimitedLog
from collector.wire.jsonio import JsonError, dumps_bytes
from collector.wire.jsonio import loads_object as loads
from collector.wire.recording import (
    ReadingsRecord,
    ScanReport,
    decode_records,
    encode_readings_record,
)

if TYPE_CHECKING:
    from collector.app import Collector

log = logging.getLogger("collector.cluster")
#: the bus says itself, once and then rate-limited, when Redis fails; coredis would log a
#: traceback for each connection attempt
logging.getLogger("coredis").setLevel(logging.CRITICAL)

NODE_LOST = "node_lost"
#: every Redis command has this long (on top of a blocking read's own block time)
OP_TIMEOUT = 2.0
BLOCK_MS = 1000
RETRY_FIRST, RETRY_MAX = 0.1, 2.0
PUBLISH_BATCH = 500
SEEN_REQUESTS = 10_000  # request ids remembered to drop a re-sent copy
#: entries kept in a node's events and requests streams (heartbeats carry the statistics of
#: every device that changed, so they are big; a node that falls behind rereads where every
#: device is instead)
EVENTS_MAXLEN = 1000
#: readings entries waiting together are sent as one, up to this size
MERGE_BYTES = 256 * 1024
#: the publisher sends at most once per this many seconds: what arrives meanwhile goes in
#: the next round (an idle node sends at once)
PUBLISH_INTERVAL = 0.002
#: a node keeps following another's readings for this long after its last dashboard left
READINGS_LINGER = 10.0
#: readings of a node read back when this node starts following them (to fill values)
PREFILL = 200
MAX_REMOTE_DEVICES = 1_000_000
#: changes to shared credentials a node holds while Redis is away (one per device)
MAX_PENDING_CREDENTIALS = 10_000
MAX_NODES = 1024

CAS_SCRIPT = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v == ARGV[2] then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) return 1 end
return 0
"""


class EntryIds:
    """Stream entry ids made by the node: `ms-n`, strictly increasing even when the clock
    steps back (a restarted node starts above what its stream already holds)."""

    def __init__(self, wall: Callable[[], float]) -> None:
        self.wall = wall
        self.ms = 0
        self.n = 0

    def floor(self, entry_id: bytes | str) -> None:
        text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        ms, _, n = text.partition("-")
        if (int(ms), int(n or 0)) > (self.ms, self.n):
            self.ms, self.n = int(ms), int(n or 0)

    def next(self) -> str:
        now = int(self.wall() * 1000)
        if now > self.ms:
            self.ms, self.n = now, 0
        else:
            self.n += 1
        return f"{self.ms}-{self.n}"


@attrs.define
class RemoteDevice:
    """Another node's device, as this node knows it from the bus."""

    device_id: str
    node: str
    incarnation: str = ""
    online: bool = False
    session_id: int | None = None
    transport: str | None = None
    address: str | None = None
    since: float | None = None
    last_seen: float | None = None
    sessions: int = 0
    reason: str | None = None
    stats: dict[str, Any] = attrs.Factory(dict)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RemoteDevice:
        fields = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


@attrs.define
class RemoteNode:
    name: str
    incarnation: str = ""
    deadline: float = math.inf
    scope: trio.CancelScope | None = None
    lost: bool = False
    last_event: bytes | None = None  # None: not read yet (then: its last entry, then on)
    last_reading: bytes | None = None  # None: not following its readings


@attrs.define
class Outbox:
    """What the node owes the bus: (stream, id, document, readings) in order, bounded. When
    full, the oldest entry is dropped and counted (entries and the readings they held)."""

    limit: int
    entries: collections.deque[tuple[str, str, bytes, int]] = attrs.Factory(collections.deque)
    dropped: int = 0
    dropped_readings: int = 0
    wake: trio.Event = attrs.Factory(trio.Event)
    drained: trio.Event = attrs.Factory(trio.Event)  # set whenever a batch went out
    #: entries sent at least once whose outcome is unknown (Redis may have stored them and
    #: the answer got lost), and those of them the limit dropped: `settle` tells which of
    #: those reached Redis after all, so that `dropped` counts only what never did
    uncertain: dict[str, tuple[str, int]] = attrs.Factory(dict)
    uncertain_dropped: dict[str, tuple[str, int]] = attrs.Factory(dict)
    in_flight: int = 0  # entries of the batch being sent (taken, not yet sent or given back)

    @property
    def owed(self) -> int:
        """Entries not known to be in Redis: waiting, and the batch in flight."""
        return len(self.entries) + self.in_flight

    def put(self, stream: str, entry_id: str, doc: bytes, readings: int = 0) -> None:
        self.entries.append((stream, entry_id, doc, readings))
        self._trim()
        if not self.wake.is_set():
            self.wake.set()

    def take(self, n: int) -> list[tuple[str, str, bytes, int]]:
        """Up to `n` entries, in order; consecutive readings entries of one stream become one
        (records concatenate), so that a busy node sends one XADD per round, not per batch."""
        out: list[tuple[str, str, bytes, int]] = []
        while self.entries and len(out) < n:
            entry = self.entries.popleft()
            if (
                out
                and entry[3]
                and out[-1][3]
                and out[-1][0] == entry[0]
                and entry[1] not in self.uncertain  # an entry Redis may hold already is
                and out[-1][1] not in self.uncertain  # sent again exactly as it was
                and len(out[-1][2]) + len(entry[2]) <= MERGE_BYTES
            ):
                stream, first_id, doc, readings = out[-1]
                out[-1] = (stream, first_id, doc + entry[2], readings + entry[3])
                continue
            out.append(entry)
        self.in_flight = len(out)
        return out

    def put_early(self, stream: str, entry_id: str, doc: bytes) -> None:
        """Put an entry right after the last one of its own stream, ahead of other streams'
        (a heartbeat need not wait behind a backlog of readings; it must stay behind its own
        stream's older entries, whose ids are smaller)."""
        i = len(self.entries)
        while i > 0 and self.entries[i - 1][0] != stream:
            i -= 1
        self.entries.insert(i, (stream, entry_id, doc, 0))
        self._trim()
        if not self.wake.is_set():
            self.wake.set()

    def holds(self, entry_id: str) -> bool:
        """Whether the entry is still waiting to go out (or may not have reached Redis)."""
        return entry_id in self.uncertain or any(e[1] == entry_id for e in self.entries)

    def give_back(self, batch: list[tuple[str, str, bytes, int]]) -> None:
        """A batch that did not go out (or may have): first in line again, within the limit."""
        self.in_flight = 0
        for stream, entry_id, _doc, readings in batch:
            self.uncertain[entry_id] = (stream, readings)
        self.entries.extendleft(reversed(batch))
        self._trim()

    def sent(self, batch: list[tuple[str, str, bytes, int]]) -> None:
        self.in_flight = 0
        for _stream, entry_id, _doc, _n in batch:
            self.uncertain.pop(entry_id, None)

    def settle(self, stream: str, last_id: bytes | str | None) -> tuple[int, int]:
        """Redis's last entry of `stream` is `last_id`: the dropped entries of that stream
        at or below it reached Redis after all. Returns (entries, readings) found there."""
        top = _id_key(last_id) if last_id else (-1, -1)
        found = readings_found = 0
        for entry_id, (s, n) in list(self.uncertain_dropped.items()):
            if s != stream:
                continue
            del self.uncertain_dropped[entry_id]
            if _id_key(entry_id) <= top:
                found += 1
                readings_found += n
        self.dropped -= found
        self.dropped_readings -= readings_found
        return found, readings_found

    def _trim(self) -> None:
        while len(self.entries) > self.limit:
            stream, entry_id, _doc, readings = self.entries.popleft()
            if self.uncertain.pop(entry_id, None) is not None:
                self.uncertain_dropped[entry_id] = (stream, readings)
            self.dropped += 1
            self.dropped_readings += readings


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, n = text.partition("-")
    return int(ms), int(n or 0)


class ClusterBus:
    """This node's link to the bus (see the module's docstring). A listener of the collector:
    what ingest accepts is handed over synchronously and never waits for Redis."""

    def __init__(self, app: Collector, *, node: str, url: str) -> None:
        cfg = app.config
        self.app = app
        self.node = node
        self.url = url
        self.prefix = cfg.cluster_prefix
        self.heartbeat = cfg.node_heartbeat
        self.node_timeout = cfg.node_timeout
        self.maxlen = cfg.cluster_stream_maxlen
        self.incarnation = secrets.token_hex(6)
        self.outbox = Outbox(cfg.cluster_buffer)
        self.ids = EntryIds(app.wall)
        self.remote: dict[str, RemoteDevice] = {}
        self.nodes: dict[str, RemoteNode] = {}
        self.redis_up = False
        self.client: Any = None
        self.counters: collections.Counter[str] = collections.Counter()
        self.rlog = RateLimitedLog(log, cfg.log_rate_limit)
        self._changed_stats: dict[str, dict[str, Any]] = {}
        self._up = trio.Event()
        self._readers_wanted = trio.Event()
        self._last_subscriber = -math.inf
        self._nursery: trio.Nursery | None = None
        self._published_stats: dict[str, int] = {}
        #: command id -> the node that runs it (for commands this node forwarded)
        self.forwarded: dict[str, str] = {}
        self._wait_remote: dict[str, trio.Event] = {}
        self._requests_from: bytes | None = None
        self._seen_requests: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: [cluster] shared_devices: the credentials live in Redis (collector/cluster/credentials.py)
        self.shared_devices = cfg.cluster_shared_devices and isinstance(app.devices, DeviceRegistry)
        self.credential_keys = credentials.Keys(self.prefix)
        #: this node's changes not yet in Redis: device -> secret (None: removed)
        self._credentials_owed: dict[str, str | None] = {}
        #: changes being written to Redis now (taken from owed, not yet confirmed)
        self._credentials_in_flight: dict[str, str | None] = {}
        self._credentials_wake = trio.Event()
        self._credentials_from: bytes | None = None

    # -- keys --------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def stream(self, node: str, kind: str) -> str:
        return self.key("node", node, kind)

    # -- listener: called synchronously from ingest and the session registry ------------------

    def on_telemetry(self, batch: Sequence[Telemetry]) -> None:
        # Readings travel as records of the recording format (docs/RECORDING.md): the
        # TELEMETRY payload as received, behind a CRC; no JSON to build per reading.
        parts = []
        readings = 0
        for t in batch:
            if t.readings:
                parts.append(
                    encode_readings_record(
                        t.time, t.device_id, t.seq, t.device_time_us, t.readings, t.payload
                    )
                )
                readings += len(t.readings)
        if not parts:
            return
        self.counters["readings_queued"] += readings
        self.outbox.put(
            self.stream(self.node, "readings"), self.ids.next(), b"".join(parts), readings
        )

    def on_event(self, event: Event) -> None:
        if isinstance(event, DeviceOnline):
            # its session is here now: what this node knew of it elsewhere is history
            self.remote.pop(event.device_id, None)
            doc: dict[str, Any] = {"k": "online", **attrs.asdict(event)}
        elif isinstance(event, DeviceOffline):
            if event.reason == NODE_LOST:
                return  # about another node: that node's watchers say it
            doc = {"k": "offline", **attrs.asdict(event)}
        elif isinstance(event, CommandUpdate):
            if event.command_id in self.forwarded:
                return  # run by another node, which tells everyone itself
            doc = {"k": "cmd", **attrs.asdict(event)}
        else:  # pragma: no cover
            return
        doc["incarnation"] = self.incarnation
        self._publish_event(doc)

    def _publish_event(self, doc: dict[str, Any]) -> None:
        try:
            data = dumps_bytes(doc)
        except ValueError:
            self.counters["encode_errors"] += 1
            return
        self.outbox.put(self.stream(self.node, "events"), self.ids.next(), data)

    # -- what the hub and the API ask -------------------------------------------------------------

    def shows(self, event: Event) -> bool:
        """Whether a dashboard should be told `event` (a session that ended while the device
        already has a newer one, here or on another node, is not news for its state)."""
        if not isinstance(event, DeviceOffline):
            return True
        if event.device_id in self.app.registry.online:
            return False
        r = self.remote.get(event.device_id)
        return not (r is not None and r.online and r.session_id != event.session_id)

    def remote_summary(self, device_id: str) -> dict[str, Any] | None:
        """The device as the API shows it, when its current (or last) session is on another
        node; None when this node's own view is the one to show."""
        r = self.remote.get(device_id)
        if r is None:
            return None
        local = self.app.registry.devices.get(device_id)
        if local is not None:
            if local.session is not None:
                return None  # online here
            if not r.online and (local.offline_since or 0) >= (r.since or 0):
                return None  # offline everywhere, and its last session was here

        return {
            "online": r.online,
            "reason": None if r.online else r.reason,
            "transport": r.transport if r.online else None,
            "address": r.address,
            "since": r.since,
            "last_seen": r.last_seen,
            "session_id": r.session_id if r.online else None,
            "sessions": r.sessions,
            "node": r.node,
            "stats": r.stats or None,
        }

    def device_ids(self) -> Iterable[str]:
        return self.remote.keys()

    def online_elsewhere(self, device_id: str) -> str | None:
        if device_id in self.app.registry.online:
            return None
        r = self.remote.get(device_id)
        return r.node if r is not None and r.online and not self._node_lost(r.node) else None

    def _node_lost(self, name: str) -> bool:
        n = self.nodes.get(name)
        return n is not None and n.lost

    def take_changed_stats(self) -> dict[str, dict[str, Any]]:
        out, self._changed_stats = self._changed_stats, {}
        return out

    def subscribers_changed(self) -> None:
        """The hub's subscriber count changed: follow the other nodes' readings while it has any."""
        if self.app.hub.subscribers:
            self._last_subscriber = math.inf
            if not self._readers_wanted.is_set():
                self._readers_wanted.set()
        elif self._last_subscriber == math.inf:
            self._last_subscriber = trio.current_time()

    def status(self) -> dict[str, Any]:
        alive = [n for n in self.nodes.values() if not n.lost]
        return {
            "node": self.node,
            "redis": "up" if self.redis_up else "down",
            "nodes": sorted([self.node, *(n.name for n in alive)]),
            "lost_nodes": sorted(n.name for n in self.nodes.values() if n.lost),
            "remote_devices": len(self.remote),
            "remote_online": sum(1 for r in self.remote.values() if r.online),
            **dict(self.counters),
            "buffered": self.outbox.owed,
            "dropped": self.outbox.dropped,
            "dropped_readings": self.outbox.dropped_readings,
        }

    # -- running -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._link)
            task_status.started()
            await trio.sleep_forever()

    def _make_client(self) -> Any:
        """A new client. Each blocking reader has its own (a cancelled blocking read can break
        another command in flight on a shared one), and every (re)join makes new ones: coredis
        6.9 loses a pool slot for each blocking read that is interrupted, which happens each
        time Redis goes away."""
        from coredis.retry import NoRetryPolicy  # only a clustered collector needs coredis

        return redis_client(
            self.url,
            decode_responses=False,
            connect_timeout=OP_TIMEOUT,
            stream_timeout=OP_TIMEOUT + BLOCK_MS / 1000,
            retry_policy=NoRetryPolicy(),  # its retries would send an XADD again, blindly
        )

    async def _call(self, fn: Callable[..., Any], *args: Any, extra: float = 0.0, **kw: Any) -> Any:
        with trio.fail_after(OP_TIMEOUT + extra):
            return await fn(*args, **kw)

    def _down(self, what: str, exc: BaseException) -> None:
        self.counters["redis_errors"] += 1
        if self.redis_up:
            self.redis_up = False
            self._up = trio.Event()
            self._suspend_deadlines()
            log.warning(
                "redis: down (%s: %s); ingest goes on, up to %d entries wait for it",
                what,
                _describe(exc),
                self.outbox.limit,
            )
        else:
            self.rlog.warning(
                "redis_down", trio.current_time(), "redis still down (%s: %s)", what, _describe(exc)
            )

    def _suspend_deadlines(self) -> None:
        """A lost Redis is not a lost node: nobody is marked lost until the bus is back."""
        for n in self.nodes.values():
            n.deadline = math.inf
            if n.scope is not None:
                n.scope.deadline = math.inf

    async def _link(self) -> None:
        """Connect (again), take the bus's state, then run the node's tasks until Redis fails."""
        delay = RETRY_FIRST
        while True:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    self.client = await stack.enter_async_context(self._make_client())
                    readers = [
                        await stack.enter_async_context(self._make_client()) for _ in range(3)
                    ]
                    try:
                        await self._join()
                    except Exception as exc:
                        raise _RedisFailed("joining", exc) from None
                    delay = RETRY_FIRST
                    self._joined()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._guard, self._publisher)
                        nursery.start_soon(self._guard, self._heartbeats)
                        nursery.start_soon(self._guard, self._follow_events, readers[0])
                        nursery.start_soon(self._guard, self._follow_readings, readers[1])
                        nursery.start_soon(self._guard, self._follow_requests, readers[2])
                        if self.shared_devices:
                            nursery.start_soon(self._guard, self._credentials_writer)
            except* _RedisFailed as group:
                failed = _first(group)
                self._down(failed.what, failed.cause)
            except* Exception as group:  # closing a client of a Redis that went away
                self._down("disconnecting", _first(group))
            await trio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)

    def _joined(self) -> None:
        was_down = self.counters["joins"] > 0
        self.counters["joins"] += 1
        self.redis_up = True
        self._up.set()
        now = trio.current_time()
        for n in self.nodes.values():
            if not n.lost:
                self._push(n, now)
        log.info(
            "redis: %s as node %s (%d other nodes, %d of their devices known)",
            "up again" if was_down else "joined",
            self.node,
            sum(1 for n in self.nodes.values() if not n.lost),
            len(self.remote),
        )

    async def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            await fn(*args)
        except trio.TooSlowError as exc:
            self._suspend_deadlines()
            raise _RedisFailed(fn.__name__.strip("_"), exc) from None
        except Exception as exc:
            # At the first failure, before the other tasks unwind (that can take seconds):
            # deadlines that lapsed meanwhile would mark every other node lost.
            self._suspend_deadlines()
            if not _is_redis_error(exc):
                self.app.boundary.report("task", exc, f"cluster {fn.__name__}")
            raise _RedisFailed(fn.__name__.strip("_"), exc) from None

    async def _join(self) -> None:
        """Announce this node, read where every device is, start watching the other nodes."""
        c = self.client
        for kind in ("events", "readings"):
            stream = self.stream(self.node, kind)
            last = await self._call(c.xrevrange, stream, "+", "-", count=1)
            if last:
                self.ids.floor(last[0].identifier)
            found, readings = self.outbox.settle(stream, last[0].identifier if last else None)
            if found:  # dropped while their fate was unknown, yet Redis had them
                self.counters["published"] += found
                self.counters["readings_published"] += readings
        await self._announce()
        nodes = await self._call(c.hgetall, self.key("nodes"))
        alive = {}
        for raw in nodes:
            name = raw.decode()
            if name == self.node:
                continue
            alive[name] = await self._call(c.get, self.key("node", name, "alive"))
        for name, incarnation in alive.items():
            n = self._node(name)
            if incarnation is None:
                n.lost = True
            else:
                n.incarnation = incarnation.decode()
            if n.last_event is None:  # where to follow it from: before the devices are read
                n.last_event = await self._last_id(c, self.stream(name, "events"))
        devices = await self._call(c.hgetall, self.key("devices"))
        for raw_id, raw in devices.items():
            if len(self.remote) >= MAX_REMOTE_DEVICES:
                self.counters["remote_devices_refused"] += 1
                break
            try:
                r = RemoteDevice.from_json(loads(raw))
            except (JsonError, TypeError, ValueError):
                self.counters["bad_entries"] += 1
                continue
            device_id = raw_id.decode()
            r.device_id = device_id
            if r.node == self.node:
                if (
                    r.online
                    and r.incarnation != self.incarnation
                    and device_id not in self.app.registry.online
                ):
                    # a session of this node's previous life (it crashed or was killed)
                    await self._mark_lost(device_id, raw, r)
                continue
            n = self.nodes.get(r.node)
            if r.online and (
                n is None or n.lost or (n.incarnation and r.incarnation != n.incarnation)
            ):
                await self._mark_lost(device_id, raw, r)
            self.remote[device_id] = r
        if self.shared_devices:
            await self._sync_credentials()

    async def _last_id(self, c: Any, stream: str) -> bytes:
        last = await self._call(c.xrevrange, stream, "+", "-", count=1)
        return last[0].identifier if last else b"0-0"

    async def _catch_up_with(self, c: Any, n: RemoteNode) -> None:
        """A node found after joining: where to follow its events from, then its devices
        (in that order, so that nothing between the two is missed)."""
        n.last_event = await self._last_id(c, self.stream(n.name, "events"))
        devices = await self._call(c.hgetall, self.key("devices"))
        for raw_id, raw in devices.items():
            device_id = raw_id.decode()
            try:
                r = RemoteDevice.from_json(loads(raw))
            except (JsonError, TypeError, ValueError):
                self.counters["bad_entries"] += 1
                continue
            if r.node != n.name or device_id in self.app.registry.online:
                continue
            if device_id not in self.remote and len(self.remote) >= MAX_REMOTE_DEVICES:
                self.counters["remote_devices_refused"] += 1
                continue
            r.device_id = device_id
            self.remote[device_id] = r
            if r.online:
                self.app.hub.on_event(
                    DeviceOnline(r.since or self.app.wall(), device_id, r.session_id or 0,
                                 r.transport or "udp", r.address)
                )  # fmt: skip

    async def _mark_lost(self, device_id: str, raw: bytes, r: RemoteDevice) -> None:
        r.online = False
        r.reason = NODE_LOST
        new = dumps_bytes(r.to_json())
        await self._call(
            self.client.eval, CAS_SCRIPT, keys=[self.key("devices")], args=[device_id, raw, new]
        )

    async def _announce(self) -> None:
        info = dumps_bytes(
            {
                "incarnation": self.incarnation,
                "started": self.app.wall(),
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
        )
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self.key("nodes"), {self.node: info})
            pipe.set(
                self.key("node", self.node, "alive"),
                self.incarnation.encode(),
                px=int(self.node_timeout * 1000),
            )
        await self._republish_state()

    async def _republish_state(self) -> None:
        """Write where this node's devices are (on joining, and after Redis was away)."""
        states = {d: dumps_bytes(self._local_state(d)) for d in self.app.registry.online}
        if states:
            await self._call(self.client.hset, self.key("devices"), states)

    def _local_state(self, device_id: str) -> dict[str, Any]:
        state = self.app.registry.devices[device_id]
        s = state.session
        return RemoteDevice(
            device_id=device_id,
            node=self.node,
            incarnation=self.incarnation,
            online=s is not None,
            session_id=s.session_id if s else None,
            transport=s.transport if s else None,
            address=state.address,
            since=state.online_since if s else state.offline_since,
            last_seen=state.last_seen,
            sessions=state.sessions,
            reason=None if s else state.offline_reason,
            stats=self.app.hub.device_stats(device_id),
        ).to_json()

    # -- publishing ----------------------------------------------------------------------------

    async def _publisher(self) -> None:
        from coredis.tokens import PureToken

        box = self.outbox
        while True:
            if not box.entries:
                box.wake = trio.Event()
                await box.wake.wait()
            batch = box.take(PUBLISH_BATCH)
            try:
                await self._publish(batch, PureToken)
            except BaseException:
                box.give_back(batch)
                raise
            box.sent(batch)
            box.drained.set()
            await trio.sleep(PUBLISH_INTERVAL)

    async def _publish(self, batch: list[tuple[str, str, bytes, int]], PureToken: Any) -> None:
        """XADD a batch with the node's own ids: an entry that reached Redis before (the
        answer was lost) is refused as a duplicate, so each entry is stored exactly once."""
        device_states: dict[str, bytes] = {}
        for _stream, _id, doc, _n in batch:
            if doc.startswith(b'{"k":"online"') or doc.startswith(b'{"k":"offline"'):
                event = loads(doc)
                if event["device_id"] in self.app.registry.devices:
                    device_states[event["device_id"]] = dumps_bytes(
                        self._local_state(event["device_id"])
                    )
        with trio.fail_after(OP_TIMEOUT):
            async with self.client.pipeline(transaction=False, raise_on_error=False) as pipe:
                for stream, entry_id, doc, _n in batch:
                    pipe.xadd(
                        stream,
                        {b"r" if stream.endswith(":readings") else b"d": doc},
                        identifier="*" if stream.endswith(":requests") else entry_id,
                        trim_strategy=PureToken.MAXLEN,
                        trim_operator=PureToken.APPROXIMATELY,
                        threshold=self.maxlen if stream.endswith(":readings") else EVENTS_MAXLEN,
                    )
                if device_states:
                    pipe.hset(self.key("devices"), device_states)
        results = pipe.results
        for result in results:
            # Before counting anything: the whole batch goes again on a new link, and what of
            # it Redis stored now is counted then (refused as a duplicate), once.
            if isinstance(result, Exception) and _is_link_error(result):
                raise result
        for (stream, entry_id, _doc, readings), result in zip(batch, results, strict=False):
            if isinstance(result, Exception):
                if "equal or smaller" in str(result) and entry_id in self.outbox.uncertain:
                    self.counters["duplicates_refused"] += 1  # sent before: already there
                elif "equal or smaller" in str(result):
                    # Never sent before, so not stored: an id out of order (a bug, or a
                    # clock that went back past the stream's top). Lost, and said so.
                    self.counters["publish_errors"] += 1
                    self.rlog.warning(
                        "publish_order",
                        trio.current_time(),
                        "redis refused an entry for %s as out of order (%s): it is lost",
                        stream,
                        entry_id,
                    )
                    continue
                else:
                    self.counters["publish_errors"] += 1
                    self.rlog.warning(
                        "publish_error",
                        trio.current_time(),
                        "redis refused an entry for %s: %s",
                        stream,
                        result,
                    )
                    continue
            self.counters["published"] += 1
            self.counters["readings_published"] += readings

    async def _heartbeats(self) -> None:
        c = self.client
        hb_id: str | None = None  # the heartbeat entry waiting in the outbox, if any
        while True:
            # The heartbeat entry goes through the outbox like every entry of this node's
            # events stream: one writer, ids in order. (Written directly, a heartbeat with a
            # newer id made Redis refuse the older events still queued, and they were lost.)
            # At most one waits there at a time, so an outage does not fill the outbox with
            # heartbeats; the statistics of a skipped round go out with the next one.
            if hb_id is not None and not self.outbox.holds(hb_id):
                hb_id = None
            states: dict[str, bytes] = {}
            if hb_id is None:
                stats: dict[str, Any] = {}
                for device_id, state in self.app.registry.devices.items():
                    if self._published_stats.get(device_id) != state.datagrams:
                        self._published_stats[device_id] = state.datagrams
                        stats[device_id] = self.app.hub.device_stats(device_id)
                        states[device_id] = dumps_bytes(self._local_state(device_id))
                hb = dumps_bytes(
                    {
                        "k": "hb",
                        "incarnation": self.incarnation,
                        "time": self.app.wall(),
                        "stats": stats,
                    }
                )
                hb_id = self.ids.next()
                self.outbox.put_early(self.stream(self.node, "events"), hb_id, hb)
            with trio.fail_after(OP_TIMEOUT):
                async with c.pipeline(transaction=False) as pipe:
                    pipe.set(
                        self.key("node", self.node, "alive"),
                        self.incarnation.encode(),
                        px=int(self.node_timeout * 1000),
                    )
                    if states:
                        pipe.hset(self.key("devices"), states)
            self.counters["heartbeats"] += 1
            with trio.fail_after(OP_TIMEOUT):
                nodes = await c.hgetall(self.key("nodes"))
            for raw in nodes:
                name = raw.decode()
                if name != self.node and name not in self.nodes and len(self.nodes) < MAX_NODES:
                    n = self._node(name)
                    self._push(n, trio.current_time())
                    log.info("cluster: node %s joined", name)
            await trio.sleep(self.heartbeat)

    # -- following the other nodes ----------------------------------------------------------------

    def _node(self, name: str) -> RemoteNode:
        n = self.nodes.get(name)
        if n is None:
            n = self.nodes[name] = RemoteNode(name)
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_node, n)
        return n

    def _push(self, n: RemoteNode, now: float) -> None:
        if n.lost:
            return
        n.deadline = now + self.node_timeout if self.redis_up else math.inf
        if n.scope is not None:
            n.scope.deadline = n.deadline

    async def _watch_node(self, n: RemoteNode) -> None:
        """One task per other node: its deadline is pushed by each of its entries; when it
        passes, the node is lost (an event with a reason, like a device's session)."""
        while True:
            while n.lost:
                n.scope = trio.CancelScope()
                with n.scope:
                    await trio.sleep_forever()  # cancelled when the node comes back
            n.scope = trio.CancelScope(deadline=n.deadline)
            with n.scope:
                await trio.sleep_forever()
            if n.scope.cancelled_caught and trio.current_time() >= n.deadline and not n.lost:
                self._lose(n, f"no heartbeat for {self.node_timeout:g}s")

    def _lose(self, n: RemoteNode, why: str, *, incarnation: str | None = None) -> None:
        if incarnation is None:
            n.lost = True
            self.counters["nodes_lost"] += 1
        log.warning(
            "cluster: node %s lost (%s): its devices are offline (%s)", n.name, why, NODE_LOST
        )
        wall = self.app.wall()
        for device_id, r in list(self.remote.items()):
            if r.node != n.name or not r.online:
                continue
            if incarnation is not None and r.incarnation == incarnation:
                continue
            r.online = False
            r.reason = NODE_LOST
            duration = wall - (r.since or wall)
            r.since = wall
            event = DeviceOffline(wall, device_id, r.session_id or 0, NODE_LOST, duration)
            self.counters["devices_lost"] += 1
            self.app.hub.on_event(event)
            self._fail_forwarded(device_id, n.name)
            if self._nursery is not None and self.redis_up:
                self._nursery.start_soon(self._mark_lost_quietly, device_id, r)

    async def _mark_lost_quietly(self, device_id: str, r: RemoteDevice) -> None:
        try:
            raw = await self._call(self.client.hget, self.key("devices"), device_id)
            if raw is None:
                return
            current = RemoteDevice.from_json(loads(raw))
            if current.node == r.node and current.session_id == r.session_id and current.online:
                await self._mark_lost(device_id, raw, current)
        except Exception as exc:  # the others will do it, or the node's successor
            self.counters["redis_errors"] += 1
            self.rlog.warning(
                "mark_lost",
                trio.current_time(),
                "cluster: could not mark %s lost: %s",
                device_id,
                _describe(exc),
            )

    def _fail_forwarded(self, device_id: str, node: str) -> None:
        for command_id, where in list(self.forwarded.items()):
            cmd = self.app.commands.get(command_id)
            if where == node and cmd is not None and cmd.device_id == device_id and not cmd.final:
                self.app.commands.finish_remote(cmd, "failed", error=f"node {node} was lost")

    async def _follow_events(self, c: Any) -> None:
        while True:
            for n in list(self.nodes.values()):
                if n.last_event is None:
                    await self._catch_up_with(c, n)
            streams = {
                self.stream(n.name, "events"): n.last_event
                for n in self.nodes.values()
                if n.last_event is not None
            }
            changes = self.credential_keys.changes
            if self._credentials_from is not None:
                streams[changes] = self._credentials_from
            if not streams:
                await trio.sleep(self.heartbeat)
                continue
            got = await self._call(
                c.xread, streams, count=500, block=BLOCK_MS, extra=BLOCK_MS / 1000
            )
            now = trio.current_time()
            for raw_stream, entries in (got or {}).items():
                if raw_stream.decode() == changes:
                    await self._credentials_changed(c, entries)
                    continue
                name = raw_stream.decode().split(":")[-2]
                n = self.nodes.get(name)
                if n is None:
                    continue
                for entry in entries:
                    n.last_event = entry.identifier
                    self.counters["events_received"] += 1
                    try:
                        doc = loads(entry.field_values[b"d"])
                        self._on_remote_event(n, doc, now)
                    except (JsonError, KeyError, TypeError, ValueError) as exc:
                        self.counters["bad_entries"] += 1
                        self.rlog.warning(
                            "bad_entry", now, "cluster: a bad entry from node %s: %s", name, exc
                        )

    def _on_remote_event(self, n: RemoteNode, doc: dict[str, Any], now: float) -> None:
        kind = doc["k"]
        incarnation = doc.get("incarnation", "")
        if n.lost or (incarnation and n.incarnation and incarnation != n.incarnation):
            old = n.incarnation
            was_lost = n.lost
            n.lost = False
            n.incarnation = incarnation
            if n.scope is not None:
                n.scope.cancel()
            if old and old != incarnation:
                self._lose(n, "it restarted", incarnation=incarnation)
            log.info("cluster: node %s is %s", n.name, "back" if was_lost else "running again")
            if was_lost and old == incarnation:
                self._request(n.name, {"op": "resync"})
        elif not n.incarnation:
            n.incarnation = incarnation
        self._push(n, now)
        if kind == "hb":
            all_stats = doc.get("stats")
            if not isinstance(all_stats, dict):
                raise TypeError("a heartbeat whose stats are not an object")  # a bad entry
            for device_id, stats in all_stats.items():
                r = self.remote.get(device_id)
                if r is not None and r.node == n.name and isinstance(stats, dict):
                    r.stats = stats
                    r.last_seen = stats.get("last_seen", r.last_seen)
                    self._changed_stats[device_id] = stats
            return
        if kind == "online":
            self._remote_online(n, doc)
        elif kind == "offline":
            self._remote_offline(n, doc)
        elif kind == "cmd":
            self._remote_command(n, doc)

    def _remote_device(self, device_id: str, node: str) -> RemoteDevice | None:
        r = self.remote.get(device_id)
        if r is None:
            if len(self.remote) >= MAX_REMOTE_DEVICES:
                self.counters["remote_devices_refused"] += 1
                return None
            r = self.remote[device_id] = RemoteDevice(device_id, node)
        return r

    def _remote_online(self, n: RemoteNode, doc: dict[str, Any]) -> None:
        device_id = doc["device_id"]
        r = self._remote_device(device_id, n.name)
        if r is None:
            return
        r.node, r.incarnation, r.online = n.name, doc.get("incarnation", ""), True
        r.session_id, r.transport, r.address = doc["session_id"], doc["transport"], doc["address"]
        r.since = r.last_seen = doc["time"]
        r.sessions += 1
        r.reason = None
        local = self.app.registry.online.get(device_id)
        if local is not None and local.opened_wall <= doc["time"]:
            # The device registered again, on another node: its session here is the old one.
            self.app.supersede_local(local)
        event = DeviceOnline(
            doc["time"], device_id, doc["session_id"], doc["transport"], doc["address"]
        )
        self.app.hub.on_event(event)
        waiter = self._wait_remote.pop(device_id, None)
        if waiter is not None:
            waiter.set()

    def _remote_offline(self, n: RemoteNode, doc: dict[str, Any]) -> None:
        device_id = doc["device_id"]
        r = self.remote.get(device_id)
        if r is None or r.node != n.name or r.session_id != doc["session_id"]:
            return  # not the session this node knows as the device's current one
        r.online = False
        r.reason = doc["reason"]
        r.since = doc["time"]
        event = DeviceOffline(
            doc["time"], device_id, doc["session_id"], doc["reason"], doc["duration"]
        )
        if self.shows(event):
            self.app.hub.on_event(event)

    def _remote_command(self, n: RemoteNode, doc: dict[str, Any]) -> None:
        update = CommandUpdate(
            doc["time"], doc["device_id"], doc["command_id"], doc["name"], doc["state"],
            doc.get("result"), doc.get("error"), doc.get("args"),
        )  # fmt: skip
        cmd = self.app.commands.get(update.command_id)
        if cmd is not None and self.forwarded.get(update.command_id) == n.name:
            if update.state in ("acked", "failed", "timed_out", "expired"):
                self.forwarded.pop(update.command_id, None)
                self.app.commands.finish_remote(
                    cmd, update.state, result=update.result, error=update.error
                )
            elif update.state == "sent":
                self.app.commands.mark_sent_remote(cmd)
            return  # the record's own update told this node's dashboards
        self.app.hub.on_event(update)

    async def _follow_readings(self, c: Any) -> None:
        while True:
            if not self.app.hub.subscribers and (
                trio.current_time() - self._last_subscriber > READINGS_LINGER
            ):
                for n in self.nodes.values():
                    n.last_reading = None
                self._readers_wanted = trio.Event()
                await self._readers_wanted.wait()
            for n in self.nodes.values():
                if n.last_reading is None and not n.lost:
                    await self._prefill(n, c)
            streams = {
                self.stream(n.name, "readings"): n.last_reading
                for n in self.nodes.values()
                if n.last_reading is not None
            }
            if not streams:
                await trio.sleep(self.heartbeat)
                continue
            got = await self._call(
                c.xread, streams, count=1000, block=BLOCK_MS, extra=BLOCK_MS / 1000
            )
            for raw_stream, entries in (got or {}).items():
                name = raw_stream.decode().split(":")[-2]
                n = self.nodes.get(name)
                if n is None:
                    continue
                batch: list[Telemetry] = []
                for entry in entries:
                    n.last_reading = entry.identifier
                    self._rows_into(entry.field_values.get(b"r", b""), batch, name)
                if batch:
                    self.app.hub.on_telemetry(batch)

    async def _prefill(self, n: RemoteNode, c: Any) -> None:
        entries = await self._call(
            c.xrevrange, self.stream(n.name, "readings"), "+", "-", count=PREFILL
        )
        n.last_reading = entries[0].identifier if entries else b"0-0"
        batch: list[Telemetry] = []
        for entry in reversed(entries):
            self._rows_into(entry.field_values.get(b"r", b""), batch, n.name)
        if batch:
            self.app.hub.on_telemetry(batch)

    def _rows_into(self, raw: bytes, batch: list[Telemetry], node: str) -> None:
        report = ScanReport()
        n = 0
        for record in decode_records(raw, report, start=0):
            if type(record) is ReadingsRecord:
                batch.append(
                    Telemetry(record.time, record.device_id, record.seq,
                              record.device_time_us, record.readings)
                )  # fmt: skip
                n += len(record.readings)
        self.counters["readings_received"] += n
        if report.corrupt_regions or report.torn_tail or report.undecodable:
            self.counters["bad_entries"] += 1
            self.rlog.warning(
                "bad_entry", trio.current_time(), "cluster: damaged readings from node %s", node
            )

    # -- requests: commands, kicks and config pushes across nodes ------------------------------------

    def _request(self, node: str, doc: dict[str, Any]) -> None:
        # Every node writes another node's requests stream, so Redis picks the entry ids
        # ("*": one writer's clock cannot refuse another's request); `rid` lets the reader
        # drop the second copy of a request re-sent after its answer was lost.
        entry_id = self.ids.next()
        doc["from"] = self.node
        doc["rid"] = f"{self.node}/{self.incarnation}/{entry_id}"
        self.outbox.put(self.stream(node, "requests"), entry_id, dumps_bytes(doc))

    def forward_command(self, cmd: Any, node: str, expires_in: float) -> None:
        self.forwarded[cmd.id] = node
        self._request(
            node,
            {
                "op": "command",
                "id": cmd.id,
                "device": cmd.device_id,
                "name": cmd.name,
                "args": dict(cmd.args),
                "timeout": cmd.timeout,
                "expires_in": expires_in,
            },
        )

    def forward_kick(self, device_id: str) -> bool:
        node = self.online_elsewhere(device_id)
        if node is None:
            return False
        self._request(node, {"op": "kick", "device": device_id})
        return True

    def broadcast_config(self, match: str, config: dict[str, Any]) -> list[str]:
        targets = [n.name for n in self.nodes.values() if not n.lost]
        for node in targets:
            self._request(node, {"op": "config", "match": match, "config": config})
        return targets

    def broadcast_devices_changed(self) -> None:
        for n in self.nodes.values():
            if not n.lost:
                self._request(n.name, {"op": "devices"})

    async def wait_online_elsewhere(self, device_id: str) -> str:
        while True:
            node = self.online_elsewhere(device_id)
            if node is not None:
                return node
            waiter = self._wait_remote.get(device_id)
            if waiter is None:
                waiter = self._wait_remote[device_id] = trio.Event()
            await waiter.wait()

    async def _follow_requests(self, c: Any) -> None:
        stream = self.stream(self.node, "requests")
        if self._requests_from is None:  # requests from before this node started are stale
            self._requests_from = await self._last_id(c, stream)
        while True:
            got = await self._call(
                c.xread,
                {stream: self._requests_from},
                count=100,
                block=BLOCK_MS,
                extra=BLOCK_MS / 1000,
            )
            for _s, entries in (got or {}).items():
                for entry in entries:
                    self._requests_from = entry.identifier
                    try:
                        doc = loads(entry.field_values[b"d"])
                        rid = doc.get("rid")
                        if rid is not None:  # a request re-sent after its answer was lost
                            if rid in self._seen_requests:
                                self.counters["requests_duplicate"] += 1
                                continue
                            self._seen_requests[rid] = None
                            if len(self._seen_requests) > SEEN_REQUESTS:
                                self._seen_requests.popitem(last=False)
                        with self.app.boundary.guard("task", "cluster request"):
                            self._on_request(doc)
                    except (JsonError, KeyError, TypeError, ValueError) as exc:
                        self.counters["bad_entries"] += 1
                        self.rlog.warning(
                            "bad_request", trio.current_time(), "cluster: a bad request: %s", exc
                        )

    def _on_request(self, doc: dict[str, Any]) -> None:
        op = doc["op"]
        self.counters[f"requests_{op}"] += 1
        if op == "command":
            self.app.run_forwarded_command(doc)
        elif op == "kick":
            self.app.kick(doc["device"])
        elif op == "config":
            self.app.push_config(doc["match"], doc["config"], forward=False)
        elif op == "devices":
            # read in the background: this task goes on following requests meanwhile
            self.app.request_devices_reload(f"cluster: node {doc.get('from')}")
        elif op == "resync":
            for device_id in list(self.app.registry.online):
                s = self.app.registry.online[device_id]
                self._publish_event(
                    {
                        "k": "online",
                        **attrs.asdict(
                            DeviceOnline(
                                s.opened_wall,
                                device_id,
                                s.session_id,
                                s.transport,
                                s.device.address,
                            )
                        ),
                        "incarnation": self.incarnation,
                    }
                )

    # -- shared credentials ([cluster] shared_devices) -----------------------------------------

    def check_credentials_backlog(self, device_id: str) -> None:
        """Refuse a change to the devices while too many wait for Redis (it is away)."""
        owed = self._credentials_owed
        if len(owed) >= MAX_PENDING_CREDENTIALS and device_id not in owed:
            raise DevicesError(
                f"{len(owed)} changes to the devices wait for Redis, which is not answering; "
                "try again when it is back",
                "cluster_backlog",
            )

    def credential_changed(self, device_id: str, secret: str | None) -> None:
        """A change made here (the API): written to Redis at once, or when Redis is back."""
        self._credentials_owed[device_id] = secret
        self._credentials_wake.set()

    async def _credentials_writer(self) -> None:
        while True:
            await self._credentials_wake.wait()
            self._credentials_wake = trio.Event()
            await self._write_owed_credentials()

    async def _write_owed_credentials(self) -> None:
        owed, self._credentials_owed = self._credentials_owed, {}
        if not owed:
            return
        self._credentials_in_flight = owed
        try:
            with trio.fail_after(OP_TIMEOUT):
                await credentials.write(self.client, self.credential_keys, owed, self.node)
        except BaseException:
            for device_id, secret in owed.items():  # newer changes made meanwhile win
                self._credentials_owed.setdefault(device_id, secret)
            raise
        finally:
            self._credentials_in_flight = {}
        self.counters["credentials_written"] += len(owed)

    def _with_mine(self, found: dict[str, Any]) -> dict[str, Any]:
        """`found` (read from Redis) with this node's own newer changes laid over it."""
        for changes in (self._credentials_in_flight, self._credentials_owed):
            for device_id, secret in changes.items():
                if secret is None:
                    found.pop(device_id, None)
                else:
                    found[device_id] = secret
        return found

    async def _sync_credentials(self) -> None:
        """At every join: write what this node owes, seed the hash if no node has, then take
        all of it (changes missed while away included)."""
        c, keys = self.client, self.credential_keys
        await self._write_owed_credentials()
        registry = self.app.devices
        assert isinstance(registry, DeviceRegistry)
        with trio.fail_after(OP_TIMEOUT * 4):
            if await credentials.seed(c, keys, dict(registry), self.node):
                log.info(
                    "redis: shared devices seeded with the %d devices of this node's devices file",
                    len(registry),
                )
            self._credentials_from = await self._last_id(c, keys.changes)
            found, problems = await credentials.read_all(c, keys)
        self._bad_credentials(problems)
        # A change made through the API during the awaits above is in the registry already
        # and owed to Redis: the hash does not hold it yet, so it must not undo it here.
        self._apply_credentials(registry.replace(self._with_mine(found)), "joined")

    async def _credentials_changed(self, c: Any, entries: Sequence[Any]) -> None:
        wanted: list[str] = []
        origins: set[str] = set()
        for entry in entries:
            self._credentials_from = entry.identifier
            try:
                doc = loads(entry.field_values[b"d"])
                device_id, origin = doc["device"], doc["from"]
            except (JsonError, KeyError, TypeError) as exc:
                self._bad_credentials([f"a bad change entry: {exc}"])
                continue
            # Every change entry, this node's own included, is answered by reading the hash
            # now: the entries come in the order of the writes, so the last read of a device
            # gives what the last write left, here as on every node. A change this node still
            # owes is newer than the hash: it is written (and read back) later.
            if str(device_id) not in self._credentials_owed:
                wanted.append(str(device_id))
                if origin != self.node:
                    origins.add("the command line" if origin == "cli" else f"node {origin}")
        if not wanted:
            return
        found, problems = await self._call(
            credentials.read_some, c, self.credential_keys, list(dict.fromkeys(wanted))
        )
        self._bad_credentials(problems)
        registry = self.app.devices
        assert isinstance(registry, DeviceRegistry)
        # changed here while the values were read: this node's change is the newer one
        found = {d: secret for d, secret in found.items() if d not in self._credentials_owed}
        why = f"changed by {', '.join(sorted(origins))}" if origins else "written by this node"
        self._apply_credentials(registry.update(found), why)

    def _apply_credentials(self, diff: Any, why: str) -> None:
        if not diff:
            return
        self.counters["credentials_applied"] += (
            len(diff.added) + len(diff.removed) + len(diff.rotated)
        )
        log.info("shared devices %s: %s", why, diff.describe())
        for device_id in (*diff.removed, *diff.rotated):
            self.app.revoke(device_id)
        for device_id in diff.removed:
            self.app.forget_alarms(device_id)
        self.app.request_devices_cache_save()  # in the background: this task goes on

    def _bad_credentials(self, problems: list[str]) -> None:
        for problem in problems:
            self.counters["bad_entries"] += 1
            self.rlog.warning(
                "bad_credential", trio.current_time(), "redis: shared devices: %s", problem
            )

    def publish_command_refused(self, doc: dict[str, Any], code: str, message: str) -> None:
        update = CommandUpdate(
            self.app.wall(), doc["device"], doc["id"], doc["name"], "failed", None,
            f"{code}: {message}", doc.get("args"),
        )  # fmt: skip
        self._publish_event({"k": "cmd", **attrs.asdict(update), "incarnation": self.incarnation})

    async def aclose(self, budget: float) -> None:
        """On shutdown: send what is still owed, within `budget` seconds."""
        with trio.move_on_after(budget):
            while self.outbox.entries and self.redis_up:
                self.outbox.drained = trio.Event()
                await self.outbox.drained.wait()
            if self._credentials_owed and self.redis_up:
                with contextlib.suppress(Exception):  # failed: they stay owed, and are named
                    await self._write_owed_credentials()
        if self.outbox.entries:
            log.warning(
                "cluster: %d entries for the bus not sent at shutdown", len(self.outbox.entries)
            )
        if self._credentials_owed:
            log.warning(
                "cluster: %d changes to the shared devices not written to Redis at shutdown "
                "(this node's devices file has them)",
                len(self._credentials_owed),
            )


def _first(group: BaseExceptionGroup) -> Any:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _RedisFailed(Exception):
    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(what)
        self.what = what
        self.cause = cause


def _is_link_error(exc: BaseException) -> bool:
    """An entry's error reply that is about the connection or the server's state (try again
    on a new link), not about the entry (count it, log it, go on: sending it again would fail
    again and wedge the bus)."""
    import coredis.exceptions as e

    if isinstance(exc, e.ResponseError) and not isinstance(
        exc, e.ReadOnlyError | e.BusyLoadingError | e.TryAgainError
    ):
        return False
    return _is_redis_error(exc)


def _is_redis_error(exc: BaseException) -> bool:
    import coredis.exceptions

    if isinstance(exc, BaseExceptionGroup):
        return all(_is_redis_error(e) for e in exc.exceptions)
    return isinstance(
        exc,
        coredis.exceptions.RedisError
        | OSError
        | TimeoutError
        | trio.TooSlowError
        | trio.BrokenResourceError,
    )


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:200]


def default_node_name() -> str:
    import re

    name = socket.gethostname().split(".")[0] or "node"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:40]


def wall_ms() -> int:
    return int(time.time() * 1000)
