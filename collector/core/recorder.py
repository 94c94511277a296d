"""The recorder: appends every accepted reading, heartbeat and session event to segment files.

It is a listener like the stream hub: ingest hands it batches synchronously, it encodes them
into an in-memory buffer (bounded: what does not fit is dropped and counted, ingest never
waits), and a flusher task writes the buffer in one batch from a worker thread at most
`flush_interval` after the first unwritten record. So `kill -9` loses at most about
`flush_interval` x rate records, and what is on disk is always a valid prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from collector._version import __version__
from collector.core.events import (
    CommandUpdate,
    DeviceOffline,
    DeviceOnline,
    Event,
    Telemetry,
    format_address,
)
from collector.core.segments import RepairReport, SegmentWriter
from collector.logs import RateLimitedLog
from collector.wire import recording
from collector.wire.recording import RecordType

log = logging.getLogger("collector.recorder")


@attrs.frozen(kw_only=True)
class RecorderConfig:
    directory: str
    flush_interval: float = 0.2
    buffer_bytes: int = 16 * 2**20
    segment_bytes: int = 64 * 2**20
    segment_seconds: float = 3600.0
    retain_seconds: float | None = 7 * 86400.0
    retain_bytes: int | None = 2**30
    compress: bool = False
    raw: bool = False
    fsync: bool = False


def session_record(event: Event) -> tuple[RecordType, dict[str, Any]] | None:
    """The ONLINE or OFFLINE record's JSON for a session event (None for other events)."""
    if isinstance(event, DeviceOnline):
        return RecordType.ONLINE, {
            "device": event.device_id,
            "session_id": event.session_id,
            "transport": event.transport,
            "address": event.address,
        }
    if isinstance(event, DeviceOffline):
        return RecordType.OFFLINE, {
            "device": event.device_id,
            "session_id": event.session_id,
            "reason": event.reason,
            "duration": event.duration,
        }
    return None


class Recorder:
    def __init__(
        self, config: RecorderConfig, *, wall: Callable[[], float], source: str = "collector"
    ) -> None:
        self.config = config
        self.wall = wall
        self.source = source
        self.writer = SegmentWriter(
            config.directory,
            segment_bytes=config.segment_bytes,
            segment_seconds=config.segment_seconds,
            retain_seconds=config.retain_seconds,
            retain_bytes=config.retain_bytes,
            compress=config.compress,
            fsync=config.fsync,
        )
        self.buffer = bytearray()
        self.pending = 0
        self.records = 0
        self.bytes = 0
        self.dropped = 0
        self.write_errors = 0
        self.flushes = 0
        self.segments_closed = 0
        self.repair: RepairReport | None = None
        self.rlog = RateLimitedLog(log, 1.0)
        self._due = trio.Event()
        self._closed = False
        #: sessions open now (from the events), and as of the last record handed to the writer:
        #: a new segment starts with the latter, so a reader of that segment alone knows them
        self._open: dict[int, dict[str, Any]] = {}
        self._open_written: dict[int, dict[str, Any]] = {}
        self._open_changed = False
        self._open_version = 0
        self._open_written_version = 0
        self._open_written_snapshot: list[dict[str, Any]] = []
        self.sessions_closed_at_start = 0
        self._flush_lock = trio.Lock()
        #: set (and replaced) after every write: outputs reading the recording wait on it
        self.flushed = trio.Event()
        #: receive time of the newest readings record written (outputs' lag is measured to it)
        self.last_record_time: float | None = None
        self._pending_last_time: float | None = None
        #: outputs reading the recording (collector/outputs): retention keeps what they need
        self.outputs: list[Any] = []

    # -- listener (synchronous, from ingest) --------------------------------------------------

    def on_telemetry(self, batch: Sequence[Telemetry]) -> None:
        for t in batch:
            if t.readings:
                self._pending_last_time = t.time
                self._append(
                    recording.encode_readings_record(
                        t.time, t.device_id, t.seq, t.device_time_us, t.readings, t.payload
                    )
                )
            else:
                self._append(recording.encode_heartbeat_record(t.time, t.device_id, t.seq))

    def on_event(self, event: Event) -> None:
        session = session_record(event)
        if session is not None:
            rtype, data = session
            if rtype is RecordType.ONLINE:
                self._open[event.session_id] = {**data, "since": event.time}  # type: ignore[union-attr]
            else:
                self._open.pop(event.session_id, None)  # type: ignore[union-attr]
            self._open_changed = True
            self._append(recording.encode_json_record(rtype, event.time, data))
        elif isinstance(event, CommandUpdate):
            data = {
                "device": event.device_id,
                "id": event.command_id,
                "name": event.name,
                "state": event.state,
                "result": event.result,
                "error": event.error,
            }
            self._append(recording.encode_json_record(RecordType.COMMAND, event.time, data))

    def on_datagram(self, data: bytes, address: Any, time: float) -> None:
        self._append(recording.encode_datagram_record(time, format_address(address) or "", data))

    def _append(self, record: bytes) -> None:
        if self._closed:
            return
        if len(self.buffer) + len(record) > self.config.buffer_bytes:
            self.dropped += 1
            self.rlog.warning(
                "buffer_full",
                trio.current_time(),
                "recording buffer full (%d bytes): dropping records until the disk catches up",
                self.config.buffer_bytes,
            )
            return
        self.buffer += record
        self.pending += 1
        if not self._due.is_set():
            self._due.set()

    # -- the flusher ----------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[RepairReport] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open (and repair) the recording, then flush batches until cancelled."""
        self.repair = await trio.to_thread.run_sync(self.writer.open, self.wall())
        if self.repair.cleaned:
            log.warning(
                "recording %s: removed what an interrupted compression left: %s",
                self.config.directory,
                ", ".join(self.repair.cleaned),
            )
        if self.repair.damaged:
            log.warning(
                "recording %s: %s; recording goes on in a new segment (readers skip the damaged one)",
                self.config.directory,
                self.repair.damaged,
            )
        self._close_sessions_of_a_crash(self.repair)
        if self.repair.truncated_bytes or self.repair.corrupt_regions:
            log.warning(
                "recording %s: repaired %s (truncated a torn tail of %d bytes; %d corrupt regions left "
                "for readers to skip)",
                self.config.directory,
                self.repair.segment.name if self.repair.segment else "?",
                self.repair.truncated_bytes,
                self.repair.corrupt_regions,
            )
        self._append(
            recording.encode_json_record(
                RecordType.META,
                self.wall(),
                {"event": "open", "source": self.source, "version": __version__},
            )
        )
        await self._after_rotation([])
        log.info(
            "recording to %s (segment %s, flush every %.0f ms)",
            self.config.directory,
            self.writer.path.name if self.writer.path else "?",
            self.config.flush_interval * 1000,
        )
        task_status.started(self.repair)
        while True:
            await self._due.wait()
            await trio.sleep(self.config.flush_interval)
            self._due = trio.Event()
            await self.flush()

    def _close_sessions_of_a_crash(self, repair: RepairReport) -> None:
        """Sessions the last writer left open (it was killed) end here, with reason
        `collector_restart`, at the time of the last record it wrote: that is all anybody can
        know of when they ended."""
        if not repair.open_sessions or repair.last_time is None:
            return
        for s in repair.open_sessions:
            since = s.get("since")
            data = {
                "device": s.get("device"),
                "session_id": s.get("session_id"),
                "reason": "collector_restart",
                "duration": round(repair.last_time - since, 6)
                if isinstance(since, float | int)
                else 0.0,
            }
            self._append(recording.encode_json_record(RecordType.OFFLINE, repair.last_time, data))
        self.sessions_closed_at_start = len(repair.open_sessions)
        log.warning(
            "recording %s: the last run stopped without closing %d sessions (a crash?): "
            "closed them with reason collector_restart",
            self.config.directory,
            len(repair.open_sessions),
        )

    def _preamble(self) -> Callable[[], bytes]:
        """What starts a new segment, should this write start one: the sessions open as of the
        last record already written. Encoded only then (in the writer's thread), and the set
        is copied only when sessions came or went since the last flush."""
        if self._open_written_version != self._open_version:
            self._open_written_snapshot = list(self._open_written.values())
            self._open_written_version = self._open_version
        sessions, now = self._open_written_snapshot, self.wall()

        def encode() -> bytes:
            return recording.encode_json_record(
                RecordType.META, now, {"event": "segment", "open": sessions}
            )

        return encode

    async def flush(self) -> None:
        """Write what is buffered. One flush at a time: the flusher's and the final one of
        aclose() would otherwise write from two threads at once, in either order."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        if not self.buffer:
            return
        data = bytes(self.buffer)
        n = self.pending
        last_time, self._pending_last_time = self._pending_last_time, None
        self.buffer.clear()
        self.pending = 0
        preamble = self._preamble()
        if self._open_changed:
            self._open_written = dict(self._open)
            self._open_changed = False
            self._open_version += 1
        try:
            closed = await trio.to_thread.run_sync(self.writer.write, data, self.wall(), preamble)
        except (OSError, recording.RecordingError) as exc:
            self.write_errors += 1
            self.dropped += n
            self.rlog.log(
                logging.ERROR,
                "write_error",
                trio.current_time(),
                "recording write failed (%s): %d records lost; will retry with the next batch",
                getattr(exc, "strerror", None) or exc,
                n,
            )
            return
        self.flushes += 1
        self.records += n
        self.bytes += len(data)
        if last_time is not None:
            self.last_record_time = last_time
        self.flushed.set()
        self.flushed = trio.Event()
        if closed:
            await self._after_rotation(closed)

    async def _after_rotation(self, closed: list[Path]) -> None:
        self.segments_closed += len(closed)
        writer = self.writer
        now = self.wall()
        # What outputs still need (their checkpoints) is kept from age-based retention; the
        # size limit may still force it out, and then what each output loses is counted.
        needs = [(o, o.needs()) for o in self.outputs]
        needs = [(o, p) for o, p in needs if p is not None]
        keep_from = min((p.segment for _, p in needs), default=None)
        losses: list[tuple[Any, str, int]] = []

        def forced(path: Path, segment: int) -> None:
            for output, pos in needs:
                if pos.segment <= segment:
                    losses.append((output, path.name, output.lost_to_retention(path, segment, pos)))

        def work() -> list[Path]:
            for path in closed:
                if writer.compress:
                    writer.compress_segment(path)
            return writer.apply_retention(now, keep_from=keep_from, forced=forced)

        try:
            removed = await trio.to_thread.run_sync(work)
        except OSError as exc:
            log.error("recording maintenance failed: %s", exc)
            return
        for path in removed:
            log.info("recording retention: removed %s", path.name)
        for output, name, lost in losses:
            output.counters["dropped"] += lost
            log.error(
                "recording retention: the disk limit removed %s before output %s sent it: "
                "%d readings lost to that output",
                name,
                output.name,
                lost,
            )

    async def aclose(self) -> None:
        """Write everything buffered, a closing marker, and close the file."""
        if self._closed:
            return
        self._append(
            recording.encode_json_record(
                RecordType.META,
                self.wall(),
                {"event": "close", "records": self.records + self.pending, "dropped": self.dropped},
            )
        )
        await self.flush()
        self._closed = True
        await trio.to_thread.run_sync(self.writer.release)

    def statistics(self) -> dict[str, Any]:
        return {
            "directory": self.config.directory,
            "segment": self.writer.path.name if self.writer.path else None,
            "records": self.records,
            "bytes": self.bytes,
            "buffered": self.pending,
            "dropped": self.dropped,
            "write_errors": self.write_errors,
            "flushes": self.flushes,
            "segments_closed": self.segments_closed,
        }
