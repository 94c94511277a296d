"""History of one metric over a time range, downsampled: min, mean and max per bucket.

`GET /api/history` (docs/API.md) answers from two places. The hub's rings (the last
`[stream] history` points of every series) cover recent minutes; a recording covers days. Both
are reduced the same way, by `Buckets`: the range is cut into `buckets` equal intervals, and
each interval keeps the min, the max, the sum and the count of the readings in it (of one
device, and of all the devices asked for together). Nothing here does I/O but `scan_recording`,
which reads segment files and is run in a worker thread by the HTTP server.

A scan reads whole segments (a segment is at most `[recording] segment_mb`), skips those that
end before the range from their headers' creation times, looks at a READINGS record's time and
device id before it decodes its readings, and stops at `max_bytes`: the answer then says
`truncated` and up to which time it got.
"""

from __future__ import annotations

import fnmatch
import gzip
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from collector.core.segments import list_segments, read_segment_salvaging
from collector.wire.datagram import DatagramError, decode_readings_untrusted
from collector.wire.recording import (
    BODY_HEADER,
    SEGMENT_HEADER_LEN,
    RecordingError,
    RecordType,
    decode_segment_header,
    scan_records,
)

MAX_BUCKETS = 2000
MAX_SPAN = 10 * 366 * 86400.0
MAX_SERIES = 50  # per-device series in one answer; the aggregate covers any number
MAX_DEVICES_GLOBS = 32
DEFAULT_MAX_BYTES = 1 << 30
#: how long before a segment began a record in it may have been received: the recorder writes
#: in batches (every `[recording] flush_interval`, 0.2 s), so a batch can land in the segment
#: created after some of its records arrived; a generous bound
LATE_WRITES = 60.0
_READINGS = int(RecordType.READINGS)
_READINGS_HEAD_LEN = 12  # u32 seq, u64 device time


class HistoryError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.define(slots=True)
class Buckets:
    start: float
    end: float
    n: int
    lo: list[float] = attrs.field(init=False)
    hi: list[float] = attrs.field(init=False)
    total: list[float] = attrs.field(init=False)
    count: list[int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.lo = [math.inf] * self.n
        self.hi = [-math.inf] * self.n
        self.total = [0.0] * self.n
        self.count = [0] * self.n

    @property
    def width(self) -> float:
        return (self.end - self.start) / self.n

    def add(self, t: float, v: float) -> None:
        if t < self.start:
            return
        i = int((t - self.start) / (self.end - self.start) * self.n)
        if i >= self.n:
            return
        if v < self.lo[i]:
            self.lo[i] = v
        if v > self.hi[i]:
            self.hi[i] = v
        self.total[i] += v
        self.count[i] += 1

    def to_json(self) -> dict[str, list[Any]]:
        """Only the buckets that hold readings: t is a bucket's start."""
        w = self.width
        keep = [i for i in range(self.n) if self.count[i]]
        return {
            "t": [round(self.start + i * w, 6) for i in keep],
            "min": [self.lo[i] for i in keep],
            "mean": [self.total[i] / self.count[i] for i in keep],
            "max": [self.hi[i] for i in keep],
            "count": [self.count[i] for i in keep],
        }


@attrs.define
class HistoryQuery:
    metric: str
    devices: tuple[str, ...]  # globs
    start: float
    end: float
    buckets: int
    per_device: bool = False

    def device_match(self) -> Callable[[str], bool]:
        globs = self.devices
        if globs == ("*",):
            return lambda d: True
        return lambda d: any(fnmatch.fnmatchcase(d, g) for g in globs)


def parse_query(q: Mapping[str, list[str]], now: float) -> HistoryQuery:
    """The query string of GET /api/history; HistoryError for anything wrong."""

    def one(key: str, default: str | None = None) -> str:
        v = q.get(key)
        if not v:
            if default is None:
                raise HistoryError("bad_history", f"{key} is required")
            return default
        return v[0]

    def number(key: str, default: float) -> float:
        raw = q.get(key)
        if not raw:
            return default
        try:
            value = float(raw[0])
        except ValueError:
            raise HistoryError(
                "bad_history", f"{key} must be a number, not {raw[0][:40]!r}"
            ) from None
        if not math.isfinite(value):
            raise HistoryError("bad_history", f"{key} must be finite")
        return value

    metric = one("metric")
    if not 0 < len(metric) <= 128:
        raise HistoryError("bad_history", "metric is a name of 1-128 characters")
    devices = tuple(g for raw in q.get("devices", ["*"]) for g in raw.split(",") if g)
    if not devices or len(devices) > MAX_DEVICES_GLOBS:
        raise HistoryError("bad_history", f"devices: 1-{MAX_DEVICES_GLOBS} ids or globs")
    end = number("to", now)
    start = number("from", end - 3600.0)
    if not start < end:
        raise HistoryError("bad_history", "from must be before to")
    if not (0 <= start and end <= 4e9 and end - start <= MAX_SPAN):
        raise HistoryError("bad_history", "from and to are Unix seconds, at most 10 years apart")
    buckets = number("buckets", 300)
    if buckets != int(buckets) or not 1 <= buckets <= MAX_BUCKETS:
        raise HistoryError("bad_history", f"buckets is a whole number from 1 to {MAX_BUCKETS}")
    per_device = one("per_device", "0") not in ("0", "false", "")
    return HistoryQuery(metric, devices, start, end, int(buckets), per_device)


@attrs.define
class History:
    """What one query found: the aggregate over all matched devices, and per device."""

    query: HistoryQuery
    source: str  # memory | recording
    aggregate: Buckets = attrs.field(init=False)
    series: dict[str, Buckets] = attrs.field(factory=dict)
    devices: set[str] = attrs.field(factory=set)
    dropped_devices: set[str] = attrs.field(factory=set)  # beyond MAX_SERIES: aggregate only
    scanned_bytes: int = 0
    segments: int = 0
    truncated: bool = False
    reached: float | None = None  # a truncated scan got this far (collector time)
    problems: list[str] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        q = self.query
        self.aggregate = Buckets(q.start, q.end, q.buckets)

    def add(self, device_id: str, t: float, v: float) -> None:
        self.aggregate.add(t, v)
        self.devices.add(device_id)
        if not self.query.per_device:
            return
        b = self.series.get(device_id)
        if b is None:
            if len(self.series) >= MAX_SERIES:
                self.dropped_devices.add(device_id)
                return
            q = self.query
            b = self.series[device_id] = Buckets(q.start, q.end, q.buckets)
        b.add(t, v)

    def to_json(self) -> dict[str, Any]:
        q = self.query
        out: dict[str, Any] = {
            "metric": q.metric,
            "devices": list(q.devices),
            "from": q.start,
            "to": q.end,
            "bucket": (q.end - q.start) / q.buckets,
            "source": self.source,
            "matched_devices": len(self.devices),
            "aggregate": self.aggregate.to_json(),
        }
        if q.per_device:
            out["series"] = {d: b.to_json() for d, b in sorted(self.series.items())}
            out["series_dropped"] = len(self.dropped_devices)
        if self.source == "recording":
            out.update(
                scanned_bytes=self.scanned_bytes,
                segments=self.segments,
                truncated=self.truncated,
                reached=self.reached,
                problems=self.problems[:20],
            )
        return out


def _numeric(v: Any) -> bool:
    """Numbers, and booleans as 0 and 1 (as the hub's rings and the charts keep them)."""
    return isinstance(v, int | float)


def from_memory(query: HistoryQuery, rings: Iterable[tuple[str, Mapping[str, Any]]]) -> History:
    """From the hub's rings: (device id, {metric: SeriesRing}) for every device."""
    out = History(query, "memory")
    match = query.device_match()
    for device_id, series in rings:
        ring = series.get(query.metric)
        if ring is None or not match(device_id):
            continue
        for t, v in zip(ring.t, ring.v, strict=True):
            if query.start <= t < query.end:
                out.add(device_id, t, v)
    return out


def memory_covers(query: HistoryQuery, rings: Iterable[tuple[str, Mapping[str, Any]]]) -> bool:
    """Whether the rings hold the whole range: every matched series reaches back to its start,
    and there is at least one. (Used only when a recording could answer instead: memory that
    begins after `from`, after a restart or for a new device, is not enough then.)"""
    match = query.device_match()
    found = False
    for device_id, series in rings:
        ring = series.get(query.metric)
        if ring is None or not match(device_id) or not ring.t:
            continue
        found = True
        if ring.t[max(0, len(ring.t) - ring.maxlen)] > query.start:
            return False
    return found


def scan_recording(
    directory: str | Path,
    query: HistoryQuery,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    cancelled: Callable[[], bool] = lambda: False,
) -> History:
    """Read the range from a recording directory (blocking: run it in a thread)."""
    out = History(query, "recording")
    segments = list_segments(directory)
    created: list[float | None] = []
    for _, path in segments:
        try:
            # a compressed segment's header is its first decompressed bytes
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as f:
                head = f.read(SEGMENT_HEADER_LEN)
            created.append(decode_segment_header(head, str(path)).created_us / 1e6)
        except (OSError, EOFError, zlib.error, RecordingError):
            created.append(None)  # damaged: read it to know
    match = query.device_match()
    known: dict[bytes, bool] = {}
    metric = query.metric
    start, end = query.start, query.end
    unpack_time = BODY_HEADER.unpack_from
    for i, (_, path) in enumerate(segments):
        nxt = next((c for c in created[i + 1 :] if c is not None), None)
        if nxt is not None and nxt <= start:
            # The next segment began at or before the range's start: every record in this one
            # was written, and so received, before that.
            continue
        if created[i] is not None and created[i] >= end + LATE_WRITES:  # type: ignore[operator]
            break  # a segment holds records received at most LATE_WRITES before it began
        if out.scanned_bytes >= max_bytes or cancelled():
            out.truncated = True
            break
        data, damage = read_segment_salvaging(path)
        if damage:
            out.problems.append(f"{path.name}: {damage}")
        out.segments += 1
        out.scanned_bytes += len(data)
        try:
            decode_segment_header(data, str(path))
        except RecordingError as exc:
            out.problems.append(str(exc))
            continue
        for rtype, body in scan_records(data):
            if rtype != _READINGS:
                continue
            if len(body) < 10:
                continue
            t = unpack_time(body)[1] / 1e6
            if t < start or t >= end:
                continue
            out.reached = t
            n = body[9]
            if len(body) < 10 + n + _READINGS_HEAD_LEN:
                continue  # CRC-valid but too short to be a READINGS record: not ours
            raw_id = bytes(body[10 : 10 + n])
            ok = known.get(raw_id)
            if ok is None:
                try:
                    ok = known[raw_id] = match(raw_id.decode("utf-8"))
                except UnicodeDecodeError:
                    ok = known[raw_id] = False
            if not ok:
                continue
            try:
                readings = decode_readings_untrusted(bytes(body[10 + n + _READINGS_HEAD_LEN :]))
            except DatagramError:
                continue
            for name, value in readings:
                if name == metric and _numeric(value):
                    out.add(raw_id.decode("utf-8"), t, float(value))
    return out
