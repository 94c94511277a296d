"""Replay: into a collector as sensors (deterministic on a virtual clock), and as a stand-in."""

from __future__ import annotations

import contextlib
import json

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from collector.core.events import DeviceOffline, DeviceOnline
from collector.core.segments import RecordingReader
from collector.device.sim import SimConfig, Simulator
from collector.tools.playback import Playback, replay_into, select
from collector.wire.recording import EventRecord, ReadingsRecord, RecordType

from .helpers import api, start_collector, wall


def transitions(events, t0):
    return [
        (
            e.time - t0,
            e.device_id,
            "online" if isinstance(e, DeviceOnline) else f"offline:{e.reason}",
        )
        for e in events
        if isinstance(e, DeviceOnline | DeviceOffline)
    ]


async def record_a_run(nursery, tmp_path):
    cfg = SimConfig(
        devices=12,
        rate=2,
        udp_only=0.25,
        churn=3.0,
        hang=3,
        hang_at=20.0,
        loss=0.05,
        jitter=0.3,
        seed=11,
    )
    secrets = {d: f"s-{d}" for d in cfg.device_ids()}
    # No UDP coalescing: a HELLO's round trips then take no virtual time, in the original run
    # and in the replay alike (with it, each costs up to a millisecond of waiting).
    collector, log = await start_collector(
        nursery, devices=secrets, record_dir=str(tmp_path / "rec"), udp_coalesce=0.0
    )
    sim = Simulator(
        cfg,
        secrets,
        tcp_port=collector.tcp_address[1],
        udp_port=collector.udp_address[1],
        wall=wall,
    )
    await sim.run(45)
    await trio.sleep(20)  # let the hung devices time out
    await collector.shutdown()
    return secrets, log


async def test_replay_into_a_collector_on_a_virtual_clock_gives_the_same_session_events(
    nursery, autojump_clock, tmp_path
):
    secrets, original_log = await record_a_run(nursery, tmp_path)
    records = list(RecordingReader(tmp_path / "rec"))
    original = [e for e in original_log.events if isinstance(e, DeviceOnline | DeviceOffline)]
    reasons = {e.reason for e in original if isinstance(e, DeviceOffline)}
    assert reasons == {"closed", "timeout"} and len(original) > 60  # churn, hangs and goodbyes
    # what the recording holds is what happened
    recorded = [
        r
        for r in records
        if isinstance(r, EventRecord) and r.type in (RecordType.ONLINE, RecordType.OFFLINE)
    ]
    assert [(r.device_id, r.type.name, r.data.get("reason")) for r in recorded] == [
        (
            e.device_id,
            "ONLINE" if isinstance(e, DeviceOnline) else "OFFLINE",
            getattr(e, "reason", None),
        )
        for e in original
    ]

    replay, replay_log = await start_collector(nursery, devices=secrets, udp_coalesce=0.0)
    summary = await replay_into(
        select(records),
        secrets,
        tcp_port=replay.tcp_address[1],
        udp_port=replay.udp_address[1],
        speed=1.0,
    )
    await trio.sleep(20)
    await replay.shutdown()
    assert summary.errors == 0 and summary.readings == sum(
        len(r.readings) for r in records if isinstance(r, ReadingsRecord)
    )
    replayed = [e for e in replay_log.events if isinstance(e, DeviceOnline | DeviceOffline)]
    got, want = transitions(replayed, replayed[0].time), transitions(original, original[0].time)
    # The same transitions with the same reasons at the same times (to the microsecond that a
    # recording keeps), hence in the same order. Events at the very same instant (the goodbyes
    # at the end) have no order in either run, so each event is matched by device and time.
    assert len(got) == len(want) > 60
    unmatched = list(got)
    for t, device, kind in want:
        match = next(
            (g for g in unmatched if g[1:] == (device, kind) and abs(g[0] - t) < 2e-6), None
        )
        assert match is not None, (t, device, kind)
        unmatched.remove(match)


async def test_replay_at_ten_times_the_speed_keeps_the_order_and_scales_the_time(
    nursery, autojump_clock, tmp_path
):
    secrets, _ = await record_a_run(nursery, tmp_path)
    records = select(RecordingReader(tmp_path / "rec"), devices=["sensor-00*"])
    assert {r.device_id for r in records} <= {f"sensor-00{i}" for i in range(1, 10)}
    replay, log = await start_collector(
        nursery, devices=secrets, udp_coalesce=0
    )  # exact receive times
    start = wall()
    summary = await replay_into(
        records, secrets, tcp_port=replay.tcp_address[1], udp_port=replay.udp_address[1], speed=10.0
    )
    # Per device (datagrams of different devices recorded in the same microsecond have no
    # order): the same readings in the same order, each at a tenth of its recorded offset.
    sent: dict[str, list] = {}
    for r in records:
        if isinstance(r, ReadingsRecord):
            sent.setdefault(r.device_id, []).append(r)
    arrived: dict[str, list] = {}
    for t in log.telemetry:
        if t.readings:
            arrived.setdefault(t.device_id, []).append(t)
    assert sent.keys() == arrived.keys() and sum(map(len, sent.values())) > 100
    for device, rs in sent.items():
        assert [t.readings for t in arrived[device]] == [r.readings for r in rs]
        for r, t in zip(rs, arrived[device], strict=True):
            assert t.time - start == pytest.approx((r.time - records[0].time) / 10, abs=1e-5)
    assert summary.lateness_ms(100) < 1.0  # virtual clock: every send exactly on time


async def test_stand_in_collector_serves_a_recording_with_pause_seek_and_speed(
    nursery, autojump_clock, tmp_path
):
    await record_a_run(nursery, tmp_path)
    records = list(RecordingReader(tmp_path / "rec"))
    playback = Playback(select(records), speed=1.0)
    devices = dict.fromkeys(playback.device_ids, "")
    stand_in, _ = await start_collector(
        nursery, devices=devices, http_port=0, ingest=False, wall=playback.now
    )
    playback.attach(stand_in)
    nursery.start_soon(playback.run, stand_in)
    assert stand_in.tcp_address is None and stand_in.udp_address is None
    async with open_websocket_url(f"ws://127.0.0.1:{stand_in.http_address[1]}/stream") as ws:
        hello = json.loads(await ws.get_message())
        assert hello["mode"] == "replay" and hello["can_command"] is False
        assert hello["replay"]["start"] == playback.start
        await ws.send_message(json.dumps({"type": "subscribe"}))
        inbox_send, inbox = trio.open_memory_channel(10_000)

        async def keep_reading():  # a dashboard reads all the time (and so answers pings)
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await inbox_send.send(json.loads(await ws.get_message()))

        nursery.start_soon(keep_reading)
        readings = []
        with trio.move_on_after(10):
            async for msg in inbox:
                if msg["type"] == "readings":
                    readings += msg["readings"]
        first = [r for r in records if isinstance(r, ReadingsRecord)]
        assert len(readings) > 50
        assert [tuple(r) for r in readings] == [
            (r.device_id, name, r.time, value) for r in first for name, value in r.readings
        ][: len(readings)]
        status, st = await api(stand_in, "POST", "/api/replay", {"action": "pause"})
        assert status == 200 and st["paused"]
        paused_at = st["position"]
        await trio.sleep(30)
        assert playback.now() == paused_at
        status, st = await api(
            stand_in, "POST", "/api/replay", {"action": "seek", "position": playback.start + 30}
        )
        assert st["position"] == pytest.approx(playback.start + 30)
        snap = await _next(inbox, "snapshot")
        seen = [d["last_seen"] for d in snap["devices"] if d["last_seen"] is not None]
        assert seen and max(seen) <= playback.start + 30
        status, st = await api(stand_in, "POST", "/api/replay", {"action": "speed", "speed": 10})
        await api(stand_in, "POST", "/api/replay", {"action": "resume"})
        await trio.sleep(1)
        assert playback.now() == pytest.approx(playback.start + 40, abs=0.1)
        beat = await _next(inbox, "heartbeat")
        assert beat["replay"]["speed"] == 10 and not beat["replay"]["paused"]
        status, err = await api(stand_in, "POST", "/api/replay", {"action": "speed", "speed": -1})
        assert (status, err["error"]["code"]) == (400, "bad_action")
        status, err = await api(stand_in, "POST", "/api/devices/sensor-001/commands", {"name": "x"})
        assert status == 409 and err["error"]["code"] == "replay_mode"


async def _next(inbox, kind):
    async for msg in inbox:
        if msg["type"] == kind:
            return msg


def test_a_replay_at_max_speed_loses_nothing_to_the_goodbye_race(tmp_path):
    """A recording made under kill -9 (and a restart), replayed as fast as possible into a fresh
    collector: every datagram it holds is accepted. Each device's goodbye (TCP) is sent right
    after its last datagrams (UDP) and used to overtake them; it now says the last sequence
    number, and the collector waits for it (docs/PROTOCOL.md 4.2)."""
    import math
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def free(kind=socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    devices, record = tmp_path / "devices.toml", tmp_path / "rec"
    simulate = [sys.executable, "-m", "collector", "simulate"]
    subprocess.run(
        [*simulate, "--init-devices", str(devices), "--sensors", "20"],
        check=True,
        capture_output=True,
    )
    tcp, udp = free(), free(socket.SOCK_DGRAM)
    serve = [sys.executable, "-m", "collector", "serve", "--host", "127.0.0.1", "--tcp-port", str(tcp),
             "--udp-port", str(udp), "--http-port", "0", "--devices", str(devices), "--record", str(record),
             "--log-level", "ERROR"]  # fmt: skip
    sim = subprocess.Popen(
        [*simulate, "--devices", str(devices), "--tcp-port", str(tcp), "--udp-port", str(udp),
         "--sensors", "20", "--rate", "5", "--udp-only", "0.3", "--max-backoff", "0.3", "--duration", "6"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        first = subprocess.Popen(serve, cwd=root, stdout=subprocess.DEVNULL)
        time.sleep(2.5)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        second = subprocess.Popen(serve, cwd=root, stdout=subprocess.DEVNULL)
        sim.wait(timeout=60)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        for p in (sim, first, second):
            if p.poll() is None:
                p.kill()
    records = list(RecordingReader(record))
    offline = [r for r in records if isinstance(r, EventRecord) and r.type is RecordType.OFFLINE]
    assert any(r.data["reason"] == "collector_restart" for r in offline)  # the kill left them open
    readings = sum(len(r.readings) for r in records if isinstance(r, ReadingsRecord))
    secrets = {
        d: s
        for d, s in __import__("collector.devices", fromlist=["x"])
        .DeviceRegistry.load(devices)
        .items()
    }

    async def replay() -> None:
        async with trio.open_nursery() as nursery:
            collector, _ = await start_collector(
                nursery, devices=secrets, heartbeat_interval=0.5, timeout=1.5
            )
            summary = await replay_into(
                select(records), secrets, tcp_port=collector.tcp_address[1],
                udp_port=collector.udp_address[1], speed=math.inf,
            )  # fmt: skip
            await trio.sleep(3)  # past the lingers
            stats = collector.statistics()
            assert summary.errors == 0 and summary.readings == readings > 200
            assert stats.readings == readings
            assert sum(stats.rejected.values()) == 0, stats.rejected
            nursery.cancel_scope.cancel()

    trio.run(replay)


async def test_faster_than_recorded_the_timeouts_stay_on_the_timeline(
    nursery, autojump_clock, tmp_path
):
    """Sessions that ended by timeout (hung sensors, here with churn on top) used to make the
    replay wait out the collector's timeout in real time at every speed."""
    secrets, _ = await record_a_run(nursery, tmp_path)
    records = select(RecordingReader(tmp_path / "rec"))
    replay, _ = await start_collector(nursery, devices=secrets)
    summary = await replay_into(
        records, secrets, tcp_port=replay.tcp_address[1], udp_port=replay.udp_address[1], speed=20.0
    )
    assert summary.errors == 0
    assert summary.elapsed < summary.recorded_span / 20 + 2.0, (
        summary.elapsed,
        summary.recorded_span,
    )
    assert summary.lateness_ms(99) < 50


async def test_a_range_cut_in_the_middle_loses_nothing_at_its_edges(
    nursery, autojump_clock, tmp_path
):
    secrets, _ = await record_a_run(nursery, tmp_path)
    everything = list(RecordingReader(tmp_path / "rec"))
    start = everything[0].time
    records = select(everything, start=start + 10, end=start + 25)
    replay, _ = await start_collector(nursery, devices=secrets)
    summary = await replay_into(
        records, secrets, tcp_port=replay.tcp_address[1], udp_port=replay.udp_address[1], speed=10.0
    )
    await trio.sleep(3)
    rejected = replay.statistics().rejected
    assert summary.datagrams > 100 and sum(rejected.values()) == 0, rejected


async def test_the_stand_in_shows_the_recorded_loss(nursery, autojump_clock, tmp_path):
    await record_a_run(nursery, tmp_path)
    records = list(RecordingReader(tmp_path / "rec"))
    from collector.tools.inspect_recording import summarise

    expected = {
        d: s["lost"]
        for d, s in summarise(records, RecordingReader(tmp_path / "rec"), 60.0)["devices"].items()
    }
    assert sum(expected.values()) > 0  # the run dropped datagrams on purpose
    playback = Playback(select(records), speed=1000.0)
    stand_in, _ = await start_collector(
        nursery, devices=dict.fromkeys(playback.device_ids, ""), ingest=False, wall=playback.now
    )
    playback.attach(stand_in)
    nursery.start_soon(playback.run, stand_in)
    await trio.sleep(playback.end - playback.start)
    got = {d: s.lost for d, s in stand_in.statistics().devices.items()}
    assert got == expected


async def test_the_stand_in_survives_a_clock_that_moves_while_it_looks(
    nursery, autojump_clock, tmp_path, monkeypatch
):
    """The virtual clock is read twice per record; on a busy machine it moves in between, and a
    record due "in the past" made a negative wait (ValueError: seconds must be non-negative)."""
    await record_a_run(nursery, tmp_path)
    records = select(RecordingReader(tmp_path / "rec"))
    playback = Playback(records, speed=10.0)
    real_now = playback.now
    calls = [0]

    def jumpy() -> float:
        calls[0] += 1  # each look, 10 ms later than the last: between the two looks at a
        return real_now() + calls[0] * 0.01  # record it can go from "due later" to "past due"

    stand_in, _ = await start_collector(
        nursery, devices=dict.fromkeys(playback.device_ids, ""), ingest=False, wall=playback.now
    )
    playback.attach(stand_in)
    monkeypatch.setattr(playback, "now", jumpy)
    with trio.move_on_after(3):
        await playback.run(stand_in)
    assert playback.index > 100
