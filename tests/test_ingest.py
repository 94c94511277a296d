"""Datagrams over real loopback sockets: acceptance, accounting, and every kind of bad input."""

from __future__ import annotations

import secrets

import attrs
import trio

from collector.core.events import DeviceOffline
from collector.device.client import open_device
from collector.wire import auth
from collector.wire import datagram as dg
from collector.wire.datagram import DatagramType, Flag

from .helpers import SECRETS, Lines, exchange, start_collector, udp_socket


async def registered(collector, device_id="dev-1"):
    lines = await Lines.connect(collector)
    welcome = await lines.register(device_id)
    assert welcome["type"] == "welcome", welcome
    return lines, welcome


def telemetry(welcome, seq, readings=None, *, flags=Flag.NONE, key=None):
    return dg.encode_datagram(
        key or welcome["key"], DatagramType.TELEMETRY, welcome["session_id"], seq, 123,
        dg.encode_readings(readings or {"t": float(seq)}), flags=flags,
    )  # fmt: skip


def heartbeat(welcome, seq, *, flags=Flag.NONE):
    return dg.encode_datagram(
        welcome["key"],
        DatagramType.HEARTBEAT,
        welcome["session_id"],
        seq,
        0,
        dg.encode_heartbeat_payload(1),
        flags=flags,
    )


def device_state(collector, device_id="dev-1"):
    return attrs.evolve(collector.statistics().devices[device_id], last_seen=None)


async def settle():
    await trio.sleep(0.05)


async def test_loss_duplicates_and_reordering_are_counted_exactly(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    _conn, w = await registered(collector)
    sock = await udp_socket()
    for seq in [1, 2, 5, 3, 3, 8, 2, 6]:  # 4 and 7 never arrive; 3 and 2 twice; 3 and 6 late
        await sock.sendto(telemetry(w, seq), collector.udp_address)
    await settle()
    d = collector.statistics().devices["dev-1"]
    assert (d.datagrams, d.lost, d.duplicates, d.out_of_order) == (6, 2, 2, 2)
    assert collector.statistics().rejected["replay"] == 2
    assert [t.seq for t in log.telemetry] == [1, 2, 5, 3, 8, 6]
    assert abs(d.loss_ratio - 2 / 8) < 1e-9


async def test_ack_requested_is_acknowledged_and_duplicates_reacked_only_to_the_known_address(
    nursery, autojump_clock
):
    collector, _ = await start_collector(nursery)
    _conn, w = await registered(collector)
    sock, other = await udp_socket(), await udp_socket()
    data = telemetry(w, 1, flags=Flag.ACK_REQUESTED)
    ack = await exchange(sock, collector, data)
    assert ack is not None and len(ack) <= len(data)
    h = dg.decode_header_untrusted(ack)
    assert (h.type, h.session_id) == (DatagramType.ACK, w["session_id"]) and dg.verify_tag(
        w["key"], ack
    )
    assert dg.decode_ack_untrusted(dg.payload_of(ack)).acked_seq == 1
    again = await exchange(sock, collector, data)  # the device did not get the ACK: retransmits
    assert again is not None and dg.decode_ack_untrusted(dg.payload_of(again)).acked_seq == 1
    assert dg.decode_header_untrusted(again).seq > h.seq
    assert (
        await exchange(other, collector, data) is None
    )  # a replay from elsewhere is not reflected
    d = collector.statistics().devices["dev-1"]
    assert (d.datagrams, d.duplicates) == (1, 2)
    hb = heartbeat(w, 2, flags=Flag.ACK_REQUESTED)
    hb_ack = await exchange(sock, collector, hb)
    assert hb_ack is not None and len(hb_ack) == len(hb) == 40


async def test_nat_rebinding_moves_the_session(nursery, autojump_clock):
    collector, _ = await start_collector(nursery)
    _conn, w = await registered(collector)
    first, second = await udp_socket(), await udp_socket()
    await first.sendto(telemetry(w, 1), collector.udp_address)
    await settle()
    ack = await exchange(second, collector, telemetry(w, 2, flags=Flag.ACK_REQUESTED))
    assert ack is not None  # answered at the new address
    d = collector.statistics().devices["dev-1"]
    assert d.address == f"127.0.0.1:{second.getsockname()[1]}"
    assert d.address_changes == 1 and collector.statistics().address_changes == 1
    # a replayed old datagram from the old address does not move it back
    await first.sendto(telemetry(w, 1), collector.udp_address)
    await settle()
    assert collector.statistics().devices["dev-1"].address == d.address


async def test_bad_input_is_counted_and_touches_no_device(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    _conn, w = await registered(collector)
    _conn2, w2 = await registered(collector, "dev-2")
    sock = await udp_socket()
    await sock.sendto(telemetry(w, 1), collector.udp_address)
    await sock.sendto(telemetry(w2, 1), collector.udp_address)
    await settle()
    before = (device_state(collector), device_state(collector, "dev-2"))
    wrong_key = bytes(32)
    good = telemetry(w, 2)
    cases = {
        "too_large": telemetry(w, 3, {f"m{i}": float(i) for i in range(100)}),
        "malformed": [b"", b"hello world", b"\x02" + good[1:], good[:19]],
        "unknown_session": dg.encode_datagram(
            w["key"], DatagramType.HEARTBEAT, w["session_id"] ^ 1, 5, 0, b"\0\0\0\0"
        ),
        "bad_tag": [
            telemetry(w, 4, key=wrong_key),
            good[:-1] + bytes([good[-1] ^ 1]),
            good[:25] + b"X" + good[26:],
        ],
        "replay": telemetry(w, 1),
    }
    for datagrams in cases.values():
        for data in datagrams if isinstance(datagrams, list) else [datagrams]:
            await sock.sendto(data, collector.udp_address)
    await settle()
    stats = collector.statistics()
    assert stats.rejected == {
        "too_large": 1,
        "malformed": 4,
        "unknown_session": 1,
        "bad_tag": 3,
        "replay": 1,
        "over_limit": 0,
        "rate_limited": 0,
        "banned": 0,
    }
    after = (device_state(collector), device_state(collector, "dev-2"))
    dup = attrs.evolve(before[0], duplicates=1)  # the replay verified: it is dev-1's own datagram
    assert after == (dup, before[1])
    assert len(log.telemetry) == 2
    # an authenticated datagram with a payload that does not decode is dev-1's problem only
    bad_payload = dg.encode_datagram(
        w["key"], DatagramType.TELEMETRY, w["session_id"], 9, 0, b"\x01\x01t\x09"
    )
    await sock.sendto(bad_payload, collector.udp_address)
    await sock.sendto(good, collector.udp_address)
    await settle()
    assert collector.statistics().devices["dev-1"].malformed == 1
    assert collector.statistics().devices["dev-1"].datagrams == 2
    assert device_state(collector, "dev-2") == before[1]


async def test_datagrams_a_device_must_not_send_are_malformed(nursery, autojump_clock):
    collector, _ = await start_collector(nursery)
    _conn, w = await registered(collector)
    sock = await udp_socket()
    for t in (DatagramType.COMMAND, DatagramType.WELCOME):
        await sock.sendto(
            dg.encode_datagram(w["key"], t, w["session_id"], 1, 0, b"{}"), collector.udp_address
        )
    await settle()
    assert collector.statistics().rejected["malformed"] == 2


async def test_rejections_are_logged_rate_limited(nursery, autojump_clock, caplog):
    collector, _ = await start_collector(nursery, log_rate_limit=5.0)
    sock = await udp_socket()
    for _ in range(50):
        await sock.sendto(b"x" * 40, collector.udp_address)
    await settle()
    lines = [r for r in caplog.records if "rejected datagram" in r.getMessage()]
    assert collector.statistics().rejected["malformed"] == 50
    assert len(lines) == 5
    await trio.sleep(1.5)
    await sock.sendto(b"x" * 40, collector.udp_address)
    await settle()
    assert any("45 similar lines suppressed" in r.getMessage() for r in caplog.records)


def hello(device_id, counter, *, secret=None, nonce=None, pad=b""):
    key = auth.hello_key(secret or SECRETS[device_id])
    nonce = nonce or secrets.token_bytes(16)
    payload = dg.encode_hello_payload(device_id, nonce) + pad
    return dg.encode_datagram(key, DatagramType.HELLO, 0, counter, 0, payload), nonce


async def test_hello_opens_a_session_and_welcome_is_never_larger(nursery, autojump_clock):
    collector, _ = await start_collector(nursery)
    sock = await udp_socket()
    data, nonce = hello("udp-1", 7)
    reply = await exchange(sock, collector, data)
    assert reply is not None and len(reply) == len(data) == 64
    h = dg.decode_header_untrusted(reply)
    assert (h.type, h.seq) == (DatagramType.WELCOME, 7)
    w = dg.decode_welcome_untrusted(dg.payload_of(reply))
    assert (w.heartbeat_ms, w.timeout_ms, w.max_datagram) == (5000, 15000, 1200)
    key = auth.session_key(
        SECRETS["udp-1"], "udp-1", w.server_nonce.hex(), nonce.hex(), h.session_id
    )
    assert dg.verify_tag(key, reply)
    ack = await exchange(
        sock,
        collector,
        telemetry({"key": key, "session_id": h.session_id}, 1, flags=Flag.ACK_REQUESTED),
    )
    assert ack is not None
    assert collector.statistics().devices["udp-1"].online


async def test_bad_hellos_get_no_answer_and_are_counted(nursery, autojump_clock):
    collector, _ = await start_collector(nursery, max_devices=1)
    sock = await udp_socket()
    first, _ = hello("udp-1", 100)
    assert await exchange(sock, collector, first) is not None
    cases = [
        ("replay", first),  # the same HELLO again
        ("replay", hello("udp-1", 99)[0]),  # an older counter
        ("bad_tag", hello("udp-1", 200, secret="wrong")[0]),
        ("bad_tag", hello("nobody", 1, secret="x")[0]),  # unknown device
        ("malformed", hello("udp-1", 201)[0][:40]),
        ("over_limit", hello("udp-2", 1)[0]),  # max_devices=1 and udp-1 is online
    ]
    for reason, data in cases:
        before = dict(collector.statistics().rejected)
        assert await exchange(sock, collector, data, wait=0.2) is None, reason
        after = collector.statistics().rejected
        assert after[reason] == before[reason] + 1, reason
    # a session id in a HELLO is malformed
    key = auth.hello_key(SECRETS["udp-1"])
    bad = dg.encode_datagram(
        key, DatagramType.HELLO, 5, 300, 0, dg.encode_hello_payload("udp-1", bytes(16))
    )
    assert await exchange(sock, collector, bad, wait=0.2) is None
    assert collector.statistics().rejected["malformed"] == 2


async def test_hello_again_supersedes(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    sock = await udp_socket()
    assert await exchange(sock, collector, hello("udp-1", 1)[0]) is not None
    assert await exchange(sock, collector, hello("udp-1", 2)[0]) is not None
    assert [e.reason for e in log.of(DeviceOffline)] == ["superseded"]
    assert collector.statistics().devices["udp-1"].sessions == 2


async def test_client_library_round_trip_with_acks(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    async with open_device(
        "127.0.0.1", "dev-4", SECRETS["dev-4"], tcp_port=collector.tcp_address[1]
    ) as dev:
        for i in range(10):
            await dev.send_readings({"i": i}, ack=True)
        assert dev.acked == 10 and dev.retransmits == 0
    assert [t.readings[0][1] for t in log.telemetry] == list(range(10))
