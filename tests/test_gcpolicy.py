"""Freezing what survives a long full collection (collector.gcpolicy), and why it is safe: a
device's whole life leaves no reference cycle, so nothing frozen is ever garbage that only the
cycle collector could free."""

from __future__ import annotations

import collections
import gc
import json
import socket

import h11
import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

from collector.device.bulk import register_udp
from collector.device.client import open_device
from collector.devices import DeviceRegistry
from collector.gcpolicy import GcPolicy
from collector.servers.tls import client_context
from collector.wire import datagram as dg

from .helpers import SECRETS as DEVICE_SECRETS
from .helpers import Lines, http, start_collector


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def thawed():
    yield
    gc.unfreeze()


def test_a_long_full_collection_freezes_what_survived_it(thawed):
    gc.unfreeze()  # a collector of an earlier test may have frozen this process's objects
    clock = FakeClock()
    lines = []
    policy = GcPolicy(0.1, clock=clock, schedule=lines.append)
    policy._callback("start", {"generation": 1})
    clock.now += 5.0
    policy._callback("stop", {"generation": 1})  # a young collection: not timed
    assert policy.full_collections == 0 and policy.freezes == 0
    policy._callback("start", {"generation": 2})
    clock.now += 0.05
    policy._callback("stop", {"generation": 2})  # short: nothing frozen
    assert (policy.full_collections, policy.freezes, gc.get_freeze_count()) == (1, 0, 0)
    policy._callback("start", {"generation": 2})
    clock.now += 0.3
    policy._callback("stop", {"generation": 2})
    assert policy.freezes == 1 and gc.get_freeze_count() > 0
    assert policy.pause_max == pytest.approx(0.3) and policy.pause_total == pytest.approx(0.35)
    assert len(lines) == 1  # scheduled once, to run outside the callback:
    full = gc.get_stats()[2]["collections"]
    lines[0]()
    # a full collection over what is left, so that Python's count of what reached the oldest
    # generation starts again from what is not frozen
    assert gc.get_stats()[2]["collections"] == full + 1
    assert policy.frozen() == gc.get_freeze_count()  # counted once, there, not per scrape
    policy._callback("start", {"generation": 2})
    clock.now += 0.2
    policy._callback("stop", {"generation": 2})
    assert policy.freezes == 2 and len(lines) == 2


def test_zero_never_freezes(thawed):
    gc.unfreeze()
    clock = FakeClock()
    policy = GcPolicy(0, clock=clock)
    policy._callback("start", {"generation": 2})
    clock.now += 10.0
    policy._callback("stop", {"generation": 2})
    assert policy.full_collections == 1 and policy.freezes == 0 and gc.get_freeze_count() == 0


def test_install_times_real_collections():
    policy = GcPolicy(0)
    policy.install()
    policy.install()  # once only
    try:
        gc.collect()
        gc.collect()
    finally:
        policy.uninstall()
    assert policy.full_collections == 2 and policy.pause_max > 0
    assert policy._callback not in gc.callbacks


N_UDP = 300
N_TCP = 20
SECRETS = {f"life-{i}": f"life-secret-{i}" for i in range(N_UDP)}


async def test_a_devices_whole_life_leaves_no_reference_cycle(nursery):
    collector, _ = await start_collector(
        nursery,
        devices=DeviceRegistry(SECRETS),
        heartbeat_interval=1.0,
        timeout=3.0,
        ratelimit_per_source=100_000,
        http_port=0,
    )
    await trio.sleep(0.2)
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        target = ("127.0.0.1", collector.udp_address[1])

        def lives() -> int:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sessions = register_udp(sock, target, SECRETS)
                for s in sessions.values():
                    sock.sendto(
                        s.seal(dg.DatagramType.HEARTBEAT, dg.encode_heartbeat_payload(1)), target
                    )
                    sock.sendto(
                        s.seal(dg.DatagramType.TELEMETRY, dg.encode_readings({"t": 1.5})), target
                    )
                return len(sessions)

        registered = await trio.to_thread.run_sync(lives)
        for i in range(N_TCP):  # registered again over TCP: the UDP session is superseded ...
            lines = await Lines.connect(collector)
            welcome = await lines.register(f"life-{i}", SECRETS[f"life-{i}"])
            assert welcome["type"] == "welcome"
            if i % 2:
                await lines.send({"type": "goodbye"})  # ... and closed, or just dropped
            await lines.stream.aclose()
        status, _, _ = await http(collector, "GET", "/api/devices")
        assert status == 200
        with trio.fail_after(20):
            while collector.registry.online:  # the rest time out  # noqa: ASYNC110
                await trio.sleep(0.1)
        ended = collector.registry.ended_by_reason
        assert registered == N_UDP and collector.ingest.rejected["malformed"] == 0
        assert ended["timeout"] > 0 and ended["superseded"] + ended["closed"] > 0
        assert sum(ended.values()) == collector.registry.opened >= N_UDP + N_TCP
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    # One cycle per device would be hundreds of objects; what is left is the test's own.
    assert found < N_UDP // 10, kinds.most_common(20)


class Garbage:
    """Counts what only the cycle collector could free, made inside the block.

    `beyond(name)` leaves out what is reachable from the garbage objects of one type: trio's
    SSLStream is in a cycle of its own (it holds `_Once(self._do_handshake)`, a bound method of
    itself), so every TLS connection leaves one, whatever the collector does."""

    def __enter__(self) -> Garbage:
        self.enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            gc.set_debug(gc.DEBUG_SAVEALL)
            self.found = gc.collect()
            self.objects = list(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            if self.enabled:
                gc.enable()

    def beyond(self, *type_names: str) -> collections.Counter[str]:
        """What is left of the garbage without what objects of these types reach."""
        ids = {id(o) for o in self.objects}
        seen: set[int] = set()
        todo = [o for o in self.objects if type(o).__name__ in type_names]
        while todo:
            o = todo.pop()
            if id(o) in seen:
                continue
            seen.add(id(o))
            todo.extend(r for r in gc.get_referents(o) if id(r) in ids and id(r) not in seen)
        return collections.Counter(type(o).__name__ for o in self.objects if id(o) not in seen)


async def tls_requests(port: int, ctx, requests: list[tuple[str, str, bytes]]) -> list[tuple]:
    """Several HTTP/1.1 requests on one kept-alive TLS connection: (status, body) of each."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx)
    conn = h11.Connection(h11.CLIENT)
    answers = []
    async with stream:
        for method, target, body in requests:
            headers = [("host", "test"), ("content-length", str(len(body)))]
            headers.append(("authorization", "Bearer c-token"))
            out = conn.send(h11.Request(method=method, target=target, headers=headers))
            await stream.send_all(
                out + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            )
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                assert not isinstance(event, h11.ConnectionClosed), answers
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    answers.append((event.status_code, bytearray()))
                elif isinstance(event, h11.Data):
                    answers[-1][1].extend(event.data)
            conn.start_next_cycle()
    return [(status, json.loads(body)) for status, body in answers]


async def test_connections_that_end_badly_leave_no_reference_cycle(nursery, tmp_path):
    """Over TLS: devices that take a command, control connections ended by a protocol error,
    dashboards that leave or are closed for not answering pings, kept-alive API requests."""
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(tmp_path / "s.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    ctx = client_context(str(tmp_path / "ca.pem"))
    collector, _ = await start_collector(
        nursery,
        http_port=0,
        tls_cert=str(tmp_path / "s.pem"),
        tls_key=str(tmp_path / "s.pem"),
        command_tokens=("c-token",),
        stream_ping_interval=0.2,
        stream_ping_timeout=0.2,
    )
    tcp, web = collector.tcp_address[1], collector.http_address[1]
    rounds = 12
    await trio.sleep(0.2)

    async def device(i: int) -> None:
        name = f"dev-{i % 3 + 1}"
        async with open_device(
            "127.0.0.1", name, DEVICE_SECRETS[name], tcp_port=tcp, ssl_context=ctx,
            on_command=lambda n, a: {"did": n},
        ) as dev:  # fmt: skip
            await dev.send_readings({"t": 1.0}, ack=True)
            [(status, cmd)] = await tls_requests(
                web, ctx, [("POST", f"/api/devices/{name}/commands", b'{"name": "x"}')]
            )
            assert status == 202
            await collector.commands.get(cmd["id"]).done.wait()
            assert collector.commands.get(cmd["id"]).state == "acked"

    async def bad_line() -> None:
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", tcp, ssl_context=ctx)
        lines = Lines(stream)
        assert (await lines.register("dev-1"))["type"] == "welcome"
        await lines.send(b"{this is not json\n")  # answered, and the connection goes on
        while (msg := await lines.recv()) is not None and msg["type"] != "error":
            pass
        assert msg is not None and msg["code"] == "bad_json"
        await lines.send(b"{" + b" " * collector.config.max_line)  # answered, then closed
        while (msg := await lines.recv()) is not None and msg["type"] != "error":
            pass
        assert msg is not None and msg["code"] == "line_too_long"
        assert await lines.recv() is None
        await stream.aclose()

    async def deaf_dashboard() -> None:
        # A WebSocket handshake, then nothing read or answered: closed by the ping timeout.
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", web, ssl_context=ctx)
        await stream.send_all(
            b"GET /stream?token=c-token HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 101")
        with trio.fail_after(10):
            try:
                while await stream.receive_some(65536):  # the close frame, then the end
                    pass
            except trio.BrokenResourceError:  # closed without a TLS close_notify
                pass
        await stream.aclose()

    async def dashboard() -> None:
        async with open_websocket_url(
            f"wss://127.0.0.1:{web}/stream?token=c-token", ssl_context=ctx
        ) as ws:
            await ws.get_message()

    with Garbage() as garbage:
        for i in range(rounds):
            await device(i)
            await bad_line()
            await dashboard()
            answers = await tls_requests(
                web, ctx, [("GET", "/api/devices", b""), ("GET", "/api/status", b"")]
            )
            assert [status for status, _ in answers] == [200, 200]
        async with trio.open_nursery() as n:
            for _ in range(rounds):
                n.start_soon(deaf_dashboard)
        await trio.sleep(0.5)
    left = garbage.beyond("SSLStream", "DeviceClient")
    assert collector.hub.closed_by_reason["ping timeout"] == rounds
    assert collector.control.errors["line_too_long"] == rounds
    assert collector.commands.by_state["acked"] == rounds
    assert sum(left.values()) < rounds, left.most_common(20)
