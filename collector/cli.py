"""The `collector` command: serve, manage devices, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from collector._version import __version__
from collector.app import Addresses, Collector, ShutdownReport, statistics_to_json
from collector.config import Config, ConfigError, load_config
from collector.devices import DeviceRegistry, DevicesError, generate_secret
from collector.logs import setup_logging
from collector.wire.recording import RecordingError

log = logging.getLogger("collector")


def _add_server_args(p: argparse.ArgumentParser, *, demo: bool) -> None:
    p.add_argument("--host", help="address to bind (default 0.0.0.0; demo: 127.0.0.1)")
    p.add_argument(
        "--tcp-port", type=int, help="TCP control channel port (default 8080; 0 = any free)"
    )
    p.add_argument("--udp-port", type=int, help="UDP datagram port (default 8081; 0 = any free)")
    p.add_argument(
        "--http-port", type=int, help="dashboards, API and metrics (default 8082; 0 = any free)"
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="configuration file (every key: examples/collector.toml)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING or ERROR")
    p.add_argument(
        "--log-format", choices=["text", "json"], help="log lines as text (default) or JSON"
    )
    p.add_argument(
        "--stats-json", metavar="FILE", help="write the final statistics to FILE on exit"
    )
    p.add_argument(
        "--record",
        metavar="DIR",
        help="record readings and session events to DIR (see docs/RECORDING.md)"
        + ("; the demo records to ./recordings unless --no-record" if demo else ""),
    )
    if demo:
        p.add_argument("--no-record", action="store_true", help="do not record")
    if not demo:
        p.add_argument(
            "--devices",
            metavar="FILE",
            required=True,
            help="device credentials (collector devices add)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collector",
        description="Telemetry collector for IoT sensors: TCP registration, authenticated UDP "
        "datagrams, one session per device.",
    )
    parser.add_argument(
        "--version", action="version", version=f"trio-collector {__version__} (protocol 2)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the collector", description="Run the collector until SIGINT/SIGTERM."
    )
    _add_server_args(serve, demo=False)

    devices = sub.add_parser("devices", help="manage device credentials")
    dsub = devices.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    add = dsub.add_parser(
        "add", help="create a device with a generated secret (printed once)",
        description="Create a device with a generated secret, store it in FILE and print the secret once.",
    )  # fmt: skip
    add.add_argument("device_id", metavar="ID")
    add.add_argument("--devices", metavar="FILE", required=True)
    lst = dsub.add_parser("list", help="list device ids (never the secrets)")
    lst.add_argument("--devices", metavar="FILE", required=True)

    demo = sub.add_parser(
        "demo",
        help="run the collector with simulated sensors",
        description="Run a collector and N simulated sensors (generated credentials) in one "
        "process, printing a status line until Ctrl-C.",
    )
    _add_server_args(demo, demo=True)
    demo.add_argument("--sensors", type=int, default=20, help="simulated sensors (default 20)")
    demo.add_argument(
        "--rate", type=float, default=1.0, help="readings datagrams/s per sensor (default 1)"
    )
    demo.add_argument("--loss", type=float, default=0.02, help="injected loss (default 0.02)")
    demo.add_argument(
        "--udp-only",
        type=float,
        default=0.1,
        help="share of HELLO-registered sensors (default 0.1)",
    )
    demo.add_argument(
        "--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)"
    )
    demo.add_argument(
        "--status-interval", type=float, default=5.0, help="seconds between status lines"
    )
    demo.add_argument(
        "--data-dir", default="demo-data", help="where the demo writes its devices file"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "devices":
            return _devices(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            return _demo(args)
    except (ConfigError, DevicesError, RecordingError) as exc:
        print(f"collector: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        # Errors a person caused (a bad recording directory, say) surface from inside the
        # collector's task tree, wrapped in exception groups: one line for those too.
        found = _find(group, (ConfigError, DevicesError, RecordingError))
        if found is None:
            raise
        print(f"collector: {found}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2  # pragma: no cover


def _find(
    group: BaseExceptionGroup, types: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of `types` in a (nested) exception group, if it holds only those
    (and cancellations)."""
    matched, rest = group.split(types)
    if matched is None:
        return None
    if rest is not None and rest.subgroup(lambda e: not isinstance(e, trio.Cancelled)) is not None:
        return None
    todo: list[BaseException] = [matched]
    while todo:
        e = todo.pop()
        if isinstance(e, BaseExceptionGroup):
            todo.extend(reversed(e.exceptions))
        else:
            return e
    return None


def _devices(args: argparse.Namespace) -> int:
    registry = DeviceRegistry.load_or_empty(args.devices)
    if args.devices_command == "list":
        for device_id in registry:
            print(device_id)
        return 0
    secret = registry.add(args.device_id)
    registry.save(args.devices)
    print(f"added device {args.device_id} to {args.devices}")
    print(f"secret: {secret}")
    print("(shown once; the device proves it knows it, it never sends it)")
    return 0


def _config_from_args(args: argparse.Namespace, **defaults: Any) -> Config:
    overrides = {
        "host": args.host,
        "tcp_port": args.tcp_port,
        "udp_port": args.udp_port,
        "http_port": args.http_port,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "record_dir": args.record,
    }
    for key, value in defaults.items():
        if overrides.get(key) is None:
            overrides[key] = value
    return load_config(args.config, **overrides)


def _serve(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    setup_logging(config.log_level, config.log_format)
    devices = DeviceRegistry.load(args.devices)
    if not devices:
        log.warning("%s lists no devices: nobody can register", args.devices)
    collector = Collector(config, devices)
    report = trio.run(run_until_signalled, collector)
    _write_stats(collector, args.stats_json)
    print(report.summary(), flush=True)
    return 0


async def run_until_signalled(
    collector: Collector,
    extra: Callable[[Addresses, trio.Nursery], Awaitable[None]] | None = None,
) -> ShutdownReport:
    """Serve until SIGINT/SIGTERM, then shut down gracefully; a second signal exits at once."""
    report: ShutdownReport | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(collector.serve)
            log.info(
                "collector ready: TCP %s, UDP %s, HTTP %s (%d devices known)",
                _fmt(addresses.tcp),
                _fmt(addresses.udp),
                _fmt(addresses.http),
                len(collector.devices),
            )
            if addresses.dashboard_url:
                print(f"dashboard: {addresses.dashboard_url}", flush=True)

            async def shut_down() -> None:
                nonlocal report
                report = await collector.shutdown()
                nursery.cancel_scope.cancel()

            async def watch_signals() -> None:
                count = 0
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        changed = collector.reload()
                        log.info(
                            "SIGHUP: reloaded %s",
                            ", ".join(changed) if changed else "nothing that changed",
                        )
                        continue
                    count += 1
                    if count == 1:
                        log.info("%s: shutting down gracefully (again to exit at once)", name)
                        nursery.start_soon(shut_down)
                    else:
                        print(f"{name} again: exiting at once", file=sys.stderr, flush=True)
                        os._exit(130)

            nursery.start_soon(watch_signals)
            if extra is not None:

                async def run_extra() -> None:
                    await extra(addresses, nursery)
                    nursery.start_soon(shut_down)

                nursery.start_soon(run_extra)
    assert report is not None
    return report


def _write_stats(collector: Collector, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(statistics_to_json(collector.statistics()), indent=1))


def _fmt(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "off"


def _demo(args: argparse.Namespace) -> int:
    from collector.device.sim import SimConfig, Simulator

    config = _config_from_args(
        args, host="127.0.0.1", record_dir=None if args.no_record else "recordings"
    )
    setup_logging(config.log_level if args.log_level else "WARNING", config.log_format)
    sim_cfg = SimConfig(
        devices=args.sensors, rate=args.rate, loss=args.loss, udp_only=args.udp_only,
        duplicate=0.005, reorder=0.01, jitter=0.1,
    )  # fmt: skip
    registry = DeviceRegistry({d: generate_secret() for d in sim_cfg.device_ids()})
    devices_file = Path(args.data_dir) / "devices.toml"
    registry.save(devices_file)
    collector = Collector(config, registry)
    holder: dict[str, Simulator] = {}

    async def run_demo(addresses: Addresses, nursery: trio.Nursery) -> None:
        host = addresses.tcp[0] if addresses.tcp[0] not in ("0.0.0.0", "::") else "127.0.0.1"
        sim = holder["sim"] = Simulator(
            sim_cfg, registry, host=host, tcp_port=addresses.tcp[1], udp_port=addresses.udp[1]
        )
        print(
            f"demo: collector on TCP {_fmt(addresses.tcp)} and UDP {_fmt(addresses.udp)}, "
            f"{sim_cfg.devices} simulated sensors (credentials in {devices_file})\n"
            f"demo: open {addresses.dashboard_url} to watch them live "
            f"(or: .venv/bin/python tools/watch.py {addresses.dashboard_url}); Ctrl-C stops",
            flush=True,
        )
        async with trio.open_nursery() as inner:
            inner.start_soon(_status_lines, collector, args.status_interval)
            await sim.run(args.duration)
            inner.cancel_scope.cancel()

    try:
        report = trio.run(run_until_signalled, collector, run_demo)
    except OSError as exc:
        print(
            f"collector demo: {exc} (use --tcp-port 0 --udp-port 0 for free ports)", file=sys.stderr
        )
        return 1
    _write_stats(collector, args.stats_json)
    sim = holder.get("sim")
    if sim is not None:
        sim.stop()
        print(sim.summary())
        stats = collector.statistics()
        counted = sum(d.lost for d in stats.devices.values())
        print(
            f"collector counted {counted} lost datagrams; the simulator dropped "
            f"{sim.totals()['expected_lost']} that it could detect"
        )
    print(report.summary(), flush=True)
    return 0


async def _status_lines(collector: Collector, interval: float) -> None:
    last = 0
    while True:
        await trio.sleep(interval)
        s = collector.statistics()
        lost = sum(d.lost for d in s.devices.values())
        rate = (s.datagrams_accepted - last) / interval
        last = s.datagrams_accepted
        print(
            f"[{s.uptime:6.0f}s] online {s.devices_online}/{len(collector.devices)}  "
            f"datagrams {s.datagrams_accepted} (+{rate:.0f}/s)  readings {s.readings}  "
            f"lost {lost}  duplicates {sum(d.duplicates for d in s.devices.values())}  "
            f"rejected {s.rejected_total}  sessions {s.sessions_opened}",
            flush=True,
        )
