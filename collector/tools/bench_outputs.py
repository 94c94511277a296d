"""Outputs benchmark: readings/s each output sustains with its destination, and its CPU cost.

    collector bench outputs                          # influx (VictoriaMetrics) and mqtt
    collector bench outputs --only influx --readings 240000 --rounds 5

Writes a synthetic recording (2 float readings per record, 100 devices) of --readings
readings: the backlog of an outage of --outage seconds at --rate readings/s (60 s at 2000/s =
120,000 readings). Then, for each destination it starts on 127.0.0.1 (victoria-metrics,
mosquitto, from the PATH), it times in alternate rounds:

output     the collector's output (collector/outputs/runner.py) catching up on the whole
           backlog from an empty checkpoint: reading the recording, filtering, encoding,
           sending, waiting for the confirmations, saving checkpoints;
reference  the same readings sent the plainest way in the same process: for influx the line
           protocol encoded once beforehand and POSTed in batches of the same size with
           httpx; for mqtt the same messages published at QoS 1 with paho, waiting for every
           PUBACK. The reference does no reading, no checkpoint, no encoding (influx).

It prints medians of --rounds: readings/s, this process's CPU per 1000 readings (paho's
and the worker threads' included), the ratio output/reference, and the catch-up time of the
outage backlog while --rate readings/s keep arriving (backlog / (rate_output - rate)).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from collector.core.segments import SegmentWriter
from collector.outputs.config import OutputConfig
from collector.outputs.runner import Output
from collector.tools import options
from collector.tools.common import free_port, wait_for_tcp
from collector.wire import recording as rec
from collector.wire.recording import ReadingsRecord

T0 = 1_767_225_600.0


def write_backlog(directory: Path, readings: int) -> list[ReadingsRecord]:
    w = SegmentWriter(directory, segment_bytes=64 << 20, retain_bytes=None, retain_seconds=None)
    w.open(T0)
    records = []
    buf = bytearray()
    for i in range(readings // 2):
        r = ReadingsRecord(
            T0 + i / 2000, f"bench-{i % 100:03d}", i // 100, 0,
            (("temperature", 20.0 + i % 7 / 10), ("humidity", 40.0 + i % 13 / 10)),
        )  # fmt: skip
        records.append(r)
        buf += rec.encode_readings_record(r.time, r.device_id, r.seq, 0, r.readings)
        if len(buf) > 1 << 20:
            w.write(bytes(buf), T0)
            buf.clear()
    w.write(bytes(buf), T0)
    w.release()
    return records


class _Recorder:
    """What an output asks of the recorder: the flushed event and the newest record time."""

    def __init__(self) -> None:
        self.flushed = trio.Event()
        self.last_record_time = T0
        self.outputs: list[Any] = []


async def run_output(cfg: OutputConfig, directory: Path, total: int) -> tuple[float, float]:
    output = Output(cfg, recorder=_Recorder(), record_dir=str(directory), wall=time.time)  # type: ignore[arg-type]

    class Boundary:
        def report(self, kind: str, exc: BaseException, what: str = "") -> None:
            raise exc

    wall0, cpu0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(output.serve, Boundary())
        with trio.fail_after(600):
            while output.counters["acknowledged"] < total:  # noqa: ASYNC110 (a benchmark's probe)
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    return time.perf_counter() - wall0, time.process_time() - cpu0


async def reference_influx(
    url: str, records: list[ReadingsRecord], batch: int
) -> tuple[float, float]:
    import gzip

    import httpx

    from collector.outputs import lineproto

    bodies = []
    for i in range(0, len(records), batch // 2):
        body, _ = lineproto.encode(records[i : i + batch // 2])
        bodies.append(gzip.compress(body, 5))
    headers = {"content-encoding": "gzip", "content-type": "text/plain; charset=utf-8"}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        for body in bodies:
            r = await client.post(
                f"{url}/write", params={"db": "ref", "precision": "ns"}, content=body
            )
            r.raise_for_status()
    return time.perf_counter() - wall0, time.process_time() - cpu0


def reference_mqtt(
    port: int, records: list[ReadingsRecord], cfg: OutputConfig
) -> tuple[float, float]:
    import threading

    import paho.mqtt.client as mqtt

    from collector.outputs.mqtt import messages

    msgs, _ = messages(records, cfg, None)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-ref", clean_session=True)
    c.max_inflight_messages_set(100)
    acked = threading.Semaphore(0)
    c.on_publish = lambda *a: acked.release()
    c.connect("127.0.0.1", port)
    c.loop_start()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, len(msgs), cfg.batch_size):  # batch by batch, as the output does
        chunk = msgs[i : i + cfg.batch_size]
        for topic, payload, retain in chunk:
            c.publish(topic.replace("collector/", "ref/", 1), payload, qos=1, retain=retain)
        for _ in chunk:
            acked.acquire(timeout=60)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    return wall, cpu


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench(
    kind: str, args: argparse.Namespace, directory: Path, records: list[ReadingsRecord]
) -> dict[str, Any]:
    total = len(records) * 2
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    if kind == "influx":
        proc = subprocess.Popen(
            ["victoria-metrics", f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={tmp}",
             "-retentionPeriod=100y", "-loggerLevel=ERROR"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
    else:
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n")
        proc = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"mqtt://127.0.0.1:{port}"
    try:
        wait_for_tcp(port)
        time.sleep(0.5)
        out_rates, out_cpu, ref_rates, ref_cpu = [], [], [], []
        for i in range(args.rounds):
            cfg = OutputConfig(
                f"bench{i}", type=kind, url=url, start="oldest", batch_size=args.batch,
                checkpoint=str(tmp / f"round{i}.checkpoint"), flush_interval=0.05,
                events_topic="",
            )  # fmt: skip
            wall, cpu = trio.run(run_output, cfg, directory, total)
            out_rates.append(total / wall)
            out_cpu.append(cpu / total * 1000 * 1000)
            if kind == "influx":
                wall, cpu = trio.run(reference_influx, url, records, args.batch)
            else:
                wall, cpu = reference_mqtt(port, records, cfg)
            ref_rates.append(total / wall)
            ref_cpu.append(cpu / total * 1000 * 1000)
            print(
                f"  {kind} round {i + 1}: output {out_rates[-1]:,.0f} readings/s "
                f"({out_cpu[-1]:.1f} ms CPU per 1000), reference {ref_rates[-1]:,.0f}/s "
                f"({ref_cpu[-1]:.1f} ms)", flush=True,
            )  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)
    rate = _median(out_rates)
    catch_up = total / (rate - args.rate) if rate > args.rate else math.inf
    return {
        "readings": total,
        "output_per_s": rate,
        "output_cpu_ms_per_1000": _median(out_cpu),
        "reference_per_s": _median(ref_rates),
        "reference_cpu_ms_per_1000": _median(ref_cpu),
        "ratio": rate / _median(ref_rates),
        "catch_up_s": catch_up,
    }


def build_parser(prog: str = "collector bench outputs") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--only", choices=["influx", "mqtt"], help="one output type (default both)")
    p.add_argument(
        "--outage", type=options.positive, default=60.0, help="seconds of outage (default 60)"
    )
    p.add_argument(
        "--rate",
        type=options.positive,
        default=2000.0,
        help="readings/s during and after it (default 2000)",
    )
    p.add_argument(
        "--readings", type=options.at_least(2), help="backlog readings (default outage x rate)"
    )
    p.add_argument(
        "--batch", type=options.at_least(2), default=5000, help="readings per batch (default 5000)"
    )
    p.add_argument(
        "--rounds",
        type=options.at_least(1),
        default=3,
        help="rounds; medians are reported (default 3)",
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    return p


def main(argv: list[str] | None = None, prog: str = "collector bench outputs") -> int:
    args = build_parser(prog).parse_args(argv)
    readings = args.readings or int(args.outage * args.rate)
    kinds = [args.only] if args.only else ["influx", "mqtt"]
    missing = [k for k, tool in (("influx", "victoria-metrics"), ("mqtt", "mosquitto"))
               if k in kinds and not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists())]  # fmt: skip
    if missing:
        print(f"{prog}: needs victoria-metrics and mosquitto on the PATH (Debian: apt-get install "
              "victoria-metrics mosquitto)", file=sys.stderr)  # fmt: skip
        return 3
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as d:
        directory = Path(d)
        print(f"backlog: {readings:,} readings ({readings / args.rate:.0f} s at {args.rate:,.0f}/s), "
              f"{args.rounds} rounds", flush=True)  # fmt: skip
        records = write_backlog(directory, readings)
        for kind in kinds:
            out[kind] = bench(kind, args, directory, records)
    print()
    print(f"{'output':<8} {'readings/s':>11} {'CPU ms/1000':>12} {'reference/s':>12} "
          f"{'ref CPU':>8} {'ratio':>6} {'catch-up':>9}")  # fmt: skip
    for kind, f in out.items():
        print(
            f"{kind:<8} {f['output_per_s']:>11,.0f} {f['output_cpu_ms_per_1000']:>12.1f} "
            f"{f['reference_per_s']:>12,.0f} {f['reference_cpu_ms_per_1000']:>8.1f} "
            f"{f['ratio']:>6.2f} {f['catch_up_s']:>8.1f}s"
        )
    print(f"\ncatch-up: the {readings:,}-reading backlog while {args.rate:,.0f} readings/s keep "
          "arriving; CPU: this process, all threads")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
