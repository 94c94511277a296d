"""Run simulated sensors against a collector, with deliberate loss, duplication, reordering,
jitter and churn, and print what was sent and dropped on purpose.

    collector devices add ...            # or: collector simulate --init-devices devices.toml
    collector serve --devices devices.toml
    collector simulate --devices devices.toml --sensors 20 --loss 0.05 --duration 60

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
from collector.tools import options


def build_parser(prog: str = "collector simulate") -> argparse.ArgumentParser:
    p = options.parser(prog, __doc__)
    p.add_argument("--devices", metavar="FILE", help="the credentials file the collector uses")
    p.add_argument(
        "--init-devices",
        metavar="FILE",
        help="create credentials for the simulated sensors in FILE (adding missing ones) and exit",
    )
    options.add_collector_address(p)
    options.add_tls(p)
    p.add_argument(
        "--sensors", type=options.count, default=20, help="number of sensors (default 20)"
    )
    p.add_argument("--prefix", default="sensor", help="ids are PREFIX-001, PREFIX-002, ...")
    p.add_argument(
        "--rate",
        type=options.positive,
        default=1.0,
        help="TELEMETRY datagrams/s per sensor (default 1)",
    )
    p.add_argument(
        "--udp-only",
        type=options.share,
        default=0.0,
        help="share of sensors registering with HELLO datagrams instead of TCP (0 to 1)",
    )
    p.add_argument(
        "--loss",
        type=options.share,
        default=0.0,
        help="probability that a datagram is dropped on purpose (0 to 1)",
    )
    p.add_argument(
        "--duplicate",
        type=options.share,
        default=0.0,
        help="probability that a datagram is sent twice",
    )
    p.add_argument(
        "--reorder",
        type=options.share,
        default=0.0,
        help="probability that a datagram is held back and sent after the next",
    )
    p.add_argument(
        "--jitter",
        type=options.share,
        default=0.0,
        help="send times vary by +/- this fraction of the interval",
    )
    p.add_argument(
        "--churn", type=float, default=0.0, help="clean reconnects per sensor per minute"
    )
    p.add_argument(
        "--ack-share",
        type=options.share,
        default=0.0,
        help="share of readings sent with an ACK requested",
    )
    p.add_argument(
        "--hang",
        type=options.count,
        default=0,
        help="this many sensors go silent without a goodbye at --hang-at",
    )
    p.add_argument(
        "--hang-at",
        type=float,
        default=30.0,
        help="seconds into the run when --hang sensors go silent (default 30)",
    )
    p.add_argument(
        "--duration", type=options.positive, help="seconds to run (default: until Ctrl-C)"
    )
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
    options.add_log_level(p)
    return p


def main(argv: list[str] | None = None, prog: str = "collector simulate") -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.log_level)
    return options.run_main(prog, lambda: _run(args, prog))


def _run(args: argparse.Namespace, prog: str) -> int:
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
            raise options.UserError("--devices FILE is needed (or --init-devices FILE to make one)")
        registry = DeviceRegistry.load(args.devices)
        sim = Simulator(
            cfg, registry, host=args.host, tcp_port=args.tcp_port, udp_port=args.udp_port,
            ssl_context=options.tls_context(args),
        )  # fmt: skip
    except (DevicesError, ValueError) as exc:
        raise options.UserError(str(exc)) from None
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
    if not sum(r.sessions for r in sim.reports.values()):
        print(
            f"{prog}: no sensor could register: is a collector running at "
            f"{args.host}:{args.tcp_port}/{args.udp_port}, and does it know these devices?",
            file=sys.stderr,
        )
        return options.EXIT_ENVIRONMENT
    if errors:
        return options.EXIT_FAILED
    return 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
