"""Session lifecycle over real loopback sockets, on the autojump clock."""

from __future__ import annotations

import trio

from collector.core.events import DeviceOffline, DeviceOnline
from collector.core.sessions import deadline_slack
from collector.device.client import open_device, open_udp_device

from .helpers import SECRETS, Lines, start_collector


async def test_register_send_and_close(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        assert dev.heartbeat_interval == 5.0 and dev.timeout == 15.0
        seq = await dev.send_readings({"temperature": 21.5, "door": False})
        await dev.send_readings({"status": "ok"}, ack=True)
        await trio.sleep(1)
    await trio.sleep(0.1)
    [online] = log.of(DeviceOnline)
    assert (online.device_id, online.transport) == ("dev-1", "tcp")
    [offline] = log.of(DeviceOffline)
    assert offline.reason == "closed" and offline.session_id == online.session_id
    assert [(t.seq, list(t.readings)) for t in log.telemetry] == [
        (seq, [("temperature", 21.5), ("door", False)]),
        (seq + 1, [("status", "ok")]),
    ]
    d = collector.statistics().devices["dev-1"]
    assert (d.datagrams, d.readings, d.lost, d.duplicates, d.online, d.offline_reason) == (
        2,
        3,
        0,
        0,
        False,
        "closed",
    )


async def test_silence_means_timeout_exactly_once_the_deadline_passes(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1], heartbeat=False
    ) as dev:
        await dev.send_readings({"x": 1.0})
        sent_at = trio.current_time()
        await dev.ended.wait()
        assert dev.end_reason == "timeout"  # the collector said goodbye with the reason
    [offline] = log.of(DeviceOffline)
    assert offline.reason == "timeout"
    gone_after = offline.time - (sent_at + 1_767_225_600.0)
    # never early; late by at most the slack, plus the coalescing window the datagram waited in
    late = deadline_slack(15.0) + collector.config.udp_coalesce
    assert 15.0 <= gone_after <= 15.0 + late


async def test_heartbeats_and_pings_keep_a_device_online(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        await trio.sleep(300)  # 60 heartbeat intervals of silence but for heartbeats
        assert dev.sent >= 55
    async with open_device(
        "127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=collector.tcp_address[1], heartbeat=False
    ) as dev:
        for _ in range(30):  # control messages push the deadline too
            await trio.sleep(10)
            await dev.ping()
    assert [e.reason for e in log.of(DeviceOffline)] == ["closed", "closed"]


async def test_one_lost_heartbeat_never_marks_a_device_offline(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1], heartbeat=False
    ) as dev:
        for _ in range(20):
            await dev.send_heartbeat()
            await trio.sleep(10)  # every other heartbeat of a 5 s interval is lost
    assert [e.reason for e in log.of(DeviceOffline)] == ["closed"]


async def test_registering_again_supersedes_the_old_session(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    port = collector.tcp_address[1]
    async with open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port) as old:
        await old.send_readings({"x": 1.0})
        await trio.sleep(0.1)
        async with open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port) as new:
            await old.ended.wait()
            assert old.end_reason == "superseded"
            await new.send_readings({"x": 2.0})
            await trio.sleep(1)
            assert collector.registry.online["dev-1"].session_id == new.session_id
    reasons = [(e.session_id, e.reason) for e in log.of(DeviceOffline)]
    assert reasons == [(old.session_id, "superseded"), (new.session_id, "closed")]
    d = collector.statistics().devices["dev-1"]
    assert (d.sessions, d.datagrams, d.lost) == (2, 2, 0), collector.statistics().rejected
    assert [h.reason for h in d.history] == ["superseded", "closed"]


async def test_kick_ends_a_session_with_its_reason(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        await trio.sleep(1)
        assert collector.kick("dev-1")
        await dev.ended.wait()
        assert dev.end_reason == "kicked"
    assert not collector.kick("dev-1")
    assert [e.reason for e in log.of(DeviceOffline)] == ["kicked"]


async def test_udp_only_device_lives_and_dies_by_datagrams(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    async with open_udp_device(
        "127.0.0.1", "udp-1", SECRETS["udp-1"], udp_port=collector.udp_address[1]
    ) as dev:
        await dev.send_readings({"battery": 3.7})
        await trio.sleep(60)
        assert collector.registry.online["udp-1"].transport == "udp"
    await trio.sleep(0.5)
    assert [e.reason for e in log.of(DeviceOffline)] == ["closed"]  # GOODBYE datagram
    async with open_udp_device(
        "127.0.0.1",
        "udp-1",
        SECRETS["udp-1"],
        udp_port=collector.udp_address[1],
        heartbeat=False,
    ) as dev:
        await trio.sleep(20)  # silent: the collector times it out
        assert not dev.ended.is_set()  # nobody tells a silent device: it is presumed gone
    assert [e.reason for e in log.of(DeviceOffline)] == ["closed", "timeout"]


async def test_tcp_eof_without_goodbye_is_closed(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    lines = await Lines.connect(collector)
    welcome = await lines.register("dev-3")
    assert welcome["type"] == "welcome"
    await lines.stream.aclose()
    await trio.sleep(0.1)
    [offline] = log.of(DeviceOffline)
    assert (offline.device_id, offline.reason) == ("dev-3", "closed")


async def test_shutdown_says_goodbye_and_reports(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    port = collector.tcp_address[1]
    async with (
        open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port) as a,
        open_udp_device(
            "127.0.0.1",
            "udp-1",
            SECRETS["udp-1"],
            udp_port=collector.udp_address[1],
        ) as b,
    ):
        await a.send_readings({"x": 1.0})
        await b.send_readings({"x": 2.0})
        await trio.sleep(0.1)
        report = await collector.shutdown()
        await a.ended.wait()
        await b.ended.wait()
        assert (a.end_reason, b.end_reason) == ("shutdown", "shutdown")
    assert report.clean and report.sessions_ended == 2 and report.devices == 2
    assert report.datagrams_accepted == 3  # two readings and one HELLO
    assert "2 sessions ended" in report.summary() and "accepted 3" in report.summary()
    assert sorted(e.reason for e in log.of(DeviceOffline)) == ["shutdown", "shutdown"]
    assert collector.control.handlers_done.is_set()


def test_the_flapping_detector_bans_and_forgets_what_left_its_window():
    from collector.core.ratelimit import FlappingDetector

    f = FlappingDetector(max_count=3, window=10.0, ban=30.0)
    assert [f.check("a", t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert f.check("a", 3.0) == 30.0 and f.bans == 1 and f.banned_for("a", 20.0) == 13.0
    assert f.check("b", 4.0) == 0.0 and f.check("c", 5.0) == 0.0
    assert list(f._times) == ["b", "c"]  # a: banned, its times dropped
    assert f.check("b", 14.5) == 0.0  # b registers again, c's last is 9.5 s old: kept
    assert list(f._times) == ["c", "b"]
    assert f.check("d", 16.0) == 0.0  # c's last registration left the window: forgotten
    assert list(f._times) == ["b", "d"] and f._times["b"] == [14.5]
    assert f.check("a", 33.0) == 0.0  # the ban is over


def test_recent_registrations_forget_devices_whose_registrations_expired():
    from collector.core.registration import RecentRegistrations, Registration

    r = RecentRegistrations(lifetime=60.0, per_device=2)

    def reg(nonce: bytes, t: float) -> Registration:
        return Registration(nonce, t + 60.0, 1, None, b"")

    r.add(0.0, "a", reg(b"1", 0.0))
    r.add(1.0, "a", reg(b"2", 1.0))
    r.add(2.0, "a", reg(b"3", 2.0))  # at most 2 per device: the oldest goes
    assert [x.client_nonce for x in r._by_device["a"]] == [b"2", b"3"]
    assert r.find(3.0, "a", b"3") is not None and r.find(3.0, "a", b"1") is None
    r.add(30.0, "b", reg(b"4", 30.0))
    r.add(70.0, "c", reg(b"5", 70.0))  # every registration of a has expired: a is forgotten
    assert list(r._by_device) == ["b", "c"]
