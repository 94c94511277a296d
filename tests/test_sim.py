"""The simulator against a real collector: the per-device counts match what it did on purpose."""

from __future__ import annotations

import trio

from collector.core.events import DeviceOffline
from collector.core.sessions import deadline_slack
from collector.device.sim import SimConfig, Simulator

from .helpers import start_collector, wall


async def run_sim(collector, cfg: SimConfig, duration: float) -> Simulator:
    secrets = {d: f"s-{d}" for d in cfg.device_ids()}
    collector.devices = secrets
    collector.ingest.secrets = secrets
    sim = Simulator(
        cfg,
        secrets,
        tcp_port=collector.tcp_address[1],
        udp_port=collector.udp_address[1],
        wall=wall,
    )
    await sim.run(duration)
    await trio.sleep(3.0)  # past the linger after the last goodbyes
    return sim


async def test_injected_loss_duplication_and_reordering_are_counted_exactly(
    nursery, autojump_clock
):
    collector, log = await start_collector(nursery)
    cfg = SimConfig(
        devices=30,
        rate=5,
        udp_only=0.3,
        loss=0.05,
        duplicate=0.02,
        reorder=0.03,
        jitter=0.2,
        ack_share=0.1,
        seed=1,
    )
    sim = await run_sim(collector, cfg, 60)
    stats = collector.statistics()
    t = sim.totals()
    assert (
        t["dropped"] > 300
        and t["duplicated"] > 50
        and t["reordered"] > 50
        and t["ack_requested"] > 100
    )
    for device_id, r in sim.reports.items():
        d = stats.devices[device_id]
        assert (d.lost, d.duplicates, d.out_of_order) == (
            r.expected_lost,
            r.expected_duplicates,
            r.expected_out_of_order,
        ), device_id
        assert d.datagrams == r.datagrams - r.expected_lost + (
            1 if r.transport == "udp" else 0
        )  # + HELLO
    assert stats.rejected_total == stats.rejected["replay"] == t["expected_duplicates"]
    # everybody said goodbye at the end, nobody timed out
    assert {e.reason for e in log.of(DeviceOffline)} == {"closed"}


async def test_churn_and_hung_devices(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    cfg = SimConfig(devices=20, rate=2, udp_only=0.25, churn=2.0, hang=4, hang_at=20.0, seed=2)
    sim = await run_sim(collector, cfg, 60)
    offline = log.of(DeviceOffline)
    hung = {d for d in sim.hangs}
    timeouts = [e for e in offline if e.reason == "timeout"]
    assert {e.device_id for e in timeouts} == hung and len(timeouts) == 4
    for e in timeouts:
        quiet = e.time - sim.reports[e.device_id].hung_at
        # The hung device's last datagram was sent at hung_at (wall clock) and read by the
        # collector up to one coalescing window later; it noticed after the timeout, plus at
        # most the deadline slack.
        late = deadline_slack(15.0) + collector.config.udp_coalesce
        assert 15.0 - 0.01 <= quiet <= 15.0 + late, quiet
    assert sum(r.sessions for r in sim.reports.values()) > 40  # churn reconnected them
    assert all(e.reason in ("closed", "timeout") for e in offline)
