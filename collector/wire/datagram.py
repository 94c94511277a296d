"""The UDP datagram codec (sans-IO): bytes in, values out, and back.

Wire layout (all integers big-endian), specified in docs/PROTOCOL.md::

    0      1      2      3      4          8          12                  20
    +------+------+------+------+----------+----------+-------------------+---------+-----+
    | ver  | type | flags| rsvd | session  | sequence | device time (us)  | payload | tag |
    +------+------+------+------+----------+----------+-------------------+---------+-----+

The tag is HMAC-SHA256 over header and payload, truncated to TAG_LEN bytes.

Nothing here does I/O or keeps state between datagrams; the anti-replay window lives in
`collector.wire.replay_window` and the per-session logic in `collector.core.ingest`.
"""

from __future__ import annotations

import enum
import hmac
import math
import operator
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias

import attrs

from collector.wire.jsonio import JsonError, dumps_bytes, loads_object

VERSION = 1
HEADER = struct.Struct(">BBBBIIQ")
HEADER_LEN = HEADER.size  # 20
TAG_LEN = 16
MIN_DATAGRAM = HEADER_LEN + TAG_LEN
#: Largest datagram the collector accepts by default: fits a 1280-byte IPv6 minimum MTU with
#: room for IP and UDP headers, so nothing is ever fragmented.
MAX_DATAGRAM = 1200
MAX_SEQ = 0xFFFF_FFFF
NONCE_LEN = 16
#: HELLO must be at least this long, which is exactly the size of a WELCOME, so the collector
#: never answers with more bytes than it received.
WELCOME_PAYLOAD = struct.Struct(">16sIIHH")
WELCOME_LEN = HEADER_LEN + WELCOME_PAYLOAD.size + TAG_LEN  # 64
MIN_HELLO_LEN = WELCOME_LEN
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
    device_id: str
    client_nonce: bytes


@attrs.frozen
class Welcome:
    server_nonce: bytes
    heartbeat_ms: int
    timeout_ms: int
    max_datagram: int


@attrs.frozen
class AckPayload:
    acked_seq: int
    result: Mapping[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Tags


def compute_tag(key: bytes, signed: bytes | memoryview) -> bytes:
    return hmac.digest(key, signed, "sha256")[:TAG_LEN]


def verify_tag(key: bytes, data: bytes) -> bool:
    """Constant-time check of the tag at the end of `data` (a whole datagram)."""
    return hmac.compare_digest(
        hmac.digest(key, data[:-TAG_LEN], "sha256")[:TAG_LEN], data[-TAG_LEN:]
    )


# ---------------------------------------------------------------------------------------------
# Encoding


def encode_datagram(
    key: bytes,
    type: DatagramType,
    session_id: int,
    seq: int,
    timestamp_us: int,
    payload: bytes = b"",
    *,
    flags: Flag = Flag.NONE,
) -> bytes:
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"sequence number out of range: {seq}")
    header = HEADER.pack(VERSION, type, flags, 0, session_id, seq, timestamp_us)
    signed = header + payload
    return signed + compute_tag(key, signed)


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


def encode_hello_payload(device_id: str, client_nonce: bytes) -> bytes:
    if not DEVICE_ID_RE.match(device_id):
        raise ValueError(f"bad device id {device_id!r}")
    if len(client_nonce) != NONCE_LEN:
        raise ValueError("client nonce must be 16 bytes")
    payload = bytes([len(device_id)]) + device_id.encode("ascii") + client_nonce
    minimum = MIN_HELLO_LEN - HEADER_LEN - TAG_LEN
    return payload + bytes(max(0, minimum - len(payload)))


def encode_welcome_payload(w: Welcome) -> bytes:
    return WELCOME_PAYLOAD.pack(w.server_nonce, w.heartbeat_ms, w.timeout_ms, w.max_datagram, 0)


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


def payload_of(data: bytes) -> bytes:
    return data[HEADER_LEN:-TAG_LEN]


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


def decode_hello_untrusted(payload: bytes) -> Hello:
    if len(payload) < MIN_HELLO_LEN - HEADER_LEN - TAG_LEN:
        raise DatagramError("malformed", "HELLO shorter than a WELCOME")
    n = payload[0]
    try:
        device_id = payload[1 : 1 + n].decode("ascii")
    except UnicodeDecodeError:
        raise DatagramError("malformed", "HELLO device id is not ASCII") from None
    if len(device_id) != n or not DEVICE_ID_RE.match(device_id):
        raise DatagramError("malformed", f"HELLO has a bad device id {device_id!r}")
    nonce = payload[1 + n : 1 + n + NONCE_LEN]
    if len(nonce) != NONCE_LEN:
        raise DatagramError("malformed", "HELLO nonce truncated")
    if any(payload[1 + n + NONCE_LEN :]):
        raise DatagramError("malformed", "HELLO padding is not zero")
    return Hello(device_id, nonce)


def decode_welcome_untrusted(payload: bytes) -> Welcome:
    if len(payload) != WELCOME_PAYLOAD.size:
        raise DatagramError("malformed", f"WELCOME payload is {len(payload)} bytes")
    nonce, hb, to, maxd, _ = WELCOME_PAYLOAD.unpack(payload)
    return Welcome(nonce, hb, to, maxd)


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
