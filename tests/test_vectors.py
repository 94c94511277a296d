"""Every test vector in docs/PROTOCOL.md, checked against the code in both directions, and the
primitives under them against their RFCs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from collector.wire import crypto
from collector.wire import datagram as dg
from collector.wire.crypto import COLLECTOR_TO_DEVICE, DEVICE_TO_COLLECTOR, Aead, DeviceKeys
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
K = BLOCKS["keys"]
SECRET = json.loads(K["secret"])
DEVICE = K["device_id"]
SESSION_VECTORS = ["heartbeat", "heartbeat-ack-requested", "telemetry", "ack-from-collector",
                   "command", "ack-with-result", "goodbye"]  # fmt: skip


def raw(block: dict[str, str]) -> bytes:
    return bytes.fromhex(block["datagram"].replace(" ", ""))


def fields(name: str) -> dict:
    return json.loads(BLOCKS[name]["fields"])


def test_the_document_has_a_vector_for_every_datagram_type():
    types = {fields(n)["type"] for n in BLOCKS if n != "keys"}
    assert types == {t.name for t in DatagramType}


def test_key_derivations():
    keys = DeviceKeys(SECRET)
    assert keys.auth.hex() == K["auth_key"]
    assert keys.hello_d2c.hex() == K["hello_d2c"]
    assert keys.hello_c2d.hex() == K["hello_c2d"]
    assert crypto.registration_proof(keys, DEVICE, K["nonce"], K["cnonce"]) == K["proof"]
    assert crypto.check_registration_proof(keys, DEVICE, K["nonce"], K["cnonce"], K["proof"])
    assert not crypto.check_registration_proof(keys, DEVICE, K["nonce"], K["cnonce"], "0" * 64)
    d2c, c2d = crypto.session_keys(
        keys.secret,
        DEVICE,
        bytes.fromhex(K["nonce"]),
        bytes.fromhex(K["cnonce"]),
        int(K["session_id"]),
    )
    assert (d2c.hex(), c2d.hex()) == (K["session_d2c"], K["session_c2d"])


@pytest.mark.parametrize("name", SESSION_VECTORS)
def test_session_datagrams_both_ways(name):
    block, f = BLOCKS[name], fields(name)
    data, key, plain = raw(block), bytes.fromhex(block["key"]), bytes.fromhex(block["plain"])
    direction = (
        DEVICE_TO_COLLECTOR if f["direction"] == "device-to-collector" else COLLECTOR_TO_DEVICE
    )
    assert key.hex() == (K["session_d2c"] if direction == DEVICE_TO_COLLECTOR else K["session_c2d"])
    h = dg.decode_header_untrusted(data)
    assert (h.type.name, int(h.flags), h.session_id, h.seq, h.timestamp_us) == (
        f["type"], f["flags"], f["session_id"], f["seq"], f["timestamp_us"],
    )  # fmt: skip
    assert dg.open_datagram_untrusted(Aead(key), data, direction) == plain
    from collector.tools.protocol_vectors import (
        encode_payload,  # the same description, encoded again
    )

    assert encode_payload(DatagramType[f["type"]], f["payload"]) == plain
    again = dg.seal_datagram(
        Aead(key), DatagramType[f["type"]], h.session_id, h.seq, h.timestamp_us, plain,
        flags=Flag(f["flags"]), direction=direction,
    )  # fmt: skip
    assert again == data
    p = f["payload"]
    if f["type"] == "TELEMETRY":
        assert dg.decode_readings_untrusted(plain) == [(n, v) for n, _, v in p["readings"]]
    elif f["type"] == "ACK":
        assert dg.decode_ack_untrusted(plain) == dg.AckPayload(p["acked_seq"], p.get("result"))
    elif f["type"] == "COMMAND":
        assert dg.decode_command_untrusted(plain) == (p["id"], p["name"], p["args"])


def test_registration_datagrams_both_ways():
    keys = DeviceKeys(SECRET)
    hello_out, hello_in = Aead(keys.hello_d2c), Aead(keys.hello_c2d)
    for name in ("hello", "hello-with-cookie"):
        f, data = fields(name), raw(BLOCKS[name])
        parsed = dg.parse_hello_untrusted(data)
        assert (parsed.device_id, parsed.nonce.hex()) == (f["device_id"], f["nonce"])
        cnonce, cookie = dg.open_hello(hello_out, parsed)
        assert (cnonce.hex(), cookie.hex()) == (f["client_nonce"], f["cookie"])
        assert data == dg.encode_hello(
            hello_out, DEVICE, cnonce, cookie, f["timestamp_us"], parsed.nonce
        )
    f, data = fields("cookie"), raw(BLOCKS["cookie"])
    assert dg.answered_hello_untrusted(data).hex() == f["hello_nonce"] == fields("hello")["nonce"]
    assert (
        dg.open_cookie_untrusted(hello_in, data, bytes.fromhex(f["hello_nonce"])).hex()
        == f["cookie"]
    )
    assert data == dg.encode_cookie(
        hello_in,
        bytes.fromhex(f["cookie"]),
        bytes.fromhex(f["hello_nonce"]),
        f["timestamp_us"],
        bytes.fromhex(f["nonce"]),
    )
    f, data = fields("welcome"), raw(BLOCKS["welcome"])
    sid, snonce = dg.welcome_nonce_untrusted(data)
    assert (sid, snonce.hex()) == (f["session_id"], f["server_nonce"])
    assert (
        dg.answered_hello_untrusted(data).hex()
        == f["hello_nonce"]
        == fields("hello-with-cookie")["nonce"]
    )
    _, c2d = crypto.session_keys(keys.secret, DEVICE, snonce, bytes.fromhex(K["cnonce"]), sid)
    w = dg.open_welcome_untrusted(Aead(c2d), data)
    assert (w.heartbeat_ms, w.timeout_ms, w.max_datagram, dict(w.config)) == (
        f["heartbeat_ms"], f["timeout_ms"], f["max_datagram"], f["config"]
    )  # fmt: skip
    assert data == dg.encode_welcome(
        Aead(c2d), sid, snonce, bytes.fromhex(f["hello_nonce"]), w, f["timestamp_us"]
    )


def test_the_document_is_what_the_vector_tool_prints():
    from collector.tools.protocol_vectors import render

    assert render() in DOC.read_text()


# -- the primitives, against their RFCs ------------------------------------------------------


def test_hkdf_sha256_rfc5869_case_1():
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    prk = crypto.hkdf_extract(salt, ikm)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    okm = crypto.hkdf_expand(prk, info, 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_sha256_rfc5869_case_3_empty_salt_and_info():
    ikm = bytes.fromhex("0b" * 22)
    okm = crypto.hkdf(ikm, b"", b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_chacha20_poly1305_rfc8439_section_2_8_2():
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
        b"future, sunscreen would be it."
    )
    sealed = Aead(key).encrypt(nonce, plaintext, aad)
    assert sealed[-16:].hex() == "1ae10b594f09e26a7e902ecbd0600691"
    assert sealed[:16].hex() == "d31a8d34648e60db7b86afbc53ef7ec2"
