"""`GET /metrics`: the collector's counters in the Prometheus text exposition format.

A prometheus_client custom collector reads `Collector.statistics()` and the hub's statistics at
scrape time, so nothing on the ingest path pays for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector as PromCollector

from collector.core.boundary import KINDS
from collector.core.events import SESSION_END_REASONS
from collector.core.ingest import REJECT_REASONS
from collector.servers.udp import kernel_drops

if TYPE_CHECKING:
    from collector.core.boundary import ErrorBoundary
    from collector.core.hub import StreamHub
    from collector.core.ingest import Ingest
    from collector.core.sessions import SessionRegistry
    from collector.core.statistics import CollectorStatistics
    from collector.devices import DeviceRegistry
    from collector.gcpolicy import GcPolicy

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HttpCounters(Protocol):
    """What /metrics reads of the HTTP server."""

    requests: Mapping[tuple[str, int], int]
    active: int
    handshakes: int
    refused: Mapping[str, int]
    timeouts: Mapping[str, int]


class MetricsHost(Protocol):
    """What /metrics reads of the collector (`collector.app.Collector` is one)."""

    boundary: ErrorBoundary
    devices: DeviceRegistry
    gc: GcPolicy
    http: HttpCounters | None
    hub: StreamHub
    ingest: Ingest
    registry: SessionRegistry

    def statistics(self) -> CollectorStatistics: ...


class CollectorMetrics(PromCollector):
    def __init__(self, app: MetricsHost) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        s = app.statistics()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"collector_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"collector_{name}", doc, value=value)

        yield gauge("uptime_seconds", "Seconds since the collector started.", s.uptime)
        yield gauge("devices_known", "Devices in the credentials file.", len(app.devices))
        yield gauge("devices_online", "Devices with a live session.", s.devices_online)
        yield counter("datagrams_received", "UDP datagrams received.", s.datagrams_received)
        yield counter(
            "datagrams_accepted", "Datagrams authenticated and accepted.", s.datagrams_accepted
        )
        rejected = CounterMetricFamily(
            "collector_datagrams_rejected", "Datagrams rejected, by reason.", labels=["reason"]
        )
        for reason in REJECT_REASONS:
            rejected.add_metric([reason], s.rejected.get(reason, 0))
        yield rejected
        yield counter("readings", "Readings accepted.", s.readings)
        yield counter(
            "hello_cookies_sent",
            "HELLOs answered with a COOKIE (no valid cookie yet): neither accepted nor rejected.",
            app.ingest.cookies_sent,
        )
        yield counter("replies_sent", "ACK/WELCOME/COMMAND/GOODBYE datagrams sent.", s.replies_sent)
        yield counter("send_errors", "Datagrams that could not be sent.", s.send_errors)
        sock = app.ingest.sock
        drops = kernel_drops(sock) if sock is not None else None
        if drops is not None:
            yield counter(
                "udp_kernel_drops",
                "Datagrams the kernel dropped before ingest read them (receive buffer full).",
                drops,
            )
        yield counter("address_changes", "Sessions that moved to a new address.", s.address_changes)
        yield counter("sessions_opened", "Sessions opened.", s.sessions_opened)
        ended = CounterMetricFamily(
            "collector_sessions_ended", "Sessions ended, by reason.", labels=["reason"]
        )
        for reason in SESSION_END_REASONS:
            ended.add_metric([reason], s.sessions_ended.get(reason, 0))
        yield ended
        yield gauge("tcp_connections", "Open control connections.", s.tcp_connections_active)
        yield counter(
            "tcp_connections_accepted", "Control connections accepted.", s.tcp_connections_total
        )
        errors = CounterMetricFamily(
            "collector_control_errors", "Control channel errors, by code.", labels=["code"]
        )
        for code, n in sorted(s.control_errors.items()):
            errors.add_metric([code], n)
        yield errors
        commands = CounterMetricFamily(
            "collector_command_transitions", "Commands entering each state.", labels=["state"]
        )
        for state in ("queued", "sent", "acked", "failed", "timed_out", "expired"):
            commands.add_metric([state], s.commands.get(state, 0))
        yield commands
        yield counter("command_retransmits", "COMMAND datagrams sent again.", s.command_retransmits)
        internal = CounterMetricFamily(
            "collector_internal_errors",
            "Exceptions contained by an error boundary, by kind of handler (each is a bug).",
            labels=["kind"],
        )
        for kind in KINDS:
            internal.add_metric([kind], app.boundary.counts.get(kind, 0))
        yield internal
        gcp = app.gc
        yield counter(
            "gc_full_collections",
            "Full garbage collections (they stop the loop).",
            gcp.full_collections,
        )
        yield counter(
            "gc_pause_seconds",
            "Seconds the full garbage collections took, in all.",
            gcp.pause_total,
        )
        yield gauge(
            "gc_pause_max_seconds", "The longest full garbage collection, seconds.", gcp.pause_max
        )
        yield counter(
            "gc_freezes",
            "Full collections longer than [server] gc_freeze_pause, after which what survived was frozen.",
            gcp.freezes,
        )
        yield gauge(
            "gc_frozen_objects", "Objects frozen (left out of collections) now.", gcp.frozen()
        )
        flapping = app.registry.flapping
        yield counter(
            "registrations_banned",
            "Devices banned for registering too often ([limits] flapping_max in flapping_window).",
            flapping.bans,
        )
        yield counter(
            "registrations_refused_banned",
            "Registrations refused because the device was banned.",
            flapping.refused,
        )
        yield gauge("devices_banned", "Devices banned right now.", flapping.banned)
        limiter = app.ingest.limiter
        yield gauge(
            "ratelimit_sources", "Source addresses tracked by the UDP rate limit.", len(limiter)
        )
        yield counter(
            "ratelimit_sources_evicted",
            "Sources forgotten because [ratelimit] max_sources was reached.",
            limiter.evicted,
        )

        per_device: dict[str, Any] = {
            "datagrams": ("Datagrams accepted from the device.", CounterMetricFamily),
            "readings": ("Readings accepted from the device.", CounterMetricFamily),
            "lost": ("Datagrams lost (sequence gaps never filled).", CounterMetricFamily),
            "duplicates": ("Duplicate or replayed datagrams rejected.", CounterMetricFamily),
            "out_of_order": ("Datagrams that arrived out of order.", CounterMetricFamily),
            "malformed": ("Authenticated datagrams with a bad payload.", CounterMetricFamily),
            "metrics_refused": (
                "Readings refused: the device already has [limits] max_metrics_per_device metric names.",
                CounterMetricFamily,
            ),
            "sessions": ("Sessions the device opened.", CounterMetricFamily),
        }
        families = {
            key: cls(f"collector_device_{key}", doc, labels=["device"])
            for key, (doc, cls) in per_device.items()
        }
        online = GaugeMetricFamily(
            "collector_device_online", "1 if the device is online.", labels=["device"]
        )
        seen = GaugeMetricFamily(
            "collector_device_last_seen_timestamp_seconds",
            "When the device last proved it was alive (Unix time).",
            labels=["device"],
        )
        for device_id, d in sorted(s.devices.items()):
            for key, family in families.items():
                family.add_metric([device_id], getattr(d, key))
            online.add_metric([device_id], 1 if d.online else 0)
            if d.last_seen is not None:
                seen.add_metric([device_id], d.last_seen)
        yield from families.values()
        yield online
        yield seen

        hub = app.hub.statistics() if app.hub is not None else None
        if hub is not None:
            yield gauge("stream_subscribers", "Connected stream subscribers.", hub["subscribers"])
            yield counter(
                "stream_connections", "Stream connections accepted.", hub["connections_total"]
            )
            yield counter("stream_messages_sent", "Stream messages sent.", hub["messages_sent"])
            yield counter(
                "stream_messages_direct",
                "Of the stream messages sent, those the hub wrote at once for an idle sender.",
                hub["messages_direct"],
            )
            yield counter(
                "stream_readings_sent", "Readings sent to subscribers.", hub["readings_sent"]
            )
            yield counter(
                "stream_missed",
                "Updates coalesced away for subscribers that fell behind.",
                hub["missed"],
            )
            yield counter(
                "stream_replies_dropped",
                "Pongs and errors dropped: a client sent more than [stream] max_replies unread.",
                hub["replies_dropped"],
            )
            yield counter(
                "metrics_refused",
                "Readings refused in all: their device already had max_metrics_per_device names.",
                hub["metrics_refused"],
            )
            closed = CounterMetricFamily(
                "collector_stream_closed",
                "Stream connections closed, by reason.",
                labels=["reason"],
            )
            for reason, n in sorted(hub["closed"].items()):
                closed.add_metric([reason], n)
            yield closed
            serrors = CounterMetricFamily(
                "collector_stream_errors",
                "Bad messages from stream clients, by code.",
                labels=["code"],
            )
            for code, n in sorted(hub["errors"].items()):
                serrors.add_metric([code], n)
            yield serrors
            queued = GaugeMetricFamily(
                "collector_stream_subscriber_queued",
                "Readings queued for a subscriber.",
                labels=["subscriber", "remote"],
            )
            missed = CounterMetricFamily(
                "collector_stream_subscriber_missed",
                "Updates a subscriber missed.",
                labels=["subscriber", "remote"],
            )
            for sub in hub["per_subscriber"]:
                queued.add_metric([str(sub["id"]), sub["remote"]], sub["queued"])
                missed.add_metric([str(sub["id"]), sub["remote"]], sub["missed"])
            yield queued
            yield missed
        if s.recording is not None:
            r = s.recording
            yield counter("recording_records", "Records written to the recording.", r["records"])
            yield counter("recording_bytes", "Bytes written to the recording.", r["bytes"])
            yield counter(
                "recording_dropped", "Records lost: buffer full or a failed write.", r["dropped"]
            )
            yield counter("recording_write_errors", "Failed recording writes.", r["write_errors"])
            yield counter("recording_flushes", "Batches written.", r["flushes"])
            yield counter("recording_segments_closed", "Segments rotated.", r["segments_closed"])
            yield gauge("recording_buffered", "Records waiting to be written.", r["buffered"])
        if app.http is not None:
            requests = CounterMetricFamily(
                "collector_http_requests",
                "HTTP requests, by route and status.",
                labels=["route", "status"],
            )
            for (route, status), n in sorted(app.http.requests.items()):
                requests.add_metric([route, str(status)], n)
            yield requests
            yield gauge("http_connections", "Open HTTP connections.", app.http.active)
            yield gauge(
                "stream_handshakes", "WebSocket handshakes in progress.", app.http.handshakes
            )
            refused = CounterMetricFamily(
                "collector_http_connections_refused",
                "HTTP connections refused at [http] max_connections (total) or max_connections_per_client.",
                labels=["limit"],
            )
            for limit in ("total", "per_client"):
                refused.add_metric([limit], app.http.refused.get(limit, 0))
            yield refused
            timeouts = CounterMetricFamily(
                "collector_http_timeouts",
                "HTTP connections closed by a deadline, by which ([http] *_timeout, [stream] handshake_timeout).",
                labels=["kind"],
            )
            for kind in ("header", "body", "send", "idle", "handshake", "tls_handshake"):
                timeouts.add_metric([kind], app.http.timeouts.get(kind, 0))
            yield timeouts
        cluster = getattr(app, "cluster", None)
        if cluster is not None:
            yield from cluster_metrics(cluster.status(), counter, gauge)
        alarms = getattr(app, "alarms", None)
        if alarms is not None:
            yield from alarm_metrics(alarms)
        outputs = getattr(app, "outputs", None)
        if outputs:
            yield from output_metrics([o.status() for o in outputs if o.cfg.type != "prometheus"])
            yield from reading_gauges([o for o in outputs if o.cfg.type == "prometheus"])


def alarm_metrics(engine: Any) -> Iterator[Metric]:
    """[alarms.NAME] (collector/core/alarms.py): what fired, what is on, what waits for a person."""
    active = GaugeMetricFamily(
        "collector_alarms_active", "Alarms active now, by rule.", labels=["rule", "severity"]
    )
    unacked = GaugeMetricFamily(
        "collector_alarms_unacknowledged",
        "Alarms listed and not acknowledged (active, or cleared since), by rule.",
        labels=["rule", "severity"],
    )
    raised = CounterMetricFamily(
        "collector_alarms_raised", "Times an alarm fired, by rule.", labels=["rule", "severity"]
    )
    for rule, n_active, n_unacked in engine.active_by_rule():
        labels = [rule.name, rule.severity]
        active.add_metric(labels, n_active)
        unacked.add_metric(labels, n_unacked)
        raised.add_metric(labels, engine.raised_total.get(rule.name, 0))
    yield active
    yield unacked
    yield raised
    yield CounterMetricFamily(
        "collector_alarms_acknowledged", "Alarms acknowledged.", value=engine.acknowledged_total
    )
    yield CounterMetricFamily(
        "collector_alarms_cleared", "Alarms whose condition ended.", value=engine.cleared_total
    )
    yield CounterMetricFamily(
        "collector_alarms_refused",
        "Alarms that did not fire because 10,000 were already listed.",
        value=engine.refused,
    )
    yield GaugeMetricFamily(
        "collector_alarms_watched",
        "(rule, device, metric) triples watched for no_data.",
        value=engine.watched,
    )
    yield CounterMetricFamily(
        "collector_alarms_unwatched",
        "Readings of (rule, device, metric) triples not watched for no_data: 100,000 already were.",
        value=engine.unwatched,
    )


def reading_gauges(outputs: list[Any]) -> Iterator[Metric]:
    """[outputs.NAME] type = "prometheus": the last value of each device's metrics."""
    if not outputs:
        return
    values = GaugeMetricFamily(
        "collector_reading",
        "The last value of a device's metric (a bool is 1 or 0), by output, device and metric.",
        labels=["output", "device", "metric"],
    )
    refused = CounterMetricFamily(
        "collector_reading_refused",
        "Readings a prometheus output left out: a new series beyond max_series, or text.",
        labels=["output", "reason"],
    )
    series = GaugeMetricFamily(
        "collector_reading_series", "Series a prometheus output holds.", labels=["output"]
    )
    for o in outputs:
        for (device, metric), (value, _t) in list(o.values.items()):
            values.add_metric([o.name, device, metric], value)
        for reason in ("max_series", "not_a_number"):
            refused.add_metric([o.name, reason], o.refused.get(reason, 0))
        series.add_metric([o.name], len(o.values))
    yield values
    yield refused
    yield series


def output_metrics(statuses: list[Mapping[str, Any]]) -> Iterator[Metric]:
    """[outputs.NAME] (collector/outputs): what each output sent, had confirmed, and owes."""
    if not statuses:
        return
    for key, doc in (
        ("sent", "Readings sent (a batch sent again counts again)."),
        ("acknowledged", "Readings the destination confirmed."),
        ("retries", "Batches sent again after an error, a timeout or a 5xx/429 answer."),
        ("rejected", "Readings in batches the destination refused as bad (4xx): skipped."),
        (
            "dropped",
            "Readings the output lost: its memory buffer was full, or retention forced out a segment it had not sent.",
        ),
        ("filtered", "Readings its device and metric globs left out."),
        ("restarts", "Times the output stopped on an error it did not expect and started again."),
    ):
        family = CounterMetricFamily(f"collector_output_{key}", doc, labels=["output"])
        for s in statuses:
            family.add_metric([s["name"]], s[key])
        yield family
    lag = GaugeMetricFamily(
        "collector_output_lag_seconds",
        "Receive time of the newest recorded reading minus that of the last one confirmed.",
        labels=["output"],
    )
    up = GaugeMetricFamily(
        "collector_output_up", "1 while the destination answers, 0 while retrying or failed.",
        labels=["output"],
    )  # fmt: skip
    buffered = GaugeMetricFamily(
        "collector_output_buffered",
        "Readings waiting in memory (outputs of a collector that does not record).",
        labels=["output"],
    )
    for s in statuses:
        if s["lag_seconds"] is not None:
            lag.add_metric([s["name"]], s["lag_seconds"])
        up.add_metric([s["name"]], 1 if s["state"] in ("sending", "starting") else 0)
        buffered.add_metric([s["name"]], s["buffered"])
    yield lag
    yield up
    yield buffered


def cluster_metrics(c: Mapping[str, Any], counter: Any, gauge: Any) -> Iterator[Metric]:
    """The cluster bus (collector/cluster/bus.py): Redis, the other nodes, what is owed."""
    info = GaugeMetricFamily(
        "collector_cluster_node_info", "This node's name on the cluster bus.", labels=["node"]
    )
    info.add_metric([c["node"]], 1)
    yield info
    yield gauge(
        "cluster_redis_up", "1 while Redis answers, 0 while it is down.", c["redis"] == "up"
    )
    nodes = GaugeMetricFamily(
        "collector_cluster_nodes",
        "Nodes on the bus, this one included, by state.",
        labels=["state"],
    )
    nodes.add_metric(["alive"], len(c["nodes"]))
    nodes.add_metric(["lost"], len(c["lost_nodes"]))
    yield nodes
    remote = GaugeMetricFamily(
        "collector_cluster_remote_devices",
        "Devices whose session is (or was last) on another node, by state.",
        labels=["state"],
    )
    remote.add_metric(["online"], c["remote_online"])
    remote.add_metric(["offline"], c["remote_devices"] - c["remote_online"])
    yield remote
    yield gauge("cluster_buffered", "Entries waiting for Redis ([cluster] buffer).", c["buffered"])
    for key, doc in (
        ("dropped", "Entries the full buffer dropped while Redis was away."),
        ("dropped_readings", "Readings in the entries the full buffer dropped."),
        ("published", "Entries written to Redis."),
        ("readings_published", "Readings written to Redis."),
        ("readings_received", "Readings of other nodes received."),
        ("events_received", "Entries of other nodes' event streams received."),
        ("nodes_lost", "Other nodes marked lost (no heartbeat within [cluster] node_timeout)."),
        ("devices_lost", "Devices of lost nodes marked offline (reason node_lost)."),
        ("redis_errors", "Redis commands that failed or timed out."),
        ("bad_entries", "Entries on the bus that could not be read."),
        ("publish_errors", "Entries Redis refused (lost): out of order, or an error reply."),
        ("duplicates_refused", "Entries sent again after a lost answer, already in Redis."),
        ("requests_duplicate", "Requests from other nodes received twice and run once."),
        ("credentials_written", "Changes to the shared devices this node wrote to Redis."),
        ("credentials_applied", "Changes to the shared devices this node took from Redis."),
        (
            "devices_cache_save_failures",
            "Saves of the devices file (the shared devices' local copy) that failed.",
        ),
    ):
        yield counter(f"cluster_{key}", doc, c.get(key, 0))


def make_registry(app: MetricsHost) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CollectorMetrics(app))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
