"""Playing recordings back: into a collector as sensors, or as a stand-in collector.

`replay_into()` registers every recorded device again and resends what it recorded, readings
and heartbeats, at the recorded times scaled by a speed factor. Devices leave as they left:
a goodbye where the recording says `closed`, silence where it says `timeout`. Replayed into a
collector on the same (virtual) clock, it reproduces the original run's session events exactly.

`Playback` drives a collector's stream hub from a recording instead of from sensors, on a
virtual clock that can be paused, sought and sped up: dashboards see the recorded devices,
values and online/offline transitions as they were.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import fnmatch
import logging
import math
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import attrs
import trio

from collector.core.events import CommandUpdate, DeviceOffline, DeviceOnline, Telemetry
from collector.device.client import (
    AckTimeout,
    DeviceClient,
    SessionEnded,
    open_device,
    open_udp_device,
)
from collector.wire.recording import (
    EventRecord,
    HeartbeatRecord,
    ReadingsRecord,
    Record,
    RecordType,
)
from collector.wire.replay_window import LATE, ReplayWindow

if TYPE_CHECKING:
    from collector.app import Collector

log = logging.getLogger("collector.playback")

TIMELINE_TYPES = (ReadingsRecord, HeartbeatRecord)


def select(
    records: Iterable[Record],
    *,
    start: float | None = None,
    end: float | None = None,
    devices: Sequence[str] | None = None,
) -> list[Record]:
    """The records to play: within [start, end) (recording time) and for matching devices.

    A device that was online when `start` falls gets an ONLINE record at `start` (with the
    transport and address of its session then), so that playing from the middle works.
    """
    out: list[Record] = []
    online_before: dict[str, EventRecord] = {}
    started = start is None
    for r in records:
        device = getattr(r, "device_id", None)
        if (
            devices
            and device is not None
            and not any(fnmatch.fnmatchcase(device, p) for p in devices)
        ):
            continue
        if not started:
            if r.time < start:  # type: ignore[operator]
                if isinstance(r, EventRecord) and device is not None:
                    if r.type is RecordType.ONLINE:
                        online_before[device] = r
                    elif r.type is RecordType.OFFLINE:
                        online_before.pop(device, None)
                continue
            started = True
            out.extend(
                EventRecord(start, RecordType.ONLINE, {**e.data, "resumed": True})  # type: ignore[arg-type]
                for _, e in sorted(online_before.items())
            )
        if end is not None and r.time >= end:
            break
        if isinstance(r, ReadingsRecord | HeartbeatRecord) or (
            isinstance(r, EventRecord)
            and r.type in (RecordType.ONLINE, RecordType.OFFLINE, RecordType.COMMAND)
        ):
            out.append(r)
    return out


# -- into a collector, as sensors --------------------------------------------------------------


@attrs.define
class ReplaySummary:
    devices: int = 0
    datagrams: int = 0  # readings and heartbeat datagrams sent
    readings: int = 0
    acked: int = 0
    ack_timeouts: int = 0
    sessions: int = 0
    errors: int = 0
    elapsed: float = 0.0
    recorded_span: float = 0.0
    lateness: list[float] = attrs.field(factory=list)  # seconds each send was behind schedule

    @property
    def rate(self) -> float:
        return self.datagrams / self.elapsed if self.elapsed > 0 else 0.0

    def lateness_ms(self, q: float) -> float:
        if not self.lateness:
            return float("nan")
        ordered = sorted(self.lateness)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000

    def summary(self) -> str:
        return (
            f"replayed {self.devices} devices, {self.sessions} sessions: sent {self.datagrams} datagrams "
            f"({self.readings} readings), acknowledged {self.acked}"
            + (f", {self.ack_timeouts} not acknowledged" if self.ack_timeouts else "")
            + f"; {self.elapsed:.2f}s for {self.recorded_span:.2f}s recorded, "
            f"{self.rate:.0f} datagrams/s; "
            + (
                f"lateness p50 {self.lateness_ms(50):.2f} ms, "
                f"p99 {self.lateness_ms(99):.2f} ms, max {self.lateness_ms(100):.2f} ms"
                if self.lateness
                else "nothing was sent"
            )
            + (f"; {self.errors} errors" if self.errors else "")
        )


async def replay_into(
    records: Sequence[Record],
    secrets: Mapping[str, str],
    *,
    host: str = "127.0.0.1",
    tcp_port: int = 8080,
    udp_port: int = 8081,
    speed: float = 1.0,
    ack: bool = False,
    on_sent: Callable[[int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> ReplaySummary:
    """Resend `records` as their devices, keeping the recorded timing divided by `speed`
    (math.inf: as fast as possible). Returns what was sent."""
    summary = ReplaySummary()
    timeline = [r for r in records if isinstance(r, TIMELINE_TYPES) or isinstance(r, EventRecord)]
    if not timeline:
        return summary
    t0 = timeline[0].time
    summary.recorded_span = timeline[-1].time - t0
    per_device: dict[str, list[Record]] = collections.defaultdict(list)
    for r in timeline:
        device = getattr(r, "device_id", None)
        if device is not None:
            per_device[device].append(r)
    missing = sorted(d for d in per_device if d not in secrets)
    if missing:
        raise ValueError(f"no credentials for {len(missing)} recorded devices, e.g. {missing[0]!r}")
    summary.devices = len(per_device)
    start = trio.current_time()

    def due(r: Record) -> float:
        return start + (r.time - t0) / speed if math.isfinite(speed) else start

    async def device_task(device_id: str, items: list[Record]) -> None:
        async with AsyncExitStack() as stack:
            client: DeviceClient | None = None
            session_stack: AsyncExitStack | None = None
            silent = False
            seen_event = False

            async def leave(until: float = math.inf) -> None:
                # Close the connection without a goodbye (any goodbye was sent explicitly).
                # A device that fell silent keeps its TCP connection until the collector ends
                # the session itself (it says goodbye then): closing first would be `closed`.
                # But never past `until`, when the device's next record is due: the timeline
                # goes on, whatever the collector's own timeout is.
                nonlocal client, session_stack, silent
                if silent and client is not None and client.end_reason is None and client.is_tcp:
                    with trio.move_on_at(min(until, trio.current_time() + client.timeout + 1.0)):
                        await client.ended.wait()
                if session_stack is not None:
                    await session_stack.aclose()
                client, session_stack, silent = None, None, False

            async def register(transport: str | None) -> None:
                nonlocal client, session_stack, silent
                client, silent = None, False
                session_stack = AsyncExitStack()
                try:
                    client = await session_stack.enter_async_context(
                        _open(
                            transport,
                            device_id,
                            secrets[device_id],
                            host,
                            tcp_port,
                            udp_port,
                            ssl_context,
                        )
                    )
                    summary.sessions += 1
                except Exception as exc:
                    summary.errors += 1
                    log.warning("replay: %s could not register: %s", device_id, exc)
                    session_stack, client = None, None

            for r in items:
                target = due(r)
                if math.isfinite(speed):
                    await trio.sleep_until(target)
                if isinstance(r, EventRecord) and r.type in (RecordType.ONLINE, RecordType.OFFLINE):
                    seen_event = True
                if isinstance(r, EventRecord) and r.type is RecordType.ONLINE:
                    if session_stack is not None:
                        # The previous session ended on the collector's side (timeout, kick) or
                        # is superseded by this registration, as it was when recorded: its
                        # connection is no longer needed, but closing it must not say goodbye.
                        if client is not None and client.end_reason is None and not silent:
                            stack.push_async_callback(session_stack.aclose)  # superseded: later
                            session_stack = None
                        else:
                            await leave(target)
                    await register(r.data.get("transport"))
                elif isinstance(r, EventRecord) and r.type is RecordType.OFFLINE:
                    reason = r.data.get("reason")
                    if reason == "closed" and client is not None:
                        try:
                            await client.goodbye()
                        except (OSError, trio.BrokenResourceError, SessionEnded):
                            pass
                        await leave()
                    elif reason != "superseded":
                        # timeout, kicked, shutdown, collector_restart: the collector ended it;
                        # the device just falls silent (closing now could race the collector's
                        # own ending). Faster than recorded, the collector's timeout would come
                        # too late for the timeline: then the device leaves at once.
                        silent = True
                        if speed > 1:
                            await leave(target)
                elif isinstance(r, ReadingsRecord | HeartbeatRecord):
                    if client is None and not seen_event:
                        # A recording that starts with the device already online (one made
                        # from a stream, say): register it now.
                        await register("tcp")
                        seen_event = True
                    if client is None or client.end_reason is not None or silent:
                        continue
                    summary.lateness.append(max(0.0, trio.current_time() - target))
                    try:
                        if isinstance(r, ReadingsRecord):
                            await client.send_readings(list(r.readings), ack=ack)
                            summary.readings += len(r.readings)
                            if ack:
                                summary.acked += 1
                        else:
                            await client.send_heartbeat(ack=ack)
                            if ack:
                                summary.acked += 1
                        summary.datagrams += 1
                        if on_sent is not None:
                            on_sent(1)
                    except AckTimeout:
                        summary.ack_timeouts += 1
                        summary.datagrams += 1
                    except (OSError, SessionEnded) as exc:
                        summary.errors += 1
                        log.debug("replay: %s: %s", device_id, exc)
            if client is not None and client.end_reason is None and not silent:
                # The selected range ends with the session still on: a goodbye that says the
                # last sequence number, so the datagrams still on their way are waited for.
                with contextlib.suppress(OSError, trio.BrokenResourceError, SessionEnded):
                    await client.goodbye()
            await leave()

    async with trio.open_nursery() as nursery:
        for device_id, items in per_device.items():
            nursery.start_soon(device_task, device_id, items, name=f"replay {device_id}")
    summary.elapsed = trio.current_time() - start
    return summary


def _open(
    transport: str | None,
    device_id: str,
    secret: str,
    host: str,
    tcp_port: int,
    udp_port: int,
    ssl_context: ssl.SSLContext | None = None,
) -> Any:
    if transport == "udp":
        return open_udp_device(
            host,
            device_id,
            secret,
            udp_port=udp_port,
            heartbeat=False,
            say_goodbye=False,
        )
    return open_device(
        host,
        device_id,
        secret,
        tcp_port=tcp_port,
        udp_port=udp_port,
        heartbeat=False,
        say_goodbye=False,
        ssl_context=ssl_context,
    )


# -- as a stand-in collector ------------------------------------------------------------------


class Playback:
    """Feeds a collector's hub from a recording, on a virtual clock with pause, seek and speed.

    Construct the Collector with `wall=playback.now` so every time it shows is recording time.
    """

    def __init__(
        self, records: Sequence[Record], *, speed: float = 1.0, loop: bool = False
    ) -> None:
        self.records = [r for r in records if isinstance(r, (*TIMELINE_TYPES, EventRecord))]
        if not self.records:
            raise ValueError("the recording holds nothing to play")
        self.times = [r.time for r in self.records]
        self.start = self.times[0]
        self.end = self.times[-1]
        self.speed = speed
        self.loop = loop
        self.paused = False
        self.index = 0
        self.loops = 0
        self._anchor_real = 0.0  # trio time when the virtual clock was at _anchor_virtual
        self._anchor_virtual = self.start
        self._wake = trio.Event()
        self.app: Collector | None = None
        self.device_ids = sorted({d for r in self.records if (d := getattr(r, "device_id", None))})
        self._windows: dict[str, ReplayWindow] = {}  # per device, for the loss

    def attach(self, app: Collector) -> None:
        """Make `app` (created with `wall=self.now`, `ingest=False`) serve this recording."""
        self.app = app
        app.playback = self
        app.commands.stop_accepting("replay_mode", "commands cannot be sent to a recording")

    # the virtual clock

    def now(self) -> float:
        if self.paused or self._anchor_real == 0.0:
            return self._anchor_virtual
        return self._anchor_virtual + (trio.current_time() - self._anchor_real) * self.speed

    def _reanchor(self, virtual: float) -> None:
        self._anchor_virtual = virtual
        self._anchor_real = trio.current_time()
        if not self._wake.is_set():
            self._wake.set()

    def status(self) -> dict[str, Any]:
        return {
            "mode": "replay",
            "position": self.now(),
            "start": self.start,
            "end": self.end,
            "speed": self.speed,
            "paused": self.paused,
            "loop": self.loop,
            "loops": self.loops,
            "records": len(self.records),
            "index": self.index,
        }

    # controls (from the HTTP API)

    def pause(self) -> None:
        if not self.paused:
            self._reanchor(self.now())
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._reanchor(self._anchor_virtual)

    def set_speed(self, speed: float) -> None:
        if not (0 < speed <= 1000):
            raise ValueError("speed must be in (0, 1000]")
        self._reanchor(self.now())
        self.speed = speed

    def seek(self, position: float) -> None:
        position = min(max(position, self.start), self.end)
        assert self.app is not None
        _reset_view(self.app)
        self.index = bisect.bisect_left(self.times, position)
        for r in self.records[: self.index]:
            self._apply(r, quiet=True)
        self._reanchor(position)
        for sub in list(self.app.hub.subscribers):  # everybody resyncs from a fresh snapshot
            if sub.matcher is not None:
                sub.resync = True
                sub._wake()

    # driving

    async def run(self, app: Collector) -> None:
        self.app = app
        self._reanchor(self.start)
        while True:
            while self.index < len(self.records):
                r = self.records[self.index]
                if self.paused or r.time > self.now():
                    # (the clock may have passed the record while this line ran: never negative)
                    wait = math.inf if self.paused else max(0.0, (r.time - self.now()) / self.speed)
                    with trio.move_on_after(wait):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    continue
                self._apply(r, quiet=False)
                self.index += 1
            if not self.loop:
                await trio.sleep_forever()
            self.loops += 1
            _reset_view(app)
            self.index = 0
            self._reanchor(self.start)

    def _apply(self, r: Record, *, quiet: bool) -> None:
        app = self.app
        assert app is not None
        registry = app.registry
        if isinstance(r, ReadingsRecord | HeartbeatRecord):
            state = registry.device(r.device_id)
            state.datagrams += 1
            state.last_seen = r.time
            # The loss the recording shows: the gaps in each session's sequence numbers, as the
            # collector counted them when it recorded (docs/RECORDING.md).
            window = self._windows.get(r.device_id)
            if window is None:
                window = self._windows[r.device_id] = ReplayWindow()
            gap = window.update(r.seq) if r.seq else 0
            if gap > 0:
                state.lost += gap
            elif gap == LATE:
                state.lost -= 1
                state.out_of_order += 1
            if isinstance(r, ReadingsRecord):
                state.readings += len(r.readings)
                app.hub.on_telemetry(
                    [Telemetry(r.time, r.device_id, r.seq, r.device_time_us, r.readings)]
                )
            return
        if not isinstance(r, EventRecord) or r.device_id is None:
            return
        device_id = r.device_id
        state = registry.device(device_id)
        if r.type is RecordType.ONLINE:
            from collector.core.sessions import Session

            self._windows.pop(device_id, None)  # a new session numbers from 1 again

            session = Session(
                session_id=int(r.data.get("session_id") or 0),
                device=state,
                aead_in=None,
                aead_out=None,
                transport=str(r.data.get("transport") or "tcp"),
                timeout=math.inf,
                scope=trio.CancelScope(),
                window=ReplayWindow(),
                opened_at=trio.current_time(),
                opened_wall=r.time,
                tcp_peer=r.data.get("address"),
            )
            state.session = session
            state.sessions += 1
            state.online_since = r.time
            state.offline_since = state.offline_reason = None
            state.address = r.data.get("address")
            registry.online[device_id] = session
            event: Any = DeviceOnline(
                r.time, device_id, session.session_id, session.transport, state.address
            )
        elif r.type is RecordType.OFFLINE:
            state.session = None
            state.online_since = None
            state.offline_since = r.time
            state.offline_reason = r.data.get("reason")
            registry.online.pop(device_id, None)
            event = DeviceOffline(
                r.time,
                device_id,
                int(r.data.get("session_id") or 0),
                str(r.data.get("reason")),
                float(r.data.get("duration") or 0),
            )
        elif r.type is RecordType.COMMAND:
            d = r.data
            event = CommandUpdate(
                r.time,
                device_id,
                str(d.get("id")),
                str(d.get("name")),
                str(d.get("state")),
                d.get("result"),
                d.get("error"),
            )
        else:
            return
        if not quiet:
            app.hub.on_event(event)


def _reset_view(app: Collector) -> None:
    if app.playback is not None:
        app.playback._windows.clear()
    app.registry.devices.clear()
    app.registry.online.clear()
    app.hub.views.clear()
