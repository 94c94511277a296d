"""The `collector` command as a user runs it: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(*args, **kw):
    return subprocess.run(
        [PY, "-m", "collector", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 60),
        cwd=kw.pop("cwd", ROOT),
        **kw,
    )


def _commands():
    """Every subcommand, as the argv that reaches it."""
    from collector import cli

    out = [("serve",), ("demo",), ("devices", "add"), ("devices", "remove"), ("devices", "rotate"),
           ("devices", "list"), ("config", "check"), ("config", "example"), ("config", "docs")]  # fmt: skip
    out += [(name,) for name in cli.TOOLS]
    out += [("replay", mode) for mode in ("into", "serve", "raw")]
    out += [("bench", name) for name in cli.BENCH]
    return out


def test_help_for_every_command_and_every_option_has_help():
    import argparse

    from collector import cli

    for args in [(), ("devices",), ("config",), ("bench",), *_commands()]:
        out = run(*args, "--help")
        assert out.returncode == 0 and out.stdout.startswith("usage: collector"), (args, out.stderr)
    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, sp in action.choices.items():
                    walk(sp, f"{name} {sub}")
            elif action.help is None and not isinstance(action, argparse._HelpAction):
                missing.append((name, action.option_strings or action.dest))

    walk(cli.build_parser(), "collector")
    import importlib

    for table in (cli.TOOLS, cli.BENCH):
        for name, (module, _, _) in table.items():
            walk(importlib.import_module(module).build_parser(f"collector {name}"), name)
    assert not missing


#: a bad input for every subcommand: argv, exit status, what the one line must say
BAD_INPUT = [
    (("serve", "--devices", "nope.toml"), 2, "does not exist"),
    (("serve", "--devices", "x", "--tcp-port", "70000"), 2, "a port is a number from 0 to 65535"),
    (("serve", "--devices", "x", "--log-level", "LOUD"), 2, "one of DEBUG, INFO, WARNING, ERROR"),
    (("demo", "--sensors", "-1"), 2, "a whole number of 0 or more"),
    (("devices", "add", "bad id!", "--devices", "{tmp}/d.toml"), 2, "bad device id"),
    (("devices", "remove", "ghost", "--devices", "{tmp}/d.toml"), 2, "does not exist"),
    (("devices", "rotate", "x"), 2, "--devices FILE, --url URL"),
    (("devices", "list", "--url", "http://127.0.0.1:1/"), 3, "cannot reach"),
    (("config", "check", "{tmp}/missing.toml"), 2, "cannot read config"),
    (("config", "bogus"), 2, "invalid choice"),
    (("simulate", "--loss", "2"), 2, "a share from 0 to 1"),
    (
        ("replay", "into", "{tmp}", "--devices", "d.toml", "--speed", "fast"),
        2,
        "a speed is a factor above 0",
    ),
    (("replay", "into", "{tmp}", "--devices", "d.toml", "--from", "yesterday"), 2, "is not a time"),
    (("inspect", "{tmp}"), 2, "is not a recording"),
    (
        ("record-stream", "http://127.0.0.1:1/", "--out", "{tmp}/out"),
        3,
        "cannot reach the collector",
    ),
    (("watch", "http://127.0.0.1:1/"), 3, "needs a terminal"),
    (("stress", "--sensors", "x"), 2, "invalid int value"),
    (("soak", "--duration", "0"), 2, "a number above 0"),
    (("acceptance", "--duration", "10", "--hang", "2"), 2, "use --duration"),
    (("protocol-vectors", "extra"), 2, "unrecognized arguments"),
    (("bench", "ingest", "--sessions", "-3"), 2, "a whole number of 0 or more"),
    (("bench", "stream", "--rate", "x"), 2, "invalid"),
    (("bench", "recording", "--part", "all3"), 2, "invalid choice"),
    (("bench", "flood", "--phase", "x"), 2, "invalid"),
    (("bench", "workers", "--datagrams", "x"), 2, "a whole number"),
    (("bench", "outputs", "--rounds", "0"), 2, "a whole number of 1 or more"),
    (("bench", "devices", "--devices", "0"), 2, "a whole number of 1 or more"),
    (("serve", "--devices", "x", "--workers", "0"), 2, "workers must be at least 1"),
    (("serve", "--devices", "x", "--redis", "http://h/"), 2, "redis must be a redis://"),
]


@pytest.mark.parametrize(
    ("argv", "status", "says"), BAD_INPUT, ids=[" ".join(a[:2]) for a, _, _ in BAD_INPUT]
)
def test_bad_input_is_one_line_and_an_exit_status(tmp_path, argv, status, says):
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = run(*argv, stdin=subprocess.DEVNULL)
    assert out.returncode == status, (out.returncode, out.stderr)
    assert says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()  # record-stream made nothing when it could not connect


def test_every_subcommand_has_a_bad_input_case():
    covered = {
        a[0] if a[0] not in ("devices", "config", "bench") else " ".join(a[:2])
        for a, _, _ in BAD_INPUT
    }
    for args in _commands():
        name = args[0] if args[0] not in ("devices", "config", "bench") else " ".join(args[:2])
        if (args[0] == "replay" and len(args) > 1) or name in ("config example", "config docs"):
            continue  # replay's modes share its checks; example and docs take no input
        assert name in covered, name


def test_a_port_in_use_is_one_line_with_what_to_do(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for cmd in (
            ("serve", "--devices", str(_devices_file(tmp_path)), "--host", "127.0.0.1", "--tcp-port", str(port),
             "--udp-port", "0", "--http-port", "0"),
            ("demo", "--tcp-port", str(port), "--udp-port", "0", "--http-port", "0", "--no-record",
             "--data-dir", str(tmp_path / "demo")),
        ):  # fmt: skip
            out = run(*cmd)
            assert out.returncode == 3, out.stderr
            lines = [line for line in out.stderr.splitlines() if line.strip()]
            assert "Traceback" not in out.stderr and "ExceptionGroup" not in out.stderr
            assert any(
                "address already in use" in line.lower()
                and f"TCP port 127.0.0.1:{port}" in line  # which port, not only that one was taken
                and "--tcp-port" in line
                for line in lines
            )


def _devices_file(tmp_path):
    f = tmp_path / "devices.toml"
    if not f.exists():
        run("devices", "add", "dev-1", "--devices", str(f))
    return f


def test_jobs_that_did_not_do_what_was_asked_exit_non_zero(tmp_path):
    devices = tmp_path / "sim.toml"
    run("simulate", "--init-devices", devices, "--sensors", "1")
    # nobody listens on these ports: no sensor registers
    out = run("simulate", "--devices", str(devices), "--sensors", "1",
              "--tcp-port", str(_free_port()), "--udp-port", str(_free_port(socket.SOCK_DGRAM)),
              "--duration", "2", "--max-backoff", "0.2")  # fmt: skip
    assert out.returncode == 3 and "no sensor could register" in out.stderr
    # a piped summary cut short is not an error
    from collector.core.segments import SegmentWriter
    from collector.wire import recording as rec

    w = SegmentWriter(tmp_path / "rec")
    w.open(now=1.0)
    for i in range(50):
        w.write(rec.encode_readings_record(1.0 + i, f"d{i}", 1, 0, (("t", 1.0),)), now=1.0)
    w.release()
    shell = subprocess.run(
        f"{PY} -m collector inspect {tmp_path / 'rec'} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        shell.returncode == 0
        and "Traceback" not in shell.stderr
        and "BrokenPipe" not in shell.stderr
    )


def test_version():
    out = run("--version")
    assert out.returncode == 0 and "protocol 2" in out.stdout


def test_devices_add_prints_the_secret_once(tmp_path):
    f = tmp_path / "devices.toml"
    out = run("devices", "add", "temp-01", "--devices", str(f))
    assert out.returncode == 0
    secret = out.stdout.split("secret: ")[1].split()[0]
    assert secret in f.read_text()
    listed = run("devices", "list", "--devices", str(f))
    assert listed.stdout.split() == ["temp-01"] and secret not in listed.stdout
    dup = run("devices", "add", "temp-01", "--devices", str(f))
    assert dup.returncode == 2 and "already exists" in dup.stderr


def _free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(tmp_path, *extra, ports=None):
    f = tmp_path / "devices.toml"
    run("devices", "add", "dev-1", "--devices", str(f))
    tcp, udp, http = ports or (_free_port(), _free_port(socket.SOCK_DGRAM), _free_port())
    proc = subprocess.Popen(
        [PY, "-m", "collector", "serve", "--devices", str(f), "--host", "127.0.0.1", "--tcp-port", str(tcp), "--udp-port", str(udp), "--http-port", str(http), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", tcp), timeout=1) as s:
                assert b"challenge" in s.recv(4096)
                return proc, tcp
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(proc.communicate())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_shuts_down_gracefully_on_a_signal(tmp_path, sig):
    proc, tcp = _start_serve(tmp_path, "--stats-json", str(tmp_path / "stats.json"))
    held = socket.create_connection(("127.0.0.1", tcp))
    held.recv(4096)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    first, last = out.splitlines()[0], out.splitlines()[-1]
    assert first.startswith("dashboard: http://127.0.0.1:")
    assert (
        last.startswith("shutdown complete in")
        and "datagrams accepted 0, lost 0, rejected 0" in last
    )
    assert "shutting down gracefully" in err and "connection from 127.0.0.1" in err
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["tcp_connections_total"] >= 2 and stats["rejected"]["bad_tag"] == 0
    held.close()


def test_second_signal_exits_at_once(tmp_path):
    # A command the device takes 60 s to answer keeps a graceful shutdown busy for its whole
    # grace period (5 s); the second Ctrl-C must not wait for that.
    ports = (_free_port(), _free_port(socket.SOCK_DGRAM), _free_port())
    proc, _ = _start_serve(tmp_path, ports=ports)
    devices = tmp_path / "devices.toml"
    subprocess.run(
        [PY, "-m", "collector", "simulate", "--init-devices", str(devices), "--sensors", "1"],
        check=True,
        capture_output=True,
    )
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    proc, _ = _start_serve(tmp_path, ports=ports)  # again, now knowing sensor-001
    sim = subprocess.Popen(
        [PY, "-m", "collector", "simulate", "--devices", str(devices), "--sensors", "1",
         "--tcp-port", str(ports[0]), "--udp-port", str(ports[1]), "--duration", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{ports[2]}/api/devices/sensor-001"
        deadline = time.monotonic() + 20
        while not json.loads(urllib.request.urlopen(url).read())["online"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        req = urllib.request.Request(
            url + "/commands",
            data=json.dumps({"name": "sleep", "args": {"seconds": 60}}).encode(),
            method="POST",
        )
        cmd = json.loads(urllib.request.urlopen(req).read())
        while (
            json.loads(
                urllib.request.urlopen(
                    f"http://127.0.0.1:{ports[2]}/api/commands/{cmd['id']}"
                ).read()
            )["state"]
            != "sent"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # still in its grace period, waiting for the answer
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "SIGINT again: exiting at once" in err
        assert time.monotonic() - start < 2.0
    finally:
        sim.kill()
        sim.wait()
        if proc.poll() is None:
            proc.kill()


def test_json_logs(tmp_path):
    proc, _ = _start_serve(tmp_path, "--log-format", "json")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(r["message"].startswith("collector ready") for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


def test_bad_config_exits_with_a_message(tmp_path):
    (tmp_path / "c.toml").write_text("[nope]\n")
    (tmp_path / "d.toml").write_text("")
    out = run("serve", "--devices", str(tmp_path / "d.toml"), "--config", str(tmp_path / "c.toml"))
    assert out.returncode == 2 and "unknown section [nope]" in out.stderr


def test_demo_runs_and_accounts(tmp_path):
    out = subprocess.run(
        [PY, "-m", "collector", "demo", "--duration", "6", "--status-interval", "2", "--tcp-port", "0", "--udp-port", "0", "--http-port", "0",
         "--sensors", "10", "--loss", "0.05", "--data-dir", str(tmp_path), "--record", str(tmp_path / "rec")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "online 10/10" in out.stdout
    counted = int(out.stdout.split("collector counted ")[1].split()[0])
    expected = int(out.stdout.split("the simulator dropped ")[1].split()[0])
    assert counted == expected
    assert (tmp_path / "devices.toml").exists()
    assert "recorded" in out.stdout and list((tmp_path / "rec").glob("seg-*.rec"))
