"""Recording segment files: listing, reading (skipping corruption), appending with repair,
rotation, compression and retention. Plain synchronous file I/O; the record codec is
`collector.wire.recording` and docs/RECORDING.md is the specification.
"""

from __future__ import annotations

import gzip
import heapq
import os
import re
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from collector.wire.recording import (
    BODY_HEADER,
    SEGMENT_HEADER_LEN,
    EventRecord,
    Record,
    RecordingError,
    RecordType,
    ScanReport,
    SegmentHeader,
    decode_body,
    decode_records,
    decode_segment_header,
    encode_segment_header,
    scan_records,
)

SEGMENT_RE = re.compile(r"seg-(\d{6,})\.rec(\.gz)?\Z")
_SESSION_TYPES = (int(RecordType.ONLINE), int(RecordType.OFFLINE), int(RecordType.META))


def _record_time(body: memoryview) -> float:
    return BODY_HEADER.unpack_from(body)[1] / 1_000_000


def _track_sessions(body: memoryview, sessions: dict[Any, dict[str, Any]]) -> None:
    """Follow which sessions are open through ONLINE, OFFLINE and META records."""
    try:
        record = decode_body(body)
    except RecordingError:
        return
    if not isinstance(record, EventRecord):
        return
    data = record.data
    if record.type is RecordType.ONLINE:
        sessions[data.get("session_id")] = {**data, "since": record.time}
    elif record.type is RecordType.OFFLINE:
        sessions.pop(data.get("session_id"), None)
    elif data.get("event") == "open":  # a new writer: nothing before it is still open
        sessions.clear()
    elif data.get("event") == "segment":  # a segment's preamble: what was open at its start
        sessions.clear()
        for s in data.get("open") or ():
            if isinstance(s, dict):
                sessions[s.get("session_id")] = dict(s)


# -- segment files --------------------------------------------------------------------------------


def segment_name(segment_no: int) -> str:
    return f"seg-{segment_no:06d}.rec"


def list_segments(directory: str | Path) -> list[tuple[int, Path]]:
    """The segments of a recording directory, oldest first, one path per segment number.

    A compression interrupted by a crash can leave both `seg-N.rec` and `seg-N.rec.gz` (the
    rename happened, the unlink did not): the uncompressed original wins. Temporary files
    (`.gz.tmp`) are never segments.
    """
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
    by_number: dict[int, Path] = {}
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            n = int(m.group(1))
            if n not in by_number or not m.group(2):  # .rec over .rec.gz
                by_number[n] = directory / name
    return sorted(by_number.items())


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


def read_segment_salvaging(path: Path) -> tuple[bytes, str | None]:
    """The bytes of a segment, and what went wrong reading it (None if nothing did).

    A damaged compressed segment gives what decompressed before the damage (its records are
    then checked one by one as usual); a file that cannot be read at all gives no bytes.
    """
    if path.suffix != ".gz":
        try:
            return path.read_bytes(), None
        except OSError as exc:
            return b"", f"cannot read it: {exc.strerror}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return b"", f"cannot read it: {exc.strerror}"
    out = bytearray()
    d = zlib.decompressobj(wbits=31)  # gzip
    try:
        for i in range(0, len(raw), 1 << 16):
            out += d.decompress(raw[i : i + (1 << 16)])
            while d.eof and d.unused_data:  # concatenated gzip members
                rest = d.unused_data
                d = zlib.decompressobj(wbits=31)
                out += d.decompress(rest)
        if not d.eof:
            return bytes(out), "the compressed data ends early"
    except zlib.error as exc:
        return bytes(out), f"damaged compressed data ({exc}); read what came before it"
    return bytes(out), None


@attrs.define
class SegmentReport:
    path: Path
    header: SegmentHeader | None  # None: the header did not decode (the segment was skipped)
    scan: ScanReport
    damage: str | None = None  # why the segment was skipped, or only partly read


class RecordingReader:
    """Reads every valid record of a recording directory, segment by segment, in order.

    A damaged segment (a header cut short or corrupt, compressed data that does not
    decompress) costs only itself: it is counted (`damaged_segments`), described in
    `problems()`, and what could be read of it is. A segment of a newer format version stops
    the reader with a RecordingError: it cannot know what the records mean.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.segments = list_segments(self.directory)
        self.reports: list[SegmentReport] = []

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def records(self) -> Iterator[Record]:
        self.reports = []
        for _, path in self.segments:
            data, damage = read_segment_salvaging(path)
            try:
                header = decode_segment_header(data, str(path))
            except RecordingError as exc:
                if "newer than this reader" in str(exc):
                    raise
                self.reports.append(
                    SegmentReport(path, None, ScanReport(), damage or str(exc).split(": ", 1)[-1])
                )
                continue
            report = SegmentReport(path, header, ScanReport(), damage)
            self.reports.append(report)
            yield from decode_records(data, report.scan)

    @property
    def corrupt_regions(self) -> int:
        return sum(len(r.scan.corrupt_regions) for r in self.reports)

    @property
    def torn_tails(self) -> int:
        return sum(1 for r in self.reports if r.scan.torn_tail is not None)

    @property
    def damaged_segments(self) -> int:
        return sum(1 for r in self.reports if r.damage is not None)

    def problems(self) -> list[str]:
        """One line per corruption found, for a person."""
        out = []
        for r in self.reports:
            if r.damage is not None:
                what = "skipped" if r.header is None else "partly read"
                out.append(f"{r.path.name}: damaged segment, {what}: {r.damage}")
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


class MergedReader:
    """The records of several recording directories (the nodes of a cluster, each recording
    its own: docs/SCALING.md), merged by time. The same interface as RecordingReader; each
    segment's name in `reports` and `problems()` is that of its own directory's file."""

    def __init__(self, directories: Sequence[str | Path]) -> None:
        self.readers = [RecordingReader(d) for d in directories]
        self.directory = self.readers[0].directory
        self.segments = [s for r in self.readers for s in r.segments]

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def records(self) -> Iterator[Record]:
        return heapq.merge(*(r.records() for r in self.readers), key=_time_of)

    @property
    def reports(self) -> list[SegmentReport]:
        return [rep for r in self.readers for rep in r.reports]

    @property
    def corrupt_regions(self) -> int:
        return sum(r.corrupt_regions for r in self.readers)

    @property
    def torn_tails(self) -> int:
        return sum(r.torn_tails for r in self.readers)

    @property
    def damaged_segments(self) -> int:
        return sum(r.damaged_segments for r in self.readers)

    def problems(self) -> list[str]:
        return [f"{r.directory}/{p}" for r in self.readers for p in r.problems()]


def _time_of(record: Record) -> float:
    return record.time


def open_recording(directories: Sequence[str | Path]) -> RecordingReader | MergedReader:
    """A reader of one recording directory, or of several merged by time."""
    if len(directories) == 1:
        return RecordingReader(directories[0])
    return MergedReader(directories)


# -- appending -------------------------------------------------------------------------------


@attrs.define
class RepairReport:
    """What opening a recording for appending found and did."""

    segment: Path | None
    truncated_bytes: int = 0
    corrupt_regions: int = 0
    #: sessions that were open when the last writer stopped without closing them (a crash):
    #: the ONLINE data of each (device, session_id, transport, address, since)
    open_sessions: list[dict[str, Any]] = attrs.field(factory=list)
    last_time: float | None = None  # of the last valid record, wall clock seconds
    damaged: str | None = None  # the newest segment could not be appended to: why
    cleaned: list[str] = attrs.field(factory=list)  # leftovers removed (interrupted compression)


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
        cleaned = self._clean_leftovers()
        segments = list_segments(self.directory)
        if segments and segments[-1][1].suffix == ".rec":
            self.segment_no, path = segments[-1]
            self._reopen(path, now)
        else:
            self.segment_no = segments[-1][0] if segments else 0
            self._new_segment(now)
        self.repair.cleaned = cleaned
        return self.repair

    def _clean_leftovers(self) -> list[str]:
        """Finish what a crash interrupted: a compression's temporary file goes, and where a
        segment exists both compressed and not, the compressed copy goes (the original is
        complete; list_segments already prefers it)."""
        removed = []
        names = set(os.listdir(self.directory))
        for name in sorted(names):
            leftover = name.endswith(".rec.gz.tmp") or (
                name.endswith(".rec.gz") and name[: -len(".gz")] in names
            )
            if leftover and name.startswith("seg-"):
                try:
                    (self.directory / name).unlink()
                    removed.append(name)
                except OSError:
                    pass
        return removed

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
        try:
            header = decode_segment_header(data, str(path))
        except RecordingError as exc:
            if "newer than this reader" in str(exc):
                raise RecordingError(
                    f"{exc}; this collector cannot append to it: record to another directory"
                ) from None
            # A damaged header: leave the segment for readers (which skip and count it) and
            # go on in a new one.
            self.repair = RepairReport(path, damaged=str(exc))
            self._new_segment(now)
            return
        report = ScanReport()
        sessions: dict[Any, dict[str, Any]] = {}
        last_time: float | None = None
        for rtype, body in scan_records(data, report):
            if rtype in _SESSION_TYPES:
                _track_sessions(body, sessions)
            last_time = _record_time(body)
        self.repair = RepairReport(
            path,
            len(data) - report.valid_end,
            len(report.corrupt_regions),
            open_sessions=list(sessions.values()),
            last_time=last_time,
        )
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

    def write(
        self,
        data: bytes,
        now: float | None = None,
        preamble: Callable[[], bytes] | None = None,
    ) -> list[Path]:
        """Append `data` (whole records). Returns the segments closed by rotation, if any.

        `preamble()` (whole records) is written first if the write starts a new segment: the
        recorder puts there what a reader of that segment alone needs (the open sessions).

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
            if preamble is not None:
                data = preamble() + data
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

    def apply_retention(
        self,
        now: float | None = None,
        *,
        keep_from: int | None = None,
        forced: Callable[[Path, int], None] | None = None,
    ) -> list[Path]:
        """Delete the oldest closed segments beyond the age and total-size limits.

        Segments numbered `keep_from` and later (what outputs have not sent yet) are kept
        from the age limit; the size limit deletes them too when it must, calling
        `forced(path, number)` first."""
        now = time.time() if now is None else now
        segments = [(n, p) for n, p in list_segments(self.directory) if p != self.path]
        removed = []
        if self.retain_seconds is not None:
            for n, p in list(segments):
                if keep_from is not None and n >= keep_from:
                    continue
                if now - p.stat().st_mtime > self.retain_seconds:
                    p.unlink()
                    removed.append(p)
                    segments.remove((n, p))
        if self.retain_bytes is not None:
            total = sum(p.stat().st_size for _, p in segments) + self.size
            while segments and total > self.retain_bytes:
                n, p = segments.pop(0)
                total -= p.stat().st_size
                if forced is not None and keep_from is not None and n >= keep_from:
                    forced(p, n)
                p.unlink()
                removed.append(p)
        return removed
