"""Replay a recording: into a collector as its sensors, or as a stand-in collector.

    collector replay into recordings/ --devices devices.toml --speed 10
    collector replay into recordings/ --devices replay.toml --create-missing   # then restart the collector
    collector replay serve recordings/ --http-port 8082 --loop                 # dashboards, no sensors
    collector replay raw recordings/ --target 127.0.0.1:8081                       # the datagrams, byte for byte

`into` registers every recorded device again (with the credentials in --devices) and resends
its readings and heartbeats with the recorded timing divided by --speed ("max": as fast as
possible), optionally in a loop, restricted to a time range and to some devices. It shows a
progress bar with an ETA and ends with a summary.

`serve` serves the recording over the same WebSocket stream and web dashboard as a live
collector, with pause, seek and speed controls on the page (and at /api/replay).

Times for --from/--to: seconds from the start of the recording ("+90"), Unix seconds, or an ISO
8601 time ("2026-11-29T20:15:00Z").
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import sys
import time
from typing import Any

import trio

from collector.core.segments import open_recording
from collector.devices import DeviceRegistry, DevicesError
from collector.logs import setup_logging
from collector.tools import options
from collector.tools.playback import Playback, replay_into, select
from collector.wire.recording import DatagramRecord, RecordingError


def parse_time(text: str | None, start: float) -> float | None:
    if text is None:
        return None
    if text.startswith("+"):
        return start + float(text[1:].rstrip("s"))
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise options.UserError(
            f"cannot read the time {text!r}: use +SECONDS from the start, Unix seconds or ISO 8601"
        ) from None


def check_time(text: str) -> str:
    """Reject a time that cannot be read before anything is loaded (usage error: exit 2)."""
    try:
        parse_time(text, 0.0)
    except (options.UserError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use +SECONDS from the start, Unix seconds or ISO 8601"
        ) from None
    return text


def build_parser(prog: str = "collector replay") -> argparse.ArgumentParser:
    p = options.parser(prog, __doc__)
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "recording",
            metavar="DIR",
            nargs="+",
            help="a recording directory; several (the nodes of a cluster) are merged by time",
        )
        q.add_argument(
            "--speed",
            type=options.speed,
            default=1.0,
            help="a factor: 0.5, 1, 10 ..., or max (default 1)",
        )
        q.add_argument("--loop", action="store_true", help="start over at the end, until Ctrl-C")
        q.add_argument(
            "--from",
            dest="start",
            metavar="TIME",
            type=check_time,
            help="play from this time (+SECONDS, Unix seconds or ISO 8601)",
        )
        q.add_argument(
            "--to", dest="end", metavar="TIME", type=check_time, help="play until this time"
        )
        options.add_device_select(q, "recorded devices")
        options.add_log_level(q)

    into = sub.add_parser("into", help="resend the recording into a collector, as its sensors")
    common(into)
    options.add_collector_address(into)
    options.add_tls(into)
    into.add_argument(
        "--devices", metavar="FILE", required=True, help="credentials of the recorded devices"
    )
    into.add_argument(
        "--create-missing", action="store_true",
        help="add generated credentials for recorded devices missing from FILE, then exit "
        "(start the collector with that file, then run again without this flag)",
    )  # fmt: skip
    into.add_argument("--ack", action="store_true", help="ask for an ACK for every datagram")

    serve = sub.add_parser(
        "serve", help="serve the recording to dashboards, as a stand-in collector"
    )
    common(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address for the HTTP port (default 127.0.0.1)"
    )
    serve.add_argument(
        "--http-port",
        type=options.port,
        default=8082,
        help="the HTTP port (default 8082; 0 = any free)",
    )

    raw = sub.add_parser(
        "raw",
        help="resend the raw datagrams (recorded with [recording] raw = true) byte for byte",
        description="Resend the DATAGRAM records byte for byte, with their timing, to --target. "
        "A collector accepts them only while it holds the sessions they were signed for; "
        "otherwise each is rejected and counted (unknown_session), which is what this mode "
        "is for: replaying exactly what arrived, at a decoder, a capture or a rejection path.",
    )
    common(raw)
    raw.add_argument(
        "--target",
        default="127.0.0.1:8081",
        metavar="HOST:PORT",
        help="where to send them (default 127.0.0.1:8081)",
    )
    return p


def main(argv: list[str] | None = None, prog: str = "collector replay") -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.log_level)
    return options.run_main(prog, lambda: _main(args, prog))


def _main(args: argparse.Namespace, prog: str) -> int:
    try:
        reader = open_recording(args.recording)
        everything = list(reader)
    except RecordingError as exc:
        raise options.UserError(str(exc)) from None
    for problem in reader.problems():
        print(f"{prog}: note: {problem}", file=sys.stderr)
    if not everything:
        raise options.UserError(
            f"{' '.join(args.recording)} holds no records: is it a recording directory?"
        )
    start = everything[0].time
    if args.mode == "raw":
        return _raw(args, everything, start, prog)
    records = select(
        everything,
        start=parse_time(args.start, start),
        end=parse_time(args.end, start),
        devices=args.device,
    )
    if not records:
        raise options.UserError("nothing in that time range for those devices")
    if args.mode == "into":
        return _into(args, records, prog)
    return _serve(args, records)


def _into(args: argparse.Namespace, records: list, prog: str = "collector replay") -> int:
    recorded = sorted({r.device_id for r in records if getattr(r, "device_id", None)})
    try:
        registry = DeviceRegistry.load_or_empty(args.devices)
    except DevicesError as exc:
        raise options.UserError(str(exc)) from None
    missing = [d for d in recorded if d not in registry]
    if args.create_missing:
        for d in missing:
            registry.add(d)
        registry.save(args.devices)
        print(
            f"{args.devices}: added {len(missing)} of the {len(recorded)} recorded devices. Start the "
            f"collector with --devices {args.devices}, then run this again without --create-missing."
        )
        return 0
    if missing:
        raise options.UserError(
            f"{len(missing)} recorded devices have no credentials in {args.devices} "
            f"(e.g. {missing[0]}); --create-missing generates them"
        )
    options.require("rich", "tools", "collector replay into")
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    ssl_context = options.tls_context(args)
    datagrams = sum(1 for r in records if type(r).__name__ in ("ReadingsRecord", "HeartbeatRecord"))
    span = records[-1].time - records[0].time
    speed_text = "as fast as possible" if math.isinf(args.speed) else f"at {args.speed:g}x"
    print(
        f"replaying {datagrams} datagrams of {len(recorded)} devices ({span:.1f}s recorded) into "
        f"{args.host}:{args.tcp_port}/{args.udp_port} {speed_text}"
        + (" in a loop" if args.loop else ""),
        flush=True,
    )
    totals: dict[str, Any] = {"loops": 0}

    async def run() -> None:
        with Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("datagrams"), TimeRemainingColumn(), transient=False,
        ) as progress:  # fmt: skip
            while True:
                task = progress.add_task(f"pass {totals['loops'] + 1}", total=datagrams)
                summary = await replay_into(
                    records, registry, host=args.host, tcp_port=args.tcp_port, udp_port=args.udp_port,
                    speed=args.speed, ack=args.ack, on_sent=lambda n, t=task: progress.advance(t, n),
                    ssl_context=ssl_context,
                )  # fmt: skip
                totals["loops"] += 1
                totals["last"] = summary
                if not args.loop:
                    return

    try:
        trio.run(run)
    except KeyboardInterrupt:
        print("stopped")
        return options.EXIT_INTERRUPTED
    summary = totals.get("last")
    if summary is None:
        return options.EXIT_FAILED
    print(summary.summary())
    if summary.sessions == 0:
        print(
            f"{prog}: no recorded device could register: is a collector running at "
            f"{args.host}:{args.tcp_port}/{args.udp_port} with --devices {args.devices}?",
            file=sys.stderr,
        )
        return options.EXIT_ENVIRONMENT
    if summary.errors:
        print(
            f"{prog}: {summary.errors} errors on the way (see the log with --log-level INFO)",
            file=sys.stderr,
        )
        return options.EXIT_FAILED
    return 0


def _raw(
    args: argparse.Namespace, everything: list, start: float, prog: str = "collector replay"
) -> int:
    import socket

    t0, t1 = parse_time(args.start, start), parse_time(args.end, start)
    datagrams = [
        r for r in everything
        if isinstance(r, DatagramRecord) and (t0 is None or r.time >= t0) and (t1 is None or r.time < t1)
    ]  # fmt: skip
    if not datagrams:
        raise options.UserError(
            "no raw datagrams in that range (record with [recording] raw = true)"
        )
    host, _, port = args.target.rpartition(":")
    try:
        target = (host or "127.0.0.1", options.port(port))
    except argparse.ArgumentTypeError as exc:
        raise options.UserError(f"--target {args.target}: {exc}") from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    begin, first = time.monotonic(), datagrams[0].time
    for r in datagrams:
        if math.isfinite(args.speed):
            delay = begin + (r.time - first) / args.speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sock.sendto(r.data, target)
    print(
        f"sent {len(datagrams)} raw datagrams ({datagrams[-1].time - first:.1f}s recorded) to {args.target}"
    )
    return 0


def _serve(args: argparse.Namespace, records: list) -> int:
    from collector.app import Collector
    from collector.cli import run_until_signalled
    from collector.config import Config

    playback = Playback(
        records, speed=args.speed if math.isfinite(args.speed) else 1000.0, loop=args.loop
    )
    config = Config(host=args.host, http_port=args.http_port, log_level=args.log_level)
    collector = Collector(
        config, dict.fromkeys(playback.device_ids, ""), wall=playback.now, ingest=False
    )
    playback.attach(collector)
    if len(args.recording) == 1:
        collector.history_dir = args.recording[0]  # GET /api/history reads it

    async def play(addresses, nursery) -> None:
        print(
            f"serving {len(records)} records of {len(playback.device_ids)} devices "
            f"({playback.end - playback.start:.1f}s recorded, from "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(playback.start))}) at "
            f"{addresses.dashboard_url} ; Ctrl-C stops",
            flush=True,
        )
        await playback.run(collector)

    trio.run(run_until_signalled, collector, play)
    return 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
