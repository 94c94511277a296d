"""Property-based fuzzing of what reads the network and the disk: only documented errors come
out, and nothing a parser returns breaks what comes after it.

The datagram, control-line, stream-message and record decoders have their own properties in
their test files; here are the JSON boundary, a whole HTTP exchange, the whole datagram path
(ingest) with live sessions, and a whole recording directory. The CI run is bounded (the
default profile); `HYPOTHESIS_PROFILE=fuzz python3 run.py test tests/test_fuzz.py` runs the
long one documented in docs/SECURITY.md.
"""

from __future__ import annotations

import gzip
import json
import secrets

import h11
import trio
import trio.testing
from hypothesis import example, given
from hypothesis import strategies as st

from collector.app import Collector
from collector.config import Config
from collector.core.segments import RecordingReader, SegmentWriter
from collector.devices import DeviceRegistry
from collector.servers.http import HttpServer
from collector.wire import datagram as dg
from collector.wire import recording as rec
from collector.wire.crypto import Aead, DeviceKeys
from collector.wire.datagram import DatagramType, Flag
from collector.wire.jsonio import JsonError, dumps, loads_untrusted
from collector.wire.recording import ReadingsRecord

from .helpers import SECRETS, wall

# -- the JSON boundary ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@given(st.one_of(st.text(max_size=400), st.binary(max_size=400), json_values.map(json.dumps)))
@example("NaN")
@example('{"a": 1e999}')
@example("[" * 100 + "]" * 100)
@example('"\\ud800"')
def test_the_json_boundary_lets_in_only_what_can_go_out_again(data):
    try:
        value = loads_untrusted(data)
    except JsonError:
        return
    dumps(value)  # finite, no lone surrogates, no bad keys: every encoder takes it


# -- a whole HTTP exchange -------------------------------------------------------------------------

METHODS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "G\x00T", ""])
PATHS = st.one_of(
    st.sampled_from(
        [
            "/", "/healthz", "/metrics", "/api/devices", "/api/devices/dev-1",
            "/api/devices/dev-1/commands", "/api/devices/dev-1/kick", "/api/commands/c000001",
            "/api/config", "/api/replay", "/stream", "/static/app.js", "/static/../x",
            "http://[::1/x", "*", "/api/devices/dev-1?history=5", "/api/devices?history=x",
        ]
    ),
    st.text(max_size=60).map(lambda s: "/" + s),
)  # fmt: skip
BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"name": st.text(max_size=10), "args": json_values, "match": st.text(max_size=5)}
    ).map(lambda v: json.dumps(v).encode()),
)
HEADERS = st.lists(
    st.sampled_from(
        [
            b"Authorization: Bearer \xff\xfe", b"Authorization: Bearer r-token",
            b"Authorization: Bearer c-token", b"Content-Length: 99999999", b"Transfer-Encoding: chunked",
            b"Upgrade: websocket", b"Connection: Upgrade", b"Connection: close", b"Host: x",
            b"Expect: 100-continue", b"X: " + b"y" * 300,
        ]
    ),
    max_size=5,
)  # fmt: skip

#: What the HTTP port may answer (docs/STREAM.md), and nothing else: in particular never 500.
STATUSES = {101, 200, 202, 400, 401, 403, 404, 405, 408, 409, 413, 426, 431, 501, 503}


async def _exchange(request: bytes) -> tuple[list[int], Collector]:
    config = Config(host="127.0.0.1", http_port=None, read_tokens=("r-token",), command_tokens=("c-token",),
                    http_header_timeout=1.0, http_body_timeout=1.0, http_send_timeout=1.0)  # fmt: skip
    collector = Collector(config, DeviceRegistry(SECRETS), wall=wall, ingest=False)
    server = HttpServer(
        collector, read_tokens=config.read_tokens, command_tokens=config.command_tokens
    )
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.serve)
        client, served = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle, served)
        await client.send_all(request)
        await client.send_eof()
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))  # any request
        with trio.move_on_after(10):
            while True:
                data = await client.receive_some(65536)
                if not data:
                    break
                conn.receive_data(data)
                while True:
                    try:
                        event = conn.next_event()
                    except h11.RemoteProtocolError:
                        raise AssertionError(f"not HTTP: {data[:200]!r}") from None
                    if isinstance(event, h11.Response | h11.InformationalResponse):
                        statuses.append(event.status_code)
                    if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.EndOfMessage):
                        break
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        nursery.cancel_scope.cancel()
    return statuses, collector


@given(METHODS, PATHS, HEADERS, BODIES, st.binary(max_size=64), st.booleans())
def test_any_http_request_gets_a_documented_answer(method, path, headers, body, junk, raw):
    if raw:
        request = junk + body
    else:
        request = f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\n".encode("utf-8", "surrogateescape")
        request += b"".join(h + b"\r\n" for h in headers)
        if not any(h.lower().startswith(b"content-length") for h in headers):
            request += b"Content-Length: %d\r\n" % len(body)
        request += b"\r\n" + body
    statuses, collector = trio.run(
        _exchange, request, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    assert set(statuses) <= STATUSES, statuses
    assert not collector.boundary.counts, collector.boundary.counts  # no bug was hit


# -- the whole datagram path, with live sessions -----------------------------------------------------


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out[: max(0, len(out) - cut)])


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["heartbeat", "telemetry", "ack", "goodbye", "hello", "random"]),
            st.lists(st.tuples(st.integers(0, 1300), st.integers(0, 255)), max_size=3),
            st.integers(0, 40),
            st.integers(1, 2000),
            st.binary(max_size=300),
        ),
        max_size=30,
    )
)
def test_the_datagram_path_only_counts_what_it_refuses(datagrams):
    async def main() -> None:
        config = Config(host="127.0.0.1", http_port=None)
        collector = Collector(config, DeviceRegistry(SECRETS), wall=wall, ingest=False)
        async with trio.open_nursery() as nursery:
            await nursery.start(collector.serve)
            key = secrets.token_bytes(32)
            session = collector.registry.open(
                "dev-1", (key, secrets.token_bytes(32)), "udp", address=("127.0.0.1", 9)
            )
            sid = session.session_id
            ingest = collector.ingest
            ingest.begin_batch(trio.current_time())
            for kind, flips, cut, seq, blob in datagrams:
                if kind == "random":
                    data = blob
                elif kind == "hello":
                    keys = DeviceKeys(SECRETS["udp-1"])
                    cookie = collector.ingest.cookies.make(
                        trio.current_time(), ("127.0.0.1", 9), bytes(16)
                    )
                    data = dg.encode_hello(
                        Aead(keys.hello_d2c),
                        "udp-1",
                        bytes(16),
                        cookie if seq % 2 else dg.NO_COOKIE,
                    )
                else:
                    typ, payload = {
                        "heartbeat": (DatagramType.HEARTBEAT, dg.encode_heartbeat_payload(seq)),
                        "telemetry": (
                            DatagramType.TELEMETRY,
                            dg.encode_readings({"t": 1.5, "n": seq}),
                        ),
                        "ack": (
                            DatagramType.ACK,
                            dg.encode_ack_payload(seq, {"ok": True, "r": [1]}),
                        ),
                        "goodbye": (DatagramType.GOODBYE, b"closed"),
                    }[kind]
                    data = dg.encode_datagram(
                        key, typ, sid, seq, 0, payload, flags=Flag.ACK_REQUESTED
                    )
                ingest.handle_datagram(_mutate(data, flips, cut), ("127.0.0.1", 9))
            ingest.end_batch()
            assert (
                ingest.received
                == ingest.accepted + sum(ingest.rejected.values()) + ingest.cookies_sent
            )
            assert not collector.boundary.counts
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# -- a whole recording directory ------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["plain", "gzip", "cut", "flip", "random", "header-only"]),
            st.integers(0, 10_000),
            st.binary(max_size=200),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_a_recording_directory_yields_only_what_was_written(tmp_path_factory, segments):
    directory = tmp_path_factory.mktemp("rec")
    written = []
    for n, (shape, pos, blob) in enumerate(segments, start=1):
        body = bytearray(rec.encode_segment_header(n, 0))
        for i in range(5):
            r = ReadingsRecord(float(n * 10 + i), "dev-1", n * 10 + i, 0, (("t", float(i)),))
            body += rec.encode_readings_record(r.time, r.device_id, r.seq, 0, r.readings)
            written.append(r)
        if shape == "cut":
            body = body[: pos % (len(body) + 1)]
        elif shape == "flip":
            body[pos % len(body)] ^= 0x40
        elif shape == "random":
            body = bytearray(blob)
        elif shape == "header-only":
            body = body[: rec.SEGMENT_HEADER_LEN]
        name = f"seg-{n:06d}.rec"
        if shape == "gzip":
            packed = bytearray(gzip.compress(bytes(body)))
            packed[pos % len(packed)] ^= 0x01 if pos % 3 == 0 else 0x00
            (directory / (name + ".gz")).write_bytes(bytes(packed))
        else:
            (directory / name).write_bytes(bytes(body))
    reader = RecordingReader(directory)
    for r in reader:
        if isinstance(r, ReadingsRecord):
            assert r in written  # nothing corrupt ever comes out
    reader.problems()
    writer = SegmentWriter(directory)  # and the next collector can always append
    writer.open(now=1e6)
    writer.write(rec.encode_heartbeat_record(1e6, "dev-1", 1), now=1e6)
    writer.release()
