"""The TCP control channel over loopback: registration, errors and limits, config push."""

from __future__ import annotations

import json

import pytest
import trio

from collector.device.client import RegistrationError, open_device, open_udp_device

from .helpers import SECRETS, Lines, start_collector


async def expect_error_then_close(lines: Lines, code: str) -> None:
    msg = await lines.recv()
    assert msg is not None and msg["type"] == "error" and msg["code"] == code, msg
    assert msg["message"]
    assert await lines.recv() is None  # closed


async def challenged(collector) -> Lines:
    lines = await Lines.connect(collector)
    challenge = await lines.recv()
    assert (
        challenge is not None and challenge["type"] == "challenge" and len(challenge["nonce"]) == 32
    )
    return lines


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"this is not json\n", "bad_json"),
        (b'{"type": "ping"}\n', "not_registered"),
        (b'{"type": "launch_missiles"}\n', "unknown_type"),
        (b'{"type": "register", "device_id": "dev-1"}\n', "bad_message"),
        (b"x" * 5000, "line_too_long"),
    ],
)
async def test_bad_lines_before_registration_get_an_error_and_a_close(
    nursery, autojump_clock, line, code
):
    collector, _ = await start_collector(nursery)
    lines = await challenged(collector)
    await lines.send(line)
    await expect_error_then_close(lines, code)
    assert collector.statistics().control_errors[code] == 1
    assert collector.statistics().devices == {}


async def test_wrong_proof_and_unknown_device_look_the_same(nursery, autojump_clock):
    collector, _ = await start_collector(nursery)
    for device_id, secret in [("dev-1", "wrong"), ("nobody", "whatever")]:
        lines = await Lines.connect(collector)
        msg = await lines.register(device_id, secret)
        assert msg["type"] == "error" and msg["code"] == "auth_failed"
        assert msg["message"] == "unknown device or wrong proof"
        assert await lines.recv() is None
    assert collector.statistics().control_errors["auth_failed"] == 2
    with pytest.raises(RegistrationError, match="auth_failed"):
        async with open_device("127.0.0.1", "dev-1", "nope", tcp_port=collector.tcp_address[1]):
            pass


async def test_registration_timeout(nursery, autojump_clock):
    collector, _ = await start_collector(nursery, registration_timeout=3.0)
    lines = await challenged(collector)
    start = trio.current_time()
    await expect_error_then_close(lines, "registration_timeout")
    assert 3.0 <= trio.current_time() - start < 3.1


async def test_too_many_connections(nursery, autojump_clock):
    collector, _ = await start_collector(nursery, max_tcp_connections=2)
    held = [await challenged(collector), await challenged(collector)]
    extra = await Lines.connect(collector)
    await expect_error_then_close(extra, "too_many_connections")
    await held[0].stream.aclose()
    await trio.sleep(0.1)
    assert (await challenged(collector)) is not None  # room again
    assert collector.statistics().tcp_connections_total == 4


async def test_too_many_devices(nursery, autojump_clock):
    collector, _ = await start_collector(nursery, max_devices=1)
    first = await Lines.connect(collector)
    assert (await first.register("dev-1"))["type"] == "welcome"
    second = await Lines.connect(collector)
    msg = await second.register("dev-2")
    assert msg["code"] == "too_many_devices"
    again = await Lines.connect(collector)  # the online device itself may re-register
    assert (await again.register("dev-1"))["type"] == "welcome"


async def test_errors_after_registration_keep_the_session(nursery, autojump_clock):
    collector, _ = await start_collector(nursery)
    lines = await Lines.connect(collector)
    await lines.register("dev-1")
    for line, code in [
        (b"{nope\n", "bad_json"),
        (b'{"type": "teleport"}\n', "unknown_type"),
        (b'{"type": "ack", "id": "c999"}\n', "unknown_command"),
        (b'{"type": "welcome"}\n', "unexpected_message"),
    ]:
        await lines.send(line)
        msg = await lines.recv()
        assert msg is not None and (msg["type"], msg["code"]) == ("error", code)
    await lines.send({"type": "ping"})
    assert await lines.recv() == {"type": "pong"}
    assert collector.statistics().devices_online == 1
    await lines.send(b"y" * 5000)
    await expect_error_then_close(lines, "line_too_long")
    await trio.sleep(0.1)
    assert collector.statistics().devices_online == 0


async def test_welcome_carries_everything_a_device_needs(nursery, autojump_clock):
    collector, _ = await start_collector(nursery, heartbeat_interval=2.0, timeout=7.0)
    lines = await Lines.connect(collector)
    welcome = await lines.register("dev-1")
    assert welcome["udp_port"] == collector.udp_address[1]
    assert (
        welcome["heartbeat_interval"],
        welcome["timeout"],
        welcome["max_datagram"],
        welcome["cipher"],
    ) == (2.0, 7.0, 1200, "chacha20-poly1305")
    assert 0 < welcome["session_id"] < 2**32


async def test_config_push_by_glob_reaches_tcp_and_udp_devices_and_later_ones(
    nursery, autojump_clock
):
    collector, _ = await start_collector(nursery)
    port, uport = collector.tcp_address[1], collector.udp_address[1]
    async with (
        open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port) as d1,
        open_device("127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=port) as d2,
        open_udp_device("127.0.0.1", "udp-1", SECRETS["udp-1"], udp_port=uport) as u1,
    ):
        assert collector.push_config("dev-1", {"rate": 5}) == (["dev-1"], {})
        sent, failed = collector.push_config("*", {"unit": "C"})
        assert (sorted(sent), failed) == (["dev-1", "dev-2", "udp-1"], {})
        await trio.sleep(2)
        assert d1.config == {"rate": 5, "unit": "C"}
        assert d2.config == {"unit": "C"}
        assert u1.config == {"unit": "C"}  # delivered as a retransmitted `config` command
        async with open_device("127.0.0.1", "dev-3", SECRETS["dev-3"], tcp_port=port) as d3:
            assert d3.config == {"unit": "C"}  # in its welcome
    states = [c.state for c in collector.commands.commands.values()]
    assert states == ["acked"]


async def test_config_from_the_config_file_is_in_the_welcome(nursery, autojump_clock):
    from collector.config import DeviceConfigRule

    rules = (DeviceConfigRule("dev-*", {"rate": 1}), DeviceConfigRule("dev-2", {"rate": 9}))
    collector, _ = await start_collector(nursery, device_config=rules)
    for device_id, rate in [("dev-1", 1), ("dev-2", 9)]:
        lines = await Lines.connect(collector)
        welcome = await lines.register(device_id)
        assert welcome["config"] == {"rate": rate}
        json.dumps(welcome["config"])


async def test_what_is_queued_when_a_device_says_goodbye_is_dropped_quietly(
    nursery, autojump_clock
):
    """A config push queued for a device that says goodbye at that moment: found by the soak
    test (an internal error in the connection's writer, before it checked the state)."""
    collector, _ = await start_collector(nursery)
    for _ in range(30):
        lines = await Lines.connect(collector)
        assert (await lines.register("dev-1"))["type"] == "welcome"
        await lines.send({"type": "goodbye"})
        collector.push_config("dev-1", {"rate": 1})
        await trio.sleep(4)
        await lines.stream.aclose()
    assert not collector.boundary.counts
    assert collector.control.errors["internal_error"] == 0
