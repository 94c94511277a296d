"""Commands from the collector to devices, over TCP and over UDP with retransmission."""

from __future__ import annotations

import pytest
import trio

from collector.core.commands import CommandError
from collector.core.events import CommandUpdate
from collector.device.client import open_device, open_udp_device

from .helpers import SECRETS, Lines, start_collector


def states(log, command_id):
    return [e.state for e in log.of(CommandUpdate, command_id=command_id)]


async def handler(name, args):
    if name == "fail":
        raise RuntimeError("disk full")
    if name == "hang":
        await trio.sleep_forever()
    return {"echo": args}


async def test_tcp_command_acked_with_result_and_failed_with_error(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    async with open_device(
        "127.0.0.1",
        "dev-1",
        SECRETS["dev-1"],
        tcp_port=collector.tcp_address[1],
        on_command=handler,
    ):
        ok = collector.send_command("dev-1", "echo", {"x": 1})
        bad = collector.send_command("dev-1", "fail")
        await ok.done.wait()
        await bad.done.wait()
    assert (ok.state, ok.result, ok.transport) == ("acked", {"echo": {"x": 1}}, "tcp")
    assert states(log, ok.id) == ["queued", "sent", "acked"]
    assert (bad.state, bad.error) == ("failed", "RuntimeError: disk full")
    assert states(log, bad.id) == ["queued", "sent", "failed"]


async def test_tcp_command_times_out(nursery, autojump_clock):
    collector, log = await start_collector(nursery, command_timeout=10.0)
    async with open_device(
        "127.0.0.1",
        "dev-1",
        SECRETS["dev-1"],
        tcp_port=collector.tcp_address[1],
        on_command=handler,
    ):
        cmd = collector.send_command("dev-1", "hang")
        start = trio.current_time()
        await cmd.done.wait()
        assert trio.current_time() - start == pytest.approx(10.0, abs=0.01)
    assert states(log, cmd.id) == ["queued", "sent", "timed_out"]
    assert cmd.error == "no answer within 10s"


async def test_queued_for_an_offline_device_then_delivered_or_expired(nursery, autojump_clock):
    collector, log = await start_collector(nursery)
    later = collector.send_command("dev-2", "echo", {"n": 2}, expires_in=60)
    never = collector.send_command("dev-3", "echo", expires_in=30)
    await trio.sleep(20)
    assert later.state == "queued"
    async with open_device(
        "127.0.0.1",
        "dev-2",
        SECRETS["dev-2"],
        tcp_port=collector.tcp_address[1],
        on_command=handler,
    ):
        await later.done.wait()
    await never.done.wait()
    assert (later.state, later.result) == ("acked", {"echo": {"n": 2}})
    assert (never.state, never.error) == ("expired", "the device did not come online in time")
    assert states(log, never.id) == ["queued", "expired"]


async def test_session_ending_while_waiting_fails_the_command(nursery, autojump_clock):
    collector, _ = await start_collector(nursery)
    async with open_device(
        "127.0.0.1",
        "dev-1",
        SECRETS["dev-1"],
        tcp_port=collector.tcp_address[1],
        on_command=handler,
    ):
        cmd = collector.send_command("dev-1", "hang")
        await trio.sleep(1)
        collector.kick("dev-1")
        await cmd.done.wait()
    assert cmd.state == "failed"
    assert cmd.error == "the device's session ended (kicked) before it answered"


async def test_bad_commands_are_refused(nursery, autojump_clock):
    collector, _ = await start_collector(nursery, command_queue=2)
    with pytest.raises(CommandError) as info:
        collector.send_command("nobody", "echo")
    assert info.value.code == "unknown_device"
    collector.send_command("dev-1", "a")
    collector.send_command("dev-1", "b")
    with pytest.raises(CommandError) as info:
        collector.send_command("dev-1", "c")
    assert info.value.code == "queue_full"
    with pytest.raises(CommandError):
        collector.send_command("dev-1", "")


async def test_udp_command_is_retransmitted_until_acked_and_runs_once(nursery, autojump_clock):
    collector, _ = await start_collector(nursery)
    runs = []

    async def count(name, args):
        runs.append(name)
        return {"ran": len(runs)}

    async with open_udp_device(
        "127.0.0.1",
        "udp-1",
        SECRETS["udp-1"],
        udp_port=collector.udp_address[1],
        on_command=count,
    ) as dev:
        # The first two COMMAND datagrams are lost on the way out of the collector.
        real_send = collector.commands.send_datagram
        lost = []

        def lossy_send(data, addr):
            if len(lost) < 2:
                lost.append(data)
                return True
            return real_send(data, addr)

        collector.commands.send_datagram = lossy_send
        await dev.send_heartbeat()
        await trio.sleep(0.1)
        start = trio.current_time()
        cmd = collector.send_command("udp-1", "reboot")
        await cmd.done.wait()
        elapsed = trio.current_time() - start
    assert (cmd.state, cmd.result, cmd.transport) == ("acked", {"ran": 1}, "udp")
    assert len(lost) == 2 and lost[0] == lost[1]  # a retransmission is the same bytes
    assert cmd.attempts == 3 and runs == ["reboot"]
    assert 0.5 + 1.0 <= elapsed < 0.5 + 1.0 + 0.1  # retransmitted after 0.5 s and 1 s
    assert collector.statistics().command_retransmits == 2


async def test_udp_device_answers_a_duplicate_command_with_its_earlier_ack(nursery, autojump_clock):
    collector, _ = await start_collector(nursery)
    runs = []

    async def count(name, args):
        runs.append(name)
        return len(runs)

    async with open_udp_device(
        "127.0.0.1",
        "udp-1",
        SECRETS["udp-1"],
        udp_port=collector.udp_address[1],
        on_command=count,
    ) as dev:
        # Drop the device's first ACK on the way out: the collector retransmits the command,
        # and the device must answer from its cache instead of running it again.
        real = dev.transmit
        dropped = []

        async def drop_first_ack(data):
            if data[1] == 3 and not dropped:
                dropped.append(data)
                return
            await real(data)

        dev.transmit = drop_first_ack
        cmd = collector.send_command("udp-1", "once")
        await cmd.done.wait()
    assert cmd.state == "acked" and cmd.result == 1 and runs == ["once"] and dropped


async def test_shutdown_waits_for_sent_commands_and_expires_queued_ones(nursery, autojump_clock):
    collector, _ = await start_collector(nursery, shutdown_grace=5.0)

    async def slow(name, args):
        await trio.sleep(2)
        return "done"

    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1], on_command=slow
    ):
        sent = collector.send_command("dev-1", "slow")
        queued = collector.send_command("dev-5", "x")
        await trio.sleep(0.1)
        report = await collector.shutdown()
    assert (sent.state, sent.result) == ("acked", "done")
    assert (queued.state, queued.error) == ("expired", "the collector is shutting down")
    assert report.commands_answered_in_grace == 1 and report.commands_abandoned == 1
    assert report.clean and report.duration == pytest.approx(
        1.9, abs=0.05
    )  # the answer came 2 s after sending


async def test_ack_from_another_device_is_not_accepted(nursery, autojump_clock):
    collector, _ = await start_collector(nursery)
    async with open_device(
        "127.0.0.1",
        "dev-1",
        SECRETS["dev-1"],
        tcp_port=collector.tcp_address[1],
        on_command=handler,
    ):
        cmd = collector.send_command("dev-1", "hang", timeout=5)
        other = await Lines.connect(collector)
        await other.register("dev-2")
        await other.send({"type": "ack", "id": cmd.id, "ok": True, "result": "forged"})
        msg = await other.recv()
        assert msg is not None and msg["code"] == "unknown_command"
        await cmd.done.wait()
    assert cmd.state == "timed_out"
