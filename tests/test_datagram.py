from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.wire import datagram as dg
from collector.wire.datagram import DatagramError, DatagramType, Flag, Reading

KEY = bytes(range(32))


def make(
    type=DatagramType.HEARTBEAT, payload=b"\0\0\0\1", *, sid=7, seq=1, flags=Flag.NONE, key=KEY
):
    return dg.encode_datagram(key, type, sid, seq, 1_700_000_000_000_000, payload, flags=flags)


def test_header_layout_is_20_bytes_big_endian():
    data = make(seq=0x01020304, sid=0x0A0B0C0D, flags=Flag.ACK_REQUESTED)
    assert data[:20] == bytes.fromhex("010101000a0b0c0d01020304") + struct.pack(
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


def test_tag_covers_every_byte():
    data = make()
    assert dg.verify_tag(KEY, data)
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            mutated = bytearray(data)
            mutated[i] ^= bit
            assert not dg.verify_tag(KEY, bytes(mutated)), f"flip at byte {i} not detected"
    assert not dg.verify_tag(bytes(32), data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (b"\x01" * 35, "malformed"),
        (b"\x01" * 1201, "too_large"),
        (b"\x02" + make()[1:], "malformed"),  # version
        (make()[:1] + b"\x09" + make()[2:], "malformed"),  # type
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


def test_hello_is_padded_to_the_size_of_a_welcome():
    payload = dg.encode_hello_payload("a", bytes(16))
    hello = dg.encode_datagram(KEY, DatagramType.HELLO, 0, 1, 0, payload)
    welcome = dg.encode_datagram(
        KEY,
        DatagramType.WELCOME,
        9,
        1,
        0,
        dg.encode_welcome_payload(dg.Welcome(bytes(16), 5000, 15000, 1200)),
    )
    assert len(hello) == len(welcome) == dg.MIN_HELLO_LEN == 64
    assert dg.decode_hello_untrusted(payload) == dg.Hello("a", bytes(16))
    long_id = dg.encode_hello_payload("x" * 64, bytes(16))
    assert len(long_id) == 1 + 64 + 16  # no padding needed
    with pytest.raises(DatagramError):
        dg.decode_hello_untrusted(payload[:-1])
    with pytest.raises(DatagramError):
        dg.decode_hello_untrusted(payload[:-1] + b"\x01")  # padding must be zero


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
    dg.decode_hello_untrusted,
    dg.decode_welcome_untrusted,
    dg.decode_ack_untrusted,
    dg.decode_command_untrusted,
    dg.decode_goodbye_untrusted,
]


def _only_datagram_errors(decoder, data):
    try:
        decoder(data)
    except DatagramError as exc:
        assert exc.reason in {"malformed", "too_large"}


@given(st.binary(max_size=1400))
def test_decoders_survive_random_bytes(data):
    for decoder in DECODERS:
        _only_datagram_errors(decoder, data)


VALID = [
    make(),
    make(DatagramType.TELEMETRY, dg.encode_readings({"t": 1.5, "n": 3, "b": True, "s": "hi"})),
    make(DatagramType.ACK, dg.encode_ack_payload(3, {"ok": True})),
    make(DatagramType.COMMAND, dg.encode_command_payload("c1", "x", {})),
    make(DatagramType.HELLO, dg.encode_hello_payload("dev-1", bytes(16)), sid=0),
    make(DatagramType.WELCOME, dg.encode_welcome_payload(dg.Welcome(bytes(16), 1, 2, 3))),
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
