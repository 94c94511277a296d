"""Flood benchmark: what real devices get through while someone floods the UDP port with HELLOs
(with wrong tags, for a device id the collector knows, so each one would cost it a MAC), from
one source address and from many; and what 30,000 refused WebSocket handshakes do to memory.

    collector bench flood                        # this tree
    collector bench flood --compare ../old-tree  # and another tree's collector, same run

Each collector under test is a real `collector serve` process (another tree's runs from that
tree's sources). The real devices are a simulator process (--sensors sensors at --rate
datagrams/s each, registered before the flood); a second task registers a fresh UDP-only device
every half second during each phase, from 127.0.0.3 (not an address the flood uses). The flooder is one process sending as fast as it can:
from 127.0.0.1 alone, then round-robin from 1024 addresses (127.2.x.y). Per phase it prints
the flood rate, the share of the real devices' datagrams that arrived (from the collector's own
loss counts: accepted / (accepted + lost)), the registrations that succeeded, and the
collector's CPU. Everything stays on 127.0.0.1 and is bounded in time.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from collector.tools.common import free_port, proc_stat, wait_for_tcp

ROOT = Path(__file__).resolve().parents[2]


def build_parser(prog: str = "collector bench flood") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--compare",
        metavar="TREE",
        action="append",
        default=[],
        help="also measure the collector of this source tree (repeatable)",
    )
    p.add_argument("--sensors", type=int, default=50, help="real devices (default 50)")
    p.add_argument("--rate", type=float, default=20.0, help="datagrams/s per device (default 20)")
    p.add_argument("--phase", type=float, default=10.0, help="seconds per phase (default 10)")
    p.add_argument(
        "--handshakes",
        type=int,
        default=30_000,
        help="refused WebSocket handshakes (default 30000; 0 skips)",
    )
    p.add_argument(
        "--hold",
        type=int,
        default=8000,
        help="connections the handshake client keeps open at once (default 8000)",
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    return p


# -- the flooder (a child process) -------------------------------------------------------------


def _flood(port: int, device_id: str, many: bool, seconds: float, counter: Any) -> None:
    sys.path.insert(0, str(ROOT))
    from collector.wire import datagram as dg
    from collector.wire.crypto import Aead

    hello = dg.encode_hello(Aead(bytes(32)), device_id, bytes(16))  # a key that is not the device's
    socks = []
    for i in range(1024 if many else 1):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        if many:
            s.bind((f"127.2.{i // 250}.{1 + i % 250}", 0))
        socks.append(s)
    target = ("127.0.0.1", port)
    end = time.monotonic() + seconds
    sent = 0
    n = len(socks)
    while True:
        for _ in range(200):
            try:
                socks[sent % n].sendto(hello, target)
                sent += 1
            except BlockingIOError:
                pass
        if time.monotonic() > end:
            break
    counter.value = sent


# -- one collector under test --------------------------------------------------------------------


def _registrations(
    host: str, udp_port: int, devices: dict[str, str], seconds: float
) -> tuple[int, int]:
    """Register a fresh UDP-only device every half second; (attempted, succeeded)."""
    import trio

    from collector.device.client import RegistrationError, open_udp_device

    ids = sorted(d for d in devices if d.startswith("fresh-"))
    result = [0, 0]

    async def run() -> None:
        end = trio.current_time() + seconds
        i = 0
        while trio.current_time() < end:
            device = ids[i % len(ids)]
            i += 1
            result[0] += 1
            try:
                with trio.move_on_after(2.0):
                    async with open_udp_device(
                        host, device, devices[device], udp_port=udp_port, hello_attempts=3,
                        hello_timeout=0.3, heartbeat=False, local_host="127.0.0.3",
                    ):  # fmt: skip
                        result[1] += 1
            except (RegistrationError, OSError):
                pass
            await trio.sleep(0.5)

    trio.run(run)
    return result[0], result[1]


def measure(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from collector.devices import DeviceRegistry, generate_secret

    work = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    devices = {f"sensor-{i:03d}": generate_secret() for i in range(1, args.sensors + 1)}
    devices |= {f"fresh-{i:03d}": generate_secret() for i in range(1, 41)}
    DeviceRegistry(devices).save(work / "devices.toml")
    tcp, udp, http = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    read_token = "flood-read-token"
    (work / "c.toml").write_text(f'[http]\nread_tokens = ["{read_token}"]\n')
    collector = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--host", "127.0.0.1", "--tcp-port", str(tcp),
         "--udp-port", str(udp), "--http-port", str(http), "--devices", str(work / "devices.toml"),
         "--config", str(work / "c.toml"), "--log-level", "ERROR"],
        cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_tcp(http)
    total = 3 * args.phase + 10
    sim = subprocess.Popen(
        [sys.executable, "-m", "collector", "simulate", "--devices", str(work / "devices.toml"),
         "--tcp-port", str(tcp), "--udp-port", str(udp), "--sensors", str(args.sensors),
         "--rate", str(args.rate), "--duration", str(total), "--max-backoff", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def metrics() -> dict[str, float]:
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{http}/metrics", headers={"authorization": f"Bearer {read_token}"}
        )
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(req, timeout=10).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = s.name if not s.name.startswith("collector_device_") else s.name + "*"
                if "reason" in s.labels:
                    key += "{" + s.labels["reason"] + "}"
                out[key] = out.get(key, 0.0) + s.value
        return out

    deadline = time.monotonic() + 20
    while (
        metrics().get("collector_devices_online", 0) < args.sensors and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    time.sleep(1.0)
    phases = []
    try:
        for name, flood in (
            ("no flood", None),
            ("flood from 1 address", False),
            ("flood from 1024 addresses", True),
        ):
            before = metrics()
            _, cpu0, _ = proc_stat(collector.pid)
            t0 = time.monotonic()
            counter = multiprocessing.Value("q", 0)
            flooder = None
            if flood is not None:
                flooder = multiprocessing.Process(
                    target=_flood, args=(udp, "sensor-001", flood, args.phase, counter)
                )
                flooder.start()
            attempted, succeeded = _registrations("127.0.0.1", udp, devices, args.phase)
            if flooder is not None:
                flooder.join()
            elapsed = time.monotonic() - t0
            _, cpu1, rss = proc_stat(collector.pid)
            after = metrics()
            d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            accepted = d.get("collector_device_datagrams_total*", 0)
            lost = d.get("collector_device_lost_total*", 0)
            phases.append({
                "phase": name,
                "flood_per_s": counter.value / elapsed,
                "delivered": accepted / (accepted + lost) if accepted + lost else 0.0,
                "accepted": accepted,
                "lost": lost,
                "registrations": [attempted, succeeded],
                "cpu": (cpu1 - cpu0) / elapsed,
                "rss_mb": rss / 1e6,
                "rejected": {k.split("{")[1][:-1]: v for k, v in d.items() if k.startswith("collector_datagrams_rejected_total{") and v},
            })  # fmt: skip
        handshakes = (
            _handshakes(http, args.handshakes, collector.pid, args.hold)
            if args.handshakes
            else None
        )
    finally:
        sim.terminate()
        sim.wait()
        collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(timeout=20)
        except subprocess.TimeoutExpired:
            collector.kill()
    return {"tree": str(tree), "phases": phases, "handshakes": handshakes}


def _handshakes(port: int, n: int, pid: int, hold: int) -> dict[str, Any]:
    """n refused handshakes (a wrong token), 200 at a time, from clients that keep their
    connections open after the answer (as a careless or hostile client does; up to `hold` at
    once, the oldest let go first): does the collector close each one itself, and what does it
    cost while they are held? RSS before, at the peak, and 5 s after the clients let go."""
    import trio

    request = (
        b"GET /stream?token=wrong HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    _, _, rss0 = proc_stat(pid)
    peak = [rss0]
    counts = {"answered_401": 0, "other": 0, "closed_by_collector": 0, "connect_failed": 0}
    held: collections.deque[trio.SocketStream] = collections.deque()
    sources = itertools.count()

    async def one() -> None:
        try:
            # from 64 addresses: one client address alone meets the per-client connection cap
            sock = trio.socket.socket()
            await sock.bind((f"127.3.0.{1 + next(sources) % 64}", 0))
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
        except OSError:
            counts["connect_failed"] += 1
            return
        held.append(stream)
        while len(held) > hold:  # a client can only hold so many: let the oldest go
            await trio.aclose_forcefully(held.popleft())
        try:
            await stream.send_all(request)
            with trio.move_on_after(2):
                head = await stream.receive_some(4096)
                counts["answered_401" if head.startswith(b"HTTP/1.1 401") else "other"] += 1
                while await stream.receive_some(4096):
                    pass
                counts["closed_by_collector"] += 1  # EOF: the collector closed it, not us
        except (trio.BrokenResourceError, OSError):
            counts["closed_by_collector"] += 1

    async def run() -> float:
        started = time.monotonic()
        async with trio.open_nursery() as nursery:

            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], proc_stat(pid)[2])
                    await trio.sleep(0.2)

            nursery.start_soon(sample)
            limiter = trio.CapacityLimiter(200)

            async def guarded() -> None:
                async with limiter:
                    await one()

            async with trio.open_nursery() as inner:
                for _ in range(n):
                    inner.start_soon(guarded)
            elapsed = time.monotonic() - started
            peak[0] = max(peak[0], proc_stat(pid)[2])
            for stream in held:
                await trio.aclose_forcefully(stream)
            await trio.sleep(5)  # let what the collector holds go
            nursery.cancel_scope.cancel()
        return elapsed

    elapsed = trio.run(run)
    _, _, rss1 = proc_stat(pid)
    return {"n": n, **counts, "seconds": elapsed, "rss_before_mb": rss0 / 1e6, "rss_peak_mb": peak[0] / 1e6, "rss_after_mb": rss1 / 1e6}  # fmt: skip


def main(argv: list[str] | None = None, prog: str = "collector bench flood") -> int:
    args = build_parser(prog).parse_args(argv)
    # Holding tens of thousands of connections needs as many descriptors, here and in the
    # collector (which inherits the limit). Raising the hard limit needs root.
    import resource

    want = args.handshakes + 4096
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in ((want, max(want, hard)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            break
        except (ValueError, OSError):
            continue
    trees = [ROOT, *(Path(t).resolve() for t in args.compare)]
    results = []
    for tree in trees:
        print(f"measuring the collector of {tree} ...", flush=True)
        results.append(measure(tree, args))
    print()
    print(
        f"{args.sensors} real devices at {args.rate:g} datagrams/s each; {args.phase:g}s per phase"
    )
    print(
        f"{'tree':<28} {'phase':<27} {'flood/s':>9} {'delivered':>9} {'registered':>10} {'CPU':>6} {'RSS MB':>7}"
    )
    for r in results:
        for p in r["phases"]:
            print(
                f"{Path(r['tree']).name[:28]:<28} {p['phase']:<27} {p['flood_per_s']:>9,.0f} {p['delivered']:>8.1%} "
                f"{p['registrations'][1]:>4}/{p['registrations'][0]:<5} {p['cpu']:>6.0%} {p['rss_mb']:>7.1f}"
            )
    for r in results:
        h = r["handshakes"]
        if h:
            print(
                f"{Path(r['tree']).name}: {h['n']} refused handshakes in {h['seconds']:.1f}s: {h['answered_401']} answered 401, "
                f"{h['closed_by_collector']} closed by the collector, {h['other']} answered otherwise (503: a connection cap), "
                f"{h['connect_failed']} not connected; "
                f"RSS {h['rss_before_mb']:.1f} MB before, {h['rss_peak_mb']:.1f} at the peak, "
                f"{h['rss_after_mb']:.1f} after ({h['rss_after_mb'] - h['rss_before_mb']:+.1f} MB)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
