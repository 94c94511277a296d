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
        [PY, "-m", "collector", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=kw.pop("cwd", ROOT),
        **kw,
    )


def test_help_for_every_command():
    for args in [(), ("serve",), ("devices",), ("devices", "add"), ("demo",)]:
        out = run(*args, "--help")
        assert out.returncode == 0 and "usage: collector" in out.stdout, args
    for tool in sorted(t for t in (ROOT / "tools").glob("*.py") if not t.name.startswith("_")):
        out = subprocess.run([PY, str(tool), "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout, tool.name


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
        [PY, str(ROOT / "tools" / "simulate.py"), "--init-devices", str(devices), "--sensors", "1"],
        check=True,
        capture_output=True,
    )
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    proc, _ = _start_serve(tmp_path, ports=ports)  # again, now knowing sensor-001
    sim = subprocess.Popen(
        [PY, str(ROOT / "tools" / "simulate.py"), "--devices", str(devices), "--sensors", "1",
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
