"""The datagram path: authenticate and decrypt, de-duplicate, account, and hand telemetry on.

`Ingest` is synchronous. The UDP server calls `begin_batch()`, then `handle_datagram()` for
every datagram it drained from the socket, then `end_batch()`, which hands the batch's
telemetry to the listeners in one call. Replies (ACK, COOKIE, WELCOME) go out with a
non-blocking `sendto`; a reply that cannot be sent is counted, never waited for.

Order of checks for a datagram, cheapest first, and nothing touches a device before its AEAD
tag verified: size -> header -> session lookup (or rate limit) -> decrypt -> payload -> window.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from collector.core.boundary import ErrorBoundary
from collector.core.events import Listener, Telemetry, format_address
from collector.core.ratelimit import SourceLimiter
from collector.core.registration import CookieJar, RecentRegistrations, Registration
from collector.logs import RateLimitedLog
from collector.wire.crypto import (
    COLLECTOR_TO_DEVICE,
    Aead,
    DeviceKeys,
    InvalidTag,
    session_keys,
)
from collector.wire.datagram import (
    HEADER,
    HEADER_LEN,
    MIN_DATAGRAM,
    U32,
    VERSION,
    DatagramError,
    DatagramType,
    Flag,
    Welcome,
    decode_ack_untrusted,
    decode_goodbye_untrusted,
    decode_heartbeat_untrusted,
    decode_readings_untrusted,
    encode_cookie,
    encode_welcome,
    open_hello,
    parse_hello_untrusted,
    seal_datagram,
)
from collector.wire.replay_window import LATE, TOO_OLD

if TYPE_CHECKING:
    from collector.core.commands import CommandManager
    from collector.core.sessions import Session, SessionRegistry

log = logging.getLogger("collector.ingest")

REJECT_REASONS = (
    "malformed",
    "unknown_session",
    "bad_tag",
    "replay",
    "too_large",
    "over_limit",
    "rate_limited",
    "banned",
)


def source_key(addr: Any) -> str:
    """What the rate limits count by: the IPv4 address, or the /64 of an IPv6 address (one
    host can use a whole /64)."""
    host = addr[0]
    if ":" not in host:
        return host
    return ":".join(host.split("%")[0].split(":")[:4])


_unpack_header = HEADER.unpack_from
_nonce = struct.Struct(">IB3xI").pack  # crypto.session_nonce, inlined on the hot path
_HEARTBEAT = int(DatagramType.HEARTBEAT)
_TELEMETRY = int(DatagramType.TELEMETRY)
_ACK = int(DatagramType.ACK)
_HELLO = int(DatagramType.HELLO)
_GOODBYE = int(DatagramType.GOODBYE)
_ACK_REQUESTED = int(Flag.ACK_REQUESTED)
_KNOWN_TYPES = frozenset(int(t) for t in DatagramType)
#: ACK_REQUESTED is for a device's HEARTBEAT and TELEMETRY (and the collector's COMMAND)
_MAY_REQUEST_ACK = frozenset({_HEARTBEAT, _TELEMETRY})


class _HelloKeys:
    """A device's keys for registration (derived once: HKDF is the costly part). The AEAD
    objects are built per HELLO (about 1 µs each, and HELLOs are rate-limited): kept, the two
    cost 4.8 kB a device, 470 MB at 100,000 devices."""

    __slots__ = ("keys", "secret")

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.keys = DeviceKeys(secret)

    @property
    def hello_in(self) -> Aead:
        return Aead(self.keys.hello_d2c)

    @property
    def hello_out(self) -> Aead:
        return Aead(self.keys.hello_c2d)


class Ingest:
    def __init__(
        self,
        registry: SessionRegistry,
        secrets_by_device: Mapping[str, str],
        *,
        heartbeat_interval: float,
        timeout: float,
        max_datagram: int,
        wall: Callable[[], float],
        listeners: Sequence[Listener],
        rate_limit: float = 10.0,
        limiter: SourceLimiter | None = None,
        boundary: ErrorBoundary | None = None,
        config_for: Callable[[str], Mapping[str, Any]] = lambda device_id: {},
        cookie_rotate: float = 60.0,
        registrations_per_device: int = 64,
        goodbye_linger: float = 2.0,
    ) -> None:
        self.registry = registry
        self.secrets = secrets_by_device
        self.heartbeat_ms = int(heartbeat_interval * 1000)
        self.timeout_ms = int(timeout * 1000)
        self.max_datagram = max_datagram
        self.wall = wall
        self.listeners = listeners
        self.config_for = config_for
        self.goodbye_linger = goodbye_linger
        self.commands: CommandManager | None = None
        #: called with (datagram, address, wall time) for every accepted datagram (raw recording)
        self.raw_sink: Callable[[bytes, Any, float], None] | None = None
        self.sock: socket.socket | None = None
        self.rlog = RateLimitedLog(log, rate_limit)
        if limiter is None:
            limiter = SourceLimiter(rate=500.0, burst=1000.0, total=20000.0, max_sources=4096)
        self.limiter = limiter
        self.boundary = boundary or ErrorBoundary(trio.current_time)
        self.cookies = CookieJar(cookie_rotate)
        self.recent = RecentRegistrations(self.cookies.lifetime, registrations_per_device)
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.received = 0
        self.accepted = 0
        self.readings = 0
        self.cookies_sent = 0  # HELLOs answered with a COOKIE (neither accepted nor rejected)
        self.replies_sent = 0
        self.send_errors = 0
        self.address_changes = 0
        self.accepting_hellos = True
        self.heartbeats_to_listeners = False  # only a recorder wants them
        self.batches = 0
        self._hello_keys: dict[str, _HelloKeys] = {}
        self._pending: list[Telemetry] = []
        self._sessions = registry.by_id  # the same dict, looked up once per datagram
        self.now = 0.0
        self.wall_now = 0.0

    # -- batching ----------------------------------------------------------------------------

    def begin_batch(self, now: float) -> None:
        self.now = now
        self.wall_now = self.wall()

    def end_batch(self) -> None:
        self.batches += 1
        if self._pending:
            batch, self._pending = self._pending, []
            for listener in self.listeners:
                try:
                    listener.on_telemetry(batch)
                except Exception as exc:  # a listener's bug costs it this batch, nothing more
                    self.boundary.report("listener", exc, type(listener).__name__)

    # -- output --------------------------------------------------------------------------------

    def send_datagram(self, data: bytes, addr: Any) -> bool:
        """Send without waiting; a full socket buffer or a network error is counted."""
        if self.sock is None:
            self.send_errors += 1
            return False
        try:
            self.sock.sendto(data, addr)
        except OSError as exc:
            self.send_errors += 1
            self.rlog.warning("send_error", self.now, "cannot send to %s: %s", addr, exc)
            return False
        self.replies_sent += 1
        return True

    def _reply(self, data: bytes, addr: Any, request_len: int) -> None:
        # The collector never answers an address it has not verified with more bytes than it
        # was sent (no amplification): ACK and COOKIE are never larger than what they answer.
        if len(data) <= request_len:
            self.send_datagram(data, addr)
        else:  # pragma: no cover - ruled out by the sizes in docs/PROTOCOL.md
            log.error("refusing a %d-byte reply to a %d-byte datagram", len(data), request_len)

    def _send_ack(self, session: Session, seq: int, request_len: int, addr: Any) -> None:
        ack = seal_datagram(
            session.aead_out,
            DatagramType.ACK,
            session.session_id,
            session.next_out_seq(),
            int(self.wall_now * 1e6),
            U32.pack(seq),
            direction=COLLECTOR_TO_DEVICE,
        )
        self._reply(ack, addr, request_len)

    # -- input ---------------------------------------------------------------------------------

    def reject(self, reason: str, addr: Any, detail: str) -> None:
        self.rejected[reason] += 1
        self.rlog.warning(
            reason, self.now, "rejected datagram from %s: %s (%s)", addr, reason, detail
        )

    def handle_datagram(self, data: bytes, addr: Any) -> None:
        self.received += 1
        n = len(data)
        if n > self.max_datagram:
            return self.reject("too_large", addr, f"{n} bytes > {self.max_datagram}")
        if n < MIN_DATAGRAM:
            return self.reject("malformed", addr, f"{n} bytes is shorter than header and tag")
        version, typ, flags, reserved, sid, seq, ts = _unpack_header(data)
        if version != VERSION or reserved or flags & ~_ACK_REQUESTED or typ not in _KNOWN_TYPES:
            return self.reject(
                "malformed", addr, f"version {version} type {typ} flags {flags:#x}/{reserved:#x}"
            )
        if typ == _HELLO:
            if not self.limiter.allow(source_key(addr), self.now):
                return self._rate_limited(addr, "HELLO")
            return self._hello(data, addr, sid, seq, flags)
        session = self._sessions.get(sid)
        if session is None:
            if not self.limiter.allow(source_key(addr), self.now):
                return self._rate_limited(addr, f"session {sid}")
            return self.reject("unknown_session", addr, f"session {sid}")
        if (
            addr != session.address
            and session.address is not None
            and not self.limiter.allow(source_key(addr), self.now)
        ):
            # Not where the session's datagrams come from: a NAT rebinding, or someone who
            # learned the session id. Either way no AEAD is spent beyond the source's budget.
            return self._rate_limited(addr, f"session {sid} from a new address")
        try:
            payload = session.aead_in.decrypt(
                _nonce(sid, 0, seq), data[HEADER_LEN:], data[:HEADER_LEN]
            )
        except InvalidTag:
            return self.reject("bad_tag", addr, f"session {sid} seq {seq}")

        # Authenticated: from here on the datagram is the device's own.
        device = session.device
        try:
            if flags and typ not in _MAY_REQUEST_ACK:
                raise DatagramError("malformed", f"ACK_REQUESTED on a {DatagramType(typ).name}")
            if typ == _TELEMETRY:
                readings = decode_readings_untrusted(payload)
            elif typ == _HEARTBEAT:
                decode_heartbeat_untrusted(payload)
            elif typ == _ACK:
                ack = decode_ack_untrusted(payload)
            elif typ == _GOODBYE:
                decode_goodbye_untrusted(payload)
            else:
                raise DatagramError("malformed", f"devices do not send {DatagramType(typ).name}")
        except DatagramError as exc:
            device.malformed += 1
            return self.reject("malformed", addr, f"device {device.device_id}: {exc.detail}")

        gap = session.window.update(seq)
        if gap < 0:
            if gap == LATE:
                device.out_of_order += 1
                device.lost -= 1
            else:
                device.duplicates += 1
                self.rejected["replay"] += 1
                self.rlog.info(
                    "replay",
                    self.now,
                    "duplicate datagram from %s: device %s seq %d (%s)",
                    addr,
                    device.device_id,
                    seq,
                    "too old" if gap == TOO_OLD else "seen before",
                )
                # A retransmission whose ACK was lost: answer again, but only to the address
                # the device last proved, so a captured datagram cannot be reflected elsewhere.
                if flags and addr == session.address:
                    self._send_ack(session, seq, n, addr)
                return None
        elif gap:
            device.lost += gap

        self.accepted += 1
        device.datagrams += 1
        device.last_seen = self.wall_now
        if addr != session.address:
            self._address_changed(session, addr)
        now = self.now
        if now + session.timeout > session.deadline:
            self.registry.touch(session, now)
        if flags:
            self._send_ack(session, seq, n, addr)
        if self.raw_sink is not None:
            self.raw_sink(data, addr, self.wall_now)
        if typ == _TELEMETRY:
            device.readings += len(readings)
            self.readings += len(readings)
            self._pending.append(
                Telemetry(self.wall_now, device.device_id, seq, ts, readings, payload)
            )
        elif typ == _HEARTBEAT and self.heartbeats_to_listeners:
            # A Telemetry without readings: liveness, which the recorder keeps for replays.
            self._pending.append(Telemetry(self.wall_now, device.device_id, seq, ts, ()))
        elif typ == _ACK:
            if self.commands is None or not self.commands.on_udp_ack(
                session, ack.acked_seq, ack.result
            ):
                log.debug(
                    "ACK for no open command: device %s seq %d", device.device_id, ack.acked_seq
                )
        elif typ == _GOODBYE:
            # Everything the device sent before it is numbered below this GOODBYE.
            self.registry.goodbye(session, seq - 1, self.goodbye_linger)
        if session.goodbye_seq is not None and session.window.complete_up_to(session.goodbye_seq):
            self.registry.end(session, "closed")  # the last datagram the goodbye spoke of came
        return None

    def _rate_limited(self, addr: Any, what: str) -> None:
        self.rejected["rate_limited"] += 1
        self.rlog.warning(
            "rate_limited",
            self.now,
            "rate limited %s: %s (over its budget of unauthenticated datagrams)",
            addr,
            what,
        )

    def _address_changed(self, session: Session, addr: Any) -> None:
        old = session.address
        session.address = addr
        shown = format_address(addr)
        session.device.address = shown
        if old is not None:
            session.device.address_changes += 1
            self.address_changes += 1
            log.info(
                "device %s moved from %s to %s (NAT rebinding)",
                session.device_id,
                format_address(old),
                shown,
            )

    # -- UDP-only registration: HELLO, COOKIE, WELCOME (docs/PROTOCOL.md 3.5) ----------------

    def hello_keys(self, device_id: str) -> _HelloKeys | None:
        secret = self.secrets.get(device_id)
        if secret is None:
            return None
        keys = self._hello_keys.get(device_id)
        if keys is None or keys.secret != secret:  # new, or its secret was rotated
            keys = self._hello_keys[device_id] = _HelloKeys(secret)
        return keys

    def _hello(self, data: bytes, addr: Any, sid: int, seq: int, flags: int) -> None:
        n = len(data)
        if sid != 0 or seq != 0 or flags:
            return self.reject(
                "malformed", addr, "HELLO with a session id, a sequence number or flags"
            )
        try:
            hello = parse_hello_untrusted(data)
        except DatagramError as exc:
            return self.reject("malformed", addr, exc.detail)
        device_id = hello.device_id
        keys = self.hello_keys(device_id)
        if keys is None:
            return self.reject("bad_tag", addr, f"HELLO from unknown device {device_id!r}")
        try:
            client_nonce, cookie = open_hello(keys.hello_in, hello)
        except DatagramError as exc:
            return self.reject("bad_tag", addr, exc.detail)
        if not self.accepting_hellos:
            return self.reject("over_limit", addr, f"HELLO from {device_id} while shutting down")
        now = self.now
        if not self.cookies.check(now, addr, client_nonce, cookie):
            # No cookie, or one from another address, an earlier run, or too long ago: answer
            # with a fresh one. Only a device that receives at this address can use it.
            fresh = self.cookies.make(now, addr, client_nonce)
            answer = encode_cookie(keys.hello_out, fresh, hello.nonce, int(self.wall_now * 1e6))
            self.cookies_sent += 1
            self._reply(answer, addr, n)
            return None
        earlier = self.recent.find(now, device_id, client_nonce)
        if earlier is not None:
            self.registry.device(device_id).duplicates += 1
            current = self._sessions.get(earlier.session_id)
            if current is not None and addr == earlier.address:
                # The device did not get its WELCOME and sends the same HELLO again.
                self.rejected["replay"] += 1
                self.send_datagram(earlier.welcome, addr)
                return None
            return self.reject(
                "replay", addr, f"HELLO of {device_id} with a client nonce already used"
            )
        if not self.registry.can_open(device_id):
            return self.reject("over_limit", addr, f"HELLO from {device_id}: too many devices")
        banned = self.registry.flapping.check(device_id, now)
        if banned:
            return self.reject(
                "banned",
                addr,
                f"HELLO from {device_id}: registers too often, banned for {banned:.0f}s",
            )
        server_nonce = os.urandom(16)
        session_id = self.registry.new_session_id()
        session_k = session_keys(
            keys.keys.secret, device_id, server_nonce, client_nonce, session_id
        )
        session = self.registry.open(
            device_id, session_k, "udp", address=addr, session_id=session_id
        )
        self.accepted += 1
        session.device.datagrams += 1
        welcome = encode_welcome(
            session.aead_out,
            session_id,
            server_nonce,
            hello.nonce,
            Welcome(
                self.heartbeat_ms, self.timeout_ms, self.max_datagram, self.config_for(device_id)
            ),
            int(self.wall_now * 1e6),
        )
        self.recent.add(
            now,
            device_id,
            Registration(client_nonce, now + self.cookies.lifetime, session_id, addr, welcome),
        )
        # The cookie proved the address: a WELCOME may be larger than the HELLO (it carries
        # the configuration), but never larger than a datagram may be.
        self.send_datagram(welcome, addr)
        return None
