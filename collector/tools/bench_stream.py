"""Dashboard fan-out benchmark: sensor-to-dashboard latency with N fast dashboards, alone and
with one more dashboard that never reads, in alternating phases.

    collector bench stream --sensors 200 --rate 10 --dashboards 10 --phase 10 --rounds 3

Three processes on 127.0.0.1: a real `collector serve`, the simulated sensors (each reading
carries its send time as a `sent_at` value), and the dashboards, which timestamp every
`sent_at` they receive. Phases alternate, A B B A A B B A ...: in A the fast dashboards run
alone; at the start of each B a new dashboard subscribes to everything and then never reads,
and it disconnects at the end of that B. Alternating cancels what drifts during a run (the
history rings filling, the machine's other load), which a single A-then-B comparison takes
for the stalled dashboard's cost; every other round puts B first, so that a steady drift
does not favour either. It prints latency p50/p99/max of all A phases and of all B phases,
each round's pair, the collector's CPU and memory (from /proc), and the change of p99 with
a bootstrap interval over the rounds (use many short rounds to narrow it).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import trio

from collector.tools import options
from collector.tools.common import (
    free_port,
    mosquitto,
    mosquitto_path,
    proc_stat,
    read_stream,
    scrape,
    start_redis,
    wait_for_tcp,
)

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


#: fewer rounds than this give a bootstrap interval too narrow to trust (three rounds have
#: ten distinct resamples): the stalled dashboard's verdict then says so
MIN_ROUNDS_TO_DECIDE = 10


def pooled_percentile(rounds: list[list[float]], p: float) -> float:
    """`percentile` of all of `rounds` (each sorted) together, found without merging them."""
    rounds = [r for r in rounds if r]
    n = sum(map(len, rounds))
    if not n:
        return float("nan")
    want = min(n - 1, max(0, round(p / 100 * (n - 1)))) + 1  # values at or below it
    lo, hi = min(r[0] for r in rounds), max(r[-1] for r in rounds)
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(bisect.bisect_right(r, mid) for r in rounds) >= want:
            hi = mid
        else:
            lo = mid
    return hi


def change_interval(
    a: list[list[float]], b: list[list[float]], p: float = 99, resamples: int = 1000
) -> tuple[float, float]:
    """A 90 % bootstrap interval of the change in the pooled `p`th percentile from the A to
    the B phases, resampling whole rounds (A and B of a round together): how far the change
    measured could move with other rounds like these."""
    rng = random.Random(0)
    n = len(a)
    changes = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        pa = pooled_percentile([a[i] for i in pick], p)
        pb = pooled_percentile([b[i] for i in pick], p)
        changes.append((pb / pa - 1) * 100)
    changes.sort()
    return changes[int(0.05 * resamples)], changes[int(0.95 * resamples) - 1]


# -- roles ------------------------------------------------------------------------------------


def start_senders(
    devices: dict[str, str], udp_port: int, n: int, work: Path
) -> list[subprocess.Popen[str]]:
    """The pre-signing, paced senders of collector stress: light enough not to be the bottleneck."""
    ids = sorted(devices)
    procs = []
    for k in range(n):
        plan = work / f"sender-{k}.json"
        share = {d: devices[d] for d in ids[k::n]}
        plan.write_text(
            json.dumps(
                {"host": "127.0.0.1", "udp_port": udp_port, "devices": share, "one_reading": True}
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "collector.tools.stress", "--role", "sender", "--plan", str(plan)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
        )  # fmt: skip
    for proc in procs:
        json.loads(proc.stdout.readline())  # type: ignore[union-attr]
    return procs


def run_dashboards(args: argparse.Namespace) -> None:
    trio.run(_dashboards, args)


async def _dashboards(args: argparse.Namespace) -> None:
    phase = {"name": "warmup"}
    names = [f"{kind}{k}" for k in range(1, args.rounds + 1) for kind in ("AB" if k % 2 else "BA")]
    latencies: dict[str, list[float]] = {name: [] for name in names}
    received: dict[str, int] = dict.fromkeys(names, 0)
    missed = {"total": 0}
    marks: dict[str, float] = {}

    def on_message(now: float, msg: dict[str, Any]) -> None:
        if msg["type"] == "readings":
            name = phase["name"]
            if name in latencies:
                lat = latencies[name]
                for row in msg["readings"]:
                    if row[1] == "sent_at":
                        lat.append(now - row[3])
                received[name] += len(msg["readings"])
        elif msg["type"] == "missed":
            missed["total"] += msg["count"]

    async def dashboard(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await read_stream(args.http_port, on_message, task_status, only=("readings", "missed"))

    async def stalled(scope: trio.CancelScope) -> None:
        # A dashboard that subscribes to everything and then never reads again; it leaves
        # (closes its socket) when `scope`, its phase, is cancelled.
        with scope:
            await _stalled()

    async def _stalled() -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request, TextMessage

        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", args.http_port))
        ws = WSConnection(ConnectionType.CLIENT)
        await sock.send(ws.send(Request(host="bench", target="/stream")))
        while not any(isinstance(e, AcceptConnection) for e in ws.events()):
            ws.receive_data(await sock.recv(4096))
        await sock.send(ws.send(TextMessage(data=json.dumps({"type": "subscribe"}))))
        try:
            await trio.sleep_forever()
        finally:
            sock.close()

    async with trio.open_nursery() as nursery:
        for _ in range(args.dashboards):
            await nursery.start(dashboard)
        await trio.sleep(args.warmup)
        for name in names:
            stall = trio.CancelScope()
            if name.startswith("B") and not args.control:
                nursery.start_soon(stalled, stall)
                await trio.sleep(1.0)  # it subscribes and its snapshot fills its buffers
            marks[name] = time.time()
            phase["name"] = name
            await trio.sleep(args.phase)
            marks[name + " end"] = time.time()
            phase["name"] = "switch"
            stall.cancel()
            await trio.sleep(1.0)  # the stalled one is gone (its socket closed) before next A
        phase["name"] = "done"
        nursery.cancel_scope.cancel()
    result = {
        "latencies": latencies,
        "received": received,
        "missed": missed["total"],
        "marks": marks,
    }
    await trio.Path(args.out).write_text(json.dumps(result))


# -- orchestration ----------------------------------------------------------------------------


def build_parser(prog: str = "collector bench stream") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sensors", type=int, default=200, help="simulated sensors (default 200)")
    p.add_argument("--rate", type=float, default=10.0, help="readings datagrams/s per sensor")
    p.add_argument(
        "--dashboards", type=int, default=10, help="dashboards that read everything (default 10)"
    )
    p.add_argument("--no-mosquitto", action="store_true", help="skip the Mosquitto reference run")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="two collector nodes on a Redis this tool starts: the sensors send to node A, the "
        "dashboards read node B (docs/SCALING.md); prints the Redis cost per 1000 readings",
    )
    p.add_argument(
        "--phase", type=options.positive, default=10.0, help="seconds per phase (default 10)"
    )
    p.add_argument(
        "--rounds",
        type=options.at_least(1),
        default=3,
        help="pairs of phases, A (fast dashboards alone) and B (plus one that never reads), "
        "A first in odd rounds, B first in even ones; default 3",
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="B phases without the dashboard that never reads: the p99 change this machine "
        "shows between phases by itself, to read the real run's change against",
    )
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (default 5)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument(
        "--role",
        choices=["dashboards", "mqtt-subscribers", "mqtt-publisher"],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--devices", help=argparse.SUPPRESS)
    p.add_argument("--tcp-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--udp-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--http-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str = "collector bench stream") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.role == "dashboards":
        run_dashboards(args)
        return 0
    if args.role == "mqtt-subscribers":
        mqtt_subscribers(args.port, args.dashboards, args.phase, args.out)
        return 0
    if args.role == "mqtt-publisher":
        mqtt_publisher(args.port, args.rate, args.phase)
        return 0

    from collector.device.sim import SimConfig
    from collector.devices import DeviceRegistry

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    ids = SimConfig(devices=args.sensors, prefix="bench").device_ids()
    DeviceRegistry({d: f"secret-{d}" for d in ids}).save(
        work / "devices.toml"
    )  # the senders know them too
    # The dashboard that never reads must stay through its whole phase B: the stall limit
    # (10 s by default) would close it inside a phase of 10 s, and the ping timeout (it answers
    # no ping) after 20 s. Its queue is bounded either way.
    stall_limit = max(10.0, args.phase + 5.0)
    (work / "collector.toml").write_text(
        f"[stream]\nstall_limit = {stall_limit}\nping_interval = {stall_limit}\n"
        f"ping_timeout = {stall_limit}\n"
    )
    config_args = ["--config", str(work / "collector.toml")]
    tcp, udp, http = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    me = [sys.executable, "-m", "collector.tools.bench_stream"]
    redis: subprocess.Popen[bytes] | None = None
    node_b: subprocess.Popen[str] | None = None
    cluster_args: list[str] = []
    redis_port = 0
    if args.cluster:
        redis, redis_url = start_redis(work)
        redis_port = urllib.parse.urlsplit(redis_url).port
        cluster_args = ["--redis", redis_url]
    collector = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--host", "127.0.0.1", "--tcp-port", str(tcp),
         "--udp-port", str(udp), "--http-port", str(http), "--devices", str(work / "devices.toml"),
         "--log-level", "WARNING", *config_args, *cluster_args,
         *(["--node", "A"] if args.cluster else [])],
        stdout=subprocess.DEVNULL, stderr=open(work / "collector.log", "w"),
    )  # fmt: skip
    wait_for_tcp(http)
    dash_port = http
    if args.cluster:
        dash_port = free_port()
        node_b = subprocess.Popen(
            [sys.executable, "-m", "collector", "serve", "--host", "127.0.0.1", "--tcp-port",
             str(free_port()), "--udp-port", str(free_port(socket.SOCK_DGRAM)), "--http-port",
             str(dash_port), "--devices", str(work / "devices.toml"), "--log-level", "WARNING",
             *config_args, *cluster_args, "--node", "B"],
            stdout=subprocess.DEVNULL, stderr=open(work / "node-b.log", "w"),
        )  # fmt: skip
        wait_for_tcp(dash_port)
    total = args.warmup + 2 * args.rounds * (args.phase + 1.5) + 3
    secrets_by_id = {d: f"secret-{d}" for d in ids}
    senders = start_senders(secrets_by_id, udp, 2, work)
    rate = args.sensors * args.rate
    start_at = time.time() + 1.0 + rate * (total + 5) / 2 * 12e-6
    for proc in senders:
        proc.stdin.write(
            json.dumps({"rate": rate / 2, "start": start_at, "seconds": total + 5, "ack_share": 0})
            + "\n"
        )  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
    while time.time() < start_at:
        time.sleep(0.05)
    out = work / "dashboards.json"
    dashboards = subprocess.Popen(
        [*me, "--role", "dashboards", "--http-port", str(dash_port), "--dashboards", str(args.dashboards),
         "--warmup", str(args.warmup), "--phase", str(args.phase), "--rounds", str(args.rounds),
         *(["--control"] if args.control else []),
         "--out", str(out)],
    )  # fmt: skip
    print(
        f"collector pid {collector.pid}; {args.sensors} sensors x {args.rate:g}/s = "
        f"{args.sensors * args.rate:g} datagrams/s of one reading each (2 pre-signing senders); "
        f"{args.dashboards} dashboards; {args.rounds} rounds of phases A and B of {args.phase:g}s; "
        f"stall limit {stall_limit:g}s",
        flush=True,
    )
    if args.cluster:
        print("cluster: the sensors send to node A, the dashboards read node B", flush=True)
    samples = []
    client = []  # the dashboards' process: if it saturates, it is what the latency measures
    others: dict[str, list[tuple[float, float, int]]] = {"node B": [], "redis": []}
    redis_info: list[tuple[float, dict[str, float]]] = []
    while dashboards.poll() is None:
        samples.append(proc_stat(collector.pid))
        with contextlib.suppress(OSError, IndexError):
            client.append(proc_stat(dashboards.pid))
        if node_b is not None and redis is not None:
            others["node B"].append(proc_stat(node_b.pid))
            others["redis"].append(proc_stat(redis.pid))
            with contextlib.suppress(OSError):
                redis_info.append(
                    (
                        time.time(),
                        _redis_stats(redis_port),
                    )
                )
        time.sleep(0.5)
    samples.append(proc_stat(collector.pid))
    result = json.loads(out.read_text())
    metrics = scrape(http)
    for proc in senders:
        proc.kill()
    for proc in (collector, node_b):
        if proc is None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if redis is not None:
        redis.terminate()
        redis.wait(10)

    marks = result["marks"]

    def share(series: list[tuple[float, float, int]], spans: list[tuple[float, float]]) -> float:
        """CPU % of a process over the phases `spans`, from its samples inside them."""
        used = elapsed = 0.0
        for start, end in spans:
            inside = [x for x in series if start <= x[0] <= end]
            if len(inside) > 1:
                used += inside[-1][1] - inside[0][1]
                elapsed += inside[-1][0] - inside[0][0]
        return used / elapsed * 100 if elapsed else float("nan")

    rounds = range(1, args.rounds + 1)
    rows = []
    for kind, label in (
        ("A", f"{args.dashboards} dashboards"),
        (
            "B",
            f"{args.dashboards} dashboards"
            + (" (control)" if args.control else " + 1 that never reads"),
        ),
    ):
        names = [f"{kind}{k}" for k in rounds]
        spans = [(marks[n], marks[n + " end"]) for n in names]
        lat = [x * 1000 for n in names for x in result["latencies"][n]]
        cpu = share(samples, spans)
        rss = [x[2] / 2**20 for x in samples if any(a <= x[0] <= b for a, b in spans)]
        client_cpu = share(client, spans)
        received_n = sum(result["received"][n] for n in names)
        seconds = sum(b - a for a, b in spans)
        rows.append({
            "phase": label,
            "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat, default=float("nan")), "n": len(lat)},
            "delivered_per_s": received_n / seconds,
            "collector_cpu_percent": cpu,
            "dashboards_cpu_percent": client_cpu,
            "collector_rss_mb": {"min": min(rss, default=0), "max": max(rss, default=0)},
        })  # fmt: skip
    print()
    print(
        f"{'phase':42} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'samples':>8} {'readings/s':>11} {'CPU %':>6} {'RSS MB':>13} {'dashboards CPU %':>17}"
    )
    for r in rows:
        lat = r["latency_ms"]
        print(
            f"{r['phase']:42} {lat['p50']:7.2f} {lat['p99']:7.2f} {lat['max']:7.1f} {lat['n']:8d} "
            f"{r['delivered_per_s']:11.0f} {r['collector_cpu_percent']:6.1f} "
            f"{r['collector_rss_mb']['min']:6.1f}-{r['collector_rss_mb']['max']:<6.1f} "
            f"{r['dashboards_cpu_percent']:17.1f}"
        )
    per_round = []
    for k in rounds:
        a = percentile([x * 1000 for x in result["latencies"][f"A{k}"]], 99)
        b = percentile([x * 1000 for x in result["latencies"][f"B{k}"]], 99)
        per_round.append(
            {"round": k, "p99_a_ms": a, "p99_b_ms": b, "change_percent": (b / a - 1) * 100}
        )
    print(
        "p99 per round, A / B: "
        + ", ".join(
            f"{r['p99_a_ms']:.2f} / {r['p99_b_ms']:.2f} ms ({r['change_percent']:+.0f} %)"
            for r in per_round
        )
    )
    bus: dict[str, float] | None = None
    if args.cluster:
        start, end = marks["A1"], marks["A1 end"]
        for name, series in others.items():
            inside = [x for x in series if start <= x[0] <= end]
            if len(inside) > 1:
                print(
                    f"{name} CPU during the first phase A: "
                    f"{(inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]) * 100:.1f} %"
                )
        inside = [x for x in redis_info if start <= x[0] <= end]
        if len(inside) > 1:
            (t0, a), (t1, b) = inside[0], inside[-1]
            readings = rate * (t1 - t0)  # one reading per datagram, paced
            per_k = {k: (b[k] - a[k]) / readings * 1000 for k in a}
            bus = per_k
            print(
                f"redis per 1000 readings (first phase A, {readings:,.0f} readings): "
                f"{per_k['total_commands_processed']:.1f} commands, "
                f"{per_k['total_net_input_bytes'] / 1024:.1f} KiB in, "
                f"{per_k['total_net_output_bytes'] / 1024:.1f} KiB out, "
                f"{per_k['used_cpu'] * 1000:.1f} ms of Redis CPU"
            )
    change = (rows[1]["latency_ms"]["p99"] / rows[0]["latency_ms"]["p99"] - 1) * 100
    by_round = {
        kind: [sorted(x * 1000 for x in result["latencies"][f"{kind}{k}"]) for k in rounds]
        for kind in "AB"
    }
    low, high = change_interval(by_round["A"], by_round["B"])
    median_change = statistics.median(r["change_percent"] for r in per_round)
    spread = (
        f"; median of the rounds' changes {median_change:+.1f} %, 90 % interval of the change "
        f"over rounds like these [{low:+.1f}, {high:+.1f}] %"
    )
    if args.control:
        print(
            f"\np99 change between phases with nothing changed (control), all B phases "
            f"against all A phases: {change:+.1f} %{spread}"
        )
    else:
        if args.rounds < MIN_ROUNDS_TO_DECIDE:
            verdict = f"too few rounds to decide ({args.rounds}; --rounds 20 --phase 4 decides)"
        else:
            verdict = "met" if high <= 10 else "not met" if low > 10 else "not decided"
        print(
            f"\np99 change with the stalled dashboard, all B phases against all A phases: "
            f"{change:+.1f} %{spread}; target at most +10 %: {verdict}"
        )
    stalled_key = 'collector_stream_closed_total{reason="stalled"}'
    ping_key = 'collector_stream_closed_total{reason="ping timeout"}'
    print(
        f"collector: stream_missed_total {metrics.get('collector_stream_missed_total', 0):.0f} "
        f"(the stalled dashboard's coalesced updates), fast dashboards missed {result['missed']}, "
        f"closed as stalled {metrics.get(stalled_key, 0):.0f}, "
        f"closed for ping timeout {metrics.get(ping_key, 0):.0f}"
    )
    mqtt = None
    if not args.no_mosquitto:
        mqtt = mosquitto_latency(rate, args.dashboards, args.phase * args.rounds)
        if mqtt is None:
            print(
                "\nmosquitto: not installed (apt-get install mosquitto) or paho-mqtt missing: reference skipped"
            )
        else:
            print(
                f"\nMosquitto at the same paced load ({rate:g} messages/s, {args.dashboards} subscribers, "
                f"{args.phase * args.rounds:g}s): latency p50 {mqtt['p50']:.2f} ms, p99 {mqtt['p99']:.2f} ms, max {mqtt['max']:.1f} ms "
                f"from the time each message was due, as for the collector (from the publish call: p50 "
                f"{mqtt['p50_from_publish']:.2f} ms, p99 {mqtt['p99_from_publish']:.2f} ms); broker CPU {mqtt['cpu_percent']:.1f} %"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "phases": rows,
                    "p99_change_percent": change,
                    "p99_change_median_of_rounds": median_change,
                    "p99_change_interval_90": [low, high],
                    "rounds": per_round,
                    "metrics": metrics,
                    "mosquitto": mqtt,
                    "redis_per_1000_readings": bus,
                },
                indent=1,
            )
        )
    return 0


def _redis_stats(port: int) -> dict[str, float]:
    """Counters of a Redis (INFO), read over a plain socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"INFO\r\n")
        data = b""
        while b"\r\n" not in data:
            data += s.recv(65536)
        size = int(data[1 : data.index(b"\r\n")])
        head = data.index(b"\r\n") + 2
        while len(data) < head + size:
            data += s.recv(65536)
    info = {}
    for line in data[head : head + size].decode().splitlines():
        key, _, value = line.partition(":")
        info[key] = value
    return {
        "total_commands_processed": float(info["total_commands_processed"]),
        "total_net_input_bytes": float(info["total_net_input_bytes"]),
        "total_net_output_bytes": float(info["total_net_output_bytes"]),
        "used_cpu": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
    }


def mosquitto_latency(rate: float, subscribers: int, seconds: float) -> dict[str, float] | None:
    """Mosquitto (Debian's) as the reference broker at the same paced load: a publisher puts
    in every 100-byte payload the time it was due (as the collector's senders put theirs in
    `sent_at`) and the time of the publish call; `subscribers` clients time what they
    receive from both. The figures from the due time are the ones to compare (both then
    include the publisher's pacing, a sleep of up to a few hundred microseconds)."""
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        return None
    if mosquitto_path() is None:
        return None
    me = [sys.executable, "-m", "collector.tools.bench_stream"]
    with mosquitto() as (proc, port):
        out = Path(tempfile.mkdtemp(prefix="bench-mqtt-lat-")) / "latency.json"
        subs = subprocess.Popen([*me, "--role", "mqtt-subscribers", "--port", str(port), "--dashboards", str(subscribers),
                                 "--phase", str(seconds + 2), "--out", str(out)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        subs.stdout.readline()  # type: ignore[union-attr]
        cpu0 = proc_stat(proc.pid)
        subprocess.run(
            [*me, "--role", "mqtt-publisher", "--port", str(port), "--rate", str(rate), "--phase", str(seconds)],
            check=True,
        )  # fmt: skip
        cpu1 = proc_stat(proc.pid)
        subs.wait(timeout=seconds + 30)
        found = json.loads(out.read_text())
    lat, published = sorted(found["due"]), sorted(found["published"])
    return {
        "p50": percentile(lat, 50) * 1000, "p99": percentile(lat, 99) * 1000, "max": lat[-1] * 1000,
        "p50_from_publish": percentile(published, 50) * 1000,
        "p99_from_publish": percentile(published, 99) * 1000,
        "samples": len(lat), "cpu_percent": (cpu1[1] - cpu0[1]) / (cpu1[0] - cpu0[0]) * 100,
    }  # fmt: skip


def mqtt_publisher(port: int, rate: float, seconds: float) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = time.time() + 0.5
    n = int(rate * seconds)
    for i in range(n):
        due = start + i / rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        payload = f"{due:.6f} {time.time():.6f}".encode().ljust(100, b" ")
        client.publish("bench/readings", payload, qos=0)
    time.sleep(0.5)
    client.loop_stop()
    client.disconnect()


def mqtt_subscribers(port: int, count: int, seconds: float, out: str) -> None:
    """`count` MQTT 3.1.1 subscribers in one trio process, like the dashboards process (paho's
    one thread per client, fighting over the GIL, would measure itself rather than the broker)."""
    latencies: dict[str, list[float]] = {"due": [], "published": []}

    def packet(kind: int, body: bytes) -> bytes:
        n, length = len(body), b""
        while True:
            byte, n = n % 128, n // 128
            length += bytes([byte | (0x80 if n else 0)])
            if not n:
                return bytes([kind]) + length + body

    def string(s: bytes) -> bytes:
        return len(s).to_bytes(2, "big") + s

    async def one(i: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            packet(0x10, string(b"MQTT") + b"\x04\x02\x00\x3c" + string(f"sub{i}".encode()))
        )
        await stream.send_all(packet(0x82, b"\x00\x01" + string(b"bench/readings") + b"\x00"))
        buf = b""
        started = False
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while len(buf) >= 2:
                length, mult, pos = 0, 1, 1
                while pos < len(buf):
                    byte = buf[pos]
                    length += (byte & 0x7F) * mult
                    mult *= 128
                    pos += 1
                    if not byte & 0x80:
                        break
                else:
                    break
                if len(buf) < pos + length:
                    break
                kind, body, buf = buf[0] & 0xF0, buf[pos : pos + length], buf[pos + length :]
                if kind == 0x90 and not started:  # SUBACK
                    started = True
                    task_status.started()
                elif kind == 0x30:  # PUBLISH, QoS 0: topic, then the payload
                    tlen = int.from_bytes(body[:2], "big")
                    now = time.time()
                    due, published = body[2 + tlen :].split()
                    latencies["due"].append(now - float(due))
                    latencies["published"].append(now - float(published))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(count):
                await nursery.start(one, i)
            print("ready", flush=True)
            await trio.sleep(seconds + 1)
            nursery.cancel_scope.cancel()

    trio.run(main)
    Path(out).write_text(json.dumps(latencies))


if __name__ == "__main__":
    sys.exit(main())
