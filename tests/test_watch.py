"""collector watch, the terminal dashboard: its sans-IO model, its WebSocket client, its screen.

The model is fed whole conversations as plain dicts and text (no event loop, no clock); the
client runs against a small websockets server that plays the collector's part, including a
close with 1001 and a stall; the screen runs headless under textual's Pilot, once with a fake
stream and once end to end against a real `collector demo` process.

textual and websockets are asyncio libraries, so those tests are synchronous functions that
call asyncio.run() (pytest-trio only takes over `async def` tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


from collector.tools import watch  # noqa: E402

Row = watch.Row

T0 = 1_795_982_970.0  # the collector's clock at hello
SKEW = -100.0  # our clock is 100 s behind the collector's: ages must not show it


def local(t: float) -> float:
    """Our clock when the collector's reads t."""
    return t + SKEW


def device(id, *, online=True, reason=None, transport="tcp", last_seen=None, values=None, **stats):
    return {
        "id": id,
        "online": online,
        "reason": reason,
        "transport": transport if online else None,
        "address": "127.0.0.1:40000" if online else None,
        "since": T0 - 60,
        "last_seen": last_seen,
        "stats": {"rate": 1.0, "loss": 0.0, "last_seen": last_seen, "datagrams": 10, "lost": 0}
        | stats,
        "values": values or {},
        "commands": [],
    }


HELLO = {
    "type": "hello",
    "server": "trio-collector",
    "version": "0.1.0",
    "protocol": 1,
    "time": T0,
    "heartbeat_interval": 1.0,
    "history_max": 300,
    "can_command": False,
    "seq": 1,
}


def snapshot(devices, part, parts, seq):
    return {
        "type": "snapshot",
        "subscription": {"devices": ["*"], "metrics": ["*"], "max_rate": None, "history": 0},
        "time": T0,
        "stream_seq": 100,
        "part": part,
        "parts": parts,
        "devices": devices,
        "seq": seq,
    }


CONVERSATION = [
    HELLO,
    snapshot(
        [
            device(
                "sensor-002",
                transport="udp",
                last_seen=T0 - 0.5,
                values={"temperature": [T0 - 0.5, 19.84], "humidity": [T0 - 0.5, 55.0]},
            ),
            device(
                "sensor-001",
                last_seen=T0 - 0.5,
                values={"temperature": [T0 - 0.5, 20.0], "humidity": [T0 - 0.5, 60.14]},
            ),
        ],
        1,
        2,
        2,
    ),
    # Half-way through a snapshot: held back, applied once the last part is in.
    {"type": "readings", "readings": [["sensor-001", "temperature", T0 + 0.2, 21.5]], "seq": 3},
    snapshot([device("sensor-003", online=False, rate=0.0)], 2, 2, 4),
    {"type": "readings", "readings": [["sensor-002", "battery", T0 + 1.0, 97.24]], "seq": 5},
    {
        "type": "device",
        "device": "sensor-001",
        "online": False,
        "reason": "timeout",
        "time": T0 + 2.0,
        "duration": 15.2,
        "seq": 6,
    },
    {
        "type": "stats",
        "devices": {
            "sensor-002": {"rate": 2.0, "loss": 0.05, "last_seen": T0 + 1.0, "datagrams": 19}
        },
        "seq": 7,
    },
    {"type": "missed", "count": 3, "total": 3, "seq": 8},
    {
        "type": "command",
        "device": "sensor-002",
        "id": "c000001",
        "name": "ping",
        "state": "acked",
        "result": {"pong": True},
        "error": None,
        "time": T0 + 2.5,
        "seq": 9,
    },
    {"type": "heartbeat", "time": T0 + 3.0, "stream_seq": 130, "missed": 3, "queued": 0, "seq": 10},
]

ROWS_AT_5 = [
    Row(
        id="sensor-001",
        online=False,
        state="offline (timeout)",
        transport="-",
        rate="-",
        loss="0%",
        seen="4s",  # the held reading at T0 + 0.2 counts
        values="temperature=21.5 humidity=60.1",
    ),
    Row(
        id="sensor-002",
        online=True,
        state="online",
        transport="udp",
        rate="2.0/s",
        loss="5.0%",
        seen="4s",
        values="temperature=19.8 humidity=55.0 battery=97.2",
    ),
    Row(
        id="sensor-003",
        online=False,
        state="offline",
        transport="-",
        rate="-",
        loss="0%",
        seen="-",
        values="",
    ),
]


def feed(model, url="ws://127.0.0.1:8082/stream"):
    model.connecting(url, local(T0 - 0.1))
    model.connected(local(T0 - 0.05))
    for m in CONVERSATION:
        # Each message arrives (on our clock) when the collector stamped it, or at T0 + 3.
        stamp = m.get("time", T0 + 3.0) if m["type"] != "snapshot" else T0
        model.receive_text(json.dumps(m), local(stamp))


def fed_model(subscription=None):
    model = watch.StreamModel(subscription)
    feed(model)
    return model


# ---------------------------------------------------------------------------------------------
# The model


def test_model_applies_a_conversation():
    model = fed_model()
    now = local(T0 + 5.0)
    assert model.synced and model.seq == 10 and model.seq_gaps == 0
    assert model.rows(now) == ROWS_AT_5
    assert model.status_lines(now) == (
        "connected to ws://127.0.0.1:8082/stream (trio-collector 0.1.0)",
        "online 1/3  |  lag 4.0s  |  heartbeat 2.0s ago  |  missed 3",
        'last event: command c000001 ping on sensor-002: acked {"pong":true} (2s ago)',
    )
    # The filter: a substring, or a glob when it has glob characters; "offline only".
    assert [r.id for r in model.rows(now, filter="02")] == ["sensor-002"]
    assert [r.id for r in model.rows(now, filter="SENSOR-00[13]")] == ["sensor-001", "sensor-003"]
    assert [r.id for r in model.rows(now, filter="*-2")] == []
    assert [r.id for r in model.rows(now, offline_only=True)] == ["sensor-001", "sensor-003"]
    # Ages tick; an error replaces the command as the last event.
    model.receive_text(
        json.dumps(
            {"type": "error", "code": "no_match", "message": "no device matches", "seq": 11}
        ),
        local(T0 + 70.0),
    )
    assert model.rows(local(T0 + 70.5))[1].seen == "1m"
    assert model.status_lines(local(T0 + 71.0))[2] == (
        "last event: error no_match: no device matches (1s ago)"
    )


def test_model_reconnects_and_resyncs_from_the_new_snapshot():
    model = fed_model(watch.Subscription(("sensor-*",), ("temp*", "battery"), 2.0))
    now = local(T0 + 6.0)
    model.disconnected("closed 1001 (collector shutting down)", 2.0, now)
    assert not model.synced
    assert model.link_text(now + 0.5) == (
        "reconnecting in 2s: closed 1001 (collector shutting down)"
    )
    assert model.status_lines(now)[1].startswith("online 1/3  |  lag 5.0s  |  heartbeat -  |")
    model.connecting("ws://127.0.0.1:8082/stream", now + 2)
    assert model.link_text(now + 2) == "connecting to ws://127.0.0.1:8082/stream"
    model.disconnected("connection refused", 4.0, now + 2)
    assert model.link_text(now + 3) == (
        "reconnecting in 3s: connection refused "
        "(before that: closed 1001 (collector shutting down), 3s ago)"
    )
    model.connecting("ws://127.0.0.1:8082/stream", now + 6)
    assert model.link_text(now + 6) == "connecting to ws://127.0.0.1:8082/stream (attempt 2)"
    # The subscribe message, byte for byte.
    assert model.connected(now + 6) == (
        '{"type":"subscribe","devices":["sensor-*"],"metrics":["temp*","battery"],'
        '"max_rate":2.0,"history":0}'
    )
    # seq starts over on the new connection: no gap. The old rows stay until the snapshot.
    model.receive_text(json.dumps(HELLO | {"time": T0 + 12}), now + 6)
    assert model.seq_gaps == 0 and len(model.rows(now + 6)) == 3
    assert model.link_text(now + 6) == (
        "connected to ws://127.0.0.1:8082/stream, waiting for the snapshot"
    )
    fresh = device("sensor-004", last_seen=T0 + 11, values={"temperature": [T0 + 11, -3.5]})
    model.receive_text(json.dumps(snapshot([fresh], 1, 1, 2)), now + 6)
    assert model.synced and model.link.attempts == 0
    assert model.rows(now + 6) == [
        Row("sensor-004", True, "online", "tcp", "1.0/s", "0%", "1s", "temperature=-3.50")
    ]
    assert model.status_lines(now + 6)[:2] == (
        "connected to ws://127.0.0.1:8082/stream (trio-collector 0.1.0)",
        "online 1/1  |  lag 1.0s  |  heartbeat 0.0s ago  |  missed 3",
    )
    # The collector counts missed updates per connection; the header counts them all.
    beat = {"type": "heartbeat", "time": T0 + 13, "missed": 2, "queued": 40, "seq": 3}
    model.receive_text(json.dumps(beat), now + 7)
    assert model.status_lines(now + 7)[1] == (
        "online 1/1  |  lag 2.0s  |  heartbeat 0.0s ago  |  missed 5  |  queued 40"
    )


def test_model_reports_what_breaks_the_protocol():
    model = fed_model()
    model.receive_text("not json", local(T0 + 4))
    assert model.last_event == "protocol: a message that is not JSON"
    model.receive_text(json.dumps({"type": "heartbeat", "seq": 12}), local(T0 + 4))
    assert model.seq_gaps == 1 and model.last_event == "protocol: seq jumped from 10 to 12"
    model.receive_text(json.dumps({"type": "readings", "readings": [["x"]], "seq": 13}), 0)
    assert model.last_event.startswith("protocol: a bad 'readings' message (ValueError")
    model.receive_text(json.dumps(snapshot([], 2, 3, 14)), 0)
    assert model.last_event == "protocol: snapshot part 2 of 3 out of order"
    assert len(model.devices) == 3  # nothing was lost to the bad messages
    model.receive_text(json.dumps({"type": "something-new", "seq": 15}), 0)
    model.receive_text(json.dumps({"type": "pong", "id": 1, "seq": 16}), 0)
    assert model.seq == 16 and model.seq_gaps == 1


def test_model_follows_a_replay_clock():
    # A collector playing a recording back says so, and its clock runs at the replay's speed:
    # ages follow its heartbeats instead of the offset measured at hello.
    model = watch.StreamModel()
    model.connecting("ws://h:1/stream", 0.0)
    model.connected(0.0)
    model.apply(HELLO | {"mode": "replay"}, 0.0)
    model.apply(snapshot([device("sensor-001", last_seen=T0)], 1, 1, 2), 0.0)
    model.apply({"type": "heartbeat", "time": T0 + 40, "missed": 0, "queued": 0, "seq": 3}, 2.0)
    assert model.rows(3.0)[0].seen == "41s"
    assert model.link_text(3.0) == "connected to ws://h:1/stream (trio-collector 0.1.0, replay)"


def test_formatting():
    f = watch.format_value
    assert [f(v) for v in (21.5, 97.24, 0.5123, 1234.5, 0.0, -3.5, 2e-5, 3e7)] == [
        "21.5", "97.2", "0.512", "1234", "0.0", "-3.50", "2e-05", "3e+07",
    ]  # fmt: skip
    assert [f(v) for v in (True, 7, "smoke", "two words", None, [1, 2])] == [
        "true", "7", "smoke", '"two words"', "null", "[1,2]",
    ]  # fmt: skip
    assert [watch.format_age(s) for s in (-1, 0.9, 59.9, 61, 3725, 90000)] == [
        "0s", "0s", "59s", "1m", "1h", "1d",
    ]  # fmt: skip
    assert [watch.format_loss(x) for x in (None, 0.0, 0.0004, 0.0512, 0.0996, 1.0)] == [
        "-", "0%", "0.0%", "5.1%", "10%", "100%",
    ]  # fmt: skip
    assert watch._clip_values("temperature=21.5 humidity=60.1 battery=97.2", 36) == (
        "temperature=21.5 humidity=60.1 …"
    )


def test_stream_urls():
    assert [
        watch.stream_url(u)
        for u in (
            "http://127.0.0.1:8082/",
            "https://example.org/collector/",
            "ws://10.0.0.5:9000",
            "ws://10.0.0.5:9000/stream?token=abc",
            "collector.local:8082",
            "collector.local",
            "[::1]:8082",
        )
    ] == [
        "ws://127.0.0.1:8082/stream",
        "wss://example.org/collector/stream",
        "ws://10.0.0.5:9000/stream",
        "ws://10.0.0.5:9000/stream?token=abc",
        "ws://collector.local:8082/stream",
        "ws://collector.local:8082/stream",
        "ws://[::1]:8082/stream",
    ]
    for bad in ("ftp://x/", "host:port", ""):
        with pytest.raises(ValueError):
            watch.stream_url(bad)


# ---------------------------------------------------------------------------------------------
# The WebSocket client, against a stand-in for the collector


async def _eventually(condition, within: float, pause) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await pause()


def test_client_reconnects_resyncs_and_drops_a_stalled_stream():
    from websockets.asyncio.server import serve

    seen = []  # (Authorization header, first message) per connection

    async def collector(ws):
        n = len(seen)
        seen.append((ws.request.headers.get("Authorization"), json.loads(await ws.recv())))
        await ws.send(json.dumps(HELLO))
        if n == 0:
            await ws.send(json.dumps(snapshot([device("sensor-001", last_seen=T0)], 1, 1, 2)))
            await ws.close(1001, "collector shutting down")
            return
        elif n == 1:
            gone = device("sensor-001", online=False, reason="shutdown", last_seen=T0)
            await ws.send(json.dumps(snapshot([gone, device("sensor-002")], 1, 1, 2)))
            await ws.send(
                json.dumps(
                    {"type": "readings", "readings": [["sensor-002", "t", T0, 1.5]], "seq": 3}
                )
            )
        await ws.wait_closed()  # the second one sends nothing more: a stall

    async def main():
        model = watch.StreamModel(watch.Subscription(("sensor-*",), ("*",), None))
        log = []

        def on_update():
            entry = (model.link.state, model.link.detail)
            if not log or log[-1] != entry:
                log.append(entry)

        async with serve(collector, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            task = asyncio.create_task(
                watch.follow_stream(
                    model,
                    f"ws://127.0.0.1:{port}/stream",
                    token="read-token",
                    on_update=on_update,
                    backoff=(0.05, 0.2),
                    stall_after=0.5,
                )
            )
            try:
                await _eventually(lambda: len(seen) == 3, 10, lambda: asyncio.sleep(0.02))
                await asyncio.sleep(0.1)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return model, log

    model, log = asyncio.run(main())
    subscribe = {"type": "subscribe", "devices": ["sensor-*"], "metrics": ["*"], "max_rate": None}
    assert seen == [("Bearer read-token", subscribe | {"history": 0})] * 3
    assert log[:8] == [  # (a very slow machine may see the third connection stall too)
        ("connecting", ""),
        ("connected", ""),
        ("reconnecting", "closed 1001 (collector shutting down)"),
        ("connecting", "closed 1001 (collector shutting down)"),
        ("connected", ""),
        ("reconnecting", "nothing received for 0.5s"),
        ("connecting", "nothing received for 0.5s"),
        ("connected", ""),
    ]
    # The second snapshot replaced the first; the reading after it was applied.
    assert {d.id: (d.online, d.reason) for d in model.devices.values()} == {
        "sensor-001": (False, "shutdown"),
        "sensor-002": (True, None),
    }
    assert model.devices["sensor-002"].values == {"t": (T0, 1.5)}


# ---------------------------------------------------------------------------------------------
# The screen


def _table_ids(app) -> list[str]:
    from textual.widgets import DataTable

    table = app.query_one(DataTable)
    return [table.get_row_at(i)[0].plain for i in range(table.row_count)]


def test_screen_filter_and_keys_with_a_fake_stream():
    async def fake_follow(model, url, **_):
        feed(model, url)
        await asyncio.sleep(60)

    async def main():
        app = watch.WatchApp(
            "ws://127.0.0.1:8082/stream", clock=lambda: local(T0 + 5.0), follow=fake_follow
        )
        async with app.run_test(size=(100, 30)) as pilot:
            await _eventually(lambda: len(app.shown) == 3, 5, lambda: pilot.pause(0.05))
            assert _table_ids(app) == ["sensor-001", "sensor-002", "sensor-003"]
            assert app.status_text.splitlines() == [
                "connected to ws://127.0.0.1:8082/stream (trio-collector 0.1.0)",
                "online 1/3  |  lag 4.0s  |  heartbeat 2.0s ago  |  missed 3",
                'last event: command c000001 ping on sensor-002: acked {"pong":true} (2s ago)',
            ]
            from textual.widgets import DataTable

            cells = app.query_one(DataTable).get_row("sensor-001")
            assert [c.plain for c in cells] == [
                "sensor-001", "offline (timeout)", "-", "-", "0%", "4s", "temperature=21.5 humidity=60.1",
            ]  # fmt: skip
            assert "red" in str(cells[1].style)  # offline rows stand out
            assert not app.query_one("#filterbar").display

            await pilot.press("slash", *"*-00[12]")
            await pilot.pause()
            assert app.query_one("#filterbar").display
            assert _table_ids(app) == ["sensor-001", "sensor-002"]
            assert "2 of 3 shown" in str(app.query_one("#shown").render())
            await pilot.press("enter", "o")  # leave the input (the filter stays); offline only
            await pilot.pause()
            assert _table_ids(app) == ["sensor-001"]
            await pilot.press("escape")  # outside the input: show everything again
            await pilot.pause()
            assert _table_ids(app) == ["sensor-001", "sensor-002", "sensor-003"]
            assert app.filter == "" and not app.offline_only
            await pilot.press("slash", "q", "backspace", "escape")  # an empty filter: bar gone
            await pilot.pause()
            assert not app.query_one("#filterbar").display and len(app.shown) == 3
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# End to end: a real collector with simulated sensors


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`collector demo` with 3 sensors and a read token; yields its dashboard URL."""
    tmp = tmp_path_factory.mktemp("watch-demo")
    (tmp / "tokens.toml").write_text('[http]\nread_tokens = ["read-token"]\n')
    stderr = open(tmp / "stderr.txt", "w")
    proc = subprocess.Popen(
        [PY, "-m", "collector", "demo", "--sensors", "3", "--rate", "4", "--loss", "0", "--tcp-port", "0", "--udp-port", "0",
         "--http-port", "0", "--duration", "60", "--data-dir", str(tmp), "--config", str(tmp / "tokens.toml")],
        stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=tmp,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 20
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=0.2)
                if line.startswith("dashboard: "):
                    url = line.split()[1]
        assert url is not None, f"no dashboard URL: {(tmp / 'stderr.txt').read_text()}"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.close()


def test_end_to_end_rows_appear_and_the_filter_leaves_one(demo):
    async def main():
        app = watch.WatchApp(watch.stream_url(demo), token="read-token")
        async with app.run_test(size=(100, 30)) as pilot:
            ids = ["sensor-001", "sensor-002", "sensor-003"]

            def rows_with_values():
                rows = app.model.rows(time.time())
                return [r.id for r in rows if "temperature=" in r.values] == ids

            ready = lambda: rows_with_values() and app.shown == ids  # noqa: E731
            await _eventually(ready, 15, lambda: pilot.pause(0.05))
            await pilot.pause(0.3)  # one more render
            from textual.widgets import DataTable

            table = app.query_one(DataTable)
            for row_id in ids:
                state, transport, values = (table.get_row(row_id)[i].plain for i in (1, 2, 6))
                assert state == "online" and transport in ("tcp", "udp")
                assert values.startswith("temperature=") and " battery=" in values
            assert app.status_text.startswith(f"connected to {watch.stream_url(demo)}")
            await pilot.press("slash", "0", "2")
            await pilot.pause()
            assert _table_ids(app) == ["sensor-002"] and table.row_count == 1
            await pilot.press("enter", "q")
        assert app.return_code == 0

    asyncio.run(main())


@pytest.mark.parametrize("token", [None, "wrong"])
def test_end_to_end_a_refused_token_stops_with_a_message(demo, token):
    async def main():
        app = watch.WatchApp(watch.stream_url(demo), token=token)
        async with app.run_test(size=(100, 30)):
            await _eventually(lambda: app.fatal is not None, 10, lambda: asyncio.sleep(0.05))
        return app

    app = asyncio.run(main())
    assert app.return_code == 1
    assert app.fatal == "HTTP 401 unauthorized: a valid read token is needed (pass --token TOKEN)"
    assert app.model.link.state == "stopped" and app.model.link.connections == 0
