"""Stress test: step the offered load up until loss or latency breaks, find the knee, plot it.

    collector stress                                         # 1000 sensors, 2 dashboards, defaults
    collector stress --sensors 2000 --steps 5000,20000,50000,80000 --step-seconds 10 --out stress/
    collector stress --sessions-test --sensors 10000 --duration 300   # heartbeats only: memory, false offlines
    collector stress --sessions-test --sensors 100000 --heartbeat-interval 10 --duration 600

Everything runs on 127.0.0.1 and is bounded in count and time. The pieces, each its own process
so that the load generator is not the bottleneck:

  collector    a real `collector serve` (its CPU and memory are sampled from /proc)
  senders      --senders processes; each registers its share of the sensors with HELLO datagrams,
               then, for every step, signs all of its datagrams for the step before the step
               starts (each TELEMETRY carries its scheduled send time as a `sent_at` reading) and
               sends them on schedule. Each reports how late it was: a sender that falls behind
               says so, and the report says which side was saturated.
  dashboards   --dashboards WebSocket clients subscribed to everything; they timestamp every
               `sent_at` they receive (sensor-to-dashboard latency) into per-second histograms.

At each step the report records the offered and accepted rates, loss at the application level
(the collector's sequence-gap counts) and in the kernel (the collector socket's drop counter and
/proc/net/snmp RcvbufErrors), latency p50/p99/p999, the collector's CPU and RSS, and the
senders' lateness. The knee is the highest offered rate before latency p99 passes five times
its low-load value (and 20 ms more), or loss passes --max-loss. Writes report.json and knee.png (matplotlib) in --out.

--sessions-test sends heartbeats only, one per sensor every --heartbeat-interval seconds, for
--duration, to a collector told the same interval and a timeout of three intervals. It reports
the sessions still online, the sessions that ended by `timeout` (false offlines: the sensors
never stopped heartbeating), the collector's RSS and CPU and the senders' lateness, and writes
sessions.json in --out. The timeouts come from the collector's own statistics, written as it
exits (`serve --stats-json`); while it runs the test asks only /healthz, every 30 s (at
100,000 devices /metrics would stall the collector's loop for 10 s, /healthz for 0.6 s).
Heartbeats the kernel dropped for the collector's socket (its receive buffer was full) are
counted from /proc/net/udp.
Every sensor registers from 127.0.0.1, one address for the HELLO rate limit, so beyond 500
sensors the collector started gets `[ratelimit] per_source` raised to the default `total`
(the test says so as it starts).
"""

from __future__ import annotations

import argparse
import array
import bisect
import collections
import json
import math
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from collector.tools import options
from collector.tools.common import free_port, proc_stat, rcvbuf_errors, scrape, wait_for_tcp

HERE = Path(__file__).resolve()
# latency histogram: log-spaced bucket edges from 10 us to 100 s
EDGES = [1e-5 * (10 ** (i / 20)) for i in range(141)]


def socket_drops(port: int) -> int:
    """Datagrams the kernel dropped for the UDP socket bound to `port` (its receive buffer was
    full): the `drops` column of /proc/net/udp, for that socket alone."""
    total = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            total += int(fields[-1])
    return total


def quantile(hist: list[int], q: float) -> float:
    total = sum(hist)
    if not total:
        return math.nan
    need = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= need:
            return EDGES[min(i, len(EDGES) - 1)]
    return EDGES[-1]


# -- sender process --------------------------------------------------------------------------


def step_datagrams(
    sessions: list[Any],
    n: int,
    start: float,
    rate: float,
    ack_every: int,
    *,
    heartbeats: bool,
    one_reading: bool,
) -> Any:
    """(scheduled time, sealed datagram) for one step, round-robin over the sessions."""
    from collector.wire import datagram as dg

    for i in range(n):
        s = sessions[i % len(sessions)]
        when = start + i / rate
        flags = dg.Flag.ACK_REQUESTED if ack_every and i % ack_every == 0 else dg.Flag.NONE
        if heartbeats:
            payload, typ = dg.encode_heartbeat_payload(i), dg.DatagramType.HEARTBEAT
        elif one_reading:
            payload, typ = dg.encode_readings({"sent_at": when}), dg.DatagramType.TELEMETRY
        else:
            payload = dg.encode_readings({"sent_at": when, "value": float(i % 1000)})
            typ = dg.DatagramType.TELEMETRY
        yield when, s.seal(typ, payload, when_us=int(when * 1e6), flags=flags)


def sender_main(args: argparse.Namespace) -> None:
    from collector.device.bulk import register_udp
    from collector.wire import datagram as dg

    plan = json.loads(Path(args.plan).read_text())
    target = (plan["host"], plan["udp_port"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind(("127.0.0.1", 0))
    sessions: list[Any] = []
    # Whenever no step is running (while the rest register, and between steps) every
    # registered session heartbeats once per `interval`, each on its own schedule, so that
    # none times out while nothing is measured. `schedule` holds (last heartbeat, session),
    # oldest first: a call sends only the heartbeats that fell due.
    interval = float(plan.get("keepalive", 1.0))
    schedule: collections.deque[tuple[float, Any]] = collections.deque()

    def keepalive() -> None:
        now = time.time()
        while schedule and schedule[0][0] + interval <= now:
            s = schedule.popleft()[1]
            try:
                sock.sendto(
                    s.seal(dg.DatagramType.HEARTBEAT, dg.encode_heartbeat_payload(0)), target
                )
            except (BlockingIOError, TimeoutError):
                pass
            schedule.append((now, s))

    devices = dict(plan["devices"])
    ids = list(devices)
    registering = time.time()
    for i in range(0, len(ids), 1000):
        chunk = {d: devices[d] for d in ids[i : i + 1000]}
        new = register_udp(sock, target, chunk, between=keepalive).values()
        now = time.time()  # a WELCOME is as good as a heartbeat: the next one is due in `interval`
        schedule.extend((now, s) for s in new)
        sessions.extend(new)
    took = time.time() - registering
    sock.setblocking(False)
    Path(args.plan + ".sessions").write_text(
        json.dumps({str(s.session_id): s.device_id for s in sessions})
    )
    print(json.dumps({"ready": len(sessions), "seconds": took}), flush=True)
    hb_only = plan.get("heartbeats_only", False)
    one_reading = plan.get("one_reading", False)  # only `sent_at`

    while True:
        while not select.select([sys.stdin], [], [], min(0.1, interval / 10))[0]:
            keepalive()
        line = sys.stdin.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd.get("stop"):
            break
        rate, start, seconds, ack_share = (
            cmd["rate"],
            cmd["start"],
            cmd["seconds"],
            cmd["ack_share"],
        )
        n = int(rate * seconds)
        ack_every = int(1 / ack_share) if ack_share > 0 else 0
        # Round-robin in the order of the last heartbeats, the longest silent first: with a
        # rate of one heartbeat per session per interval, no session then waits much more
        # than an interval (and the time to `start`) across the switch to the step.
        order = [s for _, s in schedule]
        before = [t for t, _ in schedule]

        # Load steps: sign everything now, before the start time, so that sending is only
        # sendto calls. Heartbeats only (a long, slow run): sign each one as it falls due.
        gen = step_datagrams(
            order, n, start, rate, ack_every, heartbeats=hb_only, one_reading=one_reading
        )
        items = gen if hb_only else iter(list(gen))
        signed = time.time()
        sent = acks = 0
        worst = 0.0
        late = array.array("d")
        nxt = next(items, None)
        while nxt is not None:
            now = time.time()
            while nxt is not None and nxt[0] <= now:
                try:
                    sock.sendto(nxt[1], target)
                except BlockingIOError:
                    break
                lateness = now - nxt[0]
                if sent % 97 == 0:
                    late.append(lateness)
                worst = max(worst, lateness)
                sent += 1
                nxt = next(items, None)
            while True:  # drain ACKs so the socket never fills
                try:
                    sock.recv(65536)
                    acks += 1
                except BlockingIOError:
                    break
            if nxt is not None:
                time.sleep(max(0.0, min(0.0005, nxt[0] - time.time())))
        # The step's datagram i went to order[i % len(order)] at start + i / rate: rebuild the
        # schedule from when each session last sent, so the keepalives go on from there.
        k = len(order)
        last = {}
        for i in range(max(0, sent - k), sent):
            last[i % k] = start + i / rate
        schedule = collections.deque(
            sorted(((last.get(j, before[j]), s) for j, s in enumerate(order)), key=lambda t: t[0])
        )
        late_sorted = sorted(late)
        print(json.dumps({
            "sent": sent, "acks": acks, "signed_ahead": start - signed,
            "lateness_p99": late_sorted[int(0.99 * (len(late_sorted) - 1))] if late_sorted else 0.0,
            "lateness_max": worst,
        }), flush=True)  # fmt: skip


# -- dashboards process --------------------------------------------------------------------------


def dashboards_main(args: argparse.Namespace) -> None:
    import trio

    from collector.tools.common import read_stream

    hists: dict[int, list[int]] = {}

    def on_message(now: float, msg: dict[str, Any]) -> None:
        if msg["type"] != "readings":
            return
        sec = int(now)
        hist = hists.get(sec)
        if hist is None:
            hist = hists[sec] = [0] * (len(EDGES) + 1)
        for row in msg["readings"]:
            if row[1] == "sent_at":
                hist[bisect.bisect_left(EDGES, now - row[3])] += 1

    async def one(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await read_stream(args.port, on_message, task_status, only=("readings",))

    def dump() -> None:
        Path(args.out).write_text(json.dumps({str(k): v for k, v in hists.items()}))
        print(json.dumps({"dumped": len(hists)}), flush=True)

    async def main() -> None:
        # SIGUSR1: write the histograms so far; SIGTERM: write them and stop.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                for _ in range(args.count):
                    await nursery.start(one)
                print(json.dumps({"ready": args.count}), flush=True)
                async for signum in signals:
                    dump()
                    if signum == signal.SIGTERM:
                        nursery.cancel_scope.cancel()
                        break

    trio.run(main)


# -- orchestration -------------------------------------------------------------------------------


def build_parser(prog: str = "collector stress") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--sensors", type=int, default=1000, help="simulated sensors (default 1000)")
    p.add_argument("--steps", default="2000,5000,10000,20000,40000,60000,80000,100000",
                   help="offered loads to try, datagrams/s")  # fmt: skip
    p.add_argument(
        "--step-seconds", type=float, default=10.0, help="seconds per load step (default 10)"
    )
    p.add_argument("--senders", type=int, default=2, help="sender processes (default 2)")
    p.add_argument(
        "--dashboards", type=int, default=2, help="dashboards timing every reading (default 2)"
    )
    p.add_argument(
        "--ack-share", type=float, default=0.0, help="share of datagrams with ACK requested"
    )
    p.add_argument("--max-loss", type=float, default=0.01, help="stop when loss passes this share")
    p.add_argument(
        "--max-p99-ms", type=float, default=1000.0, help="stop when p99 latency passes this"
    )
    p.add_argument("--sessions-test", action="store_true",
                   help="heartbeats only, one per sensor per --heartbeat-interval, for --duration: memory and false offlines")  # fmt: skip
    p.add_argument("--duration", type=float, default=300.0, help="length of --sessions-test (s)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0,
                   help="--sessions-test: seconds between a sensor's heartbeats; the collector started "
                        "gets it as [sessions] heartbeat_interval, with a timeout of 3 times it (default 1)")  # fmt: skip
    p.add_argument("--max-rss-mb", type=float, default=None,
                   help="--sessions-test: fail above this collector RSS (default 300 up to 10,000 sensors, else 1536)")  # fmt: skip
    p.add_argument("--gc-freeze-pause", type=options.seconds_in(0, 60), default=0.0, metavar="S",
                   help="the collector's [server] gc_freeze_pause (default 0: off, as the collector's own)")  # fmt: skip
    p.add_argument("--out", default="stress-report", help="directory for report.json and knee.png")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str = "collector stress") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.role == "sender":
        sender_main(args)
        return 0
    if args.role == "dashboards":
        dashboards_main(args)
        return 0
    return orchestrate(args)


def orchestrate(args: argparse.Namespace) -> int:
    import attrs

    from collector.config import Config
    from collector.devices import DeviceRegistry

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stress-"))
    devices = {f"stress-{i:05d}": secrets.token_urlsafe(16) for i in range(args.sensors)}
    DeviceRegistry(devices).save(work / "devices.toml")
    hb, timeout = (
        (args.heartbeat_interval, 3 * args.heartbeat_interval)
        if args.sessions_test
        else (5.0, 30.0)
    )
    config = (
        f"[sessions]\nheartbeat_interval = {hb}\ntimeout = {timeout}\n"
        f"[limits]\nmax_devices = {max(10_000, args.sensors)}\n"
        f"[stream]\nqueue_limit = 100000\nstall_limit = 30.0\n"
        f"[server]\ngc_freeze_pause = {args.gc_freeze_pause}\n"
    )
    defaults = attrs.fields(Config)
    per_source, burst = defaults.ratelimit_per_source.default, defaults.ratelimit_burst.default
    total = defaults.ratelimit_total.default
    if 2 * args.sensors > burst:
        # Every simulated sensor registers from 127.0.0.1, one source address for the rate
        # limit, with two HELLOs each: at the default 500 a second that alone would take
        # sensors / 250 seconds. A real fleet registers from many addresses, so the test lets
        # one source have the whole of `total` (itself left at its default, and still bounding).
        config += f"[ratelimit]\nper_source = {total}\n"
        print(f"collector [ratelimit] per_source = {total:g} (default {per_source:g}; burst "
              f"{burst:g} and total {total:g} at their defaults): all {args.sensors} sensors "
              "register from one address, 127.0.0.1", flush=True)  # fmt: skip
    (work / "collector.toml").write_text(config)
    stats_json = work / "stats.json"
    tcp, udp, http = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    collector = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--host", "127.0.0.1", "--tcp-port", str(tcp), "--udp-port", str(udp),
         "--http-port", str(http), "--devices", str(work / "devices.toml"), "--config", str(work / "collector.toml"),
         "--log-level", "WARNING", "--stats-json", str(stats_json)],
        stdout=subprocess.DEVNULL, stderr=open(work / "collector.log", "w"),
    )  # fmt: skip
    procs: list[subprocess.Popen[str]] = []
    try:
        wait_for_tcp(http, 120.0)
        ids = sorted(devices)
        for k in range(args.senders):
            share = {d: devices[d] for d in ids[k :: args.senders]}
            plan = work / f"sender-{k}.json"
            plan.write_text(json.dumps({"host": "127.0.0.1", "udp_port": udp, "devices": share,
                                        "heartbeats_only": args.sessions_test,
                                        "keepalive": hb if args.sessions_test else 1.0}))  # fmt: skip
            procs.append(subprocess.Popen([sys.executable, "-m", "collector.tools.stress", "--role", "sender", "--plan", str(plan)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))  # fmt: skip
        ready = [json.loads(proc.stdout.readline()) for proc in procs]  # type: ignore[union-attr]
        registered = sum(r["ready"] for r in ready)
        took = max(r["seconds"] for r in ready)
        print(
            f"collector pid {collector.pid}: {registered} of {args.sensors} sensors registered by {args.senders} senders "
            f"in {took:.1f}s ({registered / took:,.0f}/s)",
            flush=True,
        )
        if args.sessions_test:
            return sessions_test(args, collector, procs, http, udp, out, ready, stats_json)
        hist_file = work / "latency.json"
        dash = subprocess.Popen([sys.executable, "-m", "collector.tools.stress", "--role", "dashboards", "--port", str(http), "--count",
                                 str(args.dashboards), "--out", str(hist_file)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        json.loads(dash.stdout.readline())  # type: ignore[union-attr]
        steps = []
        for rate in [float(x) for x in args.steps.split(",")]:
            step = run_step(args, rate, collector, procs, http)
            steps.append(step)
            print(
                f"offered {rate:8,.0f}/s  accepted {step['accepted_rate']:8,.0f}/s  loss {step['loss']:.4%}  "
                f"kernel drops {step['kernel_drops']:6.0f}  CPU {step['cpu_percent']:5.1f}%  RSS {step['rss_mb']:6.1f} MB  "
                f"senders late p99 {step['sender_lateness_p99'] * 1000:7.1f} ms  "
                f"full GCs {step['gc_full_collections']:3.0f} ({step['gc_pause_s'] * 1000:.0f} ms)",
                flush=True,
            )
            if step["loss"] > args.max_loss:
                break

        def latencies() -> None:
            dash.send_signal(signal.SIGUSR1)
            json.loads(dash.stdout.readline())  # type: ignore[union-attr]
            hists = {int(k): v for k, v in json.loads(hist_file.read_text()).items()}
            for step in steps:
                merged = [0] * (len(EDGES) + 1)
                for sec, h in hists.items():
                    if step["start"] + 1 <= sec < step["end"]:
                        merged = [a + b for a, b in zip(merged, h, strict=True)]
                step["latency_ms"] = {
                    q: quantile(merged, v) * 1000
                    for q, v in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))
                }
                step["latency_samples"] = sum(merged)

        latencies()
        knee = find_knee(args, steps)
        if knee is not None and not any(
            abs(s["offered_rate"] - 0.8 * knee["offered_rate"]) < 1 for s in steps
        ):
            # The promise to check: loss at 80 % of the knee.
            rate = 0.8 * knee["offered_rate"]
            step = run_step(args, rate, collector, procs, http)
            step["confirmation"] = True
            steps.append(step)
            print(f"offered {rate:8,.0f}/s (80 % of the knee)  accepted {step['accepted_rate']:8,.0f}/s  "
                  f"loss {step['loss']:.4%}  kernel drops {step['kernel_drops']:6.0f}", flush=True)  # fmt: skip
            latencies()
        dash.send_signal(signal.SIGTERM)
        dash.wait(timeout=60)
        report = finish(args, steps, out)
        print(json.dumps(report["knee"], indent=1))
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write(json.dumps({"stop": True}) + "\n")  # type: ignore[union-attr]
                    proc.stdin.flush()  # type: ignore[union-attr]
                except OSError:
                    pass
                proc.kill()
        collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(timeout=30)
        except subprocess.TimeoutExpired:
            collector.kill()


def run_step(
    args: argparse.Namespace,
    rate: float,
    collector: subprocess.Popen[bytes],
    procs: list[Any],
    http: int,
) -> dict[str, Any]:
    # Signing happens before `start`: allow time for it (about 10 us a datagram).
    n_each = rate * args.step_seconds / len(procs)
    start = time.time() + 1.0 + n_each * 12e-6
    before = scrape(http, sum_devices=True)
    drops_before = rcvbuf_errors()
    for proc in procs:
        proc.stdin.write(json.dumps({"rate": rate / len(procs), "start": start, "seconds": args.step_seconds,
                                     "ack_share": args.ack_share}) + "\n")  # fmt: skip
        proc.stdin.flush()
    while time.time() < start:
        time.sleep(0.01)
    samples = []
    end = start + args.step_seconds
    while time.time() < end:
        samples.append(proc_stat(collector.pid))
        time.sleep(0.25)
    reports = [json.loads(proc.stdout.readline()) for proc in procs]
    time.sleep(1.0)  # let the last datagrams through
    samples.append(proc_stat(collector.pid))
    after = scrape(http, sum_devices=True)
    sent = sum(r["sent"] for r in reports)
    accepted = (
        after["collector_datagrams_accepted_total"] - before["collector_datagrams_accepted_total"]
    )
    # Loss from readings, not datagrams: the senders' keep-alive heartbeats (between steps,
    # inside the scrapes' window) are accepted datagrams but carry no reading.
    readings = after["collector_readings_total"] - before["collector_readings_total"]
    per_datagram = 2  # step_datagrams: `sent_at` and `value`
    lost = after["collector_device_lost_total"] - before["collector_device_lost_total"]
    kernel = after.get("collector_udp_kernel_drops_total", 0) - before.get(
        "collector_udp_kernel_drops_total", 0
    )
    cpu = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0]) * 100
    gc_full = "collector_gc_full_collections_total"
    gc_pause = "collector_gc_pause_seconds_total"
    return {
        "offered_rate": rate,
        # the collector's full garbage collections during the step, and their summed pause
        "gc_full_collections": after.get(gc_full, 0) - before.get(gc_full, 0),
        "gc_pause_s": after.get(gc_pause, 0) - before.get(gc_pause, 0),
        "sent": sent,
        "accepted": accepted,
        "accepted_rate": accepted / args.step_seconds,
        "readings_accepted": readings,
        "loss": max(0.0, 1 - readings / (sent * per_datagram)) if sent else 0.0,
        "app_lost": lost,
        "kernel_drops": kernel,
        "rcvbuf_errors": rcvbuf_errors() - drops_before,
        "cpu_percent": cpu,
        "rss_mb": max(s[2] for s in samples) / 2**20,
        "sender_lateness_p99": max(r["lateness_p99"] for r in reports),
        "sender_lateness_max": max(r["lateness_max"] for r in reports),
        "sender_saturated": any(r["lateness_p99"] > 0.05 for r in reports),
        "acks": sum(r["acks"] for r in reports),
        "start": start,
        "end": end,
    }


def find_knee(args: argparse.Namespace, steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last step before latency bends upward (p99 five times its low-load value, and 20 ms
    more) or loss passes --max-loss; the last step if none broke."""
    ramp = [s for s in steps if not s.get("confirmation")]
    base = ramp[0]["latency_ms"]["p99"]
    for i, s in enumerate(ramp):
        bent = s["latency_ms"]["p99"] > max(5 * base, base + 20.0)
        s["broken"] = s["loss"] > args.max_loss or bent or s["latency_ms"]["p99"] > args.max_p99_ms
        if s["broken"]:
            return ramp[i - 1] if i else None
    return ramp[-1]


def finish(args: argparse.Namespace, steps: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    knee = find_knee(args, steps)
    confirm = next((s for s in steps if s.get("confirmation")), None)
    limit = (
        "not reached: the highest step still held"
        if knee is steps[-1] and not steps[-1]["broken"]
        else "reached"
    )
    saturated = [s["offered_rate"] for s in steps if s["sender_saturated"]]
    # The collector is the saturated side where it took less than was sent, or the kernel
    # dropped for it, while the senders kept their schedule.
    cpu_bound = [
        s["offered_rate"]
        for s in steps
        if not s["sender_saturated"] and (s["accepted"] < 0.99 * s["sent"] or s["kernel_drops"] > 0)
    ]
    report = {
        "sensors": args.sensors, "senders": args.senders, "dashboards": args.dashboards,
        "step_seconds": args.step_seconds, "steps": steps,
        "knee": {
            "offered_rate": knee["offered_rate"] if knee else None,
            "accepted_rate": knee["accepted_rate"] if knee else None,
            "latency_p99_ms": knee["latency_ms"]["p99"] if knee else None,
            "knee": limit,
            "saturated_side": (
                "sender" if saturated and (not cpu_bound or min(saturated) <= min(cpu_bound))
                else "collector" if cpu_bound else "neither (within the steps tried)"
            ),
            "senders_saturated_at": saturated, "collector_saturated_at": cpu_bound,
            "loss_at_80_percent_of_knee": confirm["loss"] if confirm else None,
        },
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1))
    try:
        plot(steps, knee, out / "knee.png")
    except ImportError:
        print(f"\nwrote {out / 'report.json'}; no knee.png: matplotlib is not installed "
              "(pip install 'trio-collector[bench]')")  # fmt: skip
    else:
        print(f"\nwrote {out / 'report.json'} and {out / 'knee.png'}")
    print(
        f"{'offered/s':>10} {'accepted/s':>11} {'loss':>8} {'p50 ms':>8} {'p99 ms':>8} {'p999 ms':>8} {'CPU %':>6} {'RSS MB':>7}"
    )
    for s in sorted(steps, key=lambda s: s["offered_rate"]):
        lat = s["latency_ms"]
        print(f"{s['offered_rate']:10,.0f} {s['accepted_rate']:11,.0f} {s['loss']:8.3%} {lat['p50']:8.2f} {lat['p99']:8.2f} "
              f"{lat['p999']:8.2f} {s['cpu_percent']:6.1f} {s['rss_mb']:7.1f}" + ("  <- knee" if s is knee else "  (80 % of the knee)" if s.get("confirmation") else ""))  # fmt: skip
    return report


def plot(steps: list[dict[str, Any]], knee: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(steps, key=lambda s: s["offered_rate"])
    x = [s["offered_rate"] for s in steps]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(8, 7))
    for q, style in (("p50", "o-"), ("p99", "s-"), ("p999", "^-")):
        ax1.plot(x, [s["latency_ms"][q] for s in steps], style, label=q)
    ax1.set_yscale("log")
    ax1.set_ylabel("sensor-to-dashboard latency (ms)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax2.plot(x, [s["loss"] * 100 for s in steps], "o-", color="tab:red", label="loss %")
    ax2.set_ylabel("loss (%)")
    ax2.set_xlabel("offered load (datagrams/s)")
    ax2.grid(True, alpha=0.3)
    ax3 = ax2.twinx()
    ax3.plot(x, [s["cpu_percent"] for s in steps], "d--", color="tab:gray", label="collector CPU %")
    ax3.set_ylabel("collector CPU (%)")
    lines = ax2.get_legend_handles_labels()
    more = ax3.get_legend_handles_labels()
    ax2.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left")
    if knee is not None:
        for ax in (ax1, ax2):
            ax.axvline(knee["offered_rate"], color="tab:green", linestyle=":")
        ax1.annotate(f"knee {knee['offered_rate']:,.0f}/s", (knee["offered_rate"], knee["latency_ms"]["p99"]),
                     textcoords="offset points", xytext=(8, 8), color="tab:green")  # fmt: skip
    ax1.set_title("trio-collector under stepped load (127.0.0.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sessions_test(
    args: argparse.Namespace,
    collector: subprocess.Popen[bytes],
    procs: list[Any],
    http: int,
    udp: int,
    out: Path,
    ready: list[dict[str, Any]],
    stats_json: Path,
) -> int:
    hb = args.heartbeat_interval
    registered = sum(r["ready"] for r in ready)
    rate = registered / hb  # one heartbeat per sensor per interval
    max_rss = args.max_rss_mb or (300.0 if args.sensors <= 10_000 else 1536.0)
    print(f"{registered} sessions, {rate:,.0f} heartbeats/s (one per sensor every {hb:g} s) for "
          f"{args.duration:g}s; collector heartbeat_interval {hb:g} s, timeout {3 * hb:g} s",
          flush=True)  # fmt: skip

    def online() -> int:
        # /healthz, not /metrics: with 100,000 devices /metrics is a million per-device
        # samples, 10 s of the collector's loop to render; /healthz costs it about 0.6 s.
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=30) as r:
            return int(json.loads(r.read())["devices_online"])

    samples = []
    start = time.time() + 0.5
    drops_before = socket_drops(udp)
    for proc, r in zip(procs, ready, strict=True):
        # one long step: the senders sign each heartbeat as it falls due
        proc.stdin.write(json.dumps({"rate": r["ready"] / hb, "start": start,
                                     "seconds": args.duration, "ack_share": 0}) + "\n")  # fmt: skip
        proc.stdin.flush()
    next_report = start + 30
    while time.time() < start + args.duration:
        samples.append(proc_stat(collector.pid))
        if time.time() >= next_report:
            next_report += 30
            print(f"  {time.time() - start:6.0f}s: online {online()}, kernel drops {socket_drops(udp) - drops_before}, "
                  f"RSS {samples[-1][2] / 2**20:.1f} MB, "
                  f"CPU so far {(samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0]) * 100:.0f} %",
                  flush=True)  # fmt: skip
        time.sleep(1.0)
    reports = [json.loads(proc.stdout.readline()) for proc in procs]
    samples.append(proc_stat(collector.pid))
    drops = socket_drops(udp) - drops_before
    online_at_end = online()
    # The collector writes its statistics (--stats-json) on the way out: every session that
    # ended, with its reason and when, and the count of sessions ended by reason.
    collector.send_signal(signal.SIGTERM)
    collector.wait(timeout=300)
    stats = json.loads(stats_json.read_text())
    ours = {}  # session id -> device, for the sessions the senders registered (and heartbeat)
    for k in range(len(procs)):
        ours.update(json.loads((stats_json.parent / f"sender-{k}.json.sessions").read_text()))
    ended = [
        (h["session_id"], h["closed"])
        for d in stats["devices"].values()
        for h in d["history"]
        if h["reason"] == "timeout"
    ]
    during = [str(sid) for sid, closed in ended if closed >= start]
    earlier = [str(sid) for sid, closed in ended if closed < start]
    result = {
        "sessions": registered, "sensors": args.sensors, "duration": args.duration,
        "heartbeat_interval": hb, "timeout": 3 * hb, "heartbeats_per_second": rate,
        "registration_seconds": max(r["seconds"] for r in ready),
        "sessions_opened": stats["sessions_opened"],
        "online_at_end": online_at_end,
        # false offlines: sessions of sensors that kept heartbeating, ended by `timeout`
        "timeouts": sum(sid in ours for sid in during),
        "timeouts_during_registration": sum(sid in ours for sid in earlier),
        # sessions whose WELCOME never reached the sender (it registered again, or gave up):
        # nobody heartbeats them, so they time out, as they should
        "timeouts_unheard": sum(sid not in ours for sid in during + earlier),
        "heartbeats_sent": sum(r["sent"] for r in reports),
        # dropped by the kernel for the collector's socket during the test (its buffer was full)
        "kernel_drops": drops,
        "kernel_drops_during_registration": drops_before,
        # sequence gaps over the whole run, registration included: heartbeats that never came
        "heartbeats_lost_all_run": sum(d["lost"] for d in stats["devices"].values()),
        "sender_lateness_p99_s": max(r["lateness_p99"] for r in reports),
        "sender_lateness_max_s": max(r["lateness_max"] for r in reports),
        "rss_mb_max": max(s[2] for s in samples) / 2**20, "rss_mb_end": samples[-1][2] / 2**20,
        "rss_mb_target": max_rss,
        "cpu_percent": (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0]) * 100,
        # the collector's full garbage collections over its whole life (registration included)
        "gc": stats.get("gc"),
    }  # fmt: skip
    (out / "sessions.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    bad = result["timeouts"] + result["timeouts_during_registration"]
    return 0 if bad == 0 and result["rss_mb_max"] <= max_rss else 1


if __name__ == "__main__":
    sys.exit(main())
