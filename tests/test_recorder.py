"""The recorder inside a running collector, and what `kill -9` leaves behind."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import trio

from collector.core.segments import RecordingReader, SegmentWriter
from collector.device.client import open_device
from collector.wire.recording import EventRecord, HeartbeatRecord, ReadingsRecord, RecordType

from .helpers import SECRETS, start_collector

ROOT = Path(__file__).resolve().parent.parent


async def test_a_session_is_recorded_in_order(nursery, autojump_clock, tmp_path):
    collector, _ = await start_collector(nursery, record_dir=str(tmp_path))
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        await dev.send_readings({"t": 20.5, "ok": True})
        await dev.send_heartbeat()
        await dev.send_readings({"t": 21.0})
        await trio.sleep(0.1)  # the datagram is in before the command is queued
        cmd = collector.send_command("dev-1", "nothing")
        await cmd.done.wait()
        await trio.sleep(1)
    report = await collector.shutdown()
    assert report.recording["records"] >= 9 and report.recording["dropped"] == 0
    assert "recorded" in report.summary()
    kinds = []
    for r in RecordingReader(tmp_path):
        if isinstance(r, ReadingsRecord):
            kinds.append(("readings", r.seq, tuple(r.readings)))
        elif isinstance(r, HeartbeatRecord):
            kinds.append(("heartbeat", r.seq))
        elif isinstance(r, EventRecord):
            kinds.append(
                (
                    r.type.name.lower(),
                    r.data.get("reason") or r.data.get("state") or r.data.get("event"),
                )
            )
    assert kinds == [
        ("meta", "open"),
        ("online", None),
        ("readings", 1, (("t", 20.5), ("ok", True))),
        ("heartbeat", 2),
        ("readings", 3, (("t", 21.0),)),
        ("command", "queued"),
        ("command", "sent"),
        ("command", "failed"),  # the device has no handler: it says so
        ("offline", "closed"),
        ("meta", "close"),
    ], (kinds, sorted(p.name for p in tmp_path.iterdir()))


async def test_a_failing_disk_costs_records_but_never_ingest(nursery, autojump_clock, tmp_path):
    collector, _ = await start_collector(nursery, record_dir=str(tmp_path))
    recorder = collector.recorder
    real = recorder.writer.write
    failures = []

    def full_disk_once(data, now=None, preamble=None):
        if not failures:
            failures.append(len(data))
            raise OSError(28, "No space left on device")
        return real(data, now, preamble)

    recorder.writer.write = full_disk_once
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        await dev.send_readings({"a": 1.0})
        await trio.sleep(1)  # the first flush fails
        await dev.send_readings({"a": 2.0})
        await trio.sleep(1)
    await collector.shutdown()
    stats = recorder.statistics()
    assert stats["write_errors"] == 1 and stats["dropped"] >= 2
    from collector.servers.metrics import make_registry, render

    text = render(make_registry(collector)).decode()
    assert f"collector_recording_dropped_total {float(stats['dropped'])}" in text
    assert "collector_recording_write_errors_total 1.0" in text
    values = [r.readings[0][1] for r in RecordingReader(tmp_path) if isinstance(r, ReadingsRecord)]
    assert values == [2.0]  # the batch lost to the full disk is gone; the next one is there
    assert collector.statistics().datagrams_accepted == 2


def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_9_at_random_moments_leaves_a_valid_prefix(tmp_path):
    """20 times: kill -9 a recording collector while 20 sensors send 10 datagrams/s each."""
    flush, rate, sensors = 0.2, 200.0, 20
    devices, record = tmp_path / "devices.toml", tmp_path / "rec"
    (tmp_path / "c.toml").write_text(f'[recording]\ndir = "{record}"\nflush_interval = {flush}\n')
    subprocess.run(
        [
            sys.executable,
            "-m",
            "collector",
            "simulate",
            "--init-devices",
            str(devices),
            "--sensors",
            str(sensors),
        ],
        check=True,
        capture_output=True,
    )
    tcp, udp, http = _free_port(), _free_port(socket.SOCK_DGRAM), _free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "collector", "simulate", "--devices", str(devices), "--tcp-port", str(tcp),
         "--udp-port", str(udp), "--sensors", str(sensors), "--rate", str(rate / sensors), "--stamp", "--no-signals", "--max-backoff", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    rng = random.Random(7)
    kills, onlines = [], []
    proc = None
    try:
        for _ in range(20):
            proc = subprocess.Popen(
                [sys.executable, "-m", "collector", "serve", "--host", "127.0.0.1", "--tcp-port", str(tcp),
                 "--udp-port", str(udp), "--http-port", str(http), "--devices", str(devices),
                 "--config", str(tmp_path / "c.toml"), "--log-level", "WARNING"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 20
            while True:
                assert time.monotonic() < deadline, "the sensors did not come back"
                try:
                    health = json.loads(
                        urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=1).read()
                    )
                    if health["devices_online"] == sensors:
                        onlines.append(time.time())
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            time.sleep(rng.uniform(0.1, 0.6))
            os.kill(proc.pid, signal.SIGKILL)
            kills.append(time.time())
            proc.wait()
    finally:
        for p in (sim, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    repair = SegmentWriter(record).open()  # what the next start would do
    reader = RecordingReader(record)
    records = list(reader)
    assert reader.corrupt_regions == 0 and reader.torn_tails == 0, reader.problems()
    assert repair.corrupt_regions == 0
    opens = [
        i for i, r in enumerate(records) if isinstance(r, EventRecord) and r.type is RecordType.META
    ]
    assert len(opens) == 20  # every restart repaired the file and appended after the repair
    gaps = []
    for n, (a, b) in enumerate(zip(opens, [*opens[1:], len(records)], strict=True)):
        run = records[a:b]
        # A valid prefix: every session's sequence numbers run 1, 2, 3, ... without a hole.
        seqs: dict[str, list[int]] = {}
        for r in run:
            if isinstance(r, ReadingsRecord | HeartbeatRecord):
                seqs.setdefault(r.device_id, []).append(r.seq)
        for device, s in seqs.items():
            assert s == list(range(s[0], s[0] + len(s))), (n, device, s[:5], s[-5:])
        sent = [
            value
            for r in run
            if isinstance(r, ReadingsRecord)
            for name, value in r.readings
            if name == "sent_at"
        ]
        # Killed before the first flush after everybody was back: then nothing since is on disk.
        gaps.append(kills[n] - max(sent, default=onlines[n]))
    # What a kill can lose: what arrived since the last flush, at most `flush` seconds' worth,
    # plus scheduling delays of a busy machine (allowed: 0.25 s).
    worst = max(gaps)
    assert worst <= flush + 0.25, gaps
    print(f"kill -9 x20: newest recorded reading at most {worst * 1000:.0f} ms before the kill "
          f"(flush interval {flush * 1000:.0f} ms): at most ~{worst * rate:.0f} of {rate:.0f}/s lost")  # fmt: skip


async def test_the_final_flush_waits_for_the_one_in_progress(nursery, tmp_path):
    """aclose() flushes while the flusher may be writing in its thread: one at a time, in
    order (two threads writing the same file put records in either order)."""
    from collector.core.events import Telemetry
    from collector.core.recorder import Recorder, RecorderConfig

    recorder = Recorder(
        RecorderConfig(directory=str(tmp_path), flush_interval=0.01), wall=time.time
    )
    await nursery.start(recorder.serve)
    real = recorder.writer.write

    calls = []

    def slow(data, now=None, preamble=None):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)  # a slow disk, this once
        return real(data, now, preamble)

    recorder.writer.write = slow
    recorder.on_telemetry([Telemetry(time.time(), "d", 1, 0, (("t", 1.0),))])
    await trio.sleep(0.1)  # the flusher is in its thread, writing seq 1
    recorder.on_telemetry([Telemetry(time.time(), "d", 2, 0, (("t", 2.0),))])
    await recorder.aclose()
    records = list(RecordingReader(tmp_path))
    assert [r.seq for r in records if isinstance(r, ReadingsRecord)] == [1, 2]
    assert isinstance(records[-1], EventRecord) and records[-1].data["event"] == "close"
