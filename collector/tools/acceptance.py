"""The collector-core acceptance run: N simulated sensors against a real `collector serve`
process for D seconds, with injected loss and K sensors that hang half-way.

    collector acceptance --sensors 200 --duration 60 --loss 0.05 --hang 10

It checks, and prints, that
  1. no running sensor was ever marked offline (every session ended `closed` or `shutdown`);
  2. every hung sensor went offline with reason `timeout` within timeout + 1 s of its last
     datagram;
  3. every sensor's lost count at the collector equals what the simulator dropped on purpose
     (and could be detected: below the last sequence number delivered).
Exit status 0 when all three hold.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from collector.device.sim import SimConfig, Simulator
from collector.devices import DeviceRegistry
from collector.tools.common import free_port, wait_for_tcp


def build_parser(prog: str = "collector acceptance") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sensors", type=int, default=200, help="simulated sensors (default 200)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    p.add_argument("--rate", type=float, default=1.0, help="TELEMETRY datagrams/s per sensor")
    p.add_argument(
        "--loss",
        type=float,
        default=0.05,
        help="share of datagrams dropped on purpose (default 0.05)",
    )
    p.add_argument("--udp-only", type=float, default=0.2, help="share registering by HELLO")
    p.add_argument("--hang", type=int, default=10, help="sensors that stop without goodbye")
    p.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval (s)")
    p.add_argument("--timeout", type=float, default=15.0, help="session timeout (s)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--keep", metavar="DIR", help="keep the devices file, stats and log in DIR")
    return p


def main(argv: list[str] | None = None, prog: str = "collector acceptance") -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.hang and args.duration / 2 < args.timeout + 1:
        p.error(
            f"sensors hang at {args.duration / 2:g}s: a run of {args.duration:g}s leaves them less than "
            f"the timeout ({args.timeout:g}s) + 1 s to go offline; use --duration {2 * (args.timeout + 2):g} or more"
        )

    work = Path(args.keep or tempfile.mkdtemp(prefix="acceptance-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = SimConfig(
        devices=args.sensors, rate=args.rate, loss=args.loss, udp_only=args.udp_only,
        hang=args.hang, hang_at=args.duration / 2, seed=args.seed, jitter=0.1,
    )  # fmt: skip
    registry = DeviceRegistry({d: f"secret-{d}-{args.seed}" for d in cfg.device_ids()})
    registry.save(work / "devices.toml")
    (work / "collector.toml").write_text(
        f"[sessions]\nheartbeat_interval = {args.heartbeat}\ntimeout = {args.timeout}\n"
    )
    tcp, udp, http = (
        free_port(socket.SOCK_STREAM),
        free_port(socket.SOCK_DGRAM),
        free_port(socket.SOCK_STREAM),
    )
    log = open(work / "collector.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--host", "127.0.0.1",
         "--tcp-port", str(tcp), "--udp-port", str(udp), "--http-port", str(http), "--devices", str(work / "devices.toml"),
         "--config", str(work / "collector.toml"), "--stats-json", str(work / "stats.json")],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    wait_for_tcp(tcp)
    print(
        f"collector pid {proc.pid} on TCP {tcp} / UDP {udp}; {args.sensors} sensors "
        f"({args.udp_only:.0%} UDP-only) at {args.rate:g}/s for {args.duration:g}s, "
        f"loss {args.loss:.0%}, {args.hang} hang at {args.duration / 2:g}s; "
        f"heartbeat {args.heartbeat:g}s, timeout {args.timeout:g}s",
        flush=True,
    )
    sim = Simulator(cfg, registry, tcp_port=tcp, udp_port=udp)
    started = time.time()
    trio.run(sim.run, args.duration)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    log.close()
    print(f"collector exited {proc.returncode}: {out.strip().splitlines()[-1]}")
    print(sim.summary())
    stats = json.loads((work / "stats.json").read_text())
    devices = stats["devices"]

    false_offline = []
    late = []
    lost_mismatch = []
    worst_quiet = 0.0
    for device_id, rep in sim.reports.items():
        d = devices.get(device_id)
        if d is None:
            lost_mismatch.append((device_id, "never seen", rep.expected_lost))
            continue
        reasons = [h["reason"] for h in d["history"]]
        if device_id in sim.hangs:
            timeouts = [h for h in d["history"] if h["reason"] == "timeout"]
            if len(timeouts) != 1 or rep.hung_at is None:
                late.append((device_id, reasons))
            else:
                quiet = timeouts[0]["closed"] - rep.hung_at
                worst_quiet = max(worst_quiet, quiet)
                if not args.timeout <= quiet + 0.05 or quiet > args.timeout + 1.0:
                    late.append((device_id, f"offline {quiet:.3f}s after its last datagram"))
        elif any(r not in ("closed", "shutdown") for r in reasons):
            false_offline.append((device_id, reasons))
        if d["lost"] != rep.expected_lost:
            lost_mismatch.append((device_id, d["lost"], rep.expected_lost))

    total_lost = sum(d["lost"] for d in devices.values())
    print(f"ran {time.time() - started:.1f}s; collector: {stats['datagrams_accepted']} accepted, "
          f"rejected {stats['rejected']}; sessions ended {stats['sessions_ended']}")  # fmt: skip
    print(f"1. falsely offline: {len(false_offline)} of {args.sensors - args.hang} running sensors"
          + (f" {false_offline[:3]}" if false_offline else ""))  # fmt: skip
    print(f"2. hung sensors offline with 'timeout' within {args.timeout:g}+1 s: "
          f"{args.hang - len(late)} of {args.hang} (slowest {worst_quiet:.3f}s after the last datagram)"
          + (f" {late[:3]}" if late else ""))  # fmt: skip
    print(f"3. lost counts equal to deliberate drops: {args.sensors - len(lost_mismatch)} of "
          f"{args.sensors} sensors; collector counted {total_lost}, simulator dropped "
          f"{sim.totals()['expected_lost']} detectable ({sim.totals()['dropped']} in all)"
          + (f" {lost_mismatch[:3]}" if lost_mismatch else ""))  # fmt: skip
    ok = proc.returncode == 0 and not false_offline and not late and not lost_mismatch
    print("PASS" if ok else "FAIL", f"(files in {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
