"""Print the test vectors of docs/PROTOCOL.md (markdown), computed by the collector's own code.

    collector protocol-vectors > /tmp/vectors.md

The test suite parses the vectors back out of docs/PROTOCOL.md and checks every byte, so the
document and the code cannot drift apart.
"""

from __future__ import annotations

import json
from typing import Any

from collector.wire import crypto
from collector.wire import datagram as dg
from collector.wire.crypto import COLLECTOR_TO_DEVICE, DEVICE_TO_COLLECTOR, Aead, DeviceKeys
from collector.wire.datagram import DatagramType, Flag

SECRET = "correct horse battery staple"
DEVICE = "greenhouse-1"
NONCE = "00112233445566778899aabbccddeeff"  # the collector's (TCP challenge, or WELCOME)
CNONCE = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # the device's
SESSION_ID = 0x5EED0001
TS = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds
HELLO_NONCE = bytes.fromhex("4849204e4f4e43452d313a29")  # "HI NONCE-1:)"
HELLO2_NONCE = bytes.fromhex("4849204e4f4e43452d323a29")  # "HI NONCE-2:)"
COOKIE_NONCE = bytes.fromhex("434f4f4b4945204e4f4e4345")  # "COOKIE NONCE"
COOKIE = bytes.fromhex("c0c1c2c3c4c5c6c7c8c9cacbcccdcecf")


def keys() -> DeviceKeys:
    return DeviceKeys(SECRET)


def session() -> tuple[bytes, bytes]:
    return crypto.session_keys(
        keys().secret, DEVICE, bytes.fromhex(NONCE), bytes.fromhex(CNONCE), SESSION_ID
    )


def hexdump(data: bytes) -> str:
    return "\n".join(
        "          " * (i > 0)
        + " ".join(data[j : j + 4].hex() for j in range(i, min(i + 16, len(data)), 4))
        for i in range(0, len(data), 16)
    )


READINGS = [
    ("temperature", "float", 21.5),
    ("count", "int", 42),
    ("door_open", "bool", False),
    ("status", "string", "ok"),
]

#: name, direction, type, flags, seq, payload description
SESSION_CASES = [
    ("heartbeat", DEVICE_TO_COLLECTOR, DatagramType.HEARTBEAT, 0, 1, {"uptime_s": 3600}),
    ("heartbeat-ack-requested", DEVICE_TO_COLLECTOR, DatagramType.HEARTBEAT, 1, 2, {"uptime_s": 3601}),
    ("telemetry", DEVICE_TO_COLLECTOR, DatagramType.TELEMETRY, 0, 3, {"readings": READINGS}),
    ("ack-from-collector", COLLECTOR_TO_DEVICE, DatagramType.ACK, 0, 1, {"acked_seq": 2}),
    ("command", COLLECTOR_TO_DEVICE, DatagramType.COMMAND, 1, 2, {"id": "c000001", "name": "set_rate", "args": {"rate": 2}}),
    ("ack-with-result", DEVICE_TO_COLLECTOR, DatagramType.ACK, 0, 4, {"acked_seq": 2, "result": {"id": "c000001", "ok": True, "result": {"rate": 2.0}}}),
    ("goodbye", DEVICE_TO_COLLECTOR, DatagramType.GOODBYE, 0, 5, {"reason": "closed"}),
]  # fmt: skip


def encode_payload(typ: DatagramType, p: dict) -> bytes:
    """A payload from the JSON-able description used in the vectors."""
    if typ is DatagramType.HEARTBEAT:
        return dg.encode_heartbeat_payload(p["uptime_s"])
    if typ is DatagramType.TELEMETRY:
        return dg.encode_readings({name: value for name, _, value in p["readings"]})
    if typ is DatagramType.ACK:
        return dg.encode_ack_payload(p["acked_seq"], p.get("result"))
    if typ is DatagramType.COMMAND:
        return dg.encode_command_payload(p["id"], p["name"], p["args"])
    if typ is DatagramType.GOODBYE:
        return dg.encode_goodbye_payload(p["reason"])
    raise ValueError(typ)


def session_vectors() -> list[tuple[str, dict, bytes, bytes, bytes]]:
    """(name, fields, key, plaintext payload, datagram) for each session datagram."""
    d2c, c2d = session()
    out = []
    for name, direction, typ, flags, seq, payload in SESSION_CASES:
        key = d2c if direction == DEVICE_TO_COLLECTOR else c2d
        fields = {
            "type": typ.name,
            "direction": "device-to-collector"
            if direction == DEVICE_TO_COLLECTOR
            else "collector-to-device",
            "flags": flags,
            "session_id": SESSION_ID,
            "seq": seq,
            "timestamp_us": TS,
            "payload": payload,
        }
        plain = encode_payload(typ, payload)
        data = dg.seal_datagram(
            Aead(key), typ, SESSION_ID, seq, TS, plain, flags=Flag(flags), direction=direction
        )
        out.append((name, fields, key, plain, data))
    return out


def registration_vectors() -> list[tuple[str, dict, bytes, bytes, bytes]]:
    k = keys()
    cnonce = bytes.fromhex(CNONCE)
    hello1 = dg.encode_hello(Aead(k.hello_d2c), DEVICE, cnonce, dg.NO_COOKIE, TS, HELLO_NONCE)
    cookie = dg.encode_cookie(Aead(k.hello_c2d), COOKIE, HELLO_NONCE, TS, COOKIE_NONCE)
    hello2 = dg.encode_hello(Aead(k.hello_d2c), DEVICE, cnonce, COOKIE, TS, HELLO2_NONCE)
    welcome_fields = dg.Welcome(5000, 15000, 1200, {"report_interval": 1.0})
    _, c2d = session()
    welcome = dg.encode_welcome(
        Aead(c2d), SESSION_ID, bytes.fromhex(NONCE), HELLO2_NONCE, welcome_fields, TS
    )
    welcome_plain = dg.WELCOME_FIELDS.pack(5000, 15000, 1200, 0) + b'{"report_interval":1.0}'
    assert dg.open_welcome_untrusted(Aead(c2d), welcome) == welcome_fields
    return [
        ("hello", {"type": "HELLO", "device_id": DEVICE, "nonce": HELLO_NONCE.hex(), "client_nonce": CNONCE, "cookie": dg.NO_COOKIE.hex(), "timestamp_us": TS}, k.hello_d2c, cnonce + dg.NO_COOKIE, hello1),
        ("cookie", {"type": "COOKIE", "hello_nonce": HELLO_NONCE.hex(), "nonce": COOKIE_NONCE.hex(), "cookie": COOKIE.hex(), "timestamp_us": TS}, k.hello_c2d, COOKIE, cookie),
        ("hello-with-cookie", {"type": "HELLO", "device_id": DEVICE, "nonce": HELLO2_NONCE.hex(), "client_nonce": CNONCE, "cookie": COOKIE.hex(), "timestamp_us": TS}, k.hello_d2c, cnonce + COOKIE, hello2),
        ("welcome", {"type": "WELCOME", "session_id": SESSION_ID, "hello_nonce": HELLO2_NONCE.hex(), "server_nonce": NONCE, "heartbeat_ms": 5000, "timeout_ms": 15000, "max_datagram": 1200, "config": {"report_interval": 1.0}, "timestamp_us": TS}, c2d, welcome_plain, welcome),
    ]  # fmt: skip


def render() -> str:
    k = keys()
    d2c, c2d = session()
    parts = [
        "```text",
        "vector: keys",
        f"secret        {json.dumps(SECRET)}",
        f"device_id     {DEVICE}",
        f"nonce         {NONCE}",
        f"cnonce        {CNONCE}",
        f"session_id    {SESSION_ID}",
        f"auth_key      {k.auth.hex()}",
        f"hello_d2c     {k.hello_d2c.hex()}",
        f"hello_c2d     {k.hello_c2d.hex()}",
        f"proof         {crypto.registration_proof(k, DEVICE, NONCE, CNONCE)}",
        f"session_d2c   {d2c.hex()}",
        f"session_c2d   {c2d.hex()}",
        "```",
        "",
    ]
    for name, fields, key, plain, data in registration_vectors() + session_vectors():
        parts += [
            f"**{name}** ({len(data)} bytes)",
            "",
            "```text",
            f"vector: {name}",
            f"key       {key.hex()}",
            f"fields    {json.dumps(fields)}",
            f"plain     {plain.hex() or '(empty)'}",
            f"datagram  {hexdump(data)}",
            "```",
            "",
        ]
    return "\n".join(parts)


def build_parser(prog: str = "collector protocol-vectors") -> Any:
    from collector.tools import options

    return options.parser(prog, __doc__)


def main(argv: list[str] | None = None, prog: str = "collector protocol-vectors") -> int:
    from collector.tools import options

    build_parser(prog).parse_args(argv)
    return options.run_main(prog, lambda: print(render()) or 0)


if __name__ == "__main__":
    import sys

    sys.exit(main())
