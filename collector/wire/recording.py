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
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from collector.wire.datagram import (
    DatagramError,
    ReadingPair,
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
        nxt = pos + 1
        while True:
            nxt = find(_SYNC_BYTES, nxt)
            if nxt < 0 or _valid_at(buf, nxt, n) > 0:
                break
            nxt += 1
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
