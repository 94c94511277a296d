"""Recording benchmarks: writing and reading speed, and replay timing accuracy at 1x.

    collector bench recording                  # both parts
    collector bench recording --part read --readings 3000000
    collector bench recording --part replay --seconds 60 --devices 100 --rate 5

read    writes a synthetic recording (3 float readings per record) with the collector's own
        writer, then reads it back, in records and readings per second: scanning only (CRC
        checks, no decoding: the ceiling), reading and decoding every record the way the
        reader did before decode_records (the reference), and with RecordingReader; medians
        of --rounds, the reference and the reader taking turns, and their ratio.
replay  makes a recording of --seconds (devices at --rate datagrams/s), starts a real
        `collector serve --record` on 127.0.0.1, replays the recording into it at 1x with
        tools' replay machinery, then compares, datagram by datagram, when the collector
        received each one with when it should have (the recorded offset): the timing error
        p50/p99/max, and the replayer's own lateness.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from collector.core import segments
from collector.core.segments import RecordingReader, SegmentWriter
from collector.devices import DeviceRegistry
from collector.tools import options
from collector.tools.common import free_port, wait_for_tcp
from collector.tools.playback import replay_into, select
from collector.wire import recording as rec
from collector.wire.recording import ReadingsRecord, Record, RecordType

T0 = 1_767_225_600.0


def synthetic(
    directory: Path, records: int, devices: int, rate: float, seconds: float | None = None
) -> float:
    """Write a recording; returns the seconds it took to encode and write."""
    w = SegmentWriter(directory, segment_bytes=64 << 20, retain_bytes=None, retain_seconds=None)
    w.open(T0)
    ids = [f"bench-{i:04d}" for i in range(devices)]
    t_start = time.perf_counter()
    buf = bytearray()
    for d in ids:
        buf += rec.encode_json_record(
            RecordType.ONLINE,
            T0,
            {"device": d, "session_id": 1, "transport": "tcp", "address": "x"},
        )
    n = records if seconds is None else int(seconds * rate * devices)
    step = 1.0 / (rate * devices)
    for i in range(n):
        d = ids[i % devices]
        t = T0 + 0.5 + i * step
        buf += rec.encode_readings_record(
            t,
            d,
            i // devices + 1,
            0,
            [("temperature", 20.0 + i % 7), ("humidity", 50.5), ("battery", 99.25)],
        )
        if len(buf) > 1 << 20:
            w.write(bytes(buf), t)
            buf.clear()
    end = T0 + 0.5 + n * step
    for d in ids:
        buf += rec.encode_json_record(
            RecordType.OFFLINE,
            end + 0.5,
            {"device": d, "session_id": 1, "reason": "closed", "duration": end - T0},
        )
    w.write(bytes(buf), end)
    w.release()
    return time.perf_counter() - t_start


def reference_records(directory: Path) -> Iterator[Record]:
    """RecordingReader as it read before decode_records: scan_records, then decode_body for
    each record. The paired reference for the read figures."""
    for _, path in segments.list_segments(directory):
        data, _damage = segments.read_segment_salvaging(path)
        rec.decode_segment_header(data, str(path))
        for _, body in rec.scan_records(data):
            try:
                yield rec.decode_body(body)
            except rec.RecordingError:
                pass


def part_read(args: argparse.Namespace) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-rec-"))
    try:
        records = args.readings // 3
        wrote = synthetic(tmp, records, 100, 10.0)
        size = sum(p.stat().st_size for p in tmp.glob("seg-*"))
        results = {
            "records": records,
            "readings": records * 3,
            "bytes": size,
            "write_seconds": wrote,
        }
        scans, refs, reads = [], [], []
        for i in range(args.rounds):
            t = time.perf_counter()
            n = 0
            for _, path in segments.list_segments(tmp):
                for _ in rec.scan_records(segments.read_segment(path)):
                    n += 1
            scans.append(time.perf_counter() - t)
            # the reference and the reader take turns going first (a busy machine drifts)
            for which in ("ref", "new") if i % 2 == 0 else ("new", "ref"):
                t = time.perf_counter()
                readings = sum(
                    len(r.readings)
                    for r in (reference_records(tmp) if which == "ref" else RecordingReader(tmp))
                    if isinstance(r, ReadingsRecord)
                )
                (refs if which == "ref" else reads).append(time.perf_counter() - t)
                assert readings == records * 3, (which, readings)
        results["scan_seconds"] = statistics.median(scans)
        results["reference_read_seconds"] = statistics.median(refs)
        results["read_seconds"] = statistics.median(reads)
        scan, ref, read = (
            results[k] for k in ("scan_seconds", "reference_read_seconds", "read_seconds")
        )
        print(
            f"{records:,} records ({records * 3:,} readings, {size / 2**20:.1f} MiB on disk); medians of {args.rounds} rounds"
        )
        print(
            f"  write (encode + write):             {records / wrote:12,.0f} records/s  {records * 3 / wrote:12,.0f} readings/s"
        )
        print(
            f"  scan (CRC only, the ceiling):       {records / scan:12,.0f} records/s  {size / scan / 2**20:8.0f} MiB/s"
        )
        print(
            f"  read and decode, reference:         {records / ref:12,.0f} records/s  {records * 3 / ref:12,.0f} readings/s"
            "   (scan_records + decode_body per record)"
        )
        print(
            f"  read and decode, RecordingReader:   {records / read:12,.0f} records/s  {records * 3 / read:12,.0f} readings/s"
            "   (decode_records)"
        )
        print(f"  reader / reference: {ref / read:.2f}x   reader / scan: {scan / read:.2f}")  # fmt: skip
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def part_replay(args: argparse.Namespace) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    try:
        synthetic(work / "in", 0, args.sensors, args.rate, seconds=args.seconds)
        records = select(RecordingReader(work / "in"))
        secrets = {d: f"s-{d}" for d in {r.device_id for r in records}}
        DeviceRegistry(secrets).save(work / "devices.toml")
        tcp, udp, http = free_port(), free_port(socket.SOCK_DGRAM), free_port()
        collector = subprocess.Popen(
            [sys.executable, "-m", "collector", "serve", "--host", "127.0.0.1", "--tcp-port", str(tcp), "--udp-port", str(udp),
             "--http-port", str(http), "--devices", str(work / "devices.toml"), "--record", str(work / "out"), "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_tcp(tcp)
        datagrams = sum(1 for r in records if isinstance(r, ReadingsRecord))
        print(
            f"replaying {datagrams:,} datagrams of {len(secrets)} devices over {args.seconds:g}s at 1x ...",
            flush=True,
        )

        async def go():  # type: ignore[no-untyped-def]
            return await replay_into(records, secrets, tcp_port=tcp, udp_port=udp, speed=1.0)

        summary = trio.run(go)
        collector.send_signal(signal.SIGTERM)
        collector.wait(timeout=30)
        got = [r for r in RecordingReader(work / "out") if isinstance(r, ReadingsRecord)]
        sent = [r for r in records if isinstance(r, ReadingsRecord)]
        by_device: dict[str, list[float]] = {}
        for r in got:
            by_device.setdefault(r.device_id, []).append(r.time)
        first_sent = sent[0].time
        first_got = min(r.time for r in got)
        errors = []
        index: dict[str, int] = {}
        for r in sent:  # the k-th datagram of a device, sent and received
            k = index.get(r.device_id, 0)
            index[r.device_id] = k + 1
            times = by_device.get(r.device_id, [])
            if k < len(times):
                errors.append(abs((times[k] - first_got) - (r.time - first_sent)))
        errors.sort()
        q = lambda p: errors[min(len(errors) - 1, int(p * len(errors)))] * 1000  # noqa: E731
        result = {
            "datagrams": datagrams, "received": len(got), "seconds": args.seconds,
            "error_ms_p50": q(0.5), "error_ms_p99": q(0.99), "error_ms_max": errors[-1] * 1000,
            "replayer_lateness_ms_p50": summary.lateness_ms(50), "replayer_lateness_ms_p99": summary.lateness_ms(99),
            "replayer_lateness_ms_max": summary.lateness_ms(100), "elapsed": summary.elapsed,
        }  # fmt: skip
        print(
            f"  received {len(got):,} of {datagrams:,}; replay took {summary.elapsed:.2f}s for {args.seconds:g}s recorded"
        )
        print(f"  timing error at the collector (receive offset vs recorded offset): "
              f"p50 {result['error_ms_p50']:.2f} ms, p99 {result['error_ms_p99']:.2f} ms, max {result['error_ms_max']:.2f} ms")  # fmt: skip
        print(f"  replayer's own lateness: p50 {result['replayer_lateness_ms_p50']:.2f} ms, "
              f"p99 {result['replayer_lateness_ms_p99']:.2f} ms, max {result['replayer_lateness_ms_max']:.2f} ms")  # fmt: skip
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_parser(prog: str = "collector bench recording") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--part",
        choices=["read", "replay", "all"],
        default="all",
        help="which part to run (default all)",
    )
    p.add_argument("--readings", type=int, default=1_500_000, help="readings in the read benchmark")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the replayed recording")
    p.add_argument(
        "--sensors",
        type=options.count,
        default=100,
        help="recorded devices in the replay part (default 100)",
    )
    p.add_argument(
        "--rate", type=float, default=5.0, help="datagrams/s per device in the replay part"
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    return p


def main(argv: list[str] | None = None, prog: str = "collector bench recording") -> int:
    args = build_parser(prog).parse_args(argv)
    out = {}
    if args.part in ("read", "all"):
        out["read"] = part_read(args)
    if args.part in ("replay", "all"):
        out["replay"] = part_replay(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
