"""The UDP datagram codec of protocol version 2 (sans-IO): bytes in, values out, and back.

Wire layout (all integers big-endian), specified in docs/PROTOCOL.md section 3::

    0      1      2      3      4          8          12                  20
    +------+------+------+------+----------+----------+-------------------+------------+-----+
    | ver  | type | flags| rsvd | session  | sequence | device time (us)  | ciphertext | tag |
    +------+------+------+------+----------+----------+-------------------+------------+-----+

The header travels in the clear (the collector routes on the session id before it decrypts)
and is the AEAD's associated data; the payload is encrypted with ChaCha20-Poly1305 under the
session key of its direction (`collector.wire.crypto`). HELLO, COOKIE and WELCOME, which set a
session up, have their own layouts (section 3.5).

Nothing here does I/O or keeps state between datagrams; the anti-replay window lives in
`collector.wire.replay_window` and the per-session logic in `collector.core.ingest`.
"""

from __future__ import annotations

import enum
import math
import operator
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias

import attrs

from collector.wire.crypto import (
    COLLECTOR_TO_DEVICE,
    COOKIE_LEN,
    DEVICE_TO_COLLECTOR,
    NONCE_LEN,
    TAG_LEN,
    Aead,
    InvalidTag,
    session_nonce,
)
from collector.wire.jsonio import JsonError, dumps_bytes, loads_object

VERSION = 2
HEADER = struct.Struct(">BBBBIIQ")
HEADER_LEN = HEADER.size  # 20
MIN_DATAGRAM = HEADER_LEN + TAG_LEN  # 36: a header and the tag of an empty payload
#: Largest datagram the collector accepts by default: fits a 1280-byte IPv6 minimum MTU with
#: room for IP and UDP headers, so nothing is ever fragmented.
MAX_DATAGRAM = 1200
MAX_SEQ = 0xFFFF_FFFF
CLIENT_NONCE_LEN = 16  # the device's and the collector's registration nonces
WELCOME_FIELDS = struct.Struct(">IIHH")  # heartbeat ms, timeout ms, max datagram, flags (0)
#: The smallest HELLO (a one-character device id): 82 bytes. A COOKIE, the only answer to a
#: HELLO that has not proved its address, is 76: the collector never amplifies.
MIN_HELLO_LEN = HEADER_LEN + 1 + 1 + NONCE_LEN + CLIENT_NONCE_LEN + COOKIE_LEN + TAG_LEN
COOKIE_DATAGRAM_LEN = HEADER_LEN + 2 * NONCE_LEN + COOKIE_LEN + TAG_LEN  # 76
NO_COOKIE = bytes(COOKIE_LEN)
U32 = struct.Struct(">I")
F64 = struct.Struct(">d")
I64 = struct.Struct(">q")

NAME_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}\Z")
DEVICE_ID_RE = NAME_RE
MAX_READINGS = 255
MAX_STRING = 255


class DatagramType(enum.IntEnum):
    HEARTBEAT = 1
    TELEMETRY = 2
    ACK = 3
    COMMAND = 4
    HELLO = 5
    WELCOME = 6
    GOODBYE = 7
    COOKIE = 8


#: Who may send each type (a datagram of the wrong direction is `malformed`).
DEVICE_SENDS = frozenset(
    {
        DatagramType.HEARTBEAT,
        DatagramType.TELEMETRY,
        DatagramType.ACK,
        DatagramType.HELLO,
        DatagramType.GOODBYE,
    }
)
COLLECTOR_SENDS = frozenset(
    {
        DatagramType.ACK,
        DatagramType.COMMAND,
        DatagramType.WELCOME,
        DatagramType.GOODBYE,
        DatagramType.COOKIE,
    }
)


class Flag(enum.IntFlag):
    NONE = 0
    ACK_REQUESTED = 0x01


class ValueType(enum.IntEnum):
    FLOAT = 1
    INT = 2
    BOOL = 3
    STRING = 4


Value: TypeAlias = float | int | bool | str
ReadingPair: TypeAlias = tuple[str, Value]  # what decoders return; a Reading is one too

_KNOWN_TYPES = frozenset(int(t) for t in DatagramType)
_KNOWN_FLAGS = int(Flag.ACK_REQUESTED)


class DatagramError(ValueError):
    """A datagram that cannot be accepted. `reason` is the rejection counter it belongs to."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@attrs.frozen
class Header:
    version: int
    type: DatagramType
    flags: Flag
    session_id: int
    seq: int
    timestamp_us: int

    @property
    def ack_requested(self) -> bool:
        return bool(self.flags & Flag.ACK_REQUESTED)


class Reading(NamedTuple):
    """One metric value: a (name, value) pair. `value` keeps its wire type.

    Decoders return plain `(name, value)` tuples, which compare equal to Readings: one pair is
    made per reading on the ingest path, and a plain tuple is the cheapest value Python has.
    So code that takes readings unpacks them (`for name, value in readings`) rather than using
    the attribute names.
    """

    name: str
    value: Value


@attrs.frozen
class Hello:
    """A HELLO as it arrives: the clear part (who, and the AEAD nonce) and what it seals."""

    device_id: str
    nonce: bytes  # the AEAD nonce, 12 random bytes
    associated: bytes  # header, id length, id and nonce: authenticated, not encrypted
    sealed: bytes  # ciphertext and tag


@attrs.frozen
class Welcome:
    heartbeat_ms: int
    timeout_ms: int
    max_datagram: int
    config: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class AckPayload:
    acked_seq: int
    result: Mapping[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Sealing and opening: the datagrams of a session


def seal_datagram(
    aead: Aead,
    type: DatagramType,
    session_id: int,
    seq: int,
    timestamp_us: int,
    payload: bytes = b"",
    *,
    flags: Flag = Flag.NONE,
    direction: int = DEVICE_TO_COLLECTOR,
) -> bytes:
    """One datagram of a session: the header in the clear, the payload sealed under `aead`
    (the session key of `direction`) with the nonce made of the session id, the direction and
    the sequence number."""
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence number out of range: {seq}")
    header = HEADER.pack(VERSION, type, flags, 0, session_id, seq, timestamp_us)
    return header + aead.encrypt(session_nonce(session_id, direction, seq), payload, header)


def encode_datagram(
    key: bytes,
    type: DatagramType,
    session_id: int,
    seq: int,
    timestamp_us: int,
    payload: bytes = b"",
    *,
    flags: Flag = Flag.NONE,
    direction: int = DEVICE_TO_COLLECTOR,
) -> bytes:
    """`seal_datagram` with a key rather than an AEAD object (for tools and tests; a session
    keeps its AEAD objects)."""
    return seal_datagram(
        Aead(key), type, session_id, seq, timestamp_us, payload, flags=flags, direction=direction
    )


def open_datagram_untrusted(aead: Aead, data: bytes, direction: int = DEVICE_TO_COLLECTOR) -> bytes:
    """The payload of a session's datagram whose header was already checked; raises
    DatagramError("bad_tag") if it does not authenticate under `aead`."""
    session_id, seq = _SID_SEQ.unpack_from(data, 4)
    try:
        return aead.decrypt(
            session_nonce(session_id, direction, seq), data[HEADER_LEN:], data[:HEADER_LEN]
        )
    except InvalidTag:
        raise DatagramError("bad_tag", "does not authenticate") from None


_SID_SEQ = struct.Struct(">II")


# ---------------------------------------------------------------------------------------------
# Registration datagrams: HELLO, COOKIE, WELCOME


def encode_hello(
    aead: Aead,
    device_id: str,
    client_nonce: bytes,
    cookie: bytes = NO_COOKIE,
    timestamp_us: int = 0,
    nonce: bytes | None = None,
) -> bytes:
    """A HELLO: `aead` is the device's device-to-collector hello key; `cookie` the one a COOKIE
    gave (zeros in the first HELLO); `nonce` a fresh random 12 bytes unless given (vectors)."""
    if not DEVICE_ID_RE.match(device_id):
        raise ValueError(f"bad device id {device_id!r}")
    if len(client_nonce) != CLIENT_NONCE_LEN or len(cookie) != COOKIE_LEN:
        raise ValueError("the client nonce and the cookie are 16 bytes each")
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    head = HEADER.pack(VERSION, DatagramType.HELLO, 0, 0, 0, 0, timestamp_us)
    associated = head + bytes([len(device_id)]) + device_id.encode("ascii") + nonce
    return associated + aead.encrypt(nonce, client_nonce + cookie, associated)


def parse_hello_untrusted(data: bytes) -> Hello:
    """The clear part of a HELLO whose header was checked (no key needed yet)."""
    n = len(data)
    if n < MIN_HELLO_LEN:
        raise DatagramError("malformed", f"HELLO of {n} bytes is shorter than {MIN_HELLO_LEN}")
    idlen = data[HEADER_LEN]
    end = HEADER_LEN + 1 + idlen
    raw = data[HEADER_LEN + 1 : end]
    try:
        device_id = raw.decode("ascii")
    except UnicodeDecodeError:
        raise DatagramError("malformed", "HELLO device id is not ASCII") from None
    if not DEVICE_ID_RE.match(device_id):
        raise DatagramError("malformed", f"HELLO has a bad device id {device_id[:70]!r}")
    sealed = data[end + NONCE_LEN :]
    if len(sealed) != CLIENT_NONCE_LEN + COOKIE_LEN + TAG_LEN:
        raise DatagramError("malformed", "HELLO has the wrong length for its device id")
    return Hello(device_id, data[end : end + NONCE_LEN], data[: end + NONCE_LEN], sealed)


def open_hello(aead: Aead, hello: Hello) -> tuple[bytes, bytes]:
    """(client nonce, cookie) of a HELLO; DatagramError("bad_tag") if it does not authenticate
    under the device's device-to-collector hello key."""
    try:
        plain = aead.decrypt(hello.nonce, hello.sealed, hello.associated)
    except InvalidTag:
        raise DatagramError(
            "bad_tag", f"HELLO from {hello.device_id} does not authenticate"
        ) from None
    return plain[:CLIENT_NONCE_LEN], plain[CLIENT_NONCE_LEN:]


def encode_cookie(
    aead: Aead, cookie: bytes, hello_nonce: bytes, timestamp_us: int = 0, nonce: bytes | None = None
) -> bytes:
    """A COOKIE answering the HELLO whose nonce was `hello_nonce` (echoed in the clear, so a
    device, or a tool registering many, knows which HELLO it answers): the cookie sealed under
    the device's collector-to-device hello key with a fresh random nonce."""
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    head = HEADER.pack(VERSION, DatagramType.COOKIE, 0, 0, 0, 0, timestamp_us) + hello_nonce + nonce
    return head + aead.encrypt(nonce, cookie, head)


def answered_hello_untrusted(data: bytes) -> bytes:
    """The HELLO nonce a COOKIE or a WELCOME echoes (which HELLO it answers)."""
    if len(data) < HEADER_LEN + NONCE_LEN + TAG_LEN:
        raise DatagramError("malformed", "too short for a COOKIE or a WELCOME")
    return data[HEADER_LEN : HEADER_LEN + NONCE_LEN]


def open_cookie_untrusted(aead: Aead, data: bytes, hello_nonce: bytes) -> bytes:
    if len(data) != COOKIE_DATAGRAM_LEN:
        raise DatagramError("malformed", f"COOKIE of {len(data)} bytes, not {COOKIE_DATAGRAM_LEN}")
    if data[HEADER_LEN : HEADER_LEN + NONCE_LEN] != hello_nonce:
        raise DatagramError("malformed", "COOKIE for another HELLO")
    head = data[: HEADER_LEN + 2 * NONCE_LEN]
    try:
        return aead.decrypt(data[HEADER_LEN + NONCE_LEN : len(head)], data[len(head) :], head)
    except InvalidTag:
        raise DatagramError("bad_tag", "COOKIE does not authenticate") from None


def encode_welcome(
    aead: Aead,
    session_id: int,
    server_nonce: bytes,
    hello_nonce: bytes,
    welcome: Welcome,
    timestamp_us: int = 0,
) -> bytes:
    """A WELCOME answering the HELLO whose nonce was `hello_nonce` (echoed in the clear, like
    the collector's nonce, which the device needs to derive the session keys), sealed under
    the new session's collector-to-device key with sequence number 0, which no other datagram
    of the session uses."""
    if len(server_nonce) != CLIENT_NONCE_LEN:
        raise ValueError("the server nonce is 16 bytes")
    head = (
        HEADER.pack(VERSION, DatagramType.WELCOME, 0, 0, session_id, 0, timestamp_us)
        + hello_nonce
        + server_nonce
    )
    plain = WELCOME_FIELDS.pack(welcome.heartbeat_ms, welcome.timeout_ms, welcome.max_datagram, 0)
    if welcome.config:
        plain += dumps_bytes(dict(welcome.config))
    return head + aead.encrypt(session_nonce(session_id, COLLECTOR_TO_DEVICE, 0), plain, head)


_WELCOME_HEAD = HEADER_LEN + NONCE_LEN + CLIENT_NONCE_LEN


def welcome_nonce_untrusted(data: bytes) -> tuple[int, bytes]:
    """(session id, server nonce) of a WELCOME, to derive the keys that open it."""
    if len(data) < _WELCOME_HEAD + WELCOME_FIELDS.size + TAG_LEN:
        raise DatagramError("malformed", "WELCOME too short")
    return _SID_SEQ.unpack_from(data, 4)[0], data[HEADER_LEN + NONCE_LEN : _WELCOME_HEAD]


def open_welcome_untrusted(aead: Aead, data: bytes) -> Welcome:
    session_id, _ = welcome_nonce_untrusted(data)
    head = data[:_WELCOME_HEAD]
    try:
        plain = aead.decrypt(
            session_nonce(session_id, COLLECTOR_TO_DEVICE, 0), data[_WELCOME_HEAD:], head
        )
    except InvalidTag:
        raise DatagramError("bad_tag", "WELCOME does not authenticate") from None
    hb, to, maxd, _flags = WELCOME_FIELDS.unpack_from(plain)
    config = (
        _json_object(plain[WELCOME_FIELDS.size :], "WELCOME config")
        if len(plain) > WELCOME_FIELDS.size
        else {}
    )
    return Welcome(hb, to, maxd, config)


# ---------------------------------------------------------------------------------------------
# Payloads


def encode_heartbeat_payload(uptime_s: int) -> bytes:
    return U32.pack(uptime_s & MAX_SEQ)


def encode_readings(readings: Mapping[str, Value] | Iterable[ReadingPair]) -> bytes:
    """Encode readings for a TELEMETRY payload; raises ValueError on anything not encodable."""
    items = (
        list(readings.items())
        if isinstance(readings, Mapping)
        else [(r[0], r[1]) for r in readings]
    )
    if not 1 <= len(items) <= MAX_READINGS:
        raise ValueError(f"a datagram carries 1 to {MAX_READINGS} readings, not {len(items)}")
    out = bytearray([len(items)])
    for name, value in items:
        if not NAME_RE.match(name):
            raise ValueError(f"bad metric name {name!r}")
        out.append(len(name))
        out += name.encode("ascii")
        if isinstance(value, bool):
            out += bytes([ValueType.BOOL, 1 if value else 0])
        elif isinstance(value, int):
            out.append(ValueType.INT)
            out += I64.pack(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"metric {name!r}: non-finite value")
            out.append(ValueType.FLOAT)
            out += F64.pack(value)
        elif isinstance(value, str):
            raw = value.encode("utf-8")
            if len(raw) > MAX_STRING:
                raise ValueError(f"metric {name!r}: string longer than {MAX_STRING} bytes")
            out += bytes([ValueType.STRING, len(raw)])
            out += raw
        else:
            raise ValueError(f"metric {name!r}: unsupported value type {type(value).__name__}")
    return bytes(out)


def encode_ack_payload(acked_seq: int, result: Mapping[str, Any] | None = None) -> bytes:
    out = U32.pack(acked_seq)
    if result is not None:
        out += dumps_bytes(result)
    return out


def encode_command_payload(command_id: str, name: str, args: Mapping[str, Any]) -> bytes:
    body = {"id": command_id, "name": name, "args": dict(args)}
    return dumps_bytes(body)


def encode_goodbye_payload(reason: str) -> bytes:
    return reason.encode("utf-8")[:MAX_STRING]


# ---------------------------------------------------------------------------------------------
# Decoding untrusted bytes. Every function raises DatagramError and nothing else on bad input.


def decode_header_untrusted(data: bytes, max_size: int = MAX_DATAGRAM) -> Header:
    """Check size, version, type and flags; does not verify the tag."""
    n = len(data)
    if n > max_size:
        raise DatagramError("too_large", f"{n} bytes > {max_size}")
    if n < MIN_DATAGRAM:
        raise DatagramError("malformed", f"{n} bytes is shorter than header and tag")
    version, typ, flags, reserved, session_id, seq, ts = HEADER.unpack_from(data)
    if version != VERSION:
        raise DatagramError("malformed", f"unsupported version {version}")
    if typ not in _KNOWN_TYPES:
        raise DatagramError("malformed", f"unknown type {typ}")
    if flags & ~_KNOWN_FLAGS or reserved:
        raise DatagramError("malformed", f"unknown flags {flags:#04x}/{reserved:#04x}")
    return Header(version, DatagramType(typ), Flag(flags), session_id, seq, ts)


def decode_heartbeat_untrusted(payload: bytes) -> int:
    if len(payload) != 4:
        raise DatagramError("malformed", f"heartbeat payload is {len(payload)} bytes, not 4")
    return U32.unpack(payload)[0]


def decode_readings_untrusted(payload: bytes) -> Sequence[ReadingPair]:
    fast = _decode_known_layout(payload)
    if fast is not None:
        return fast
    try:
        return _decode_readings(payload)
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise DatagramError("malformed", f"truncated or bad telemetry payload ({exc})") from None


class _Layout:
    """A payload shape seen before: the same names and fixed-size value types in the same order.

    Devices send the same shape over and over, only the values change. For a known shape one
    struct unpacks the whole payload; the names, lengths and type bytes it unpacks are then
    compared with the shape's (so a different payload of the same length is not mistaken for
    it), and only the values are checked (finite floats, bools 0 or 1).
    """

    __slots__ = (
        "bools", "floats", "floats_of", "names", "skeleton", "skeleton_of", "struct", "values_of",
    )  # fmt: skip

    def __init__(self, items: list[tuple[bytes, int]]) -> None:
        fmt = ">B"
        skel_idx: list[int] = [0]
        val_idx: list[int] = []
        skeleton: list[Any] = [len(items)]
        i = 1
        self.floats: list[int] = []
        self.bools: list[int] = []
        for k, (raw, vtype) in enumerate(items):
            fmt += (
                f"B{len(raw)}sB"
                + {ValueType.FLOAT: "d", ValueType.INT: "q", ValueType.BOOL: "B"}[vtype]
            )
            skel_idx += [i, i + 1, i + 2]
            skeleton += [len(raw), raw, int(vtype)]
            val_idx.append(i + 3)
            if vtype == ValueType.FLOAT:
                self.floats.append(k)
            elif vtype == ValueType.BOOL:
                self.bools.append(k)
            i += 4
        self.struct = struct.Struct(fmt)
        self.skeleton_of = operator.itemgetter(*skel_idx)
        self.skeleton = tuple(skeleton)
        self.values_of = _getter(val_idx)
        self.floats_of = _getter(self.floats) if self.floats else None
        self.names = tuple(raw.decode("ascii") for raw, _ in items)


def _getter(indices: list[int]) -> Any:
    """itemgetter that always returns a tuple, even for one index."""
    if len(indices) == 1:
        j = indices[0]
        return lambda t: (t[j],)
    return operator.itemgetter(*indices)


#: first name's length byte and bytes -> {payload length: layout}
_LAYOUTS: dict[bytes, dict[int, _Layout]] = {}
_LAYOUTS_MAX = 256


def _decode_known_layout(p: bytes) -> tuple[ReadingPair, ...] | None:
    if len(p) < 3:
        return None
    by_size = _LAYOUTS.get(p[1 : 2 + p[1]])
    if by_size is None:
        return None
    layout = by_size.get(len(p))
    if layout is None:
        return None
    fields = layout.struct.unpack(p)
    if layout.skeleton_of(fields) != layout.skeleton:
        return None
    values = layout.values_of(fields)
    # One check for all the floats: a sum is finite only if every term is (a sum that
    # overflows takes the slow path, which accepts it).
    if layout.floats_of is not None and not math.isfinite(sum(layout.floats_of(values))):
        return None
    if layout.bools:
        values = list(values)
        for k in layout.bools:
            if values[k] > 1:
                return None  # the slow path says why
            values[k] = values[k] == 1
    return tuple(zip(layout.names, values, strict=True))


def _learn_layout(p: bytes, readings: list[ReadingPair]) -> None:
    """Remember the shape of a payload that decoded, if all its values have a fixed size."""
    items = []
    for r in readings:
        v = r[1]
        if isinstance(v, str):
            return
        vtype = (
            ValueType.BOOL
            if isinstance(v, bool)
            else ValueType.INT
            if isinstance(v, int)
            else ValueType.FLOAT
        )
        items.append((r[0].encode("ascii"), vtype))
    by_size = _LAYOUTS.get(p[1 : 2 + p[1]])
    if by_size is None:
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            return
        by_size = _LAYOUTS[p[1 : 2 + p[1]]] = {}
    if len(by_size) < 16:
        by_size[len(p)] = _Layout(items)


#: Metric names seen before, raw bytes -> validated name: devices send the same few names over
#: and over, so most readings skip the decode and the pattern match. Bounded.
_NAMES: dict[bytes, str] = {}
_NAMES_MAX = 4096


def _decode_readings(p: bytes) -> list[ReadingPair]:
    count = p[0]
    if count == 0:
        raise DatagramError("malformed", "telemetry with no readings")
    pos = 1
    out: list[ReadingPair] = []
    names = _NAMES
    seen: set[str] = set()
    for _ in range(count):
        nlen = p[pos]
        raw = p[pos + 1 : pos + 1 + nlen]
        name = names.get(raw)
        if name is None:
            name = raw.decode("ascii")
            if len(name) != nlen or not NAME_RE.match(name):
                raise DatagramError("malformed", f"bad metric name {name!r}")
            if len(names) < _NAMES_MAX:
                names[raw] = name
        if name in seen:
            raise DatagramError("malformed", f"metric {name!r} twice in one datagram")
        seen.add(name)
        pos += 1 + nlen
        vtype = p[pos]
        pos += 1
        value: Value
        if vtype == ValueType.FLOAT:
            value = F64.unpack_from(p, pos)[0]
            if not math.isfinite(value):
                raise DatagramError("malformed", f"metric {name!r}: non-finite value")
            pos += 8
        elif vtype == ValueType.INT:
            value = I64.unpack_from(p, pos)[0]
            pos += 8
        elif vtype == ValueType.BOOL:
            b = p[pos]
            if b > 1:
                raise DatagramError("malformed", f"metric {name!r}: bool byte {b}")
            value = b == 1
            pos += 1
        elif vtype == ValueType.STRING:
            slen = p[pos]
            raw = p[pos + 1 : pos + 1 + slen]
            if len(raw) != slen:
                raise DatagramError("malformed", f"metric {name!r}: truncated string")
            value = raw.decode("utf-8")
            pos += 1 + slen
        else:
            raise DatagramError("malformed", f"metric {name!r}: unknown value type {vtype}")
        out.append((name, value))
    if pos != len(p):
        raise DatagramError("malformed", f"{len(p) - pos} trailing bytes after readings")
    _learn_layout(p, out)
    return out


def decode_ack_untrusted(payload: bytes) -> AckPayload:
    if len(payload) < 4:
        raise DatagramError("malformed", "ACK payload shorter than 4 bytes")
    (acked,) = U32.unpack_from(payload)
    if len(payload) == 4:
        return AckPayload(acked, None)
    result = _json_object(payload[4:], "ACK result")
    return AckPayload(acked, result)


def decode_command_untrusted(payload: bytes) -> tuple[str, str, dict[str, Any]]:
    body = _json_object(payload, "COMMAND")
    cid, name, args = body.get("id"), body.get("name"), body.get("args", {})
    if not isinstance(cid, str) or not isinstance(name, str) or not isinstance(args, dict):
        raise DatagramError("malformed", "COMMAND needs string id and name and an object args")
    return cid, name, args


def decode_goodbye_untrusted(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise DatagramError("malformed", "GOODBYE reason is not UTF-8") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        return loads_object(raw)
    except JsonError as exc:
        raise DatagramError("malformed", f"{what}: {exc.message}") from None
