r"""InfluxDB line protocol, from readings records (sans-IO: bytes in, bytes out).

https://docs.influxdata.com/influxdb/v1/write_protocols/line_protocol_reference/

Two layouts (`[outputs.NAME] layout`):

* "fields" (the default): one line per datagram, one field per metric:
  `telemetry,device=greenhouse-1 temperature=21.5,door=true 1764740000123456042`
* "metric": one line per reading, the metric as a tag and the value in field `value`:
  `telemetry,device=greenhouse-1,metric=temperature value=21.5 1764740000123456042`

The timestamp is the collector's receive time in nanoseconds. The recording keeps that time in
microseconds, so the last three digits are free: they carry the datagram's sequence number mod
1000, which keeps two datagrams of one device received within the same microsecond two points
(InfluxDB overwrites a point with the same series and timestamp: that is what makes a batch
sent again harmless). With `device_time = true` the device's own time (microseconds) is an
extra integer field `device_time_us`.

Values: a float is written as a float (always with a decimal point or exponent), an int as an
integer (`42i`), a bool as `true`/`false`, text as a string field (`"eco"`, with `"` and `\`
escaped). A metric name that is already a reserved word of
the protocol needs no care: keys are escaped, never quoted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from collector.wire.recording import ReadingsRecord

_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\\": "\\\\"})
_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\\": "\\\\"})


def escape_key(text: str) -> str:
    """A tag key, tag value or field key."""
    return text.translate(_KEY_ESCAPES).replace("\n", "\\n")


def escape_measurement(text: str) -> str:
    return text.translate(_MEASUREMENT_ESCAPES).replace("\n", "\\n")


def field_value(value: object) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    text = repr(float(value))  # shortest round-trip form: 21.5, 1e-07, 3.0
    return text


def timestamp_ns(record: ReadingsRecord) -> int:
    return round(record.time * 1_000_000) * 1000 + record.seq % 1000


def encode(
    records: Iterable[ReadingsRecord],
    *,
    measurement: str = "telemetry",
    layout: str = "fields",
    device_time: bool = False,
    keep: Callable[[str, str], bool] | None = None,
    tags: str = "",
) -> tuple[bytes, int]:
    """Lines for `records` (readings that `keep(device, metric)` refuses are left out), and
    how many readings they hold. `tags` are extra tags, already escaped: ",site=north"."""
    m = escape_measurement(measurement)
    lines: list[str] = []
    count = 0
    for record in records:
        pairs = (
            record.readings
            if keep is None
            else [(n, v) for n, v in record.readings if keep(record.device_id, n)]
        )
        if not pairs:
            continue
        ts = timestamp_ns(record)
        head = f"{m},device={escape_key(record.device_id)}{tags}"
        extra = f",device_time_us={record.device_time_us}i" if device_time else ""
        if layout == "fields":
            fields = ",".join(f"{escape_key(n)}={field_value(v)}" for n, v in pairs)
            lines.append(f"{head} {fields}{extra} {ts}")
        else:
            for n, v in pairs:
                lines.append(f"{head},metric={escape_key(n)} value={field_value(v)}{extra} {ts}")
        count += len(pairs)
    return ("\n".join(lines) + "\n").encode() if lines else b"", count
