"""Simulated sensors with realistic signals and deliberate impairments.

Each sensor is a real device client (TCP registration or UDP HELLO) sending temperature,
humidity and battery readings. Between the client and the socket sits an impairment hook that
drops, duplicates and reorders datagrams on purpose, and keeps an exact ledger of what reached
the wire, so the collector's per-device counts can be checked against it:

* expected lost       = sequence numbers never delivered below the highest delivered one
* expected duplicates = copies delivered beyond the first
* expected reordered  = sequence numbers delivered after a higher one

Used by `collector simulate`, `collector demo` and the acceptance run.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import trio

from collector.device.client import AckTimeout, DeviceClient, open_device, open_udp_device
from collector.wire.datagram import HEADER

log = logging.getLogger("collector.sim")


@attrs.frozen(kw_only=True)
class SimConfig:
    devices: int = 20
    prefix: str = "sensor"
    rate: float = 1.0  # TELEMETRY datagrams per second per device
    udp_only: float = 0.0  # share of devices that register with HELLO instead of TCP
    loss: float = 0.0  # probability that a datagram is dropped
    duplicate: float = 0.0  # probability that a delivered datagram is sent twice
    reorder: float = 0.0  # probability that a datagram is held back and sent after the next
    jitter: float = 0.0  # send times vary by +/- this fraction of the interval
    churn: float = 0.0  # clean reconnects per device per minute
    ack_share: float = 0.0  # share of readings sent with ACK requested
    hang: int = 0  # this many devices go silent (no goodbye) at `hang_at` seconds
    hang_at: float = 0.0
    seed: int | None = None
    stamp: bool = False  # add a `sent_at` reading (wall clock at send) for latency measurements
    signals: bool = True  # temperature, humidity, battery (False: only `sent_at`, if stamped)
    max_backoff: float = 10.0  # longest wait between failed registration attempts

    def device_ids(self) -> list[str]:
        return [f"{self.prefix}-{i:03d}" for i in range(1, self.devices + 1)]


@attrs.define
class SensorReport:
    device_id: str
    transport: str
    sessions: int = 0
    datagrams: int = 0  # distinct sequence numbers sent
    transmissions: int = 0  # copies handed to the impairment hook, retransmissions included
    dropped: int = 0  # copies dropped on purpose
    duplicated: int = 0  # extra copies sent on purpose
    reordered: int = 0  # held back and sent after the next one
    expected_lost: int = 0
    expected_duplicates: int = 0
    expected_out_of_order: int = 0
    ack_requested: int = 0
    ack_timeouts: int = 0
    commands: int = 0
    errors: int = 0
    hung_at: float | None = None  # wall clock of the last datagram a hung device delivered
    last_error: str | None = None


class _Ledger:
    """Impairs one session's datagrams and records exactly what was delivered."""

    def __init__(
        self,
        report: SensorReport,
        cfg: SimConfig,
        rng: random.Random,
        raw: Callable[[bytes], Any],
        wall: Callable[[], float],
    ) -> None:
        self.report = report
        self.wall = wall
        self.cfg = cfg
        self.rng = rng
        self.raw = raw
        self.delivered: set[int] = set()
        self.seen: set[int] = set()
        self.top = 0
        self.held: bytes | None = None
        self.last_delivery = wall()  # the registration itself proved the device alive
        self.impair = True

    async def transmit(self, data: bytes) -> None:
        seq = HEADER.unpack_from(data)[5]
        r = self.report
        r.transmissions += 1
        if seq not in self.seen:
            self.seen.add(seq)
            r.datagrams += 1
        rng, cfg = self.rng, self.cfg
        if self.impair:
            if rng.random() < cfg.loss:
                r.dropped += 1
                return
            if self.held is None and rng.random() < cfg.reorder:
                self.held = data
                return
        await self._deliver(data, seq)
        if self.impair and rng.random() < cfg.duplicate:
            r.duplicated += 1
            await self._deliver(data, seq)
        await self.flush()

    async def flush(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            self.report.reordered += 1
            await self._deliver(held, HEADER.unpack_from(held)[5])

    async def _deliver(self, data: bytes, seq: int) -> None:
        if seq in self.delivered:
            self.report.expected_duplicates += 1
        else:
            if seq < self.top:
                self.report.expected_out_of_order += 1
            self.delivered.add(seq)
            self.top = max(self.top, seq)
        self.last_delivery = self.wall()
        await self.raw(data)

    def close(self) -> None:
        """Fold this session into the report: what the collector must count as lost."""
        self.report.expected_lost += self.top - len(self.delivered)


class Signals:
    """Plausible sensor values: daily-ish cycles, noise, a slowly draining battery."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.phase = rng.uniform(0, 2 * math.pi)
        self.base_t = rng.uniform(18, 24)
        self.base_h = rng.uniform(40, 60)
        self.battery = rng.uniform(80, 100)
        self.drain = rng.uniform(0.002, 0.01)  # % per reading

    def sample(self, t: float) -> dict[str, float | int | bool | str]:
        rng = self.rng
        self.battery = max(0.0, self.battery - self.drain)
        temp = self.base_t + 3 * math.sin(2 * math.pi * t / 300 + self.phase) + rng.gauss(0, 0.15)
        hum = self.base_h - 8 * math.sin(2 * math.pi * t / 300 + self.phase) + rng.gauss(0, 0.5)
        return {
            "temperature": round(temp, 2),
            "humidity": round(min(100.0, max(0.0, hum)), 1),
            "battery": round(self.battery, 2),
        }


class Simulator:
    def __init__(
        self,
        cfg: SimConfig,
        secrets: Mapping[str, str],
        *,
        host: str = "127.0.0.1",
        tcp_port: int = 8080,
        udp_port: int = 8081,
        wall: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.wall = wall
        self.ssl_context = ssl_context  # TLS on the control channel
        self.secrets = secrets
        self.host = host
        self.tcp_port = tcp_port
        self.udp_port = udp_port
        self.rng = random.Random(cfg.seed)
        ids = cfg.device_ids()
        missing = [d for d in ids if d not in secrets]
        if missing:
            raise ValueError(f"no secrets for {len(missing)} devices, e.g. {missing[0]!r}")
        n_udp = round(cfg.udp_only * len(ids))
        self.transports = {d: ("udp" if i < n_udp else "tcp") for i, d in enumerate(reversed(ids))}
        self.hangs = set(self.rng.sample(ids, min(cfg.hang, len(ids))))
        self.reports = {d: SensorReport(d, self.transports[d]) for d in ids}
        self.started = 0.0
        self._stop = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, duration: float | None = None) -> None:
        """Run every sensor until `stop()` or `duration` seconds, then finish cleanly."""
        self.started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i, device_id in enumerate(self.reports):
                # stagger the starts over one interval, as real devices do
                delay = (i / max(1, len(self.reports))) / max(self.cfg.rate, 0.1)
                nursery.start_soon(self._sensor, device_id, delay, name=f"sensor {device_id}")
            if duration is not None:
                with trio.move_on_after(duration):
                    await self._stop.wait()
                self._stop.set()

    def _open(self, device_id: str) -> AbstractAsyncContextManager[DeviceClient]:
        secret = self.secrets[device_id]
        if self.transports[device_id] == "udp":
            return open_udp_device(
                self.host,
                device_id,
                secret,
                udp_port=self.udp_port,
                on_command=self._command_handler(device_id),
            )
        return open_device(
            self.host,
            device_id,
            secret,
            tcp_port=self.tcp_port,
            on_command=self._command_handler(device_id),
            ssl_context=self.ssl_context,
        )

    def _command_handler(self, device_id: str) -> Callable[[str, dict[str, Any]], Any]:
        report = self.reports[device_id]

        async def handle(name: str, args: dict[str, Any]) -> Any:
            report.commands += 1
            if name == "ping":
                return {"pong": True, "device": device_id}
            if name == "set_rate":
                return {"rate": float(args.get("rate", self.cfg.rate))}
            if name == "fail":
                raise RuntimeError(str(args.get("message", "asked to fail")))
            if name == "sleep":
                await trio.sleep(float(args.get("seconds", 1)))
                return {"slept": float(args.get("seconds", 1))}
            return {"ok": True, "command": name, "args": args}

        return handle

    async def _sensor(self, device_id: str, start_delay: float) -> None:
        cfg = self.cfg
        report = self.reports[device_id]
        rng = random.Random(self.rng.random())
        signals = Signals(rng)
        await trio.sleep(start_delay)
        backoff = min(0.5, cfg.max_backoff)
        while not self._stop.is_set():
            ledger: _Ledger | None = None
            outcome = "stopped"
            try:
                async with self._open(device_id) as dev:
                    report.sessions += 1
                    backoff = min(0.5, cfg.max_backoff)
                    ledger = _Ledger(report, cfg, rng, dev.raw_transmit, self.wall)
                    dev.transmit = ledger.transmit
                    outcome = await self._session(dev, ledger, signals, rng)
            except Exception as exc:  # a simulator keeps going, and reports what went wrong
                report.errors += 1
                report.last_error = f"{type(exc).__name__}: {exc}"
                outcome = "error"
            finally:
                if ledger is not None:
                    ledger.close()
            if outcome == "hung" or self._stop.is_set():
                return
            pause = rng.uniform(0.5, 2.0) if outcome == "churn" else backoff
            backoff = min(backoff * 2, cfg.max_backoff)
            with trio.move_on_after(pause):
                await self._stop.wait()

    async def _session(
        self, dev: DeviceClient, ledger: _Ledger, signals: Signals, rng: random.Random
    ) -> str:
        cfg = self.cfg
        report = ledger.report
        interval = 1.0 / cfg.rate if cfg.rate > 0 else math.inf
        churn_at = math.inf
        if cfg.churn > 0:
            churn_at = trio.current_time() + rng.expovariate(cfg.churn / 60)
        hang_at = self.started + cfg.hang_at if dev.device_id in self.hangs else math.inf
        next_send = trio.current_time() + rng.uniform(0, min(interval, 1.0))
        while True:
            wake = min(next_send, churn_at, hang_at)
            with trio.move_on_at(wake):
                await self._stop.wait()
            now = trio.current_time()
            if self._stop.is_set() or now >= churn_at:
                # Finish cleanly: release a held datagram, then one heartbeat that is never
                # impaired, so every deliberate drop lies below a delivered sequence number.
                # It asks for an ACK, so that it has been taken in before the goodbye, which goes
                # over TCP and could otherwise overtake it.
                ledger.impair = False
                await ledger.flush()
                try:
                    await dev.send_heartbeat(ack=True)
                except AckTimeout:
                    report.ack_timeouts += 1
                return "stopped" if self._stop.is_set() else "churn"
            if now >= hang_at:
                await ledger.flush()
                report.hung_at = ledger.last_delivery
                # A hung device: nothing more leaves it, but its TCP connection stays open
                # (until the collector times the session out and closes it).
                dev.transmit = _swallow
                await self._stop.wait()
                return "hung"
            ack = cfg.ack_share > 0 and rng.random() < cfg.ack_share
            if ack:
                report.ack_requested += 1
            readings = signals.sample(now - self.started) if cfg.signals else {}
            if cfg.stamp:
                readings["sent_at"] = self.wall()
            try:
                await dev.send_readings(readings, ack=ack)
            except AckTimeout:
                report.ack_timeouts += 1
            jitter = 1 + cfg.jitter * (2 * rng.random() - 1)
            next_send = max(now, next_send + interval * jitter)

    # -- reporting -----------------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        keys = (
            "sessions", "datagrams", "transmissions", "dropped", "duplicated", "reordered",
            "expected_lost", "expected_duplicates", "expected_out_of_order", "ack_requested",
            "ack_timeouts", "commands", "errors",
        )  # fmt: skip
        return {k: sum(getattr(r, k) for r in self.reports.values()) for k in keys}

    def summary(self) -> str:
        t = self.totals()
        return (
            f"simulated {len(self.reports)} sensors, {t['sessions']} sessions: "
            f"sent {t['datagrams']} datagrams ({t['transmissions']} transmissions); "
            f"on purpose dropped {t['dropped']} (collector should count {t['expected_lost']} lost), "
            f"duplicated {t['duplicated']}, reordered {t['reordered']}; "
            f"acks requested {t['ack_requested']}, ack timeouts {t['ack_timeouts']}; "
            f"errors {t['errors']}"
        )


async def _swallow(data: bytes) -> None:
    return None
