"""GET /api/history: buckets (sans-IO), a scan of a real recording, and the API on both sources."""

from __future__ import annotations

import gzip
import shutil

import pytest
import trio

from collector.core import history
from collector.core.hub import SeriesRing
from collector.core.segments import SegmentWriter
from collector.device.client import open_device
from collector.wire import recording as rec

from .helpers import SECRETS, api, start_collector


def q(**kw):
    base = {"metric": ["t"], "from": ["0"], "to": ["100"], "buckets": ["10"]}
    base.update({k: [str(v)] for k, v in kw.items()})
    return history.parse_query(base, now=100.0)


def test_buckets_keep_min_mean_max_and_skip_empty_ones():
    b = history.Buckets(0.0, 100.0, 10)
    for t, v in [(0.0, 1.0), (5.0, 3.0), (9.99, 2.0), (55.0, -1.0), (100.0, 9.0), (-1, 9.0)]:
        b.add(t, v)
    assert b.to_json() == {
        "t": [0.0, 50.0], "min": [1.0, -1.0], "mean": [2.0, -1.0], "max": [3.0, -1.0],
        "count": [3, 1],
    }  # fmt: skip


@pytest.mark.parametrize(
    "query, message",
    [
        ({"from": "5", "to": "5"}, "from must be before to"),
        ({"buckets": "0"}, "buckets is a whole number"),
        ({"buckets": "2.5"}, "buckets is a whole number"),
        ({"to": "nan"}, "to must be finite"),
        ({"from": "x"}, "from must be a number"),
    ],
)
def test_bad_queries_say_what_is_wrong(query, message):
    with pytest.raises(history.HistoryError, match=message):
        q(**query)
    with pytest.raises(history.HistoryError, match="metric is required"):
        history.parse_query({}, now=1.0)


def write_recording(directory, *, devices=3, seconds=100, compress_first=False):
    """One reading of "t" (= device number + second) and one of "h" per device per second,
    over `seconds`, in segments of 20 s."""
    w = SegmentWriter(directory, segment_seconds=20.0, retain_seconds=None, retain_bytes=None)
    w.open(now=0.0)
    for s in range(seconds):
        for d in range(devices):
            w.write(
                rec.encode_readings_record(
                    s + 0.5, f"dev-{d}", s + 1, 0, (("t", float(d + s)), ("h", 50.0), ("x", True))
                ),
                now=float(s),
            )
        if s % 7 == 0:
            w.write(rec.encode_heartbeat_record(s + 0.6, "dev-0", s + 1), now=float(s))
    w.release()
    if compress_first:
        first = sorted(directory.glob("seg-*.rec"))[0]
        with open(first, "rb") as src, gzip.open(str(first) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        first.unlink()


def test_compressed_segments_are_skipped_by_their_headers_too(tmp_path):
    write_recording(tmp_path)
    for seg in sorted(tmp_path.glob("seg-*.rec"))[:-1]:  # every closed segment compressed
        with open(seg, "rb") as src, gzip.open(str(seg) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        seg.unlink()
    found = history.scan_recording(tmp_path, q(**{"from": 80, "to": 100, "buckets": 1}))
    assert found.segments == 1 and found.aggregate.count == [60], found.to_json()


@pytest.mark.parametrize("compress_first", [False, True])
def test_a_scan_reads_only_the_range_and_the_devices_asked_for(tmp_path, compress_first):
    write_recording(tmp_path, compress_first=compress_first)
    assert len(list(tmp_path.glob("seg-*"))) == 5
    found = history.scan_recording(
        tmp_path,
        q(**{"from": 40, "to": 60, "buckets": 2, "devices": "dev-1,dev-2", "per_device": 1}),
    )
    out = found.to_json()
    assert out["source"] == "recording" and not out["truncated"] and out["matched_devices"] == 2
    # 40.5 .. 49.5 in the first bucket, 50.5 .. 59.5 in the second; dev-1 is s+1, dev-2 s+2
    assert out["aggregate"] == {
        "t": [40.0, 50.0], "min": [41.0, 51.0], "mean": [46.0, 56.0], "max": [51.0, 61.0],
        "count": [20, 20],
    }  # fmt: skip
    assert out["series"]["dev-1"]["mean"] == [45.5, 55.5]
    # of the five 20 s segments, the two before are skipped (a segment ends where the next
    # one's header says it began, a compressed one too); the two that hold 40-60 are read,
    # and the next, which may hold records received late in the range (history.LATE_WRITES)
    assert found.segments == 3


def test_ranges_beyond_reason_are_refused_and_dropped_series_count_devices():
    with pytest.raises(history.HistoryError, match="at most 10 years apart"):
        history.parse_query({"metric": ["t"], "from": ["-1e308"], "to": ["1e308"]}, now=1.0)
    out = history.History(q(**{"per_device": 1}), "memory")
    for d in range(history.MAX_SERIES + 3):
        for t in range(4):
            out.add(f"d{d}", float(t), 1.0)
    assert out.to_json()["series_dropped"] == 3  # devices, not their readings


def test_a_scan_stops_at_its_budget_and_says_so(tmp_path):
    write_recording(tmp_path)
    found = history.scan_recording(tmp_path, q(**{"from": 0, "to": 100}), max_bytes=1)
    out = found.to_json()
    assert out["truncated"] and out["segments"] == 1 and out["reached"] == 19.5
    stopped = history.scan_recording(tmp_path, q(), cancelled=lambda: True)
    assert stopped.truncated and stopped.segments == 0


def test_memory_covers_only_what_its_rings_still_hold():
    ring = SeriesRing(10)
    for t in range(30):
        ring.append(float(t), float(t))
    rings = [("d", {"t": ring})]
    assert history.memory_covers(q(**{"from": 25, "to": 30}), rings)
    assert not history.memory_covers(q(**{"from": 5, "to": 30}), rings)
    # a ring that is not full but begins after `from` (a restart, a new device) is not enough
    young = SeriesRing(100)
    young.append(50.0, 1.0)
    assert not history.memory_covers(q(**{"from": 40, "to": 60}), [("d", {"t": young})])
    assert not history.memory_covers(q(), [])  # nothing in memory: ask the recording
    out = history.from_memory(q(**{"from": 20, "to": 30, "buckets": 1}), rings).to_json()
    assert out["aggregate"]["count"] == [10] and out["source"] == "memory"


async def test_the_api_answers_from_memory_and_from_the_recording(nursery, tmp_path):
    collector, _ = await start_collector(
        nursery, http_port=0, record_dir=str(tmp_path), stream_history=5, record_flush_interval=0.05
    )
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        t0 = collector.wall()
        for i in range(20):
            await dev.send_readings({"temperature": float(i)})
            await trio.sleep(0.01)
        t1 = collector.wall() + 0.01
    await trio.sleep(0.3)  # flushed
    base = f"/api/history?metric=temperature&from={t0 - 1}&to={t1}&buckets=1"
    status, body = await api(collector, "GET", base)
    assert status == 200 and body["source"] == "recording", body  # the rings hold only 5
    assert body["aggregate"]["count"] == [20] and body["aggregate"]["max"] == [19.0]
    status, body = await api(collector, "GET", base + "&source=memory")
    assert status == 200 and body["aggregate"]["count"] == [5]
    assert body["aggregate"]["min"] == [15.0]
    status, body = await api(collector, "GET", base + "&source=elsewhere")
    assert (status, body["error"]["code"]) == (400, "bad_history")
    status, body = await api(collector, "GET", "/api/history?from=1")
    assert (status, body["error"]["code"]) == (400, "bad_history")
