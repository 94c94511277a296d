r"""Server-to-device commands and their life cycle.

    queued --> sent --> acked        (the device ran it; `result` holds its answer)
       |         \----> failed       (the device reported an error, or its session ended)
       |          \---> timed_out    (no answer within `timeout` of the first send)
       \--------------> expired      (not sent within `expires_in`: the device never came online)

Over TCP a command is one `command` line, answered by one `ack` line. Over UDP it is a COMMAND
datagram with ACK_REQUESTED, retransmitted (same bytes, same sequence number) with capped
exponential backoff until the device's ACK arrives or the command times out.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import trio

from collector.core.boundary import ErrorBoundary
from collector.core.events import CommandUpdate, Event
from collector.wire import control
from collector.wire.crypto import COLLECTOR_TO_DEVICE
from collector.wire.datagram import (
    MAX_DATAGRAM,
    DatagramType,
    Flag,
    encode_command_payload,
    seal_datagram,
)
from collector.wire.jsonio import dumps_bytes

if TYPE_CHECKING:
    from collector.core.sessions import Session, SessionRegistry

log = logging.getLogger("collector.commands")

FINAL_STATES = frozenset({"acked", "failed", "timed_out", "expired"})
KEEP_FINISHED = 1000


class CommandError(Exception):
    """A command could not be accepted (unknown device, queue full, collector stopping)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.define(eq=False)
class CommandRecord:
    id: str
    device_id: str
    name: str
    args: Mapping[str, Any]
    timeout: float
    expires_at: float  # trio clock
    created: float  # wall clock
    state: str = "queued"
    updated: float = 0.0
    result: Any = None
    error: str | None = None
    attempts: int = 0
    transport: str | None = None
    done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


class CommandManager:
    def __init__(
        self,
        registry: SessionRegistry,
        *,
        known_device: Callable[[str], bool],
        send_datagram: Callable[[bytes, Any], bool],
        wall: Callable[[], float],
        emit: Callable[[Event], None],
        timeout: float,
        expiry: float,
        queue_limit: int,
        retransmit_initial: float,
        retransmit_max: float,
        max_args: int = 2048,
        max_datagram: int = MAX_DATAGRAM,
        boundary: ErrorBoundary | None = None,
    ) -> None:
        self.max_args = max_args
        self.max_datagram = max_datagram
        self.boundary = boundary or ErrorBoundary(trio.current_time)
        self.registry = registry
        self.known_device = known_device
        self.send_datagram = send_datagram
        self.wall = wall
        self.emit = emit
        self.timeout = timeout
        self.expiry = expiry
        self.queue_limit = queue_limit
        self.retransmit_initial = retransmit_initial
        self.retransmit_max = retransmit_max
        self.commands: dict[str, CommandRecord] = {}
        self.active_by_device: collections.Counter[str] = collections.Counter()
        self.by_state: collections.Counter[str] = collections.Counter()
        self.retransmits = 0
        self._finished: collections.deque[str] = collections.deque()
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._refusal: tuple[str, str] | None = None  # (code, message) while not accepting
        #: the cluster bus (collector.cluster.bus.ClusterBus): commands for a device whose
        #: session is on another node go there
        self.remote: Any = None
        self.id_prefix = ""  # with a cluster, the node's name: ids unique across nodes

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- API ---------------------------------------------------------------------------------

    def submit(
        self,
        device_id: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        expires_in: float | None = None,
        command_id: str | None = None,
    ) -> CommandRecord:
        """Queue a command (`command_id`: the id another node gave it, which forwarded it)."""
        if self._refusal is not None:
            raise CommandError(*self._refusal)
        if not self.known_device(device_id):
            raise CommandError("unknown_device", f"no device {device_id!r}")
        if not name or len(name) > 128:
            raise CommandError("bad_command", "a command needs a name of 1-128 characters")
        args = dict(args or {})
        try:
            size = len(dumps_bytes(args))
        except ValueError:  # not JSON (a bug of the caller: the HTTP API checks at its boundary)
            raise CommandError("bad_command", "command arguments must be JSON values") from None
        if size > self.max_args:
            raise CommandError(
                "too_large",
                f"command arguments are at most {self.max_args} bytes of JSON, not {size}",
            )
        if self.active_by_device[device_id] >= self.queue_limit:
            raise CommandError(
                "queue_full", f"device {device_id!r} already has {self.queue_limit} open commands"
            )
        assert self._nursery is not None, "CommandManager.serve() is not running"
        now = trio.current_time()
        cmd = CommandRecord(
            id=command_id or f"{self.id_prefix}c{next(self._ids):06d}",
            device_id=device_id,
            name=name,
            args=args,
            timeout=self.timeout if timeout is None else timeout,
            expires_at=now + (self.expiry if expires_in is None else expires_in),
            created=self.wall(),
        )
        self.commands[cmd.id] = cmd
        self.active_by_device[device_id] += 1
        self._set_state(cmd, "queued")
        self._nursery.start_soon(self._drive, cmd, name=f"command {cmd.id}")
        return cmd

    def get(self, command_id: str) -> CommandRecord | None:
        return self.commands.get(command_id)

    def for_device(self, device_id: str) -> list[CommandRecord]:
        return [c for c in self.commands.values() if c.device_id == device_id]

    def stop_accepting(
        self, code: str = "shutting_down", message: str = "the collector is shutting down"
    ) -> None:
        self._refusal = (code, message)

    @property
    def in_flight(self) -> list[CommandRecord]:
        return [c for c in self.commands.values() if not c.final]

    async def wait_sent_finished(self) -> None:
        """Wait until no command is waiting for a device's answer (used on shutdown)."""
        for cmd in list(self.commands.values()):
            if cmd.state == "sent":
                await cmd.done.wait()

    def abandon(self, commands: list[CommandRecord], why: str) -> int:
        """Fail commands that were sent and will not get their answer (used on shutdown)."""
        n = 0
        for cmd in commands:
            if not cmd.final:
                self._finish(cmd, "failed", error=why)
                n += 1
        return n

    def expire_queued(self, why: str) -> int:
        n = 0
        for cmd in list(self.commands.values()):
            if cmd.state == "queued":
                self._finish(cmd, "expired", error=why)
                n += 1
        return n

    # -- answers from devices ------------------------------------------------------------------

    def on_tcp_ack(self, session: Session, ack: control.Ack) -> bool:
        cmd = self.commands.get(ack.id)
        if cmd is None or cmd.device_id != session.device_id or cmd.final:
            return False
        if ack.ok:
            self._finish(cmd, "acked", result=ack.result)
        else:
            self._finish(cmd, "failed", error=ack.error or "the device reported a failure")
        return True

    def on_udp_ack(
        self, session: Session, acked_seq: int, result: Mapping[str, Any] | None
    ) -> bool:
        cmd = session.udp_commands.pop(acked_seq, None)
        if cmd is None or cmd.final:
            return False
        body = result or {}
        if body.get("ok", True) is False:
            error = body.get("error")
            self._finish(
                cmd, "failed", error=str(error) if error else "the device reported a failure"
            )
        else:
            self._finish(cmd, "acked", result=body.get("result"))
        return True

    # -- driving one command -------------------------------------------------------------------

    async def _drive(self, cmd: CommandRecord) -> None:
        # The boundary of one command: a bug while driving it fails it, nothing else.
        try:
            await self._drive_unguarded(cmd)
        except Exception as exc:
            self.boundary.report("command", exc, f"{cmd.id} {cmd.name} to {cmd.device_id}")
            if not cmd.final:
                self._finish(cmd, "failed", error="internal error in the collector")
        finally:
            if not cmd.final:  # cancelled: the collector is stopping
                self._finish(cmd, "expired", error="the collector stopped")

    async def _drive_unguarded(self, cmd: CommandRecord) -> None:
        session: Session | None = None
        node: str | None = None
        with trio.move_on_at(cmd.expires_at):
            if self.remote is None:
                session = await self.registry.wait_online(cmd.device_id)
            else:
                session, node = await self._wait_anywhere(cmd.device_id)
        if cmd.final:
            return
        if node is not None:
            await self._drive_remote(cmd, node)
            return
        if session is None or not session.active:
            self._finish(cmd, "expired", error="the device did not come online in time")
            return
        cmd.transport = session.transport
        if session.transport == "tcp":
            await self._drive_tcp(cmd, session)
        else:
            await self._drive_udp(cmd, session)

    async def _wait_anywhere(self, device_id: str) -> tuple[Session | None, str | None]:
        """Wait until the device is online on this node (its session) or on another (the
        node's name), whichever comes first."""
        found: list[tuple[Session | None, str | None]] = []
        async with trio.open_nursery() as nursery:

            async def here() -> None:
                found.append((await self.registry.wait_online(device_id), None))
                nursery.cancel_scope.cancel()

            async def elsewhere() -> None:
                found.append((None, await self.remote.wait_online_elsewhere(device_id)))
                nursery.cancel_scope.cancel()

            nursery.start_soon(here)
            nursery.start_soon(elsewhere)
        return found[0]

    async def _drive_remote(self, cmd: CommandRecord, node: str) -> None:
        """The device's session is on another node: that node runs the command and reports its
        states on the bus, which come back here (finish_remote)."""
        cmd.transport = f"via {node}"
        remaining = max(0.0, cmd.expires_at - trio.current_time())
        self.remote.forward_command(cmd, node, remaining)
        try:
            with trio.move_on_after(remaining + cmd.timeout + 5.0):
                await cmd.done.wait()
            if not cmd.final:
                self._finish(cmd, "timed_out", error=f"no answer from node {node}")
        finally:
            self.remote.forwarded.pop(cmd.id, None)

    def finish_remote(
        self, cmd: CommandRecord, state: str, *, result: Any = None, error: str | None = None
    ) -> None:
        """A command run by another node reached a final state there."""
        self._finish(cmd, state, result=result, error=error)

    def mark_sent_remote(self, cmd: CommandRecord) -> None:
        if cmd.state == "queued":
            cmd.attempts += 1
            self._set_state(cmd, "sent")

    async def _drive_tcp(self, cmd: CommandRecord, session: Session) -> None:
        assert session.outbox is not None
        try:
            session.outbox.send_nowait(control.Command(cmd.id, cmd.name, cmd.args))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._finish(cmd, "failed", error="the device's control channel is full or closed")
            return
        cmd.attempts = 1
        self._set_state(cmd, "sent")
        await self._await_answer(cmd, session)

    async def _drive_udp(self, cmd: CommandRecord, session: Session) -> None:
        seq = session.next_out_seq()
        data = seal_datagram(
            session.aead_out,
            DatagramType.COMMAND,
            session.session_id,
            seq,
            int(self.wall() * 1e6),
            encode_command_payload(cmd.id, cmd.name, cmd.args),
            flags=Flag.ACK_REQUESTED,
            direction=COLLECTOR_TO_DEVICE,
        )
        if len(data) > self.max_datagram:
            self._finish(
                cmd,
                "failed",
                error=f"too large for a datagram to a UDP-only device ({len(data)} > {self.max_datagram} bytes)",
            )
            return
        session.udp_commands[seq] = cmd
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._retransmit, cmd, session, data)
                self._set_state(cmd, "sent")
                await self._await_answer(cmd, session)
                nursery.cancel_scope.cancel()
        finally:
            session.udp_commands.pop(seq, None)

    async def _retransmit(self, cmd: CommandRecord, session: Session, data: bytes) -> None:
        delay = self.retransmit_initial
        while True:
            if session.address is not None:
                self.send_datagram(data, session.address)
                cmd.attempts += 1
                if cmd.attempts > 1:
                    self.retransmits += 1
            await trio.sleep(delay)
            delay = min(delay * 2, self.retransmit_max)

    async def _await_answer(self, cmd: CommandRecord, session: Session) -> None:
        with trio.move_on_after(cmd.timeout):
            async with trio.open_nursery() as nursery:

                async def session_watch() -> None:
                    await session.ended.wait()
                    if not cmd.final:
                        self._finish(
                            cmd,
                            "failed",
                            error=f"the device's session ended ({session.end_reason}) before it answered",
                        )
                    nursery.cancel_scope.cancel()

                nursery.start_soon(session_watch)
                await cmd.done.wait()
                nursery.cancel_scope.cancel()
        if not cmd.final:
            self._finish(cmd, "timed_out", error=f"no answer within {cmd.timeout:g}s")

    # -- bookkeeping ---------------------------------------------------------------------------

    def _finish(
        self, cmd: CommandRecord, state: str, *, result: Any = None, error: str | None = None
    ) -> None:
        if cmd.final:
            return
        cmd.result = result
        cmd.error = error
        self._set_state(cmd, state)
        self.active_by_device[cmd.device_id] -= 1
        if self.active_by_device[cmd.device_id] <= 0:
            del self.active_by_device[cmd.device_id]
        cmd.done.set()
        self._finished.append(cmd.id)
        while len(self._finished) > KEEP_FINISHED:
            self.commands.pop(self._finished.popleft(), None)

    def _set_state(self, cmd: CommandRecord, state: str) -> None:
        cmd.state = state
        cmd.updated = self.wall()
        self.by_state[state] += 1
        level = logging.INFO if state != "failed" else logging.WARNING
        log.log(
            level,
            "command %s %s on %s: %s%s",
            cmd.id,
            cmd.name,
            cmd.device_id,
            state,
            f" ({cmd.error})" if cmd.error else "",
        )
        self.emit(
            CommandUpdate(
                cmd.updated,
                cmd.device_id,
                cmd.id,
                cmd.name,
                state,
                cmd.result,
                cmd.error,
                dict(cmd.args),
            )
        )


def command_json(c: CommandRecord) -> dict[str, Any]:
    """A command as the API and the stream show it."""
    return {
        "id": c.id,
        "device": c.device_id,
        "name": c.name,
        "args": dict(c.args),
        "state": c.state,
        "result": c.result,
        "error": c.error,
        "created": c.created,
        "updated": c.updated,
        "transport": c.transport,
        "attempts": c.attempts,
    }
