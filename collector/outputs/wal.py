"""The recording as a write-ahead log for outputs: positions, checkpoints and a forward reader.

Plain synchronous file I/O (the Trio layer runs it in a thread), like collector/core/segments.

A position is (segment number, byte offset in the segment's uncompressed bytes) of the next
record to read. An output's checkpoint is the position after the last record its destination
acknowledged, in a small JSON file replaced atomically (written to a temporary file, fsynced,
renamed): after a crash it is either the old position or the new one, never half of each.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from collector.core.segments import list_segments, read_segment
from collector.wire.recording import (
    MAX_BODY,
    RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
    EventRecord,
    ReadingsRecord,
    RecordingError,
    RecordType,
    ScanReport,
    decode_records,
)

#: the longest record there can be, and the bytes read from an uncompressed segment at a time
MAX_RECORD = RECORD_HEADER_LEN + MAX_BODY
CHUNK = 4 * MAX_RECORD


@attrs.frozen(order=True)
class Position:
    segment: int
    offset: int = SEGMENT_HEADER_LEN

    def to_json(self) -> dict[str, int]:
        return {"segment": self.segment, "offset": self.offset}

    def __str__(self) -> str:
        return f"segment {self.segment}, byte {self.offset}" if self.segment else "its start"


START = Position(0, SEGMENT_HEADER_LEN)


def load_checkpoint(path: str | Path) -> Position | None:
    """The position in a checkpoint file, or None if there is none yet."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        return Position(int(doc["segment"]), int(doc["offset"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecordingError(f"checkpoint {path} cannot be read: {exc}") from None


def save_checkpoint(path: str | Path, pos: Position, extra: dict[str, object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**pos.to_json(), **extra}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@attrs.define
class Chunk:
    """What one read gave: readings records in order, and where the next read starts."""

    records: list[tuple[Any, Position]]  # readings (and events), each with the position after it
    end: Position
    #: segments that were gone (retention) between the position asked and the next one there
    missing: list[int] = attrs.field(factory=list)
    corrupt_bytes: int = 0


class WalReader:
    """Reads readings records forward from a position, across segments, never past the last
    whole record of the segment being written."""

    def __init__(self, directory: str | Path, *, events: bool = False) -> None:
        self.directory = Path(directory)
        #: also yield the session events (ONLINE and OFFLINE records)
        self.wanted: tuple[type, ...] = (
            (ReadingsRecord, EventRecord) if events else (ReadingsRecord,)
        )
        self._gz: tuple[Path, bytes] | None = None  # the compressed segment read last

    def segments(self) -> list[tuple[int, Path]]:
        try:
            return list_segments(self.directory)
        except RecordingError:
            return []  # not created yet

    def read(self, pos: Position, max_records: int) -> Chunk:
        """Up to `max_records` readings records from `pos` on. Segment numbers are consecutive
        (the writer numbers them so), so a gap between `pos` and the next segment there means
        segments deleted (retention): they are listed in `missing`."""
        segments = self.segments()
        chunk = Chunk([], pos)
        for number, path in segments:
            if number < pos.segment:
                continue
            if number > pos.segment:
                if pos.segment:
                    chunk.missing += range(pos.segment, number)
                pos = Position(number, SEGMENT_HEADER_LEN)
            pos, corrupt, at_end = self._read_segment(path, pos, max_records, chunk)
            chunk.corrupt_bytes += corrupt
            chunk.end = pos
            if not at_end or number == segments[-1][0]:
                break
            # a closed segment read to its end: the next read starts in the next one
            pos = chunk.end = Position(number + 1, SEGMENT_HEADER_LEN)
        return chunk

    def _read_segment(
        self, path: Path, pos: Position, limit: int, chunk: Chunk
    ) -> tuple[Position, int, bool]:
        """Records of one segment from `pos` into `chunk` (until it holds `limit`): the position
        after the last one taken, corrupt bytes skipped, and whether the file's end was
        reached (for the live segment: its last whole record)."""
        number, offset, corrupt = pos.segment, pos.offset, 0
        records = chunk.records
        if path.suffix == ".gz":
            if self._gz is None or self._gz[0] != path:
                self._gz = (path, read_segment(path))
            data = self._gz[1]
            report = ScanReport()
            for record in decode_records(data, report, start=offset):
                if type(record) in self.wanted and _session_or_readings(record):
                    records.append((record, Position(number, report.valid_end)))
                    if len(records) >= limit:
                        return Position(number, report.valid_end), report.corrupt_bytes, False
            end = report.valid_end if report.records else offset
            return Position(number, max(end, offset)), report.corrupt_bytes, True
        try:
            f = open(path, "rb")
        except FileNotFoundError:  # compressed or removed meanwhile: the next read sees
            return pos, 0, False
        with f:
            while True:
                f.seek(offset)
                data = f.read(CHUNK)
                if not data:
                    return Position(number, offset), corrupt, True
                report = ScanReport()
                for record in decode_records(data, report, start=0):
                    if type(record) in self.wanted and _session_or_readings(record):
                        at = Position(number, offset + report.valid_end)
                        records.append((record, at))
                        if len(records) >= limit:
                            return at, corrupt + report.corrupt_bytes, False
                corrupt += report.corrupt_bytes
                if report.records:
                    offset += report.valid_end
                elif len(data) == CHUNK:  # no whole record in a full chunk: damage
                    corrupt += CHUNK - MAX_RECORD
                    offset += CHUNK - MAX_RECORD
                else:  # nothing whole after the last record (yet): the end, for now
                    return Position(number, offset), corrupt, True


def readings_after(path: Path, offset: int, match: Callable[[str, str], bool] | None = None) -> int:
    """Readings in a segment after `offset` (that `match(device, metric)` takes): what an
    output loses when retention must delete a segment it has not sent yet."""
    try:
        data = read_segment(path)
    except RecordingError:
        return 0
    n = 0
    for record in decode_records(data, None, start=max(offset, SEGMENT_HEADER_LEN)):
        if type(record) is ReadingsRecord:
            if match is None:
                n += len(record.readings)
            else:
                n += sum(1 for name, _ in record.readings if match(record.device_id, name))
    return n


def _session_or_readings(record: Any) -> bool:
    return type(record) is ReadingsRecord or record.type in (RecordType.ONLINE, RecordType.OFFLINE)


def oldest_needed(positions: Sequence[Position | None]) -> int | None:
    known = [p.segment for p in positions if p is not None]
    return min(known) if known else None
