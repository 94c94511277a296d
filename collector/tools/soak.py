"""Soak test: a real collector under a realistic, hostile-ish mix for a long time, watching its
memory and file descriptors for growth.

    collector soak                       # 10 minutes, 1000 sensors
    collector soak --duration 1800 --sensors 2000 --out soak-report

The mix, all on 127.0.0.1 and bounded in time:

  collector    a real `collector serve`, recording, with HTTP on (RSS and open descriptors are
               sampled from /proc every --sample seconds)
  sensors      a simulator process: --sensors sensors (20 % UDP-only), loss, duplicates,
               reordering, churn (clean reconnects) and a few that hang without a goodbye
  dashboards   4 that read everything, and 1 that reads one message a second (it falls behind,
               is coalesced, gets closed for stalling, and reconnects)
  API          a request every 0.2 s: device lists, one device, commands to random devices
               (some offline: they queue and expire), /metrics, /healthz, config pushes

After a warm-up (the first fifth of the run, and long enough for the dashboards' history rings
to fill: see --history) it fits a line to RSS and to the descriptor count.
It passes when RSS grows less than --max-rss-slope MB/min, descriptors do not grow (the last
quarter's maximum is within 8 of the first's), and no internal error was counted.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trio

from collector.tools import options
from collector.tools.common import free_port, open_fds, proc_stat, scrape, slope, wait_for_tcp

ROOT = Path(__file__).resolve().parents[2]


def build_parser(prog: str = "collector soak") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--duration", type=options.positive, default=600.0, help="seconds to run (default 600)"
    )
    p.add_argument(
        "--sensors", type=options.count, default=1000, help="simulated sensors (default 1000)"
    )
    p.add_argument(
        "--rate", type=options.positive, default=1.0, help="datagrams/s per sensor (default 1)"
    )
    p.add_argument(
        "--sample", type=float, default=10.0, help="seconds between samples (default 10)"
    )
    p.add_argument(
        "--max-rss-slope", type=float, default=1.0, help="MB/min of RSS growth allowed (default 1)"
    )
    p.add_argument(
        "--history",
        type=int,
        default=60,
        help="[stream] history of the collector (default 60): its per-series rings grow to twice "
        "this before they are cut back, which is growth that stops, not a leak; a smaller ring "
        "reaches its steady state well inside the warm-up",
    )
    p.add_argument("--out", metavar="DIR", help="write report.json (and soak.png) here")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return p


def _http(port: int, method: str, path: str, body: Any = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code
    except OSError:
        return 0


async def _dashboard(port: int, *, slow: bool, stats: dict[str, int]) -> None:
    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    url = f"ws://127.0.0.1:{port}/stream"
    while True:
        try:
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"type": "subscribe", "history": 20}))
                while True:
                    await ws.get_message()
                    stats["messages"] += 1
                    if slow:
                        await trio.sleep(1.0)
        except (ConnectionClosed, HandshakeError, OSError):
            stats["reconnects"] += 1
            await trio.sleep(5.0 if slow else 1.0)


async def _api_traffic(
    port: int, device_ids: list[str], rng: random.Random, stats: dict[str, int]
) -> None:
    while True:
        await trio.sleep(0.2)
        choice = rng.randrange(6)
        device = rng.choice(device_ids)
        if choice == 0:
            call = ("GET", "/api/devices", None)
        elif choice == 1:
            call = ("GET", f"/api/devices/{device}?history=50", None)
        elif choice == 2:
            call = ("POST", f"/api/devices/{device}/commands", {"name": "ping", "expires_in": 30})
        elif choice == 3:
            call = ("GET", "/metrics", None)
        elif choice == 4:
            call = ("GET", "/healthz", None)
        else:
            call = (
                "POST",
                "/api/config",
                {"match": "sensor-0*", "config": {"n": rng.randrange(100)}},
            )
        status = await trio.to_thread.run_sync(_http, port, *call)
        stats[f"http_{status}"] = stats.get(f"http_{status}", 0) + 1


def main(argv: list[str] | None = None, prog: str = "collector soak") -> int:
    args = build_parser(prog).parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    devices = work / "devices.toml"
    tcp, udp, http = free_port(), free_port(2), free_port()  # 2 = SOCK_DGRAM
    py = sys.executable
    simulate = [py, "-m", "collector", "simulate"]
    subprocess.run(
        [*simulate, "--init-devices", str(devices), "--sensors", str(args.sensors)],
        check=True,
        capture_output=True,
    )
    (work / "collector.toml").write_text(
        f'[recording]\ndir = "{work / "rec"}"\n'
        f"[limits]\nmax_devices = {args.sensors + 100}\n"
        f"[stream]\nhistory = {args.history}\n"
    )
    collector = subprocess.Popen(
        [py, "-m", "collector", "serve", "--host", "127.0.0.1", "--tcp-port", str(tcp), "--udp-port", str(udp),
         "--http-port", str(http), "--devices", str(devices), "--config", str(work / "collector.toml"),
         "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(work / "collector.log", "wb"),
    )  # fmt: skip
    wait_for_tcp(http)
    sim = subprocess.Popen(
        [*simulate, "--devices", str(devices), "--tcp-port", str(tcp), "--udp-port", str(udp),
         "--sensors", str(args.sensors), "--rate", str(args.rate), "--udp-only", "0.2", "--loss", "0.02",
         "--duplicate", "0.005", "--reorder", "0.01", "--churn", "0.5", "--hang", str(max(1, args.sensors // 100)),
         "--hang-at", str(args.duration / 3), "--max-backoff", "5", "--seed", str(args.seed),
         "--duration", str(args.duration + 30)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    device_ids = [f"sensor-{i:03d}" for i in range(1, args.sensors + 1)]
    samples: list[dict[str, float]] = []
    stats: dict[str, int] = {"messages": 0, "reconnects": 0}
    slow_stats: dict[str, int] = {"messages": 0, "reconnects": 0}
    print(
        f"soak: collector pid {collector.pid}, {args.sensors} sensors, 5 dashboards (1 slow), "
        f"API traffic; {args.duration:.0f}s; files in {work}",
        flush=True,
    )

    async def drive() -> None:
        rng = random.Random(args.seed)
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(lambda: _dashboard(http, slow=False, stats=stats))
            nursery.start_soon(lambda: _dashboard(http, slow=True, stats=slow_stats))
            nursery.start_soon(_api_traffic, http, device_ids, rng, stats)
            start = time.monotonic()
            while time.monotonic() - start < args.duration:
                await trio.sleep(args.sample)
                _, cpu, rss = proc_stat(collector.pid)
                m = await trio.to_thread.run_sync(lambda: scrape(http))
                sample = {
                    "t": round(time.monotonic() - start, 1),
                    "rss_mb": rss / 1e6,
                    "fds": open_fds(collector.pid),
                    "cpu_s": cpu,
                    "online": m.get("collector_devices_online", 0),
                    "accepted": m.get("collector_datagrams_accepted_total", 0),
                    "internal_errors": sum(
                        v for k, v in m.items() if k.startswith("collector_internal_errors_total")
                    ),
                    "subscribers": m.get("collector_stream_subscribers", 0),
                }
                samples.append(sample)
                print(
                    f"[{sample['t']:6.0f}s] RSS {sample['rss_mb']:6.1f} MB  fds {sample['fds']:4d}  "
                    f"online {sample['online']:5.0f}  accepted {sample['accepted']:9.0f}  "
                    f"dashboards {sample['subscribers']:.0f}  internal errors {sample['internal_errors']:.0f}",
                    flush=True,
                )
            nursery.cancel_scope.cancel()

    try:
        trio.run(drive)
    finally:
        sim.terminate()
        sim.wait()
        collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(timeout=30)
        except subprocess.TimeoutExpired:
            collector.kill()
    # Warm-up: a fifth of the run, and at least until the history rings have been cut back
    # once (they grow to twice --history points per series at --rate a second).
    warm_up = max(args.duration / 5, 2.5 * args.history / args.rate)
    warm = [s for s in samples if s["t"] >= warm_up]
    rss_slope = slope([(s["t"] / 60, s["rss_mb"]) for s in warm])
    fd_slope = slope([(s["t"] / 60, s["fds"]) for s in warm])
    quarter = max(1, len(warm) // 4)
    fds_first = max(s["fds"] for s in warm[:quarter]) if warm else 0
    fds_last = max(s["fds"] for s in warm[-quarter:]) if warm else 0
    errors = samples[-1]["internal_errors"] if samples else 0
    checks = {
        f"RSS slope {rss_slope:+.3f} MB/min (limit {args.max_rss_slope})": abs(rss_slope)
        < args.max_rss_slope,
        f"descriptors: max {fds_first} in the first quarter, {fds_last} in the last (slope {fd_slope:+.2f}/min)": fds_last
        <= fds_first + 8,
        f"internal errors: {errors:.0f}": errors == 0,
        f"collector exit code {collector.returncode}": collector.returncode == 0,
    }
    print(
        f"soak: {len(samples)} samples over {args.duration:.0f}s; RSS {warm[0]['rss_mb'] if warm else 0:.1f} -> "
        f"{samples[-1]['rss_mb'] if samples else 0:.1f} MB; dashboards got {stats['messages']} messages "
        f"({stats['reconnects']} reconnects), the slow one {slow_stats['messages']} ({slow_stats['reconnects']} "
        f"reconnects); API answers {sorted((k, v) for k, v in stats.items() if k.startswith('http_'))}"
    )
    for line, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {line}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"args": vars(args), "samples": samples, "rss_slope_mb_per_min": rss_slope, "fd_slope_per_min": fd_slope, "checks": {k: v for k, v in checks.items()}}, indent=1))  # fmt: skip
        _plot(samples, out / "soak.png")
    return 0 if all(checks.values()) else 1


def _plot(samples: list[dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    t = [s["t"] / 60 for s in samples]
    ax.plot(t, [s["rss_mb"] for s in samples], label="RSS (MB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax2 = ax.twinx()
    ax2.plot(t, [s["fds"] for s in samples], color="tab:orange", label="open descriptors")
    ax2.set_ylabel("open descriptors")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
