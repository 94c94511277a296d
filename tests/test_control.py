from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.wire import control as c
from collector.wire.control import ControlConnection, ControlError, Role, State

NONCE = "00112233445566778899aabbccddeeff"
CNONCE = "ffeeddccbbaa99887766554433221100"
PROOF = "ab" * 32


def feed_bytewise(conn: ControlConnection, data: bytes) -> list:
    events = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        while not isinstance(ev := conn.next_event(), c.NeedData):
            events.append(ev)
    return events


def registered_pair() -> tuple[ControlConnection, ControlConnection]:
    server = ControlConnection(Role.SERVER)
    device = ControlConnection(Role.DEVICE)
    device.receive_data(server.send(c.Challenge(NONCE)))
    assert device.next_event() == c.Challenge(NONCE)
    server.receive_data(device.send(c.Register("dev-1", CNONCE, PROOF)))
    assert server.next_event() == c.Register("dev-1", CNONCE, PROOF)
    welcome = c.Welcome(42, 8081, 5.0, 15.0, 1200, "chacha20-poly1305", {"rate": 2})
    device.receive_data(server.send(welcome))
    assert device.next_event() == welcome
    assert server.registered and device.registered
    return server, device


def test_full_session_fed_one_byte_at_a_time():
    server = ControlConnection(Role.SERVER)
    device = ControlConnection(Role.DEVICE)
    assert feed_bytewise(device, server.send(c.Challenge(NONCE))) == [c.Challenge(NONCE)]
    assert feed_bytewise(server, device.send(c.Register("dev-1", CNONCE, PROOF))) == [
        c.Register("dev-1", CNONCE, PROOF)
    ]
    welcome = c.Welcome(42, 8081, 5.0, 15.0, 1200, "chacha20-poly1305", {})
    assert feed_bytewise(device, server.send(welcome)) == [welcome]
    cmd = c.Command("c1", "reboot", {"delay": 5})
    assert feed_bytewise(device, server.send(cmd) + server.send(c.Config({"rate": 3}))) == [
        cmd,
        c.Config({"rate": 3}),
    ]
    out = device.send(c.Ack("c1", True, {"rebooting": True})) + device.send(c.Ping())
    assert feed_bytewise(server, out) == [c.Ack("c1", True, {"rebooting": True}), c.Ping()]
    assert feed_bytewise(server, device.send(c.Goodbye("battery low"))) == [
        c.Goodbye("battery low")
    ]
    assert server.state is State.CLOSED and device.state is State.CLOSED


def test_wire_format_is_one_compact_json_object_per_line():
    line = c.encode_message(c.Ack("c1", False, None, "disk full"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"type": "ack", "id": "c1", "ok": False, "error": "disk full"}
    assert json.loads(c.encode_message(c.Challenge(NONCE))) == {
        "type": "challenge",
        "nonce": NONCE,
        "protocol": 2,
    }


def test_crlf_and_blank_lines_are_accepted():
    server = ControlConnection(Role.SERVER)
    server.send(c.Challenge(NONCE))
    line = json.dumps(
        {"type": "register", "device_id": "d", "cnonce": CNONCE, "proof": PROOF}
    ).encode()
    server.receive_data(b"\r\n\n" + line + b"\r\n")
    assert server.next_event() == c.Register("d", CNONCE, PROOF)


def test_eof_clean_and_mid_line():
    server, _ = registered_pair()
    server.receive_data(b"")
    assert server.next_event() == c.ConnectionClosed(clean=True)
    server2, _ = registered_pair()
    server2.receive_data(b'{"type": "pi')
    server2.receive_data(b"")
    assert server2.next_event() == c.ConnectionClosed(clean=False)


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b'{"no": "type"}', "bad_message"),
        (b'{"type": "launch"}', "unknown_type"),
        (b'{"type": "welcome"}', "unexpected_message"),
        (b'{"type": "ping"}', "not_registered"),
        (b'{"type": "ack", "id": "x"}', "not_registered"),
        (b'{"type": "register", "device_id": "d", "cnonce": "xyz", "proof": "00"}', "bad_message"),
        (
            b'{"type": "register", "device_id": "", "cnonce": "'
            + CNONCE.encode()
            + b'", "proof": "'
            + PROOF.encode()
            + b'"}',
            "bad_message",
        ),
    ],
)
def test_errors_before_registration_are_fatal(line, code):
    server = ControlConnection(Role.SERVER)
    server.send(c.Challenge(NONCE))
    server.receive_data(line + b"\n")
    with pytest.raises(ControlError) as info:
        server.next_event()
    assert info.value.code == code
    assert info.value.fatal


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{oops", "bad_json"),
        (b'{"type": "launch"}', "unknown_type"),
        (b'{"type": "ack"}', "bad_message"),
        (b'{"type": "ack", "id": "c1", "ok": "yes"}', "bad_message"),
        (
            b'{"type": "register", "device_id": "d", "cnonce": "'
            + CNONCE.encode()
            + b'", "proof": "'
            + PROOF.encode()
            + b'"}',
            "already_registered",
        ),
    ],
)
def test_errors_after_registration_are_not_fatal_and_the_stream_goes_on(line, code):
    server, _ = registered_pair()
    server.receive_data(line + b'\n{"type": "ping"}\n')
    with pytest.raises(ControlError) as info:
        server.next_event()
    assert (info.value.code, info.value.fatal) == (code, False)
    assert server.next_event() == c.Ping()


def test_line_too_long_is_fatal_with_or_without_newline():
    server, _ = registered_pair()
    server.receive_data(b"x" * 300)
    assert isinstance(server.next_event(), c.NeedData)  # under the limit so far
    server = ControlConnection(Role.SERVER, max_line=256)
    server.send(c.Challenge(NONCE))
    server.receive_data(b"x" * 256)
    with pytest.raises(ControlError) as info:
        server.next_event()
    assert (info.value.code, info.value.fatal) == ("line_too_long", True)
    server = ControlConnection(Role.SERVER, max_line=256)
    server.send(c.Challenge(NONCE))
    server.receive_data(b" " * 300 + b"\n")
    with pytest.raises(ControlError, match="line_too_long"):
        server.next_event()


def test_local_protocol_errors():
    server = ControlConnection(Role.SERVER)
    with pytest.raises(c.LocalProtocolError):
        server.send(c.Command("c1", "x"))
    server.send(c.Challenge(NONCE))
    with pytest.raises(c.LocalProtocolError):
        server.send(c.Challenge(NONCE))
    with pytest.raises(c.LocalProtocolError):
        server.send(c.Welcome(1, 1, 1.0, 2.0, 1200))
    device = ControlConnection(Role.DEVICE)
    with pytest.raises(c.LocalProtocolError):
        device.send(c.Register("d", CNONCE, PROOF))
    with pytest.raises(c.LocalProtocolError):
        device.send(c.Ping())


def test_refused_registration_can_be_retried_on_the_same_connection():
    server = ControlConnection(Role.SERVER)
    server.send(c.Challenge(NONCE))
    server.receive_data(c.encode_message(c.Register("d", CNONCE, PROOF)))
    server.next_event()
    server.send(c.Error("auth_failed", "no"))
    assert server.state is State.AWAIT_REGISTER


def test_device_rejects_a_newer_protocol():
    device = ControlConnection(Role.DEVICE)
    device.receive_data(
        b'{"type": "challenge", "nonce": "' + NONCE.encode() + b'", "protocol": 3}\n'
    )
    with pytest.raises(ControlError, match="unsupported_protocol"):
        device.next_event()


@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_only_ever_raise_control_error(data, registered):
    conn = registered_pair()[0] if registered else ControlConnection(Role.SERVER)
    if not registered:
        conn.send(c.Challenge(NONCE))
    conn.receive_data(data + b"\n")
    for _ in range(50):
        try:
            ev = conn.next_event()
        except ControlError:
            if conn.state is not State.REGISTERED:
                return
            continue
        if isinstance(ev, c.NeedData | c.ConnectionClosed):
            return


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=8,
)


@given(
    st.sampled_from(
        ["register", "ack", "ping", "goodbye", "error", "welcome", "config", "command"]
    ),
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "ok",
                "result",
                "error",
                "device_id",
                "cnonce",
                "proof",
                "reason",
                "code",
                "message",
                "config",
                "args",
                "name",
            ]
        ),
        JSONISH,
        max_size=6,
    ),
)
def test_mutated_messages_only_raise_control_error(mtype, fields):
    for conn in (registered_pair()[0], registered_pair()[1]):
        conn.receive_data(json.dumps({"type": mtype, **fields}).encode() + b"\n")
        try:
            conn.next_event()
        except ControlError:
            pass
