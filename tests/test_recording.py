"""The recording format, byte by byte: round trips, torn tails, bit flips, repair, rotation."""

from __future__ import annotations

import errno
import gzip
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.core import segments
from collector.core.segments import RecordingReader, SegmentWriter
from collector.wire import recording as rec
from collector.wire.datagram import Reading
from collector.wire.recording import (
    DatagramRecord,
    EventRecord,
    HeartbeatRecord,
    ReadingsRecord,
    RecordingError,
    RecordType,
    ScanReport,
)

T0 = 1_767_225_600.0


def sample_records() -> list:
    return [
        EventRecord(T0, RecordType.META, {"event": "open", "source": "test"}),
        EventRecord(
            T0 + 0.5,
            RecordType.ONLINE,
            {"device": "d1", "session_id": 7, "transport": "tcp", "address": "1.2.3.4:5"},
        ),
        ReadingsRecord(
            T0 + 1.0,
            "d1",
            1,
            123456,
            (Reading("t", 21.5), Reading("n", 3), Reading("ok", True), Reading("s", "é")),
        ),
        HeartbeatRecord(T0 + 2.0, "d1", 2),
        ReadingsRecord(T0 + 3.0, "d1", 3, 0, (Reading("t", -1.25),)),
        EventRecord(
            T0 + 4.0,
            RecordType.COMMAND,
            {
                "device": "d1",
                "id": "c1",
                "name": "x",
                "state": "acked",
                "result": {"a": 1},
                "error": None,
            },
        ),
        DatagramRecord(T0 + 5.0, "127.0.0.1:999", b"\x01\x02raw"),
        EventRecord(
            T0 + 6.0,
            RecordType.OFFLINE,
            {"device": "d1", "session_id": 7, "reason": "timeout", "duration": 5.5},
        ),
    ]


def encode(r) -> bytes:
    if isinstance(r, ReadingsRecord):
        return rec.encode_readings_record(r.time, r.device_id, r.seq, r.device_time_us, r.readings)
    if isinstance(r, HeartbeatRecord):
        return rec.encode_heartbeat_record(r.time, r.device_id, r.seq)
    if isinstance(r, DatagramRecord):
        return rec.encode_datagram_record(r.time, r.address, r.data)
    return rec.encode_json_record(r.type, r.time, r.data)


def segment_bytes(records) -> tuple[bytes, list[int]]:
    """A whole segment, and the end offset of each record."""
    data = rec.encode_segment_header(1, int(T0 * 1e6))
    ends = []
    for r in records:
        data += encode(r)
        ends.append(len(data))
    return data, ends


def decode_all(data: bytes) -> tuple[list, ScanReport]:
    rec.decode_segment_header(data)
    report = ScanReport()
    return [rec.decode_body(body) for _, body in rec.scan_records(data, report)], report


def test_every_record_type_round_trips():
    records = sample_records()
    data, _ = segment_bytes(records)
    got, report = decode_all(data)
    assert got == records
    assert (
        report.torn_tail is None and report.corrupt_regions == [] and report.valid_end == len(data)
    )


def test_truncation_at_every_byte_of_the_last_records_gives_a_valid_prefix():
    records = sample_records()
    data, ends = segment_bytes(records)
    start = ends[-4]
    for cut in range(start, len(data) + 1):
        got, report = decode_all(data[:cut])
        complete = sum(1 for e in ends if e <= cut)
        assert got == records[:complete], cut
        assert report.valid_end == ends[complete - 1]
        assert (report.torn_tail is None) == (cut == ends[complete - 1]), cut
        assert report.corrupt_regions == []


def test_repair_truncates_a_torn_tail_and_appending_works(tmp_path):
    records = sample_records()
    data, ends = segment_bytes(records)
    for tail in (data[: ends[-1] - 3], data + bytes(4096), data + b"garbage\xc5\xa3\x00\x00\x10"):
        d = tmp_path / f"r{len(tail)}"
        d.mkdir()
        (d / segments.segment_name(1)).write_bytes(tail)
        writer = SegmentWriter(d)
        repair = writer.open()
        valid = ends[-2] if len(tail) < len(data) else ends[-1]
        assert repair.truncated_bytes == len(tail) - valid
        extra = ReadingsRecord(T0 + 9, "d2", 1, 0, (Reading("x", 1.0),))
        writer.write(encode(extra))
        writer.close()
        reader = RecordingReader(d)
        expected = records[: records.index(records[-1]) + (0 if len(tail) < len(data) else 1)]
        assert list(reader) == [*expected, extra]
        assert reader.torn_tails == 0 and reader.corrupt_regions == 0


@pytest.mark.parametrize("where", ["sync", "length", "crc", "type", "payload"])
def test_a_flipped_bit_in_one_record_skips_that_record_only(where):
    records = sample_records()
    data, ends = segment_bytes(records)
    i = 4  # the fifth record
    start = ends[i - 1]
    offset = {"sync": 0, "length": 4, "crc": 7, "type": 10, "payload": ends[i] - start - 2}[where]
    for bit in range(8):
        mutated = bytearray(data)
        mutated[start + offset] ^= 1 << bit
        got, report = decode_all(bytes(mutated))
        assert got == records[:i] + records[i + 1 :], (where, bit)
        assert report.corrupt_regions == [(start, ends[i])] and report.torn_tail is None


def test_a_corrupt_segment_header_is_a_clear_error():
    data, _ = segment_bytes(sample_records())
    with pytest.raises(RecordingError, match="bad magic"):
        rec.decode_segment_header(b"X" + data[1:])
    with pytest.raises(RecordingError, match="CRC mismatch"):
        rec.decode_segment_header(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    with pytest.raises(RecordingError, match="shorter than a segment header"):
        rec.decode_segment_header(data[:10])


def test_a_newer_format_version_is_refused_with_a_clear_message():
    head = bytearray(rec.encode_segment_header(1, 0))
    head[8:10] = (2).to_bytes(2, "big")
    head[28:32] = rec.zlib.crc32(bytes(head[:28])).to_bytes(4, "big")
    with pytest.raises(RecordingError, match="version 2 is newer than this reader"):
        rec.decode_segment_header(bytes(head))


@given(
    st.lists(
        st.tuples(st.integers(rec.SEGMENT_HEADER_LEN, 10_000), st.integers(1, 255)),
        min_size=1,
        max_size=6,
    )
)
def test_nothing_corrupt_is_ever_returned(flips):
    records = sample_records()
    data, _ = segment_bytes(records)
    mutated = bytearray(data)
    for pos, mask in flips:
        mutated[pos % len(mutated)] ^= mask
    got, _ = (
        decode_all(bytes(mutated))
        if mutated[: rec.SEGMENT_HEADER_LEN] == data[: rec.SEGMENT_HEADER_LEN]
        else ([], None)
    )
    remaining = list(records)
    for r in got:  # an in-order subsequence of what was written, every value intact
        assert r in remaining
        remaining = remaining[remaining.index(r) + 1 :]


@given(st.binary(max_size=2000))
def test_scanning_random_bytes_never_fails(blob):
    head = rec.encode_segment_header(1, 0)
    report = ScanReport()
    for _, body in rec.scan_records(head + blob, report):
        try:
            rec.decode_body(body)
        except RecordingError:
            pass


def test_rotation_by_size_and_time_and_retention(tmp_path):
    clock = [T0]
    writer = SegmentWriter(
        tmp_path, segment_bytes=1000, segment_seconds=60, retain_bytes=3000, retain_seconds=None
    )
    writer.open(clock[0])
    one = encode(ReadingsRecord(T0, "d", 1, 0, (Reading("x", 1.0),)))
    closed = []
    for _ in range(40):
        clock[0] += 1
        closed += writer.write(one, clock[0])
        closed and writer.apply_retention(clock[0])
    assert writer.segment_no >= 2 and all(p.stat().st_size <= 1000 for p in tmp_path.glob("*.rec"))
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= 3000 + 1000
    clock[0] += 61  # time rotation
    n = writer.segment_no
    writer.write(one, clock[0])
    assert writer.segment_no == n + 1
    writer.close()
    assert [
        r.seq for r in RecordingReader(tmp_path) if isinstance(r, ReadingsRecord)
    ]  # readable across segments


def test_compressed_segments_read_back(tmp_path):
    writer = SegmentWriter(tmp_path, segment_bytes=300)
    writer.open()
    records = [ReadingsRecord(T0 + i, "d", i + 1, 0, (Reading("x", float(i)),)) for i in range(12)]
    for r in records:
        for path in writer.write(encode(r)):
            writer.compress_segment(path)
    writer.close()
    assert (
        list(tmp_path.glob("*.rec.gz"))
        and gzip.decompress(next(tmp_path.glob("*.rec.gz")).read_bytes())[:5] == b"TCREC"
    )
    assert list(RecordingReader(tmp_path)) == records


def test_missing_or_unusable_directories(tmp_path):
    with pytest.raises(RecordingError, match="does not exist"):
        RecordingReader(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecordingError, match="is not a directory"):
        RecordingReader(tmp_path / "file")
    with pytest.raises(RecordingError, match="cannot create recording directory"):
        SegmentWriter(tmp_path / "file" / "sub").open()


def test_a_full_disk_leaves_no_half_record(tmp_path, monkeypatch):
    writer = SegmentWriter(tmp_path)
    writer.open()
    first = encode(sample_records()[2])
    writer.write(first)
    real_write = os.write
    calls = []

    def half_then_enospc(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:5])  # a partial write ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(segments.os, "write", half_then_enospc)
    with pytest.raises(OSError, match="No space left"):
        writer.write(encode(sample_records()[4]))
    monkeypatch.setattr(segments.os, "write", real_write)
    writer.write(encode(sample_records()[3]))  # the disk has room again
    writer.close()
    assert list(RecordingReader(tmp_path)) == [sample_records()[2], sample_records()[3]]


def test_one_writer_per_directory(tmp_path):
    first = SegmentWriter(tmp_path)
    first.open()
    with pytest.raises(RecordingError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        SegmentWriter(tmp_path).open()
    first.release()
    second = SegmentWriter(tmp_path)
    second.open()
    second.release()
