"""The recording format (sans-IO): segment headers and records, encoded and decoded.

A recording is a directory of segment files `seg-000001.rec`, `seg-000002.rec`, ... (closed
segments may be gzip-compressed: `seg-000001.rec.gz`). Each segment is a 32-byte header and
then records; every record carries a CRC-32, and a sync marker so that a reader can find the
next record after a corrupted one. docs/RECORDING.md is the specification.

    segment header: magic "TCREC\\r\\n\\x1a" | u16 version | u16 flags | u16 header length (32)
                    | u16 0 | u64 created (us) | u32 segment number | u32 CRC-32 of bytes 0..27
    record:         u16 sync 0xC5A3 | u32 body length | u32 CRC-32(length bytes + body) | body
    body:           u8 type | u64 time (us, collector wall clock) | payload

Nothing corrupt is ever returned as data: a record is returned only if its CRC verifies.
Files (listing, reading, appending, repair) are `collector.core.segments`.
"""

from __future__ import annotations

import enum
import math
import operator
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from collector.wire.datagram import (
    DatagramError,
    ReadingPair,
    ValueType,
    decode_readings_untrusted,
    encode_readings,
)
from collector.wire.jsonio import dumps_bytes, loads_object

MAGIC = b"TCREC\r\n\x1a"
VERSION = 1
SEGMENT_HEADER = struct.Struct(">8sHHHHQII")  # ... created_us, segment_no, crc
SEGMENT_HEADER_LEN = SEGMENT_HEADER.size  # 32
SYNC = 0xC5A3
RECORD_HEADER = struct.Struct(">HII")
RECORD_HEADER_LEN = RECORD_HEADER.size  # 10
BODY_HEADER = struct.Struct(">BQ")
MAX_BODY = 1 << 20
_SYNC_BYTES = SYNC.to_bytes(2, "big")
_U32 = struct.Struct(">I")
_READINGS_HEAD = struct.Struct(">IQ")  # seq, device time


class RecordType(enum.IntEnum):
    READINGS = 1  # one accepted TELEMETRY datagram's readings
    HEARTBEAT = 2  # one accepted HEARTBEAT (liveness, for deterministic replay)
    ONLINE = 3  # JSON: device, session_id, transport, address
    OFFLINE = 4  # JSON: device, session_id, reason, duration
    COMMAND = 5  # JSON: a command's state change
    DATAGRAM = 6  # a raw accepted datagram and its source address (optional)
    META = 7  # JSON: recording opened / closed, who wrote it


class RecordingError(Exception):
    """A recording that cannot be read or written, with a message for a person."""


# -- records as values --------------------------------------------------------------------------


@attrs.frozen
class ReadingsRecord:
    time: float
    device_id: str
    seq: int
    device_time_us: int
    readings: tuple[ReadingPair, ...]


@attrs.frozen
class HeartbeatRecord:
    time: float
    device_id: str
    seq: int


@attrs.frozen
class EventRecord:
    """ONLINE, OFFLINE, COMMAND and META records: a JSON object."""

    time: float
    type: RecordType
    data: Mapping[str, Any]

    @property
    def device_id(self) -> str | None:
        return self.data.get("device")


@attrs.frozen
class DatagramRecord:
    time: float
    address: str
    data: bytes


Record = ReadingsRecord | HeartbeatRecord | EventRecord | DatagramRecord


# -- encoding -----------------------------------------------------------------------------------


def encode_segment_header(segment_no: int, created_us: int) -> bytes:
    head = SEGMENT_HEADER.pack(MAGIC, VERSION, 0, SEGMENT_HEADER_LEN, 0, created_us, segment_no, 0)
    return head[:-4] + _U32.pack(zlib.crc32(head[:-4]))


def encode_record(rtype: RecordType, time: float, payload: bytes) -> bytes:
    body = BODY_HEADER.pack(rtype, int(time * 1_000_000)) + payload
    if len(body) > MAX_BODY:
        raise ValueError(f"record of {len(body)} bytes is over the {MAX_BODY}-byte limit")
    length = _U32.pack(len(body))
    return _SYNC_BYTES + length + _U32.pack(zlib.crc32(body, zlib.crc32(length))) + body


def _id(device_id: str) -> bytes:
    raw = device_id.encode("utf-8")
    return bytes([len(raw)]) + raw


def encode_readings_record(
    time: float,
    device_id: str,
    seq: int,
    device_time_us: int,
    readings: Sequence[ReadingPair],
    encoded: bytes = b"",
) -> bytes:
    """`encoded`: the readings already in wire format (a TELEMETRY payload), if at hand."""
    payload = (
        _id(device_id)
        + _READINGS_HEAD.pack(seq, device_time_us)
        + (encoded or encode_readings(readings))
    )
    return encode_record(RecordType.READINGS, time, payload)


def encode_heartbeat_record(time: float, device_id: str, seq: int) -> bytes:
    return encode_record(RecordType.HEARTBEAT, time, _id(device_id) + _U32.pack(seq))


def encode_json_record(rtype: RecordType, time: float, data: Mapping[str, Any]) -> bytes:
    raw = dumps_bytes(data)
    return encode_record(rtype, time, raw)


def encode_datagram_record(time: float, address: str, data: bytes) -> bytes:
    return encode_record(RecordType.DATAGRAM, time, _id(address) + data)


# -- decoding -----------------------------------------------------------------------------------


@attrs.frozen
class SegmentHeader:
    version: int
    created_us: int
    segment_no: int


def decode_segment_header(data: bytes | memoryview, name: str = "segment") -> SegmentHeader:
    if len(data) < SEGMENT_HEADER_LEN:
        raise RecordingError(f"{name}: shorter than a segment header ({len(data)} bytes)")
    magic, version, _flags, hlen, _, created, segno, crc = SEGMENT_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RecordingError(f"{name}: not a recording segment (bad magic)")
    if zlib.crc32(bytes(data[: SEGMENT_HEADER_LEN - 4])) != crc:
        raise RecordingError(f"{name}: segment header is corrupt (CRC mismatch)")
    if version > VERSION:
        raise RecordingError(
            f"{name}: recording format version {version} is newer than this reader "
            f"(version {VERSION}): upgrade trio-collector to read it"
        )
    if hlen != SEGMENT_HEADER_LEN:
        raise RecordingError(f"{name}: unexpected header length {hlen}")
    return SegmentHeader(version, created, segno)


@attrs.define
class ScanReport:
    """What a scan found besides valid records."""

    records: int = 0
    corrupt_regions: list[tuple[int, int]] = attrs.field(factory=list)  # skipped (start, end)
    torn_tail: tuple[int, int] | None = None  # (start, end) of what follows the last record
    valid_end: int = SEGMENT_HEADER_LEN  # end offset of the last valid record
    undecodable: int = 0  # records whose CRC verified but whose payload did not decode

    @property
    def corrupt_bytes(self) -> int:
        return sum(e - s for s, e in self.corrupt_regions)


def _valid_at(buf: memoryview, pos: int, n: int) -> int:
    """Length of the valid record at `pos`, or -1."""
    if n - pos < RECORD_HEADER_LEN:
        return -1
    sync, length, crc = RECORD_HEADER.unpack_from(buf, pos)
    if sync != SYNC or length < BODY_HEADER.size or length > MAX_BODY:
        return -1
    end = pos + RECORD_HEADER_LEN + length
    if end > n:
        return -1
    if zlib.crc32(buf[pos + RECORD_HEADER_LEN : end], zlib.crc32(buf[pos + 2 : pos + 6])) != crc:
        return -1
    return RECORD_HEADER_LEN + length


def _next_valid(buf: memoryview, find: Callable[[bytes, int], int], pos: int, n: int) -> int:
    """The offset of the next sync marker after `pos` at which a valid record starts, or -1."""
    nxt = pos + 1
    while True:
        nxt = find(_SYNC_BYTES, nxt)
        if nxt < 0 or _valid_at(buf, nxt, n) > 0:
            return nxt
        nxt += 1


def scan_records(
    data: bytes | memoryview, report: ScanReport | None = None, start: int = SEGMENT_HEADER_LEN
) -> Iterator[tuple[int, memoryview]]:
    """Yield (record type, body) for every valid record after `start`, skipping corruption.

    After a record that does not verify, the scan looks for the next sync marker at which a
    valid record starts; the bytes in between are a corrupt region. Bytes after the last valid
    record that hold no valid record (a torn write, zeros, garbage) are the torn tail.
    """
    buf = memoryview(data)
    n = len(buf)
    report = report if report is not None else ScanReport()
    pos = start
    find = bytes(buf).find if isinstance(data, memoryview) else data.find  # type: ignore[union-attr]
    while pos < n:
        size = _valid_at(buf, pos, n)
        if size > 0:
            report.records += 1
            body = buf[pos + RECORD_HEADER_LEN : pos + size]
            pos += size
            report.valid_end = pos
            yield body[0], body
            continue
        nxt = _next_valid(buf, find, pos, n)
        if nxt < 0:
            report.torn_tail = (pos, n)
            return
        report.corrupt_regions.append((pos, nxt))
        pos = nxt


def decode_body(body: memoryview) -> Record:
    """A record's body as a value; raises RecordingError if it does not decode."""
    try:
        rtype, time_us = BODY_HEADER.unpack_from(body)
        time = time_us / 1_000_000
        p = body[BODY_HEADER.size :]
        if rtype == RecordType.READINGS:
            n = p[0]
            device_id = bytes(p[1 : 1 + n]).decode("utf-8")
            seq, dtime = _READINGS_HEAD.unpack_from(p, 1 + n)
            readings = decode_readings_untrusted(bytes(p[1 + n + _READINGS_HEAD.size :]))
            return ReadingsRecord(time, device_id, seq, dtime, tuple(readings))
        if rtype == RecordType.HEARTBEAT:
            n = p[0]
            return HeartbeatRecord(
                time, bytes(p[1 : 1 + n]).decode("utf-8"), _U32.unpack_from(p, 1 + n)[0]
            )
        if rtype in (RecordType.ONLINE, RecordType.OFFLINE, RecordType.COMMAND, RecordType.META):
            data = loads_object(p)
            return EventRecord(time, RecordType(rtype), data)
        if rtype == RecordType.DATAGRAM:
            n = p[0]
            return DatagramRecord(time, bytes(p[1 : 1 + n]).decode("utf-8"), bytes(p[1 + n :]))
    except (IndexError, struct.error, UnicodeDecodeError, ValueError, DatagramError) as exc:
        raise RecordingError(f"record of type {body[0]} does not decode: {exc}") from None
    raise RecordingError(f"unknown record type {rtype}")


# -- decoding a whole segment at once -------------------------------------------------------------
#
# `decode_records` is `scan_records` and then `decode_body` for each record, fused into one
# faster loop (docs/PERFORMANCE.md, "Recording"). A reader spends nearly all its time on
# READINGS records, and a recording holds the same few shapes of them over and over (the same
# devices send the same metrics), only the values change. For a shape seen before, one
# precompiled struct unpacks the whole body straight out of the segment's bytes, the lengths,
# names and type bytes are compared with the shape's as one tuple, the values are checked as
# the datagram decoder checks them, and a small function made for the shape builds the record.
# Anything else (a shape not seen yet, a value that needs a closer look, every other record
# type) goes to `decode_body`, so both give the same records; tests/test_recording_decoder.py
# checks it on random, damaged and hostile segments.


def _slot_setters() -> tuple[Callable[[Any, Any], None], ...] | None:
    """Setters for ReadingsRecord's slots, to build one without its __init__ (half the cost
    of a frozen attrs __init__); None if that would skip something __init__ does."""
    fields = attrs.fields(ReadingsRecord)
    if any(f.validator or f.converter for f in fields) or any(
        hasattr(ReadingsRecord, hook) for hook in ("__attrs_pre_init__", "__attrs_post_init__")
    ):
        return None
    return tuple(getattr(ReadingsRecord, f.name).__set__ for f in fields)


_READINGS_SETTERS = _slot_setters()


def _builder(names: Sequence[str], values: list[int], floats: list[int], bools: list[int]) -> Any:
    """`build(fields, device_id)`: the ReadingsRecord for one shape's unpacked fields, or None
    if a value needs decode_body's closer look. Only field indices go into the source."""
    checks = [f"f[{i}] > 1" for i in bools]
    if floats:  # a sum is finite only if every term is (one that overflows: decode_body)
        checks.insert(0, "not isfinite(" + " + ".join(f"f[{i}]" for i in floats) + ")")
    pairs = "".join(
        f"(n{k}, f[{i}]{' == 1' if i in bools else ''}), " for k, i in enumerate(values)
    )
    src = "def build(f, device_id):\n"
    if checks:
        src += f"    if {' or '.join(checks)}:\n        return None\n"
    if _READINGS_SETTERS is None:
        src += f"    return R(f[1] / 1000000, device_id, f[4], f[5], ({pairs}))\n"
    else:
        src += (
            "    r = new(R)\n    s0(r, f[1] / 1000000)\n    s1(r, device_id)\n"
            f"    s2(r, f[4])\n    s3(r, f[5])\n    s4(r, ({pairs}))\n    return r\n"
        )
    ns: dict[str, Any] = {f"n{k}": name for k, name in enumerate(names)}
    ns.update(isfinite=math.isfinite, new=object.__new__, R=ReadingsRecord)
    ns.update({f"s{k}": setter for k, setter in enumerate(_READINGS_SETTERS or ())})
    exec(src, ns)
    return ns["build"]


_VALUE_FORMATS = {ValueType.FLOAT: "d", ValueType.INT: "q", ValueType.BOOL: "B"}


class _BodyLayout:
    """The shape of a READINGS record body: the id's length, names and fixed-size value types.

    Everything but the device id, seq, times and values is the skeleton. Between two values
    it is contiguous (the count or the previous value, then name length, name and type byte),
    so the struct unpacks it as one bytes field per reading.
    """

    __slots__ = ("build", "size", "skeleton", "skeleton_of", "unpack_from")

    def __init__(self, id_len: int, items: Sequence[tuple[bytes, int]]) -> None:
        fmt = f">BQB{id_len}sIQ"  # type, time | id length, id, seq, device time
        skel_idx = [0, 2]
        skeleton: list[Any] = [int(RecordType.READINGS), id_len]
        values, floats, bools = [], [], []
        lead = bytes([len(items)])
        for i, (raw, vtype) in enumerate(items):
            chunk = lead + bytes([len(raw)]) + raw + bytes([vtype])
            lead = b""
            fmt += f"{len(chunk)}s{_VALUE_FORMATS[vtype]}"
            skel_idx.append(6 + 2 * i)
            skeleton.append(chunk)
            values.append(7 + 2 * i)
            if vtype == ValueType.FLOAT:
                floats.append(7 + 2 * i)
            elif vtype == ValueType.BOOL:
                bools.append(7 + 2 * i)
        packer = struct.Struct(fmt)
        self.size = packer.size
        self.unpack_from = packer.unpack_from
        self.skeleton_of = operator.itemgetter(*skel_idx)
        self.skeleton = tuple(skeleton)
        self.build = _builder([raw.decode("ascii") for raw, _ in items], values, floats, bools)


#: body length -> the shapes of that length seen before (module-wide and bounded, like the
#: datagram decoder's)
_BODY_LAYOUTS: dict[int, list[_BodyLayout]] = {}
_BODY_LAYOUTS_MAX = 1024
_LAYOUTS_PER_LENGTH = 8
#: device ids seen before, raw bytes -> text (bounded)
_IDS: dict[bytes, str] = {}
_IDS_MAX = 65536


def _learn(body_len: int, record: ReadingsRecord) -> None:
    """Remember the shape of a READINGS record that decoded, if its values have fixed sizes."""
    items = []
    for name, value in record.readings:
        if isinstance(value, str):
            return
        vtype = (
            ValueType.BOOL
            if isinstance(value, bool)
            else ValueType.INT
            if isinstance(value, int)
            else ValueType.FLOAT
        )
        items.append((name.encode("ascii"), vtype))
    layouts = _BODY_LAYOUTS.get(body_len)
    if layouts is None:
        if len(_BODY_LAYOUTS) >= _BODY_LAYOUTS_MAX:
            return
        layouts = _BODY_LAYOUTS[body_len] = []
    if len(layouts) >= _LAYOUTS_PER_LENGTH:
        return
    layout = _BodyLayout(len(record.device_id.encode("utf-8")), items)
    if layout.size == body_len and all(k.skeleton != layout.skeleton for k in layouts):
        layouts.append(layout)


def _device_id(raw: bytes) -> str | None:
    """The text of a device id, remembered (bounded); None if it is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(_IDS) < _IDS_MAX:
        _IDS[raw] = text
    return text


def decode_records(
    data: bytes | bytearray | memoryview,
    report: ScanReport | None = None,
    start: int = SEGMENT_HEADER_LEN,
) -> Iterator[Record]:
    """What `decode_body` makes of each record that `scan_records` yields, in one loop.

    `report` is kept exactly as `scan_records` keeps it; records that verify but do not
    decode are counted in `report.undecodable` and skipped.
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    buf = memoryview(data)
    n = len(data)
    report = report if report is not None else ScanReport()
    unpack_head = RECORD_HEADER.unpack_from
    crc32 = zlib.crc32
    layouts_of = _BODY_LAYOUTS.get
    ids = _IDS
    length_crcs: dict[int, int] = {}  # CRC-32 of the length field, by length
    none: list[_BodyLayout] = []
    pos = start
    while pos < n:
        if n - pos >= RECORD_HEADER_LEN:  # the checks of _valid_at, inline
            sync, length, crc = unpack_head(data, pos)
            body_at = pos + RECORD_HEADER_LEN
            end = body_at + length
            if sync == SYNC and 9 <= length <= MAX_BODY and end <= n:
                lcrc = length_crcs.get(length)
                if lcrc is None:
                    lcrc = length_crcs[length] = crc32(_U32.pack(length))
                if crc32(buf[body_at:end], lcrc) == crc:
                    pos = end
                    report.records += 1
                    report.valid_end = end
                    record: Record | None = None
                    if data[body_at] == 1:  # READINGS (an IntEnum compares slowly)
                        for layout in layouts_of(length, none):
                            f = layout.unpack_from(data, body_at)
                            if layout.skeleton_of(f) == layout.skeleton:
                                device_id = ids.get(f[3]) or _device_id(f[3])
                                if device_id is not None:
                                    record = layout.build(f, device_id)
                                break
                    if record is None:
                        try:
                            record = decode_body(buf[body_at:end])
                        except RecordingError:
                            report.undecodable += 1
                            continue
                        if type(record) is ReadingsRecord:
                            _learn(length, record)
                    yield record
                    continue
        nxt = _next_valid(buf, data.find, pos, n)
        if nxt < 0:
            report.torn_tail = (pos, n)
            return
        report.corrupt_regions.append((pos, nxt))
        pos = nxt
