"""The UDP ingest server: moves datagrams from the socket to `Ingest` in drained batches.

One `await` per datagram costs a trio checkpoint (about 9 us here) and caps ingest near 50k
datagrams/s. Instead the loop waits for readability once, then reads without blocking until the
socket is empty (or a batch limit is reached, so other tasks still get their turn).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from typing import Any

import trio

from collector.core.ingest import Ingest
from collector.core.load import BusyMeter
from collector.servers.serving import bind_error

log = logging.getLogger("collector.udp")

BATCH_LIMIT = 256
SMALL_BATCH = 16
#: Linux's SO_RCVBUFFORCE (root may exceed net.core.rmem_max); Python does not name it.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)
RECV_SIZE = 65536  # smaller buffers silently truncate larger datagrams


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped for this socket (its receive buffer was full), from the
    `drops` column of /proc/net/udp; None where that is not available."""
    try:
        inode = os.fstat(sock.fileno()).st_ino
    except OSError:
        return None
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) > 12 and fields[9] == str(inode):
                        return int(fields[12])
        except (OSError, StopIteration, ValueError):
            continue
    return None


def set_rcvbuf(sock: socket.socket, rcvbuf: int) -> None:
    """Ask for a receive buffer of `rcvbuf` bytes: SO_RCVBUFFORCE (root) may exceed
    net.core.rmem_max; without it, SO_RCVBUF (capped by the kernel)."""
    try:
        if SO_RCVBUFFORCE is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)


def open_udp_socket(host: str, port: int, rcvbuf: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if rcvbuf:
            set_rcvbuf(sock, rcvbuf)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise bind_error(exc, "UDP", host, port) from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_udp(
    ingest: Ingest,
    host: str,
    port: int,
    *,
    rcvbuf: int = 8 * 1024 * 1024,
    coalesce: float = 0.001,
    sock: socket.socket | None = None,
    load: BusyMeter | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Receive datagrams until cancelled. Reports the bound address through `task_status`.

    The socket stays open (and attached to `ingest` for replies) until this task exits.

    After a small batch, and only while the collector is busy (its thread used more than half
    a core lately: `collector.core.load`), the loop waits `coalesce` seconds before it reads again: that
    turns a wake-up per datagram (tens of microseconds each) into a wake-up per millisecond when
    wake-ups are what the CPU is spent on. An idle or lightly loaded collector never waits, so a
    datagram costs no added latency; under heavy load batches are full and it never waits
    either; the kernel holds what arrives meanwhile.

    `load`: the collector's measure of busy (shared with the stream, which batches by it too).

    `sock`: a socket bound already (a worker's, from the parent that steers datagrams to it),
    instead of binding `host`:`port`.
    """
    if sock is None:
        sock = open_udp_socket(host, port, rcvbuf)
    else:
        sock.setblocking(False)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    ingest.sock = sock
    address = sock.getsockname()
    log.info(
        "UDP ingest on %s:%d (receive buffer: asked %d KiB, the kernel reports %d KiB)",
        address[0],
        address[1],
        rcvbuf // 1024,
        granted // 1024,
    )
    try:
        task_status.started(address)
        recvfrom = sock.recvfrom
        handle = ingest.handle_datagram
        report = ingest.boundary.report
        meter = load if load is not None else BusyMeter()
        while True:
            await trio.lowlevel.wait_readable(sock)
            ingest.begin_batch(trio.current_time())
            count = 0
            for _ in range(BATCH_LIMIT):
                try:
                    data, addr = recvfrom(RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. an ICMP error queued on the socket
                    if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        raise
                    continue
                try:
                    handle(data, addr)
                except Exception as exc:  # the boundary of one datagram: it costs only itself
                    report("datagram", exc, f"from {addr}")
                count += 1
            ingest.end_batch()
            if count < SMALL_BATCH and coalesce > 0 and meter.busy(trio.current_time()):
                await trio.sleep(coalesce)
    finally:
        ingest.sock = None
        sock.close()
