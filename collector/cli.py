"""The `collector` command: the collector itself, its devices and configuration, and every
tool (simulated sensors, replay, inspection, dashboards in a terminal, load tests,
benchmarks), each a subcommand with `--help`.

Exit statuses (the same for every subcommand; collector/tools/options.py): 0 it did what was
asked, 1 it ran but did not, 2 bad usage or input, 3 the environment (a port in use, a
permission, a collector that does not answer, no terminal), 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from collector._version import __version__
from collector.app import Addresses, Collector, ShutdownReport
from collector.cluster.redis_server import private_redis
from collector.cluster.workers import Supervisor, WorkerSpec, wait_for_parent_exit
from collector.config import (
    Config,
    ConfigError,
    config_from_mapping,
    load_config,
    render_markdown,
    render_toml,
)
from collector.core.statistics import statistics_to_json
from collector.devices import DeviceRegistry, DevicesError, check_device_id, generate_secret
from collector.logs import setup_logging
from collector.tools import options
from collector.wire.recording import RecordingError

log = logging.getLogger("collector")

#: subcommand -> (module with main(argv, prog), one line of help, the extra it needs)
TOOLS: dict[str, tuple[str, str, str | None]] = {
    "simulate": ("collector.tools.simulate", "run simulated sensors against a collector", None),
    "replay": ("collector.tools.replay", "replay a recording into a collector, or serve it to dashboards", "tools"),
    "inspect": ("collector.tools.inspect_recording", "summarise a recording, export its readings", None),
    "record-stream": ("collector.tools.record_stream", "record a running collector's live stream", None),
    "watch": ("collector.tools.watch", "a dashboard in the terminal", "tools"),
    "stress": ("collector.tools.stress", "step the load up until it breaks; plot the knee (with the bench extra)", None),
    "soak": ("collector.tools.soak", "run a real collector for a long time; check memory and descriptors", None),
    "acceptance": ("collector.tools.acceptance", "the end-to-end check of the core", None),
    "protocol-vectors": ("collector.tools.protocol_vectors", "print the test vectors of docs/PROTOCOL.md", None),
}  # fmt: skip
BENCH: dict[str, tuple[str, str, str | None]] = {
    "ingest": ("collector.tools.bench_ingest", "the datagram path against the raw ceiling, fan-out, Mosquitto", None),
    "stream": ("collector.tools.bench_stream", "sensor-to-dashboard latency, with a dashboard that never reads", None),
    "recording": ("collector.tools.bench_recording", "recording read speed and replay timing", None),
    "flood": ("collector.tools.bench_flood", "real devices during a HELLO flood; refused handshakes", None),
    "workers": ("collector.tools.bench_workers", "UDP drain rate of one process against --workers N", None),
    "outputs": ("collector.tools.bench_outputs", "what each output sustains with its database or broker, and its CPU", None),
    "devices": ("collector.tools.bench_devices", "the devices file at fleet size: read, and a change saved while the loop runs", None),
}  # fmt: skip
#: which module an extra's tools need, to say so before a traceback does
_EXTRA_MODULES = {"tools": ("textual", "websockets", "rich"), "bench": ("matplotlib",)}


def _watch_hint(url: str) -> str:
    """How to run the terminal dashboard from here: the `collector` script of this environment."""
    script = Path(sys.executable).parent / "collector"
    try:
        command = str(script.relative_to(Path.cwd())) if script.exists() else "collector"
    except ValueError:
        command = str(script)
    hint = f"{command} watch {url}"
    if importlib.util.find_spec("textual") is None:
        hint += ", after: python3 run.py shell (the tools extra)"
    return hint


def _run_tool(spec: tuple[str, str, str | None], argv: list[str], prog: str) -> int:
    module_name, _, extra = spec
    if extra is not None and "-h" not in argv and "--help" not in argv:
        for name in _EXTRA_MODULES[extra]:
            if importlib.util.find_spec(name) is None:
                print(
                    f"{prog}: needs the '{extra}' extra ({name} is not installed): "
                    f"pip install 'trio-collector[{extra}]'",
                    file=sys.stderr,
                )
                return options.EXIT_USAGE
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(
            f"{prog}: needs {exc.name}, which is not installed: pip install 'trio-collector[{extra or 'tools'}]'",
            file=sys.stderr,
        )
        return options.EXIT_USAGE
    return int(module.main(argv, prog=prog) or 0)


def _server_args(p: argparse.ArgumentParser, *, demo: bool) -> None:
    p.add_argument("--host", help="address to bind (default 0.0.0.0; the demo: 127.0.0.1)")
    p.add_argument(
        "--tcp-port",
        type=options.port,
        help="TCP control channel port (default 8080; 0 = any free)",
    )
    p.add_argument(
        "--udp-port", type=options.port, help="UDP datagram port (default 8081; 0 = any free)"
    )
    p.add_argument(
        "--http-port",
        type=options.port,
        help="dashboard, API and metrics port (default 8082; 0 = any free)",
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="configuration file (docs/CONFIGURATION.md; `collector config example` writes one)",
    )
    p.add_argument(
        "--log-level", type=options.log_level, help="DEBUG, INFO (default), WARNING or ERROR"
    )
    p.add_argument(
        "--log-format", choices=["text", "json"], help="log lines as text (default) or JSON objects"
    )
    p.add_argument(
        "--stats-json", metavar="FILE", help="write the final statistics to FILE on exit"
    )
    p.add_argument(
        "--record",
        metavar="DIR",
        help="record readings and session events to DIR (docs/RECORDING.md)"
        + ("; the demo records to ./recordings unless --no-record" if demo else ""),
    )
    if demo:
        p.add_argument("--no-record", action="store_true", help="do not record")
    else:
        p.add_argument(
            "--workers",
            type=options.count,
            help="collector processes sharing the ports, one per core (default 1; [cluster] "
            "workers; docs/SCALING.md)",
        )
        p.add_argument(
            "--node", help="this node's name on the cluster bus (default: the host name)"
        )
        p.add_argument(
            "--redis",
            metavar="URL",
            help="the cluster bus, redis://HOST:PORT ([cluster] redis); with --workers and no "
            "bus, a private redis-server is started for the workers",
        )
        p.add_argument("--worker-spec", help=argparse.SUPPRESS)
        p.add_argument(
            "--devices",
            metavar="FILE",
            required=True,
            help="device credentials (collector devices add); read again on SIGHUP",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collector",
        description="A telemetry collector for IoT sensors: encrypted UDP datagrams, TCP or UDP "
        "registration, one session per device; dashboards, recordings and the tools around them.",
        epilog="Every command has --help. Exit status: 0 done, 1 ran but did not do what was "
        "asked, 2 bad usage or input, 3 the environment (port in use, permission, unreachable), "
        "130 interrupted.",
    )
    parser.add_argument(
        "--version", action="version", version=f"trio-collector {__version__} (protocol 2)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the collector",
        description="Run the collector until SIGINT/SIGTERM (SIGHUP reloads the devices file, the live parts of the config and the TLS certificate).",
    )
    _server_args(serve, demo=False)

    demo = sub.add_parser(
        "demo",
        help="run the collector with simulated sensors",
        description="Run a collector and N simulated sensors (generated credentials) in one "
        "process, printing where to watch them and a status line until Ctrl-C.",
    )
    _server_args(demo, demo=True)
    demo.add_argument(
        "--sensors", type=options.count, default=20, help="simulated sensors (default 20)"
    )
    demo.add_argument(
        "--rate",
        type=options.positive,
        default=1.0,
        help="readings datagrams/s per sensor (default 1)",
    )
    demo.add_argument(
        "--loss",
        type=options.share,
        default=0.02,
        help="share of datagrams dropped on purpose (default 0.02)",
    )
    demo.add_argument(
        "--udp-only",
        type=options.share,
        default=0.1,
        help="share of sensors registering with HELLO datagrams (default 0.1)",
    )
    demo.add_argument(
        "--duration",
        type=options.positive,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    demo.add_argument(
        "--status-interval",
        type=options.positive,
        default=5.0,
        help="seconds between status lines (default 5)",
    )
    demo.add_argument(
        "--data-dir",
        default="demo-data",
        help="where the demo writes its devices file (default demo-data)",
    )

    devices = sub.add_parser(
        "devices",
        help="add, remove, rotate and list device credentials",
        description="Manage the devices file. With --url, change a running collector through its "
        "API (it saves its devices file itself); without, edit the file (a running collector "
        "takes it on SIGHUP: systemctl reload, or kill -HUP). Comments in the file are kept. "
        "With --redis, change the devices a cluster shares on Redis ([cluster] shared_devices, "
        "docs/SCALING.md): every node takes the change at once.",
    )
    dsub = devices.add_subparsers(dest="devices_command", required=True, metavar="ACTION")

    def target(q: argparse.ArgumentParser) -> None:
        q.add_argument("--devices", metavar="FILE", help="the devices file to edit")
        q.add_argument(
            "--url",
            metavar="URL",
            help="a running collector's HTTP address (http://HOST:8082/) to change instead",
        )
        q.add_argument(
            "--token",
            default=os.environ.get("COLLECTOR_TOKEN"),
            help="a command token for --url (default $COLLECTOR_TOKEN)",
        )
        q.add_argument("--ca", metavar="FILE", help="verify an https:// --url with this CA bundle")
        q.add_argument(
            "--redis",
            metavar="URL",
            help="change the devices shared on a cluster's Redis instead ([cluster] "
            "shared_devices): every node takes the change at once",
        )
        q.add_argument(
            "--prefix",
            default="collector",
            help="the cluster's [cluster] prefix (default collector)",
        )

    for name, text in (
        ("add", "create a device with a generated secret (printed once)"),
        ("remove", "remove a device; a running collector ends its session (revoked)"),
        (
            "rotate",
            "give a device a new secret (printed once); its session on the old one ends (revoked)",
        ),
    ):
        q = dsub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        q.add_argument(
            "device_id", metavar="ID", help="the device id (1-64 of A-Z a-z 0-9 _ . : -)"
        )
        target(q)
    q = dsub.add_parser(
        "list",
        help="list device ids (never the secrets)",
        description="List the device ids (never the secrets).",
    )
    target(q)

    config = sub.add_parser("config", help="check a config file, or print the example and the docs")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = csub.add_parser(
        "check",
        help="validate FILE and print the configuration it gives",
        description="Validate a config file and print the effective configuration (every key, defaults included) as TOML.",
    )
    check.add_argument("file", metavar="FILE", help="a config file")
    csub.add_parser("example", help="print an example config file with every key and its default")
    csub.add_parser("docs", help="print docs/CONFIGURATION.md")

    for name, (_, text, _extra) in TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)
    bench = sub.add_parser(
        "bench",
        help="benchmarks: " + ", ".join(BENCH),
        description="Benchmarks; each prints figures paired against a reference measured in the same run.",
    )
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name, (_, text, _extra) in BENCH.items():
        bsub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return _run_tool(TOOLS[argv[0]], argv[1:], f"collector {argv[0]}")
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCH:
        return _run_tool(BENCH[argv[1]], argv[2:], f"collector bench {argv[1]}")
    args = build_parser().parse_args(argv)
    args.raw_argv = argv
    prog = f"collector {args.command}"
    handlers = {"devices": _devices, "serve": _serve, "demo": _demo, "config": _config}
    return options.run_main(prog, lambda: _with_user_errors(handlers[args.command], args))


def _with_user_errors(
    handler: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    try:
        return handler(args)
    except (ConfigError, DevicesError, RecordingError) as exc:
        raise options.UserError(str(exc)) from None


# -- devices ---------------------------------------------------------------------------------


def _devices(args: argparse.Namespace) -> int:
    action = args.devices_command
    if sum(bool(x) for x in (args.devices, args.url, args.redis)) > 1:
        raise options.UserError("say one of --devices, --url and --redis")
    if args.url:
        return _devices_api(args, action)
    if args.redis:
        return trio.run(_devices_redis, args, action)
    if not args.devices:
        raise options.UserError(
            "say which devices: --devices FILE, --url URL of a running collector, or --redis "
            "URL of a cluster with shared devices"
        )
    if action == "list":
        for device_id in DeviceRegistry.load(args.devices):
            print(device_id)
        return 0
    registry = (
        DeviceRegistry.load_or_empty(args.devices)
        if action == "add"
        else DeviceRegistry.load(args.devices)
    )
    if action == "add":
        secret = registry.add(args.device_id)
    elif action == "rotate":
        secret = registry.rotate(args.device_id)
    else:
        registry.remove(args.device_id)
        secret = None
    try:  # only this change, on top of what the file holds by now (a collector may save too)
        registry.save(args.devices, changes={args.device_id: secret})
    except OSError as exc:
        raise options.UserError(f"could not save {args.devices}: {exc}") from None
    verb = {"add": "added device", "remove": "removed device", "rotate": "new secret for device"}[
        action
    ]
    print(f"{verb} {args.device_id} in {args.devices}")
    if secret is not None:
        print(f"secret: {secret}")
        print("(shown once; the device proves it knows it, it never sends it)")
    print(
        "a running collector takes the change on SIGHUP (systemctl reload trio-collector, or kill -HUP PID)"
    )
    return 0


async def _devices_redis(args: argparse.Namespace, action: str) -> int:
    from coredis.retry import NoRetryPolicy

    from collector.cluster import credentials
    from collector.cluster.connect import redis_client

    keys = credentials.Keys(args.prefix)
    where = f"the shared devices on {args.redis}"
    try:
        with trio.fail_after(10):
            async with redis_client(
                args.redis, decode_responses=False, connect_timeout=5, retry_policy=NoRetryPolicy()
            ) as c:
                if await credentials.seeded_by(c, keys) is None:
                    raise options.UserError(
                        f"no node with [cluster] shared_devices has joined {args.redis} "
                        f"(prefix {args.prefix!r}) yet: the first one seeds the shared devices "
                        "with its devices file; until then, change that file (--devices)"
                    )
                if action == "list":
                    found, problems = await credentials.read_all(c, keys)
                    for device_id in sorted(found):
                        print(device_id)
                    for problem in problems:
                        print(f"skipped: {problem}", file=sys.stderr)
                    return 0
                check_device_id(args.device_id)
                exists = await c.hexists(keys.hash, args.device_id)
                if action == "add" and exists:
                    raise DevicesError(f"device {args.device_id!r} already exists", "exists")
                if action != "add" and not exists:
                    raise DevicesError(f"no device {args.device_id!r}", "unknown_device")
                secret = None if action == "remove" else generate_secret()
                await credentials.write(c, keys, {args.device_id: secret}, "cli")
    except (OSError, trio.TooSlowError) as exc:
        raise options.UserError(
            f"cannot reach {args.redis}: {exc or 'no answer within 10 s'}",
            options.EXIT_ENVIRONMENT,
        ) from None
    except Exception as exc:
        if type(exc).__module__.startswith("coredis"):
            raise options.UserError(f"{args.redis}: {exc}", options.EXIT_ENVIRONMENT) from None
        raise
    verb = {"add": "added device", "remove": "removed device", "rotate": "new secret for device"}
    print(f"{verb[action]} {args.device_id} in {where}")
    if secret is not None:
        print(f"secret: {secret}")
        print("(shown once; the device proves it knows it, it never sends it)")
    print("every node takes the change now; a session on an old secret ends (revoked)")
    return 0


def _devices_api(args: argparse.Namespace, action: str) -> int:
    base = args.url.rstrip("/")
    if "://" not in base:
        base = "http://" + base
    method, path, body = {
        "list": ("GET", "/api/devices", None),
        "add": ("POST", "/api/devices", {"id": getattr(args, "device_id", None)}),
        "remove": ("DELETE", f"/api/devices/{getattr(args, 'device_id', '')}", None),
        "rotate": ("POST", f"/api/devices/{getattr(args, 'device_id', '')}/rotate", None),
    }[action]
    req = urllib.request.Request(
        base + path, method=method, data=None if body is None else json.dumps(body).encode()
    )
    req.add_header("content-type", "application/json")
    if args.token:
        req.add_header("authorization", f"Bearer {args.token}")
    context = None
    if args.ca or base.startswith("https"):
        from collector.servers.tls import client_context

        context = client_context(args.ca)
    try:
        # A change is saved before it is answered: at 100,000 devices that is seconds, and
        # changes are saved one at a time.
        with urllib.request.urlopen(req, timeout=120, context=context) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        raise options.UserError(f"{base}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise options.UserError(
            f"cannot reach {base}: {reason}", options.EXIT_ENVIRONMENT
        ) from None
    if action == "list":
        for d in answer["devices"]:
            print(d["id"])
        return 0
    device = answer["id"]
    print(
        {"add": "added device", "remove": "removed device", "rotate": "new secret for device"}[
            action
        ],
        device,
        "on",
        base,
    )
    if "secret" in answer:
        print(f"secret: {answer['secret']}")
        print("(shown once; the device proves it knows it, it never sends it)")
    if answer.get("session_ended"):
        print("its session ended (revoked)")
    return 0


# -- config ---------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> int:
    if args.config_command == "example":
        sys.stdout.write(render_toml())
    elif args.config_command == "docs":
        sys.stdout.write(render_markdown())
    else:
        config = load_config(args.file)
        sys.stdout.write(render_toml(config, example=False))
        print(f"# {args.file}: valid", file=sys.stderr)
    return 0


# -- serve and demo ------------------------------------------------------------------------------


def _config_from_args(args: argparse.Namespace, **defaults: Any) -> Config:
    overrides = {
        "host": args.host,
        "tcp_port": args.tcp_port,
        "udp_port": args.udp_port,
        "http_port": args.http_port,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "record_dir": args.record,
        "workers": getattr(args, "workers", None),
        "node": getattr(args, "node", None),
        "redis": getattr(args, "redis", None),
    }
    for key, value in defaults.items():
        if overrides.get(key) is None:
            overrides[key] = value
    return load_config(args.config, **overrides)


def _serve(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    if args.worker_spec:
        return _serve_worker(args, config, WorkerSpec.from_json(args.worker_spec))
    setup_logging(config.log_level, config.log_format)
    devices = DeviceRegistry.load(args.devices)
    if not devices:
        log.warning("%s lists no devices: nobody can register", args.devices)
    if config.workers > 1:
        return _serve_workers(args, config)
    collector = Collector(config, devices, devices_file=args.devices)
    collector.config_loader = lambda: _config_from_args(args)
    report = trio.run(run_until_signalled, collector)
    _write_stats(collector, args.stats_json)
    print(report.summary(), flush=True)
    return 0


def _serve_worker(args: argparse.Namespace, config: Config, spec: WorkerSpec) -> int:
    """One of `serve --workers N`'s processes (started by the parent, never by a person)."""
    config = _worker_config(config, spec)
    setup_logging(config.log_level, config.log_format, node=spec.node)
    devices = DeviceRegistry.load(args.devices)
    collector = Collector(config, devices, devices_file=args.devices, worker=spec)
    collector.config_loader = lambda: _worker_config(_config_from_args(args), spec)

    async def ready(addresses: Addresses, nursery: trio.Nursery) -> None:
        os.write(spec.ready_fd, b"ready\n")
        os.close(spec.ready_fd)
        if spec.lifeline_fd < 0:
            await trio.sleep_forever()
        await wait_for_parent_exit(spec.lifeline_fd)
        log.warning("the parent process is gone: shutting down")
        os.kill(os.getpid(), signal.SIGTERM)  # the graceful shutdown, as if asked
        await trio.sleep_forever()

    report = trio.run(functools.partial(run_until_signalled, collector, ready, quiet=True))
    _write_stats(collector, spec.stats)
    Path(spec.report).write_text(json.dumps(attrs.asdict(report)))
    log.info("%s", report.summary())
    return 0


def _worker_config(config: Config, spec: WorkerSpec) -> Config:
    """A worker's configuration: its node name and bus, and its own recording directory
    (DIR/NODE: a segment file has one writer)."""
    record_dir = str(Path(config.record_dir) / spec.node) if config.record_dir else ""
    return attrs.evolve(config, node=spec.node, redis=spec.redis, record_dir=record_dir)


def _serve_workers(args: argparse.Namespace, config: Config) -> int:
    """The parent of `serve --workers N`: binds the ports, runs and watches the workers."""
    node = config.node or socket.gethostname().split(".")[0] or "node"
    node = re.sub(r"[^A-Za-z0-9_.-]", "-", node)[:40]
    argv = [a for a in args.raw_argv if a != "serve"]
    return trio.run(_supervise, config, argv, node, args.stats_json)


async def _supervise(config: Config, argv: list[str], node: str, stats_json: str | None) -> int:
    async with private_redis(config) as redis:
        sup = Supervisor(
            config, config.workers, argv, node=node, redis=redis, stats_json=stats_json
        )
        sup.bind()
        try:
            return await _run_supervisor(sup)
        finally:
            sup.close()


async def _run_supervisor(sup: Supervisor) -> int:
    start = trio.current_time()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(sup.run)
            if addresses is not None:
                log.info(
                    "collector ready: %d workers on TCP %s, UDP %s, HTTP %s",
                    sup.count,
                    _fmt(addresses["tcp"]),
                    _fmt(addresses["udp"]),
                    _fmt(addresses["http"]),
                )
                shown = Addresses(None, None, addresses["http"], bool(sup.config.tls_cert))
                if shown.dashboard_url:
                    print(f"dashboard: {shown.dashboard_url}", flush=True)

            async def watch_signals() -> None:
                count = 0
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: passed on to every worker")
                        sup.signal_all(signal.SIGHUP)
                        continue
                    count += 1
                    if count == 1:
                        log.info("%s: shutting down every worker (again to kill them)", name)
                        sup.stop()
                    else:
                        print(f"{name} again: killing the workers", file=sys.stderr, flush=True)
                        sup.kill()

            nursery.start_soon(watch_signals)
            await sup.all_stopped.wait()
            nursery.cancel_scope.cancel()
    sup.merge_stats()
    print(sup.summary(trio.current_time() - start), flush=True)
    if sup.failure:
        raise options.UserError(sup.failure, 1)
    return 0


async def run_until_signalled(
    collector: Collector,
    extra: Callable[[Addresses, trio.Nursery], Awaitable[None]] | None = None,
    *,
    quiet: bool = False,
) -> ShutdownReport:
    """Serve until SIGINT/SIGTERM, then shut down gracefully; a second signal exits at once."""
    report: ShutdownReport | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(collector.serve)
            log.info(
                "collector ready: TCP %s, UDP %s, HTTP %s (%d known device%s)",
                _fmt(addresses.tcp),
                _fmt(addresses.udp),
                _fmt(addresses.http),
                len(collector.devices),
                "" if len(collector.devices) == 1 else "s",
            )
            if addresses.dashboard_url and not quiet:
                print(f"dashboard: {addresses.dashboard_url}", flush=True)

            async def shut_down() -> None:
                nonlocal report
                report = await collector.shutdown()
                nursery.cancel_scope.cancel()

            async def reload() -> None:
                # Beside the signal loop, not in it: a large devices file takes seconds to
                # read, and a SIGTERM meanwhile is answered at once. Reloads queue on the
                # collector's devices lock.
                new_config = None
                loader = getattr(collector, "config_loader", None)
                if loader is not None:
                    try:
                        new_config = loader()
                    except ConfigError as exc:
                        log.error(
                            "SIGHUP: the config file is not valid, keeping the current one: %s",
                            exc,
                        )
                changed = await collector.reload_async(new_config)
                log.info(
                    "SIGHUP: reloaded %s",
                    ", ".join(changed) if changed else "nothing that changed",
                )

            async def watch_signals() -> None:
                count = 0
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        nursery.start_soon(reload)
                        continue
                    count += 1
                    if count == 1:
                        log.info(
                            "%s: shutting down gracefully%s",
                            name,
                            "" if quiet else " (again to exit at once)",
                        )
                        nursery.start_soon(shut_down)
                    elif quiet:  # a worker: its parent decides when to kill it
                        log.info("%s again: still shutting down", name)
                    else:
                        print(f"{name} again: exiting at once", file=sys.stderr, flush=True)
                        os._exit(130)

            nursery.start_soon(watch_signals)
            if extra is not None:

                async def run_extra() -> None:
                    await extra(addresses, nursery)
                    nursery.start_soon(shut_down)

                nursery.start_soon(run_extra)
    assert report is not None
    return report


def _write_stats(collector: Collector, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(statistics_to_json(collector.statistics()), indent=1))


def _fmt(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "off"


#: The demo's alarm rules, units and declared commands when it is given no --config: the
#: simulated sensors' temperatures swing 3 degrees around 18-24, so "warm" fires and clears.
DEMO = config_from_mapping(
    {
        "alarms": {
            "warm": {"metric": "temperature", "above": 25.0, "hysteresis": 0.3,
                     "description": "warmer than 25 °C"},
            "battery-low": {"metric": "battery", "below": 20.0, "severity": "critical"},
            "silent": {"metric": "temperature", "no_data": 30.0,
                       "description": "no temperature for 30 s"},
        },
        "metrics": {
            "temperature": {"unit": "°C", "description": "air temperature"},
            "humidity": {"unit": "%", "description": "relative humidity"},
            "battery": {"unit": "%", "description": "battery charge"},
        },
        "device_commands": {
            "ping": {"description": "answers pong"},
            "set_rate": {"description": "readings per second", "args": {"rate": "number"},
                         "required": ["rate"]},
            "sleep": {"description": "answers after some seconds", "args": {"seconds": "number"}},
        },
    }
)  # fmt: skip


def _demo(args: argparse.Namespace) -> int:
    from collector.device.sim import SimConfig, Simulator

    config = _config_from_args(
        args, host="127.0.0.1", record_dir=None if args.no_record else "recordings"
    )
    if args.config is None:  # what the simulated sensors send, and what they answer
        config = attrs.evolve(
            config,
            alarms=DEMO.alarms,
            metrics_meta=DEMO.metrics_meta,
            declared_commands=DEMO.declared_commands,
        )
    setup_logging(config.log_level if args.log_level else "WARNING", config.log_format)
    sim_cfg = SimConfig(
        devices=args.sensors, rate=args.rate, loss=args.loss, udp_only=args.udp_only,
        duplicate=0.005, reorder=0.01, jitter=0.1,
    )  # fmt: skip
    registry = DeviceRegistry({d: generate_secret() for d in sim_cfg.device_ids()})
    devices_file = Path(args.data_dir) / "devices.toml"
    registry.save(devices_file)
    collector = Collector(config, registry)
    holder: dict[str, Simulator] = {}

    async def run_demo(addresses: Addresses, nursery: trio.Nursery) -> None:
        host = addresses.tcp[0] if addresses.tcp[0] not in ("0.0.0.0", "::") else "127.0.0.1"
        sim = holder["sim"] = Simulator(
            sim_cfg, registry, host=host, tcp_port=addresses.tcp[1], udp_port=addresses.udp[1]
        )
        print(
            f"demo: collector on TCP {_fmt(addresses.tcp)} and UDP {_fmt(addresses.udp)}, "
            f"{sim_cfg.devices} simulated sensors (credentials in {devices_file})\n"
            f"demo: open {addresses.dashboard_url} to watch them live "
            f"(or in a terminal: {_watch_hint(addresses.dashboard_url)}); Ctrl-C stops",
            flush=True,
        )
        async with trio.open_nursery() as inner:
            inner.start_soon(_status_lines, collector, args.status_interval)
            await sim.run(args.duration)
            inner.cancel_scope.cancel()

    report = trio.run(run_until_signalled, collector, run_demo)
    _write_stats(collector, args.stats_json)
    sim = holder.get("sim")
    if sim is not None:
        sim.stop()
        print(sim.summary())
        stats = collector.statistics()
        counted = sum(d.lost for d in stats.devices.values())
        print(
            f"collector counted {counted} lost datagrams; the simulator dropped "
            f"{sim.totals()['expected_lost']} that it could detect"
        )
    print(report.summary(), flush=True)
    return 0


async def _status_lines(collector: Collector, interval: float) -> None:
    last = 0
    while True:
        await trio.sleep(interval)
        s = collector.statistics()
        lost = sum(d.lost for d in s.devices.values())
        rate = (s.datagrams_accepted - last) / interval
        last = s.datagrams_accepted
        print(
            f"[{s.uptime:6.0f}s] online {s.devices_online}/{len(collector.devices)}  "
            f"datagrams {s.datagrams_accepted} (+{rate:.0f}/s)  readings {s.readings}  "
            f"lost {lost}  duplicates {sum(d.duplicates for d in s.devices.values())}  "
            f"rejected {s.rejected_total}  sessions {s.sessions_opened}",
            flush=True,
        )
