"""`collector bench workers`: how fast one and several worker processes drain UDP ingest.

Each round starts a real `collector serve` (1 process, then `--workers N`; alternated, so
both see the same machine), registers UDP-only devices with real HELLOs, stops the collector's
processes (SIGSTOP), fills their sockets with sealed TELEMETRY datagrams, lets them go
(SIGCONT) and times how long the kernel's queues take to empty. The sender is stopped
before the clock starts, so it takes no CPU from the workers. Then the collector is shut
down and its statistics must say every datagram was accepted.

With N workers the datagrams are steered in the kernel by session id, and each worker
publishes what it accepts on the cluster bus (a private redis-server): the figure is what a
user of `--workers N` gets, bus included. The Redis CPU is reported next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from collector.device.bulk import register_udp
from collector.devices import DeviceRegistry
from collector.tools import options
from collector.tools.common import free_port, proc_stat, rcvbuf_errors, start_redis
from collector.wire import datagram as dg

CONFIG = """
[server]
udp_rcvbuf = {rcvbuf}
[sessions]
heartbeat_interval = 60.0
[ratelimit]
per_source = 100000.0
burst = 100000.0
total = 100000.0
[limits]
flapping_max = 100000
[logging]
level = "WARNING"
"""


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True)
    kids = []
    for line in out.stdout.splitlines()[1:]:
        p, pp, args = line.split(None, 2)
        if int(pp) == pid:
            kids.append((int(p), args))
    return [p for p, _ in kids]


def _rx_queued(port: int) -> int:
    """Bytes waiting in every UDP socket bound to `port` (the rx_queue of /proc/net/udp)."""
    total = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].rsplit(":", 1)[1], 16) == port:
            total += int(f[4].split(":")[1], 16)
    return total


def _wait_healthy(port: int, workers: int, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                body = json.loads(r.read())
            if workers == 1 or len(body.get("cluster", {}).get("nodes", [])) == workers:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the collector did not answer on port {port} in {seconds:.0f}s")


def _spin(n: int) -> None:
    x = 0
    for i in range(n):
        x += i * i % 7


def machine_ratio(processes: int, n: int = 20_000_000) -> float:
    """How much faster `processes` processes do the same pure-Python work than one: what this
    machine's cores give at most (two hyperthreads of one core give far less than 2)."""
    import multiprocessing

    t0 = time.perf_counter()
    _spin(n)
    one = time.perf_counter() - t0
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_spin, args=(n // processes,)) for _ in range(processes)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return one / (time.perf_counter() - t0)


def run_round(
    workers: int, datagrams: int, devices: int, rcvbuf: int, *, bus: bool = False
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    reg = DeviceRegistry({})
    secrets = {f"w-{i:05d}": reg.add(f"w-{i:05d}") for i in range(devices)}
    reg.save(tmp / "devices.toml")
    (tmp / "collector.toml").write_text(CONFIG.format(rcvbuf=rcvbuf))
    tcp, udp, http = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    stats = tmp / "stats.json"
    cmd = [sys.executable, "-m", "collector", "serve", "--devices", str(tmp / "devices.toml"),
           "--config", str(tmp / "collector.toml"), "--host", "127.0.0.1",
           "--tcp-port", str(tcp), "--udp-port", str(udp), "--http-port", str(http),
           "--stats-json", str(stats)]  # fmt: skip
    if workers > 1:
        cmd += ["--workers", str(workers)]
    redis = None
    if bus and workers == 1:  # one process, but on a bus as the workers are
        redis, redis_url = start_redis(tmp)
        cmd += ["--redis", redis_url]
    log = open(tmp / "collector.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_healthy(http, workers)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        sessions = register_udp(sock, ("127.0.0.1", udp), secrets)
        if len(sessions) != devices:
            raise RuntimeError(f"only {len(sessions)} of {devices} devices registered")
        payload = dg.encode_readings({"temperature": 21.5, "humidity": 40.25, "battery": 97.0})
        order = list(sessions.values())
        data = [
            order[i % len(order)].seal(dg.DatagramType.TELEMETRY, payload) for i in range(datagrams)
        ]
        kids = _children(proc.pid)
        collector_pids = (
            [
                p
                for p in kids
                if "--worker-spec"
                in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            ]
            if workers > 1
            else [proc.pid]
        )
        redis_pids = [p for p in kids if p not in collector_pids]
        if redis is not None:
            redis_pids.append(redis.pid)
        for p in collector_pids:
            os.kill(p, signal.SIGSTOP)
        drops = rcvbuf_errors()
        sock.setblocking(True)
        for d in data:
            sock.sendto(d, ("127.0.0.1", udp))
        before = {p: proc_stat(p)[1] for p in collector_pids + redis_pids}
        t0 = time.perf_counter()
        for p in collector_pids:
            os.kill(p, signal.SIGCONT)
        while _rx_queued(udp) > 0:
            time.sleep(0.001)
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("the queues did not drain in 300 s")
        elapsed = time.perf_counter() - t0
        after = {p: proc_stat(p)[1] for p in collector_pids + redis_pids}
        drops = rcvbuf_errors() - drops
        time.sleep(0.5)
        sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
        if redis is not None:
            redis.terminate()
            redis.wait(10)
    doc = json.loads(stats.read_text())
    per = doc["workers"].values() if workers > 1 else [doc]
    accepted = sum(s["datagrams_accepted"] for s in per)
    return {
        "workers": workers,
        "bus": bus or workers > 1,
        "datagrams": datagrams,
        "seconds": elapsed,
        "rate": datagrams / elapsed,
        "accepted": accepted,
        "kernel_drops": drops,
        "collector_cpu": sum(after[p] - before[p] for p in collector_pids),
        "redis_cpu": sum(after[p] - before[p] for p in redis_pids),
        "per_worker_accepted": [s["datagrams_accepted"] for s in per],
    }


def build_parser(prog: str = "collector bench workers") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workers",
        type=options.count,
        default=2,
        help="workers to compare with one process (default 2)",
    )
    p.add_argument(
        "--datagrams",
        type=options.count,
        default=200_000,
        help="datagrams per round (default 200000)",
    )
    p.add_argument(
        "--devices", type=options.count, default=200, help="UDP-only devices (default 200)"
    )
    p.add_argument(
        "--rounds", type=options.count, default=3, help="rounds of each (alternated; default 3)"
    )
    p.add_argument(
        "--rcvbuf",
        type=options.count,
        default=1 << 30,
        help="bytes of receive buffer per socket (default 1 GiB)",
    )
    p.add_argument(
        "--bus",
        action="store_true",
        help="also run one process on a Redis bus (what the bus costs)",
    )
    p.add_argument("--json", metavar="FILE", help="write every round's figures")
    return p  # fmt: skip


def main(argv: list[str] | None = None, prog: str = "collector bench workers") -> int:
    args = build_parser(prog).parse_args(argv)
    results: list[dict[str, Any]] = []
    machine = []
    arms = [(1, False), *([(1, True)] if args.bus else []), (args.workers, True)]
    for r in range(args.rounds):
        machine.append(machine_ratio(args.workers))
        print(f"round {r + 1}: this machine runs {args.workers} processes of pure Python "
              f"{machine[-1]:.2f}x as fast as one", flush=True)  # fmt: skip
        for workers, bus in arms:
            res = run_round(workers, args.datagrams, args.devices, args.rcvbuf, bus=bus)
            results.append(res)
            print(
                f"round {r + 1}, {workers} worker{'s' if workers > 1 else ''}"
                f"{' on a bus' if bus and workers == 1 else ''}: "
                f"{res['rate']:,.0f} datagrams/s ({res['seconds']:.2f} s), accepted "
                f"{res['accepted']:,} of {res['datagrams']:,}, kernel drops {res['kernel_drops']}, "
                f"collector CPU {res['collector_cpu']:.2f} s, redis CPU {res['redis_cpu']:.2f} s"
                + (f", per worker {res['per_worker_accepted']}" if workers > 1 else ""),
                flush=True,
            )
    one = [x["rate"] for x in results if x["workers"] == 1 and not x["bus"]]
    many = [x["rate"] for x in results if x["workers"] == args.workers]
    ratios = [m / o for o, m in zip(one, many, strict=True)]
    print(
        f"median: 1 worker {statistics.median(one):,.0f}/s, {args.workers} workers "
        f"{statistics.median(many):,.0f}/s; ratio per round "
        + ", ".join(f"{x:.2f}" for x in ratios)
        + f" (median {statistics.median(ratios):.2f}); the machine's own ratio "
        + ", ".join(f"{x:.2f}" for x in machine)
    )
    if args.bus:
        on_bus = [x["rate"] for x in results if x["workers"] == 1 and x["bus"]]
        print(
            "one process on a bus: "
            + ", ".join(f"{b / o:.2f}" for o, b in zip(one, on_bus, strict=True))
            + " of one process without"
        )
    bad = [x for x in results if x["accepted"] < x["datagrams"]]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if bad:
        print(f"{len(bad)} rounds did not accept every datagram", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
