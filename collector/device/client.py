"""The device side, in Trio: for Python sensors (a Raspberry Pi, the simulator, the tests).

    async with open_device("collector.local", "greenhouse-1", secret) as dev:
        await dev.send_readings({"temperature": 21.5, "door_open": False})
        await dev.send_readings({"alarm": "smoke"}, ack=True)   # retransmits until acked

`open_device` registers over the TCP control channel; `open_udp_device` registers with an
authenticated HELLO for devices that cannot keep a connection open. Both keep heartbeats going
while the link is otherwise idle, answer commands with `on_command`, and follow pushed
configuration in `config`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from collector.wire import control
from collector.wire.crypto import (
    CIPHER,
    COLLECTOR_TO_DEVICE,
    Aead,
    DeviceKeys,
    registration_proof,
    session_keys,
)
from collector.wire.datagram import (
    MAX_SEQ,
    NO_COOKIE,
    DatagramError,
    DatagramType,
    Flag,
    ReadingPair,
    Value,
    Welcome,
    answered_hello_untrusted,
    decode_ack_untrusted,
    decode_command_untrusted,
    decode_goodbye_untrusted,
    decode_header_untrusted,
    encode_ack_payload,
    encode_heartbeat_payload,
    encode_hello,
    encode_readings,
    open_cookie_untrusted,
    open_datagram_untrusted,
    open_welcome_untrusted,
    parse_hello_untrusted,
    seal_datagram,
    welcome_nonce_untrusted,
)
from collector.wire.replay_window import DUPLICATE, TOO_OLD, ReplayWindow

log = logging.getLogger("collector.client")

CommandHandler = Callable[[str, dict[str, Any]], Any]


class RegistrationError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class SessionEnded(Exception):
    """The collector ended the session (or the link broke); `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AckTimeout(Exception):
    pass


class DeviceClient:
    """A registered device. Created by `open_device` / `open_udp_device`."""

    def __init__(
        self,
        device_id: str,
        *,
        session_id: int,
        keys: tuple[bytes, bytes],
        heartbeat_interval: float,
        timeout: float,
        max_datagram: int,
        udp: trio.socket.SocketType,
        config: Mapping[str, Any] | None = None,
        on_command: CommandHandler | None = None,
        ack_initial: float = 0.25,
        ack_max: float = 2.0,
        ack_attempts: int = 6,
    ) -> None:
        self.device_id = device_id
        self.session_id = session_id
        #: the device seals with the device-to-collector key and opens with the other
        self.aead_send = Aead(keys[0])
        self.aead_recv = Aead(keys[1])
        self.heartbeat_interval = heartbeat_interval
        self.timeout = timeout
        self.max_datagram = max_datagram
        self.udp = udp
        self.config: dict[str, Any] = dict(config or {})
        self.on_command = on_command
        self.ack_initial = ack_initial
        self.ack_max = ack_max
        self.ack_attempts = ack_attempts
        self.seq = 0
        self.started = time.monotonic()
        self.last_sent = trio.current_time()
        self.end_reason: str | None = None
        self.ended = trio.Event()
        self.config_changed = trio.Event()
        #: replaceable hook: how a datagram leaves (the simulator injects loss here)
        self.transmit: Callable[[bytes], Awaitable[None]] = self.raw_transmit
        self.sent = 0
        self.retransmits = 0
        self.acked = 0
        self.commands_run = 0
        self._ack_waiters: dict[int, trio.Event] = {}
        self._server_window = ReplayWindow()
        self._answers: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._tcp_stream: trio.abc.Stream | None = None
        self._tcp_conn: control.ControlConnection | None = None
        self._tcp_lock = trio.Lock()
        self._nursery: trio.Nursery | None = (
            None  # background tasks; cancelled when the session ends
        )

    @property
    def is_tcp(self) -> bool:
        """Registered over the TCP control channel (rather than with a HELLO datagram)."""
        return self._tcp_stream is not None

    # -- sending -------------------------------------------------------------------------------

    async def raw_transmit(self, data: bytes) -> None:
        await self.udp.send(data)

    def next_seq(self) -> int:
        if self.end_reason is not None:
            raise SessionEnded(self.end_reason)
        if self.seq >= MAX_SEQ:
            raise SessionEnded("sequence numbers exhausted: register again")
        self.seq += 1
        return self.seq

    def _datagram(
        self, type: DatagramType, payload: bytes, flags: Flag = Flag.NONE
    ) -> tuple[int, bytes]:
        seq = self.next_seq()
        data = seal_datagram(
            self.aead_send, type, self.session_id, seq, time.time_ns() // 1000, payload, flags=flags
        )
        return seq, data

    async def _send(self, data: bytes) -> None:
        self.last_sent = trio.current_time()
        self.sent += 1
        await self.transmit(data)

    async def send_heartbeat(self, *, ack: bool = False) -> int:
        uptime = int(time.monotonic() - self.started)
        flags = Flag.ACK_REQUESTED if ack else Flag.NONE
        seq, data = self._datagram(DatagramType.HEARTBEAT, encode_heartbeat_payload(uptime), flags)
        await (self._send_acked(seq, data) if ack else self._send(data))
        return seq

    async def send_readings(
        self, readings: Mapping[str, Value] | list[ReadingPair], *, ack: bool = False
    ) -> int:
        """Send readings in one TELEMETRY datagram; returns its sequence number.

        With `ack=True` the datagram asks for an ACK and is retransmitted (same bytes) with
        capped backoff until it arrives; AckTimeout after `ack_attempts` sends.
        """
        flags = Flag.ACK_REQUESTED if ack else Flag.NONE
        seq, data = self._datagram(DatagramType.TELEMETRY, encode_readings(readings), flags)
        if len(data) > self.max_datagram:
            raise ValueError(f"{len(data)} bytes exceeds the collector's {self.max_datagram}")
        await (self._send_acked(seq, data) if ack else self._send(data))
        return seq

    async def _send_acked(self, seq: int, data: bytes) -> None:
        event = self._ack_waiters[seq] = trio.Event()
        delay = self.ack_initial
        try:
            for attempt in range(self.ack_attempts):
                if attempt:
                    self.retransmits += 1
                await self._send(data)
                with trio.move_on_after(delay):
                    await event.wait()
                if event.is_set():
                    self.acked += 1
                    return
                if self.end_reason is not None:
                    raise SessionEnded(self.end_reason)
                delay = min(delay * 2, self.ack_max)
            raise AckTimeout(f"seq {seq} not acknowledged after {self.ack_attempts} sends")
        finally:
            del self._ack_waiters[seq]

    async def ping(self) -> None:
        await self._send_control(control.Ping())

    async def _send_control(self, msg: control.Message) -> None:
        if self._tcp_stream is None or self._tcp_conn is None:
            return
        async with self._tcp_lock:
            await self._tcp_stream.send_all(self._tcp_conn.send(msg))

    async def goodbye(self, reason: str = "closed") -> None:
        """End the session cleanly (over TCP, or with a GOODBYE datagram)."""
        if self.end_reason is not None:
            return
        if self._tcp_stream is not None:
            try:
                await self._send_control(control.Goodbye(reason, last_seq=self.seq))
            except (trio.BrokenResourceError, trio.ClosedResourceError, control.LocalProtocolError):
                pass
        else:
            _, data = self._datagram(DatagramType.GOODBYE, reason.encode())
            await self._send(data)
        self._end(reason)

    def _end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
            self.ended.set()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    # -- background tasks ----------------------------------------------------------------------

    async def _background(
        self, *, heartbeat: bool, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Readers, heartbeats and command handlers: they stop when the session ends, while the
        caller's own code goes on (and gets SessionEnded from the next send)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._tcp_stream is not None:
                nursery.start_soon(self._tcp_reader)
            nursery.start_soon(self._udp_reader)
            if heartbeat:
                nursery.start_soon(self._heartbeats)
            task_status.started()

    async def _heartbeats(self) -> None:
        """Heartbeat only when nothing else was sent for an interval: any datagram proves life."""
        while True:
            due = self.last_sent + self.heartbeat_interval
            if trio.current_time() >= due:
                await self.send_heartbeat()
                continue
            await trio.sleep_until(due)

    async def _udp_reader(self) -> None:
        while True:
            try:
                data = await self.udp.recv(65536)
            except ConnectionRefusedError:
                # An ICMP "port unreachable" for an earlier send: the collector is not there
                # (restarting?). Sends will fail too; the caller decides when to register again.
                continue
            try:
                header = decode_header_untrusted(data, max_size=65536)
            except DatagramError:
                continue
            if header.session_id != self.session_id:
                continue
            try:
                payload = open_datagram_untrusted(self.aead_recv, data, COLLECTOR_TO_DEVICE)
            except DatagramError:
                continue
            verdict = self._server_window.update(header.seq)
            if verdict in (DUPLICATE, TOO_OLD):
                answer = self._answers.get(header.seq)
                if answer is not None:  # our ACK of a command was lost: send it again
                    await self.transmit(answer)
                continue
            try:
                if header.type == DatagramType.ACK:
                    waiter = self._ack_waiters.get(decode_ack_untrusted(payload).acked_seq)
                    if waiter is not None:
                        waiter.set()
                elif header.type == DatagramType.COMMAND:
                    cid, name, args = decode_command_untrusted(payload)
                    assert self._nursery is not None
                    self._nursery.start_soon(self._answer_udp_command, header.seq, cid, name, args)
                elif header.type == DatagramType.GOODBYE:
                    self._end(decode_goodbye_untrusted(payload) or "closed")
            except DatagramError as exc:
                log.warning("%s: bad datagram from the collector: %s", self.device_id, exc)

    async def _run_command(self, name: str, args: dict[str, Any]) -> tuple[bool, Any]:
        self.commands_run += 1
        if name == "config":
            self.config.update(args)
            self.config_changed.set()
            self.config_changed = trio.Event()
            if self.on_command is None:
                return True, {"applied": sorted(args)}
        if self.on_command is None:
            return False, f"no handler for command {name!r}"
        try:
            result = self.on_command(name, args)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return True, result

    async def _answer_udp_command(
        self, seq: int, cid: str, name: str, args: dict[str, Any]
    ) -> None:
        ok, value = await self._run_command(name, args)
        body = {"id": cid, "ok": ok, ("result" if ok else "error"): value}
        _, data = self._datagram(DatagramType.ACK, encode_ack_payload(seq, body))
        self._answers[seq] = data
        while len(self._answers) > 64:
            self._answers.popitem(last=False)
        await self._send(data)

    async def _tcp_reader(self) -> None:
        assert self._tcp_stream is not None and self._tcp_conn is not None
        conn = self._tcp_conn
        while True:
            try:
                event = conn.next_event()
            except control.ControlError as exc:
                log.warning("%s: bad line from the collector: %s", self.device_id, exc)
                if exc.fatal:
                    self._end(f"protocol error: {exc.code}")
                    return
                continue
            if isinstance(event, control.NeedData):
                try:
                    data = await self._tcp_stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, control.ConnectionClosed):
                self._end("connection closed")
                return
            if isinstance(event, control.Goodbye):
                self._end(event.reason)
                return
            if isinstance(event, control.Config):
                self.config.update(event.config)
                self.config_changed.set()
                self.config_changed = trio.Event()
            elif isinstance(event, control.Command):
                assert self._nursery is not None
                self._nursery.start_soon(self._answer_tcp_command, event)
            elif isinstance(event, control.Error):
                log.warning("%s: collector says %s: %s", self.device_id, event.code, event.message)

    async def _answer_tcp_command(self, cmd: control.Command) -> None:
        ok, value = await self._run_command(cmd.name, dict(cmd.args))
        ack = (
            control.Ack(cmd.id, True, value) if ok else control.Ack(cmd.id, False, None, str(value))
        )
        try:
            await self._send_control(ack)
        except (trio.BrokenResourceError, trio.ClosedResourceError, control.LocalProtocolError):
            pass  # the session ended meanwhile: the collector has already failed the command


@asynccontextmanager
async def _running(
    client: DeviceClient, *, heartbeat: bool, say_goodbye: bool
) -> AsyncIterator[None]:
    """Run a registered client's background tasks around the caller's block, and say goodbye
    (if asked and the session is still on) when the block exits."""
    with _single_errors():
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(client._background, heartbeat=heartbeat))
            try:
                yield
            finally:
                if say_goodbye and client.end_reason is None:
                    with trio.move_on_after(2) as cs:
                        cs.shield = True
                        await client.goodbye()
                nursery.cancel_scope.cancel()


@contextmanager
def _single_errors() -> Iterator[None]:
    """Let an exception from the caller's block (SessionEnded, say) out as itself, not wrapped
    in the exception group of the client's internal nursery."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from group
        raise


async def _open_udp(host: str, port: int, local_host: str | None = None) -> trio.socket.SocketType:
    info = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = info[0]
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        if local_host is not None:
            await sock.bind((local_host, 0))
        await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def _receive_event(stream: trio.abc.Stream, conn: control.ControlConnection) -> control.Event:
    while True:
        event = conn.next_event()
        if not isinstance(event, control.NeedData):
            return event
        conn.receive_data(await stream.receive_some(65536))


@asynccontextmanager
async def open_device(
    host: str,
    device_id: str,
    secret: str,
    *,
    tcp_port: int = 8080,
    udp_port: int | None = None,
    on_command: CommandHandler | None = None,
    heartbeat: bool = True,
    say_goodbye: bool = True,
    local_host: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    register_timeout: float = 10.0,
) -> AsyncIterator[DeviceClient]:
    """Register over TCP and run the device until the block exits (then say goodbye).

    Connecting and registering take at most `register_timeout` seconds each (else
    RegistrationError with code `timeout`).

    `udp_port` overrides the port from the welcome (for tests behind port mapping);
    `local_host` is the address datagrams are sent from (default: what the route picks);
    `ssl_context` makes the control channel TLS (`collector.servers.tls.client_context(ca)`).
    """
    stream: trio.abc.Stream
    try:
        with trio.fail_after(register_timeout):
            if ssl_context is not None:
                stream = await trio.open_ssl_over_tcp_stream(
                    host, tcp_port, ssl_context=ssl_context
                )
            else:
                stream = await trio.open_tcp_stream(host, tcp_port)
    except trio.TooSlowError:
        raise RegistrationError(
            "timeout", f"no connection to {host}:{tcp_port} in {register_timeout:g}s"
        ) from None
    async with stream:
        conn = control.ControlConnection(control.Role.DEVICE)
        keys = DeviceKeys(secret)
        cnonce = secrets.token_hex(16)
        try:
            with trio.fail_after(register_timeout):
                event = await _receive_event(stream, conn)
                if not isinstance(event, control.Challenge):
                    raise RegistrationError("protocol", f"expected a challenge, got {event!r}")
                proof = registration_proof(keys, device_id, event.nonce, cnonce)
                await stream.send_all(conn.send(control.Register(device_id, cnonce, proof)))
                welcome = await _receive_event(stream, conn)
        except trio.TooSlowError:
            raise RegistrationError(
                "timeout", f"{host}:{tcp_port} did not welcome us in {register_timeout:g}s"
            ) from None
        if isinstance(welcome, control.Error):
            raise RegistrationError(welcome.code, welcome.message)
        if not isinstance(welcome, control.Welcome):
            raise RegistrationError("protocol", f"expected a welcome, got {welcome!r}")
        if welcome.cipher != CIPHER:
            raise RegistrationError("protocol", f"the collector uses cipher {welcome.cipher!r}")
        session_k = session_keys(
            keys.secret,
            device_id,
            bytes.fromhex(event.nonce),
            bytes.fromhex(cnonce),
            welcome.session_id,
        )
        udp = await _open_udp(host, udp_port or welcome.udp_port, local_host)
        with udp:
            client = DeviceClient(
                device_id,
                session_id=welcome.session_id,
                keys=session_k,
                heartbeat_interval=welcome.heartbeat_interval,
                timeout=welcome.timeout,
                max_datagram=welcome.max_datagram,
                udp=udp,
                config=welcome.config,
                on_command=on_command,
            )
            client._tcp_stream = stream
            client._tcp_conn = conn
            async with _running(client, heartbeat=heartbeat, say_goodbye=say_goodbye):
                yield client


@asynccontextmanager
async def open_device_failover(
    collectors: Sequence[tuple[str, int]],
    device_id: str,
    secret: str,
    **kwargs: Any,
) -> AsyncIterator[DeviceClient]:
    """`open_device` on the first of `collectors` ((host, TCP port) pairs: the nodes of a
    cluster, docs/SCALING.md) that registers the device; raises RegistrationError (code
    `unreachable`) naming each one's failure when none does. A device whose session ended
    (its node was lost) calls it again to register with one that is still there."""
    failures = []
    for host, port in collectors:
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                open_device(host, device_id, secret, tcp_port=port, **kwargs)
            )
        except (OSError, RegistrationError) as exc:
            await stack.aclose()
            failures.append(f"{host}:{port}: {exc}")
            continue
        async with stack:
            yield client
        return
    raise RegistrationError(
        "unreachable", "no collector registered the device: " + "; ".join(failures)
    )


@asynccontextmanager
async def open_udp_device(
    host: str,
    device_id: str,
    secret: str,
    *,
    udp_port: int = 8081,
    on_command: CommandHandler | None = None,
    heartbeat: bool = True,
    say_goodbye: bool = True,
    hello_attempts: int = 5,
    hello_timeout: float = 1.0,
    local_host: str | None = None,
) -> AsyncIterator[DeviceClient]:
    """Register with HELLO datagrams (no TCP) and run the device until the block exits.

    The first HELLO is answered with a COOKIE, which the device sends back in a second HELLO;
    only that gets a WELCOME (docs/PROTOCOL.md 3.5). A HELLO that gets no answer is sent again,
    `hello_attempts` times in all, waiting `hello_timeout` seconds, doubling.
    """
    keys = DeviceKeys(secret)
    hello_out, hello_in = Aead(keys.hello_d2c), Aead(keys.hello_c2d)
    udp = await _open_udp(host, udp_port, local_host)
    with udp:
        client_nonce = secrets.token_bytes(16)
        cookie = NO_COOKIE
        registered: tuple[int, tuple[bytes, bytes], Welcome] | None = None
        hello = encode_hello(hello_out, device_id, client_nonce, cookie, time.time_ns() // 1000)
        wait = hello_timeout
        attempts = 0
        while registered is None:
            if attempts >= hello_attempts:
                raise RegistrationError("no_welcome", f"no WELCOME after {attempts} HELLOs")
            attempts += 1
            await udp.send(hello)
            hello_nonce = parse_hello_untrusted(hello).nonce
            with trio.move_on_after(wait):
                while True:
                    data = await udp.recv(65536)
                    try:
                        header = decode_header_untrusted(data, max_size=65536)
                        if header.type == DatagramType.COOKIE:
                            cookie = open_cookie_untrusted(hello_in, data, hello_nonce)
                            # The second HELLO: the same client nonce, with the cookie.
                            hello = encode_hello(
                                hello_out, device_id, client_nonce, cookie, time.time_ns() // 1000
                            )
                            attempts, wait = 0, hello_timeout
                            break
                        if (
                            header.type == DatagramType.WELCOME
                            and cookie != NO_COOKIE
                            and answered_hello_untrusted(data) == hello_nonce
                        ):
                            sid, server_nonce = welcome_nonce_untrusted(data)
                            session_k = session_keys(
                                keys.secret, device_id, server_nonce, client_nonce, sid
                            )
                            w = open_welcome_untrusted(Aead(session_k[1]), data)
                            registered = (sid, session_k, w)
                            break
                    except DatagramError:
                        continue
            if cookie != NO_COOKIE and attempts == 0:
                continue  # got the cookie: send the second HELLO at once
            wait *= 2
        session_id, session_k, w = registered
        client = DeviceClient(
            device_id,
            session_id=session_id,
            keys=session_k,
            heartbeat_interval=w.heartbeat_ms / 1000,
            timeout=w.timeout_ms / 1000,
            max_datagram=w.max_datagram,
            udp=udp,
            config=w.config,
            on_command=on_command,
        )
        async with _running(client, heartbeat=heartbeat, say_goodbye=say_goodbye):
            yield client
