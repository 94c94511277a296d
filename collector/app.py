"""The collector: one nursery tree holding the UDP ingest server, the TCP control server, the
device sessions and the commands, plus the graceful shutdown that drains them.

    Collector.serve()
    ├── SessionRegistry.serve()     one task per live session (deadline = liveness)
    ├── CommandManager.serve()      one task per open command (delivery, retransmit, timeout)
    ├── serve_udp()                 datagrams -> Ingest (batched)
    ├── ControlServer.serve()       control connections (one handler task each)
    ├── StreamHub.serve()           heartbeats and statistics for dashboards
    └── HttpServer.serve()          dashboard, API, /metrics, WebSocket subscribers
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from collector.cluster.bus import ClusterBus, default_node_name
from collector.cluster.workers import WorkerSpec
from collector.config import (
    LIVE_SETTINGS,
    MAX_CONFIG_BYTES,
    Config,
    ConfigPushError,
    DeviceConfigRule,
)
from collector.core.alarms import AlarmChange, AlarmEngine
from collector.core.boundary import ErrorBoundary
from collector.core.commands import CommandError, CommandManager, CommandRecord
from collector.core.events import Event, Listener
from collector.core.hub import StreamConfig, StreamHub
from collector.core.ingest import Ingest
from collector.core.load import BusyMeter
from collector.core.ratelimit import FlappingDetector, SourceLimiter
from collector.core.recorder import Recorder, RecorderConfig
from collector.core.sessions import Session, SessionRegistry
from collector.core.statistics import CollectorStatistics, DeviceStatistics
from collector.devices import DeviceRegistry, DevicesError
from collector.gcpolicy import GcPolicy
from collector.logs import RateLimitedLog
from collector.outputs.gauges import Gauges
from collector.outputs.runner import Output
from collector.servers.http import HttpServer
from collector.servers.tcp import ControlServer
from collector.servers.tls import TlsContexts
from collector.servers.udp import serve_udp
from collector.wire import control
from collector.wire.crypto import COLLECTOR_TO_DEVICE
from collector.wire.datagram import DatagramType, encode_goodbye_payload, seal_datagram
from collector.wire.jsonio import dumps_bytes
from collector.wire.stream import CLOSE_GOING_AWAY

log = logging.getLogger("collector")


@attrs.frozen
class Addresses:
    tcp: tuple[Any, ...] | None
    udp: tuple[Any, ...] | None
    http: tuple[Any, ...] | None = None
    tls: bool = False

    @property
    def dashboard_url(self) -> str | None:
        if self.http is None:
            return None
        host = self.http[0]
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{self.http[1]}/"


@attrs.frozen
class ShutdownReport:
    devices: int
    sessions_ended: int
    datagrams_accepted: int
    datagrams_lost: int
    datagrams_rejected: int
    rejected: Mapping[str, int]
    commands_answered_in_grace: int
    commands_abandoned: int
    duration: float
    clean: bool
    recording: Mapping[str, Any] | None = None
    overran: tuple[str, ...] = ()  # steps cut short by their budget
    #: output -> its counts ([outputs.NAME] that send: acknowledged, rejected, dropped)
    outputs: Mapping[str, Mapping[str, int]] = attrs.field(factory=dict)

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.rejected.items() if v)
        how = "complete" if self.clean else f"forced ({', '.join(self.overran)} ran out of time)"
        return (
            f"shutdown {how} in {self.duration:.2f}s: "
            f"{self.devices} devices, {self.sessions_ended} sessions ended; "
            f"datagrams accepted {self.datagrams_accepted}, lost {self.datagrams_lost}, "
            f"rejected {self.datagrams_rejected}"
            + (f" ({reasons})" if reasons else "")
            + f"; commands abandoned {self.commands_abandoned}"
            + (
                f"; recorded {self.recording['records']} records to {self.recording['directory']}"
                + (f" ({self.recording['dropped']} dropped)" if self.recording["dropped"] else "")
                if self.recording
                else ""
            )
            + (
                "; outputs: "
                + ", ".join(
                    f"{name} {c['acknowledged']} confirmed"
                    + "".join(f", {c[k]} {k}" for k in ("rejected", "dropped") if c.get(k))
                    for name, c in self.outputs.items()
                )
                + (
                    " (the rest is sent from the checkpoints after the next start)"
                    if self.recording
                    else ""
                )
                if self.outputs
                else ""
            )
        )


class Collector:
    def __init__(
        self,
        config: Config,
        devices: Mapping[str, str],
        *,
        wall: Callable[[], float] = time.time,
        listeners: Sequence[Listener] = (),
        ingest: bool = True,
        devices_file: str | Path | None = None,
        worker: WorkerSpec | None = None,
    ) -> None:
        self.config = config
        #: one of `collector serve --workers N`'s processes: its sockets come from the parent
        self.worker = worker
        #: where `devices` came from: device changes through the API are saved there, and a
        #: reload (SIGHUP) reads it again
        self.devices_file = Path(devices_file) if devices_file is not None else None
        self._devices_lock = trio.Lock()  # one change to the devices (or reload) at a time
        self._devices_wake = trio.Event()  # background work on the devices file is wanted
        self._devices_cache_wanted = False
        self._devices_reload_why: set[str] = set()
        #: how to read the configuration again on a reload (set by `collector serve`)
        self.config_loader: Callable[[], Config] | None = None
        self.serve_ingest = ingest  # False: no TCP/UDP servers (a stand-in serving a recording)
        self.playback: Any = None  # a collector.tools.playback.Playback driving the hub instead
        #: the recording GET /api/history reads beyond memory: the one this collector writes,
        #: or (a stand-in) the one it serves
        self.history_dir: str | None = config.record_dir or None
        self.devices = devices
        self.wall = wall
        self.listeners: list[Listener] = list(listeners)
        self.device_config: list[DeviceConfigRule] = list(config.device_config)
        #: TLS on the control channel and the HTTP port, when the config has a certificate
        self.tls = (
            TlsContexts(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert
            else None
        )
        #: where a bug in handling one input stops (collector_internal_errors_total)
        self.boundary = ErrorBoundary(trio.current_time)
        self.registry = SessionRegistry(
            timeout=config.timeout,
            max_devices=config.max_devices,
            window_blocks=config.replay_window_blocks,
            wall=wall,
            emit=self._emit,
            flapping=FlappingDetector(
                max_count=config.flapping_max,
                window=config.flapping_window,
                ban=config.flapping_ban,
            ),
        )
        if worker is not None:
            self.registry.share = (worker.index, worker.count)
        self.ingest = Ingest(
            self.registry,
            devices,
            heartbeat_interval=config.heartbeat_interval,
            timeout=config.timeout,
            max_datagram=config.max_datagram,
            wall=wall,
            listeners=self.listeners,
            rate_limit=config.log_rate_limit,
            limiter=SourceLimiter(
                rate=config.ratelimit_per_source,
                burst=config.ratelimit_burst,
                total=config.ratelimit_total,
                max_sources=config.ratelimit_max_sources,
            ),
            boundary=self.boundary,
            config_for=self.config_for,
            registrations_per_device=config.flapping_max
            * (1 + int(120.0 // config.flapping_window))
            + 1,
            goodbye_linger=config.goodbye_linger,
        )
        self.commands = CommandManager(
            self.registry,
            known_device=self._known_device,
            send_datagram=self.ingest.send_datagram,
            wall=wall,
            emit=self._emit,
            timeout=config.command_timeout,
            expiry=config.command_expiry,
            queue_limit=config.command_queue,
            retransmit_initial=config.command_retransmit_initial,
            retransmit_max=config.command_retransmit_max,
            max_args=min(MAX_CONFIG_BYTES * 2, config.max_line // 2),
            max_datagram=config.max_datagram,
            boundary=self.boundary,
        )
        self.ingest.commands = self.commands
        self.control = ControlServer(self)
        #: how busy the event loop is: the UDP loop and the stream batch by it
        self.load = BusyMeter()
        #: full garbage collections, timed; the long ones freeze what survived them
        self.gc = GcPolicy(config.gc_freeze_pause)
        self.hub: StreamHub = StreamHub(
            self,
            StreamConfig(
                history=config.stream_history,
                queue_limit=config.stream_queue,
                batch_limit=config.stream_batch,
                stall_limit=config.stream_stall_limit,
                ping_interval=config.stream_ping_interval,
                ping_timeout=config.stream_ping_timeout,
                heartbeat_interval=config.stream_heartbeat,
                min_interval=config.stream_min_interval,
                max_subscribers=config.stream_max_subscribers,
                max_message=config.stream_max_message,
                max_replies=config.stream_max_replies,
                max_metrics=config.max_metrics_per_device,
            ),
            wall=wall,
            load=self.load,
        )
        self.listeners.append(self.hub)
        self.recorder: Recorder | None = None
        if config.record_dir:
            self.recorder = Recorder(recorder_config(config), wall=wall)
            self.listeners.append(self.recorder)
            self.ingest.heartbeats_to_listeners = True
            if config.record_raw:
                self.ingest.raw_sink = self.recorder.on_datagram
        #: [alarms.NAME]: threshold rules on the readings (docs/ALARMS.md); live mode only
        self.alarms: AlarmEngine | None = None
        if config.alarms and ingest:
            prefix = ""
            if worker is not None or config.redis:  # ids unique across the cluster's processes
                prefix = (
                    f"{worker.node if worker is not None else config.node or default_node_name()}."
                )
            self.alarms = AlarmEngine(
                config.alarms, wall=wall, emit=self._alarm_changed, id_prefix=prefix
            )
            self.listeners.append(self.alarms)
        self._alarm_log = RateLimitedLog(
            logging.getLogger("collector.alarms"), config.log_rate_limit
        )
        #: [outputs.NAME]: readings on to databases (docs/OUTPUTS.md)
        self.outputs: list[Output | Gauges] = []
        if ingest:
            for out_cfg in config.outputs:
                if out_cfg.type == "prometheus":
                    gauges = Gauges(out_cfg)
                    self.outputs.append(gauges)
                    self.listeners.append(gauges)
                    continue
                output = Output(
                    out_cfg,
                    recorder=self.recorder,
                    record_dir=config.record_dir,
                    wall=wall,
                    log_rate=config.log_rate_limit,
                )
                self.outputs.append(output)
                if self.recorder is None:
                    self.listeners.append(output)  # a bounded buffer in memory
                else:
                    self.recorder.outputs.append(output)
        #: the cluster bus: other nodes' devices, commands across nodes (docs/SCALING.md)
        self.cluster: ClusterBus | None = None
        redis = worker.redis if worker is not None else config.redis
        if redis and ingest:
            self.cluster = ClusterBus(
                self, node=worker.node if worker else config.node or default_node_name(), url=redis
            )
            self.listeners.append(self.cluster)
            self.commands.remote = self.cluster
            self.commands.id_prefix = f"{self.cluster.node}."
        self.http: HttpServer | None = None
        if config.http_port is not None:
            self.http = HttpServer(
                self, read_tokens=config.read_tokens, command_tokens=config.command_tokens
            )
        self.http_address: tuple[Any, ...] | None = None
        self.accepting = True
        self.tcp_address: tuple[Any, ...] | None = None
        self.udp_address: tuple[Any, ...] | None = None
        self.started_at = 0.0
        self.stopped_at: float | None = None
        self._stop = trio.Event()
        self._shutdown_report: ShutdownReport | None = None

    # -- running -----------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until `shutdown()` finishes (or the caller cancels). Reports the bound addresses."""
        cfg = self.config
        self.started_at = trio.current_time()
        socks = self._worker_sockets()
        self.gc.schedule = trio.lowlevel.current_trio_token().run_sync_soon
        self.gc.install()
        try:
            await self._serve(cfg, socks, task_status)
        finally:
            self.gc.uninstall()

    async def _serve(
        self,
        cfg: Config,
        socks: dict[str, socket.socket],
        task_status: trio.TaskStatus[Addresses],
    ) -> None:
        async with trio.open_nursery() as nursery:
            if self.recorder is not None:
                await nursery.start(self.recorder.serve)  # repairs a torn tail before any data
            await nursery.start(self.registry.serve)
            await nursery.start(self.commands.serve)
            if self.serve_ingest:
                self.udp_address = await nursery.start(
                    functools.partial(
                        serve_udp,
                        self.ingest,
                        cfg.host,
                        cfg.udp_port,
                        rcvbuf=cfg.udp_rcvbuf,
                        coalesce=cfg.udp_coalesce,
                        sock=socks.get("udp"),
                        load=self.load,
                    )
                )
                self.tcp_address = await nursery.start(
                    functools.partial(
                        self.control.serve, cfg.host, cfg.tcp_port, sock=socks.get("tcp")
                    )
                )
            else:
                self.control.handlers_done.set()  # nothing to wait for on shutdown
            await nursery.start(self.hub.serve)
            await nursery.start(self._devices_file_task)
            if self.alarms is not None:
                await nursery.start(
                    self.alarms.serve, lambda: self.boundary.guard("task", "alarms")
                )
            if self.cluster is not None:
                await nursery.start(self.cluster.serve)
            for output in self.outputs:
                await nursery.start(output.serve, self.boundary)
            if self.http is not None:
                self.http_address = await nursery.start(
                    functools.partial(
                        self.http.serve, cfg.host, cfg.http_port, sock=socks.get("http")
                    )
                )
            task_status.started(
                Addresses(
                    self.tcp_address, self.udp_address, self.http_address, self.tls is not None
                )
            )
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _worker_sockets(self) -> dict[str, socket.socket]:
        """A worker's sockets, inherited from the parent that bound them."""
        w = self.worker
        if w is None:
            return {}
        out = {"udp": socket.socket(fileno=w.udp_fd), "tcp": socket.socket(fileno=w.tcp_fd)}
        if w.http_fd is not None:
            out["http"] = socket.socket(fileno=w.http_fd)
        return out

    async def shutdown(self, grace: float | None = None) -> ShutdownReport:
        """Stop accepting, let in-flight commands finish, say goodbye to every device, stop.

        Each step has its own budget, so one that runs out (a device that never answers its
        command) cannot take the others' time: commands already sent get `[shutdown] grace`,
        the goodbyes to devices `goodbye_timeout`, the dashboards' final events and close
        frames `close_timeout`; the recording's final flush always runs. Returns what was done.
        """
        if self._shutdown_report is not None:
            return self._shutdown_report
        cfg = self.config
        grace = cfg.shutdown_grace if grace is None else grace
        start = trio.current_time()
        overran: list[str] = []
        log.info("shutting down: no new connections or registrations (grace %.1fs)", grace)
        self.accepting = False
        self.ingest.accepting_hellos = False
        self.commands.stop_accepting()
        self.control.stop_accepting()
        if self.http is not None:
            self.http.stop_accepting()
        abandoned = self.commands.expire_queued("the collector is shutting down")
        in_flight = [c for c in self.commands.in_flight if c.state == "sent"]
        with trio.move_on_after(grace) as step:
            await self.commands.wait_sent_finished()
        if step.cancelled_caught:
            overran.append("commands")
        unanswered = [c for c in in_flight if c.state == "sent"]
        answered = len(in_flight) - len(unanswered)
        abandoned += self.commands.abandon(
            unanswered, "the collector shut down before the device answered"
        )
        for session in list(self.registry.online.values()):
            self._goodbye_udp(session, "shutdown")
        ended = self.registry.end_all("shutdown")
        with trio.move_on_after(cfg.shutdown_goodbye_timeout) as step:
            await self.control.handlers_done.wait()
        if step.cancelled_caught:
            overran.append("goodbyes")
        with trio.move_on_after(cfg.shutdown_close_timeout) as step:
            # Dashboards get the final offline events, then a close with 1001 (going away).
            await self.hub.close_all(CLOSE_GOING_AWAY, "collector shutting down")
        if step.cancelled_caught:
            overran.append("dashboards")
        if self.cluster is not None:
            # The last session events for the other nodes, then the node leaves the bus.
            await self.cluster.aclose(cfg.shutdown_close_timeout)
        if self.recorder is not None:
            # The final flush, whatever ran out before. A write in a worker thread cannot be
            # interrupted anyway, so there is no deadline to put here.
            await self.recorder.aclose()
        clean = not overran
        stats = self.ingest
        rejected = dict(stats.rejected)
        self._shutdown_report = ShutdownReport(
            devices=len(self.registry.devices),
            sessions_ended=ended,
            datagrams_accepted=stats.accepted,
            datagrams_lost=sum(d.lost for d in self.registry.devices.values()),
            datagrams_rejected=sum(rejected.values()),
            rejected=rejected,
            commands_answered_in_grace=answered,
            commands_abandoned=abandoned,
            duration=trio.current_time() - start,
            clean=clean,
            overran=tuple(overran),
            recording=self.recorder.statistics() if self.recorder is not None else None,
            outputs={
                o.name: {k: o.counters[k] for k in ("acknowledged", "rejected", "dropped")}
                for o in self.outputs
                if isinstance(o, Output)
            },
        )
        self.stopped_at = trio.current_time()
        self._stop.set()
        return self._shutdown_report

    def reload(self, config: Config | None = None) -> list[str]:
        """What SIGHUP does: read again what can change while running (the devices file, the
        parts of the configuration listed in LIVE_SETTINGS, the TLS certificate) and apply it.
        Sessions of devices that are still allowed with the same secret are never dropped;
        those of removed devices, and of devices with a new secret, end with reason `revoked`.
        Returns one line per thing that changed."""
        return self._reload(config, None)

    async def reload_async(self, config: Config | None = None) -> list[str]:
        """`reload`, with the devices file read in a worker thread: the event loop (and so
        every session's deadline) goes on while a large file is parsed."""
        if not self._reloads_devices_file():
            return self._reload(config, None)
        assert self.devices_file is not None
        found: dict[str, str] | str  # a str: why the file was not taken
        async with self._devices_lock:  # no change is in flight, none begins meanwhile
            try:
                found = await trio.to_thread.run_sync(DeviceRegistry.read, self.devices_file)
            except DevicesError as exc:
                found = str(exc)  # not the exception: its traceback holds this frame
            return self._reload(config, found)

    def _reloads_devices_file(self) -> bool:
        return (
            not self._shared_devices()
            and self.devices_file is not None
            and isinstance(self.devices, DeviceRegistry)
        )

    def _reload(self, config: Config | None, found: dict[str, str] | str | None) -> list[str]:
        changed: list[str] = []
        if self._shared_devices():
            log.info("reload: the devices are shared on Redis; the devices file is only a cache")
        elif self._reloads_devices_file():
            assert isinstance(self.devices, DeviceRegistry) and self.devices_file is not None
            if found is None:
                try:
                    found = DeviceRegistry.read(self.devices_file)
                except DevicesError as exc:
                    found = str(exc)
            if isinstance(found, str):
                log.error("reload: keeping the devices as they were: %s", found)
            else:
                diff = self.devices.replace(found)
                if diff:
                    changed.append(f"devices: {diff.describe()}")
                    for device_id in (*diff.removed, *diff.rotated):
                        self.revoke(device_id)
                    for device_id in diff.removed:
                        self.forget_alarms(device_id)
        if config is not None:
            changed += self._apply_config(config)
        if self.tls is not None and self.tls.reload():
            changed.append("TLS certificate")
        return changed

    def _apply_config(self, new: Config) -> list[str]:
        old = self.config
        changed, restart = [], []
        for field in attrs.fields(Config):
            a, b = getattr(old, field.name), getattr(new, field.name)
            if a == b:
                continue
            if field.name in LIVE_SETTINGS:
                changed.append(field.name)
            else:
                restart.append(field.name)
        if restart:
            log.warning(
                "reload: %s changed in the config file but take effect only after a restart",
                ", ".join(restart),
            )
        if not changed:
            return []
        live = {name: getattr(new, name) for name in changed}
        self.config = attrs.evolve(old, **live)
        cfg = self.config
        # Rules from the file are replaced; rules pushed through the API stay.
        file_matches = {r.match for r in old.device_config}
        pushed = [r for r in self.device_config if r.match not in file_matches]
        self.device_config = [*cfg.device_config, *pushed]
        self.control.config = cfg
        if self.http is not None:
            self.http.config = cfg
            self.http.set_tokens(cfg.read_tokens, cfg.command_tokens)
        self.commands.timeout, self.commands.expiry = cfg.command_timeout, cfg.command_expiry
        flapping = self.registry.flapping
        flapping.max_count, flapping.window, flapping.ban = (
            cfg.flapping_max, cfg.flapping_window, cfg.flapping_ban,
        )  # fmt: skip
        limiter = self.ingest.limiter
        limiter.rate, limiter.burst, limiter.total, limiter.max_sources = (
            cfg.ratelimit_per_source, cfg.ratelimit_burst, cfg.ratelimit_total, cfg.ratelimit_max_sources,
        )  # fmt: skip
        self.hub.config = attrs.evolve(
            self.hub.config,
            max_subscribers=cfg.stream_max_subscribers,
            max_metrics=cfg.max_metrics_per_device,
        )
        if "log_level" in changed:
            logging.getLogger().setLevel(cfg.log_level.upper())
        return [f"config: {', '.join(changed)}"]

    def revoke(self, device_id: str) -> bool:
        """End the device's session with reason `revoked`: it was removed, or got a new secret."""
        session = self.registry.online.get(device_id)
        if session is None:
            return False
        self._goodbye_udp(session, "revoked")
        self.registry.end(session, "revoked")
        return True

    # -- devices, changed while running (the HTTP API, `collector devices --url`) -------------

    def _devices_registry(self) -> DeviceRegistry:
        if not isinstance(self.devices, DeviceRegistry):
            raise DevicesError(
                "this collector's devices cannot be changed while it runs (a replay stand-in)",
                "read_only",
            )
        return self.devices

    # A change to the devices through the API is whole or not at all, one at a time
    # (`_devices_lock`): the change in memory, the file saved in a worker thread (a large file
    # takes seconds to edit and check), then its effects (revoked sessions, the cluster told).
    # If the save fails the change is undone, and no other change can be in the file by then.
    # Once begun, it is shielded from cancellation: a shutdown waits for it rather than leave
    # it half done. A reload takes the same lock, so it never undoes a change in flight.
    # With [cluster] shared_devices the file is only this node's cache of Redis's: a change
    # takes effect and is owed to Redis at once, and the cache is saved in the background.

    def _shared_devices(self) -> bool:
        return self.cluster is not None and self.cluster.shared_devices

    async def _save_devices_file(self, device_id: str | None = None) -> None:
        """Save one device's change (`device_id`: what the registry holds for it now, or its
        removal) on top of what the file holds; with None, the whole registry (the cache of
        shared devices)."""
        if self.devices_file is None:
            return
        registry = self._devices_registry()
        if device_id is None:
            await trio.to_thread.run_sync(registry.save, self.devices_file, registry.snapshot())
        else:
            change = {device_id: registry.get(device_id)}
            await trio.to_thread.run_sync(
                functools.partial(registry.save, self.devices_file, changes=change)
            )

    async def add_device(self, device_id: str) -> str:
        """A new device with a generated secret (saved to the devices file); returns the secret."""
        registry = self._devices_registry()
        if self._shared_devices():
            self._may_change_devices(device_id)
            secret = registry.add(device_id)
            self._devices_saved_later(f"device {device_id} added")
            self._devices_changed(device_id, secret)
            return secret
        async with self._devices_lock:
            with trio.CancelScope(shield=True):
                secret = registry.add(device_id)
                try:
                    await self._save_devices_file(device_id)
                except BaseException:  # not saved: not made (nothing else changed meanwhile)
                    registry.remove(device_id)
                    raise
                log.info("device %s added", device_id)
                self._devices_changed(device_id, secret)
        return secret

    async def remove_device(self, device_id: str) -> bool:
        """Remove a device (from the devices file too); its session ends `revoked`."""
        registry = self._devices_registry()
        if self._shared_devices():
            self._may_change_devices(device_id)
            registry.remove(device_id)
            self._devices_saved_later(f"device {device_id} removed")
            self._devices_changed(device_id, None)
            self.forget_alarms(device_id)
            return self.revoke(device_id)
        async with self._devices_lock:
            with trio.CancelScope(shield=True):
                secret = registry[device_id] if device_id in registry else None
                registry.remove(device_id)
                try:
                    await self._save_devices_file(device_id)
                except BaseException:
                    registry.add(device_id, secret)
                    raise
                log.info("device %s removed", device_id)
                self._devices_changed(device_id, None)
                self.forget_alarms(device_id)
                return self.revoke(device_id)

    def forget_alarms(self, device_id: str) -> None:
        """A device that is gone takes its alarms along (not one that is only offline, or
        has a new secret)."""
        if self.alarms is not None:
            self.alarms.forget_device(device_id)

    async def rotate_device(self, device_id: str) -> str:
        """A new secret for a device (saved); its session, on the old one, ends `revoked`."""
        registry = self._devices_registry()
        if self._shared_devices():
            self._may_change_devices(device_id)
            secret = registry.rotate(device_id)
            self._devices_saved_later(f"device {device_id} has a new secret")
            self._devices_changed(device_id, secret)
            self.revoke(device_id)
            return secret
        async with self._devices_lock:
            with trio.CancelScope(shield=True):
                old = registry[device_id] if device_id in registry else None
                secret = registry.rotate(device_id)
                try:
                    await self._save_devices_file(device_id)
                except BaseException:
                    if old is not None:
                        registry.update({device_id: old})
                    raise
                log.info("device %s has a new secret", device_id)
                self._devices_changed(device_id, secret)
                self.revoke(device_id)
        return secret

    def _may_change_devices(self, device_id: str) -> None:
        if self.cluster is not None and self.cluster.shared_devices:
            self.cluster.check_credentials_backlog(device_id)

    def _devices_changed(self, device_id: str, secret: str | None) -> None:
        if self.cluster is None:
            return
        if self.cluster.shared_devices:
            self.cluster.credential_changed(device_id, secret)  # to Redis, then every node
        else:
            self.cluster.broadcast_devices_changed()  # the other nodes read the file again

    def _devices_saved_later(self, what: str) -> None:
        log.info("%s (shared devices: the devices file is saved in the background)", what)
        self.request_devices_cache_save()

    def request_devices_cache_save(self) -> None:
        """[cluster] shared_devices: save the devices file (this node's copy of Redis's) soon,
        in the background; requests while a save runs make one more save after it."""
        self._devices_cache_wanted = True
        self._devices_wake.set()

    def request_devices_reload(self, why: str) -> None:
        """Read the devices file again soon, in the background (another node changed it);
        requests while a reload runs make one more after it."""
        self._devices_reload_why.add(why)
        self._devices_wake.set()

    async def _devices_file_task(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        retry_at, backoff = math.inf, 1.0  # a cache save that failed is tried again then
        while True:
            with trio.move_on_at(retry_at):
                await self._devices_wake.wait()
            self._devices_wake = trio.Event()
            if trio.current_time() >= retry_at:
                self._devices_cache_wanted = True
            with self.boundary.guard("task", "devices file"):  # a bug here costs this round
                if self._devices_reload_why:
                    why = ", ".join(sorted(self._devices_reload_why))
                    self._devices_reload_why.clear()
                    for line in await self.reload_async(None):
                        log.info("%s changed the devices: %s", why, line)
                if self._devices_cache_wanted:
                    self._devices_cache_wanted = False
                    if await self.save_devices_cache(retry_in=backoff):
                        retry_at, backoff = math.inf, 1.0
                    else:
                        retry_at, backoff = trio.current_time() + backoff, min(backoff * 2, 60.0)

    async def save_devices_cache(self, *, retry_in: float | None = None) -> bool:
        """[cluster] shared_devices: keep the devices file as this node's copy of Redis's.
        Returns whether it was saved; a failure is logged (and tried again `retry_in`
        seconds later, by the background task, or sooner with the next change)."""
        try:
            async with self._devices_lock:
                await self._save_devices_file()
        except OSError as exc:
            if self.cluster is not None:
                self.cluster.counters["devices_cache_save_failures"] += 1
            log.error(
                "could not save the devices file %s: %s%s",
                self.devices_file,
                exc,
                "" if retry_in is None else f"; trying again in {retry_in:g}s",
            )
            return False
        return True

    def _emit(self, event: Event) -> None:
        for listener in self.listeners:
            try:
                listener.on_event(event)
            except Exception as exc:  # a listener's bug costs it this event, nothing more
                self.boundary.report("listener", exc, type(listener).__name__)

    def _alarm_changed(self, change: AlarmChange) -> None:
        a = change.alarm
        if change.change in ("raised", "cleared"):
            self._alarm_log.log(
                logging.WARNING if change.change == "raised" else logging.INFO,
                f"alarm_{change.change}",
                trio.current_time(),
                "alarm %s %s: %s %s on %s (%s %s, value %s)",
                a["id"],
                change.change,
                a["rule"],
                a["severity"],
                f"{a['device']}/{a['metric']}",
                a["condition"],
                a["threshold"],
                a["last_value"] if change.change == "cleared" else a["value"],
            )
        self.hub.on_alarm(change)

    def add_listener(self, listener: Listener) -> None:
        self.listeners.append(listener)  # shared with Ingest

    # -- operator actions ----------------------------------------------------------------------

    def config_for(self, device_id: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for rule in self.device_config:
            if rule.applies_to(device_id):
                merged.update(rule.config)
        return merged

    def push_config(
        self, match: str, config: Mapping[str, Any], *, forward: bool = True
    ) -> tuple[list[str], dict[str, str]]:
        """Send configuration to every online device whose id matches the glob `match`.

        The rule is also kept (replacing an earlier rule for the same glob), so devices that
        register later get it in their welcome. TCP devices get a `config` line; UDP-only
        devices a `config` command (retransmitted). Returns the ids of the online devices it
        went to, and those it could not go to with the reason (a full command queue, say).
        Raises ConfigPushError when the rule itself is refused.
        """
        size = len(dumps_bytes(config))
        if size > MAX_CONFIG_BYTES:
            raise ConfigPushError(
                "config_too_large",
                f"a configuration is at most {MAX_CONFIG_BYTES} bytes of JSON, not {size}",
            )
        rules = [r for r in self.device_config if r.match != match]
        if len(rules) >= self.config.max_config_rules:
            raise ConfigPushError(
                "too_many_rules",
                f"at most {self.config.max_config_rules} configuration rules: push to a glob that "
                "has one to replace it",
            )
        self.device_config = [*rules, DeviceConfigRule(match, dict(config))]
        if forward and self.cluster is not None:
            self.cluster.broadcast_config(match, dict(config))  # their devices, their rules
        sent: list[str] = []
        failed: dict[str, str] = {}
        for device_id, session in list(self.registry.online.items()):
            if not fnmatch.fnmatchcase(device_id, match):
                continue
            if session.outbox is not None:
                try:
                    session.outbox.send_nowait(control.Config(dict(config)))
                except (trio.WouldBlock, trio.ClosedResourceError):
                    self.control.errors["outbox_full"] += 1
                    log.warning("config for %s dropped: control channel full", device_id)
                    failed[device_id] = "control_channel_full"
                    continue
            else:
                try:
                    self.commands.submit(device_id, "config", dict(config))
                except CommandError as exc:
                    log.warning("config for %s not sent: %s", device_id, exc.message)
                    failed[device_id] = exc.code
                    continue
            sent.append(device_id)
        log.info(
            "config pushed to %d devices matching %r%s",
            len(sent),
            match,
            f" ({len(failed)} could not take it)" if failed else "",
        )
        return sent, failed

    def send_command(
        self,
        device_id: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        expires_in: float | None = None,
    ) -> CommandRecord:
        return self.commands.submit(device_id, name, args, timeout=timeout, expires_in=expires_in)

    def kick(self, device_id: str) -> bool:
        session = self.registry.online.get(device_id)
        if session is None:
            # on another node: it ends the session there (and tells everyone)
            return self.cluster is not None and self.cluster.forward_kick(device_id)
        self._goodbye_udp(session, "kicked")
        self.registry.end(session, "kicked")
        return True

    def _known_device(self, device_id: str) -> bool:
        """In the credentials file, or (on a cluster) known to another node."""
        return device_id in self.devices or (
            self.cluster is not None and device_id in self.cluster.remote
        )

    def supersede_local(self, session: Session) -> None:
        """The device registered again on another node: this node's session is the old one."""
        self._goodbye_udp(session, "superseded")
        self.registry.end(session, "superseded")

    def run_forwarded_command(self, doc: Mapping[str, Any]) -> None:
        """Another node asks this one to run a command (the device's session is here)."""
        assert self.cluster is not None
        try:
            self.commands.submit(
                doc["device"],
                doc["name"],
                doc.get("args") or {},
                timeout=doc.get("timeout"),
                expires_in=doc.get("expires_in"),
                command_id=doc["id"],
            )
        except CommandError as exc:
            self.cluster.publish_command_refused(dict(doc), exc.code, exc.message)

    def _goodbye_udp(self, session: Session, reason: str) -> None:
        if session.transport != "udp" or session.address is None:
            return
        data = seal_datagram(
            session.aead_out,
            DatagramType.GOODBYE,
            session.session_id,
            session.next_out_seq(),
            int(self.wall() * 1e6),
            encode_goodbye_payload(reason),
            direction=COLLECTOR_TO_DEVICE,
        )
        self.ingest.send_datagram(data, session.address)

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self) -> CollectorStatistics:
        devices = {}
        for device_id, d in self.registry.devices.items():
            s = d.session
            devices[device_id] = DeviceStatistics(
                device_id=device_id,
                online=s is not None,
                session_id=s.session_id if s else None,
                transport=s.transport if s else None,
                address=d.address,
                datagrams=d.datagrams,
                readings=d.readings,
                lost=d.lost,
                duplicates=d.duplicates,
                out_of_order=d.out_of_order,
                malformed=d.malformed,
                metrics_refused=d.metrics_refused,
                address_changes=d.address_changes,
                sessions=d.sessions,
                last_seen=d.last_seen,
                online_since=d.online_since,
                offline_since=d.offline_since,
                offline_reason=d.offline_reason,
                history=tuple(d.history),
            )
        ing = self.ingest
        return CollectorStatistics(
            uptime=(self.stopped_at or trio.current_time()) - self.started_at,
            devices=devices,
            devices_online=len(self.registry.online),
            datagrams_received=ing.received,
            datagrams_accepted=ing.accepted,
            readings=ing.readings,
            rejected=dict(ing.rejected),
            replies_sent=ing.replies_sent,
            send_errors=ing.send_errors,
            address_changes=ing.address_changes,
            sessions_opened=self.registry.opened,
            sessions_ended=dict(self.registry.ended_by_reason),
            tcp_connections_active=self.control.active,
            tcp_connections_total=self.control.accepted,
            control_errors=dict(self.control.errors),
            commands=dict(self.commands.by_state),
            command_retransmits=self.commands.retransmits,
            recording=self.recorder.statistics() if self.recorder is not None else None,
            gc=self.gc.statistics(),
        )


def recorder_config(config: Config) -> RecorderConfig:
    return RecorderConfig(
        directory=config.record_dir,
        flush_interval=config.record_flush_interval,
        buffer_bytes=int(config.record_buffer_mb * 2**20),
        segment_bytes=int(config.record_segment_mb * 2**20),
        segment_seconds=config.record_segment_minutes * 60,
        retain_seconds=config.record_retain_days * 86400 or None,
        retain_bytes=int(config.record_retain_gb * 2**30) or None,
        compress=config.record_compress,
        raw=config.record_raw,
        fsync=config.record_fsync,
    )
