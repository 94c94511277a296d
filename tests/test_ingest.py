"""Datagrams over real loopback sockets: acceptance, accounting, and every kind of bad input."""

from __future__ import annotations

import secrets

import attrs
import pytest
import trio

from collector.config import DeviceConfigRule
from collector.core.events import DeviceOffline
from collector.device.client import open_device
from collector.wire import datagram as dg
from collector.wire.crypto import COLLECTOR_TO_DEVICE, Aead, DeviceKeys, session_keys
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


def opened(welcome, data):
    """The payload of a datagram from the collector, opened with the session's other key."""
    return dg.open_datagram_untrusted(Aead(welcome["key_in"]), data, COLLECTOR_TO_DEVICE)


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
    assert (h.type, h.session_id) == (DatagramType.ACK, w["session_id"])
    assert dg.decode_ack_untrusted(opened(w, ack)).acked_seq == 1
    again = await exchange(sock, collector, data)  # the device did not get the ACK: retransmits
    assert again is not None and dg.decode_ack_untrusted(opened(w, again)).acked_seq == 1
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
        "malformed": [b"", b"hello world", b"\x01" + good[1:], good[:19]],
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


def hello(device_id, cnonce=None, cookie=dg.NO_COOKIE, *, secret=None):
    """A HELLO datagram, its nonce, and the device's keys."""
    keys = DeviceKeys(secret or SECRETS[device_id])
    cnonce = cnonce or secrets.token_bytes(16)
    data = dg.encode_hello(Aead(keys.hello_d2c), device_id, cnonce, cookie)
    return data, dg.parse_hello_untrusted(data).nonce, cnonce, keys


async def register_by_hello(sock, collector, device_id):
    """HELLO, COOKIE, HELLO, WELCOME by hand; returns what a test needs, and the datagrams."""
    first, nonce, cnonce, keys = hello(device_id)
    answer = await exchange(sock, collector, first)
    assert answer is not None and dg.decode_header_untrusted(answer).type == DatagramType.COOKIE
    cookie = dg.open_cookie_untrusted(Aead(keys.hello_c2d), answer, nonce)
    second, _, _, _ = hello(device_id, cnonce, cookie)
    reply = await exchange(sock, collector, second)
    assert reply is not None and dg.decode_header_untrusted(reply).type == DatagramType.WELCOME
    sid, snonce = dg.welcome_nonce_untrusted(reply)
    d2c, c2d = session_keys(keys.secret, device_id, snonce, cnonce, sid)
    welcome = dg.open_welcome_untrusted(Aead(c2d), reply)
    return {
        "key": d2c,
        "key_in": c2d,
        "session_id": sid,
        "welcome": welcome,
        "hellos": (first, second),
        "reply": reply,
        "cookie_answer": answer,
    }


async def test_hello_needs_a_cookie_then_opens_a_session_and_never_amplifies(
    nursery, autojump_clock
):
    collector, _ = await start_collector(
        nursery, device_config=(DeviceConfigRule("udp-*", {"rate": 2}),)
    )
    sock = await udp_socket()
    r = await register_by_hello(sock, collector, "udp-1")
    first, second = r["hellos"]
    assert len(r["cookie_answer"]) == 76 < len(first) == len(second) == 86
    w = r["welcome"]
    assert (w.heartbeat_ms, w.timeout_ms, w.max_datagram) == (5000, 15000, 1200)
    assert w.config == {"rate": 2}  # the configuration that applies comes in the WELCOME
    ack = await exchange(sock, collector, telemetry(r, 1, flags=Flag.ACK_REQUESTED))
    assert ack is not None and dg.decode_ack_untrusted(opened(r, ack)).acked_seq == 1
    assert collector.statistics().devices["udp-1"].online
    assert collector.ingest.cookies_sent == 1


async def test_bad_hellos_get_no_welcome_and_are_counted(nursery, autojump_clock):
    collector, _ = await start_collector(nursery, max_devices=1)
    sock, other = await udp_socket(), await udp_socket()
    r = await register_by_hello(sock, collector, "udp-1")
    first, second = r["hellos"]
    # The same HELLO again from the same address: the device did not get its WELCOME.
    assert await exchange(sock, collector, second) == r["reply"]
    # From another address, its cookie is worthless: a COOKIE for that address, no WELCOME.
    answer = await exchange(other, collector, second)
    assert dg.decode_header_untrusted(answer).type == DatagramType.COOKIE
    cases = [
        ("bad_tag", hello("udp-1", secret="wrong")[0]),
        ("bad_tag", hello("nobody", secret="x")[0]),  # unknown device
        ("malformed", first[:60]),
        ("malformed", first[:20] + b"\x07" + first[21:]),  # its id length does not fit
    ]
    for reason, data in cases:
        before = dict(collector.statistics().rejected)
        assert await exchange(sock, collector, data, wait=0.2) is None, reason
        assert collector.statistics().rejected[reason] == before[reason] + 1, reason
    # udp-2 with a good cookie, but max_devices=1 and udp-1 is online
    with pytest.raises(AssertionError):
        await register_by_hello(sock, collector, "udp-2")
    assert collector.statistics().rejected["over_limit"] == 1
    # a session id or a sequence number in a HELLO is malformed
    bad = first[:4] + b"\0\0\0\5" + first[8:]
    assert await exchange(sock, collector, bad, wait=0.2) is None
    assert collector.statistics().rejected["malformed"] == 3


async def test_a_captured_hello_replayed_after_restarts_never_gets_a_welcome(
    nursery, autojump_clock
):
    """Someone on the path captures a device's HELLOs (both of them), and replays them to the
    collector after each of several restarts, while the device has a session there."""
    captured: list[bytes] = []
    attacker = await udp_socket()
    for run in range(4):
        async with trio.open_nursery() as inner:
            collector, log = await start_collector(inner)
            sock = await udp_socket()
            r = await register_by_hello(sock, collector, "udp-1")
            if not captured:
                captured = list(r["hellos"])
            sid = r["session_id"]
            for data in captured:
                for source in (attacker, sock):  # from the attacker, or spoofing the device
                    answer = await exchange(source, collector, data, wait=0.2)
                    if run == 0 and source is sock and data is captured[1]:
                        assert answer == r["reply"]  # this run's own retransmission
                        continue
                    assert (
                        answer is None
                        or dg.decode_header_untrusted(answer).type == DatagramType.COOKIE
                    )
            assert collector.registry.online["udp-1"].session_id == sid  # never superseded
            assert not log.of(DeviceOffline)
            assert collector.statistics().devices["udp-1"].sessions == 1
            inner.cancel_scope.cancel()


async def test_hello_again_supersedes(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    sock = await udp_socket()
    await register_by_hello(sock, collector, "udp-1")
    await register_by_hello(sock, collector, "udp-1")
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
