"""Changes while running: devices added, removed and rotated through the API or the file (and
SIGHUP), the live parts of the config reloaded, and no session of an allowed device dropped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from collector.config import load_config
from collector.core.events import DeviceOffline
from collector.device.client import RegistrationError, open_device
from collector.devices import DeviceRegistry

from .helpers import SECRETS, api, start_collector

ROOT = Path(__file__).resolve().parent.parent


async def start(nursery, tmp_path, **kw):
    path = tmp_path / "devices.toml"
    path.write_text(
        "# the fleet, kept by hand\n"
        + "".join(f'[devices."{d}"]\nsecret = "{s}"  # {d}\n\n' for d, s in SECRETS.items())
    )
    registry = DeviceRegistry.load(path)
    collector, log = await start_collector(nursery, devices=registry, http_port=0, **kw)
    collector.devices_file = path
    return collector, log, path


async def registers(collector, device_id, secret) -> bool:
    try:
        async with open_device("127.0.0.1", device_id, secret, tcp_port=collector.tcp_address[1]):
            return True
    except RegistrationError:
        return False


async def test_devices_added_removed_and_rotated_through_the_api(nursery, autojump_clock, tmp_path):
    collector, log, path = await start(nursery, tmp_path)
    status, body = await api(collector, "POST", "/api/devices", {"id": "new-1"})
    assert status == 201 and body["id"] == "new-1"
    secret = body["secret"]
    assert await registers(collector, "new-1", secret)
    text = path.read_text()
    assert "# the fleet, kept by hand" in text and "# dev-1" in text  # the operator's comments
    assert DeviceRegistry.load(path)["new-1"] == secret
    assert (await api(collector, "POST", "/api/devices", {"id": "new-1"}))[1]["error"][
        "code"
    ] == "exists"
    assert (await api(collector, "POST", "/api/devices", {"id": "bad id"}))[0] == 400

    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        async with open_device(
            "127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=collector.tcp_address[1]
        ) as other:
            status, body = await api(collector, "POST", "/api/devices/dev-1/rotate")
            assert status == 200 and body["secret"] != SECRETS["dev-1"]
            await dev.ended.wait()
            assert other.end_reason is None  # nobody else is touched
            status, body = await api(collector, "DELETE", "/api/devices/dev-2")
            assert (status, body["session_ended"]) == (200, True)
            await other.ended.wait()
    assert [(e.device_id, e.reason) for e in log.of(DeviceOffline) if e.reason == "revoked"] == [
        ("dev-1", "revoked"),
        ("dev-2", "revoked"),
    ]
    assert not await registers(collector, "dev-1", SECRETS["dev-1"])  # the old secret is gone
    assert await registers(collector, "dev-1", DeviceRegistry.load(path)["dev-1"])
    assert not await registers(collector, "dev-2", SECRETS["dev-2"])
    assert "dev-2" not in DeviceRegistry.load(path)
    assert (await api(collector, "DELETE", "/api/devices/nobody"))[0] == 404


async def test_a_reload_reads_the_devices_file_and_keeps_allowed_sessions(
    nursery, autojump_clock, tmp_path
):
    collector, log, path = await start(nursery, tmp_path)
    port = collector.tcp_address[1]
    async with (
        open_device("127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=port) as kept,
        open_device("127.0.0.1", "dev-2", SECRETS["dev-2"], tcp_port=port) as removed,
        open_device("127.0.0.1", "dev-3", SECRETS["dev-3"], tcp_port=port) as rotated,
    ):
        edit = DeviceRegistry.load(path)
        edit.remove("dev-2")
        edit.rotate("dev-3")
        added = edit.add("late-1")
        edit.save(path)
        changed = collector.reload()
        assert changed == ["devices: added 1 (late-1); removed 1 (dev-2); new secret for 1 (dev-3)"]
        await removed.ended.wait()
        await rotated.ended.wait()
        await kept.send_readings({"t": 1.0}, ack=True)
        assert kept.end_reason is None
    assert await registers(collector, "late-1", added)
    assert sorted(e.device_id for e in log.of(DeviceOffline) if e.reason == "revoked") == [
        "dev-2",
        "dev-3",
    ]
    # A broken file changes nothing.
    path.write_text("[devices\n")
    assert collector.reload() == []
    assert await registers(collector, "late-1", added)


async def test_the_live_parts_of_the_config_reload_and_the_rest_says_so(
    nursery, autojump_clock, tmp_path, caplog
):
    collector, _, _ = await start(nursery, tmp_path)
    assert (await api(collector, "GET", "/api/devices"))[0] == 200  # no tokens yet
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[http]\nread_tokens = ["r"]\n[limits]\nmax_metrics_per_device = 8\n[server]\nudp_rcvbuf = 1000\n'
    )
    new = load_config(cfg, host="127.0.0.1", tcp_port=0, udp_port=0, http_port=0)
    changed = collector.reload(new)
    assert changed == ["config: read_tokens, max_metrics_per_device"]
    assert (
        "udp_rcvbuf changed in the config file but take effect only after a restart" in caplog.text
    )
    assert (await api(collector, "GET", "/api/devices"))[0] == 401
    assert (await api(collector, "GET", "/api/devices", token="r"))[0] == 200
    assert collector.hub.config.max_metrics == 8


def _free(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sighup_reloads_a_running_collector_instead_of_killing_it(tmp_path):
    devices = tmp_path / "devices.toml"
    subprocess.run(
        [sys.executable, "-m", "collector", "devices", "add", "first", "--devices", str(devices)],
        check=True,
        capture_output=True,
    )
    tcp, http = _free(), _free()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--devices", str(devices), "--host", "127.0.0.1",
         "--tcp-port", str(tcp), "--udp-port", "0", "--http-port", str(http), "--log-level", "INFO"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", http), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        out = subprocess.run([sys.executable, "-m", "collector", "devices", "add", "second", "--devices", str(devices)],
                             check=True, capture_output=True, text=True)  # fmt: skip
        secret = out.stdout.split("secret: ")[1].split()[0]
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None  # SIGHUP no longer kills it

        async def check() -> None:
            async with open_device("127.0.0.1", "second", secret, tcp_port=tcp):
                pass

        trio.run(check)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert "SIGHUP: reloaded devices: added 1 (second)" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("action", ["add", "rotate", "remove", "list"])
def test_collector_devices_works_on_a_running_collector(tmp_path, action):
    devices = tmp_path / "devices.toml"
    subprocess.run(
        [sys.executable, "-m", "collector", "devices", "add", "first", "--devices", str(devices)],
        check=True,
        capture_output=True,
    )
    (tmp_path / "c.toml").write_text('[http]\ncommand_tokens = ["op"]\n')
    http = _free()
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "serve", "--devices", str(devices), "--host", "127.0.0.1",
         "--tcp-port", "0", "--udp-port", "0", "--http-port", str(http), "--config", str(tmp_path / "c.toml")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", http), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        device = "second" if action == "add" else "first"
        argv = [sys.executable, "-m", "collector", "devices", action, *([device] if action != "list" else []),
                "--url", f"http://127.0.0.1:{http}/", "--token", "op"]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        on_disk = DeviceRegistry.load(devices)
        if action == "add":
            assert on_disk["second"] == out.stdout.split("secret: ")[1].split()[0]
        elif action == "rotate":
            assert on_disk["first"] == out.stdout.split("secret: ")[1].split()[0]
        elif action == "remove":
            assert "first" not in on_disk
        else:
            assert out.stdout.split() == ["first"]
        wrong = subprocess.run(
            [*argv[:-1], "not-the-token"], capture_output=True, text=True, timeout=30
        )
        assert wrong.returncode == 2 and "unauthorized" in wrong.stderr
    finally:
        proc.terminate()
        proc.wait()
