from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.wire import datagram as dg
from collector.wire.crypto import COLLECTOR_TO_DEVICE, DEVICE_TO_COLLECTOR, Aead
from collector.wire.datagram import DatagramError, DatagramType, Flag, Reading

KEY = bytes(range(32))
AEAD = Aead(KEY)


def make(
    type=DatagramType.HEARTBEAT, payload=b"\0\0\0\1", *, sid=7, seq=1, flags=Flag.NONE, key=KEY
):
    return dg.encode_datagram(key, type, sid, seq, 1_700_000_000_000_000, payload, flags=flags)


def test_header_layout_is_20_bytes_big_endian():
    data = make(seq=0x01020304, sid=0x0A0B0C0D, flags=Flag.ACK_REQUESTED)
    assert data[:20] == bytes.fromhex("020101000a0b0c0d01020304") + struct.pack(
        ">Q", 1_700_000_000_000_000
    )
    assert len(data) == 20 + 4 + 16
    h = dg.decode_header_untrusted(data)
    assert (h.type, h.session_id, h.seq, h.ack_requested) == (
        DatagramType.HEARTBEAT,
        0x0A0B0C0D,
        0x01020304,
        True,
    )


def test_the_payload_is_encrypted_and_every_byte_authenticated():
    payload = dg.encode_readings({"temperature": 21.5})
    data = make(DatagramType.TELEMETRY, payload)
    assert payload not in data and len(data) == 20 + len(payload) + 16
    assert dg.open_datagram_untrusted(AEAD, data) == payload
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            mutated = bytearray(data)
            mutated[i] ^= bit
            with pytest.raises(DatagramError, match="bad_tag"):
                dg.open_datagram_untrusted(AEAD, bytes(mutated))
    with pytest.raises(DatagramError, match="bad_tag"):
        dg.open_datagram_untrusted(Aead(bytes(32)), data)  # another key
    with pytest.raises(DatagramError, match="bad_tag"):
        dg.open_datagram_untrusted(AEAD, data, COLLECTOR_TO_DEVICE)  # the other direction's nonce


def test_the_nonce_never_repeats_within_a_session():
    # Same key, same payload: another sequence number or direction gives other bytes.
    a = make(seq=1)
    assert make(seq=2)[20:] != a[20:]
    other = dg.encode_datagram(
        KEY,
        DatagramType.HEARTBEAT,
        7,
        1,
        1_700_000_000_000_000,
        b"\0\0\0\1",
        direction=COLLECTOR_TO_DEVICE,
    )
    assert other[20:] != a[20:] and DEVICE_TO_COLLECTOR != COLLECTOR_TO_DEVICE


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (b"\x01" * 35, "malformed"),
        (b"\x01" * 1201, "too_large"),
        (b"\x01" + make()[1:], "malformed"),  # version 1 is gone
        (make()[:1] + b"\x09" + make()[2:], "malformed"),  # type
        (make()[:1] + b"\x00" + make()[2:], "malformed"),  # type 0
        (make()[:2] + b"\x80" + make()[3:], "malformed"),  # unknown flag
        (make()[:3] + b"\x01" + make()[4:], "malformed"),  # reserved byte
    ],
)
def test_bad_headers(data, reason):
    with pytest.raises(DatagramError) as info:
        dg.decode_header_untrusted(data)
    assert info.value.reason == reason


def test_max_size_is_configurable():
    data = make(payload=b"\0" * 100)
    with pytest.raises(DatagramError, match="too_large"):
        dg.decode_header_untrusted(data, max_size=100)
    assert dg.decode_header_untrusted(data, max_size=136)


def test_readings_round_trip_every_value_type():
    readings = {
        "t": 21.5,
        "count": -(2**63),
        "big": 2**63 - 1,
        "door": True,
        "off": False,
        "state": "ok ✓",
        "empty": "",
    }
    decoded = dg.decode_readings_untrusted(dg.encode_readings(readings))
    assert [(name, value) for name, value in decoded] == list(readings.items())
    assert [type(value) for _, value in decoded] == [float, int, int, bool, bool, str, str]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00",  # zero readings
        b"\x01\x01t\x01" + b"\0" * 7,  # truncated float
        b"\x01\x01t\x09" + b"\0" * 8,  # unknown value type
        b"\x01\x01t\x03\x02",  # bool byte 2
        b"\x01\x01t\x04\x05abc",  # truncated string
        b"\x01\x02t!\x03\x01",  # bad name character
        b"\x01\x00\x03\x01",  # empty name
        b"\x01\x01t\x03\x01extra",  # trailing bytes
        b"\x02\x01t\x03\x01",  # count says two, one present
        b"\x01\x01t\x01" + struct.pack(">d", float("nan")),
        b"\x01\x01t\x04\x02\xff\xfe",  # string not UTF-8
    ],
)
def test_bad_readings(payload):
    with pytest.raises(DatagramError) as info:
        dg.decode_readings_untrusted(payload)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    "readings",
    [
        {},
        {"bad name": 1.0},
        {"x": float("inf")},
        {"x": [1]},
        {"x": "é" * 200},
        {f"m{i}": 1 for i in range(256)},
    ],
)
def test_encode_refuses_what_cannot_go_on_the_wire(readings):
    with pytest.raises(ValueError):
        dg.encode_readings(readings)


def test_hello_cookie_welcome_round_trip_and_never_amplify():
    keys_out, keys_in = Aead(bytes([1]) * 32), Aead(bytes([2]) * 32)
    cnonce, cookie = bytes(range(16)), bytes(range(16, 32))
    hello = dg.encode_hello(keys_out, "a", cnonce)
    assert len(hello) == dg.MIN_HELLO_LEN == 82
    parsed = dg.parse_hello_untrusted(hello)
    assert parsed.device_id == "a" and dg.open_hello(keys_out, parsed) == (cnonce, dg.NO_COOKIE)
    answer = dg.encode_cookie(keys_in, cookie, parsed.nonce)
    assert len(answer) == dg.COOKIE_DATAGRAM_LEN == 76 < len(hello)  # never amplifies
    assert dg.answered_hello_untrusted(answer) == parsed.nonce
    assert dg.open_cookie_untrusted(keys_in, answer, parsed.nonce) == cookie
    with pytest.raises(DatagramError):
        dg.open_cookie_untrusted(keys_in, answer, bytes(12))  # not for this HELLO
    second = dg.encode_hello(keys_out, "a", cnonce, cookie)
    assert dg.open_hello(keys_out, dg.parse_hello_untrusted(second)) == (cnonce, cookie)
    with pytest.raises(DatagramError, match="bad_tag"):
        dg.open_hello(keys_in, dg.parse_hello_untrusted(second))
    welcome = dg.Welcome(5000, 15000, 1200, {"rate": 2})
    w = dg.encode_welcome(AEAD, 9, bytes(16), parsed.nonce, welcome)
    assert dg.welcome_nonce_untrusted(w) == (9, bytes(16))
    assert dg.open_welcome_untrusted(AEAD, w) == welcome
    assert (
        dg.open_welcome_untrusted(
            AEAD, dg.encode_welcome(AEAD, 9, bytes(16), parsed.nonce, dg.Welcome(1, 2, 3))
        ).config
        == {}
    )
    long_id = dg.encode_hello(keys_out, "x" * 64, cnonce)
    assert dg.parse_hello_untrusted(long_id).device_id == "x" * 64
    for bad in (hello[:-1], hello + b"\0", hello[:20] + b"\x05" + hello[21:]):
        with pytest.raises(DatagramError):
            dg.open_hello(keys_out, dg.parse_hello_untrusted(bad))


def test_duplicate_names_in_one_datagram_are_malformed():
    payload = b"\x02" + (b"\x01t\x03\x01") * 2
    with pytest.raises(DatagramError, match="twice"):
        dg.decode_readings_untrusted(payload)


def test_ack_and_command_payloads():
    assert dg.decode_ack_untrusted(dg.encode_ack_payload(42)) == dg.AckPayload(42, None)
    body = {"ok": True, "result": {"x": 1}}
    assert dg.decode_ack_untrusted(dg.encode_ack_payload(7, body)) == dg.AckPayload(7, body)
    for bad in (b"", b"\0\0\0", b"\0\0\0\1[1]", b"\0\0\0\1{"):
        with pytest.raises(DatagramError):
            dg.decode_ack_untrusted(bad)
    assert dg.decode_command_untrusted(dg.encode_command_payload("c1", "reboot", {"delay": 3})) == (
        "c1",
        "reboot",
        {"delay": 3},
    )
    with pytest.raises(DatagramError):
        dg.decode_command_untrusted(b'{"id": 1, "name": "x"}')


def test_every_ack_is_no_larger_than_what_it_acknowledges():
    # The smallest datagrams that may ask for an ACK: a heartbeat, and telemetry with one bool.
    smallest_heartbeat = make(DatagramType.HEARTBEAT, dg.encode_heartbeat_payload(0))
    smallest_telemetry = make(DatagramType.TELEMETRY, dg.encode_readings({"a": True}))
    ack = make(DatagramType.ACK, dg.encode_ack_payload(1))
    assert len(ack) <= len(smallest_heartbeat) < len(smallest_telemetry)


# -- fuzzing: every decoder of untrusted bytes raises DatagramError and nothing else ---------

DECODERS = [
    dg.decode_header_untrusted,
    dg.decode_readings_untrusted,
    dg.decode_heartbeat_untrusted,
    dg.parse_hello_untrusted,
    dg.welcome_nonce_untrusted,
    dg.answered_hello_untrusted,
    lambda data: dg.open_welcome_untrusted(AEAD, data),
    lambda data: dg.open_cookie_untrusted(AEAD, data, bytes(12)),
    lambda data: dg.open_datagram_untrusted(AEAD, data) if len(data) >= 36 else None,
    dg.decode_ack_untrusted,
    dg.decode_command_untrusted,
    dg.decode_goodbye_untrusted,
]


def _only_datagram_errors(decoder, data):
    try:
        decoder(data)
    except DatagramError as exc:
        assert exc.reason in {"malformed", "too_large", "bad_tag"}


@given(st.binary(max_size=1400))
def test_decoders_survive_random_bytes(data):
    for decoder in DECODERS:
        _only_datagram_errors(decoder, data)


VALID = [
    make(),
    make(DatagramType.TELEMETRY, dg.encode_readings({"t": 1.5, "n": 3, "b": True, "s": "hi"})),
    make(DatagramType.ACK, dg.encode_ack_payload(3, {"ok": True})),
    make(DatagramType.COMMAND, dg.encode_command_payload("c1", "x", {})),
    dg.encode_hello(AEAD, "dev-1", bytes(16)),
    dg.encode_cookie(AEAD, bytes(16), bytes(12)),
    dg.encode_welcome(AEAD, 5, bytes(16), bytes(12), dg.Welcome(1, 2, 3, {"a": [1]})),
]


@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=8),
    st.integers(0, 80),
)
def test_decoders_survive_mutated_datagrams(data, flips, cut):
    mutated = bytearray(data)
    for pos, value in flips:
        if mutated:
            mutated[pos % len(mutated)] = value
    mutated = bytes(mutated[: max(0, len(mutated) - cut)])
    for decoder in DECODERS:
        _only_datagram_errors(decoder, mutated)
        _only_datagram_errors(decoder, mutated[dg.HEADER_LEN : -dg.TAG_LEN])


@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True),
        st.one_of(
            st.booleans(),
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=60),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_readings_round_trip_property(readings):
    decoded = dg.decode_readings_untrusted(dg.encode_readings(readings))
    assert dict(decoded) == readings
    assert all(type(value) is type(readings[name]) for name, value in decoded)
    assert Reading  # the decoder returns Reading values
