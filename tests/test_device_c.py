"""The reference device in C, examples/device-c/device.c, built here and run against a real
collector: it checks the test vectors of docs/PROTOCOL.md, registers over UDP (HELLO, COOKIE,
HELLO, WELCOME), sends encrypted readings, answers a command and says GOODBYE.

The device was written from docs/PROTOCOL.md alone, so these tests are also a check of the
document. They skip when no C compiler or no mbedTLS headers are found (Debian:
`apt-get install gcc libmbedtls-dev`); CI sets REQUIRE_DEVICE_C=1, and there they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from collector.core.events import DeviceOffline, DeviceOnline

from .helpers import SECRETS, start_collector

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples" / "device-c" / "device.c"
REQUIRED = os.environ.get("REQUIRE_DEVICE_C") == "1"
DEVICE = "udp-1"


@pytest.fixture(scope="module")
def device_binary(tmp_path_factory) -> Path:
    """Builds the device with the flags of its Makefile, or skips saying what is missing."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        if REQUIRED:
            pytest.fail("no C compiler (cc or gcc) and REQUIRE_DEVICE_C=1")
        pytest.skip("no C compiler: install gcc to build examples/device-c")
    out = tmp_path_factory.mktemp("device-c") / "device"
    flags = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2"]
    build = subprocess.run(
        [cc, *flags, "-o", str(out), str(SOURCE), "-lmbedcrypto"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if build.returncode != 0:
        if "mbedtls/" in build.stderr and "No such file" in build.stderr and not REQUIRED:
            pytest.skip("mbedTLS headers not found (Debian: apt-get install libmbedtls-dev)")
        pytest.fail(f"examples/device-c/device.c did not build:\n{build.stderr}")
    return out


def test_the_c_device_checks_the_test_vectors_of_the_spec(device_binary):
    run = subprocess.run(
        [str(device_binary), "--vectors"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all test vectors match" in run.stdout
    assert "FAIL" not in run.stdout
    # every check printed is an ok line
    checks = [line for line in run.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(checks) >= 30


def test_the_c_device_has_help_and_refuses_bad_arguments(device_binary):
    shown = subprocess.run([str(device_binary), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "usage: device" in shown.stdout
    bad = subprocess.run(
        [str(device_binary), "127.0.0.1", "not-a-port", DEVICE, "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "bad UDP_PORT" in bad.stderr


async def test_the_c_device_registers_sends_readings_and_answers_a_command(device_binary):
    readings = 5
    async with trio.open_nursery() as nursery:
        collector, log = await start_collector(nursery)
        host, port = collector.udp_address[:2]
        online = trio.Event()
        offline = trio.Event()

        class Watch:
            def on_telemetry(self, batch):
                pass

            def on_event(self, event):
                if isinstance(event, DeviceOnline) and event.device_id == DEVICE:
                    online.set()
                if isinstance(event, DeviceOffline) and event.device_id == DEVICE:
                    offline.set()

        collector.add_listener(Watch())
        argv = [str(device_binary), "--interval", "100", "--wait-command", "30"]
        argv += [host, str(port), DEVICE, SECRETS[DEVICE], str(readings)]
        # generous bounds: they only stop a hung test; the device itself takes about a second
        with trio.fail_after(60):
            process = await trio.lowlevel.open_process(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            output = bytearray()

            async def drain():
                async for chunk in process.stdout:
                    output.extend(chunk)

            nursery.start_soon(drain)
            await online.wait()
            record = collector.send_command(DEVICE, "ping", {"from": "the test"})
            await process.wait()
            await offline.wait()
        text = output.decode(errors="replace")
        sys.stdout.write(text)
        assert process.returncode == 0, text
        nursery.cancel_scope.cancel()

    assert record.state == "acked", (record.state, record.error, text)
    assert record.result == {"pong": True}
    assert record.transport == "udp"
    assert "WELCOME received" in text and "GOODBYE sent" in text

    sent = [t for t in log.telemetry if t.device_id == DEVICE and t.readings]
    assert len(sent) == readings
    for i, t in enumerate(sent, start=1):
        values = dict(t.readings)
        assert values == {"temperature": 20.0 + 0.25 * i, "count": i, "door_open": i % 2 == 0}

    [ended] = log.of(DeviceOffline, device_id=DEVICE)
    assert ended.reason == "closed"
    stats = collector.statistics().devices[DEVICE]
    assert (stats.lost, stats.duplicates, stats.malformed) == (0, 0, 0)
    assert stats.readings == 3 * readings
    assert sum(collector.statistics().rejected.values()) == 0
