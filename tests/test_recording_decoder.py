"""The fast whole-segment decoder (`decode_records`) against the reference one (`scan_records`
and then `decode_body` for each record): the same records, with the same value types, and the
same scan report, for valid, damaged and hostile segments."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.wire import recording as rec
from collector.wire.recording import ReadingsRecord, RecordingError, RecordType, ScanReport

T0 = 1_767_225_600.0


def reference(data: bytes) -> tuple[list, ScanReport]:
    report = ScanReport()
    out = []
    for _, body in rec.scan_records(data, report):
        try:
            out.append(rec.decode_body(body))
        except RecordingError:
            report.undecodable += 1
    return out, report


def fast(data: bytes) -> tuple[list, ScanReport]:
    report = ScanReport()
    return list(rec.decode_records(data, report)), report


def assert_same(data: bytes) -> list:
    want, want_report = reference(data)
    got, got_report = fast(data)
    # repr, not ==: True == 1 and 0.0 == -0.0, but a reader must give back the same types
    assert [repr(r) for r in got] == [repr(r) for r in want]
    assert [type(r) for r in got] == [type(r) for r in want]
    assert got_report == want_report
    return got


def raw_readings_record(time_us: int, device: bytes, seq: int, readings: list) -> bytes:
    """A READINGS record with a CRC that verifies and whatever payload it is given: values
    are raw bytes here, so non-finite floats, bools of 2, duplicate or bad names get in."""
    payload = bytearray([len(device)]) + device + struct.pack(">IQ", seq, 7)
    payload.append(len(readings))
    for name, vtype, value in readings:
        payload += bytes([len(name)]) + name + bytes([vtype]) + value
    body = struct.pack(">BQ", RecordType.READINGS, time_us) + payload
    length = struct.pack(">I", len(body))
    crc = rec.zlib.crc32(body, rec.zlib.crc32(length))
    return rec._SYNC_BYTES + length + struct.pack(">I", crc) + body


# mostly what a collector records (so that shapes repeat and the fast path is taken), with a
# little of what it never would
GOOD_FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1.7e308, -0.0])
BAD_FLOATS = st.sampled_from([float("nan"), float("inf"), float("-inf")])
VALUE_BYTES = {
    1: st.one_of(*[GOOD_FLOATS] * 6, BAD_FLOATS).map(lambda v: struct.pack(">d", v)),
    2: st.integers(-(2**63), 2**63 - 1).map(lambda v: struct.pack(">q", v)),
    3: st.sampled_from([0, 1] * 3 + [2, 255]).map(lambda v: bytes([v])),
    4: st.text(max_size=5).map(lambda s: bytes([len(s.encode())]) + s.encode()),
}
FIELD = st.tuples(
    st.sampled_from([b"t", b"humidity", b"battery", b"n", b"ok"] * 4 + [b"bad name", b"\xff"]),
    st.sampled_from([1, 1, 2, 3, 4]),
)
SHAPES = st.one_of(
    *[st.lists(FIELD, min_size=1, max_size=4, unique_by=lambda f: f[0])] * 6,
    st.lists(FIELD, max_size=4),  # empty, or a name twice
)
DEVICES = st.sampled_from([b"dev-1", b"dev-2", b"d\xc3\xa9v", b"\xff\xfe", b""])


@st.composite
def segments(draw):
    """A segment of records in a few shapes repeated with new values (so that the fast path
    learns them and is then taken), with other record types and damage mixed in."""
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=3))
    data = bytearray(rec.encode_segment_header(1, 0))
    for i in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["readings"] * 6 + ["heartbeat", "event", "junk"]))
        t = T0 + i / 8
        if kind == "readings":
            shape = draw(st.sampled_from(shapes))
            values = [(name, vt, draw(VALUE_BYTES[vt])) for name, vt in shape]
            data += raw_readings_record(int(t * 1e6), draw(DEVICES), i, values)
        elif kind == "heartbeat":
            data += rec.encode_heartbeat_record(t, "dev-1", i)
        elif kind == "event":
            data += rec.encode_json_record(RecordType.ONLINE, t, {"device": "dev-1", "n": i})
        else:
            data += draw(st.binary(max_size=12))
    for pos in draw(st.lists(st.integers(0, 10**6), max_size=2)):  # bit flips
        pos = rec.SEGMENT_HEADER_LEN + pos % max(1, len(data) - rec.SEGMENT_HEADER_LEN)
        if pos < len(data):
            data[pos] ^= 1 << (pos % 8)
    cut = draw(st.integers(0, 20))
    return bytes(data[: len(data) - cut] if cut < 20 else data)


@given(segments())
def test_the_fast_decoder_gives_exactly_what_the_reference_gives(data):
    assert_same(data)


@given(st.binary(max_size=600))
def test_random_bytes_decode_the_same(blob):
    assert_same(rec.encode_segment_header(1, 0) + blob)


def test_the_fast_path_is_taken_and_checks_each_value():
    rec._BODY_LAYOUTS.clear()
    good = [
        (b"t", 1, struct.pack(">d", 21.5)),
        (b"n", 2, struct.pack(">q", -3)),
        (b"ok", 3, b"\x01"),
    ]
    records = [raw_readings_record(1_000_000 * i, b"dev-1", i, good) for i in range(5)]
    nan = [(b"t", 1, struct.pack(">d", float("nan"))), *good[1:]]
    two = [*good[:2], (b"ok", 3, b"\x02")]
    huge = [(b"t", 1, struct.pack(">d", 1.7e308)), (b"u", 1, struct.pack(">d", 1.7e308))]
    data = b"".join(
        [rec.encode_segment_header(1, 0), *records]
        + [raw_readings_record(9, b"dev-1", 9, v) for v in (nan, two, huge, huge)]
    )
    got = assert_same(data)
    assert len(rec._BODY_LAYOUTS[len(records[0]) - rec.RECORD_HEADER_LEN]) == 1  # learned once
    assert got[1] == ReadingsRecord(1.0, "dev-1", 1, 7, (("t", 21.5), ("n", -3), ("ok", True)))
    assert got[1].readings[2][1] is True
    assert len(got) == 7  # the NaN and the bool of 2 do not decode; sums that overflow do
    assert got[-1].readings == (("t", 1.7e308), ("u", 1.7e308))


def test_records_built_through_the_constructor_are_the_same(monkeypatch):
    """The fallback for a ReadingsRecord that its __init__ must build (validators added)."""
    monkeypatch.setattr(rec, "_READINGS_SETTERS", None)
    monkeypatch.setattr(rec, "_BODY_LAYOUTS", {})
    good = [(b"t", 1, struct.pack(">d", 1.5)), (b"ok", 3, b"\x00")]
    data = rec.encode_segment_header(1, 0) + b"".join(
        raw_readings_record(i, b"dev-1", i, good) for i in range(3)
    )
    assert [r.readings for r in assert_same(data)] == [(("t", 1.5), ("ok", False))] * 3
    assert rec._BODY_LAYOUTS


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_a_memoryview_and_a_torn_tail(cut):
    good = [(b"t", 1, struct.pack(">d", 1.5))]
    data = rec.encode_segment_header(1, 0) + b"".join(
        raw_readings_record(i, b"dev-1", i, good) for i in range(4)
    )
    data = data[:-cut]
    want, want_report = reference(data)
    report = ScanReport()
    assert list(rec.decode_records(memoryview(data), report)) == want
    assert report == want_report and report.torn_tail is not None
