"""The recording format (sans-IO codec, plus plain-file reading and appending).

A recording is a directory of segment files `seg-000001.rec`, `seg-000002.rec`, ... (closed
segments may be gzip-compressed: `seg-000001.rec.gz`). Each segment is a 32-byte header and
then records; every record carries a CRC-32, and a sync marker so that a reader can find the
next record after a corrupted one. docs/RECORDING.md is the specification.

    segment header: magic "TCREC\\r\\n\\x1a" | u16 version | u16 flags | u16 header length (32)
                    | u16 0 | u64 created (us) | u32 segment number | u32 CRC-32 of bytes 0..27
    record:         u16 sync 0xC5A3 | u32 body length | u32 CRC-32(length bytes + body) | body
    body:           u8 type | u64 time (us, collector wall clock) | payload

Nothing corrupt is ever returned as data: a record is returned only if its CRC verifies.
"""

from __future__ import annotations

import enum
import gzip
import json
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .datagram import DatagramError, ReadingPair, decode_readings_untrusted, encode_readings

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
SEGMENT_RE = re.compile(r"seg-(\d{6,})\.rec(\.gz)?\Z")


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
    raw = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str).encode()
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
            data = json.loads(bytes(p))
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return EventRecord(time, RecordType(rtype), data)
        if rtype == RecordType.DATAGRAM:
            n = p[0]
            return DatagramRecord(time, bytes(p[1 : 1 + n]).decode("utf-8"), bytes(p[1 + n :]))
    except (IndexError, struct.error, UnicodeDecodeError, ValueError, DatagramError) as exc:
        raise RecordingError(f"record of type {body[0]} does not decode: {exc}") from None
    raise RecordingError(f"unknown record type {rtype}")


# -- segment files --------------------------------------------------------------------------------


def segment_name(segment_no: int) -> str:
    return f"seg-{segment_no:06d}.rec"


def list_segments(directory: str | Path) -> list[tuple[int, Path]]:
    """The segments of a recording directory, oldest first."""
    directory = Path(directory)
    if not directory.exists():
        raise RecordingError(f"recording directory {directory} does not exist")
    if not directory.is_dir():
        raise RecordingError(f"{directory} is not a directory")
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise RecordingError(
            f"cannot read recording directory {directory}: {exc.strerror}"
        ) from None
    out = []
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            out.append((int(m.group(1)), directory / name))
    return sorted(out)


def read_segment(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise RecordingError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


@attrs.define
class SegmentReport:
    path: Path
    header: SegmentHeader
    scan: ScanReport


class RecordingReader:
    """Reads every valid record of a recording directory, segment by segment, in order."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.segments = list_segments(self.directory)
        self.reports: list[SegmentReport] = []

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def records(self) -> Iterator[Record]:
        self.reports = []
        for _, path in self.segments:
            data = read_segment(path)
            header = decode_segment_header(data, str(path))
            report = SegmentReport(path, header, ScanReport())
            self.reports.append(report)
            for _rtype, body in scan_records(data, report.scan):
                try:
                    yield decode_body(body)
                except RecordingError:
                    report.scan.undecodable += 1

    @property
    def corrupt_regions(self) -> int:
        return sum(len(r.scan.corrupt_regions) for r in self.reports)

    @property
    def torn_tails(self) -> int:
        return sum(1 for r in self.reports if r.scan.torn_tail is not None)

    def problems(self) -> list[str]:
        """One line per corruption found, for a person."""
        out = []
        for r in self.reports:
            for s, e in r.scan.corrupt_regions:
                out.append(f"{r.path.name}: skipped {e - s} corrupt bytes at offset {s}")
            if r.scan.torn_tail is not None:
                s, e = r.scan.torn_tail
                out.append(
                    f"{r.path.name}: {e - s} bytes after the last valid record (torn tail) at {s}"
                )
            if r.scan.undecodable:
                out.append(
                    f"{r.path.name}: {r.scan.undecodable} records verified but did not decode"
                )
        return out


# -- appending -------------------------------------------------------------------------------


@attrs.define
class RepairReport:
    segment: Path | None
    truncated_bytes: int = 0
    corrupt_regions: int = 0


class SegmentWriter:
    """Appends records to the newest segment of a directory (synchronous file I/O).

    Opening repairs the newest segment: a torn tail is truncated, so appending continues right
    after the last valid record. Corruption in the middle of a file is left for readers to skip.
    Segments rotate by size and age; retention deletes the oldest closed segments.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        segment_bytes: int = 64 * 2**20,
        segment_seconds: float = 3600.0,
        retain_seconds: float | None = 7 * 86400.0,
        retain_bytes: int | None = 2**30,
        compress: bool = False,
        fsync: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self.retain_seconds = retain_seconds
        self.retain_bytes = retain_bytes
        self.compress = compress
        self.fsync = fsync
        self.fd: int | None = None
        self.lock_fd: int | None = None
        self.path: Path | None = None
        self.segment_no = 0
        self.size = 0
        self.opened_at = 0.0
        self.repair = RepairReport(None)

    def open(self, now: float | None = None) -> RepairReport:
        """Open the newest segment for appending (repairing it), or start the first one.

        `now` (wall clock, seconds) is passed in rather than read here, so that callers on a
        virtual clock stay on it; the default is time.time()."""
        now = time.time() if now is None else now
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecordingError(
                f"cannot create recording directory {self.directory}: {exc.strerror}"
            ) from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise RecordingError(f"recording directory {self.directory} is not writable")
        self._lock()
        segments = list_segments(self.directory)
        if segments and segments[-1][1].suffix == ".rec":
            self.segment_no, path = segments[-1]
            self._reopen(path, now)
        else:
            self.segment_no = segments[-1][0] if segments else 0
            self._new_segment(now)
        return self.repair

    def _lock(self) -> None:
        """One writer per directory: two would interleave their records in one segment."""
        import fcntl

        path = self.directory / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RecordingError(
                f"recording directory {self.directory} is in use by another process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd

    def _reopen(self, path: Path, now: float) -> None:
        data = path.read_bytes()
        if len(data) < SEGMENT_HEADER_LEN:
            # A segment that died before its header was complete holds nothing: start it over.
            self.repair = RepairReport(path, len(data))
            path.unlink()
            self.segment_no -= 1
            self._new_segment(now)
            return
        header = decode_segment_header(data, str(path))
        report = ScanReport()
        for _ in scan_records(data, report):
            pass
        self.repair = RepairReport(path, len(data) - report.valid_end, len(report.corrupt_regions))
        fd = os.open(path, os.O_WRONLY)
        try:
            if report.valid_end < len(data):
                os.ftruncate(fd, report.valid_end)
            os.lseek(fd, report.valid_end, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.path, self.size = fd, path, report.valid_end
        self.opened_at = header.created_us / 1e6

    def _new_segment(self, now: float) -> None:
        self.segment_no += 1
        path = self.directory / segment_name(self.segment_no)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.fd, self.path = fd, path
        self.opened_at = now
        header = encode_segment_header(self.segment_no, int(self.opened_at * 1e6))
        self._write_all(header)
        self.size = len(header)

    def _write_all(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def write(self, data: bytes, now: float | None = None) -> list[Path]:
        """Append `data` (whole records). Returns the segments closed by rotation, if any.

        A failed write (a full disk) raises OSError after truncating back to the last whole
        record, so the file never keeps half a record from this process.
        """
        now = time.time() if now is None else now
        closed: list[Path] = []
        if self.fd is None:
            raise RecordingError("the recording is closed")
        if self.size > SEGMENT_HEADER_LEN and (
            self.size + len(data) > self.segment_bytes
            or now - self.opened_at >= self.segment_seconds
        ):
            closed.append(self.rotate(now))
        start = self.size
        try:
            self._write_all(data)
        except OSError:
            try:
                os.ftruncate(self.fd, start)
                os.lseek(self.fd, start, os.SEEK_SET)
            except OSError:
                pass
            raise
        self.size += len(data)
        if self.fsync:
            os.fsync(self.fd)
        return closed

    def rotate(self, now: float) -> Path:
        assert self.path is not None
        closed = self.path
        self.close()  # the file; the directory lock stays
        self._new_segment(now)
        return closed

    def close(self) -> None:
        if self.fd is not None:
            if self.fsync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Close the file and give up the directory lock (another writer may then open it)."""
        self.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def compress_segment(self, path: Path) -> Path:
        """gzip a closed segment (written to a temporary name, then renamed: crash-safe)."""
        target = path.with_name(path.name + ".gz")
        tmp = path.with_name(path.name + ".gz.tmp")
        with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)
        path.unlink()
        return target

    def apply_retention(self, now: float | None = None) -> list[Path]:
        """Delete the oldest closed segments beyond the age and total-size limits."""
        now = time.time() if now is None else now
        segments = [p for _, p in list_segments(self.directory) if p != self.path]
        removed = []
        if self.retain_seconds is not None:
            for p in list(segments):
                if now - p.stat().st_mtime > self.retain_seconds:
                    p.unlink()
                    removed.append(p)
                    segments.remove(p)
        if self.retain_bytes is not None:
            total = sum(p.stat().st_size for p in segments) + self.size
            while segments and total > self.retain_bytes:
                p = segments.pop(0)
                total -= p.stat().st_size
                p.unlink()
                removed.append(p)
        return removed
