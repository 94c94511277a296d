"""Ingest benchmark: the collector's full datagram path against a raw batched trio receiver,
side by side in one invocation, and (if installed) Mosquitto as the reference broker.

    collector bench ingest                       # all sections, 3 rounds
    collector bench ingest --sections ceiling,full --datagrams 100000 --rounds 5
    collector bench ingest --profile full        # where the time goes (cProfile, top 25)

Method (the same for every receiver): the receiving socket gets a very large buffer
(SO_RCVBUFFORCE), the datagrams are sent into it while the receiver's event loop is blocked,
then the loop is released and the time to drain and process all of them is measured, with the
process's CPU time. The kernel's receive-buffer drop counter (/proc/net/snmp) is checked, so a
figure never hides drops. Sections:

  ceiling      trio, wait for readability once, then read up to 256 datagrams without
               blocking; parse the header and look the session up in a dict (no crypto)
  full         the collector: decryption (ChaCha20-Poly1305), anti-replay window, accounting, readings
               to the stream hub; variants: recording on, and 1 or 10 dashboards subscribed to
               everything (WebSocket clients in another process); the drain ends when every
               dashboard has been sent every reading
  mosquitto    Mosquitto (Debian's package), publish to 10 subscribers: broker CPU seconds per
               delivered message, next to the collector's per delivered reading; and latency
               p50/p99 of both at the same paced load

Datagrams are TELEMETRY of about 100 bytes (three float readings), round-robin over --devices
sessions, all pre-signed before timing. Rounds alternate the sections (A B C A B C ...) so that
ratios pair runs made at the same time on this noisy shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from collector.servers.udp import SO_RCVBUFFORCE
from collector.tools import options
from collector.tools.common import mosquitto, mosquitto_path, proc_stat, rcvbuf_errors

HERE = Path(__file__).resolve()
BIG_RCVBUF = 1 << 30


def make_datagrams(n: int, sessions: list[tuple[int, bytes]]) -> list[bytes]:
    from collector.wire.datagram import DatagramType, encode_datagram, encode_readings

    seqs = [0] * len(sessions)
    out = []
    ts = time.time_ns() // 1000
    for i in range(n):
        k = i % len(sessions)
        sid, key = sessions[k]
        seqs[k] += 1
        payload = encode_readings(
            {"temperature": 21.5 + i % 7, "humidity": 40.25 + i % 5, "battery": 97.125}
        )
        out.append(encode_datagram(key[0], DatagramType.TELEMETRY, sid, seqs[k], ts, payload))
    return out


def prefill(data: list[bytes], addr: tuple[str, int]) -> socket.socket:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    for d in data:
        sender.sendto(d, addr)
    return sender


# -- the raw ceiling ----------------------------------------------------------------------------


async def run_ceiling(n: int, devices: int) -> dict[str, Any]:
    from collector.wire.datagram import HEADER

    sessions = [(i + 1, (secrets.token_bytes(32), secrets.token_bytes(32))) for i in range(devices)]
    table = {sid: [0] for sid, _ in sessions}
    data = make_datagrams(n, sessions)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BIG_RCVBUF)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    drops = rcvbuf_errors()
    sender = prefill(data, sock.getsockname())
    unpack = HEADER.unpack_from
    count = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while count < n:
        await trio.lowlevel.wait_readable(sock)
        for _ in range(256):
            try:
                d, _addr = sock.recvfrom(65536)
            except BlockingIOError:
                break
            h = unpack(d)
            entry = table.get(h[4])
            if entry is not None:
                entry[0] += 1
            count += 1
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    sender.close()
    sock.close()
    return {"datagrams": n, "seconds": elapsed, "cpu": cpu, "kernel_drops": rcvbuf_errors() - drops}


# -- the collector's full path --------------------------------------------------------------


def _dashboards_process(port: int, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "collector.tools.bench_ingest", "--role", "dashboards", "--port", str(port), "--count", str(count)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


async def run_full(
    n: int, devices: int, *, record: bool, dashboards: int, profile: bool = False
) -> dict[str, Any]:
    from collector.app import Collector
    from collector.config import Config

    tmp = tempfile.mkdtemp(prefix="bench-ingest-") if record else None
    cfg = Config(
        host="127.0.0.1", tcp_port=0, udp_port=0, http_port=0 if dashboards else None,
        udp_rcvbuf=BIG_RCVBUF, record_dir=tmp or "", log_level="WARNING",
        stream_queue=10_000_000, stream_stall_limit=600.0, max_devices=max(10_000, devices),
    )  # fmt: skip
    ids = [f"bench-{i:05d}" for i in range(devices)]
    collector = Collector(cfg, dict.fromkeys(ids, "unused"))
    procs: list[subprocess.Popen[str]] = []
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(collector.serve)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
        sessions = []
        for device_id in ids:  # sessions opened directly: this measures datagrams, not handshakes
            key = (secrets.token_bytes(32), secrets.token_bytes(32))
            s = collector.registry.open(device_id, key, "udp", address=sender.getsockname())
            sessions.append((s.session_id, key))
        if dashboards:
            procs = [_dashboards_process(addresses.http[1], dashboards)]
            # The harness polls here and below (a few wake-ups per second): it watches counters
            # of the system under test rather than adding hooks to it.
            while len(collector.hub.subscribers) < dashboards or any(  # noqa: ASYNC110
                s.matcher is None for s in collector.hub.subscribers
            ):
                await trio.sleep(0.05)
            await trio.sleep(0.5)
        data = make_datagrams(n, sessions)
        base = collector.ingest.accepted
        drops = rcvbuf_errors()
        for d in data:  # the event loop is blocked: everything waits in the socket buffer
            sender.sendto(d, addresses.udp)
        readings = 3 * n
        profiler = cProfile.Profile() if profile else None
        t0, c0 = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        while collector.ingest.accepted - base < n or (
            dashboards and min(s.readings_sent for s in collector.hub.subscribers) < readings
        ):
            await trio.sleep(0.002)
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("the drain did not finish in 120 s")
        if profiler:
            profiler.disable()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if collector.recorder is not None:
            await collector.recorder.flush()
        result = {
            "datagrams": n,
            "seconds": elapsed,
            "cpu": cpu,
            "kernel_drops": rcvbuf_errors() - drops,
            "accepted": collector.ingest.accepted - base,
            "rejected": sum(collector.ingest.rejected.values()),
            "batches": collector.ingest.batches,
            "delivered_readings": sum(s.readings_sent for s in collector.hub.subscribers),
            "messages_sent": sum(s.messages_sent for s in collector.hub.subscribers),
        }
        if collector.recorder is not None:
            result["recorded"] = collector.recorder.statistics()["records"]
        sender.close()
        nursery.cancel_scope.cancel()
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(25)
    return result


async def dashboards_role(port: int, count: int) -> None:
    from trio_websocket import ConnectionClosed, open_websocket_url

    received = [0] * count

    async def one(i: int, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_websocket_url(
            f"ws://127.0.0.1:{port}/stream", message_queue_size=4096
        ) as ws:
            await ws.send_message(json.dumps({"type": "subscribe", "history": 0}))
            task_status.started()
            with contextlib.suppress(ConnectionClosed):
                while True:
                    msg = await ws.get_message()
                    if msg.startswith('{"type":"readings"'):
                        received[i] += msg.count("],[") + 1

    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for i in range(count):
                await nursery.start(one, i)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print(json.dumps(received))


# -- Mosquitto --------------------------------------------------------------------------------


def run_mosquitto(n: int, subscribers: int) -> dict[str, Any] | None:
    if mosquitto_path() is None:
        return None
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        return {"skipped": "paho-mqtt is not installed (pip install paho-mqtt)"}
    with mosquitto() as (proc, port):
        subs = subprocess.Popen(
            [sys.executable, "-m", "collector.tools.bench_ingest", "--role", "mqtt-subscribers", "--port", str(port), "--count", str(subscribers),
             "--datagrams", str(n)], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.5)  # let them connect and subscribe
        cpu0 = proc_stat(proc.pid)[1]
        t0 = time.perf_counter()
        pub = subprocess.run(
            [sys.executable, "-m", "collector.tools.bench_ingest", "--role", "mqtt-publisher", "--port", str(port), "--datagrams", str(n)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        out, _ = subs.communicate(timeout=300)
        elapsed = time.perf_counter() - t0
        cpu = proc_stat(proc.pid)[1] - cpu0
    received = json.loads(out)
    return {
        "messages": n, "subscribers": subscribers, "delivered": sum(received), "seconds": elapsed,
        "broker_cpu": cpu, "publisher": pub.stdout.strip(),
    }  # fmt: skip


def mqtt_publisher(port: int, n: int) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload = b"x" * 100
    t0 = time.perf_counter()
    for _ in range(n):
        client.publish("bench/readings", payload, qos=0)
    client.loop_stop()
    client.disconnect()
    print(f"published {n} in {time.perf_counter() - t0:.2f}s")


def mqtt_subscribers(port: int, count: int, n: int) -> None:
    import paho.mqtt.client as mqtt

    received = [0] * count
    done = asyncio.Event

    clients = []
    for i in range(count):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)

        def on_message(_c: Any, _u: Any, _m: Any, i: int = i) -> None:
            received[i] += 1

        c.on_message = on_message
        c.connect("127.0.0.1", port)
        c.subscribe("bench/readings", qos=0)
        c.loop_start()
        clients.append(c)
    deadline = time.monotonic() + 300
    last, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline and sum(received) < n * count:
        time.sleep(0.05)
        total = sum(received)
        if total != last:
            last, stable_since = total, time.monotonic()
        elif total and time.monotonic() - stable_since > 3:
            break  # nothing more is coming (QoS 0 may drop)
    for c in clients:
        c.loop_stop()
    print(json.dumps(received))
    del done


# -- main -------------------------------------------------------------------------------------


def build_parser(prog: str = "collector bench ingest") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--datagrams", type=int, default=200_000, help="datagrams per run (default 200000)"
    )
    p.add_argument(
        "--sessions",
        type=options.count,
        default=1000,
        help="sessions the datagrams are spread over (default 1000)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    p.add_argument(
        "--sections",
        default="ceiling,full,record,dash1,dash10,mosquitto",
        help="comma-separated sections to run (default all)",
    )
    p.add_argument(
        "--profile", choices=["full", "record", "dash1", "dash10"], help="profile one section once"
    )
    p.add_argument("--json", metavar="FILE", help="write every run's figures")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str = "collector bench ingest") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.role == "dashboards":
        trio.run(dashboards_role, args.port, args.count)
        return 0
    if args.role == "mqtt-publisher":
        mqtt_publisher(args.port, args.datagrams)
        return 0
    if args.role == "mqtt-subscribers":
        mqtt_subscribers(args.port, args.count, args.datagrams)
        return 0

    variants = {
        "ceiling": lambda: run_ceiling(args.datagrams, args.sessions),
        "full": lambda: run_full(args.datagrams, args.sessions, record=False, dashboards=0),
        "record": lambda: run_full(args.datagrams, args.sessions, record=True, dashboards=0),
        "dash1": lambda: run_full(args.datagrams // 4, args.sessions, record=False, dashboards=1),
        "dash10": lambda: run_full(
            args.datagrams // 10, args.sessions, record=False, dashboards=10
        ),
    }
    if args.profile:
        name = args.profile
        print(trio.run(lambda: run_full(
            args.datagrams, args.sessions, record=name == "record",
            dashboards={"dash1": 1, "dash10": 10}.get(name, 0), profile=True,
        )))  # fmt: skip
        return 0
    sections = [s for s in args.sections.split(",") if s]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sections if s in variants}
    print(
        f"{args.datagrams} datagrams of ~100 bytes over {args.sessions} sessions, {args.rounds} rounds",
        flush=True,
    )
    for r in range(args.rounds):
        for name in runs:
            res = trio.run(variants[name])
            runs[name].append(res)
            print(f"  round {r + 1} {name:8} {res['datagrams'] / res['seconds']:10,.0f} datagrams/s "
                  f"({res['cpu'] / res['datagrams'] * 1e6:5.2f} us CPU each)"
                  + (f", kernel drops {res['kernel_drops']}" if res["kernel_drops"] else ""), flush=True)  # fmt: skip
    print()
    print(
        f"{'section':10} {'median datagrams/s':>19} {'us CPU/datagram':>16} {'vs ceiling (paired)':>20} {'readings delivered/CPU-s':>25}"
    )
    ceiling = runs.get("ceiling")
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        rates = [x["datagrams"] / x["seconds"] for x in rs]
        cpus = [x["cpu"] / x["datagrams"] * 1e6 for x in rs]
        ratio = ""
        if ceiling and name != "ceiling":
            pairs = [
                (x["datagrams"] / x["seconds"]) / (c["datagrams"] / c["seconds"])
                for x, c in zip(rs, ceiling, strict=True)
            ]
            ratio = f"{statistics.median(pairs):.2f} ({min(pairs):.2f}-{max(pairs):.2f})"
        delivered = ""
        if rs[0].get("delivered_readings"):
            per = [x["delivered_readings"] / x["cpu"] for x in rs]
            delivered = f"{statistics.median(per):,.0f}"
        summary[name] = {
            "rate_median": statistics.median(rates),
            "cpu_us_median": statistics.median(cpus),
            "runs": rs,
        }
        print(
            f"{name:10} {statistics.median(rates):19,.0f} {statistics.median(cpus):16.2f} {ratio:>20} {delivered:>25}"
        )
    if "mosquitto" in sections:
        m = run_mosquitto(args.datagrams // 10, 10)
        summary["mosquitto"] = m
        if m is None:
            print("\nmosquitto: not installed (apt-get install mosquitto); comparison skipped")
        elif "skipped" in m:
            print(f"\nmosquitto: {m['skipped']}")
        else:
            per = m["delivered"] / m["broker_cpu"] if m["broker_cpu"] else float("nan")
            print(f"\nmosquitto 10 subscribers: {m['delivered']:,} messages delivered of {m['messages'] * 10:,}, "
                  f"broker CPU {m['broker_cpu']:.2f}s = {per:,.0f} messages delivered per CPU-second")  # fmt: skip
            if "dash10" in summary:
                ours = statistics.median(
                    x["delivered_readings"] / x["cpu"] for x in summary["dash10"]["runs"]
                )
                print(
                    f"collector 10 dashboards: {ours:,.0f} readings delivered per CPU-second: {ours / per:.1f}x Mosquitto"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
