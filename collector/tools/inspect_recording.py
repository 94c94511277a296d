"""Summarise a recording, and export its readings to CSV, JSON Lines or Parquet.

    collector inspect recordings/
    collector inspect recordings/ --csv readings.csv --jsonl readings.jsonl
    collector inspect recordings/ --parquet readings.parquet     # needs pyarrow

The summary lists segments and any corruption skipped, the time span, record counts, the
devices (readings, sessions and why they ended, lost datagrams from sequence gaps, silences
longer than --gap seconds) and the metrics (count, min, mean, max). `--json` prints it as JSON.

Exports hold one row per reading: time (ISO 8601, UTC), time_unix, device, metric, value, seq.
Parquet export needs the optional extra: pip install 'trio-collector[parquet]' (pyarrow).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from collector.core.segments import RecordingReader, open_recording
from collector.tools import options
from collector.tools.playback import select
from collector.wire.recording import (
    EventRecord,
    HeartbeatRecord,
    ReadingsRecord,
    Record,
    RecordingError,
    RecordType,
)


def iso(t: float) -> str:
    return (
        datetime.datetime.fromtimestamp(t, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def summarise(records: list[Record], reader: RecordingReader, gap: float) -> dict[str, Any]:
    types: Counter[str] = Counter()
    devices: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "readings": 0,
            "datagrams": 0,
            "sessions": 0,
            "ended": Counter(),
            "lost": 0,
            "silences": [],
            "first": None,
            "last": None,
            "_seq": set(),
            "_t": None,
        }
    )
    metrics: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"count": 0, "numeric": 0, "sum": 0.0, "min": math.inf, "max": -math.inf}
    )
    for r in records:
        types[
            r.type.name
            if isinstance(r, EventRecord)
            else type(r).__name__.removesuffix("Record").upper()
        ] += 1
        if isinstance(r, ReadingsRecord | HeartbeatRecord):
            d = devices[r.device_id]
            d["datagrams"] += 1
            d["first"] = d["first"] or r.time
            if d["_t"] is not None and r.time - d["_t"] > gap:
                d["silences"].append([iso(d["_t"]), round(r.time - d["_t"], 3)])
            d["last"] = d["_t"] = r.time
            if r.seq:  # (stream recordings have no sequence numbers)
                d["_seq"].add(r.seq)
            if isinstance(r, ReadingsRecord):
                d["readings"] += len(r.readings)
                for name, value in r.readings:
                    m = metrics[name]
                    m["count"] += 1
                    if not isinstance(value, str):
                        v = float(value)
                        m["numeric"] += 1
                        m["sum"] += v
                        m["min"] = min(m["min"], v)
                        m["max"] = max(m["max"], v)
        elif isinstance(r, EventRecord) and r.device_id:
            d = devices[r.device_id]
            if r.type is RecordType.ONLINE:
                d["sessions"] += 1
                _close_session(d)  # sequence numbers start again at 1
            elif r.type is RecordType.OFFLINE:
                d["ended"][r.data.get("reason")] += 1
    for d in devices.values():
        _close_session(d)
        d.pop("_seq")
        d.pop("_t")
        d["ended"] = dict(d["ended"])
        d["first"] = iso(d["first"]) if d["first"] else None
        d["last"] = iso(d["last"]) if d["last"] else None
    return {
        "segments": [
            {
                "name": s.path.name,
                "records": s.scan.records,
                "created": iso(s.header.created_us / 1e6) if s.header else None,
                "damage": s.damage,
            }
            for s in reader.reports
        ],
        "problems": reader.problems(),
        "span": {
            "start": iso(records[0].time) if records else None,
            "end": iso(records[-1].time) if records else None,
            "seconds": round(records[-1].time - records[0].time, 3) if records else 0,
        },
        "records": dict(types),
        "devices": dict(sorted(devices.items())),
        "metrics": {
            name: {
                "count": m["count"],
                **(
                    {"min": m["min"], "mean": m["sum"] / m["numeric"], "max": m["max"]}
                    if m["numeric"]
                    else {"type": "string"}
                ),
            }
            for name, m in sorted(metrics.items())
        },
    }


def _close_session(d: dict[str, Any]) -> None:
    """Lost datagrams of a session: sequence numbers below the highest that never came (the
    collector's own count, as long as nothing arrived later than its anti-replay window)."""
    seqs = d["_seq"]
    if seqs:
        d["lost"] += max(seqs) - len(seqs)
        seqs.clear()


def print_summary(s: dict[str, Any], gap: float) -> None:
    print(
        f"{len(s['segments'])} segments: "
        + ", ".join(f"{x['name']} ({x['records']} records)" for x in s["segments"])
    )
    for p in s["problems"]:
        print(f"  problem: {p}")
    span = s["span"]
    print(f"span: {span['start']} .. {span['end']} ({span['seconds']:g} s)")
    print("records: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(s["records"].items())))
    print(f"\n{len(s['devices'])} devices:")
    print(
        f"  {'device':16} {'readings':>9} {'datagrams':>9} {'sessions':>8} {'lost':>5}  ended            silences > {gap:g}s"
    )
    for name, d in s["devices"].items():
        ended = ", ".join(f"{k} {v}" for k, v in d["ended"].items()) or "-"
        silences = len(d["silences"])
        longest = max((x[1] for x in d["silences"]), default=0)
        print(
            f"  {name:16} {d['readings']:9} {d['datagrams']:9} {d['sessions']:8} {d['lost']:5}  {ended:16} "
            + (
                f"{silences} (longest {longest:g}s, first at {d['silences'][0][0]})"
                if silences
                else "-"
            )
        )
    print(f"\n{len(s['metrics'])} metrics:")
    for name, m in s["metrics"].items():
        if "mean" in m:
            print(
                f"  {name:20} {m['count']:9} readings   min {m['min']:.6g}  mean {m['mean']:.6g}  max {m['max']:.6g}"
            )
        else:
            print(f"  {name:20} {m['count']:9} readings   (strings)")


def rows(records: Iterable[Record]) -> Iterator[dict[str, Any]]:
    for r in records:
        if isinstance(r, ReadingsRecord):
            for name, value in r.readings:
                yield {
                    "time": iso(r.time),
                    "time_unix": r.time,
                    "device": r.device_id,
                    "metric": name,
                    "value": value,
                    "seq": r.seq,
                }


def export_csv(records: list[Record], path: str) -> int:
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["time", "time_unix", "device", "metric", "value", "seq"])
        w.writeheader()
        for row in rows(records):
            w.writerow(row)
            n += 1
    return n


def export_jsonl(records: list[Record], path: str) -> int:
    n = 0
    with open(path, "w") as f:
        for row in rows(records):
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


def export_parquet(records: list[Record], path: str) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit(
            "inspect_recording.py: Parquet export needs pyarrow: pip install 'trio-collector[parquet]'"
        ) from None
    data = list(rows(records))
    numeric = [None if isinstance(r["value"], str) else float(r["value"]) for r in data]
    text = [r["value"] if isinstance(r["value"], str) else None for r in data]
    table = pa.table({
        "time": pa.array([r["time_unix"] for r in data], pa.float64()).cast(pa.float64()),
        "device": pa.array([r["device"] for r in data], pa.string()),
        "metric": pa.array([r["metric"] for r in data], pa.string()),
        "value": pa.array(numeric, pa.float64()),
        "text": pa.array(text, pa.string()),
        "seq": pa.array([r["seq"] for r in data], pa.uint32()),
    })  # fmt: skip
    table = table.set_column(
        0,
        "time",
        pa.compute.cast(pa.compute.multiply(table["time"], 1e6), pa.int64()).cast(
            pa.timestamp("us", tz="UTC")
        ),
    )
    pq.write_table(table, path)
    return len(data)


def build_parser(prog: str = "collector inspect") -> argparse.ArgumentParser:
    p = options.parser(prog, __doc__)
    p.add_argument(
        "recording",
        metavar="DIR",
        nargs="+",
        help="a recording directory; several (the nodes of a cluster) are merged by time",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--gap",
        type=options.positive,
        default=60.0,
        help="report silences longer than this many seconds (default 60)",
    )
    p.add_argument("--csv", metavar="FILE", help="export the readings as CSV")
    p.add_argument("--jsonl", metavar="FILE", help="export the readings as JSON Lines")
    p.add_argument(
        "--parquet",
        metavar="FILE",
        help="export the readings as Parquet (needs the 'parquet' extra)",
    )
    options.add_device_select(p, "recorded devices")
    return p


def main(argv: list[str] | None = None, prog: str = "collector inspect") -> int:
    args = build_parser(prog).parse_args(argv)
    return options.run_main(prog, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    try:
        reader = open_recording(args.recording)
        records = list(reader)
    except RecordingError as exc:
        raise options.UserError(str(exc)) from None
    if not reader.segments:
        raise options.UserError(
            f"{' '.join(args.recording)} is not a recording: it holds no segment files (seg-NNNNNN.rec)"
        )
    if args.parquet:
        options.require("pyarrow", "parquet", "--parquet")
    if args.device:
        records = select(records, devices=args.device)
    summary = summarise(records, reader, args.gap)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_summary(summary, args.gap)
    for flag, fn in (("csv", export_csv), ("jsonl", export_jsonl), ("parquet", export_parquet)):
        path = getattr(args, flag)
        if path:
            n = fn(records, path)
            print(f"exported {n} readings to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
