"""Shared helpers for the integration tests."""

from __future__ import annotations

import json
import secrets
from typing import Any

import trio

from collector.app import Collector
from collector.config import Config
from collector.devices import DeviceRegistry
from collector.wire import crypto

EPOCH = 1_767_225_600.0  # the wall clock that tests see at trio time 0


def wall() -> float:
    return EPOCH + trio.current_time()


SECRETS = {f"dev-{i}": f"secret-{i}" for i in range(1, 9)} | {
    "udp-1": "udp-secret-1",
    "udp-2": "udp-secret-2",
}


class EventLog:
    """A listener that keeps everything it is told."""

    def __init__(self) -> None:
        self.telemetry: list[Any] = []
        self.events: list[Any] = []

    def on_telemetry(self, batch):
        self.telemetry.extend(batch)

    def on_event(self, event):
        self.events.append(event)

    def of(self, cls, **match):
        return [
            e
            for e in self.events
            if isinstance(e, cls) and all(getattr(e, k) == v for k, v in match.items())
        ]


async def start_collector(
    nursery: trio.Nursery, devices=None, **overrides: Any
) -> tuple[Collector, EventLog]:
    overrides.setdefault("http_port", None)
    ingest = overrides.pop("ingest", True)
    clock = overrides.pop("wall", wall)
    cfg = Config(host="127.0.0.1", tcp_port=0, udp_port=0, **overrides)
    log = EventLog()
    collector = Collector(
        cfg,
        devices if devices is not None else DeviceRegistry(SECRETS),
        wall=clock,
        listeners=[log],
        ingest=ingest,
    )
    await nursery.start(collector.serve)
    return collector, log


class Lines:
    """A raw control connection for tests that misbehave on purpose."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, collector: Collector) -> Lines:
        return cls(await trio.open_tcp_stream("127.0.0.1", collector.tcp_address[1]))

    async def send(self, msg: Any) -> None:
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\n"
        await self.stream.send_all(data)

    async def recv(self) -> dict | None:
        while b"\n" not in self.buf:
            try:
                chunk = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def register(self, device_id: str, secret: str | None = None) -> dict:
        """Register by hand; a welcome gets the session's keys added: `key` (device to
        collector, what a device seals with) and `key_in` (collector to device)."""
        challenge = await self.recv()
        assert challenge is not None and challenge["type"] == "challenge"
        keys = crypto.DeviceKeys(secret or SECRETS[device_id])
        cnonce = secrets.token_hex(16)
        proof = crypto.registration_proof(keys, device_id, challenge["nonce"], cnonce)
        await self.send(
            {"type": "register", "device_id": device_id, "cnonce": cnonce, "proof": proof}
        )
        welcome = await self.recv()
        assert welcome is not None
        if welcome["type"] == "welcome":
            welcome["key"], welcome["key_in"] = crypto.session_keys(
                keys.secret,
                device_id,
                bytes.fromhex(challenge["nonce"]),
                bytes.fromhex(cnonce),
                welcome["session_id"],
            )
        return welcome


async def udp_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock


async def exchange(sock, collector: Collector, data: bytes, *, wait: float = 0.5) -> bytes | None:
    """Send a datagram to the collector; return its answer, or None if none came."""
    await sock.sendto(data, collector.udp_address)
    with trio.move_on_after(wait):
        return await sock.recv(65536)
    return None


async def http(
    collector: Collector, method: str, path: str, body: Any = None, token: str | None = None
):
    """A minimal HTTP/1.1 client for the tests: returns (status, headers, body bytes)."""
    import h11

    stream = await trio.open_tcp_stream("127.0.0.1", collector.http_address[1])
    conn = h11.Connection(h11.CLIENT)
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = [("host", "test"), ("connection", "close"), ("content-length", str(len(data)))]
    if token:
        headers.append(("authorization", f"Bearer {token}"))
    out = conn.send(h11.Request(method=method, target=path, headers=headers))
    out += conn.send(h11.Data(data=data)) if data else b""
    out += conn.send(h11.EndOfMessage())
    async with stream:
        await stream.send_all(out)
        status, resp_headers, chunks = 0, {}, []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:  # closed without a (complete) answer
                break
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    return status, resp_headers, b"".join(chunks)


async def api(
    collector: Collector, method: str, path: str, body: Any = None, token: str | None = None
):
    status, _, raw = await http(collector, method, path, body, token)
    return status, json.loads(raw) if raw else None


async def ws_handshake(collector: Collector, *, rcvbuf: int = 4096) -> tuple[Any, Any]:
    """A raw WebSocket client of /stream on a socket with a small receive buffer: the
    handshake done with wsproto directly (so no library reads on its behalf), nothing more.
    Returns the trio socket and the wsproto connection."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", collector.http_address[1]))
    ws = WSConnection(ConnectionType.CLIENT)
    await sock.send(ws.send(Request(host="test", target="/stream")))
    while not any(isinstance(e, AcceptConnection) for e in ws.events()):
        ws.receive_data(await sock.recv(4096))
    return sock, ws
