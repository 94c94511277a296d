"""Outputs (collector/outputs): line protocol, the recording read as a write-ahead log, and
delivery: a stand-in database that refuses and fails on purpose, then a real VictoriaMetrics
with the collector killed twice and the database stopped for 10 s in the middle."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from collector.config import ConfigError, load_config
from collector.core.segments import RecordingReader, SegmentWriter
from collector.device.client import open_device
from collector.devices import DeviceRegistry
from collector.outputs import lineproto
from collector.outputs.config import OutputConfig
from collector.outputs.runner import Output
from collector.outputs.wal import (
    Position,
    WalReader,
    load_checkpoint,
    readings_after,
    save_checkpoint,
)
from collector.wire.recording import (
    SEGMENT_HEADER_LEN,
    ReadingsRecord,
    encode_heartbeat_record,
    encode_readings_record,
)

from .helpers import SECRETS, api, http, start_collector

ROOT = Path(__file__).resolve().parent.parent
VM = shutil.which("victoria-metrics")
INFLUXD = shutil.which("influxd")

# -- line protocol (no event loop) -------------------------------------------------------------


def rec(t: float, device: str, seq: int, readings, device_time: int = 0) -> ReadingsRecord:
    return ReadingsRecord(t, device, seq, device_time, tuple(readings))


def test_line_protocol_layouts_types_escapes_and_timestamps():
    r = rec(1764740000.123456, "gh-1", 1042, [("temp", 21.5), ("door", True), ("n", 3)], 77)
    body, n = lineproto.encode([r])
    assert n == 3
    assert body == b"telemetry,device=gh-1 temp=21.5,door=true,n=3i 1764740000123456042\n"
    body, n = lineproto.encode([r], layout="metric", measurement="my m", device_time=True)
    assert body.decode().splitlines() == [
        "my\\ m,device=gh-1,metric=temp value=21.5,device_time_us=77i 1764740000123456042",
        "my\\ m,device=gh-1,metric=door value=true,device_time_us=77i 1764740000123456042",
        "my\\ m,device=gh-1,metric=n value=3i,device_time_us=77i 1764740000123456042",
    ]
    text = rec(1.0, "d", 5, [("mode", 'eco "2" \\ x')])
    assert (
        lineproto.encode([text])[0] == b'telemetry,device=d mode="eco \\"2\\" \\\\ x" 1000000005\n'
    )
    odd = rec(1.0, "d", 0, [("a b,c=d", 1e-7), ("x", -0.0), ("big", 2**62)])
    assert (
        lineproto.encode([odd])[0]
        == b"telemetry,device=d a\\ b\\,c\\=d=1e-07,x=-0.0,big=4611686018427387904i 1000000000\n"
    )
    # a filter leaves readings out, and a record with none left makes no line
    keep = lambda device, metric: metric == "temp"  # noqa: E731
    body, n = lineproto.encode([r, rec(2.0, "gh-2", 1, [("door", False)])], keep=keep)
    assert (body, n) == (b"telemetry,device=gh-1 temp=21.5 1764740000123456042\n", 1)
    assert lineproto.encode([]) == (b"", 0)


def test_outputs_configuration_is_checked():
    cfg = load_config(None)
    assert cfg.outputs == ()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"outputs-{os.getpid()}.toml"
    path.write_text('[outputs.vm]\nurl = "http://127.0.0.1:8428"\nmetrics = ["t*"]\n')
    try:
        (out,) = load_config(path).outputs
        assert out == OutputConfig("vm", url="http://127.0.0.1:8428", metrics=("t*",))
        for bad, says in (
            ('[outputs.vm]\nurl = "ftp://x"\n', "url must be http"),
            ('[outputs.vm]\ntype = "kafka"\n', "type must be one of"),
            ("[outputs.vm]\nbatch_size = 0\n", "batch_size must be at least 1"),
            ('[outputs.vm]\napi = "v2"\n', 'api "v2" needs org and bucket'),
            ("[outputs.vm]\nbogus = 1\n", "unknown key 'bogus'"),
            ('[outputs."a b"]\n', "a name is"),
            ('[outputs.vm]\ngzip = "yes"\n', "expected true or false"),
        ):
            path.write_text(bad)
            with pytest.raises(ConfigError, match=says):
                load_config(path)
    finally:
        path.unlink()


# -- the recording as a write-ahead log (no event loop) ----------------------------------------


def write_recording(directory: Path, n: int, *, segment_bytes: int = 4096) -> list[ReadingsRecord]:
    writer = SegmentWriter(directory, segment_bytes=segment_bytes, retain_bytes=None)
    writer.open(1000.0)
    written = []
    for i in range(n):
        r = rec(1000.0 + i / 100, f"d{i % 3}", i, [("t", float(i)), ("k", i)])
        written.append(r)
        data = encode_readings_record(r.time, r.device_id, r.seq, 0, r.readings)
        if i % 5 == 0:
            data += encode_heartbeat_record(r.time, r.device_id, i)
        writer.write(data, r.time)
    writer.release()
    return written


def read_all(reader: WalReader, pos: Position, size: int) -> tuple[list[ReadingsRecord], Position]:
    out = []
    while True:
        chunk = reader.read(pos, size)
        out += [r for r, _ in chunk.records]
        if chunk.end == pos:
            return out, pos
        pos = chunk.end


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_the_wal_reader_reads_every_record_once_across_segments(tmp_path, size):
    written = write_recording(tmp_path, 300)
    assert len(list(tmp_path.glob("seg-*.rec"))) > 3
    got, end = read_all(WalReader(tmp_path), Position(0), size)
    assert [(r.device_id, r.seq, r.readings) for r in got] == [
        (r.device_id, r.seq, r.readings) for r in written
    ]
    # resuming at any record's position gives exactly the rest
    chunk = WalReader(tmp_path).read(Position(0), 137)
    middle = chunk.records[-1][1]
    rest, _ = read_all(WalReader(tmp_path), middle, size)
    assert [r.seq for r in rest] == list(range(137, 300))
    assert WalReader(tmp_path).read(end, 10).records == []


def test_the_wal_reader_waits_for_a_whole_record_and_reads_compressed_segments(tmp_path):
    write_recording(tmp_path, 200)
    writer = SegmentWriter(tmp_path, segment_bytes=1 << 20, retain_bytes=None)
    for path in sorted(tmp_path.glob("seg-*.rec"))[:-1][:2]:
        writer.compress_segment(path)
    assert list(tmp_path.glob("seg-*.rec.gz"))
    reader = WalReader(tmp_path)
    got, end = read_all(reader, Position(0), 9)
    assert [r.seq for r in got] == list(range(200))
    # the live segment ends in half a record: nothing more until the rest is there
    record = encode_readings_record(2000.0, "late", 1, 0, (("t", 1.0),))
    newest = sorted(tmp_path.glob("seg-*.rec"))[-1]
    with open(newest, "ab") as f:
        f.write(record[:7])
    assert reader.read(end, 10).records == [] and reader.read(end, 10).end == end
    with open(newest, "ab") as f:
        f.write(record[7:])
    chunk = reader.read(end, 10)
    assert [r.device_id for r, _ in chunk.records] == ["late"]


def test_missing_segments_are_named_and_lost_readings_counted(tmp_path):
    write_recording(tmp_path, 200)
    segments = sorted(tmp_path.glob("seg-*.rec"))
    pos = Position(2, SEGMENT_HEADER_LEN)
    in_2_and_3 = readings_after(segments[1], SEGMENT_HEADER_LEN) + readings_after(
        segments[2], SEGMENT_HEADER_LEN
    )
    assert in_2_and_3 == 2 * sum(
        1
        for r in RecordingReader(tmp_path)
        if isinstance(r, ReadingsRecord)
        and r.seq in {x.seq for x in _records_of(segments[1]) + _records_of(segments[2])}
    )
    segments[1].unlink()
    segments[2].unlink()
    chunk = WalReader(tmp_path).read(pos, 5)
    assert chunk.missing == [2, 3] and chunk.end.segment == 4
    assert readings_after(segments[3], SEGMENT_HEADER_LEN, lambda d, m: m == "t") == sum(
        1 for r in _records_of(segments[3])
    )


def _records_of(path: Path) -> list[ReadingsRecord]:
    from collector.wire.recording import decode_records

    return [r for r in decode_records(path.read_bytes()) if isinstance(r, ReadingsRecord)]


def test_a_checkpoint_is_replaced_whole(tmp_path):
    path = tmp_path / "out" / "x.checkpoint"
    assert load_checkpoint(path) is None
    save_checkpoint(path, Position(3, 1234), {"output": "x"})
    assert load_checkpoint(path) == Position(3, 1234)
    assert json.loads(path.read_text())["output"] == "x"
    assert [p.name for p in path.parent.iterdir()] == ["x.checkpoint"]  # no temporary left


# -- delivery to a stand-in database ----------------------------------------------------------


class StandIn:
    """An HTTP server that answers each POST with the next scripted status (then 204) and
    keeps every body it was sent."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, int, bytes]] = []  # (target, status answered, lines)
        self.headers: list[dict[str, str]] = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        with trio.move_on_after(30):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some()
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {
                    k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
                }
                length = int(headers.get("content-length", 0))
                while len(buf) < length:
                    buf += await stream.receive_some()
                body, buf = buf[:length], buf[length:]
                if headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                status = self.script.pop(0) if self.script else 204
                self.headers.append(headers)
                self.requests.append((lines[0].split()[1], status, body))
                reason = {204: "No Content", 400: "Bad Request", 503: "Unavailable"}[status]
                text = b'{"error":"partial write: field type conflict"}' if status == 400 else b""
                await stream.send_all(
                    f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(text)}\r\n\r\n".encode()
                    + text
                )


async def test_a_refused_batch_is_skipped_and_counted_and_failures_retried(nursery, tmp_path):
    db = StandIn([400, 503, 503])
    port = await nursery.start(db.serve)
    out = OutputConfig(
        "db", url=f"http://127.0.0.1:{port}", flush_interval=0.05, batch_size=1000,
        start="oldest", metrics=("t",), retry_max=0.2,
    )  # fmt: skip
    collector, _ = await start_collector(
        nursery, record_dir=str(tmp_path), record_flush_interval=0.02, outputs=(out,)
    )
    (output,) = collector.outputs
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        for i in range(40):
            await dev.send_readings({"t": float(i), "skip": i})
            await trio.sleep(0.01)
        with trio.fail_after(30):
            while output.counters["acknowledged"] + output.counters["rejected"] < 40:  # noqa: ASYNC110 (counters, not an event)
                await trio.sleep(0.05)
    target, status, first = db.requests[0]
    assert status == 400 and target.startswith("/write?db=telemetry&precision=ns")
    rejected = len(first.splitlines())
    assert output.counters["rejected"] == rejected >= 1
    assert output.counters["acknowledged"] == 40 - rejected
    assert output.counters["retries"] == 2 and output.counters["filtered"] == 40
    # the two 503s were the same batch, sent again; then it went through
    assert db.requests[1][2] == db.requests[2][2] == db.requests[3][2]
    assert [s for _, s, _ in db.requests[:4]] == [400, 503, 503, 204]
    seqs = [
        int(line.split()[-1]) % 1000
        for _, s, b in db.requests[1:]
        if s == 204
        for line in b.splitlines()
    ]
    assert len(seqs) == 40 - rejected and all(b"skip" not in b for _, _, b in db.requests)
    status = output.status()
    assert status["state"] == "sending" and "HTTP 503" in status["last_error"]
    saved = load_checkpoint(tmp_path / "outputs" / "db.checkpoint")
    # the file is at the output's committed position, or ahead of it by a commit in flight
    assert saved is not None and output.committed is not None and saved >= output.committed
    assert saved.offset > SEGMENT_HEADER_LEN
    report = await collector.shutdown()
    assert f"; outputs: db {40 - rejected} confirmed, {rejected} rejected (the rest" in (
        report.summary()
    )


# -- a real VictoriaMetrics, a collector killed twice, the database stopped for 10 s ------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VictoriaMetrics:
    """victoria-metrics on a free port. Deduplication at 1 ms: a sample sent again (same
    series, same millisecond) is stored once, as InfluxDB overwrites a point sent again."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [VM, f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={tmp / 'vm'}",
             "-dedup.minScrapeInterval=1ms", "-retentionPeriod=100y", "-loggerLevel=ERROR"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.answers():
            assert self.proc.poll() is None, "victoria-metrics exited"
            assert time.monotonic() < deadline, "victoria-metrics did not answer"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    #: the precision it stores timestamps with, in nanoseconds
    unit_ns = 1_000_000

    def samples(self, metric: str) -> dict[str, list[int]]:
        """device -> the timestamps (ms) stored for `metric`."""
        metric = f"telemetry_{metric}"
        urllib.request.urlopen(self.url + "/internal/force_flush", timeout=10).read()
        query = urllib.parse.urlencode({"match[]": metric})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=30) as r:
            lines = r.read().decode().splitlines()
        out: dict[str, list[int]] = {}
        for line in lines:
            doc = json.loads(line)
            out.setdefault(doc["metric"]["device"], []).extend(doc["timestamps"])
        return out

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(20)


class CollectorProcess:
    def __init__(self, tmp: Path, ports: tuple[int, int, int]) -> None:
        self.tcp, self.udp, self.http = ports
        self.log = open(tmp / "collector.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "collector", "serve", "--devices", str(tmp / "devices.toml"),
             "--config", str(tmp / "collector.toml"), "--record", str(tmp / "rec"),
             "--host", "127.0.0.1", "--tcp-port", str(self.tcp), "--udp-port", str(self.udp),
             "--http-port", str(self.http)],
            cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            return json.loads(r.read())

    async def ready(self) -> None:
        with trio.fail_after(60):
            while True:
                assert self.proc.poll() is None, "the collector exited"
                try:
                    await trio.to_thread.run_sync(self.api, "/healthz")
                    return
                except OSError:
                    await trio.sleep(0.1)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


class InfluxDB:
    """influxd (1.x) on free ports, with a database `telemetry`. A point sent again (same
    series, same nanosecond) overwrites itself."""

    unit_ns = 1

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        d = tmp / "influxdb"
        conf = tmp / "influxdb.conf"
        conf.write_text(
            f'reporting-enabled = false\nbind-address = "127.0.0.1:{free_port()}"\n'
            f'[meta]\n  dir = "{d}/meta"\n[data]\n  dir = "{d}/data"\n  wal-dir = "{d}/wal"\n'
            "  query-log-enabled = false\n"
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n'
            "[ifql]\n  enabled = false\n[monitor]\n  store-enabled = false\n"
            '[logging]\n  level = "error"\n'
        )
        self.proc = subprocess.Popen(
            [INFLUXD, "run", "-config", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.answers():
            assert self.proc.poll() is None, "influxd exited"
            assert time.monotonic() < deadline, "influxd did not answer"
            time.sleep(0.05)
        self.query("CREATE DATABASE telemetry")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=2) as r:
                return r.status == 204
        except OSError:
            return False

    def query(self, q: str) -> Any:
        data = urllib.parse.urlencode({"q": q, "db": "telemetry", "epoch": "ns"}).encode()
        with urllib.request.urlopen(self.url + "/query", data=data, timeout=30) as r:
            return json.loads(r.read())

    def samples(self, metric: str) -> dict[str, list[int]]:
        """device -> the timestamps (ns) stored for `metric`."""
        doc = self.query(f'SELECT "{metric}" FROM telemetry GROUP BY device')
        out: dict[str, list[int]] = {}
        for series in doc["results"][0].get("series", []):
            values = [row[0] for row in series["values"] if row[1] is not None]
            out.setdefault(series["tags"]["device"], []).extend(values)
        return out

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(20)


def _server(kind: str, tmp: Path) -> Any:
    binary, package, cls = {
        "victoria-metrics": (VM, "victoria-metrics", VictoriaMetrics),
        "influxdb": (INFLUXD, "influxdb", InfluxDB),
    }[kind]
    if binary is None:
        if os.environ.get("REQUIRE_OUTPUTS"):
            raise RuntimeError(f"REQUIRE_OUTPUTS is set but {package} is not installed")
        pytest.skip(f"{package} is not installed (Debian: apt-get install {package})")
    return cls(tmp)


@pytest.fixture(params=["victoria-metrics", "influxdb"])
def database(request, tmp_path):
    server = _server(request.param, tmp_path)
    yield server
    server.stop()


@pytest.fixture
def influxdb(tmp_path):
    server = _server("influxdb", tmp_path)
    yield server
    server.stop()


async def test_every_recorded_reading_reaches_the_database_once_through_kills_and_an_outage(
    tmp_path, database
):
    devices = DeviceRegistry({})
    secrets = {d: devices.add(d) for d in ("vm-1", "vm-2")}
    devices.save(tmp_path / "devices.toml")
    (tmp_path / "collector.toml").write_text(
        "[recording]\nflush_interval = 0.05\n\n"
        f'[outputs.vm]\nurl = "{database.url}"\nstart = "oldest"\n'
        "flush_interval = 0.2\nbatch_size = 400\nretry_max = 1.0\ntimeout = 2.0\n"
    )
    ports = (free_port(), free_port(socket.SOCK_DGRAM), free_port())
    collector = CollectorProcess(tmp_path, ports)
    stop = trio.Event()
    sent = dict.fromkeys(secrets, 0)

    async def device(device_id: str) -> None:
        """Sends a reading every 20 ms; registers again after its collector was killed."""
        while not stop.is_set():
            try:
                async with open_device(
                    "127.0.0.1", device_id, secrets[device_id], tcp_port=ports[0],
                    register_timeout=5,
                ) as dev:  # fmt: skip
                    while not stop.is_set() and dev.end_reason is None:
                        await dev.send_readings({"t": float(sent[device_id])})
                        sent[device_id] += 1
                        await trio.sleep(0.02)
            except Exception:  # the collector is being killed or is starting
                await trio.sleep(0.2)

    try:
        await collector.ready()
        async with trio.open_nursery() as nursery:
            for device_id in secrets:
                nursery.start_soon(device, device_id)
            await trio.sleep(3)
            collector.kill()  # 1st SIGKILL
            collector = CollectorProcess(tmp_path, ports)
            await collector.ready()
            await trio.sleep(2)
            os.kill(database.proc.pid, signal.SIGSTOP)  # the database away for 10 s
            await trio.sleep(10)
            os.kill(database.proc.pid, signal.SIGCONT)
            await trio.sleep(2)
            collector.kill()  # 2nd SIGKILL, while it catches up
            collector = CollectorProcess(tmp_path, ports)
            await collector.ready()
            await trio.sleep(2)
            stop.set()
        # A graceful stop writes what the recorder holds: the recording is then complete, and
        # the collector started again sends what its output has not.
        collector.proc.terminate()
        assert collector.proc.wait(60) == 0
        collector = CollectorProcess(tmp_path, ports)
        await collector.ready()

        recorded: dict[str, set[int]] = {}
        readings = 0
        for r in RecordingReader(tmp_path / "rec"):
            if isinstance(r, ReadingsRecord):
                readings += 1
                stamp = lineproto.timestamp_ns(r) // database.unit_ns
                recorded.setdefault(r.device_id, set()).add(stamp)
        assert readings > 500 and set(recorded) == set(secrets)

        def stored() -> dict[str, list[int]]:
            return database.samples("t")

        with trio.move_on_after(90):
            while True:
                got = await trio.to_thread.run_sync(stored)
                if sum(map(len, got.values())) >= sum(map(len, recorded.values())):
                    break
                await trio.sleep(0.5)
        got = await trio.to_thread.run_sync(stored)
        for device_id, stamps in recorded.items():
            assert len(got.get(device_id, [])) == len(set(got.get(device_id, []))), "duplicates"
            assert set(got.get(device_id, [])) == stamps, device_id
        (status,) = collector.api("/api/outputs")["outputs"]
        assert status["name"] == "vm" and status["rejected"] == 0 and status["dropped"] == 0
        log = (tmp_path / "collector.log").read_text()
        assert "ReadTimeout" in log and "answers again" in log  # the outage was one
        if database.unit_ns == 1:  # nanoseconds: every reading is a point of its own
            assert readings == sum(map(len, recorded.values()))
    finally:
        collector.kill()


# -- last-value gauges on /metrics -------------------------------------------------------------


async def test_prometheus_gauges_hold_last_values_up_to_a_cap(nursery, autojump_clock):
    from prometheus_client.parser import text_string_to_metric_families

    gauges = OutputConfig("last", type="prometheus", max_series=3, metrics=("t*", "door", "mode"))
    collector, _ = await start_collector(nursery, http_port=0, outputs=(gauges,))
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        await dev.send_readings({"t1": 20.0, "door": True, "other": 1})
        await dev.send_readings({"t1": 21.5, "mode": "eco"})  # text: not a number
        await dev.send_readings({"t2": 1, "t3": 2})  # t3 is a 4th series: refused
        await trio.sleep(0.5)
    status, _, raw = await http(collector, "GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    values = {
        (s.labels["device"], s.labels["metric"]): s.value
        for s in families["collector_reading"].samples
    }
    assert values == {("dev-1", "t1"): 21.5, ("dev-1", "door"): 1.0, ("dev-1", "t2"): 1.0}
    refused = {
        s.labels["reason"]: s.value
        for s in families["collector_reading_refused"].samples
        if s.name.endswith("_total")
    }
    assert refused == {"max_series": 1.0, "not_a_number": 1.0}
    assert "collector_output_sent" not in families  # no influx output: no such families
    _, listing = await api(collector, "GET", "/api/outputs")
    assert listing["outputs"] == [
        {"name": "last", "type": "prometheus", "destination": "/metrics", "state": "sending",
         "series": 3, "max_series": 3, "refused": {"not_a_number": 1, "max_series": 1}},
    ]  # fmt: skip
    await collector.shutdown()


# -- MQTT: a real Mosquitto, restarted under the output ------------------------------------------

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)


class Mosquitto:
    """mosquitto on a free port, persistent (a restart keeps the subscriber's session and the
    messages queued for it, as a production broker does)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        (tmp / "mq").mkdir()
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {tmp / 'mq'}/\nmax_queued_messages 100000\n"
        )
        self.log = open(tmp / "mosquitto.log", "ab")
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, "mosquitto exited"
                assert time.monotonic() < deadline, "mosquitto does not listen"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture
def mosquitto(tmp_path):
    if MOSQUITTO is None:
        if os.environ.get("REQUIRE_OUTPUTS"):
            raise RuntimeError("REQUIRE_OUTPUTS is set but mosquitto is not installed")
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto)")
    broker = Mosquitto(tmp_path)
    yield broker
    if broker.proc.poll() is None:
        broker.stop()


class Subscriber:
    """A persistent QoS 1 subscriber to collector/# (paho in its own thread)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.got: list[tuple[str, bytes]] = []
        self.subscribed = 0
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub", clean_session=False)
        c.on_connect = lambda c, u, f, rc, p: c.subscribe("collector/#", qos=1)
        c.on_subscribe = lambda *a: setattr(self, "subscribed", self.subscribed + 1)
        c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        c.reconnect_delay_set(1, 1)
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_mqtt_subscriber_gets_every_reading_across_a_broker_restart(
    nursery, tmp_path, mosquitto
):
    sub = Subscriber(mosquitto.port)
    try:
        with trio.fail_after(20):
            while not sub.subscribed:  # noqa: ASYNC110 (paho's thread sets it)
                await trio.sleep(0.05)
        out = OutputConfig(
            "mq", type="mqtt", url=f"mqtt://127.0.0.1:{mosquitto.port}", flush_interval=0.1,
            batch_size=200, timeout=0.5, retry_max=1.0, metrics=("t",),
        )  # fmt: skip
        collector, _ = await start_collector(
            nursery, record_dir=str(tmp_path / "rec"), record_flush_interval=0.02, outputs=(out,)
        )
        (output,) = collector.outputs
        port = collector.tcp_address[1]
        async with open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port) as dev:
            for i in range(300):
                await dev.send_readings({"t": float(i), "hidden": i})
                await trio.sleep(0.01)
                if i == 100:
                    await trio.to_thread.run_sync(mosquitto.stop)  # the broker restarts
                if i == 250:  # down for at least 1.5 s: longer than the output's timeout
                    await trio.to_thread.run_sync(mosquitto.start)
        await trio.sleep(0.5)
        recorded = {
            (r.seq, float(dict(r.readings)["t"]))
            for r in RecordingReader(tmp_path / "rec")
            if isinstance(r, ReadingsRecord)
        }
        assert len(recorded) == 300

        def received() -> set[tuple[int, float]]:
            return {
                (doc["seq"], doc["value"])
                for topic, payload in list(sub.got)
                if topic == "collector/dev-1/t" and (doc := json.loads(payload))
            }

        # The subscriber may get a reading before the output has the broker's PUBACK for it:
        # wait for both.
        with trio.move_on_after(60):
            while not (  # noqa: ASYNC110 (paho's threads deliver and acknowledge)
                recorded <= received() and output.status()["acknowledged"] >= 300
            ):
                await trio.sleep(0.2)
        assert recorded <= received()
        assert all(topic in ("collector/dev-1/t", "collector/dev-1/events") for topic, _ in sub.got)
        events = [json.loads(p) for t, p in sub.got if t == "collector/dev-1/events"]
        assert {"event": "online", "device": "dev-1"}.items() <= events[0].items()
        status = output.status()
        assert status["retries"] >= 1 and status["acknowledged"] >= 300
        assert "not connected" in status["last_error"] or "acknowledged" in status["last_error"]
        await collector.shutdown()
    finally:
        sub.close()


async def test_the_v2_api_carries_org_bucket_and_token(nursery, tmp_path):
    db = StandIn([])
    port = await nursery.start(db.serve)
    out = OutputConfig(
        "v2", url=f"http://127.0.0.1:{port}/", api="v2", org="plant", bucket="b 1",
        token="s3cret", gzip=False, flush_interval=0.05, layout="metric",
    )  # fmt: skip
    collector, _ = await start_collector(nursery, outputs=(out,))  # no recording: from memory
    (output,) = collector.outputs
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        await dev.send_readings({"t": 1.5, "mode": "eco"})
        with trio.fail_after(30):
            while output.counters["acknowledged"] < 2:  # noqa: ASYNC110 (counters, not an event)
                await trio.sleep(0.05)
    (target, _, body) = db.requests[0]
    assert target == "/api/v2/write?org=plant&bucket=b+1&precision=ns"
    assert (
        db.headers[0]["authorization"] == "Token s3cret" and "content-encoding" not in db.headers[0]
    )
    lines = body.decode().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        "telemetry,device=dev-1,metric=t value=1.5",
        'telemetry,device=dev-1,metric=mode value="eco"',
    ]
    status = output.status()
    assert status["source"] == "memory" and status["checkpoint"] is None
    await collector.shutdown()


async def test_a_bug_in_an_output_costs_a_restart_from_its_checkpoint(
    nursery, tmp_path, monkeypatch
):
    db = StandIn([])
    port = await nursery.start(db.serve)
    out = OutputConfig("db", url=f"http://127.0.0.1:{port}", flush_interval=0.05, start="oldest")
    collector, _ = await start_collector(
        nursery, record_dir=str(tmp_path), record_flush_interval=0.02, outputs=(out,)
    )
    (output,) = collector.outputs
    real = lineproto.encode
    calls = []

    def buggy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the encoder")
        return real(*args, **kwargs)

    monkeypatch.setattr(lineproto, "encode", buggy)
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        for i in range(20):
            await dev.send_readings({"t": float(i)})
            await trio.sleep(0.02)
        with trio.fail_after(30):
            while output.counters["acknowledged"] < 20:  # noqa: ASYNC110 (counters, not an event)
                await trio.sleep(0.05)
        assert dev.end_reason is None  # the device was served all along
    assert collector.boundary.counts["output"] == 1 and output.counters["restarts"] == 1
    assert output.counters["acknowledged"] == 20 and output.state == "sending"
    await collector.shutdown()


def test_retention_keeps_what_an_output_needs_until_the_disk_limit_forces_it(tmp_path):
    write_recording(tmp_path, 300)
    segments = [(int(p.name[4:10]), p) for p in sorted(tmp_path.glob("seg-*.rec"))]
    writer = SegmentWriter(tmp_path, retain_seconds=1.0, retain_bytes=None)
    writer.path = segments[-1][1]  # the live one is never deleted
    forced: list[int] = []
    # age: everything is old, but the output still needs segment 3 and later
    removed = writer.apply_retention(1e12, keep_from=3, forced=lambda p, n: forced.append(n))
    assert [p.name for p in removed] == [segments[0][1].name, segments[1][1].name]
    assert forced == [] and (tmp_path / segments[2][1].name).exists()
    # size: the limit wins, and says which needed segments it deleted
    writer.retain_seconds, writer.retain_bytes = None, 1
    removed = writer.apply_retention(1e12, keep_from=3, forced=lambda p, n: forced.append(n))
    assert forced == [n for n, _ in segments[2:-1]] and len(removed) == len(segments) - 3


async def test_the_recorder_counts_per_output_what_the_disk_limit_deletes_unsent(
    nursery, tmp_path, caplog
):
    import collections

    from collector.core.events import Telemetry
    from collector.core.recorder import Recorder, RecorderConfig

    class Unsent:
        """An output stuck at the start of segment 1 (its destination is away)."""

        name = "stuck"

        def __init__(self) -> None:
            self.counters: collections.Counter[str] = collections.Counter()

        def needs(self) -> Position:
            return Position(1, SEGMENT_HEADER_LEN)

        def lost_to_retention(self, path: Path, segment: int, pos: Position) -> int:
            return readings_after(path, pos.offset if pos.segment == segment else 0)

    cfg = RecorderConfig(
        directory=str(tmp_path), flush_interval=0.01, segment_bytes=2048, retain_bytes=6000
    )
    recorder = Recorder(cfg, wall=time.time)
    stuck = Unsent()
    recorder.outputs.append(stuck)
    await nursery.start(recorder.serve)
    for i in range(400):
        recorder.on_telemetry([Telemetry(time.time(), "d1", i, 0, (("t", float(i)),))])
        await recorder.flush()
    left = {r.seq for r in RecordingReader(tmp_path) if isinstance(r, ReadingsRecord)}
    assert 0 < len(left) < 400
    assert stuck.counters["dropped"] == 400 - len(left)  # every reading gone, counted
    assert "before output stuck sent it" in caplog.text
    await recorder.aclose()


async def test_a_batch_influxdb_refuses_is_skipped_and_counted(nursery, tmp_path, influxdb):
    """A real 400: a field written as an int, then as a float (a field type conflict)."""
    out = OutputConfig("ifx", url=influxdb.url, flush_interval=0.05, start="oldest")
    collector, _ = await start_collector(
        nursery, record_dir=str(tmp_path / "rec"), record_flush_interval=0.02, outputs=(out,)
    )
    (output,) = collector.outputs
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        for i, value in enumerate([1, 2.5, 3]):
            await dev.send_readings({"n": value})
            with trio.fail_after(30):
                while output.counters["acknowledged"] + output.counters["rejected"] <= i:  # noqa: ASYNC110
                    await trio.sleep(0.02)
    assert (output.counters["acknowledged"], output.counters["rejected"]) == (2, 1)
    assert "field type conflict" in output.status()["last_error"]
    rows = influxdb.query("SELECT n FROM telemetry")["results"][0]["series"][0]["values"]
    assert [row[1] for row in rows] == [1, 3]
    await collector.shutdown()


def test_a_batch_never_holds_more_than_batch_size_readings(tmp_path):
    """Records of 2 readings, batches of 5: 2 records (4 readings) each, none skipped."""
    write_recording(tmp_path, 9)
    sizes: list[int] = []
    seqs: list[int] = []

    class Recorder:
        flushed = trio.Event()
        last_record_time = None
        outputs: list[Any] = []

    out = OutputConfig("x", batch_size=5, flush_interval=0.01, start="oldest")
    output = Output(out, recorder=Recorder(), record_dir=str(tmp_path), wall=time.time)  # type: ignore[arg-type]

    async def main() -> None:
        output.position = Position(0, SEGMENT_HEADER_LEN)
        while len(seqs) < 9:
            records, _end = await output._next_batch()
            sizes.append(sum(len(r.readings) for r in records))
            seqs.extend(r.seq for r in records)

    trio.run(main)
    assert sizes == [4, 4, 4, 4, 2] and seqs == list(range(9))
