"""The HTTP port: API, metrics, access control, and the WebSocket stream end to end."""

from __future__ import annotations

import functools
import json
import logging

import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from collector.core.events import Telemetry
from collector.device.client import open_device
from collector.wire.datagram import Reading

from .helpers import SECRETS, api, http, start_collector, ws_handshake


async def start(nursery, **overrides):
    overrides.setdefault("http_port", 0)
    return await start_collector(nursery, **overrides)


def ws_url(collector, token=None):
    return f"ws://127.0.0.1:{collector.http_address[1]}/stream" + (
        f"?token={token}" if token else ""
    )


async def next_of(ws, *types, limit=200):
    for _ in range(limit):
        msg = json.loads(await ws.get_message())
        if msg["type"] in types:
            return msg
    raise AssertionError(f"no {types} in {limit} messages")


async def subscribed(ws, **fields):
    await ws.send_message(json.dumps({"type": "subscribe", **fields}))
    parts = []
    while True:
        msg = await next_of(ws, "snapshot")
        parts.append(msg)
        if msg["part"] == msg["parts"]:
            return [d for p in parts for d in p["devices"]], parts


async def test_pages_health_and_errors(nursery, autojump_clock):
    collector, _ = await start(nursery)
    status, headers, body = await http(collector, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<" in body
    status, health = await api(collector, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["devices_known"] == len(SECRETS)
    assert await api(collector, "GET", "/nowhere") == (
        404,
        {"error": {"code": "not_found", "message": "no route '/nowhere'"}},
    )
    assert (await api(collector, "DELETE", "/api/devices"))[0] == 405
    assert (await http(collector, "GET", "/static/../app.py"))[0] == 404
    status, _, _ = await http(collector, "POST", "/api/config", b"x" * 70_000)
    assert status == 413


async def test_device_api_and_commands_end_to_end(nursery, autojump_clock):
    collector, _ = await start(nursery)

    async def handler(name, args):
        return {"did": name, **args}

    async with open_device(
        "127.0.0.1",
        "dev-1",
        SECRETS["dev-1"],
        tcp_port=collector.tcp_address[1],
        on_command=handler,
    ) as dev:
        await dev.send_readings({"temperature": 21.5, "door": True})
        await trio.sleep(0.1)
        status, listing = await api(collector, "GET", "/api/devices")
        assert status == 200
        d1 = next(d for d in listing["devices"] if d["id"] == "dev-1")
        assert d1["online"] and d1["transport"] == "tcp" and d1["values"]["temperature"][1] == 21.5
        assert next(d for d in listing["devices"] if d["id"] == "dev-2")["online"] is False
        status, cmd = await api(
            collector, "POST", "/api/devices/dev-1/commands", {"name": "open", "args": {"valve": 2}}
        )
        assert status == 202 and cmd["state"] == "queued"
        await collector.commands.get(cmd["id"]).done.wait()
        status, done = await api(collector, "GET", f"/api/commands/{cmd['id']}")
        assert (done["state"], done["result"]) == ("acked", {"did": "open", "valve": 2})
        status, detail = await api(collector, "GET", "/api/devices/dev-1?history=10")
        assert detail["history"]["temperature"][1] == [21.5] and detail["history"]["door"][1] == [
            1.0
        ]
        assert [c["id"] for c in detail["commands"]] == [cmd["id"]]
        assert (await api(collector, "POST", "/api/devices/dev-1/kick"))[0] == 200
        await dev.ended.wait()
    status, detail = await api(collector, "GET", "/api/devices/dev-1")
    assert detail["online"] is False and detail["reason"] == "kicked"
    assert [s["reason"] for s in detail["session_history"]] == ["kicked"]
    assert detail["sessions"] == 1  # a count, as in every device object


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/api/devices/nobody/commands", {"name": "x"}, 404, "unknown_device"),
        ("GET", "/api/devices/nobody", None, 404, "unknown_device"),
        ("POST", "/api/devices/dev-1/commands", b"{not json", 400, "bad_json"),
        ("POST", "/api/devices/dev-1/commands", {"args": {}}, 400, "bad_command"),
        ("POST", "/api/devices/dev-1/commands", {"name": "x", "timeout": -1}, 400, "bad_command"),
        ("POST", "/api/devices/dev-1/kick", None, 409, "not_online"),
        ("GET", "/api/commands/c999999", None, 404, "unknown_command"),
        ("POST", "/api/config", {"match": 3}, 400, "bad_config"),
        ("GET", "/api/devices/dev-1?history=x", None, 400, "bad_parameter"),
    ],
)
async def test_api_errors(nursery, autojump_clock, method, path, body, status, code):
    collector, _ = await start(nursery)
    got_status, got = await api(collector, method, path, body)
    assert (got_status, got["error"]["code"]) == (status, code)
    assert (
        collector.http.requests[
            (next(iter(r for r, s in collector.http.requests if s == status)), status)
        ]
        == 1
    )


async def test_command_queue_full_is_409(nursery, autojump_clock):
    collector, _ = await start(nursery, command_queue=1)
    assert (await api(collector, "POST", "/api/devices/dev-3/commands", {"name": "a"}))[0] == 202
    status, body = await api(collector, "POST", "/api/devices/dev-3/commands", {"name": "b"})
    assert (status, body["error"]["code"]) == (409, "queue_full")


async def test_metrics_are_prometheus_text(nursery, autojump_clock):
    collector, _ = await start(nursery)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        await dev.send_readings({"t": 1.0})
        await trio.sleep(0.1)
        status, headers, body = await http(collector, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("collector_datagrams_accepted_total", ())] == 1
    assert samples[("collector_device_readings_total", (("device", "dev-1"),))] == 1
    assert samples[("collector_device_online", (("device", "dev-1"),))] == 1
    assert samples[("collector_datagrams_rejected_total", (("reason", "bad_tag"),))] == 0
    assert ("collector_stream_subscribers", ()) in samples
    assert ("process_resident_memory_bytes", ()) in samples


async def test_access_control(nursery, autojump_clock, caplog):
    collector, _ = await start(nursery, read_tokens=("r-token",), command_tokens=("c-token",))
    assert "access control is OFF" not in caplog.text
    assert (await api(collector, "GET", "/api/devices"))[0] == 401
    assert (await api(collector, "GET", "/api/devices", token="wrong"))[0] == 401
    assert (await http(collector, "GET", "/metrics"))[0] == 401
    assert (await http(collector, "GET", "/metrics", token="r-token"))[0] == 200
    assert (await api(collector, "GET", "/api/devices", token="r-token"))[0] == 200
    status, body = await api(
        collector, "POST", "/api/devices/dev-1/commands", {"name": "x"}, token="r-token"
    )
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert (
        await api(collector, "POST", "/api/devices/dev-1/commands", {"name": "x"}, token="c-token")
    )[0] == 202
    assert (await api(collector, "GET", "/healthz"))[0] == 200
    with pytest.raises(trio_websocket.ConnectionRejected) as info:
        async with open_websocket_url(ws_url(collector, "wrong")):
            pass
    assert info.value.status_code == 401
    async with open_websocket_url(ws_url(collector, "r-token")) as ws:
        hello = json.loads(await ws.get_message())
        assert hello["type"] == "hello" and hello["can_command"] is False
    async with open_websocket_url(ws_url(collector, "c-token")) as ws:
        assert json.loads(await ws.get_message())["can_command"] is True
    assert collector.hub.errors["unauthorized"] == 1


async def test_access_control_off_is_logged(nursery, autojump_clock, caplog):
    with caplog.at_level(logging.WARNING):
        await start(nursery)
    assert "HTTP access control is OFF" in caplog.text


async def test_stream_snapshot_then_live_updates_in_order(nursery, autojump_clock):
    collector, _ = await start(nursery)
    port = collector.tcp_address[1]
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port, on_command=lambda n, a: "done"
    ) as dev:
        await dev.send_readings({"temperature": 20.0, "humidity": 50.0})
        await trio.sleep(0.1)
        async with open_websocket_url(ws_url(collector)) as ws:
            hello = json.loads(await ws.get_message())
            assert (hello["type"], hello["seq"], hello["protocol"]) == ("hello", 1, 1)
            devices, parts = await subscribed(ws, devices=["dev-*"], metrics=["temp*"], history=10)
            assert len(devices) == 8 and parts[0]["subscription"]["metrics"] == ["temp*"]
            d1 = next(d for d in devices if d["id"] == "dev-1")
            assert d1["online"] and d1["values"] == {
                "temperature": [d1["values"]["temperature"][0], 20.0]
            }
            assert d1["history"]["temperature"][1] == [20.0]
            await dev.send_readings({"temperature": 21.0, "humidity": 51.0})
            msg = await next_of(ws, "readings")
            assert [r[1:] for r in msg["readings"]] == [
                ["temperature", msg["readings"][0][2], 21.0]
            ]
            cmd = collector.send_command("dev-1", "ping")
            states = [(await next_of(ws, "command"))["state"] for _ in range(3)]
            assert states == ["queued", "sent", "acked"] and cmd.result == "done"
            collector.kick("dev-1")
            event = await next_of(ws, "device")
            assert (event["device"], event["online"], event["reason"]) == ("dev-1", False, "kicked")
            beat = await next_of(ws, "heartbeat")
            assert beat["missed"] == 0 and beat["stream_seq"] >= 5


async def test_seq_is_gapless_and_heartbeats_keep_coming(nursery, autojump_clock):
    collector, _ = await start(nursery)
    async with open_websocket_url(ws_url(collector)) as ws:
        await ws.send_message(json.dumps({"type": "subscribe"}))
        seqs, beats = [], 0
        with trio.move_on_after(5.5):
            while True:
                msg = json.loads(await ws.get_message())
                seqs.append(msg["seq"])
                beats += msg["type"] == "heartbeat"
        assert seqs == list(range(1, len(seqs) + 1))
        assert beats == 5


async def test_changing_the_subscription_without_reconnecting(nursery, autojump_clock):
    collector, _ = await start(nursery)
    async with open_websocket_url(ws_url(collector)) as ws:
        devices, _ = await subscribed(ws, devices=["udp-*"])
        assert sorted(d["id"] for d in devices) == ["udp-1", "udp-2"]
        devices, _ = await subscribed(ws, devices=["dev-1", "dev-2"])
        assert sorted(d["id"] for d in devices) == ["dev-1", "dev-2"]


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", "bad_json"),
        ('{"type": "fly"}', "unknown_type"),
        ('{"type": "subscribe", "max_rate": -1}', "bad_message"),
        (b"\x00\x01", "bad_message"),
        ('{"type": "subscribe", "devices": ["nothing-*"]}', "no_match"),
    ],
)
async def test_bad_stream_messages_get_an_error_and_the_stream_goes_on(
    nursery, autojump_clock, message, code
):
    collector, _ = await start(nursery)
    async with open_websocket_url(ws_url(collector)) as ws:
        await ws.get_message()  # hello
        await ws.send_message(message)
        error = await next_of(ws, "error")
        assert error["code"] == code and error["message"]
        await ws.send_message(json.dumps({"type": "ping", "id": 5}))
        assert (await next_of(ws, "pong"))["id"] == 5
    assert collector.hub.errors[code] == 1


async def test_bytes_sent_counts_utf8_bytes(nursery, autojump_clock):
    """A subscriber's `bytes_sent` is the UTF-8 size of what it was sent, not its characters:
    the stream's rows keep non-ASCII text (a string reading) as it is."""
    collector, _ = await start(nursery)
    async with open_websocket_url(ws_url(collector)) as ws:
        got = [await ws.get_message()]  # hello
        await ws.send_message(json.dumps({"type": "subscribe", "history": 0}))
        await trio.sleep(0.5)
        collector.hub.on_telemetry([Telemetry(1.0, "dev-1", 1, 0, (Reading("note", "café ☕"),))])
        while "café" not in got[-1]:
            got.append(await ws.get_message())
        [sub] = collector.hub.statistics()["per_subscriber"]
        assert sub["bytes_sent"] == sum(len(m.encode()) for m in got) > sum(map(len, got))


async def test_the_benchmarks_dashboard_reads_frames_of_every_size_and_answers_pings(
    nursery, autojump_clock
):
    """The benchmarks' dashboard (tools.common.read_stream) reads the server's frames by hand:
    lengths in 7, 16 and 64 bits, pings answered (else the collector closes it for a ping
    timeout, an error there). With `only`, the stats and heartbeats are skipped undecoded."""
    from collector.tools.common import read_stream

    collector, _ = await start(
        nursery, stream_heartbeat=0.5, stream_ping_interval=0.3, stream_ping_timeout=1
    )
    seen, everything = [], []
    port = collector.http_address[1]
    await nursery.start(
        functools.partial(read_stream, only=("readings",)),
        port,
        lambda _, m: seen.append((m["type"], len(m.get("readings", ())))),
    )
    await nursery.start(read_stream, port, lambda _, m: everything.append(m["type"]))
    for k, size in enumerate((1, 20, 1500, 1, 2000)):  # messages of 60 B, 1 kB, 80 kB, ...
        await trio.sleep(0.5)
        metric = "a-long-metric-name-" * 2
        batch = [Telemetry(1.0, f"d{i}", k, 0, (Reading(metric, 1.5),)) for i in range(size)]
        collector.hub.on_telemetry(batch)
    await trio.sleep(3)  # pinged ten times meanwhile
    assert seen == [("readings", n) for n in (1, 20, 1500, 1, 2000)]
    assert {"snapshot", "readings", "heartbeat"} <= set(everything)  # all after the hello
    assert everything.count("readings") == 5
    assert collector.hub.closed_by_reason == {}


async def test_a_slow_dashboard_gets_every_frame_whole_and_in_order(nursery, monkeypatch):
    """The hub writes for idle senders, a frame the socket takes only in part is finished
    before anything else, and pings go between frames, never inside one: a client with a
    small buffer that reads slowly, pinged every 5 ms, gets valid frames numbered 1, 2, 3..."""
    from wsproto.events import Ping, TextMessage

    from collector.servers.http import PrefixedStream

    offer, in_part = PrefixedStream.offer, []

    def spy(self, data):
        taken = offer(self, data)
        in_part.append(self.tail is not None)
        return taken

    monkeypatch.setattr(PrefixedStream, "offer", spy)
    collector, _ = await start(nursery, stream_ping_interval=0.005, stream_queue=100_000)
    sock, ws = await ws_handshake(collector)
    await sock.send(ws.send(TextMessage(data=json.dumps({"type": "subscribe", "history": 0}))))
    seqs, types, values, pings, parts = [], [], [], 0, []
    sent, per_batch = 8000, 400  # messages of about 20 kB, beyond what the socket holds

    async def receive():
        nonlocal pings
        data = await sock.recv(4096)
        assert data
        ws.receive_data(data)  # a frame broken into by another would fail here
        for event in ws.events():
            if isinstance(event, Ping):
                pings += 1
                await sock.send(ws.send(event.response()))
            elif isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    msg = json.loads("".join(parts))
                    parts.clear()
                    seqs.append(msg["seq"])
                    types.append(msg["type"])
                    if msg["type"] == "readings":
                        values.extend(row[3] for row in msg["readings"])

    async def feed():
        for b in range(sent // per_batch):
            batch = [
                Telemetry(1.0, "dev-1", k, 0, (Reading(f"m{k % 50}", float(k)),))
                for k in range(b * per_batch, (b + 1) * per_batch)
            ]
            collector.hub.on_telemetry(batch)
            await trio.sleep(0.001)

    with trio.fail_after(60):
        while "snapshot" not in types:  # subscribed: every reading from now on is for it
            await receive()
        nursery.start_soon(feed)
        while len(values) < sent:
            await receive()
            await trio.sleep(0.005)
    sock.close()
    assert seqs == list(range(1, len(seqs) + 1))
    assert values == [float(i) for i in range(sent)]  # none missed, none twice, in order
    assert pings >= 1 and any(in_part)  # pinged, and frames the socket took in part
    stats = collector.hub.statistics()
    assert 0 < stats["messages_direct"] < stats["messages_sent"]  # some waited for the socket


async def test_what_is_left_of_a_frame_goes_before_anything_else():
    """PrefixedStream.offer writes what the socket takes; the rest of that frame is written
    before any other write (a pong, a close, the next frame), so none breaks into it."""
    from collector.servers.http import PrefixedStream

    ours, peer = trio.socket.socketpair()
    ours.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    stream = PrefixedStream(trio.SocketStream(ours), b"")
    frame = bytes(range(256)) * 1000
    assert stream.offer(frame) and stream.tail is not None  # taken in part
    assert not stream.offer(b"next")  # nothing goes after a pending tail
    got = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"PONG")
            while len(got) < len(frame) + 4:
                got += await peer.recv(65536)
    assert bytes(got) == frame + b"PONG" and stream.tail is None
    assert stream.offer(b"more")
    assert await peer.recv(100) == b"more"
    # A write of the tail cancelled part way (a ping's timeout) sends nothing twice.
    assert stream.offer(frame) and stream.tail is not None
    got = bytearray()
    with trio.move_on_after(0.5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.flush)
            while len(got) < 50_000:  # some of the tail goes, then the reader stops
                got += await peer.recv(4096)
            await trio.sleep_forever()
    assert stream.tail is not None
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"CLOSE")
            while len(got) < len(frame) + 5:
                got += await peer.recv(65536)
    assert bytes(got) == frame + b"CLOSE"


async def test_a_value_max_rate_holds_back_goes_out_when_due(nursery, autojump_clock):
    """With max_rate 2 a second value within 0.5 s waits, and goes out when it falls due,
    not with the next reading or heartbeat (the hub writing for the idle sender must leave
    the sender's timer set for it)."""
    collector, _ = await start(nursery, stream_heartbeat=30)
    async with open_websocket_url(ws_url(collector)) as ws:
        await subscribed(ws, max_rate=2, history=0)
        t0 = trio.current_time()

        async def feed():
            for k, at in enumerate((0.0, 0.1)):
                await trio.sleep_until(t0 + at)
                row = Telemetry(1.0, "dev-1", k, 0, (Reading("x", float(k)),))
                collector.hub.on_telemetry([row])

        nursery.start_soon(feed)
        arrived = []
        while len(arrived) < 2:
            msg = json.loads(await ws.get_message())
            if msg["type"] == "readings":
                arrived += [(trio.current_time() - t0, row[3]) for row in msg["readings"]]
    assert [v for _, v in arrived] == [0.0, 1.0]
    assert arrived[0][0] < 0.1 and 0.45 < arrived[1][0] < 0.7


async def test_oversized_client_message_closes_with_1009(nursery, autojump_clock):
    collector, _ = await start(nursery, stream_max_message=1000)
    async with open_websocket_url(ws_url(collector)) as ws:
        await ws.get_message()
        await ws.send_message("x" * 2000)
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            for _ in range(10):
                await ws.get_message()
        assert info.value.reason.code == 1009
    await trio.sleep(0.1)
    assert collector.hub.closed_by_reason["message too big"] == 1


def _flood(collector, n_batches, per_batch=500):
    for b in range(n_batches):
        batch = [
            Telemetry(
                1.0,
                f"dev-{1 + i % 8}",
                b * per_batch + i,
                0,
                (Reading("x", float(b * per_batch + i)),),
            )
            for i in range(per_batch)
        ]
        collector.hub.on_telemetry(batch)


async def raw_subscriber(collector):
    """A WebSocket client on a socket with a tiny receive buffer that, once subscribed, never
    reads again."""
    from wsproto.events import TextMessage

    sock, ws = await ws_handshake(collector)
    await sock.send(ws.send(TextMessage(data=json.dumps({"type": "subscribe"}))))
    return sock


async def test_a_dashboard_that_never_reads_is_closed_and_slows_no_one(nursery, autojump_clock):
    collector, _ = await start(
        nursery, stream_queue=2000, stream_stall_limit=5.0, stream_ping_interval=1000.0
    )
    slow = await raw_subscriber(collector)
    async with open_websocket_url(ws_url(collector)) as fast:
        await fast.send_message(json.dumps({"type": "subscribe"}))
        await next_of(fast, "snapshot")
        received = sent = 0
        for _ in range(40):  # 20,000 readings, about 1 MB of JSON: more than the slow one takes
            _flood(collector, 1)
            sent += 500
            with trio.move_on_after(0.5):
                while received < sent:
                    msg = json.loads(await fast.get_message())
                    if msg["type"] == "readings":
                        received += len(msg["readings"])
        assert received == sent  # the reading dashboard got every single update
        subs = {s.remote.split(":")[-1]: s for s in collector.hub.subscribers}
        slow_sub = subs[str(slow.getsockname()[1])]
        fast_sub = next(s for s in collector.hub.subscribers if s is not slow_sub)
        assert fast_sub.missed_total == 0
        assert slow_sub.missed_total > 10_000 and slow_sub.queued <= 8  # coalesced to 8 series
        await trio.sleep(7)  # past the stall limit (closed within 1.25 times it)
        assert collector.hub.closed_by_reason["stalled"] == 1
        assert slow_sub.close_code == 4002
        assert list(collector.hub.subscribers) == [fast_sub]
    slow.close()


async def test_a_dashboard_that_does_not_answer_pings_is_closed(nursery, autojump_clock):
    collector, _ = await start(nursery, stream_ping_interval=2.0, stream_ping_timeout=3.0)
    # A raw socket that does the handshake and then ignores everything, pings included.
    stream = await trio.open_tcp_stream("127.0.0.1", collector.http_address[1])
    await stream.send_all(
        b"GET /stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    head = await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"sec-websocket-extensions" not in head.lower()  # compression is never negotiated
    await trio.sleep(6)
    assert collector.hub.closed_by_reason["ping timeout"] == 1
    await stream.aclose()


async def test_shutdown_sends_final_events_then_closes_1001(nursery, autojump_clock):
    collector, _ = await start(nursery)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ):
        async with open_websocket_url(ws_url(collector)) as ws:
            await subscribed(ws)
            nursery.start_soon(collector.shutdown)
            event = await next_of(ws, "device")
            assert (event["device"], event["reason"]) == ("dev-1", "shutdown")
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                while True:
                    await ws.get_message()
            assert info.value.reason.code == 1001


async def test_head_plain_stream_requests_and_a_bug_in_one_request(
    nursery, autojump_clock, monkeypatch
):
    collector, _ = await start(nursery)
    status, headers, body = await http(collector, "HEAD", "/")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, headers, body = await http(collector, "GET", "/stream")
    assert status == 426 and headers["upgrade"] == "websocket"
    assert json.loads(body)["error"]["code"] == "upgrade_required"

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(collector.http, "_healthz", broken)
    status, body = await api(collector, "GET", "/healthz")
    assert (status, body["error"]["code"]) == (500, "internal_error")  # answered, not dropped
    monkeypatch.undo()
    assert (await api(collector, "GET", "/healthz"))[0] == 200  # the collector is still there
    assert collector.http.requests[("internal_error", 500)] == 1
    assert collector.boundary.counts["http_request"] == 1


async def test_stream_events_carry_what_a_page_needs(nursery, autojump_clock):
    collector, _ = await start(nursery)
    async with open_websocket_url(ws_url(collector)) as ws:
        await subscribed(ws)
        async with open_device(
            "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
        ):
            online = await next_of(ws, "device")
            assert online["session_id"] == collector.registry.online["dev-1"].session_id
            collector.send_command("dev-1", "set", {"level": 3})
            queued = await next_of(ws, "command")
            assert (queued["state"], queued["args"]) == ("queued", {"level": 3})


async def test_snapshot_history_is_budgeted(nursery, autojump_clock, monkeypatch):
    from collector.core import hub as hub_module

    monkeypatch.setattr(hub_module, "SNAPSHOT_POINTS", 50)
    collector, _ = await start(nursery)
    batch = [
        Telemetry(1.0 + i, f"dev-{1 + i % 5}", i, 0, (Reading("x", float(i)),)) for i in range(100)
    ]
    collector.hub.on_telemetry(batch)
    async with open_websocket_url(ws_url(collector)) as ws:
        devices, _ = await subscribed(ws, history=300)
    assert all(
        len(d["history"]["x"][0]) == 10 for d in devices if d.get("history")
    )  # 50 / 5 series


async def test_kernel_drops_are_exported(nursery, autojump_clock):
    collector, _ = await start(nursery)
    _, _, body = await http(collector, "GET", "/metrics")
    assert b"collector_udp_kernel_drops_total 0.0" in body


async def test_declared_commands_have_their_arguments_checked(nursery, autojump_clock):
    from collector.config import ConfigError, config_from_mapping

    cfg = config_from_mapping(
        {
            "device_commands": {
                "set_interval": {
                    "devices": ["dev-1"],
                    "args": {"seconds": "number", "n": "integer", "quiet": "boolean"},
                    "required": ["seconds"],
                }
            }
        }
    )
    collector, _ = await start(nursery, declared_commands=cfg.declared_commands)
    status, meta = await api(collector, "GET", "/api/meta")
    assert meta["commands"][0]["args"]["seconds"] == "number"
    path = "/api/devices/dev-1/commands"
    for args, problem in [
        ({}, "needs the argument 'seconds'"),
        ({"seconds": "5"}, "must be a number"),
        ({"seconds": 5, "n": 1.5}, "must be an integer"),
        ({"seconds": 5, "quiet": 1}, "must be a boolean"),
        ({"seconds": 5, "colour": "red"}, "takes no argument 'colour'"),
    ]:
        status, body = await api(collector, "POST", path, {"name": "set_interval", "args": args})
        assert (status, body["error"]["code"]) == (400, "bad_command"), body
        assert problem in body["error"]["message"], body
    ok = {"name": "set_interval", "args": {"seconds": 5, "n": 2, "quiet": True}}
    status, body = await api(collector, "POST", path, ok)
    assert status == 202, body
    # another device is not declared to take it, and undeclared names go through as before
    status, _ = await api(
        collector, "POST", "/api/devices/dev-2/commands", {"name": "set_interval"}
    )
    assert status == 202
    status, _ = await api(collector, "POST", path, {"name": "anything", "args": {"x": 1}})
    assert status == 202
    with pytest.raises(ConfigError, match="required must list arguments named in args"):
        config_from_mapping({"device_commands": {"c": {"args": {}, "required": ["x"]}}})
    with pytest.raises(ConfigError, match="args maps argument names to a type"):
        config_from_mapping({"device_commands": {"c": {"args": {"x": "date"}}}})
