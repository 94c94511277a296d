"""The recording tools as a user runs them: inspect/export, replay into, replay serve, record_stream."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from collector.core.segments import SegmentWriter
from collector.devices import DeviceRegistry
from collector.wire import recording as rec
from collector.wire.datagram import Reading
from collector.wire.recording import RecordType

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
T0 = 1_767_225_600.0


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(*args, timeout=60):
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture
def small_recording(tmp_path):
    """Two devices over 10 s: d1 at 2 Hz losing seq 5, d2 at 1 Hz with a 4 s silence."""
    w = SegmentWriter(tmp_path / "rec")
    w.open(T0)
    data = rec.encode_json_record(
        RecordType.ONLINE, T0, {"device": "d1", "session_id": 1, "transport": "tcp", "address": "a"}
    )
    data += rec.encode_json_record(
        RecordType.ONLINE, T0, {"device": "d2", "session_id": 2, "transport": "udp", "address": "b"}
    )
    for i in range(1, 21):
        if i != 5:
            data += rec.encode_readings_record(
                T0 + i * 0.5, "d1", i, 0, [Reading("t", 20.0 + i), Reading("ok", True)]
            )
    for i in list(range(1, 4)) + list(range(8, 11)):
        data += rec.encode_readings_record(T0 + i, "d2", i, 0, [Reading("state", "idle")])
    data += rec.encode_json_record(
        RecordType.OFFLINE,
        T0 + 10.5,
        {"device": "d1", "session_id": 1, "reason": "closed", "duration": 10.5},
    )
    w.write(data, T0 + 11)
    w.close()
    return tmp_path / "rec"


def test_inspect_summarises_and_exports(small_recording, tmp_path):
    out = tool(
        "-m",
        "collector",
        "inspect",
        small_recording,
        "--json",
        "--gap",
        "2",
        "--csv",
        tmp_path / "r.csv",
        "--jsonl",
        tmp_path / "r.jsonl",
    )
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["span"]["seconds"] == 10.5 and s["problems"] == []
    assert s["devices"]["d1"]["lost"] == 1 and s["devices"]["d1"]["readings"] == 38
    assert s["devices"]["d1"]["ended"] == {"closed": 1}
    assert s["devices"]["d2"]["silences"] == [["2026-01-01T00:00:03.000Z", 5.0]]
    assert s["metrics"]["t"] == {
        "count": 19,
        "min": 21.0,
        "mean": sum(20.0 + i for i in range(1, 21) if i != 5) / 19,
        "max": 40.0,
    }
    assert s["metrics"]["state"] == {"count": 6, "type": "string"}
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 44 and rows[0] == {
        "time": "2026-01-01T00:00:00.500Z",
        "time_unix": "1767225600.5",
        "device": "d1",
        "metric": "t",
        "value": "21.0",
        "seq": "1",
    }
    assert json.loads(open(tmp_path / "r.jsonl").readline())["value"] == 21.0
    human = tool("-m", "collector", "inspect", small_recording)
    assert "d1" in human.stdout and "2 devices" in human.stdout and "closed 1" in human.stdout


def test_inspect_reports_corruption_and_refuses_what_it_cannot_read(small_recording, tmp_path):
    seg = next(small_recording.glob("*.rec"))
    data = bytearray(seg.read_bytes())
    data[200] ^= 0xFF
    seg.write_bytes(bytes(data) + b"\0" * 100)
    out = tool("-m", "collector", "inspect", small_recording)
    assert out.returncode == 0 and "skipped" in out.stdout and "torn tail" in out.stdout
    missing = tool("-m", "collector", "inspect", tmp_path / "nope")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_parquet_export_needs_pyarrow_or_works(small_recording, tmp_path):
    out = tool("-m", "collector", "inspect", small_recording, "--parquet", tmp_path / "r.parquet")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert out.returncode == 2 and "pip install 'trio-collector[parquet]'" in out.stderr
    else:
        assert out.returncode == 0 and pq.read_table(tmp_path / "r.parquet").num_rows == 44


def _wait_http(port, proc, path="/healthz"):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            return json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1).read()
            )
        except OSError:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    raise AssertionError("no answer")


def test_replay_into_a_collector(small_recording, tmp_path):
    devices = tmp_path / "devices.toml"
    out = tool(
        "-m",
        "collector",
        "replay",
        "into",
        small_recording,
        "--devices",
        devices,
        "--create-missing",
    )
    assert out.returncode == 0 and set(DeviceRegistry.load(devices)) == {"d1", "d2"}
    tcp, udp, http = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--host", "127.0.0.1", "--tcp-port", str(tcp), "--udp-port", str(udp),
         "--http-port", str(http), "--devices", str(devices)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_http(http, proc)
        out = tool(
            "-m",
            "collector",
            "replay",
            "into",
            small_recording,
            "--devices",
            devices,
            "--tcp-port",
            tcp,
            "--udp-port",
            udp,
            "--speed",
            "max",
            "--ack",
        )
        assert out.returncode == 0, out.stderr
        assert (
            "replayed 2 devices, 2 sessions: sent 25 datagrams (44 readings), acknowledged 25"
            in out.stdout
        )
        listing = _wait_http(http, proc, "/api/devices")
        readings = {d["id"]: d["stats"]["readings"] for d in listing["devices"]}
        assert readings == {"d1": 38, "d2": 6}
        only = tool(
            "-m",
            "collector",
            "replay",
            "into",
            small_recording,
            "--devices",
            devices,
            "--tcp-port",
            tcp,
            "--udp-port",
            udp,
            "--speed",
            "max",
            "--device",
            "d2",
            "--from",
            "+5",
        )
        assert "sent 3 datagrams (3 readings)" in only.stdout, only.stdout + only.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_replay_serve_is_a_stand_in_collector(small_recording):
    http = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "replay", "serve", str(small_recording), "--http-port", str(http), "--speed", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        status = _wait_http(http, proc, "/api/replay")
        assert status["mode"] == "replay" and status["speed"] == 2.0 and status["start"] == T0
        assert urllib.request.urlopen(f"http://127.0.0.1:{http}/").status == 200
        time.sleep(1.5)
        listing = _wait_http(http, proc, "/api/devices")
        assert {d["id"] for d in listing["devices"]} == {"d1", "d2"}
        assert any(d["values"] for d in listing["devices"])
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "serving" in out and "2 devices" in out


def test_record_stream_of_a_running_collector(tmp_path):
    http = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "collector", "demo", "--sensors", "3", "--tcp-port", "0", "--udp-port", "0", "--http-port", str(http),
         "--no-record", "--duration", "30", "--data-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_http(http, demo)
        out = tool(
            "-m",
            "collector",
            "record-stream",
            f"http://127.0.0.1:{http}/",
            "--out",
            tmp_path / "s",
            "--duration",
            "3",
        )
        assert out.returncode == 0, out.stderr
        assert "recorded" in out.stdout
    finally:
        demo.terminate()
        demo.wait(timeout=30)
    summary = json.loads(tool("-m", "collector", "inspect", tmp_path / "s", "--json").stdout)
    assert set(summary["devices"]) == {"sensor-001", "sensor-002", "sensor-003"}
    assert summary["records"]["ONLINE"] == 3 and summary["records"]["READINGS"] > 3


def test_raw_datagrams_are_recorded_and_resent_byte_for_byte(tmp_path):
    from collector.wire import datagram as dg

    w = SegmentWriter(tmp_path / "rec")
    w.open(T0)
    sent = [
        dg.encode_datagram(
            bytes(32), dg.DatagramType.HEARTBEAT, 7, i, 0, dg.encode_heartbeat_payload(i)
        )
        for i in range(1, 4)
    ]
    w.write(
        b"".join(
            rec.encode_datagram_record(T0 + i * 0.01, "127.0.0.1:5000", d)
            for i, d in enumerate(sent)
        ),
        T0,
    )
    w.release()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(10)
    out = tool(
        "-m",
        "collector",
        "replay",
        "raw",
        tmp_path / "rec",
        "--target",
        f"127.0.0.1:{sink.getsockname()[1]}",
    )
    assert out.returncode == 0 and "sent 3 raw datagrams" in out.stdout
    assert [sink.recv(65536) for _ in range(3)] == sent
    none = tool("-m", "collector", "replay", "raw", tmp_path / "rec", "--from", "+5")
    assert none.returncode == 2 and "no raw datagrams" in none.stderr


def test_the_recordings_of_several_nodes_are_read_merged_by_time(tmp_path, capsys):
    """Each node of a cluster records its own directory; inspect and replay take several."""
    from collector.core.segments import SegmentWriter, open_recording
    from collector.tools import inspect_recording
    from collector.wire.recording import ReadingsRecord, encode_readings_record

    base = 1_790_000_000.0
    for node, offset in (("node-a", 0.0), ("node-b", 0.5)):
        writer = SegmentWriter(tmp_path / node, retain_seconds=None, retain_bytes=None)
        writer.open(now=base)
        for i in range(5):
            t = base + i + offset
            writer.write(encode_readings_record(t, f"{node}-dev", i + 1, 0, [("n", i)]), now=t)
        writer.close()
    reader = open_recording([tmp_path / "node-a", tmp_path / "node-b"])
    records = [r for r in reader if isinstance(r, ReadingsRecord)]
    assert [r.time for r in records] == sorted(r.time for r in records)
    assert [r.device_id for r in records[:2]] == ["node-a-dev", "node-b-dev"]
    assert len(records) == 10 and len(reader.segments) == 2
    assert (
        inspect_recording.main([str(tmp_path / "node-a"), str(tmp_path / "node-b"), "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["segments"]) == 2
