"""The ten failures an attacker found (docs/SECURITY.md), each reproduced against a running
collector: none of them may stop it, grow its memory without bound, or touch another device."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio_websocket
from trio_websocket import open_websocket_url

from collector.core.segments import RecordingReader, SegmentWriter
from collector.device import client as client_module
from collector.device.client import open_device, open_udp_device
from collector.wire import recording as rec
from collector.wire.datagram import U32
from collector.wire.recording import EventRecord, ReadingsRecord, RecordType

from .helpers import SECRETS, api, http, start_collector, udp_socket, ws_handshake

ROOT = Path(__file__).resolve().parent.parent


async def start(nursery, **overrides):
    overrides.setdefault("http_port", 0)
    return await start_collector(nursery, **overrides)


def ws_url(collector, token=None):
    return f"ws://127.0.0.1:{collector.http_address[1]}/stream" + (
        f"?token={token}" if token else ""
    )


def count_tasks() -> int:
    """Every task in the run, found from the root task down."""
    todo = [trio.lowlevel.current_root_task()]
    n = 0
    while todo:
        task = todo.pop()
        n += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return n


async def raw_request(collector, data: bytes, *, source: str = "127.0.0.1") -> bytes:
    """Send raw bytes to the HTTP port; return everything the collector sends until it closes."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", collector.http_address[1]))
    await sock.send(data)
    out = b""
    with trio.move_on_after(30):
        while chunk := await sock.recv(65536):
            out += chunk
    sock.close()
    return out


async def never_answer(name, args):
    await trio.sleep_forever()


async def next_of(ws, *types, limit=500):
    for _ in range(limit):
        msg = json.loads(await ws.get_message())
        if msg["type"] in types:
            return msg
    raise AssertionError(f"no {types} in {limit} messages")


# -- 1. a non-finite number ----------------------------------------------------------------------

NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]


@pytest.mark.parametrize("number", NON_FINITE)
async def test_a_non_finite_number_in_a_command_is_refused(nursery, autojump_clock, number):
    collector, _ = await start(nursery)
    async with (
        open_udp_device(
            "127.0.0.1", "udp-1", SECRETS["udp-1"], udp_port=collector.udp_address[1]
        ) as udp_dev,
        open_device(
            "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
        ) as tcp_dev,
    ):
        for device in ("udp-1", "dev-1"):
            body = b'{"name": "x", "args": {"v": ' + number + b"}}"
            status, _, raw = await http(collector, "POST", f"/api/devices/{device}/commands", body)
            assert (status, json.loads(raw)["error"]["code"]) == (400, "bad_json")
        status, _, raw = await http(
            collector, "POST", "/api/config", b'{"match": "*", "config": {"v": ' + number + b"}}"
        )
        assert (status, json.loads(raw)["error"]["code"]) == (400, "bad_json")
        await udp_dev.send_readings({"t": 1.0})
        await tcp_dev.send_readings({"t": 2.0})
        await trio.sleep(0.1)
    # Both devices were served throughout, and a new TCP registration still works.
    assert collector.statistics().devices["udp-1"].readings == 1
    assert collector.statistics().devices["dev-1"].readings == 1
    async with open_device(
        "127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=collector.tcp_address[1]
    ):
        pass
    assert collector.statistics().sessions_opened == 3


async def test_a_non_finite_command_result_is_refused(
    nursery, autojump_clock, tmp_path, monkeypatch
):
    """From a UDP device (its ACK with NaN: malformed) and a TCP device (its ack line: bad_json),
    while recording and with a dashboard watching: nobody is closed, snapshots still work."""
    collector, _ = await start(nursery, record_dir=str(tmp_path / "rec"))
    real_json_dumps = json.dumps
    monkeypatch.setattr(
        client_module,
        "encode_ack_payload",
        lambda seq, body: U32.pack(seq) + real_json_dumps(body).encode(),  # allows NaN
    )
    nan = lambda name, args: {"v": math.nan}  # noqa: E731
    async with open_websocket_url(ws_url(collector)) as ws:
        await ws.send_message(json.dumps({"type": "subscribe"}))
        await next_of(ws, "snapshot")
        async with open_udp_device(
            "127.0.0.1", "udp-1", SECRETS["udp-1"], udp_port=collector.udp_address[1],
            on_command=nan,
        ) as udp_dev:  # fmt: skip
            cmd = collector.send_command("udp-1", "x", timeout=2.0)
            await cmd.done.wait()
            assert cmd.state == "timed_out"  # its answer was malformed: never taken
            await udp_dev.send_readings({"t": 1.0})
            await trio.sleep(0.1)
        assert collector.statistics().devices["udp-1"].malformed >= 1
        async with open_device(
            "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1],
            on_command=never_answer,
        ) as tcp_dev:  # fmt: skip
            cmd = collector.send_command("dev-1", "y", timeout=2.0)
            await trio.sleep(0.1)
            # The client library refuses to send NaN itself: send the line by hand.
            line = b'{"type":"ack","id":"%s","result":NaN}\n' % cmd.id.encode()
            await tcp_dev._tcp_stream.send_all(line)
            await tcp_dev.send_readings({"t": 2.0})
            await cmd.done.wait()
            assert cmd.state == "timed_out"
            assert collector.control.errors["bad_json"] == 1
        await ws.send_message(json.dumps({"type": "subscribe"}))
        snapshot = await next_of(ws, "snapshot")
        assert {d["id"] for d in snapshot["devices"]} >= {"udp-1", "dev-1"}
    assert collector.statistics().devices["dev-1"].readings == 1


# -- 2. refused WebSocket handshakes ---------------------------------------------------------------


async def test_refused_handshakes_are_closed_and_leave_nothing_behind(nursery, autojump_clock):
    collector, _ = await start(nursery, read_tokens=("r-token",))
    request = (
        b"GET /stream?token=wrong HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await raw_request(collector, request)  # the first one may start lazily created tasks
    await trio.sleep(1)
    before = count_tasks()
    for _ in range(100):
        with trio.fail_after(5):  # the collector closes the connection itself, at once
            answer = await raw_request(collector, request)
        assert answer.startswith(b"HTTP/1.1 401")
    await trio.sleep(1)
    assert count_tasks() == before
    assert collector.hub.errors["unauthorized"] == 101


# -- 3. ping replies --------------------------------------------------------------------------------


async def test_ping_ids_and_queued_replies_are_bounded(nursery, autojump_clock):
    from wsproto.events import TextMessage

    collector, _ = await start(nursery, stream_ping_interval=1000.0)
    sock, ws = await ws_handshake(collector)  # sends what it is told, never reads
    await trio.sleep(0.1)
    (sub,) = collector.hub.subscribers
    big = json.dumps({"type": "ping", "id": "x" * 60_000})
    for _ in range(50):
        await sock.send(ws.send(TextMessage(data=big)))
    # enough pongs to fill the socket buffers whatever their size (up to 4 MiB each way here)
    pings = 50_000
    burst = b"".join(
        ws.send(TextMessage(data=json.dumps({"type": "ping", "id": f"{i:064d}"})))
        for i in range(pings)
    )
    view = memoryview(burst)
    while view:  # the socket may take it in parts
        view = view[await sock.send(view) :]
    with trio.fail_after(60):
        while sub.messages_received < pings + 50:  # noqa: ASYNC110 (a counter of the system under test)
            await trio.sleep(0.01)
    assert collector.hub.errors["bad_message"] == 50  # an id is short: refused, not echoed
    queued = sum(len(json.dumps(body)) for kind, body in sub.items if kind == "m")
    assert len(sub.items) <= collector.config.stream_max_replies + 2
    assert queued < 64 * 1024
    # every ping got one answer (an error or a pong): sent, queued, being sent, or dropped
    answered = sub.messages_sent + len(sub.items) + sub.unsent + sub.replies_dropped
    assert answered == pings + 50 + 1  # and the hello
    # the client reads nothing, so most of them did not fit: dropped, and counted
    assert sub.replies_dropped > pings // 2
    sock.close()


# -- 4. metric names per device ----------------------------------------------------------------------


async def test_metric_names_per_device_are_bounded(nursery, autojump_clock):
    collector, _ = await start(nursery, max_metrics_per_device=64)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        for batch in range(10):
            await dev.send_readings({f"m{batch}_{i}": float(i) for i in range(50)})
        await dev.send_readings({"m0_0": 7.0})  # a name it has: still taken
        await trio.sleep(0.2)
    status, detail = await api(collector, "GET", "/api/devices/dev-1")
    assert status == 200 and len(detail["values"]) == 64
    assert detail["values"]["m0_0"][1] == 7.0
    assert detail["stats"]["metrics_refused"] == 500 - 64
    _, _, metrics = await http(collector, "GET", "/metrics")
    assert b'collector_device_metrics_refused_total{device="dev-1"} 436.0' in metrics


# -- 5. config rules ------------------------------------------------------------------------------


async def test_config_rules_are_one_per_glob_and_bounded(nursery, autojump_clock):
    collector, _ = await start(nursery, max_config_rules=10)
    for i in range(200):
        status, _ = await api(collector, "POST", "/api/config", {"match": "*", "config": {"i": i}})
        assert status == 200
    assert [(r.match, dict(r.config)) for r in collector.device_config] == [("*", {"i": 199})]
    for i in range(9):
        assert (await api(collector, "POST", "/api/config", {"match": f"g{i}-*", "config": {}}))[
            0
        ] == 200
    status, body = await api(collector, "POST", "/api/config", {"match": "one-more", "config": {}})
    assert (status, body["error"]["code"]) == (409, "too_many_rules")
    assert len(collector.device_config) == 10


async def test_a_config_push_with_a_full_command_queue_is_answered(nursery, autojump_clock):
    collector, _ = await start(nursery, command_queue=1)
    async with open_udp_device(
        "127.0.0.1", "udp-1", SECRETS["udp-1"], udp_port=collector.udp_address[1],
        on_command=never_answer,
    ):  # fmt: skip
        collector.send_command("udp-1", "slow")
        status, body = await api(
            collector, "POST", "/api/config", {"match": "udp-*", "config": {"a": 1}}
        )
        assert status == 200
        assert body["sent_to"] == [] and body["failed"] == {"udp-1": "queue_full"}


# -- 6. HTTP connections --------------------------------------------------------------------------------


async def test_http_connections_are_capped_per_client_and_in_all(nursery, autojump_clock):
    collector, _ = await start(nursery, http_max_connections=6, http_max_per_client=3)
    idle = []
    for _ in range(3):
        s = trio.socket.socket()
        await s.connect(("127.0.0.1", collector.http_address[1]))
        idle.append(s)
    await trio.sleep(0.1)
    answer = await raw_request(collector, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
    for i in range(3):
        s = trio.socket.socket()
        await s.bind((f"127.0.0.{2 + i}", 0))
        await s.connect(("127.0.0.1", collector.http_address[1]))
        idle.append(s)
    await trio.sleep(0.1)
    answer = await raw_request(
        collector, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.9"
    )
    assert answer.startswith(b"HTTP/1.1 503")
    for s in idle:
        s.close()
    await trio.sleep(0.1)
    assert (await api(collector, "GET", "/healthz"))[0] == 200


async def test_a_client_that_pipelines_and_never_reads_is_dropped(nursery, autojump_clock):
    collector, _ = await start(nursery, http_send_timeout=5.0)
    await trio.sleep(0.1)
    before = count_tasks()
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", collector.http_address[1]))
    requests = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 400
    with trio.move_on_after(1):
        await sock.send(requests)
    await trio.sleep(0.5)
    assert count_tasks() > before  # it is being served ...
    await trio.sleep(10)
    assert count_tasks() == before  # ... and dropped once its sends made no progress for 5 s
    sock.close()


# -- 7. bad requests ---------------------------------------------------------------------------------


async def test_bad_requests_get_an_answer_and_a_bounded_log(nursery, autojump_clock, caplog):
    collector, _ = await start(nursery, read_tokens=("r-token",), command_tokens=("c-token",))
    answer = await raw_request(collector, b"GET http://[::1/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    deep = b"[" * 30_000 + b"]" * 30_000
    answer = await raw_request(
        collector,
        b"POST /api/config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer c-token\r\n"
        b"Content-Length: %d\r\n\r\n" % len(deep) + deep,
    )
    assert answer.startswith(b"HTTP/1.1 400") and b"bad_json" in answer
    answer = await raw_request(
        collector,
        "GET /api/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \u00fcml\u00e4ut\r\n\r\n".encode(
            "latin-1"
        ),
    )
    assert answer.startswith(b"HTTP/1.1 401")
    status, headers, _ = await http(collector, "DELETE", "/api/devices", token="c-token")
    assert status == 405 and headers["allow"] == "GET, HEAD, POST"
    status, headers, _ = await http(collector, "GET", "/api/config", token="c-token")
    assert status == 405 and headers["allow"] == "POST"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="collector"):
        for _ in range(300):
            await raw_request(collector, b"GET http://[::1/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(caplog.records) <= 30
    assert sum(len(r.getMessage()) for r in caplog.records) < 20_000
    assert (await api(collector, "GET", "/healthz"))[0] == 200


# -- 8. shutdown with an unanswered command ------------------------------------------------------------


async def test_an_unanswered_command_does_not_spoil_the_shutdown(nursery, autojump_clock):
    collector, _ = await start(nursery, shutdown_grace=5.0)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1],
        on_command=never_answer,
    ):  # fmt: skip
        async with open_websocket_url(ws_url(collector)) as ws:
            await ws.send_message(json.dumps({"type": "subscribe"}))
            await next_of(ws, "snapshot")
            cmd = collector.send_command("dev-1", "never-answered")
            await trio.sleep(0.5)
            assert cmd.state == "sent"
            reports = []

            async def stop():
                reports.append(await collector.shutdown())

            nursery.start_soon(stop)
            event = await next_of(ws, "device")
            assert (event["device"], event["online"], event["reason"]) == (
                "dev-1",
                False,
                "shutdown",
            )
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                while True:
                    await ws.get_message()
            assert info.value.reason.code == 1001
    await trio.sleep(1)
    (report,) = reports
    assert report.commands_abandoned == 1
    assert "commands abandoned 1" in report.summary()


# -- 9. unauthenticated UDP ------------------------------------------------------------------------------


async def test_a_hello_flood_is_rate_limited_before_any_key_is_used(
    nursery, autojump_clock, monkeypatch
):
    from collector.core import ingest as ingest_module
    from collector.wire import datagram as dg
    from collector.wire.crypto import Aead

    collector, _ = await start(nursery, ratelimit_per_source=10.0, ratelimit_burst=20.0)
    opened = []
    real = ingest_module.open_hello
    monkeypatch.setattr(ingest_module, "open_hello", lambda a, h: opened.append(1) or real(a, h))
    flood = await udp_socket()
    hello = dg.encode_hello(Aead(bytes(32)), "udp-1", bytes(16))  # not udp-1's key
    for i in range(2000):
        await flood.sendto(hello, collector.udp_address)
        if i % 100 == 0:
            await trio.lowlevel.checkpoint()
    await trio.sleep(0.1)
    assert len(opened) <= 50  # the burst of one source; the rest never reached a key
    assert collector.statistics().rejected["rate_limited"] >= 1950
    # A real device from another address gets through meanwhile.
    async with open_udp_device(
        "127.0.0.1", "udp-2", SECRETS["udp-2"], udp_port=collector.udp_address[1],
        local_host="127.0.0.2",
    ) as dev:  # fmt: skip
        await dev.send_readings({"t": 1.0})
        await trio.sleep(0.1)
    assert collector.statistics().devices["udp-2"].readings == 1


async def test_a_device_that_registers_in_a_loop_is_banned_for_a_while(nursery, autojump_clock):
    collector, _ = await start(nursery, flapping_max=5, flapping_window=60.0, flapping_ban=120.0)
    port = collector.tcp_address[1]
    for _ in range(5):
        async with open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port):
            await trio.sleep(1)
    with pytest.raises(client_module.RegistrationError) as info:
        async with open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port):
            pass
    assert info.value.code == "banned"
    async with open_device("127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=port):
        pass  # only the flapping device is banned
    await trio.sleep(121)
    async with open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port):
        pass
    _, _, metrics = await http(collector, "GET", "/metrics")
    assert b"collector_registrations_banned_total 1.0" in metrics


# -- 10. recordings and crashes ----------------------------------------------------------------------


def _segments(directory: Path, n: int, per: int = 5) -> list[ReadingsRecord]:
    w = SegmentWriter(directory, retain_bytes=None, retain_seconds=None)
    w.open(now=1000.0)
    written = []
    for s in range(n):
        for i in range(per):
            r = ReadingsRecord(1000.0 + s * 10 + i, "dev-1", s * per + i + 1, 0, (("t", float(i)),))
            w.write(
                rec.encode_readings_record(r.time, r.device_id, r.seq, 0, r.readings), now=r.time
            )
            written.append(r)
        if s < n - 1:
            w.rotate(now=1000.0 + s * 10 + 9)
    w.release()
    return written


def _readings(directory: Path) -> tuple[list[ReadingsRecord], RecordingReader]:
    reader = RecordingReader(directory)
    return [r for r in reader if isinstance(r, ReadingsRecord)], reader


def test_an_interrupted_compression_leaves_one_copy(tmp_path):
    written = _segments(tmp_path, 3)
    w = SegmentWriter(tmp_path)
    import gzip

    # A crash after the rename, before the unlink: both copies, complete.
    seg1 = tmp_path / "seg-000001.rec"
    (tmp_path / "seg-000001.rec.gz").write_bytes(gzip.compress(seg1.read_bytes()))
    # A crash while writing the temporary file: half a gzip stream.
    seg2 = tmp_path / "seg-000002.rec"
    (tmp_path / "seg-000002.rec.gz.tmp").write_bytes(gzip.compress(seg2.read_bytes())[:40])
    got, _ = _readings(tmp_path)
    assert got == written  # every record once
    w.open(now=2000.0)  # the next start cleans up
    w.release()
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("seg-"))
    assert names == ["seg-000001.rec", "seg-000002.rec", "seg-000003.rec"]
    assert _readings(tmp_path)[0] == written


def test_a_segment_cut_inside_its_header_is_skipped_and_counted(tmp_path):
    written = _segments(tmp_path, 2)
    (tmp_path / "seg-000003.rec").write_bytes(rec.encode_segment_header(3, 0)[:17])
    got, reader = _readings(tmp_path)
    assert got == written
    assert reader.damaged_segments == 1
    assert any("seg-000003.rec" in p for p in reader.problems())


def test_a_flipped_bit_in_a_compressed_segment_costs_only_that_segment(tmp_path):
    import gzip

    written = _segments(tmp_path, 3)
    seg = tmp_path / "seg-000002.rec"
    packed = bytearray(gzip.compress(seg.read_bytes()))
    packed[len(packed) // 2] ^= 0x10
    (tmp_path / "seg-000002.rec.gz").write_bytes(bytes(packed))
    seg.unlink()
    got, reader = _readings(tmp_path)
    assert reader.damaged_segments == 1
    assert [r for r in got if r.seq <= 5] == written[:5]
    assert [r for r in got if r.seq > 10] == written[10:]
    assert not [r for r in got if r not in written]  # nothing corrupt ever comes out


def test_a_newer_recording_stops_serve_with_one_line(tmp_path):
    record = tmp_path / "rec"
    record.mkdir()
    head = bytearray(rec.encode_segment_header(1, 0))
    head[8:10] = (99).to_bytes(2, "big")
    import zlib

    head[28:32] = zlib.crc32(bytes(head[:28])).to_bytes(4, "big")
    (record / "seg-000001.rec").write_bytes(bytes(head))
    devices = tmp_path / "devices.toml"
    devices.write_text('[devices."a"]\nsecret = "s"\n')
    out = subprocess.run(
        [sys.executable, "-m", "collector", "serve", "--devices", str(devices), "--record", str(record),
         "--host", "127.0.0.1", "--tcp-port", "0", "--udp-port", "0", "--http-port", "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2
    errors = [
        line for line in out.stderr.splitlines() if "Traceback" in line or "version 99" in line
    ]
    assert len(errors) == 1 and "version 99" in errors[0], out.stderr


async def test_sessions_open_at_a_crash_are_closed_on_the_next_start(
    nursery, autojump_clock, tmp_path
):
    from collector.app import recorder_config
    from collector.config import Config
    from collector.core.recorder import Recorder

    directory = tmp_path / "rec"
    w = SegmentWriter(directory)
    w.open(now=500.0)
    w.write(rec.encode_json_record(RecordType.META, 500.0, {"event": "open"}), now=500.0)
    for device, sid in (("dev-1", 11), ("dev-2", 12)):
        w.write(
            rec.encode_json_record(RecordType.ONLINE, 501.0, {"device": device, "session_id": sid})
        )
    w.write(rec.encode_json_record(RecordType.OFFLINE, 502.0, {"device": "dev-2", "session_id": 12, "reason": "closed", "duration": 1.0}))  # fmt: skip
    w.write(rec.encode_readings_record(503.5, "dev-1", 1, 0, (("t", 1.0),)))
    w.release()  # and then: kill -9, no close record, dev-1 still online
    recorder = Recorder(recorder_config(Config(record_dir=str(directory))), wall=lambda: 900.0)
    await nursery.start(recorder.serve)
    await recorder.aclose()
    offline = [
        r
        for r in RecordingReader(directory)
        if isinstance(r, EventRecord) and r.type is RecordType.OFFLINE
    ]
    assert [
        (r.data["device"], r.data["session_id"], r.data["reason"], r.time) for r in offline
    ] == [
        ("dev-2", 12, "closed", 502.0),
        ("dev-1", 11, "collector_restart", 503.5),
    ]
