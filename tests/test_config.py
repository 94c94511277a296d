from __future__ import annotations

import logging
import stat

import pytest

from collector.config import Config, ConfigError, load_config
from collector.devices import DeviceRegistry, DevicesError


def test_defaults_are_sane():
    c = Config()
    assert (c.tcp_port, c.udp_port, c.http_port) == (8080, 8081, 8082)
    assert c.timeout >= 2.5 * c.heartbeat_interval
    assert c.max_datagram == 1200 and c.max_line == 4096


def test_toml_sections_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "[server]\nudp_port = 9000\n[sessions]\nheartbeat_interval = 2\n[limits]\nmax_devices = 5\n"
        '[commands]\ntimeout = 3\n[logging]\nformat = "json"\n'
        '[[device_config]]\nmatch = "temp-*"\nconfig = { rate = 1 }\n'
    )
    c = load_config(path, udp_port=None, tcp_port=1234)
    assert (c.udp_port, c.tcp_port, c.max_devices, c.command_timeout, c.log_format) == (
        9000,
        1234,
        5,
        3.0,
        "json",
    )
    assert c.heartbeat_interval == 2.0 and c.timeout == 6.0  # follows the interval unless set
    assert c.device_config[0].applies_to("temp-7") and not c.device_config[0].applies_to("hum-1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[serverr]\n", "unknown section"),
        ("[server]\nudp_prot = 1\n", "unknown key"),
        ('[server]\nudp_port = "x"\n', "expected int"),
        ("[sessions]\nheartbeat_interval = 5\ntimeout = 4\n", "timeout must be longer"),
        ("[limits]\nmax_datagram = 10\n", "max_datagram"),
        ("[[device_config]]\nmatch = 1\nconfig = {}\n", "glob"),
        ("not toml at all [", "c.toml"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_short_timeout_warns(caplog):
    with caplog.at_level(logging.WARNING):
        Config(heartbeat_interval=5, timeout=10)
    assert "one lost heartbeat may mark a device offline" in caplog.text


def test_devices_file_round_trip_is_private(tmp_path):
    path = tmp_path / "sub" / "devices.toml"
    reg = DeviceRegistry()
    secret = reg.add("temp-1")
    reg.add("weird", 'with "quotes" \\ and backslash')
    reg.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = DeviceRegistry.load(path)
    assert dict(again) == {"temp-1": secret, "weird": 'with "quotes" \\ and backslash'}
    assert len(secret) >= 32
    with pytest.raises(DevicesError, match="already exists"):
        again.add("temp-1")
    with pytest.raises(DevicesError, match="bad device id"):
        again.add("has space")


def test_bad_devices_files(tmp_path):
    with pytest.raises(DevicesError, match="does not exist"):
        DeviceRegistry.load(tmp_path / "none.toml")
    p = tmp_path / "d.toml"
    p.write_text('[devices."a"]\nsecret = 3\n')
    with pytest.raises(DevicesError, match="needs a non-empty string 'secret'"):
        DeviceRegistry.load(p)


def test_the_example_config_is_valid_and_complete():
    import tomllib
    from pathlib import Path

    from collector.config import _SECTIONS

    path = Path(__file__).resolve().parent.parent / "examples" / "collector.toml"
    c = load_config(path)
    data = tomllib.loads(path.read_text())
    for section, keys in _SECTIONS.items():
        assert set(data[section]) == set(keys), section  # every key is shown
    defaults = Config()
    for section, keys in _SECTIONS.items():
        for field in keys.values():
            assert getattr(c, field) == getattr(defaults, field), (section, field)
    assert len(c.device_config) == 2


def test_the_example_file_and_the_docs_are_made_from_the_settings_table():
    from pathlib import Path

    from collector.config import render_markdown, render_toml

    root = Path(__file__).resolve().parent.parent
    assert (root / "examples" / "collector.toml").read_text() == render_toml()
    assert (root / "docs" / "CONFIGURATION.md").read_text() == render_markdown()


def test_what_config_check_prints_loads_back_to_the_same_configuration(tmp_path):
    from collector.config import render_toml

    path = tmp_path / "c.toml"
    path.write_text(
        "[sessions]\nheartbeat_interval = 2\n"
        '[[device_config]]\nmatch = "*"\nconfig = { a = 1, nested = { b = [1, { c = "x" }] } }\n'
        '[[device_config]]\nmatch = "g-*"\n[device_config.config]\nunit = "C"\n'
    )
    first = load_config(path)
    again = tmp_path / "again.toml"
    again.write_text(render_toml(first, example=False))
    assert load_config(again) == first
    assert first.device_config[0].config["nested"]["b"][1] == {"c": "x"}


def test_config_check_prints_the_effective_configuration(tmp_path):
    import subprocess
    import sys
    import tomllib

    path = tmp_path / "c.toml"
    path.write_text("[server]\nudp_port = 9999\n[sessions]\nheartbeat_interval = 2\n")
    out = subprocess.run(
        [sys.executable, "-m", "collector", "config", "check", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "valid" in out.stderr
    effective = tomllib.loads(out.stdout)
    assert effective["server"]["udp_port"] == 9999 and effective["sessions"]["timeout"] == 6.0
    assert effective["server"]["tcp_port"] == 8080  # defaults included
    path.write_text("[server]\nudp_port = 99999\n")
    bad = subprocess.run(
        [sys.executable, "-m", "collector", "config", "check", str(path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "udp_port" in bad.stderr and "Traceback" not in bad.stderr


def test_sentinel_urls_are_parsed_and_bad_ones_refused():
    from collector.cluster.connect import BadRedisUrl, SentinelTarget, parse_sentinel

    assert parse_sentinel("redis+sentinel://h1:26379,[::1]:26380/svc/3") == SentinelTarget(
        (("h1", 26379), ("::1", 26380)), "svc", 3
    )
    assert parse_sentinel("redis+sentinel://u:p%40ss@h:1/main") == SentinelTarget(
        (("h", 1),), "main", 0, "u", "p@ss"
    )
    for bad in (
        "redis+sentinel://h:26379",  # no service
        "redis+sentinel://h/svc",  # no port
        "redis+sentinel://h:0/svc",
        "redis+sentinel://h:1/svc/x",
    ):
        with pytest.raises(BadRedisUrl):
            parse_sentinel(bad)
        with pytest.raises(ConfigError, match=r"(?i)sentinel"):
            Config(redis=bad)
    with pytest.raises(ConfigError, match="redis must be a redis://"):
        Config(redis="http://h/")
    assert Config(redis="redis+sentinel://h:1/svc").redis
