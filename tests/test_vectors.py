"""Every test vector in docs/PROTOCOL.md, checked against the code in both directions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from collector.wire import auth
from collector.wire import datagram as dg
from collector.wire.datagram import DatagramType, Flag

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def _blocks() -> dict[str, dict[str, str]]:
    out = {}
    for body in re.findall(r"```text\n(vector: .*?)```", DOC.read_text(), flags=re.S):
        fields: dict[str, str] = {}
        key = None
        for line in body.splitlines():
            m = re.match(r"(\w+):?\s+(.*)", line)
            if m and not line.startswith(" "):
                key = m.group(1)
                fields[key] = m.group(2).strip()
            elif key:
                fields[key] += " " + line.strip()
        out[fields.pop("vector")] = fields
    return out


BLOCKS = _blocks()
DATAGRAM_VECTORS = sorted(n for n in BLOCKS if n != "keys")


def test_the_document_has_a_vector_for_every_datagram_type():
    types = {json.loads(BLOCKS[n]["fields"])["type"] for n in DATAGRAM_VECTORS}
    assert types == {t.name for t in DatagramType}


def test_key_derivations():
    k = BLOCKS["keys"]
    secret = json.loads(k["secret"])
    args = (secret, k["device_id"], k["nonce"], k["cnonce"])
    assert auth.registration_proof(*args) == k["proof"]
    assert auth.check_registration_proof(*args, k["proof"])
    assert not auth.check_registration_proof(*args, "0" * 64)
    assert auth.session_key(*args, int(k["session_id"])).hex() == k["session_key"]
    assert auth.hello_key(secret).hex() == k["hello_key"]


def _payload(f: dict) -> bytes:
    p, t = f["payload"], DatagramType[f["type"]]
    if t is DatagramType.HEARTBEAT:
        return dg.encode_heartbeat_payload(p["uptime_s"])
    if t is DatagramType.TELEMETRY:
        return dg.encode_readings({name: value for name, _, value in p["readings"]})
    if t is DatagramType.ACK:
        return dg.encode_ack_payload(p["acked_seq"], p.get("result"))
    if t is DatagramType.COMMAND:
        return dg.encode_command_payload(p["id"], p["name"], p["args"])
    if t is DatagramType.GOODBYE:
        return dg.encode_goodbye_payload(p["reason"])
    if t is DatagramType.HELLO:
        return dg.encode_hello_payload(p["device_id"], bytes.fromhex(p["client_nonce"]))
    return dg.encode_welcome_payload(
        dg.Welcome(
            bytes.fromhex(p["server_nonce"]), p["heartbeat_ms"], p["timeout_ms"], p["max_datagram"]
        )
    )


def _decoded(t: DatagramType, payload: bytes) -> dict:
    if t is DatagramType.HEARTBEAT:
        return {"uptime_s": dg.decode_heartbeat_untrusted(payload)}
    if t is DatagramType.TELEMETRY:
        names = {float: "float", int: "int", bool: "bool", str: "string"}
        return {
            "readings": [
                [name, names[type(value)], value]
                for name, value in dg.decode_readings_untrusted(payload)
            ]
        }
    if t is DatagramType.ACK:
        a = dg.decode_ack_untrusted(payload)
        return {"acked_seq": a.acked_seq} | ({"result": a.result} if a.result is not None else {})
    if t is DatagramType.COMMAND:
        cid, name, args = dg.decode_command_untrusted(payload)
        return {"id": cid, "name": name, "args": args}
    if t is DatagramType.GOODBYE:
        return {"reason": dg.decode_goodbye_untrusted(payload)}
    if t is DatagramType.HELLO:
        h = dg.decode_hello_untrusted(payload)
        return {"device_id": h.device_id, "client_nonce": h.client_nonce.hex()}
    w = dg.decode_welcome_untrusted(payload)
    return {
        "server_nonce": w.server_nonce.hex(),
        "heartbeat_ms": w.heartbeat_ms,
        "timeout_ms": w.timeout_ms,
        "max_datagram": w.max_datagram,
    }


@pytest.mark.parametrize("name", DATAGRAM_VECTORS)
def test_datagram_vector(name):
    v = BLOCKS[name]
    key = bytes.fromhex(v["key"])
    fields = json.loads(v["fields"])
    data = bytes.fromhex(v["datagram"].replace(" ", ""))
    # bytes -> values
    h = dg.decode_header_untrusted(data)
    assert (h.type.name, int(h.flags), h.session_id, h.seq, h.timestamp_us) == (
        fields["type"],
        fields["flags"],
        fields["session_id"],
        fields["seq"],
        fields["timestamp_us"],
    )
    assert _decoded(h.type, dg.payload_of(data)) == fields["payload"]
    assert dg.verify_tag(key, data)
    assert data[-16:].hex() == v["tag"]
    # values -> bytes
    encoded = dg.encode_datagram(
        key,
        DatagramType[fields["type"]],
        fields["session_id"],
        fields["seq"],
        fields["timestamp_us"],
        _payload(fields),
        flags=Flag(fields["flags"]),
    )
    assert encoded == data


def test_the_welcome_vector_uses_the_session_key_from_its_nonces():
    k = BLOCKS["keys"]
    hello = json.loads(BLOCKS["hello"]["fields"])["payload"]
    welcome = json.loads(BLOCKS["welcome"]["fields"])
    key = auth.session_key(
        json.loads(k["secret"]),
        hello["device_id"],
        welcome["payload"]["server_nonce"],
        hello["client_nonce"],
        welcome["session_id"],
    )
    assert key.hex() == BLOCKS["welcome"]["key"]
    assert len(bytes.fromhex(BLOCKS["welcome"]["datagram"].replace(" ", ""))) <= len(
        bytes.fromhex(BLOCKS["hello"]["datagram"].replace(" ", ""))
    )
