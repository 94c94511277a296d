"""Running outputs: read the recording from a checkpoint, batch, send, move the checkpoint.

Each output is one task. It reads the recording (collector/outputs/wal.py, in a worker thread)
from its checkpoint, keeps the readings its filters take, sends them as a batch, and moves the
checkpoint only when the destination confirmed. An outage is waited out with retries
(backoff with jitter), and the output then catches up in order, at `max_rate` at most; a batch
the destination refuses as bad (4xx) is logged, counted and skipped. Ingest never waits for an
output: an output only reads files that the recorder has written.

Without a recording, an output takes readings from a bounded in-memory buffer (a listener of
the collector): what the buffer cannot hold is dropped and counted, and a restart loses what it
held. docs/OUTPUTS.md says so.
"""

from __future__ import annotations

import collections
import fnmatch
import gzip
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from collector.core.events import Event, Telemetry
from collector.core.recorder import session_record
from collector.logs import RateLimitedLog
from collector.outputs import lineproto
from collector.outputs.config import OutputConfig
from collector.outputs.wal import (
    Position,
    WalReader,
    load_checkpoint,
    readings_after,
    save_checkpoint,
)
from collector.wire.recording import (
    SEGMENT_HEADER_LEN,
    EventRecord,
    ReadingsRecord,
    RecordingError,
)

if TYPE_CHECKING:
    from collector.core.recorder import Recorder

log = logging.getLogger("collector.outputs")

RETRY_FIRST = 0.5
#: (device, metric) pairs whose filter verdict is remembered
MATCH_CACHE = 65536


class Filter:
    """Device and metric globs; `None` from `keep_fn` when everything passes."""

    def __init__(self, devices: Sequence[str], metrics: Sequence[str]) -> None:
        self.devices, self.metrics = tuple(devices), tuple(metrics)
        self._cache: dict[tuple[str, str], bool] = {}

    def keep(self, device: str, metric: str) -> bool:
        key = (device, metric)
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = any(fnmatch.fnmatchcase(device, g) for g in self.devices) and any(
                fnmatch.fnmatchcase(metric, g) for g in self.metrics
            )
            if len(self._cache) >= MATCH_CACHE:
                self._cache.clear()
            self._cache[key] = verdict
        return verdict

    def keep_fn(self) -> Callable[[str, str], bool] | None:
        return None if self.devices == ("*",) and self.metrics == ("*",) else self.keep


class Rejected(Exception):
    """The destination refused the batch as bad (it would refuse it again)."""


class InfluxSender:
    """POST line protocol to InfluxDB 1.x (/write), 2 and 3 (/api/v2/write), VictoriaMetrics."""

    def __init__(self, cfg: OutputConfig) -> None:
        import httpx  # only a collector with outputs needs it

        self.cfg = cfg
        base = cfg.url.rstrip("/")
        headers = {"content-type": "text/plain; charset=utf-8"}
        auth = None
        if cfg.api == "v2":
            self.url = f"{base}/api/v2/write"
            self.params = {"org": cfg.org, "bucket": cfg.bucket, "precision": "ns"}
            if cfg.token:
                headers["authorization"] = f"Token {cfg.token}"
        else:
            self.url = f"{base}/write"
            self.params = {"db": cfg.database, "precision": "ns"}
            if cfg.username:
                auth = httpx.BasicAuth(cfg.username, cfg.password)
        if cfg.gzip:
            headers["content-encoding"] = "gzip"
        self.client = httpx.AsyncClient(
            headers=headers, auth=auth, timeout=cfg.timeout, follow_redirects=False
        )
        self.httpx = httpx
        self.where = self.url

    def encode(
        self, records: Sequence[ReadingsRecord], keep: Callable[[str, str], bool] | None
    ) -> tuple[bytes, int]:
        cfg = self.cfg
        body, n = lineproto.encode(
            records,
            measurement=cfg.measurement,
            layout=cfg.layout,
            device_time=cfg.device_time,
            keep=keep,
        )
        return (gzip.compress(body, 5) if cfg.gzip and body else body), n

    async def send(self, body: bytes) -> float | None:
        """Deliver one batch. Returns None when confirmed, or how long to wait before the
        next try (a Retry-After the server gave, else 0: the caller's backoff). Raises
        Rejected for a batch the server will never take."""
        try:
            r = await self.client.post(self.url, params=self.params, content=body)
        except self.httpx.HTTPError as exc:
            detail = f": {exc}" if str(exc) else ""
            raise ConnectionError(f"{type(exc).__name__}{detail}") from None
        if 200 <= r.status_code < 300:
            return None
        text = r.text[:300].strip()
        if r.status_code in (408, 429) or r.status_code >= 500:
            retry_after = r.headers.get("retry-after", "")
            wait = float(retry_after) if retry_after.isdigit() else 0.0
            raise ConnectionError(f"HTTP {r.status_code}: {text}") if not wait else _Later(wait)
        raise Rejected(f"HTTP {r.status_code}: {text}")

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.client.aclose()


class _Later(Exception):
    def __init__(self, wait: float) -> None:
        super().__init__(f"asked to retry after {wait:.0f} s")
        self.wait = wait


class Output:
    """One `[outputs.NAME]`: its reading position, its sender and its statistics."""

    def __init__(
        self,
        cfg: OutputConfig,
        *,
        recorder: Recorder | None,
        record_dir: str,
        wall: Callable[[], float],
        log_rate: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.recorder = recorder
        self.wall = wall
        self.filter = Filter(cfg.devices, cfg.metrics)
        self.rlog = RateLimitedLog(log, log_rate)
        self.events = cfg.type == "mqtt" and bool(cfg.events_topic)
        self.reader = WalReader(record_dir, events=self.events) if recorder is not None else None
        self.checkpoint_path = (
            Path(cfg.checkpoint)
            if cfg.checkpoint
            else (Path(record_dir) / "outputs" / f"{cfg.name}.checkpoint" if record_dir else None)
        )
        #: where the next read starts, and the checkpoint (what the destination confirmed)
        self.position: Position | None = None
        self.committed: Position | None = None
        #: without a recording: readings waiting in memory
        self.memory: collections.deque[ReadingsRecord | EventRecord] = collections.deque()
        self._memory_ready = trio.Event()
        self.counters: collections.Counter[str] = collections.Counter()
        self.last_acked_time: float | None = None  # receive time of the last reading confirmed
        self.state = "starting"
        self.last_error = ""
        self.sender: Any = None

    # -- without a recording: a listener with a bounded buffer ---------------------------------

    def on_telemetry(self, batch: Sequence[Telemetry]) -> None:
        memory, limit = self.memory, self.cfg.buffer
        for t in batch:
            if not t.readings:
                continue
            if len(memory) >= limit:
                dropped = memory.popleft()
                self.counters["dropped"] += len(dropped.readings)
            memory.append(
                ReadingsRecord(t.time, t.device_id, t.seq, t.device_time_us, tuple(t.readings))
            )
        self._memory_ready.set()

    def on_event(self, event: Event) -> None:
        if not self.events:
            return
        session = session_record(event)
        if session is not None:
            if len(self.memory) >= self.cfg.buffer:
                self.memory.popleft()
                self.counters["dropped_events"] += 1
            self.memory.append(EventRecord(event.time, session[0], session[1]))
            self._memory_ready.set()

    # -- running -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        lag = None
        newest = self.recorder.last_record_time if self.recorder is not None else None
        if self.last_acked_time is not None and newest is not None:
            lag = max(0.0, newest - self.last_acked_time)
        return {
            "name": self.name,
            "type": self.cfg.type,
            "destination": self.sender.where if self.sender is not None else self.cfg.url,
            "state": self.state,
            "source": "recording" if self.reader is not None else "memory",
            "checkpoint": self.committed.to_json() if self.committed is not None else None,
            "lag_seconds": lag,
            "buffered": len(self.memory),
            "last_error": self.last_error,
            **{
                k: self.counters[k]
                for k in (
                    "sent", "acknowledged", "batches", "retries", "rejected", "dropped",
                    "filtered", "segments_missing", "restarts",
                )
            },
        }  # fmt: skip

    async def serve(
        self,
        boundary: Any,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the output; a bug or an unreadable recording costs a report and a restart of
        this output 5 s later (from its checkpoint), never the collector."""
        task_status.started()
        while True:
            try:
                await self._run()
            except Exception as exc:
                boundary.report("output", exc, self.name)
                self.state = "failed"
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.counters["restarts"] += 1
            await trio.sleep(5)

    async def _run(self) -> None:
        if self.cfg.type == "mqtt":
            from collector.outputs.mqtt import MqttSender

            self.sender = MqttSender(self.cfg)
        else:
            self.sender = InfluxSender(self.cfg)
        try:
            await self.sender.start()
            if self.reader is not None:
                await self._start_position()
            log.info(
                "output %s: to %s, from %s",
                self.name,
                self.sender.where,
                f"the recording at {self.position}" if self.reader else "memory (no recording)",
            )
            while True:
                records, end = await self._next_batch()
                await self._deliver(records)
                if end is not None:
                    await self._commit(end)
                await self._pace(records)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.sender.aclose()

    async def _start_position(self) -> None:
        assert self.reader is not None and self.checkpoint_path is not None
        pos = await trio.to_thread.run_sync(load_checkpoint, self.checkpoint_path)
        if pos is None:
            if self.cfg.start == "oldest":
                pos = Position(0, SEGMENT_HEADER_LEN)
            else:  # "now": from the end of what is recorded
                pos = await trio.to_thread.run_sync(self._end_of_recording)
            await self._commit(pos)
        self.position = self.committed = pos

    def _end_of_recording(self) -> Position:
        assert self.reader is not None
        segments = self.reader.segments()
        pos = Position(segments[-1][0] if segments else 0, SEGMENT_HEADER_LEN)
        while True:
            chunk = self.reader.read(pos, 100_000)
            if chunk.end == pos:
                return pos
            pos = chunk.end

    async def _next_batch(self) -> tuple[list[ReadingsRecord], Position | None]:
        """The next batch: `batch_size` readings, or what came within `flush_interval` of the
        first; and the position after it (None from memory)."""
        cfg = self.cfg
        records: list[ReadingsRecord] = []
        count = 0
        deadline = math.inf
        keep = self.filter.keep_fn()
        while True:
            if self.reader is None:
                got = [(r, None) for r in self._take_memory(cfg.batch_size - count)]
                end = None
            else:
                assert self.recorder is not None and self.position is not None
                flushed = self.recorder.flushed
                chunk = await trio.to_thread.run_sync(
                    self.reader.read, self.position, cfg.batch_size - count
                )
                self._note_chunk(chunk)
                got = chunk.records
                end = chunk.end
            for r, after in got:
                if type(r) is not ReadingsRecord:  # a session event (mqtt)
                    records.append(r)
                    if after is not None:
                        self.position = after
                    continue
                n = (
                    len(r.readings)
                    if keep is None
                    else sum(1 for name, _ in r.readings if keep(r.device_id, name))
                )
                if n and records and count + n > cfg.batch_size and after is not None:
                    end = self.position  # full: the rest is read again for the next batch
                    count = cfg.batch_size
                    break
                self.counters["filtered"] += len(r.readings) - n
                if n:
                    records.append(r)
                    count += n
                if after is not None:
                    self.position = after
            else:
                if end is not None:
                    self.position = end
            if records and deadline == math.inf:
                deadline = trio.current_time() + cfg.flush_interval
            if count >= cfg.batch_size or (records and trio.current_time() >= deadline):
                return records, end
            with trio.move_on_at(deadline):
                if self.reader is None:
                    await self._memory_ready.wait()
                    self._memory_ready = trio.Event()
                elif not got:
                    await flushed.wait()  # the recorder wrote more
            if records and trio.current_time() >= deadline:
                return records, end
            if not records and end is not None and self.reader is not None:
                await self._commit(end)  # only other records: no need to read them again

    def _take_memory(self, room: int) -> list[ReadingsRecord]:
        out: list[ReadingsRecord] = []
        n = 0
        while self.memory and n < room:
            r = self.memory.popleft()
            out.append(r)
            n += len(r.readings) if type(r) is ReadingsRecord else 1
        return out

    def _note_chunk(self, chunk: Any) -> None:
        if chunk.missing:
            self.counters["segments_missing"] += len(chunk.missing)
            log.warning(
                "output %s: segments %s of the recording were gone before it sent them "
                "(deleted outside the collector, or by retention while it was not running)",
                self.name,
                ", ".join(map(str, chunk.missing)),
            )

    async def _deliver(self, records: list[ReadingsRecord]) -> None:
        body, n = self.sender.encode(records, self.filter.keep_fn())
        if not body:
            return
        delay = RETRY_FIRST
        self.counters["batches"] += 1
        while True:
            self.counters["sent"] += n
            try:
                await self.sender.send(body)
            except Rejected as exc:
                self.counters["rejected"] += n
                self.last_error = str(exc)
                self.rlog.warning(
                    "rejected",
                    trio.current_time(),
                    "output %s: %s refused a batch of %d readings as bad; skipped: %s",
                    self.name,
                    self.sender.where,
                    n,
                    exc,
                )
                return
            except (ConnectionError, _Later, OSError) as exc:
                self.counters["retries"] += 1
                self.state = "retrying"
                self.last_error = str(exc)
                wait = exc.wait if isinstance(exc, _Later) else delay * random.uniform(0.5, 1.5)
                self.rlog.warning(
                    "retry",
                    trio.current_time(),
                    "output %s: %s: %s; again in %.1f s",
                    self.name,
                    self.sender.where,
                    exc,
                    wait,
                )
                await trio.sleep(wait)
                delay = min(self.cfg.retry_max, delay * 2)
                continue
            self.counters["acknowledged"] += n
            self.last_acked_time = records[-1].time
            if self.state != "sending":
                if self.state == "retrying":
                    log.info("output %s: %s answers again", self.name, self.sender.where)
                self.state = "sending"
            return

    async def _commit(self, pos: Position) -> None:
        if self.checkpoint_path is None:
            return
        extra = {"output": self.name, "saved": time.time()}
        try:
            await trio.to_thread.run_sync(save_checkpoint, self.checkpoint_path, pos, extra)
            self.committed = pos
        except OSError as exc:
            self.rlog.log(
                logging.ERROR,
                "checkpoint",
                trio.current_time(),
                "output %s: cannot save its checkpoint %s: %s (what was sent is sent again "
                "after a restart)",
                self.name,
                self.checkpoint_path,
                exc,
            )

    async def _pace(self, records: list[ReadingsRecord]) -> None:
        if self.cfg.max_rate > 0:
            n = sum(len(getattr(r, "readings", ())) for r in records)
            await trio.sleep(n / self.cfg.max_rate)

    # -- retention ------------------------------------------------------------------------------

    def needs(self) -> Position | None:
        """The oldest position this output may still read: its checkpoint."""
        return self.committed if self.reader is not None else None

    def lost_to_retention(self, path: Path, segment: int, pos: Position) -> int:
        """Readings of a segment this output has not sent (from `pos`), counted before the
        disk limit forces retention to delete it. Runs in the recorder's maintenance thread:
        it only reads the file and the output's (immutable) filter globs."""
        offset = pos.offset if pos.segment == segment else SEGMENT_HEADER_LEN
        try:
            return readings_after(
                path, offset, Filter(self.cfg.devices, self.cfg.metrics).keep_fn()
            )
        except RecordingError:
            return 0
