"""deploy/: what can be checked without a Docker engine, systemd or Grafana.

* The image: its config passes `collector config check`; `collector serve` runs with it (ports
  moved to free ones on 127.0.0.1, the volume's paths moved to a temporary directory); the
  Dockerfile's own HEALTHCHECK command passes against it and fails once it has stopped; and the
  final stage is non-root, exposes the three ports and has the healthcheck.
* The systemd unit: `systemd-analyze verify`, when systemd-analyze is installed.
* The Prometheus rules and the Grafana dashboard: every series they use is one a live
  collector (with a device registered and sending, a recording and a dashboard) exports, with
  the labels they use; `promtool check rules` and `promtool test rules` (skipped without
  promtool unless REQUIRE_PROMTOOL=1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from collector.config import load_config
from collector.device.client import open_device

from .helpers import SECRETS, http, start_collector

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
CONFIG = DEPLOY / "collector.toml"
UNIT = DEPLOY / "collector.service"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "collector-dashboard.json"
COLLECTOR = Path(sys.executable).parent / "collector"
#: labels Prometheus adds to every series it scrapes
TARGET_LABELS = {"instance", "job"}


# -- the Dockerfile, read the way the builder reads it ------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage, as (INSTRUCTION, arguments), continuations joined."""
    instructions, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not buf and not stripped):
            continue  # comments (and parser directives), also inside a continuation
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        instruction, _, args = (buf + stripped).partition(" ")
        instructions.append((instruction.upper(), args.strip()))
        buf = ""
    stages: list[list[tuple[str, str]]] = []
    for instruction, args in instructions:
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args))
    return stages


def final_stage(instruction: str) -> list[str]:
    return [args for ins, args in dockerfile_stages()[-1] if ins == instruction]


def exec_form(args: str) -> list[str]:
    """The JSON array of a CMD (or of HEALTHCHECK's CMD, after its options)."""
    return json.loads(args[args.index("[") :])


def test_the_image_is_built_in_two_stages_and_runs_unprivileged():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert any(i == "RUN" and "pip wheel" in a for i, a in stages[0])  # the builder
    (user,) = final_stage("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert {p for args in final_stage("EXPOSE") for p in args.split()} == {
        "8080/tcp",
        "8081/udp",
        "8082/tcp",
    }
    (healthcheck,) = final_stage("HEALTHCHECK")
    assert "/healthz" in healthcheck


def test_the_image_config_is_valid_and_writes_only_to_the_volume():
    (cmd,) = final_stage("CMD")
    argv = exec_form(cmd)
    assert argv[:2] == ["collector", "serve"]
    config_path = argv[argv.index("--config") + 1]
    devices_path = argv[argv.index("--devices") + 1]
    # the config in the image is deploy/collector.toml
    assert f"deploy/collector.toml {config_path}" in final_stage("COPY")
    (volume,) = exec_form(final_stage("VOLUME")[0])

    check = subprocess.run(
        [COLLECTOR, "config", "check", CONFIG], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stderr
    assert "valid" in check.stderr

    config = load_config(CONFIG)
    assert (config.host, config.tcp_port, config.udp_port, config.http_port) == (
        "0.0.0.0",
        8080,
        8081,
        8082,
    )
    for path in (config.record_dir, devices_path):
        assert path.startswith(volume + "/"), f"{path} is not on the volume {volume}"


def wait_for_line(path: Path, prefix: str, proc: subprocess.Popen, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {prefix!r} line from the collector: {path.read_text()}")


def test_the_healthcheck_passes_against_the_image_config_and_fails_once_stopped(tmp_path):
    """The HEALTHCHECK command of the Dockerfile, character for character but for the port
    (and `python`, which is the venv's in the image too), against `collector serve` with
    deploy/collector.toml."""
    (healthcheck,) = final_stage("HEALTHCHECK")
    probe = exec_form(healthcheck)
    assert probe[0] == "python"
    assert sum(arg.count("127.0.0.1:8082/") for arg in probe) == 1

    devices = tmp_path / "devices.toml"
    devices.write_text("")  # what the image holds: an empty devices file
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [COLLECTOR, "serve", "--config", CONFIG, "--devices", devices,
             "--record", tmp_path / "recordings",
             "--host", "127.0.0.1", "--tcp-port", "0", "--udp-port", "0", "--http-port", "0"],
            stdout=stdout, stderr=stderr, cwd=tmp_path,
        )  # fmt: skip
    try:
        dashboard = wait_for_line(out, "dashboard: ", proc)
        port = int(re.fullmatch(r"dashboard: http://127\.0\.0\.1:(\d+)/", dashboard).group(1))
        command = [sys.executable] + [a.replace(":8082/", f":{port}/") for a in probe[1:]]

        up = subprocess.run(command, capture_output=True, text=True, timeout=10)
        assert up.returncode == 0, up.stderr

        proc.send_signal(signal.SIGTERM)  # what docker stop and systemctl stop send
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "shutdown complete" in out.read_text()
    assert "PLAIN TEXT" in err.read_text()  # the config's plain text is said, not hidden
    assert list((tmp_path / "recordings").glob("seg-*.rec"))

    down = subprocess.run(command, capture_output=True, text=True, timeout=10)
    assert down.returncode != 0


# -- systemd ------------------------------------------------------------------------------------


def test_the_systemd_unit_verifies(tmp_path):
    unit = UNIT.read_text()
    # the unit's state directory is where the config puts the recording
    assert "StateDirectory=collector\n" in unit
    assert load_config(CONFIG).record_dir.startswith("/var/lib/collector/")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip(
            "systemd-analyze is not installed (Debian: the systemd package), so "
            "deploy/collector.service is not verified"
        )
    binary = "/opt/trio-collector/bin/collector"
    assert f"ExecStart={binary} " in unit
    # verify wants ExecStart's binary to exist: point it at this environment's
    copy = tmp_path / "trio-collector.service"
    copy.write_text(unit.replace(binary, str(COLLECTOR)))
    result = subprocess.run(
        [analyze, "verify", copy], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    ours = [line for line in result.stderr.splitlines() if copy.name in line]
    assert result.returncode == 0 and not ours, result.stderr


# -- Prometheus and Grafana ---------------------------------------------------------------------


def alert_rules() -> list[tuple[str, str, str]]:
    """(alert, expr, the rest of the rule) of every rule in alerts.yml, without a YAML library
    (the test extra has none): `expr:` is a one-line value or a `|` block."""
    rules = []
    for block in re.split(r"^\s*- alert:", ALERTS.read_text(), flags=re.M)[1:]:
        name, *lines = block.splitlines()
        expr, rest, indent = [], [], None
        for line in lines:
            if indent is not None and (not line.strip() or len(line) - len(line.lstrip()) > indent):
                expr.append(line.strip())
                continue
            indent = None
            m = re.match(r"(\s*)expr:\s*(.*)$", line)
            if m and m.group(2) in ("|", ">"):
                indent = len(m.group(1))
            elif m:
                expr.append(m.group(2))
            else:
                rest.append(line)
        rules.append((name.strip(), " ".join(expr).strip(), "\n".join(rest)))
    return rules


def dashboard_queries() -> list[tuple[str, str]]:
    """(PromQL, legend) of every panel target and every query variable of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    queries = [
        (t["expr"], t.get("legendFormat", ""))
        for panel in board["panels"]
        for t in panel.get("targets", [])
    ]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"])
            queries.append((m.group(1), "{{" + m.group(2) + "}}"))
    return queries


def labels_used(expr: str, text: str) -> set[str]:
    """Labels an expression groups or matches by, and those its legend or annotations show."""
    found = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        found |= {g.strip() for g in group.split(",") if g.strip()}
    found |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
    found |= set(re.findall(r"\$labels\.(\w+)", text))
    return found - TARGET_LABELS


async def test_every_series_in_the_alerts_and_the_dashboard_is_exported(nursery, tmp_path):
    collector, _ = await start_collector(nursery, http_port=0, record_dir=str(tmp_path / "rec"))
    url = f"ws://127.0.0.1:{collector.http_address[1]}/stream"
    async with open_device(
        "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
    ) as dev:
        for i in range(3):
            await dev.send_readings({"temperature": 20.0 + i})
        # a dashboard that comes and goes: the stream's counters, its close reason included
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"type": "subscribe"}))
            await ws.get_message()
        for _ in range(500):  # the readings and the close are counted as they are handled
            if (
                collector.statistics().devices["dev-1"].readings >= 3
                and collector.hub.statistics()["closed"]
            ):
                break
            await trio.sleep(0.01)
        else:
            raise AssertionError("the readings or the dashboard's close were never counted")
        status, _, body = await http(collector, "GET", "/metrics")
    assert status == 200
    exported: dict[str, set[str]] = {}  # series name -> its labels
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)

    uses = [(f"alert {name}", expr, rest) for name, expr, rest in alert_rules()]
    uses += [(f"dashboard {expr!r}", expr, legend) for expr, legend in dashboard_queries()]
    assert len(uses) > 20
    names_used = set()
    for where, expr, text in uses:
        names = set(re.findall(r"\bcollector_[a-z0-9_]+\b", expr))
        names_used |= names
        if where != "alert CollectorDown":  # `up` is Prometheus's own
            assert names, f"{where}: no collector series"
        missing = names - exported.keys()
        assert not missing, f"{where}: {sorted(missing)} not in /metrics"
        labels = set().union(*(exported[n] for n in names)) if names else set()
        assert labels_used(expr, text) <= labels, f"{where}: labels {labels_used(expr, text)}"
    # what the issue asks the rules and the dashboard to watch
    assert {
        "collector_device_online",
        "collector_device_lost_total",
        "collector_udp_kernel_drops_total",
        "collector_recording_write_errors_total",
        "collector_internal_errors_total",
        "collector_stream_subscribers",
    } <= names_used


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("REQUIRE_PROMTOOL") == "1":
            pytest.fail("REQUIRE_PROMTOOL=1 but promtool is not on PATH (Debian: prometheus)")
        pytest.skip(
            "promtool is not installed (Debian: apt-get install prometheus); "
            "REQUIRE_PROMTOOL=1 makes this a failure"
        )
    return found


def run_promtool(*args: object, cwd: Path) -> None:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_promtool():
    run_promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    run_promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS.parent)


def test_the_dashboard_queries_are_valid_promql(tmp_path):
    """promtool has no query checker, but it parses recording rules: one per query, with
    Grafana's variables given values."""
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    values = {"$__rate_interval": "5m", "$__range": "1h", "$instance": ".*", "$device": ".*"}
    rules = []
    for n, (expr, _) in enumerate(dashboard_queries()):
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    # JSON is YAML
    (tmp_path / "queries.yml").write_text(json.dumps({"groups": [{"name": "q", "rules": rules}]}))
    run_promtool("check", "rules", "queries.yml", cwd=tmp_path)
