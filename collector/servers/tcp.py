"""The TCP control server: moves lines between sockets and `ControlConnection` objects.

Each connection handler is an error boundary: a misbehaving device gets an error line, the
connection is closed and counted, and nothing else is affected. The accept loop is not one: a
real bug there should crash loudly.
"""

from __future__ import annotations

import collections
import logging
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from collector.core.events import format_address
from collector.logs import RateLimitedLog
from collector.servers.serving import Acceptor, listen_tcp
from collector.servers.tls import accept_tls
from collector.wire import control, crypto
from collector.wire.control import encode_message

if TYPE_CHECKING:
    from collector.config import Config
    from collector.core.boundary import ErrorBoundary
    from collector.core.commands import CommandManager
    from collector.core.ingest import Ingest
    from collector.core.sessions import Session, SessionRegistry
    from collector.servers.tls import TlsContexts

log = logging.getLogger("collector.tcp")

RECEIVE_SIZE = 65536
GOODBYE_TIMEOUT = 2.0


class _Refused(Exception):
    """Close this connection after sending `error`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ControlHost(Protocol):
    """What the control server uses of the collector (`collector.app.Collector` is one)."""

    accepting: bool
    boundary: ErrorBoundary
    commands: CommandManager
    config: Config
    ingest: Ingest
    registry: SessionRegistry
    tls: TlsContexts | None
    udp_address: tuple[Any, ...] | None
    wall: Callable[[], float]

    def config_for(self, device_id: str) -> dict[str, Any]: ...


class ControlServer:
    def __init__(self, app: ControlHost) -> None:
        self.app = app
        self.config = app.config
        self.active = 0
        self.accepted = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.rlog = RateLimitedLog(log, self.config.log_rate_limit)
        self.acceptor = Acceptor()
        self.handlers_done = trio.Event()
        self.tls_port: int | None = None
        self.plaintext_address: tuple[Any, ...] | None = None
        self._registering: set[trio.CancelScope] = set()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        sock: socket.socket | None = None,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until `stop_accepting()`, then wait for the open ones to end."""
        listeners = await listen_tcp(port, host, "TCP", sock)
        address = listeners[0].socket.getsockname()
        self.tls_port = address[1] if self.app.tls is not None else None
        if self.app.tls is not None:
            log.info("TCP control channel on %s:%d (TLS)", address[0], address[1])
            extra = self.config.tls_plaintext_tcp_port
            if extra >= 0:
                plain = await listen_tcp(extra, host, "plain-text TCP")
                listeners += plain
                self.plaintext_address = plain[0].socket.getsockname()
                log.warning(
                    "PLAIN TEXT: the control channel is also on %s:%d without TLS ([tls] "
                    "plaintext_tcp_port): anyone on the path can read it",
                    *self.plaintext_address[:2],
                )
        else:
            log.warning(
                "PLAIN TEXT: TCP control channel on %s:%d without TLS: anyone on the path can "
                "read registrations, configuration and commands (set [tls] cert and key)",
                address[0],
                address[1],
            )
        try:
            await self.acceptor.serve(self.handle, listeners, task_status, address)
        finally:
            self.handlers_done.set()

    def stop_accepting(self) -> None:
        """Close the listeners, and refuse connections still waiting to register."""
        self.acceptor.stop()
        for scope in self._registering:
            scope.cancel()

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = format_address(stream.socket.getpeername())
            local_port = stream.socket.getsockname()[1]
        except OSError:  # already reset by the peer
            await trio.aclose_forcefully(stream)
            return
        started = trio.current_time()
        self.accepted += 1
        self.active += 1
        try:
            tls = self.app.tls
            if tls is not None and local_port == self.tls_port:
                if self.active > self.config.max_tcp_connections:
                    # No handshake for a connection over the limit: closed at once.
                    self.errors["too_many_connections"] += 1
                    await trio.aclose_forcefully(stream)
                    return
                try:
                    # The handshake counts toward the registration timeout.
                    stream = await accept_tls(stream, tls.control, self.config.registration_timeout)
                except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                    self.errors["tls_handshake"] += 1
                    self.rlog.warning(
                        "tls_handshake", trio.current_time(), "TLS handshake with %s failed: %s",
                        peer, exc.__cause__ or exc or type(exc).__name__,
                    )  # fmt: skip
                    await trio.aclose_forcefully(stream)
                    return
            await self._serve(stream, peer, started)
        finally:
            self.active -= 1

    async def _serve(self, stream: trio.abc.Stream, peer: str | None, started: float) -> None:
        conn = control.ControlConnection(control.Role.SERVER, max_line=self.config.max_line)
        session: Session | None = None
        outcome = "closed"
        try:
            async with stream:
                try:
                    if self.active > self.config.max_tcp_connections:
                        raise _Refused(
                            "too_many_connections",
                            f"the collector accepts at most {self.config.max_tcp_connections} connections",
                        )
                    log.info("connection from %s", peer)
                    session, outbox = await self._register(stream, conn, peer)
                    outcome = await self._run_registered(stream, conn, session, outbox)
                except (_Refused, control.ControlError) as exc:
                    outcome = exc.code
                    self.errors[exc.code] += 1
                    self.rlog.warning(
                        exc.code,
                        trio.current_time(),
                        "refused %s: %s (%s)",
                        peer,
                        exc.code,
                        exc.message,
                    )
                    await self._send_final_error(stream, conn, exc.code, exc.message)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            outcome = "broken"
            log.info("connection from %s broke: %s", peer, exc or type(exc).__name__)
        except trio.TooSlowError:
            outcome = "send timeout"
            self.errors["send_timeout"] += 1
        except Exception as exc:
            # The handler is an error boundary: a bug while serving one device closes that
            # connection (logged with its traceback, counted), never the collector.
            outcome = "internal error"
            self.errors["internal_error"] += 1
            self.app.boundary.report("control_message", exc, f"serving {peer}")
        finally:
            if session is not None and session.active:
                self.app.registry.end(session, "closed")
            log.info(
                "disconnect %s%s after %.1fs (%s)",
                peer,
                f" device {session.device_id}" if session else "",
                trio.current_time() - started,
                outcome,
            )

    async def _send_final_error(
        self, stream: trio.abc.Stream, conn: control.ControlConnection, code: str, message: str
    ) -> None:
        with trio.move_on_after(GOODBYE_TIMEOUT) as cs:
            cs.shield = True
            try:
                await stream.send_all(conn.send(control.Error(code, message)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _receive_event(
        self, stream: trio.abc.Stream, conn: control.ControlConnection
    ) -> control.Event:
        while True:
            event = conn.next_event()
            if not isinstance(event, control.NeedData):
                return event
            conn.receive_data(await stream.receive_some(RECEIVE_SIZE))

    async def _await_register(
        self, stream: trio.abc.Stream, conn: control.ControlConnection
    ) -> control.Register:
        """The device's `register` line, within the registration timeout; a shutdown ends the
        wait at once (connections that are not devices yet are not worth a grace period)."""
        with trio.CancelScope() as waiting:
            self._registering.add(waiting)
            try:
                with trio.move_on_after(self.config.registration_timeout):
                    event = await self._receive_event(stream, conn)
                    if isinstance(event, control.ConnectionClosed):
                        raise trio.BrokenResourceError("closed before registering")
                    if isinstance(event, control.Goodbye | control.Error):
                        raise trio.BrokenResourceError(f"{event.TYPE} before registering")
                    assert isinstance(event, control.Register)
                    return event
            finally:
                self._registering.discard(waiting)
        if waiting.cancelled_caught:
            raise _Refused("shutting_down", "the collector is shutting down")
        raise _Refused(
            "registration_timeout", f"no registration within {self.config.registration_timeout:g}s"
        )

    async def _register(
        self, stream: trio.abc.Stream, conn: control.ControlConnection, peer: str | None
    ) -> tuple[Session, trio.MemoryReceiveChannel[control.Message]]:
        app = self.app
        nonce = secrets.token_hex(16)
        await self._send(stream, conn.send(control.Challenge(nonce)))
        event = await self._await_register(stream, conn)
        keys = app.ingest.hello_keys(event.device_id)
        if keys is None or not crypto.check_registration_proof(
            keys.keys, event.device_id, nonce, event.cnonce, event.proof
        ):
            # One answer for unknown devices and wrong proofs: no device enumeration.
            raise _Refused("auth_failed", "unknown device or wrong proof")
        if not app.accepting:
            raise _Refused("shutting_down", "the collector is shutting down")
        if not app.registry.can_open(event.device_id):
            raise _Refused(
                "too_many_devices", f"at most {self.config.max_devices} devices may be online"
            )
        banned = app.registry.flapping.check(event.device_id, trio.current_time())
        if banned:
            raise _Refused(
                "banned",
                f"registered more than {self.config.flapping_max} times in "
                f"{self.config.flapping_window:g}s: try again in {banned:.0f}s",
            )
        registry = app.registry
        sid = registry.new_session_id()
        session_k = crypto.session_keys(
            keys.keys.secret,
            event.device_id,
            bytes.fromhex(nonce),
            bytes.fromhex(event.cnonce),
            sid,
        )
        welcome = control.Welcome(
            session_id=sid,
            udp_port=app.udp_address[1] if app.udp_address else self.config.udp_port,
            heartbeat_interval=self.config.heartbeat_interval,
            timeout=self.config.timeout,
            max_datagram=self.config.max_datagram,
            cipher=crypto.CIPHER,
            config=app.config_for(event.device_id),
        )
        data = conn.send(welcome)
        if len(data) > self.config.max_line:
            # The configuration that applies is too big for one line: the device would refuse
            # it. It registers without it (and an operator finds out from the log).
            self.errors["config_too_large"] += 1
            log.error(
                "configuration for %s is too large for the welcome line (%d > %d bytes): sent none",
                event.device_id,
                len(data),
                self.config.max_line,
            )
            data = encode_message(attrs.evolve(welcome, config={}))
        session = registry.open(event.device_id, session_k, "tcp", tcp_peer=peer, session_id=sid)
        send, receive = trio.open_memory_channel[control.Message](self.config.command_queue + 16)
        session.outbox = send
        await self._send(stream, data)
        return session, receive

    async def _run_registered(
        self,
        stream: trio.abc.Stream,
        conn: control.ControlConnection,
        session: Session,
        outbox: trio.MemoryReceiveChannel[control.Message],
    ) -> str:
        """Read from the device and write its outbox until the session ends, then say goodbye."""
        registry = self.app.registry
        outcome = "closed"
        # (code, message) of the error that ends the connection; not the exception itself,
        # whose traceback holds this frame, which holds the closure cell: a reference cycle.
        fatal: tuple[str, str] | None = None

        async def reader() -> None:
            nonlocal outcome, fatal
            try:
                outcome = await self._read_loop(stream, conn, session)
            except control.ControlError as exc:
                fatal, outcome = (exc.code, exc.message), exc.code
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                outcome = "broken"
            if session.goodbye_seq is None:  # not lingering for datagrams after a goodbye
                registry.end(session, "closed")  # no-op if the session already ended

        async def bounded_drain() -> None:
            # Once the session is over, the writer gets a short while to finish: a device that
            # stopped reading cannot hold its connection (or the shutdown) open.
            await session.ended.wait()
            await trio.sleep(GOODBYE_TIMEOUT)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(bounded_drain)
            try:
                async with outbox:
                    async for msg in outbox:  # ends when the session ends (it closes the outbox)
                        if conn.state is control.State.CLOSED:
                            # The device said goodbye: what is still queued for it (a config
                            # push, a command's answer) has no one to go to.
                            self.errors["dropped_after_goodbye"] += 1
                            continue
                        await self._send(stream, conn.send(msg))
                if fatal is not None:
                    await self._send(stream, conn.send(control.Error(*fatal)))
                elif conn.state is not control.State.CLOSED:
                    await self._send(
                        stream, conn.send(control.Goodbye(session.end_reason or "closed"))
                    )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                outcome = "broken"
                registry.end(session, "closed")
            except trio.TooSlowError:
                outcome = "send timeout"
                self.errors["send_timeout"] += 1
                registry.end(session, "closed")
            nursery.cancel_scope.cancel()
        reason = session.end_reason or "closed"
        return outcome if outcome not in ("closed", "eof") or reason == "closed" else reason

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> None:
        """Send within `[limits] send_timeout`: a device that stops reading is dropped."""
        with trio.fail_after(self.config.send_timeout):
            await stream.send_all(data)

    async def _read_loop(
        self, stream: trio.abc.Stream, conn: control.ControlConnection, session: Session
    ) -> str:
        app = self.app
        while True:
            try:
                event = await self._receive_event(stream, conn)
            except control.ControlError as exc:
                self.errors[exc.code] += 1
                self.rlog.warning(
                    exc.code,
                    trio.current_time(),
                    "control error from %s: %s",
                    session.device_id,
                    exc,
                )
                if exc.fatal:
                    raise
                self._queue(session, control.Error(exc.code, exc.message))
                continue
            if isinstance(event, control.ConnectionClosed):
                if session.goodbye_seq is None:
                    app.registry.end(session, "closed")
                return "eof" if event.clean else "eof mid-line"
            if not session.active:
                return session.end_reason or "closed"
            if isinstance(event, control.Goodbye):
                app.registry.touch(session, trio.current_time())
                app.registry.goodbye(session, event.last_seq, self.config.goodbye_linger)
                return "goodbye"
            try:
                self._handle_message(session, event)
            except Exception as exc:
                # The boundary of one control message: the device gets an error and goes on.
                app.boundary.report(
                    "control_message", exc, f"{event.TYPE} from {session.device_id}"
                )
                self._queue(
                    session,
                    control.Error("internal_error", "the collector failed to handle that message"),
                )

    def _handle_message(self, session: Session, event: control.Message) -> None:
        app = self.app
        app.registry.touch(session, trio.current_time())
        session.device.last_seen = app.wall()
        if isinstance(event, control.Ping):
            self._queue(session, control.Pong())
        elif isinstance(event, control.Ack):
            if not app.commands.on_tcp_ack(session, event):
                self.errors["unknown_command"] += 1
                self._queue(
                    session, control.Error("unknown_command", f"no open command {event.id!r}")
                )
        elif isinstance(event, control.Error):
            log.warning(
                "device %s reported error %s: %s", session.device_id, event.code, event.message
            )

    def _queue(self, session: Session, msg: control.Message) -> None:
        if session.outbox is None:
            return
        try:
            session.outbox.send_nowait(msg)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.errors["outbox_full"] += 1
