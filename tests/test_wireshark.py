"""The Wireshark dissector, tools/wireshark/collector.lua, run by tshark.

Two tests: the vectors of docs/PROTOCOL.md and datagrams the collector refuses as malformed, in
a capture file written here (needs tshark only); and a real capture on the loopback interface
(needs dumpcap and the right to capture) of a UDP-only device registering with the collector,
sending, answering a command and leaving, where every datagram that crossed the collector's
socket must be decoded as the collector's own codec decodes it.

They skip when tshark or dumpcap is missing (Debian: `apt-get install tshark`, see
tools/wireshark/README.md) or when capturing on `lo` is not permitted.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from collector.core.events import DeviceOffline, DeviceOnline, Telemetry
from collector.core.ingest import Ingest
from collector.device.client import open_udp_device
from collector.wire import datagram as dg
from collector.wire.datagram import DatagramType

from .helpers import SECRETS, start_collector

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "tools" / "wireshark" / "collector.lua"
DOC = ROOT / "docs" / "PROTOCOL.md"
TSHARK = shutil.which("tshark")
DUMPCAP = shutil.which("dumpcap")
#: CI sets REQUIRE_TSHARK=1: there a missing tshark fails these tests instead of skipping them
REQUIRED = os.environ.get("REQUIRE_TSHARK") == "1"
NEEDS_TSHARK = pytest.mark.skipif(
    TSHARK is None and not REQUIRED,
    reason="tshark is not installed (Debian: apt-get install tshark)",
)

#: what the tests read from each frame (-T fields)
FIELDS = [
    "frame.number",
    "udp.srcport",
    "udp.dstport",
    "collector.direction",
    "collector.version",
    "collector.type",
    "collector.flags.ack_requested",
    "collector.session_id",
    "collector.seq",
    "collector.time_us",
    "collector.time",
    "collector.device_id",
    "collector.hello_nonce",
    "collector.cookie_nonce",
    "collector.server_nonce",
    "collector.ciphertext_len",
    "collector.tag",
    "collector.hello_frame",
    "collector.malformed",
    "_ws.expert.message",
    "_ws.malformed",
]
TYPE_NAMES = {str(int(t)): t.name for t in DatagramType}
D2C, C2D = "device to collector", "collector to device"


# -- running tshark ----------------------------------------------------------------------------


async def tshark(pcap: Path, *args: str) -> str:
    # A home of its own: no personal preferences, and no copy of the dissector installed in
    # the personal plugins folder (a second Proto of the same name would not load).
    home = pcap.parent / "home"
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    env.pop("WIRESHARK_CONFIG_DIR", None)
    result = await trio.run_process(
        [TSHARK, "-n", "-X", f"lua_script:{LUA}", "-r", str(pcap), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, err
    assert "lua" not in err.lower(), err  # a script that does not load says so here
    return result.stdout.decode()


async def dissect(pcap: Path, *options: str) -> list[dict[str, str]]:
    """One dict per frame: field name -> value ("" when absent, "|" between repeats)."""
    fields = [a for f in FIELDS for a in ("-e", f)]
    out = await tshark(
        pcap, *options, "-T", "fields", "-E", "separator=/t", "-E", "aggregator=|", *fields
    )
    rows = [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in out.splitlines()]
    infos = await info_column(pcap, *options)
    for row in rows:
        row["info"] = infos[int(row["frame.number"])]
    return rows


async def info_column(pcap: Path, *options: str) -> dict[int, str]:
    """The Info column (the summary line with only the number and the Info columns, which
    works on every tshark version, unlike the column's field name)."""
    fmt = 'gui.column.format:"No.","%m","Info","%i"'
    out = await tshark(pcap, *options, "-o", fmt)
    infos = {}
    for line in out.splitlines():
        number, _, info = line.strip().partition(" ")
        infos[int(number)] = info.strip()
    return infos


def hexfield(value: str) -> str:
    return value.replace(":", "").lower()


def flag(value: str) -> bool:
    return value.lower() in ("1", "true")


def problems(row: dict[str, str]) -> list[str]:
    return [
        row[k] for k in ("collector.malformed", "_ws.expert.message", "_ws.malformed") if row[k]
    ]


# -- what a datagram is, by the collector's own codec ---------------------------------------------


def decoded_by_tshark(row: dict[str, str]) -> dict[str, Any]:
    return {
        "direction": row["collector.direction"],
        "type": TYPE_NAMES[row["collector.type"]],
        "ack_requested": flag(row["collector.flags.ack_requested"]),
        "session_id": int(row["collector.session_id"], 16),
        "seq": int(row["collector.seq"]),
        "time_us": int(row["collector.time_us"]),
        "device_id": row["collector.device_id"] or None,
        "hello_nonce": hexfield(row["collector.hello_nonce"]) or None,
        "cookie_nonce": hexfield(row["collector.cookie_nonce"]) or None,
        "server_nonce": hexfield(row["collector.server_nonce"]) or None,
        "ciphertext_len": int(row["collector.ciphertext_len"]),
        "tag": hexfield(row["collector.tag"]),
    }


def decoded_by_codec(data: bytes, direction: str) -> dict[str, Any]:
    header = dg.decode_header_untrusted(data, max_size=65536)
    out: dict[str, Any] = {
        "direction": direction,
        "type": header.type.name,
        "ack_requested": header.ack_requested,
        "session_id": header.session_id,
        "seq": header.seq,
        "time_us": header.timestamp_us,
        "device_id": None,
        "hello_nonce": None,
        "cookie_nonce": None,
        "server_nonce": None,
        "ciphertext_len": len(data) - dg.HEADER_LEN - 16,
        "tag": data[-16:].hex(),
    }
    if header.type == DatagramType.HELLO:
        hello = dg.parse_hello_untrusted(data)
        out |= {"device_id": hello.device_id, "hello_nonce": hello.nonce.hex()}
        out["ciphertext_len"] = len(hello.sealed) - 16
    elif header.type in (DatagramType.COOKIE, DatagramType.WELCOME):
        out["hello_nonce"] = dg.answered_hello_untrusted(data).hex()
        if header.type == DatagramType.COOKIE:
            out["cookie_nonce"] = data[32:44].hex()
            out["ciphertext_len"] = len(data) - 44 - 16
        else:
            out["server_nonce"] = dg.welcome_nonce_untrusted(data)[1].hex()
            out["ciphertext_len"] = len(data) - 48 - 16
    return out


def frozen(d: dict[str, Any]) -> tuple:
    return tuple(sorted(d.items()))


# -- a capture file written by hand ------------------------------------------------------------


def pcap_file(path: Path, frames: list[tuple[bytes, int, int]]) -> None:
    """A classic pcap of Ethernet/IPv4/UDP frames from 127.0.0.1 to 127.0.0.1, one a second
    from 2026-01-01 (UDP checksum 0: none)."""
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for i, (payload, sport, dport) in enumerate(frames):
        udp = struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload
        ip = struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0) + bytes(
            [127, 0, 0, 1, 127, 0, 0, 1]
        )
        checksum = sum(struct.unpack(">10H", ip))
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
        ip = ip[:10] + struct.pack(">H", ~checksum & 0xFFFF) + ip[12:]
        frame = bytes(12) + b"\x08\x00" + ip + udp
        out += struct.pack("<IIII", 1_767_225_600 + i, 0, len(frame), len(frame)) + frame
    path.write_bytes(out)


def doc_vectors() -> dict[str, tuple[dict[str, Any], bytes]]:
    """name -> (fields, datagram) for every datagram vector of docs/PROTOCOL.md section 6."""
    out = {}
    for body in re.findall(r"```text\n(vector: .*?)```", DOC.read_text(), flags=re.S):
        name = body.split()[1]
        f = re.search(r"^fields\s+(.*)$", body, flags=re.M)
        d = re.search(r"^datagram\s+(.*)", body, flags=re.S | re.M)
        if f and d:
            out[name] = (json.loads(f.group(1)), bytes.fromhex("".join(d.group(1).split())))
    return out


def _set(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@NEEDS_TSHARK
async def test_vectors_and_malformed_datagrams(tmp_path):
    vectors = doc_vectors()
    assert {f["type"] for f, _ in vectors.values()} == {t.name for t in DatagramType}
    device, collector = 40000, 8081  # the default port: no preference needed
    frames = []
    for f, data in vectors.values():  # HELLO, COOKIE and WELCOME have no "direction"
        from_device = f["type"] == "HELLO" or f.get("direction") == "device-to-collector"
        frames.append((data, device, collector) if from_device else (data, collector, device))
    hb, hello = vectors["heartbeat"][1], vectors["hello"][1]
    bad = [  # what the collector refuses as malformed, and the expert info that says so
        ("version", _set(hb, 0, b"\x01")),
        ("short", hb[:30]),
        ("type", _set(hb, 1, b"\x09")),
        ("flags", _set(hb, 2, b"\x02")),
        ("flags", _set(vectors["goodbye"][1], 2, b"\x01")),  # ACK_REQUESTED on a GOODBYE
        ("reserved", _set(hb, 3, b"\x01")),
        ("field", _set(hello, 4, b"\x00\x00\x00\x01")),  # a HELLO with a session id
        ("length", hello[:-1]),
        ("length", hb + b"\x00"),  # a HEARTBEAT payload of 5 bytes
        ("direction", vectors["command"][1]),  # a COMMAND from the device
    ]
    frames += [(data, device, collector) for _, data in bad]
    pcap = tmp_path / "vectors.pcap"
    pcap_file(pcap, frames)

    rows = await dissect(pcap)
    assert len(rows) == len(frames)
    by_name = dict(zip(vectors, rows, strict=False))
    for name, (f, data) in vectors.items():
        row = by_name[name]
        assert not problems(row), (name, row)
        got = decoded_by_tshark(row)
        typ = f["type"]
        assert got["type"] == typ
        direction = f.get("direction", "device-to-collector" if typ == "HELLO" else C2D)
        assert got["direction"] == direction.replace("-", " ")
        assert got["session_id"] == f.get("session_id", 0)
        assert got["seq"] == f.get("seq", 0)
        assert got["ack_requested"] == bool(f.get("flags", 0))
        assert got["time_us"] == f["timestamp_us"] == 1_767_225_600_000_000
        assert re.match(r"(Jan  1, 2026 |2026-01-01T)00:00:00\.0+(Z| UTC)", row["collector.time"])
        assert got["device_id"] == f.get("device_id")
        assert got["hello_nonce"] == f.get("nonce" if typ == "HELLO" else "hello_nonce")
        assert got["cookie_nonce"] == (f["nonce"] if typ == "COOKIE" else None)
        assert got["server_nonce"] == f.get("server_nonce")
        assert got == decoded_by_codec(data, got["direction"])
        assert row["info"].startswith(typ + " ")
    assert by_name["cookie"]["collector.hello_frame"] == by_name["hello"]["frame.number"]
    assert (
        by_name["welcome"]["collector.hello_frame"] == by_name["hello-with-cookie"]["frame.number"]
    )
    assert by_name["telemetry"]["info"] == "TELEMETRY sid=0x5eed0001 seq=3 (60 bytes sealed)"
    assert by_name["heartbeat-ack-requested"]["info"] == (
        "HEARTBEAT sid=0x5eed0001 seq=2 ACK_REQUESTED (4 bytes sealed)"
    )

    # Each malformed datagram is marked, with the expert info of its fault.
    rows = rows[len(vectors) :]
    experts = sorted({f"collector.malformed.{name}" for name, _ in bad})
    out = await tshark(pcap, "-T", "fields", *[a for e in experts for a in ("-e", e)])
    lines = out.splitlines()[len(vectors) :]
    for (name, _), row, line in zip(bad, rows, lines, strict=True):
        assert flag(row["collector.malformed"]) and row["_ws.malformed"], (name, row)
        assert row["info"].startswith("[Malformed: "), row["info"]
        present = {e for e, v in zip(experts, line.split("\t"), strict=True) if v}
        assert f"collector.malformed.{name}" in present, (name, row["info"])


# -- a real capture ------------------------------------------------------------------------------


def _read(log: Path) -> str:
    return log.read_bytes().decode(errors="replace").strip()


def _capturing(capture: Path, log: Path) -> bool:
    return capture.exists() and "Capturing on" in _read(log)


@pytest.fixture
def loopback_capture() -> None:
    """Skip unless dumpcap may capture on lo: it opens the interface to list its link types.
    (A sync fixture: pytest-trio 0.8 drops the reason of a skip raised inside the test.)"""
    if DUMPCAP is None:
        if REQUIRED:
            pytest.fail("REQUIRE_TSHARK=1 but dumpcap is not installed", pytrace=False)
        pytest.skip("dumpcap is not installed (Debian: apt-get install tshark)")
    probe = subprocess.run(
        [DUMPCAP, "-L", "-i", "lo"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[0]
        pytest.skip(f"capturing on lo is not permitted here: {why}")


async def start_capture(port: int, capture: Path, log: Path) -> trio.Process:
    """dumpcap on lo for the collector's UDP port, once it is capturing."""
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [DUMPCAP, "-i", "lo", "-f", f"udp port {port}", "-w", str(capture)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    with trio.move_on_after(10):
        while proc.poll() is None:
            if _capturing(capture, log):
                # dumpcap says "Capturing on" before it opens the interface, and the filter
                # takes a moment: wait a little, and make sure that it is still running.
                await trio.sleep(0.3)
                if proc.poll() is None:
                    return proc
                break
            await trio.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        await proc.wait()
        pytest.fail(f"dumpcap did not start capturing within 10 s: {_read(log)}")
    pytest.fail(f"dumpcap failed ({proc.returncode}): {_read(log)}")


async def stop_capture(proc: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        await trio.sleep(0.3)  # what is still in the kernel's buffer
        proc.terminate()  # SIGTERM: dumpcap writes what it has and closes the file
        with trio.move_on_after(5) as waiting:
            await proc.wait()
        if waiting.cancelled_caught:
            proc.kill()
            await proc.wait()


class OnOffline:
    """A listener that sets an event when a device goes offline."""

    def __init__(self, event: trio.Event) -> None:
        self.event = event

    def on_telemetry(self, batch) -> None:
        pass

    def on_event(self, event) -> None:
        if isinstance(event, DeviceOffline):
            self.event.set()


@NEEDS_TSHARK
async def test_a_captured_udp_session(tmp_path, monkeypatch, loopback_capture):
    # Every datagram that crosses the collector's socket, as the collector saw it.
    seen: list[tuple[str, bytes]] = []
    handle, send = Ingest.handle_datagram, Ingest.send_datagram

    def handle_datagram(self, data, addr):
        seen.append((D2C, bytes(data)))
        return handle(self, data, addr)

    def send_datagram(self, data, addr):
        sent = send(self, data, addr)
        if sent:
            seen.append((C2D, bytes(data)))
        return sent

    monkeypatch.setattr(Ingest, "handle_datagram", handle_datagram)
    monkeypatch.setattr(Ingest, "send_datagram", send_datagram)

    capture = tmp_path / "capture.pcapng"
    commands: list[str] = []

    def on_command(name, args):
        commands.append(name)
        return {"pong": True}

    offline = trio.Event()
    started = time.time()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            collector, log = await start_collector(nursery, wall=time.time)
            collector.add_listener(OnOffline(offline))
            port = collector.udp_address[1]
            proc = await start_capture(port, capture, tmp_path / "dumpcap.log")
            try:
                async with open_udp_device(
                    "127.0.0.1", "udp-1", SECRETS["udp-1"], udp_port=port, on_command=on_command
                ) as dev:
                    heartbeat = await dev.send_heartbeat(ack=True)
                    readings = [
                        await dev.send_readings({"temperature": 20.5 + i, "count": i}, ack=True)
                        for i in range(3)
                    ]
                    record = collector.send_command("udp-1", "ping")
                    await record.done.wait()
                    assert record.state == "acked" and record.result == {"pong": True}
                    device_port = dev.udp.getsockname()[1]
                    session_id = dev.session_id
                await offline.wait()
            finally:
                await stop_capture(proc)
            nursery.cancel_scope.cancel()
    finished = time.time()
    assert commands == ["ping"]
    assert [e.reason for e in log.of(DeviceOffline)] == ["closed"]  # the GOODBYE datagram
    assert [e.session_id for e in log.of(DeviceOnline)] == [session_id]

    # The port preference says where the collector is. Decode As on the device's ephemeral
    # port too, so that no other dissector registered on that port number claims it first.
    rows = await dissect(
        capture, "-o", f"collector.udp_port:{port}", "-d", f"udp.port=={device_port},collector"
    )
    for row in rows:
        assert row["collector.type"], f"frame {row['frame.number']} was not dissected: {row}"
        assert not problems(row), row
    got = [decoded_by_tshark(row) for row in rows]
    expected = [decoded_by_codec(data, direction) for direction, data in seen]
    assert collections.Counter(map(frozen, got)) == collections.Counter(map(frozen, expected))

    def of(direction: str, *types: str) -> list[dict[str, Any]]:
        return [g for g in got if g["direction"] == direction and g["type"] in types]

    types = {g["type"] for g in got}
    assert types >= {"HELLO", "COOKIE", "WELCOME", "HEARTBEAT", "TELEMETRY", "ACK", "COMMAND",
                     "GOODBYE"}  # fmt: skip
    # Registration: two HELLOs of one device (the second carries the cookie), a COOKIE for the
    # first, a WELCOME for the second; all outside any session except the WELCOME's.
    hellos = of(D2C, "HELLO")
    assert {h["device_id"] for h in hellos} == {"udp-1"}
    assert {(h["session_id"], h["seq"]) for h in hellos} == {(0, 0)}
    # (A HELLO that goes unanswered for a second is sent again, and answered again.)
    cookies, welcomes = of(C2D, "COOKIE"), of(C2D, "WELCOME")
    assert {(c["session_id"], c["seq"], c["hello_nonce"]) for c in cookies} == {
        (0, 0, hellos[0]["hello_nonce"])
    }
    assert {(w["session_id"], w["seq"], w["hello_nonce"]) for w in welcomes} == {
        (session_id, 0, hellos[-1]["hello_nonce"])
    }
    assert hellos[0]["hello_nonce"] != hellos[-1]["hello_nonce"]
    by_frame = {row["frame.number"]: row for row in rows}
    for row in rows:
        if row["collector.hello_frame"]:
            hello_row = by_frame[row["collector.hello_frame"]]
            assert hexfield(hello_row["collector.hello_nonce"]) == hexfield(
                row["collector.hello_nonce"]
            )
    # The session: the device's numbers 1, 2, 3, ... (heartbeat, readings, its ACK of the
    # command, the GOODBYE last), the collector's from 1 (its ACKs and the COMMAND).
    session = [g for g in got if g["type"] not in ("HELLO", "COOKIE", "WELCOME")]
    assert {g["session_id"] for g in session} == {session_id}
    device_seqs = {g["seq"] for g in of(D2C, "HEARTBEAT", "TELEMETRY", "ACK", "GOODBYE")}
    assert device_seqs == set(range(1, len(device_seqs) + 1))
    assert sorted({g["seq"] for g in of(D2C, "TELEMETRY")}) == readings  # (and retransmissions)
    assert [t.seq for t in log.telemetry if isinstance(t, Telemetry)] == readings
    assert heartbeat in {g["seq"] for g in of(D2C, "HEARTBEAT")}
    assert all(g["ack_requested"] for g in of(D2C, "TELEMETRY"))
    assert [g["seq"] for g in of(D2C, "GOODBYE")] == [max(device_seqs)]
    collector_seqs = [g["seq"] for g in of(C2D, "ACK", "COMMAND")]
    assert sorted(set(collector_seqs)) == list(range(1, len(set(collector_seqs)) + 1))
    assert {g["ack_requested"] for g in of(C2D, "COMMAND")} == {True}
    assert not any(g["ack_requested"] for g in of(C2D, "ACK") + of(D2C, "ACK", "GOODBYE"))
    # Times are the sender's wall clock (the collector's is time.time here too).
    for g in got:
        assert started - 1 <= g["time_us"] / 1e6 <= finished + 1, g
    for row in rows:
        g = decoded_by_tshark(row)
        if g["type"] == "TELEMETRY":
            assert row["info"] == (
                f"TELEMETRY sid=0x{session_id:08x} seq={g['seq']} ACK_REQUESTED"
                f" ({g['ciphertext_len']} bytes sealed)"
            )
        else:
            assert row["info"].startswith(g["type"] + " "), row["info"]
