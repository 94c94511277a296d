"""The TCP control channel (sans-IO), in the manner of h11 and wsproto.

One JSON object per line, UTF-8, at most `max_line` bytes including the newline. Feed received
bytes to `receive_data()` (b"" for end of file), pull messages with `next_event()`, and turn the
messages you want to send into bytes with `send()`. The object tracks the registration state of
the connection, and rejects messages out of order, on both sides.

Protocol violations raise `ControlError` with a code from docs/PROTOCOL.md and whether the
connection must be closed; after a non-fatal error the connection goes on.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar, TypeAlias

import attrs

from collector.wire.jsonio import JsonError, dumps_bytes, loads_untrusted

DEFAULT_MAX_LINE = 4096
PROTOCOL_VERSION = 2


class Role(enum.Enum):
    SERVER = "server"
    DEVICE = "device"


class State(enum.Enum):
    START = "start"  # server: challenge not sent yet; device: waiting for the challenge
    AWAIT_REGISTER = "await_register"  # server sent challenge / device got it
    REGISTERING = "registering"  # register sent, welcome not yet
    REGISTERED = "registered"
    CLOSED = "closed"


class ControlError(Exception):
    """A protocol violation. `code` goes on the wire in an error message."""

    def __init__(self, code: str, message: str, *, fatal: bool) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal


class LocalProtocolError(RuntimeError):
    """We tried to send something the protocol does not allow in this state (a bug of ours)."""


# --------------------------------------------------------------------------------------------
# Messages. Plain values; JSON conversion lives in _to_wire / _from_wire below.


@attrs.frozen
class Challenge:
    TYPE: ClassVar[str] = "challenge"
    nonce: str
    protocol: int = PROTOCOL_VERSION


@attrs.frozen
class Register:
    TYPE: ClassVar[str] = "register"
    device_id: str
    cnonce: str
    proof: str


@attrs.frozen
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    session_id: int
    udp_port: int
    heartbeat_interval: float
    timeout: float
    max_datagram: int
    cipher: str = "chacha20-poly1305"
    config: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Config:
    TYPE: ClassVar[str] = "config"
    config: Mapping[str, Any]


@attrs.frozen
class Command:
    TYPE: ClassVar[str] = "command"
    id: str
    name: str
    args: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Ack:
    """The device's answer to a command: it ran (`ok`) with a `result`, or failed with `error`."""

    TYPE: ClassVar[str] = "ack"
    id: str
    ok: bool = True
    result: Any = None
    error: str | None = None


@attrs.frozen
class Ping:
    TYPE: ClassVar[str] = "ping"


@attrs.frozen
class Pong:
    TYPE: ClassVar[str] = "pong"


@attrs.frozen
class Goodbye:
    """Ends the session. From a device, `last_seq` is the sequence number of the last datagram
    it sent (None: it does not say), so that the collector can wait for datagrams still on
    their way; the collector sends only the reason."""

    TYPE: ClassVar[str] = "goodbye"
    reason: str = "closed"
    last_seq: int | None = None


@attrs.frozen
class Error:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str


class NeedData:
    """Sentinel: no complete line buffered yet."""


@attrs.frozen
class ConnectionClosed:
    """The peer closed its side. `clean` is False when it left half a line behind."""

    clean: bool = True


NEED_DATA = NeedData()

Message: TypeAlias = (
    Challenge | Register | Welcome | Config | Command | Ack | Ping | Pong | Goodbye | Error
)
Event: TypeAlias = Message | NeedData | ConnectionClosed

# What each side may receive, and in which states.
_SERVER_RECEIVES: dict[str, type] = {c.TYPE: c for c in (Register, Ack, Ping, Goodbye, Error)}
_DEVICE_RECEIVES: dict[str, type] = {
    c.TYPE: c for c in (Challenge, Welcome, Config, Command, Pong, Goodbye, Error)
}
_ALL_TYPES = frozenset(_SERVER_RECEIVES) | frozenset(_DEVICE_RECEIVES)


# --------------------------------------------------------------------------------------------
# Field validation


def _str(d: Mapping[str, Any], key: str, *, max_len: int = 256, default: str | None = None) -> str:
    v = d.get(key, default)
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise ControlError("bad_message", f"field {key!r} must be a non-empty string", fatal=False)
    return v


def _hex(d: Mapping[str, Any], key: str, n_bytes: int) -> str:
    v = _str(d, key)
    try:
        raw = bytes.fromhex(v)
    except ValueError:
        raw = b""
    if len(raw) != n_bytes or v != v.lower():
        raise ControlError(
            "bad_message", f"field {key!r} must be {2 * n_bytes} lowercase hex digits", fatal=False
        )
    return v


def _int(d: Mapping[str, Any], key: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ControlError("bad_message", f"field {key!r} must be an integer", fatal=False)
    return v


def _num(d: Mapping[str, Any], key: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ControlError("bad_message", f"field {key!r} must be a number", fatal=False)
    return float(v)


def _obj(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise ControlError("bad_message", f"field {key!r} must be an object", fatal=False)
    return v


def _from_wire(cls: type, d: dict[str, Any]) -> Message:
    if cls is Register:
        return Register(
            _str(d, "device_id", max_len=64), _hex(d, "cnonce", 16), _hex(d, "proof", 32)
        )
    if cls is Ack:
        ok = d.get("ok", True)
        if not isinstance(ok, bool):
            raise ControlError("bad_message", "field 'ok' must be true or false", fatal=False)
        err = d.get("error")
        if err is not None and not isinstance(err, str):
            raise ControlError("bad_message", "field 'error' must be a string", fatal=False)
        if not ok and not err:
            raise ControlError(
                "bad_message", "an ack with ok=false needs a non-empty 'error'", fatal=False
            )
        return Ack(_str(d, "id", max_len=128), ok, d.get("result"), err)
    if cls is Ping:
        return Ping()
    if cls is Pong:
        return Pong()
    if cls is Goodbye:
        last = d.get("last_seq")
        if last is not None and (
            isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= 0xFFFF_FFFF
        ):
            raise ControlError(
                "bad_message", "field 'last_seq' must be an integer from 0 to 2^32-1", fatal=False
            )
        return Goodbye(_str(d, "reason", default="closed"), last)
    if cls is Error:
        return Error(_str(d, "code"), _str(d, "message", max_len=1024, default="?"))
    if cls is Challenge:
        return Challenge(_hex(d, "nonce", 16), _int(d, "protocol"))
    if cls is Welcome:
        return Welcome(
            _int(d, "session_id"),
            _int(d, "udp_port"),
            _num(d, "heartbeat_interval"),
            _num(d, "timeout"),
            _int(d, "max_datagram"),
            _str(d, "cipher"),
            _obj(d, "config"),
        )
    if cls is Config:
        return Config(_obj(d, "config"))
    if cls is Command:
        return Command(_str(d, "id", max_len=128), _str(d, "name", max_len=128), _obj(d, "args"))
    raise AssertionError(cls)  # pragma: no cover


def _to_wire(msg: Message) -> dict[str, Any]:
    d: dict[str, Any] = {"type": msg.TYPE}
    d.update(attrs.asdict(msg, recurse=False))
    if isinstance(msg, Ack):
        if msg.ok:
            d.pop("error")
        else:
            d.pop("result")
    if isinstance(msg, Welcome | Config):
        d["config"] = dict(d["config"])
    if isinstance(msg, Goodbye) and msg.last_seq is None:
        d.pop("last_seq")
    if isinstance(msg, Command):
        d["args"] = dict(d["args"])
    return d


def encode_message(msg: Message) -> bytes:
    """One message as one line, independent of any connection state."""
    return dumps_bytes(_to_wire(msg)) + b"\n"


# --------------------------------------------------------------------------------------------


class ControlConnection:
    """State of one control connection, seen from `our_role`."""

    def __init__(self, our_role: Role, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.our_role = our_role
        self.max_line = max_line
        self.state = State.START
        self._buf = bytearray()
        self._eof = False
        self._receives = _SERVER_RECEIVES if our_role is Role.SERVER else _DEVICE_RECEIVES
        self._scan_from = 0

    @property
    def registered(self) -> bool:
        return self.state is State.REGISTERED

    # -- input -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._eof and data:
            raise RuntimeError("data received after end of file")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event:
        while True:
            line = self._next_line()
            if line is None:
                if self._eof:
                    clean = not self._buf
                    self._buf.clear()
                    self.state = State.CLOSED
                    return ConnectionClosed(clean)
                return NEED_DATA
            line = line.strip(b" \t\r")
            if not line:
                continue  # blank lines are allowed (a person typing into nc)
            return self._receive_message(self._parse(line))

    def _next_line(self) -> bytes | None:
        i = self._buf.find(b"\n", self._scan_from)
        if i < 0:
            if len(self._buf) >= self.max_line:
                self._buf.clear()
                self._scan_from = 0
                raise ControlError(
                    "line_too_long", f"lines are limited to {self.max_line} bytes", fatal=True
                )
            self._scan_from = len(self._buf)
            return None
        if i + 1 > self.max_line:
            raise ControlError(
                "line_too_long", f"lines are limited to {self.max_line} bytes", fatal=True
            )
        line = bytes(self._buf[:i])
        del self._buf[: i + 1]
        self._scan_from = 0
        return line

    def _parse(self, line: bytes) -> Message:
        fatal = self.state is not State.REGISTERED
        try:
            d = loads_untrusted(line)
        except JsonError as exc:
            raise ControlError(
                "bad_json", f"a line must be one JSON object: {exc.message}", fatal=fatal
            ) from None
        if not isinstance(d, dict):
            raise ControlError("bad_json", "a line must hold a JSON object", fatal=fatal)
        mtype = d.get("type")
        if not isinstance(mtype, str):
            raise ControlError("bad_message", "a message needs a string 'type'", fatal=fatal)
        cls = self._receives.get(mtype)
        if cls is None:
            if mtype in _ALL_TYPES:
                raise ControlError(
                    "unexpected_message",
                    f"a {self.our_role.value} does not accept {mtype!r} messages",
                    fatal=fatal,
                )
            raise ControlError("unknown_type", f"unknown message type {mtype!r}", fatal=fatal)
        try:
            return _from_wire(cls, d)
        except ControlError as exc:
            raise ControlError(exc.code, exc.message, fatal=fatal) from None

    def _receive_message(self, msg: Message) -> Message:
        s = self.state
        if isinstance(msg, Error | Goodbye):
            if isinstance(msg, Goodbye):
                self.state = State.CLOSED
            return msg
        if self.our_role is Role.SERVER:
            if s is State.AWAIT_REGISTER and isinstance(msg, Register):
                self.state = State.REGISTERING
                return msg
            if s is State.REGISTERED or s is State.CLOSED:  # CLOSED: we said goodbye first
                if isinstance(msg, Register):
                    raise ControlError(
                        "already_registered", "this connection is registered", fatal=False
                    )
                return msg
            raise ControlError(
                "not_registered", f"{msg.TYPE!r} before registration completed", fatal=True
            )
        # device side
        if s is State.START and isinstance(msg, Challenge):
            if msg.protocol != PROTOCOL_VERSION:
                raise ControlError(
                    "unsupported_protocol", f"server speaks protocol {msg.protocol}", fatal=True
                )
            self.state = State.AWAIT_REGISTER
            return msg
        if s is State.REGISTERING and isinstance(msg, Welcome):
            self.state = State.REGISTERED
            return msg
        if s in (State.REGISTERED, State.CLOSED) and not isinstance(msg, Challenge | Welcome):
            return msg
        raise ControlError("unexpected_message", f"{msg.TYPE!r} in state {s.value}", fatal=True)

    # -- output ----------------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        s = self.state
        server = self.our_role is Role.SERVER
        if s is State.CLOSED and not isinstance(msg, Error | Goodbye):
            raise LocalProtocolError(f"cannot send {msg.TYPE!r} on a closed connection")
        if server:
            if isinstance(msg, Challenge):
                if s is not State.START:
                    raise LocalProtocolError("challenge sent twice")
                self.state = State.AWAIT_REGISTER
            elif isinstance(msg, Welcome):
                if s is not State.REGISTERING:
                    raise LocalProtocolError("welcome without a pending registration")
                self.state = State.REGISTERED
            elif isinstance(msg, Error):
                if s is State.REGISTERING:
                    self.state = State.AWAIT_REGISTER  # the registration was refused
            elif isinstance(msg, Config | Command) and s is not State.REGISTERED:
                raise LocalProtocolError(f"{msg.TYPE!r} before registration")
            elif not isinstance(msg, Config | Command | Pong | Goodbye):
                raise LocalProtocolError(f"a server does not send {msg.TYPE!r}")
        else:
            if isinstance(msg, Register):
                if s is not State.AWAIT_REGISTER:
                    raise LocalProtocolError("register before the challenge")
                self.state = State.REGISTERING
            elif isinstance(msg, Ack | Ping):
                if s is not State.REGISTERED:
                    raise LocalProtocolError(f"{msg.TYPE!r} before registration")
            elif not isinstance(msg, Goodbye | Error):
                raise LocalProtocolError(f"a device does not send {msg.TYPE!r}")
        if isinstance(msg, Goodbye):
            self.state = State.CLOSED
        return encode_message(msg)
