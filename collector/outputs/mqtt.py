"""`type = "mqtt"`: readings published to a broker (Mosquitto, EMQX), QoS 1 by default.

paho-mqtt runs its network loop in a thread of its own. This module keeps that thread behind a
Trio interface: its callbacks (connected, disconnected, a PUBACK) are handed to the Trio
thread with `TrioToken.run_sync_soon`, and `send` publishes one batch and waits, with a
deadline, until the broker has acknowledged every message of it. The runner
(collector/outputs/runner.py) moves the checkpoint only then; a batch that times out (the
broker went away) is published again when the broker is back: at least once.

Backpressure: at most one batch (`batch_size` readings) is handed to paho at a time, and only
while connected; paho keeps at most `max_inflight_messages` (100) unacknowledged on the wire.
"""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import trio

from collector.outputs.config import OutputConfig
from collector.wire.jsonio import dumps_bytes
from collector.wire.recording import EventRecord, ReadingsRecord

Message = tuple[str, bytes, bool]  # topic, payload, retain


def parse_url(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """mqtt://[USER[:PASSWORD]@]HOST[:PORT] or mqtts:// (TLS): host, port, tls, user, password."""
    u = urllib.parse.urlsplit(url)
    tls = u.scheme == "mqtts"
    port = u.port or (8883 if tls else 1883)
    user = urllib.parse.unquote(u.username) if u.username else None
    password = urllib.parse.unquote(u.password) if u.password else None
    return u.hostname or "", port, tls, user, password


def topic_for(template: str, device: str, metric: str = "") -> str:
    return template.replace("{device}", device).replace("{metric}", metric)


def plain_value(value: object) -> bytes:
    if value is True or value is False:
        return b"true" if value else b"false"
    return repr(value).encode() if isinstance(value, float) else str(value).encode()


def messages(
    records: Sequence[Any], cfg: OutputConfig, keep: Callable[[str, str], bool] | None
) -> tuple[list[Message], int]:
    """What `records` become on the broker (sans-IO), and how many readings that is."""
    out: list[Message] = []
    n = 0
    for r in records:
        if type(r) is EventRecord:
            if cfg.events_topic:
                topic = topic_for(cfg.events_topic, str(r.data.get("device", "")))
                out.append((topic, dumps_bytes({"event": r.type.name.lower(), **r.data}), False))
            continue
        assert type(r) is ReadingsRecord
        for metric, value in r.readings:
            if keep is not None and not keep(r.device_id, metric):
                continue
            if cfg.payload == "json":
                payload = dumps_bytes(
                    {"device": r.device_id, "metric": metric, "value": value,
                     "time": r.time, "seq": r.seq}
                )  # fmt: skip
            else:
                payload = plain_value(value)
            out.append((topic_for(cfg.topic, r.device_id, metric), payload, cfg.retain))
            n += 1
    return out, n


class MqttSender:
    def __init__(self, cfg: OutputConfig) -> None:
        import paho.mqtt.client as mqtt  # only a collector with an MQTT output needs it

        self.mqtt = mqtt
        self.cfg = cfg
        host, port, tls, user, password = parse_url(cfg.url)
        self.host, self.port = host, port
        self.where = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        client_id = cfg.client_id or f"collector-{cfg.name}-{socket.gethostname()}"[:64]
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if user or cfg.username:
            c.username_pw_set(user or cfg.username, password or cfg.password or None)
        if tls:
            c.tls_set(ca_certs=cfg.ca or None)
        c.max_inflight_messages_set(100)
        c.reconnect_delay_set(1, max(1, int(cfg.retry_max)))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self.client = c
        self.connected = False
        self._connected = trio.Event()
        self._acked: set[int] = set()
        self._ack_wake = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self.disconnect_reason = ""

    # -- paho's thread -> the Trio thread -------------------------------------------------------

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        if self._token is not None:
            try:
                self._token.run_sync_soon(fn, *args)
            except trio.RunFinishedError:
                pass

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._soon(self._connect_result, not reason.is_failure, str(reason))

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._soon(self._connect_result, False, str(reason))

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
        self._soon(self._ack, mid)

    # -- the Trio thread ------------------------------------------------------------------------

    def _connect_result(self, ok: bool, reason: str) -> None:
        self.connected = ok
        if ok:
            self._connected.set()
        else:
            self.disconnect_reason = reason
            if self._connected.is_set():
                self._connected = trio.Event()

    def _ack(self, mid: int) -> None:
        self._acked.add(mid)
        self._ack_wake.set()

    def encode(
        self, records: Sequence[Any], keep: Callable[[str, str], bool] | None
    ) -> tuple[list[Message], int]:
        return messages(records, self.cfg, keep)

    async def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    async def send(self, batch: list[Message]) -> None:
        """Publish `batch`; return when the broker acknowledged all of it (QoS 1 and 2; QoS 0:
        when paho wrote it). Raises ConnectionError when not connected within `timeout`, or
        when the acknowledgements do not all come within it."""
        cfg = self.cfg
        with trio.move_on_after(cfg.timeout):
            await self._connected.wait()
        if not self.connected:
            raise ConnectionError(f"not connected ({self.disconnect_reason or 'connecting'})")
        waiting: set[int] = set()
        self._acked.clear()
        for topic, payload, retain in batch:
            info = self.client.publish(topic, payload, qos=cfg.qos, retain=retain)
            if info.rc != self.mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"publish failed: {self.mqtt.error_string(info.rc)}")
            waiting.add(info.mid)
        with trio.move_on_after(cfg.timeout):
            while not waiting <= self._acked:
                self._ack_wake = trio.Event()
                await self._ack_wake.wait()
            return
        missing = len(waiting - self._acked)
        raise ConnectionError(f"{missing} of {len(waiting)} messages not acknowledged in time")

    async def aclose(self) -> None:
        self._token = None
        await trio.to_thread.run_sync(self._stop, abandon_on_cancel=True)

    def _stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
