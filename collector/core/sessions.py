"""Device sessions: one Trio task per session, owning a cancel scope whose deadline is liveness.

Every authenticated datagram or control message from the device pushes the deadline forward
(`touch`). When the deadline passes, trio cancels the scope and the session ends with reason
`timeout`: offline detection is an event, not a sweep. Every other ending (`closed`,
`superseded`, `kicked`, `shutdown`) goes through `end()`, which records the reason first.

Per-device state (`DeviceState`) outlives sessions, so counts accumulate across reconnects.
"""

from __future__ import annotations

import collections
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from collector.cluster.steering import session_id_for
from collector.core.events import DeviceOffline, DeviceOnline, Event, format_address
from collector.core.ratelimit import FlappingDetector
from collector.wire.crypto import Aead
from collector.wire.replay_window import ReplayWindow

if TYPE_CHECKING:
    from collector.core.commands import CommandRecord
    from collector.wire.control import Message

log = logging.getLogger("collector.sessions")

#: A pushed deadline is set a little further than needed (a twentieth of the timeout, at most
#: half a second), so that a busy device does not move trio's deadline heap on every datagram:
#: only when the deadline would otherwise lag by more than that. Offline detection therefore
#: fires between `timeout` and `timeout + slack` after the last datagram, never earlier.
MAX_DEADLINE_SLACK = 0.5


def deadline_slack(timeout: float) -> float:
    return min(MAX_DEADLINE_SLACK, timeout / 20)


HISTORY = 16


@attrs.frozen
class SessionRecord:
    """One finished session, kept in a short per-device history."""

    session_id: int
    transport: str
    opened: float  # wall clock
    closed: float
    reason: str


@attrs.define(eq=False)
class DeviceState:
    """What the collector knows about one device, across its sessions."""

    device_id: str
    datagrams: int = 0  # accepted (authenticated, new, well-formed)
    readings: int = 0
    lost: int = 0  # sequence numbers skipped and not (yet) filled in
    duplicates: int = 0  # authenticated but already seen: retransmissions, duplicates, replays
    out_of_order: int = 0  # arrived after a higher sequence number, within the window
    malformed: int = 0  # authenticated but with a payload that does not decode
    metrics_refused: int = 0  # readings of metric names beyond [limits] max_metrics_per_device
    address_changes: int = 0
    sessions: int = 0
    address: str | None = None
    last_seen: float | None = None  # wall clock of the last accepted datagram or message
    online_since: float | None = None  # wall clock, None while offline
    offline_since: float | None = None
    offline_reason: str | None = None
    session: Session | None = None
    #: the last HISTORY sessions, oldest first. A list trimmed by hand rather than a
    #: deque(maxlen=HISTORY): an empty deque is 760 bytes (it allocates a block of 64 slots),
    #: an empty list 56, and there is one per device.
    history: list[SessionRecord] = attrs.field(factory=list)


@attrs.define(eq=False)
class Session:
    session_id: int
    device: DeviceState
    aead_in: Any  # ChaCha20-Poly1305 under the device-to-collector key (None: a replayed session)
    _aead_out: Any = attrs.field(alias="aead_out")  # see `aead_out`
    transport: str  # "tcp" (registered on the control channel) or "udp" (HELLO)
    timeout: float
    scope: trio.CancelScope
    window: ReplayWindow
    opened_at: float  # trio clock
    opened_wall: float
    address: Any = None  # the device's UDP source address, once known
    tcp_peer: str | None = None
    deadline: float = 0.0  # mirrors scope.deadline, read on the hot path without the property
    slack: float = 0.0  # see deadline_slack()
    out_seq: int = 0  # collector -> device datagram sequence numbers
    end_reason: str | None = None
    #: see `ended`: made only when somebody waits for the end (about 270 bytes a session)
    _ended: trio.Event | None = attrs.field(default=None, init=False)
    _finished: bool = attrs.field(default=False, init=False)
    outbox: trio.MemorySendChannel[Message] | None = None  # TCP control messages
    #: the device said goodbye and that its last datagram had this sequence number: the
    #: session stays open for the datagrams up to it for a short linger (see goodbye())
    goodbye_seq: int | None = None
    udp_commands: dict[int, CommandRecord] = attrs.field(factory=dict)  # by datagram seq
    #: the collector-to-device key, when `aead_out` is to be built from it on demand
    key_out: bytes | None = None
    _out_used: bool = attrs.field(default=False, init=False)

    @property
    def device_id(self) -> str:
        return self.device.device_id

    @property
    def active(self) -> bool:
        return self.end_reason is None

    @property
    def aead_out(self) -> Any:
        """ChaCha20-Poly1305 under the collector-to-device key (None: a replayed session).

        Built from `key_out` when asked for, and kept from its second use on. An AEAD object
        holds about 2.2 kB of OpenSSL cipher context, and a UDP device that only sends needs
        this one once, for its WELCOME; one that gets ACKs, commands or a goodbye keeps it."""
        aead = self._aead_out
        if aead is None and self.key_out is not None:
            aead = Aead(self.key_out)
            if self._out_used:
                self._aead_out = aead
            self._out_used = True
        return aead

    @property
    def ended(self) -> trio.Event:
        """Set once the session has ended. Made on first use: most sessions (UDP devices that
        never get a command) are never waited for, and an Event with its set of waiting tasks
        would be one of the larger parts of a session."""
        event = self._ended
        if event is None:
            event = self._ended = trio.Event()
            if self._finished:
                event.set()
        return event

    def next_out_seq(self) -> int:
        self.out_seq += 1
        return self.out_seq


class SessionRegistry:
    """All devices and their live sessions; runs the session tasks in its own nursery."""

    def __init__(
        self,
        *,
        timeout: float,
        max_devices: int,
        window_blocks: int,
        wall: Callable[[], float],
        emit: Callable[[Event], None],
        flapping: FlappingDetector | None = None,
    ) -> None:
        self.timeout = timeout
        #: registrations per device in a window: a device that registers in a loop is banned
        self.flapping = flapping or FlappingDetector(max_count=20, window=60.0, ban=120.0)
        self.max_devices = max_devices
        self.window_blocks = window_blocks
        self.wall = wall
        self.emit = emit
        self.devices: dict[str, DeviceState] = {}
        self.by_id: dict[int, Session] = {}
        self.online: dict[str, Session] = {}
        self.opened = 0
        self.ended_by_reason: collections.Counter[str] = collections.Counter()
        #: (this worker's index, the number of workers): see new_session_id
        self.share: tuple[int, int] = (0, 1)
        self._nursery: trio.Nursery | None = None
        self._online_waiters: dict[str, trio.Event] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def device(self, device_id: str) -> DeviceState:
        d = self.devices.get(device_id)
        if d is None:
            d = self.devices[device_id] = DeviceState(device_id)
        return d

    def can_open(self, device_id: str) -> bool:
        return device_id in self.online or len(self.online) < self.max_devices

    def open(
        self,
        device_id: str,
        keys: tuple[bytes, bytes] | None,
        transport: str,
        *,
        address: Any = None,
        tcp_peer: str | None = None,
        session_id: int | None = None,
    ) -> Session:
        """Start a session (superseding the device's current one). Synchronous: never waits."""
        assert self._nursery is not None, "SessionRegistry.serve() is not running"
        old = self.online.get(device_id)
        if old is not None:
            if old.goodbye_seq is not None:  # it said goodbye and was lingering: closed
                self._count_missing(old)
                self.end(old, "closed")
            else:
                self.end(old, "superseded")
        now = trio.current_time()
        wall = self.wall()
        sid = session_id if session_id is not None else self.new_session_id()
        slack = deadline_slack(self.timeout)
        deadline = now + self.timeout + slack
        device = self.device(device_id)
        session = Session(
            session_id=sid,
            device=device,
            aead_in=Aead(keys[0]) if keys else None,
            aead_out=None,
            key_out=keys[1] if keys else None,
            transport=transport,
            timeout=self.timeout,
            scope=trio.CancelScope(deadline=deadline),
            window=ReplayWindow(self.window_blocks),
            opened_at=now,
            opened_wall=wall,
            address=address,
            tcp_peer=tcp_peer,
            deadline=deadline,
            slack=slack,
        )
        self.by_id[sid] = session
        self.online[device_id] = session
        self.opened += 1
        device.session = session
        device.sessions += 1
        device.online_since = wall
        device.offline_since = None
        device.offline_reason = None
        device.last_seen = wall
        shown = format_address(address) if address is not None else tcp_peer
        if shown is not None:
            device.address = shown
        self._nursery.start_soon(self._run, session, name=f"session {device_id} {sid}")
        log.info("session %d opened: device %s over %s from %s", sid, device_id, transport, shown)
        self.emit(DeviceOnline(wall, device_id, sid, transport, shown))
        waiter = self._online_waiters.pop(device_id, None)
        if waiter is not None:
            waiter.set()
        return session

    def new_session_id(self) -> int:
        """A random session id in this process's share: with N worker processes, worker i hands
        out only ids with `sid % N == i`, the ones the kernel steers to its socket."""
        worker, workers = self.share
        while True:
            sid = session_id_for(worker, workers, secrets.randbits(32))
            if sid and sid not in self.by_id:
                return sid

    def touch(self, session: Session, now: float) -> None:
        """Push the session's deadline: the device just proved it is alive."""
        if session.goodbye_seq is not None:
            return  # lingering after a goodbye: the linger's deadline stands
        deadline = now + session.timeout
        if deadline > session.deadline:
            session.deadline = deadline + session.slack
            session.scope.deadline = session.deadline

    def end(self, session: Session, reason: str) -> None:
        if session.end_reason is not None:
            return
        session.end_reason = reason
        session.scope.cancel(reason)
        self._finish(session)

    def goodbye(self, session: Session, last_seq: int | None, linger: float) -> None:
        """The device ends its session; its last datagram had sequence number `last_seq`.

        A goodbye can overtake the datagrams sent before it (TCP and UDP take different paths,
        and a datagram can be reordered behind a GOODBYE datagram). So unless every number up
        to `last_seq` has arrived, the session stays open for those datagrams for `linger`
        seconds, then ends `closed`, and what never arrived is counted as lost."""
        if session.end_reason is not None:
            return
        if last_seq is None or session.window.complete_up_to(last_seq):
            self.end(session, "closed")
            return
        session.goodbye_seq = last_seq
        session.deadline = trio.current_time() + linger
        session.scope.deadline = session.deadline
        log.debug(
            "session %d: goodbye after seq %d, lingering %.1fs for what is still on its way",
            session.session_id,
            last_seq,
            linger,
        )

    @staticmethod
    def _count_missing(session: Session) -> None:
        """After a goodbye: the datagrams up to its last sequence number that never came are
        lost (those below the highest that arrived are counted already, as gaps)."""
        assert session.goodbye_seq is not None
        missing = session.goodbye_seq - session.window.top
        if missing > 0:
            session.device.lost += missing

    def end_all(self, reason: str) -> int:
        sessions = list(self.online.values())
        for s in sessions:
            self.end(s, reason)
        return len(sessions)

    def kick(self, device_id: str) -> bool:
        session = self.online.get(device_id)
        if session is None:
            return False
        self.end(session, "kicked")
        return True

    async def wait_online(self, device_id: str) -> Session:
        """Wait until the device has a live session, and return it."""
        while True:
            session = self.online.get(device_id)
            if session is not None:
                return session
            waiter = self._online_waiters.get(device_id)
            if waiter is None:
                waiter = self._online_waiters[device_id] = trio.Event()
            await waiter.wait()

    async def _run(self, session: Session) -> None:
        try:
            with session.scope:
                await trio.sleep_forever()
        finally:
            if session.end_reason is None:
                if session.goodbye_seq is not None and session.scope.cancelled_caught:
                    # The linger after a goodbye ran out: what never came is lost.
                    self._count_missing(session)
                    session.end_reason = "closed"
                else:
                    session.end_reason = "timeout" if session.scope.cancelled_caught else "shutdown"
            self._finish(session)

    def _finish(self, session: Session) -> None:
        if session._finished:
            return
        session._finished = True
        if session._ended is not None:
            session._ended.set()
        reason = session.end_reason or "shutdown"
        self.by_id.pop(session.session_id, None)
        device = session.device
        if self.online.get(device.device_id) is session:
            del self.online[device.device_id]
            device.session = None
            device.online_since = None
        wall = self.wall()
        duration = trio.current_time() - session.opened_at
        device.offline_since = wall
        device.offline_reason = reason
        history = device.history
        history.append(
            SessionRecord(session.session_id, session.transport, session.opened_wall, wall, reason)
        )
        if len(history) > HISTORY:
            del history[0]
        self.ended_by_reason[reason] += 1
        if session.outbox is not None:
            session.outbox.close()
        log.info(
            "session %d ended: device %s offline (%s) after %.1fs",
            session.session_id,
            device.device_id,
            reason,
            duration,
        )
        self.emit(DeviceOffline(wall, device.device_id, session.session_id, reason, duration))
