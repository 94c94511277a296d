"""Nodes on a real Redis (collector/cluster/bus.py) and `serve --workers N`, as real processes.

The tests start their own redis-server on a free port (Debian's `redis-server`; `.ci/run`
installs it and sets REQUIRE_REDIS=1, so there they fail instead of skipping). Every wait
has a deadline far above what it takes on a loaded machine; none is a timing assertion.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from collector.cluster.steering import worker_for
from collector.device.client import (
    RegistrationError,
    open_device,
    open_device_failover,
    open_udp_device,
)
from collector.devices import DeviceRegistry
from collector.wire.recording import decode_records

from .test_openapi import validate
from .test_steering import hello

ROOT = Path(__file__).resolve().parent.parent
REDIS = shutil.which("redis-server")

if REDIS is None:
    if os.environ.get("REQUIRE_REDIS"):
        raise RuntimeError("REQUIRE_REDIS is set but redis-server is not installed")
    pytest.skip(
        "redis-server is not installed (Debian: apt-get install redis-server)",
        allow_module_level=True,
    )

#: fast node heartbeats, so that a lost node is noticed in seconds
CLUSTER_TOML = """
[cluster]
node_heartbeat = 0.25
node_timeout = 1.5
{extra}
"""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.answers():
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def info(self, section: str) -> bytes:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"INFO " + section.encode() + b"\r\n")
                time.sleep(0.05)
                return s.recv(65536)
        return b""

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(10)


class Node:
    """`collector serve` in a process of its own."""

    def __init__(
        self, tmp: Path, name: str, redis: str | None, *args: str, extra: str = ""
    ) -> None:
        self.name = name
        self.tcp, self.udp, self.http = free_port(), free_port(socket.SOCK_DGRAM), free_port()
        cfg = tmp / f"{name}.toml"
        cfg.write_text(CLUSTER_TOML.format(extra=extra))
        self.log = tmp / f"{name}.log"
        self.stats = tmp / f"{name}.stats.json"
        cmd = [sys.executable, "-m", "collector", "serve", "--devices", str(tmp / "devices.toml"),
               "--config", str(cfg), "--host", "127.0.0.1", "--tcp-port", str(self.tcp),
               "--udp-port", str(self.udp), "--http-port", str(self.http),
               "--stats-json", str(self.stats), *args]  # fmt: skip
        if redis:
            cmd += ["--redis", redis, "--node", name]
        self.out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=tmp, stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal it (sig 0: only wait), and wait for it to exit."""
        if sig and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if not self.out.closed:
            self.out.close()
        return code


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


async def ahttp(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    return await trio.to_thread.run_sync(http, method, url, body)


async def eventually(check, what: str, within: float = 30.0, interval: float = 0.1) -> Any:
    """Poll `check` (sync or async) until it returns something true; fail after `within` s."""
    last: Any = None
    with trio.move_on_after(within):
        while True:
            try:
                result = check()
                if hasattr(result, "__await__"):
                    result = await result
            except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
                last = exc  # a node still starting, or gone for a moment
            else:
                if result:
                    return result
                last = result
            await trio.sleep(interval)
    pytest.fail(f"{what}: not within {within}s (last: {last!r})")


async def health(node: Node) -> dict[str, Any]:
    _, body = await ahttp("GET", node.url("/healthz"))
    return body


async def wait_cluster(nodes: list[Node], names: list[str]) -> None:
    for node in nodes:

        async def joined(node: Node = node) -> bool:
            c = (await health(node)).get("cluster", {})
            return c.get("redis") == "up" and sorted(c.get("nodes", [])) == sorted(names)

        await eventually(joined, f"{node.name} sees every node", within=60)


class Dashboard:
    """A stream subscriber that keeps every message."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def run(self, url: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"type": "subscribe", "devices": ["*"]}))
            task_status.started()
            while True:
                self.messages.append(json.loads(await ws.get_message()))

    def readings_of(self, device: str) -> list[Any]:
        return [
            r
            for m in self.messages
            if m["type"] == "readings"
            for r in m["readings"]
            if r[0] == device
        ]

    def device_events(self, device: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "device" and m["device"] == device]


def make_devices(tmp: Path, ids: list[str]) -> dict[str, str]:
    reg = DeviceRegistry({})
    secrets = {d: reg.add(d) for d in ids}
    reg.save(tmp / "devices.toml")
    return secrets


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def nodes():
    started: list[Node] = []
    yield started
    for n in started:
        n.stop(signal.SIGKILL)


async def test_three_nodes_share_dashboards_commands_and_lose_a_node(tmp_path, redis, nodes):
    secrets = make_devices(tmp_path, ["roamer", "stay-a", "udp-a"])
    a, b, c = (Node(tmp_path, name, redis.url) for name in "ABC")
    nodes += [a, b, c]
    await wait_cluster([a, b, c], ["A", "B", "C"])
    dash = Dashboard()
    answered: list[tuple[str, dict[str, Any]]] = []

    async def on_command(name: str, args: dict[str, Any]) -> Any:
        answered.append((name, args))
        return {"did": name, "args": args}

    roamer_online = trio.Event()
    roamer_nodes: list[str] = []
    failures: list[Exception] = []

    async def roam(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """A device that registers with the first collector of its list that takes it, and
        registers again (with the next one) whenever its session ends."""
        targets = [("127.0.0.1", a.tcp), ("127.0.0.1", b.tcp)]
        started = False
        while True:
            try:
                async with open_device_failover(
                    targets, "roamer", secrets["roamer"], on_command=on_command, register_timeout=5
                ) as dev:
                    roamer_nodes.append("A" if dev.udp.getpeername()[1] == a.udp else "B")
                    roamer_online.set()
                    if not started:
                        started = True
                        task_status.started()
                    i = 0
                    while dev.end_reason is None:
                        await dev.send_readings({"temperature": 20.0 + i % 10})
                        i += 1
                        await trio.sleep(0.05)
            except Exception as exc:  # its collector went away: the next one in the list
                failures.append(exc)
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        await nursery.start(dash.run, f"ws://127.0.0.1:{b.http}/stream")
        await nursery.start(roam)
        assert roamer_nodes == ["A"]

        async def stay_a() -> None:  # registers with A only, and stops when A is gone
            with contextlib.suppress(Exception):
                async with open_device(
                    "127.0.0.1", "stay-a", secrets["stay-a"], tcp_port=a.tcp
                ) as dev:
                    while dev.end_reason is None:
                        await dev.send_readings({"level": 1})
                        await trio.sleep(0.1)

        async def udp_a() -> None:
            with contextlib.suppress(Exception):
                async with open_udp_device(
                    "127.0.0.1", "udp-a", secrets["udp-a"], udp_port=a.udp
                ) as dev:
                    while dev.end_reason is None:
                        await dev.send_readings({"level": 2})
                        await trio.sleep(0.1)

        nursery.start_soon(stay_a)
        nursery.start_soon(udp_a)

        # 1. a dashboard on node B sees the readings of a device on node A
        await eventually(lambda: len(dash.readings_of("roamer")) >= 5, "readings of A on B")
        await eventually(lambda: dash.readings_of("udp-a"), "UDP device's readings of A on B")

        # ... and the API of node C lists it as online on node A
        async def on_c() -> dict[str, Any] | None:
            _, body = await ahttp("GET", c.url("/api/devices/roamer"))
            return body if body.get("online") and body.get("node") == "A" else None

        await eventually(on_c, "C's API shows roamer online on A")

        # 2. a command posted to node C reaches the device on node A, and its result comes back
        status, cmd = await ahttp(
            "POST", c.url("/api/devices/roamer/commands"), {"name": "blink", "args": {"n": 3}}
        )
        assert status == 202, cmd

        async def acked() -> dict[str, Any] | None:
            _, body = await ahttp("GET", c.url(f"/api/commands/{cmd['id']}"))
            return body if body["state"] == "acked" else None

        done = await eventually(acked, "the command from C acked")
        assert done["result"] == {"did": "blink", "args": {"n": 3}}
        assert done["transport"] == "via A"
        assert answered == [("blink", {"n": 3})]
        # the dashboard on B followed it too, to the end
        await eventually(
            lambda: [
                m for m in dash.messages
                if m["type"] == "command" and m["id"] == cmd["id"] and m["state"] == "acked"
            ],
            "the command's states on B's dashboard",
        )  # fmt: skip

        # 3. kill -9 node A: its devices go offline with reason node_lost everywhere, and the
        # one with a list of collectors comes back on B
        roamer_online = trio.Event()
        killed_at = trio.current_time()
        a.proc.kill()
        a.proc.wait()
        await eventually(
            lambda: [e for e in dash.device_events("udp-a") if e["reason"] == "node_lost"],
            "udp-a node_lost on B's dashboard",
        )
        noticed = trio.current_time() - killed_at
        assert [e for e in dash.device_events("stay-a") if e["reason"] == "node_lost"]

        async def lost_on_c() -> bool:
            _, body = await ahttp("GET", c.url("/api/devices/udp-a"))
            return body["online"] is False and body["reason"] == "node_lost"

        await eventually(lost_on_c, "udp-a node_lost in C's API")
        await roamer_online.wait()
        assert roamer_nodes == ["A", "B"]

        async def roamer_on_b_everywhere() -> bool:
            for node in (b, c):
                _, body = await ahttp("GET", node.url("/api/devices/roamer"))
                if not (body["online"] and body.get("node") == "B"):
                    return False
            return True

        await eventually(roamer_on_b_everywhere, "roamer online on B, seen by B and C")
        status, healthz = await ahttp("GET", c.url("/healthz"))
        assert healthz["cluster"]["nodes_lost"] == ["A"]
        # a cluster's answers are what docs (collector/web/openapi.json) say they are
        validate(healthz, "/components/schemas/Health", "a cluster node's /healthz")
        _, listing = await ahttp("GET", b.url("/api/devices"))
        validate(listing, "/components/schemas/DeviceList", "a cluster node's device list")
        _, one = await ahttp("GET", c.url("/api/devices/roamer"))
        validate(one, "/components/schemas/DeviceDetail", "a device on another node")
        assert {d["id"]: d["node"] for d in listing["devices"]}["udp-a"] == "A"
        nursery.cancel_scope.cancel()
    # node_timeout is 1.5 s; on a loaded machine the notice may take longer, never less
    assert noticed >= 1.0, noticed


async def test_redis_stopped_for_10s_loses_only_what_the_buffer_could_not_hold(
    tmp_path, redis, nodes
):
    import coredis

    secrets = make_devices(tmp_path, ["busy"])
    a = Node(tmp_path, "A", redis.url, extra="buffer = 40")
    nodes.append(a)
    await wait_cluster([a], ["A"])
    saw_down = []

    async with trio.open_nursery() as nursery:

        async def device(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with open_device("127.0.0.1", "busy", secrets["busy"], tcp_port=a.tcp) as dev:
                task_status.started()
                i = 0
                while True:
                    await dev.send_readings({"n": i, "m": -i})
                    i += 1
                    await trio.sleep(0.02)

        await nursery.start(device)
        await trio.sleep(1.0)
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            with trio.move_on_after(10.0):
                while True:
                    c = (await health(a)).get("cluster", {})
                    if c.get("redis") == "down":
                        saw_down.append(c)
                    await trio.sleep(0.5)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert saw_down, "healthz never said redis: down"
    assert saw_down[-1]["buffered"] == 40  # full, and holding the newest

    def metrics() -> dict[str, float]:
        with urllib.request.urlopen(a.url("/metrics"), timeout=10) as r:
            lines = r.read().decode().splitlines()
        return {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in lines
            if line.startswith(("collector_cluster_", "collector_readings_total"))
        }

    async def drained() -> dict[str, float] | None:
        m = await trio.to_thread.run_sync(metrics)
        return (
            m if m["collector_cluster_buffered"] == 0 and m["collector_cluster_redis_up"] else None
        )

    m = await eventually(drained, "the buffer drained after SIGCONT")
    accepted = m["collector_readings_total"]
    published = m["collector_cluster_readings_published_total"]
    dropped = m["collector_cluster_dropped_readings_total"]
    assert dropped > 0  # 10 s at 50 datagrams/s is far more than 40 entries
    assert accepted == published + dropped, m

    # what Redis holds is exactly what was published: no entry twice, none made up
    client = coredis.Redis.from_url(redis.url, decode_responses=False)
    async with client:
        entries = await client.xrange("collector:node:A:readings", "-", "+")
    records = [r for e in entries for r in decode_records(e.field_values[b"r"], start=0)]
    held = sum(len(r.readings) for r in records)
    assert held == published
    ns = [value for r in records for name, value in r.readings if name == "n"]
    assert ns == sorted(ns) and len(ns) == len(set(ns))  # in order, once each


def _running(pid: int) -> bool:
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _children(parent: int, marker: str) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True)
    rows = [line.split(None, 2) for line in out.stdout.splitlines()[1:]]
    return [int(pid) for pid, ppid, args in rows if int(ppid) == parent and marker in args]


def _worker_pids(parent: int) -> dict[int, int]:
    """worker index -> pid, from the process table (children of `parent`)."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True
    ).stdout
    pids = {}
    for line in out.splitlines()[1:]:
        pid, ppid, args = line.split(None, 2)
        if int(ppid) == parent and "--worker-spec" in args:
            spec = json.loads(args.split("--worker-spec ", 1)[1])
            pids[spec["index"]] = int(pid)
    return pids


async def test_two_workers_steer_restart_and_shut_down(tmp_path, nodes):
    # two UDP-only devices whose HELLOs the kernel gives to different workers
    udp_ids = []
    for i in range(100):
        w = worker_for(hello(f"u-{i}", b"n" * 12), 2)
        if w == len(udp_ids):
            udp_ids.append(f"u-{i}")
        if len(udp_ids) == 2:
            break
    tcp_ids = [f"t-{i}" for i in range(6)]
    secrets = make_devices(tmp_path, tcp_ids + udp_ids)
    node = Node(tmp_path, "W", None, "--workers", "2", "--node", "box")
    nodes.append(node)
    await wait_cluster([node], ["box-0", "box-1"])
    pids = _worker_pids(node.proc.pid)
    assert sorted(pids) == [0, 1]
    sent: dict[str, int] = {}
    sessions: dict[str, list[tuple[str, int]]] = {}

    async def run_device(device_id: str, udp: bool) -> None:
        while True:
            try:
                if udp:
                    cm = open_udp_device(
                        "127.0.0.1", device_id, secrets[device_id], udp_port=node.udp
                    )
                else:
                    cm = open_device("127.0.0.1", device_id, secrets[device_id], tcp_port=node.tcp)
                async with cm as dev:
                    sessions.setdefault(device_id, []).append(("", dev.session_id))
                    while dev.end_reason is None:
                        await dev.send_readings({"v": 1}, ack=True)
                        sent[device_id] = sent.get(device_id, 0) + 1
                        await trio.sleep(0.05)
            except Exception:
                await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        for d in tcp_ids:
            nursery.start_soon(run_device, d, False)
        for d in udp_ids:
            nursery.start_soon(run_device, d, True)

        async def every_device_online() -> list[dict[str, Any]] | None:
            _, body = await ahttp("GET", node.url("/api/devices"))
            devs = body["devices"]
            return devs if all(d["online"] for d in devs) and len(devs) == 8 else None

        devs = await eventually(every_device_online, "8 devices online, seen from any worker")
        where = {d["id"]: d["node"] for d in devs}
        # steering: each session's datagrams reach the worker that holds it (sid % 2)
        for d in devs:
            assert where[d["id"]] == f"box-{d['session_id'] % 2}", d
        assert {where[u] for u in udp_ids} == {"box-0", "box-1"}
        await trio.sleep(1.0)

        # restart: kill -9 worker 1; the parent starts it again, worker 0's sessions go on
        on_0 = {d: s for d, s in sessions.items() if where[d] == "box-0"}
        os.kill(pids[1], signal.SIGKILL)

        async def restarted() -> dict[int, int] | None:
            now = _worker_pids(node.proc.pid)
            return now if sorted(now) == [0, 1] and now[1] != pids[1] else None

        new_pids = await eventually(restarted, "worker 1 started again")
        assert new_pids[0] == pids[0]
        await wait_cluster([node], ["box-0", "box-1"])
        # the TCP devices of worker 1 lost their connection and registered again
        moved = [d for d in tcp_ids if where[d] == "box-1"]
        await eventually(
            lambda: all(len(sessions[d]) >= 2 for d in moved), "worker 1's TCP devices back"
        )
        await trio.sleep(1.0)
        assert {d: sessions[d] for d in on_0} == on_0  # not one session of worker 0 ended
        nursery.cancel_scope.cancel()

    # shutdown: one signal to the parent; every worker drains and the parent says what they did
    assert node.stop(signal.SIGTERM) == 0
    text = node.text()
    assert "worker 1 (pid" in text and "starting it again" in text
    summary = [line for line in text.splitlines() if line.startswith("shutdown ")]
    assert summary and summary[-1].startswith("shutdown complete"), text[-2000:]
    assert "2 workers (1 restart)" in summary[-1]
    stats = json.loads(node.stats.read_text())["workers"]
    assert set(stats) == {"box-0", "box-1"}
    # worker 0 never saw a datagram of a session it does not hold (worker 1's new life did:
    # the UDP devices of its old life, until they registered again)
    assert stats["box-0"]["rejected"].get("unknown_session", 0) == 0
    # no worker outlived its parent (they exit before it does)
    assert not [p for p in new_pids.values() if _running(p)]


async def test_workers_outlive_idle_threads_but_not_their_parent(tmp_path, nodes):
    """A worker is told its parent is gone by a pipe, not by PR_SET_PDEATHSIG: that signal
    follows the thread that forked the worker, and Trio's process-starting threads exit after
    10 s idle (every worker used to be shut down 10 s after it started, then again)."""
    make_devices(tmp_path, ["d-1"])
    node = Node(tmp_path, "W", None, "--workers", "2", "--node", "box")
    nodes.append(node)
    await wait_cluster([node], ["box-0", "box-1"])
    pids = _worker_pids(node.proc.pid)
    await trio.sleep(13)  # past the 10 s a thread of Trio's cache lives idle
    assert _worker_pids(node.proc.pid) == pids
    assert "exited with status" not in node.text() and "shutting down" not in node.text()
    bus = _children(node.proc.pid, "collector.cluster.redis_server")  # the guard ...
    bus += [c for g in bus for c in _children(g, "redis-server")]  # ... and its redis-server
    assert len(bus) == 2, bus
    node.proc.kill()  # the parent killed with -9: its workers see EOF on the pipe
    node.proc.wait()

    async def gone() -> bool:
        return not any(_running(p) for p in pids.values())

    await eventually(gone, "the workers shut down after their parent died")
    assert node.text().count("the parent process is gone: shutting down") == 2
    # the private redis-server's guard saw the same EOF
    await eventually(lambda: not any(_running(p) for p in bus), "the private redis stopped")


async def test_workers_that_cannot_start_stop_everything_with_one_error(tmp_path, nodes):
    make_devices(tmp_path, ["d"])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    node = Node(tmp_path, "W", None, "--workers", "2", "--record", str(not_a_dir))
    nodes.append(node)
    code = await trio.to_thread.run_sync(node.stop, 0)  # 0: no signal, wait for it to exit
    text = node.text()
    assert code == 1, text[-2000:]
    assert "cannot create recording directory" in text
    assert "exited with status 2 before it was ready, 3 times in a row" in text
    assert "starting it again in 0.5s" in text and "starting it again in 1.0s" in text


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip


def secret_from(out: str) -> str:
    return next(line.split()[1] for line in out.splitlines() if line.startswith("secret: "))


async def registers(node: Node, device_id: str, secret: str) -> bool:
    try:
        async with open_device(
            "127.0.0.1", device_id, secret, tcp_port=node.tcp, register_timeout=5
        ):
            return True
    except RegistrationError:
        return False


async def test_shared_devices_reach_every_node_without_a_restart(tmp_path, redis, nodes):
    """[cluster] shared_devices: the credentials live in Redis. Each node has its own devices
    file (its cache); a change through the API of one node, or `collector devices --redis`,
    reaches the others at once, and a node that was away takes what it missed when it joins."""
    shared = "shared_devices = true"
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    dir_a.mkdir()
    dir_b.mkdir()
    seeded = make_devices(dir_a, ["seed-1", "seed-2"])
    make_devices(dir_b, [])
    # Before any node joined, the CLI has nothing to change (and says why).
    early = cli("devices", "add", "early", "--redis", redis.url)
    assert early.returncode == 2 and "no node with [cluster] shared_devices" in early.stderr
    a = Node(dir_a, "A", redis.url, extra=shared)
    nodes.append(a)
    await wait_cluster([a], ["A"])
    b = Node(dir_b, "B", redis.url, extra=shared)
    nodes.append(b)
    await wait_cluster([a, b], ["A", "B"])

    # A seeded the shared devices with its file; B, whose file was empty, has them.
    assert await registers(b, "seed-1", seeded["seed-1"])
    assert set(DeviceRegistry.load(dir_b / "devices.toml")) == {"seed-1", "seed-2"}
    listed = cli("devices", "list", "--redis", redis.url)
    assert listed.returncode == 0 and listed.stdout.split() == ["seed-1", "seed-2"]

    # Added through A's API: B lets it register, with no restart and no SIGHUP.
    status, body = await ahttp("POST", a.url("/api/devices"), {"id": "new-1"})
    assert status == 201
    await eventually(lambda: registers(b, "new-1", body["secret"]), "B takes a device added on A")

    # Rotated from the command line: the session on the old secret, on B, ends revoked.
    async with open_device(
        "127.0.0.1", "new-1", body["secret"], tcp_port=b.tcp, register_timeout=5
    ) as dev:
        rotated = cli("devices", "rotate", "new-1", "--redis", redis.url)
        assert rotated.returncode == 0, rotated.stderr
        with trio.fail_after(30):
            await dev.ended.wait()
        assert dev.end_reason == "revoked"
    new_secret = secret_from(rotated.stdout)
    assert await registers(a, "new-1", new_secret)
    assert not await registers(b, "new-1", body["secret"])
    assert await registers(b, "new-1", new_secret)

    # Removed while B is away: B learns it when it joins again (and its cache forgets it).
    assert b.stop() == 0
    removed = cli("devices", "remove", "seed-2", "--redis", redis.url)
    assert removed.returncode == 0, removed.stderr
    status, _ = await ahttp("DELETE", a.url("/api/devices/seed-1"))
    assert status == 200
    b2 = Node(dir_b, "B", redis.url, extra=shared)
    nodes.append(b2)
    await wait_cluster([a, b2], ["A", "B"])
    assert not await registers(b2, "seed-2", seeded["seed-2"])
    assert set(DeviceRegistry.load(dir_b / "devices.toml")) == {"new-1"}
    await eventually(
        lambda: set(DeviceRegistry.load(dir_a / "devices.toml")) == {"new-1"}, "A's cache"
    )
    assert cli("devices", "list", "--redis", redis.url).stdout.split() == ["new-1"]
    # The CLI's refusals are clear.
    again = cli("devices", "add", "new-1", "--redis", redis.url)
    assert again.returncode == 2 and "already exists" in again.stderr
    gone = cli("devices", "rotate", "seed-2", "--redis", redis.url)
    assert gone.returncode == 2 and "no device" in gone.stderr
    _, metrics = await trio.to_thread.run_sync(
        lambda: (0, urllib.request.urlopen(a.url("/metrics"), timeout=10).read().decode())
    )
    assert "collector_cluster_credentials_written_total 2" in metrics


class Sentinel:
    """A primary, its replica and one Sentinel watching them (quorum 1, down after 1 s)."""

    def __init__(self, tmp: Path) -> None:
        self.primary = RedisServer(tmp / "primary")
        self.replica = RedisServer(
            tmp / "replica", "--replicaof", "127.0.0.1", str(self.primary.port)
        )
        deadline = time.monotonic() + 30
        while b"master_link_status:up" not in self.replica.info("replication"):
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        self.port = free_port()
        conf = tmp / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {tmp}\n"
            f"sentinel monitor svc 127.0.0.1 {self.primary.port} 1\n"
            "sentinel down-after-milliseconds svc 1000\nsentinel failover-timeout svc 10000\n"
        )
        self.proc = subprocess.Popen(
            [REDIS, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        while b"slaves=1" not in self.ask(b"INFO sentinel"):
            assert self.proc.poll() is None, "the Sentinel exited"
            assert time.monotonic() < deadline, "the Sentinel does not see the replica"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/svc"

    def ask(self, command: bytes) -> bytes:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(command + b"\r\n")
                time.sleep(0.05)
                return s.recv(65536)
        return b""

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        for server in (self.replica, self.primary):
            if server.proc.poll() is None:
                server.stop()


async def test_nodes_reach_redis_through_sentinel_and_follow_a_failover(tmp_path, nodes):
    """`redis+sentinel://`: the nodes ask Sentinel for the primary; when the primary is killed
    and Sentinel promotes the replica, they join the new primary and the bus works again."""
    sentinel = Sentinel(tmp_path)
    try:
        secrets = make_devices(tmp_path, ["before", "after"])
        a, b = (Node(tmp_path, name, sentinel.url) for name in "AB")
        nodes += [a, b]
        await wait_cluster([a, b], ["A", "B"])

        async def seen_on_b(device: str) -> bool:
            status, body = await ahttp("GET", b.url(f"/api/devices/{device}"))
            return status == 200 and body.get("online") and body.get("node") == "A"

        async with open_device("127.0.0.1", "before", secrets["before"], tcp_port=a.tcp):
            await eventually(lambda: seen_on_b("before"), "B sees a device of A")
            os.kill(sentinel.primary.proc.pid, signal.SIGKILL)
            sentinel.primary.proc.wait()
            replica = sentinel.replica

            def promoted() -> bool:
                return b"role:master" in replica.info("replication")

            await eventually(promoted, "Sentinel promotes the replica", within=60)

            async def rejoined(node: Node) -> bool:
                c = (await health(node)).get("cluster", {})
                return c.get("redis") == "up" and "redis: up again" in node.text()

            for node in (a, b):
                await eventually(lambda n=node: rejoined(n), f"{node.name} rejoins", within=60)
            async with open_device("127.0.0.1", "after", secrets["after"], tcp_port=a.tcp):
                await eventually(lambda: seen_on_b("after"), "B sees a device of A after")
    finally:
        sentinel.stop()
