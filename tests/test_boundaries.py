"""Every kind of handler is an error boundary: a bug injected into one costs that one piece of
work, is counted in /metrics, and a real device sending meanwhile is still served."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket
from trio_websocket import open_websocket_url

from collector.core import hub as hub_module
from collector.core import ingest as ingest_module
from collector.device.client import open_device

from .helpers import SECRETS, http, start_collector


class Boom(Exception):
    pass


def inject(kind, collector, monkeypatch):
    """Make one handler of `kind` fail for dev-2 (or for one dashboard) only."""
    if kind == "datagram":
        real = ingest_module.decode_readings_untrusted

        def decode(payload):
            if b"boom" in payload:
                raise Boom("in the datagram path")
            return real(payload)

        monkeypatch.setattr(ingest_module, "decode_readings_untrusted", decode)
    elif kind == "control_message":
        real_handle = collector.control._handle_message

        def handle(session, event):
            if session.device_id == "dev-2":
                raise Boom("handling a control message")
            return real_handle(session, event)

        monkeypatch.setattr(collector.control, "_handle_message", handle)
    elif kind == "command":
        real_drive = collector.commands._drive_tcp

        async def drive(cmd, session):
            if cmd.name == "boom":
                raise Boom("driving a command")
            await real_drive(cmd, session)

        monkeypatch.setattr(collector.commands, "_drive_tcp", drive)
    elif kind == "listener":
        real_on = collector.hub.on_telemetry

        def on_telemetry(batch):
            if any(t.device_id == "dev-2" for t in batch):
                raise Boom("in a listener")
            real_on(batch)

        monkeypatch.setattr(collector.hub, "on_telemetry", on_telemetry)
        real_event = collector.recorder.on_event

        def on_event(event):
            if event.device_id == "dev-2":
                raise Boom("in the recorder")
            real_event(event)

        monkeypatch.setattr(collector.recorder, "on_event", on_event)
    elif kind == "subscriber":
        real_parse = hub_module.stream.parse_client_message

        def parse(data, **kw):
            if "boom" in data:
                raise Boom("serving a dashboard")
            return real_parse(data, **kw)

        monkeypatch.setattr(hub_module.stream, "parse_client_message", parse)
    elif kind == "task":
        real_tick = collector.hub.tick
        calls = []

        def tick():
            calls.append(1)
            if len(calls) == 2:
                raise Boom("in a periodic task")
            real_tick()

        monkeypatch.setattr(collector.hub, "tick", tick)
    elif kind == "http_request":

        def healthz(method):
            raise Boom("answering a request")

        monkeypatch.setattr(collector.http, "_healthz", healthz)


async def provoke(kind, collector, victim, ws_url):
    if kind == "datagram":
        await victim.send_readings({"boom": 1.0})
    elif kind == "control_message":
        await victim.ping()
    elif kind == "command":
        cmd = collector.send_command("dev-2", "boom")
        await cmd.done.wait()
        assert (cmd.state, cmd.error) == ("failed", "internal error in the collector")
    elif kind == "listener":
        await victim.send_readings({"t": 1.0})
    elif kind == "subscriber":
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            async with open_websocket_url(ws_url) as ws:
                await ws.send_message(json.dumps({"type": "boom"}))
                while True:
                    await ws.get_message()
        assert info.value.reason.code == 1011
    elif kind == "task":
        await trio.sleep(3)
    elif kind == "http_request":
        status, _, body = await http(collector, "GET", "/healthz")
        assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"


@pytest.mark.parametrize(
    "kind",
    ["datagram", "control_message", "command", "listener", "subscriber", "task", "http_request"],
)
async def test_a_bug_in_one_handler_costs_only_that_handler(
    nursery, autojump_clock, tmp_path, monkeypatch, kind
):
    collector, _ = await start_collector(nursery, http_port=0, record_dir=str(tmp_path / "rec"))
    url = f"ws://127.0.0.1:{collector.http_address[1]}/stream"
    port = collector.tcp_address[1]
    sent = 0

    async def keep_sending(dev):
        nonlocal sent
        while True:
            await dev.send_readings({"t": float(sent)})
            sent += 1
            await trio.sleep(0.05)

    async with (
        open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port) as dev1,
        open_device("127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=port) as dev2,
        open_websocket_url(url) as watcher,
        trio.open_nursery() as inner,
    ):
        await watcher.send_message(json.dumps({"type": "subscribe", "devices": ["dev-1"]}))
        inner.start_soon(keep_sending, dev1)
        await trio.sleep(0.5)
        inject(kind, collector, monkeypatch)
        await provoke(kind, collector, dev2, url)
        await trio.sleep(0.5)
        before = collector.statistics().devices["dev-1"].readings
        await trio.sleep(1)
        assert collector.statistics().devices["dev-1"].readings > before  # still served
        monkeypatch.undo()
        # The dashboard that was watching all along still gets dev-1's readings.
        got = 0
        with trio.fail_after(5):
            while got < 3:
                msg = json.loads(await watcher.get_message())
                if msg["type"] == "readings":
                    got += sum(1 for r in msg["readings"] if r[0] == "dev-1")
        assert dev2.end_reason is None or kind == "command"  # dev-2 itself is still online
        inner.cancel_scope.cancel()
    assert collector.boundary.counts[kind] >= 1
    _, _, metrics = await http(collector, "GET", "/metrics")
    line = f'collector_internal_errors_total{{kind="{kind}"}}'
    assert any(
        m.startswith(line) and float(m.split()[-1]) >= 1 for m in metrics.decode().splitlines()
    )
