#!/usr/bin/env python3
"""Print the test vectors of docs/PROTOCOL.md (markdown), computed by the collector's own code.

    python tools/protocol_vectors.py > /tmp/vectors.md

The test suite parses the vectors back out of docs/PROTOCOL.md and checks every byte, so the
document and the code cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import textwrap

from collector.wire import auth
from collector.wire import datagram as dg
from collector.wire.datagram import DatagramType, Flag

SECRET = "correct horse battery staple"
DEVICE = "greenhouse-1"
NONCE = "00112233445566778899aabbccddeeff"
CNONCE = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
SESSION_ID = 0x5EED0001
TS = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds


def session_key() -> bytes:
    return auth.session_key(SECRET, DEVICE, NONCE, CNONCE, SESSION_ID)


def hexdump(data: bytes) -> str:
    return "\n".join(
        "          " * (i > 0)
        + " ".join(data[j : j + 4].hex() for j in range(i, min(i + 16, len(data)), 4))
        for i in range(0, len(data), 16)
    )


def datagram_vectors() -> list[tuple[str, bytes, dict]]:
    skey = session_key()
    hkey = auth.hello_key(SECRET)
    server_nonce = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
    client_nonce = bytes.fromhex(CNONCE)
    readings = [
        ("temperature", "float", 21.5),
        ("count", "int", 42),
        ("door_open", "bool", False),
        ("status", "string", "ok"),
    ]
    cases = [
        ("heartbeat", skey, DatagramType.HEARTBEAT, 0, SESSION_ID, 1, {"uptime_s": 3600}),
        ("heartbeat-ack-requested", skey, DatagramType.HEARTBEAT, 1, SESSION_ID, 2, {"uptime_s": 3601}),
        ("telemetry", skey, DatagramType.TELEMETRY, 0, SESSION_ID, 3, {"readings": readings}),
        ("ack-from-collector", skey, DatagramType.ACK, 0, SESSION_ID, 1, {"acked_seq": 2}),
        ("command", skey, DatagramType.COMMAND, 1, SESSION_ID, 2, {"id": "c000001", "name": "set_rate", "args": {"rate": 2}}),
        ("ack-with-result", skey, DatagramType.ACK, 0, SESSION_ID, 4, {"acked_seq": 2, "result": {"id": "c000001", "ok": True, "result": {"rate": 2.0}}}),
        ("goodbye", skey, DatagramType.GOODBYE, 0, SESSION_ID, 5, {"reason": "shutdown"}),
        ("hello", hkey, DatagramType.HELLO, 0, 0, 1001, {"device_id": DEVICE, "client_nonce": client_nonce.hex()}),
        ("welcome", auth.session_key(SECRET, DEVICE, server_nonce.hex(), client_nonce.hex(), SESSION_ID), DatagramType.WELCOME, 0, SESSION_ID, 1001,
         {"server_nonce": server_nonce.hex(), "heartbeat_ms": 5000, "timeout_ms": 15000, "max_datagram": 1200}),
    ]  # fmt: skip
    out = []
    for name, key, typ, flags, sid, seq, payload in cases:
        fields = {
            "type": typ.name,
            "flags": flags,
            "session_id": sid,
            "seq": seq,
            "timestamp_us": TS,
            "payload": payload,
        }
        out.append((name, key, fields))
    return [(n, k, f) for n, k, f in out]


def encode_payload(fields: dict) -> bytes:
    """Build a payload from the JSON-able description used in the vectors."""
    p, typ = fields["payload"], DatagramType[fields["type"]]
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
    if typ is DatagramType.HELLO:
        return dg.encode_hello_payload(p["device_id"], bytes.fromhex(p["client_nonce"]))
    if typ is DatagramType.WELCOME:
        return dg.encode_welcome_payload(
            dg.Welcome(
                bytes.fromhex(p["server_nonce"]),
                p["heartbeat_ms"],
                p["timeout_ms"],
                p["max_datagram"],
            )
        )
    raise ValueError(typ)


def encode(key: bytes, fields: dict) -> bytes:
    return dg.encode_datagram(
        key, DatagramType[fields["type"]], fields["session_id"], fields["seq"], fields["timestamp_us"],
        encode_payload(fields), flags=Flag(fields["flags"]),
    )  # fmt: skip


def render() -> str:
    skey = session_key()
    parts = [
        "```text",
        "vector: keys",
        f"secret      {json.dumps(SECRET)}",
        f"device_id   {DEVICE}",
        f"nonce       {NONCE}",
        f"cnonce      {CNONCE}",
        f"session_id  {SESSION_ID}",
        f"proof       {auth.registration_proof(SECRET, DEVICE, NONCE, CNONCE)}",
        f"session_key {skey.hex()}",
        f"hello_key   {auth.hello_key(SECRET).hex()}",
        "```",
        "",
    ]
    for name, key, fields in datagram_vectors():
        data = encode(key, fields)
        parts += [
            f"**{name}** ({len(data)} bytes)",
            "",
            "```text",
            f"vector: {name}",
            f"key       {key.hex()}",
            f"fields    {json.dumps(fields)}",
            f"datagram  {hexdump(data)}",
            f"tag       {data[-dg.TAG_LEN :].hex()}",
            "```",
            "",
        ]
    return "\n".join(parts)


def main() -> None:
    argparse.ArgumentParser(description=textwrap.dedent(__doc__ or "")).parse_args()
    print(render())


if __name__ == "__main__":
    main()
