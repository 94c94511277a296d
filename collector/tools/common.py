"""Helpers shared by the tools: ports, /proc figures, Prometheus scrapes, waiting for a server,
and a throwaway Mosquitto broker for the reference runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_tcp(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def proc_stat(pid: int) -> tuple[float, float, int]:
    """(wall time, CPU seconds so far, RSS bytes) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return time.time(), cpu, int(fields[21]) * PAGE_SIZE


def rcvbuf_errors() -> int:
    """The system-wide UDP receive-buffer drop counter (/proc/net/snmp RcvbufErrors)."""
    lines = [
        line.split()
        for line in Path("/proc/net/snmp").read_text().splitlines()
        if line.startswith("Udp:")
    ]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def scrape(port: int, *, sum_devices: bool = False) -> dict[str, float]:
    """A collector's /metrics as {'name{label=value,...}': value}; with `sum_devices` the
    per-device series are summed into one figure each (keyed by the bare name)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if sum_devices and s.name.startswith("collector_device_"):
                out[s.name] = out.get(s.name, 0.0) + s.value
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


@contextlib.contextmanager
def mosquitto() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A Mosquitto broker on a free 127.0.0.1 port, for the duration of the block."""
    broker = mosquitto_path()
    if broker is None:
        raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    conf = Path(tempfile.mkdtemp(prefix="bench-mqtt-")) / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 10000000\n"
    )
    proc = subprocess.Popen(
        [broker, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_tcp(port)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(conf.parent, ignore_errors=True)


def open_fds(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 for fewer than two)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of its own on a free port (nothing saved), and its URL."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_tcp(port)
    return proc, f"redis://127.0.0.1:{port}/0"


async def read_stream(
    port: int,
    on_message: Callable[[float, dict[str, Any]], None],
    task_status: Any = None,
    subscribe: dict[str, Any] | None = None,
    only: Collection[str] | None = None,
) -> None:
    """A dashboard for the benchmarks: subscribe on ws://127.0.0.1:`port`/stream, then call
    `on_message(received_at, message)` for every message after the hello. It runs until
    cancelled; the collector closing the stream, or refusing it, is an error (RuntimeError).

    wsproto for the handshake; then the server's frames (never masked: a header of 2 to 10
    bytes and the payload) are read by hand, every message of a read handled at once, as the
    MQTT subscribers of the benchmarks read theirs. trio-websocket's task switch and channel
    per message, and wsproto's events (about 20 us a frame), would make this process, not the
    collector, what the latency measures. Pings are answered. With `only`, messages of other
    types are not decoded: the once-a-second `stats` message (about 40 kB for 200 devices),
    decoded by 10 dashboards in one process, held up the readings behind it by a few
    milliseconds, and the tail latency measured was that."""
    import json

    import trio
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (
        CloseConnection,
        Pong,
        RejectConnection,
        Request,
        TextMessage,
    )

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="bench", target="/stream")))
    hello = False  # wsproto reads up to the end of the first message, the hello
    while not hello:
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError("the collector closed the connection during the handshake")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, RejectConnection):
                raise RuntimeError(f"the collector refused the stream: HTTP {event.status_code}")
            if isinstance(event, CloseConnection):
                raise RuntimeError(f"the collector closed the stream: {event.code} {event.reason}")
            hello = hello or (isinstance(event, TextMessage) and event.message_finished)
    sub = subscribe if subscribe is not None else {"type": "subscribe", "history": 0}
    await stream.send_all(ws.send(TextMessage(data=json.dumps(sub))))
    if task_status is not None:
        task_status.started()
    wanted = None if only is None else {kind.encode() for kind in only}
    parts: list[bytes] = []
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:  # a measuring dashboard that stops quietly would bias what it measures
            raise RuntimeError("the collector closed the stream without a close frame")
        now = time.time()
        buf = buf + data if buf else data
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first, length = buf[pos], buf[pos + 1]
            if length & 0x80:
                raise RuntimeError("a masked frame from the collector")
            head = 2
            if length == 126:
                head, length = 4, int.from_bytes(buf[pos + 2 : pos + 4], "big")
            elif length == 127:
                head, length = 10, int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if end - pos < head + length:
                break  # the rest of the frame comes with the next read
            payload = buf[pos + head : pos + head + length]
            pos += head + length
            opcode = first & 0x0F
            if opcode == 0x9:  # ping
                await stream.send_all(ws.send(Pong(payload=payload)))
                continue
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if payload else None
                raise RuntimeError(f"the collector closed the stream: {code} {payload[2:]!r}")
            if opcode == 0xA:  # pong
                continue
            if opcode not in (0x0, 0x1):
                raise RuntimeError(f"a frame of opcode {opcode} from the collector")
            if not first & 0x80:  # a message in several frames
                parts.append(payload)
                continue
            if parts:
                parts.append(payload)
                payload = b"".join(parts)
                parts.clear()
            if wanted is not None and payload.startswith(b'{"type":"'):  # compact JSON
                if payload[9 : payload.find(b'"', 9)] not in wanted:
                    continue
            on_message(now, json.loads(payload))
        buf = buf[pos:]
