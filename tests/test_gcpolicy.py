"""Freezing what survives a long full collection (collector.gcpolicy), and why it is safe: a
device's whole life leaves no reference cycle, so nothing frozen is ever garbage that only the
cycle collector could free."""

from __future__ import annotations

import collections
import gc
import socket

import pytest
import trio

from collector.device.bulk import register_udp
from collector.devices import DeviceRegistry
from collector.gcpolicy import GcPolicy
from collector.wire import datagram as dg

from .helpers import Lines, http, start_collector


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def thawed():
    yield
    gc.unfreeze()


def test_a_long_full_collection_freezes_what_survived_it(thawed):
    gc.unfreeze()  # a collector of an earlier test may have frozen this process's objects
    clock = FakeClock()
    lines = []
    policy = GcPolicy(0.1, clock=clock, schedule=lines.append)
    policy._callback("start", {"generation": 1})
    clock.now += 5.0
    policy._callback("stop", {"generation": 1})  # a young collection: not timed
    assert policy.full_collections == 0 and policy.freezes == 0
    policy._callback("start", {"generation": 2})
    clock.now += 0.05
    policy._callback("stop", {"generation": 2})  # short: nothing frozen
    assert (policy.full_collections, policy.freezes, gc.get_freeze_count()) == (1, 0, 0)
    policy._callback("start", {"generation": 2})
    clock.now += 0.3
    policy._callback("stop", {"generation": 2})
    assert policy.freezes == 1 and gc.get_freeze_count() > 0
    assert policy.pause_max == pytest.approx(0.3) and policy.pause_total == pytest.approx(0.35)
    assert len(lines) == 1  # scheduled once, to run outside the callback:
    full = gc.get_stats()[2]["collections"]
    lines[0]()
    # a full collection over what is left, so that Python's count of what reached the oldest
    # generation starts again from what is not frozen
    assert gc.get_stats()[2]["collections"] == full + 1
    assert policy.frozen() == gc.get_freeze_count()  # counted once, there, not per scrape
    policy._callback("start", {"generation": 2})
    clock.now += 0.2
    policy._callback("stop", {"generation": 2})
    assert policy.freezes == 2 and len(lines) == 2


def test_zero_never_freezes(thawed):
    gc.unfreeze()
    clock = FakeClock()
    policy = GcPolicy(0, clock=clock)
    policy._callback("start", {"generation": 2})
    clock.now += 10.0
    policy._callback("stop", {"generation": 2})
    assert policy.full_collections == 1 and policy.freezes == 0 and gc.get_freeze_count() == 0


def test_install_times_real_collections():
    policy = GcPolicy(0)
    policy.install()
    policy.install()  # once only
    try:
        gc.collect()
        gc.collect()
    finally:
        policy.uninstall()
    assert policy.full_collections == 2 and policy.pause_max > 0
    assert policy._callback not in gc.callbacks


N_UDP = 300
N_TCP = 20
SECRETS = {f"life-{i}": f"life-secret-{i}" for i in range(N_UDP)}


async def test_a_devices_whole_life_leaves_no_reference_cycle(nursery):
    collector, _ = await start_collector(
        nursery,
        devices=DeviceRegistry(SECRETS),
        heartbeat_interval=1.0,
        timeout=3.0,
        ratelimit_per_source=100_000,
        http_port=0,
    )
    await trio.sleep(0.2)
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        target = ("127.0.0.1", collector.udp_address[1])

        def lives() -> int:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sessions = register_udp(sock, target, SECRETS)
                for s in sessions.values():
                    sock.sendto(
                        s.seal(dg.DatagramType.HEARTBEAT, dg.encode_heartbeat_payload(1)), target
                    )
                    sock.sendto(
                        s.seal(dg.DatagramType.TELEMETRY, dg.encode_readings({"t": 1.5})), target
                    )
                return len(sessions)

        registered = await trio.to_thread.run_sync(lives)
        for i in range(N_TCP):  # registered again over TCP: the UDP session is superseded ...
            lines = await Lines.connect(collector)
            welcome = await lines.register(f"life-{i}", SECRETS[f"life-{i}"])
            assert welcome["type"] == "welcome"
            if i % 2:
                await lines.send({"type": "goodbye"})  # ... and closed, or just dropped
            await lines.stream.aclose()
        status, _, _ = await http(collector, "GET", "/api/devices")
        assert status == 200
        with trio.fail_after(20):
            while collector.registry.online:  # the rest time out  # noqa: ASYNC110
                await trio.sleep(0.1)
        ended = collector.registry.ended_by_reason
        assert registered == N_UDP and collector.ingest.rejected["malformed"] == 0
        assert ended["timeout"] > 0 and ended["superseded"] + ended["closed"] > 0
        assert sum(ended.values()) == collector.registry.opened >= N_UDP + N_TCP
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    # One cycle per device would be hundreds of objects; what is left is the test's own.
    assert found < N_UDP // 10, kinds.most_common(20)
