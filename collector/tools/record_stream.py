"""Record a running collector's live stream into a recording directory.

    collector record-stream http://collector.local:8082/ --out recordings/from-stream --token T

For a collector you cannot restart with --record. It subscribes to the WebSocket stream
(docs/STREAM.md) and writes what it sees, in the recording format of docs/RECORDING.md:
readings (with the collector's receive times), devices going online and offline with their
reasons, and command state changes. It reconnects by itself; a gap while disconnected, and
updates the collector reports as missed, are noted in the recording as META records.

What a stream does not carry is not recorded: heartbeats, sequence numbers (recorded as 0)
and device times. `collector replay` replays such a recording fine; replayed into a collector,
devices whose readings are sparser than the session timeout will time out, since there are no
heartbeats to replay.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import ssl
import sys
import time
import urllib.parse

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from collector.core.events import CommandUpdate, DeviceOffline, DeviceOnline, Telemetry
from collector.core.recorder import Recorder, RecorderConfig
from collector.logs import setup_logging
from collector.tools import options
from collector.wire.datagram import Reading
from collector.wire.recording import RecordingError, RecordType, encode_json_record

log = logging.getLogger("record_stream")


def stream_url(url: str, token: str | None) -> str:
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    query = urllib.parse.urlencode({"token": token}) if token else ""
    return urllib.parse.urlunsplit((scheme, parts.netloc, "/stream", query, ""))


class StreamRecorder:
    """Turns stream messages into the recorder's events."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.readings = 0
        self.events = 0
        self.missed = 0

    def note(self, data: dict) -> None:
        self.recorder._append(encode_json_record(RecordType.META, time.time(), data))

    def apply(self, m: dict) -> None:
        kind = m.get("type")
        if kind == "readings":
            groups: dict[tuple[str, float], list[Reading]] = {}
            for device, metric, t, value in m["readings"]:
                groups.setdefault((device, t), []).append(Reading(metric, value))
            self.recorder.on_telemetry(
                [Telemetry(t, d, 0, 0, tuple(rs)) for (d, t), rs in groups.items()]
            )
            self.readings += len(m["readings"])
        elif kind == "snapshot":
            for d in m["devices"]:
                if d["online"]:  # online before we came: as if it registered now
                    self.recorder.on_event(
                        DeviceOnline(
                            d["since"] or m["time"],
                            d["id"],
                            d.get("session_id") or 0,
                            d["transport"],
                            d["address"],
                        )
                    )
                    self.events += 1
        elif kind == "device":
            if m["online"]:
                event = DeviceOnline(
                    m["time"], m["device"], 0, m.get("transport") or "tcp", m.get("address")
                )
            else:
                event = DeviceOffline(
                    m["time"], m["device"], 0, m["reason"], m.get("duration") or 0.0
                )
            self.recorder.on_event(event)
            self.events += 1
        elif kind == "command":
            self.recorder.on_event(
                CommandUpdate(
                    m["time"],
                    m["device"],
                    m["id"],
                    m["name"],
                    m["state"],
                    m.get("result"),
                    m.get("error"),
                )
            )
            self.events += 1
        elif kind == "missed":
            self.missed += m["count"]
            self.note({"event": "missed", "count": m["count"]})


async def run(args: argparse.Namespace, ssl_context: ssl.SSLContext | None = None) -> int:
    url = stream_url(args.url, args.token)
    subscribe = {
        "type": "subscribe",
        "devices": args.device or ["*"],
        "metrics": args.metric or ["*"],
        "history": 0,
    }
    # The first connection must work before anything is created on disk: a collector that is
    # not there is an error, not an empty recording.
    async with trio.open_nursery() as nursery:

        async def connect() -> WebSocketConnection:
            return await connect_websocket_url(nursery, url, ssl_context=ssl_context)

        try:
            with trio.fail_after(10):
                ws: WebSocketConnection | None = await connect()
        except HandshakeError as exc:
            status = getattr(exc, "status_code", None)
            if status in (401, 403):
                raise options.UserError(
                    f"{url}: HTTP {status}: pass a valid read --token"
                ) from None
            raise options.UserError(
                f"cannot open the stream at {url}: {exc}", options.EXIT_ENVIRONMENT
            ) from None
        except (OSError, trio.TooSlowError) as exc:
            raise options.UserError(
                f"cannot reach the collector's stream at {url} ({exc or 'no answer in 10 s'}): "
                "is it running, and is the URL right?",
                options.EXIT_ENVIRONMENT,
            ) from None
        recorder = Recorder(
            RecorderConfig(directory=args.out, flush_interval=args.flush_interval),
            wall=time.time,
            source="stream",
        )
        converter = StreamRecorder(recorder)
        await nursery.start(recorder.serve)
        with trio.move_on_after(args.duration or float("inf")) as recording:

            async def stop_on_signal() -> None:  # Ctrl-C: stop, but flush what was received
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        recording.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            backoff = 0.5
            while True:
                try:
                    if ws is None:
                        ws = await connect()
                    try:
                        await ws.send_message(json.dumps(subscribe))
                        print(f"recording {url} into {args.out}", file=sys.stderr, flush=True)
                        backoff = 0.5
                        while True:
                            converter.apply(json.loads(await ws.get_message()))
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(1):
                            await ws.aclose()
                        ws = None
                except HandshakeError as exc:
                    converter.note({"event": "disconnected", "detail": str(exc)})
                except (OSError, ConnectionClosed) as exc:
                    converter.note(
                        {"event": "disconnected", "detail": str(exc) or type(exc).__name__}
                    )
                log.warning("stream lost; reconnecting in %.1fs", backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        await recorder.aclose()
        nursery.cancel_scope.cancel()
    print(
        f"recorded {converter.readings} readings and {converter.events} events into {args.out} "
        f"({recorder.records} records; the collector reported {converter.missed} updates missed)"
    )
    return options.EXIT_OK if converter.readings or converter.events else options.EXIT_FAILED


def build_parser(prog: str = "collector record-stream") -> argparse.ArgumentParser:
    p = options.parser(prog, __doc__)
    p.add_argument(
        "url",
        nargs="?",
        default="http://127.0.0.1:8082/",
        help="the collector's HTTP address (default http://127.0.0.1:8082/)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="recording directory (created or appended to)"
    )
    p.add_argument("--token", help="a read token, if the collector has access control on")
    p.add_argument(
        "--ca",
        metavar="FILE",
        help="verify an https:// collector's certificate with this CA bundle",
    )
    options.add_device_select(p)
    p.add_argument(
        "--metric",
        metavar="GLOB",
        action="append",
        help="only the metrics whose name matches (repeatable; default all)",
    )
    p.add_argument(
        "--duration", type=options.positive, help="stop after this many seconds (default: Ctrl-C)"
    )
    p.add_argument(
        "--flush-interval",
        type=options.positive,
        default=0.2,
        help="seconds between writes (default 0.2)",
    )
    options.add_log_level(p)
    return p


def main(argv: list[str] | None = None, prog: str = "collector record-stream") -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.log_level)

    def body() -> int:
        ctx = None
        if args.ca or args.url.startswith("https"):
            from collector.servers.tls import client_context

            ctx = client_context(args.ca)
        try:
            return trio.run(run, args, ctx)
        except RecordingError as exc:
            raise options.UserError(str(exc)) from None

    return options.run_main(prog, body)


if __name__ == "__main__":
    sys.exit(main())
