#!/usr/bin/env python3
"""Run simulated sensors against a collector, with deliberate loss, duplication, reordering,
jitter and churn, and print what was sent and dropped on purpose.

    collector devices add ...            # or: tools/simulate.py --init-devices devices.toml
    collector serve --devices devices.toml
    tools/simulate.py --devices devices.toml --sensors 20 --loss 0.05 --duration 60

The simulator keeps an exact ledger of what reached the wire, so its "collector should count
N lost" must equal the sum of the collector's per-device lost counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import attrs
import trio

from collector.device.sim import SimConfig, Simulator
from collector.devices import DeviceRegistry, DevicesError
from collector.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", metavar="FILE", help="credentials file shared with the collector")
    p.add_argument(
        "--init-devices",
        metavar="FILE",
        help="create credentials for the simulated sensors in FILE (adding missing ones) and exit",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--tcp-port", type=int, default=8080)
    p.add_argument("--udp-port", type=int, default=8081)
    p.add_argument("--sensors", type=int, default=20, help="number of sensors (default 20)")
    p.add_argument("--prefix", default="sensor", help="ids are PREFIX-001, PREFIX-002, ...")
    p.add_argument("--rate", type=float, default=1.0, help="TELEMETRY datagrams/s per sensor")
    p.add_argument("--udp-only", type=float, default=0.0, help="share registering by HELLO")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability per datagram")
    p.add_argument("--duplicate", type=float, default=0.0, help="duplicate probability")
    p.add_argument("--reorder", type=float, default=0.0, help="hold-back-one probability")
    p.add_argument("--jitter", type=float, default=0.0, help="+/- fraction of the send interval")
    p.add_argument("--churn", type=float, default=0.0, help="reconnects per sensor per minute")
    p.add_argument("--ack-share", type=float, default=0.0, help="share of readings with ACK")
    p.add_argument("--hang", type=int, default=0, help="sensors that go silent, no goodbye")
    p.add_argument("--hang-at", type=float, default=30.0, help="seconds into the run")
    p.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--seed", type=int, help="random seed, for a repeatable run")
    p.add_argument(
        "--max-backoff",
        type=float,
        default=10.0,
        help="longest wait between reconnection attempts (s)",
    )
    p.add_argument(
        "--stamp", action="store_true", help="add a `sent_at` reading: the send time, for latency"
    )
    p.add_argument(
        "--no-signals", action="store_true", help="no temperature/humidity/battery readings"
    )
    p.add_argument("--report", metavar="FILE.json", help="write the per-sensor ledger as JSON")
    p.add_argument("--per-device", action="store_true", help="print one line per sensor")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    cfg = SimConfig(
        devices=args.sensors, prefix=args.prefix, rate=args.rate, udp_only=args.udp_only,
        loss=args.loss, duplicate=args.duplicate, reorder=args.reorder, jitter=args.jitter,
        churn=args.churn, ack_share=args.ack_share, hang=args.hang, hang_at=args.hang_at,
        seed=args.seed, stamp=args.stamp, signals=not args.no_signals, max_backoff=args.max_backoff,
    )  # fmt: skip
    try:
        if args.init_devices:
            registry = DeviceRegistry.load_or_empty(args.init_devices)
            added = [d for d in cfg.device_ids() if d not in registry]
            for d in added:
                registry.add(d)
            registry.save(args.init_devices)
            print(
                f"{args.init_devices}: added {len(added)} sensors, {len(registry)} devices in all"
            )
            return 0
        if not args.devices:
            print(
                "simulate.py: --devices FILE is required (or --init-devices FILE)", file=sys.stderr
            )
            return 2
        registry = DeviceRegistry.load(args.devices)
        sim = Simulator(
            cfg, registry, host=args.host, tcp_port=args.tcp_port, udp_port=args.udp_port
        )
    except (DevicesError, ValueError) as exc:
        print(f"simulate.py: {exc}", file=sys.stderr)
        return 2
    print(
        f"simulating {cfg.devices} sensors against {args.host}:{args.tcp_port}/{args.udp_port}"
        + (f" for {args.duration:g}s" if args.duration else " (Ctrl-C to stop)"),
        flush=True,
    )

    async def run() -> None:
        with trio.open_signal_receiver(2, 15) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        sim.stop()
                        return

                nursery.start_soon(stop_on_signal)
                await sim.run(args.duration)
                nursery.cancel_scope.cancel()

    trio.run(run)
    if args.per_device:
        for r in sim.reports.values():
            print(
                f"{r.device_id:>14} {r.transport:3} sessions {r.sessions:3} sent {r.datagrams:6} "
                f"dropped {r.dropped:4} expected lost {r.expected_lost:4} duplicated {r.duplicated:3} "
                f"reordered {r.reordered:3}" + (f" hung at {r.hung_at:.3f}" if r.hung_at else "")
            )
    print(sim.summary())
    errors = [r for r in sim.reports.values() if r.errors]
    if errors:
        print(
            f"{len(errors)} sensors saw errors, e.g. {errors[0].device_id}: {errors[0].last_error}"
        )
    if args.report:
        with open(args.report, "w") as f:
            json.dump(
                {
                    "totals": sim.totals(),
                    "sensors": {d: attrs.asdict(r) for d, r in sim.reports.items()},
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
