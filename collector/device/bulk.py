"""Registering many UDP-only devices from one plain (blocking) socket, for the load tools.

A real device has a socket of its own; a load generator that plays thousands of them from one
socket matches each COOKIE and WELCOME to its HELLO by the HELLO nonce they echo
(docs/PROTOCOL.md 3.5), a few hundred devices at a time.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

import attrs

from collector.wire import datagram as dg
from collector.wire.crypto import Aead, DeviceKeys, session_keys


@attrs.define
class BulkSession:
    device_id: str
    session_id: int
    aead_send: Aead  # device-to-collector
    aead_recv: Aead
    seq: int = 0

    def seal(
        self,
        type: dg.DatagramType,
        payload: bytes,
        *,
        when_us: int = 0,
        flags: dg.Flag = dg.Flag.NONE,
    ) -> bytes:
        self.seq += 1
        return dg.seal_datagram(
            self.aead_send, type, self.session_id, self.seq, when_us, payload, flags=flags
        )


def register_udp(
    sock: socket.socket,
    target: tuple[str, int],
    devices: Mapping[str, str],
    *,
    batch: int = 200,
    timeout: float = 2.0,
    between: Callable[[], None] | None = None,
    rounds: int = 10,
) -> dict[str, BulkSession]:
    """HELLO, COOKIE, HELLO, WELCOME for every device; returns the sessions that registered.
    `between` runs between batches (to keep the sessions already open alive)."""
    pending = dict(devices)
    out: dict[str, BulkSession] = {}
    sock.settimeout(0.05)
    for _ in range(rounds):
        if not pending:
            break
        chunk = list(pending.items())[:batch]
        waiting: dict[bytes, tuple[str, DeviceKeys, bytes, Aead, Aead]] = {}
        for device_id, secret in chunk:
            keys = DeviceKeys(secret)
            cnonce = os.urandom(16)
            out_aead, in_aead = Aead(keys.hello_d2c), Aead(keys.hello_c2d)
            hello = dg.encode_hello(out_aead, device_id, cnonce)
            waiting[dg.parse_hello_untrusted(hello).nonce] = (
                device_id,
                keys,
                cnonce,
                out_aead,
                in_aead,
            )
            sock.sendto(hello, target)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            if between is not None:
                between()
            try:
                data = sock.recv(65536)
            except (TimeoutError, BlockingIOError, InterruptedError):
                continue
            try:
                h = dg.decode_header_untrusted(data, max_size=65536)
                echo = dg.answered_hello_untrusted(data)
                if echo not in waiting:
                    continue
                device_id, keys, cnonce, out_aead, in_aead = waiting[echo]
                if h.type == dg.DatagramType.COOKIE:
                    cookie = dg.open_cookie_untrusted(in_aead, data, echo)
                    hello = dg.encode_hello(out_aead, device_id, cnonce, cookie)
                    del waiting[echo]
                    waiting[dg.parse_hello_untrusted(hello).nonce] = (
                        device_id,
                        keys,
                        cnonce,
                        out_aead,
                        in_aead,
                    )
                    sock.sendto(hello, target)
                elif h.type == dg.DatagramType.WELCOME:
                    sid, snonce = dg.welcome_nonce_untrusted(data)
                    d2c, c2d = session_keys(keys.secret, device_id, snonce, cnonce, sid)
                    dg.open_welcome_untrusted(Aead(c2d), data)
                    del waiting[echo]
                    out[device_id] = BulkSession(device_id, sid, Aead(d2c), Aead(c2d))
                    pending.pop(device_id, None)
            except dg.DatagramError:
                continue
    return out
