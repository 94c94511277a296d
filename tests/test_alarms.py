"""Alarms: the rules (sans-IO, on a fake clock) and end to end (a device, the stream, the API,
/metrics, the acknowledgement)."""

from __future__ import annotations

import json

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from collector.config import ConfigError, config_from_mapping
from collector.core.alarms import AlarmEngine, AlarmError, AlarmRule, parse_rules
from collector.core.events import DeviceOffline, Telemetry
from collector.device.client import open_device

from .helpers import SECRETS, api, http, start_collector


def batch(device, **readings):
    return [Telemetry(0.0, device, 1, 0, tuple(readings.items()))]


class Engine:
    """An engine with its changes kept, run inside trio (it reads trio.current_time())."""

    def __init__(self, *rules, **kw):
        self.changes = []
        self.wall = 1000.0
        self.engine = AlarmEngine(
            rules, wall=lambda: self.wall, emit=lambda c: self.changes.append(c), **kw
        )

    def feed(self, device, **readings):
        self.engine.on_telemetry(batch(device, **readings))

    def seen(self):
        out = [
            (c.change, c.alarm["device"], c.alarm["metric"], c.alarm["condition"])
            for c in self.changes
        ]
        self.changes.clear()
        return out


async def test_above_fires_once_and_clears_with_hysteresis(autojump_clock):
    e = Engine(AlarmRule("hot", metric="temp*", above=30.0, hysteresis=1.0))
    e.feed("d1", temperature=25.0, humidity=99.0)
    assert e.seen() == []
    e.feed("d1", temperature=31.0)
    e.feed("d1", temperature=32.0)  # still above: no second alarm
    assert e.seen() == [("raised", "d1", "temperature", "above")]
    e.feed("d1", temperature=29.5)  # under the threshold, inside the hysteresis
    assert e.seen() == []
    e.feed("d1", temperature=28.9)
    assert e.seen() == [("cleared", "d1", "temperature", "above")]
    (alarm,) = e.engine.listed()  # cleared, not acknowledged: still listed
    assert (alarm["state"], alarm["acknowledged"], alarm["value"], alarm["last_value"]) == (
        "cleared", False, 31.0, 28.9,
    )  # fmt: skip
    e.engine.acknowledge(alarm["id"], "ops")
    assert e.engine.listed() == [] and e.engine.recent[-1]["acknowledged_by"] == "ops"
    assert e.engine.counts()["raised_total"] == {"hot": 1}


async def test_acknowledged_while_active_leaves_when_it_clears(autojump_clock):
    e = Engine(AlarmRule("cold", metric="t", below=0.0, devices=("a-*",)))
    e.feed("b-1", t=-5.0)  # not a device of the rule
    e.feed("a-1", t=-5.0)
    (alarm,) = e.engine.listed()
    out = e.engine.acknowledge(alarm["id"])
    assert out["acknowledged"] and out["state"] == "active"
    with pytest.raises(AlarmError) as exc:
        e.engine.acknowledge(alarm["id"])
    assert exc.value.code == "already_acknowledged"
    e.feed("a-1", t=1.0)
    assert e.engine.listed() == []
    assert e.seen() == [
        ("raised", "a-1", "t", "below"),
        ("acknowledged", "a-1", "t", "below"),
        ("cleared", "a-1", "t", "below"),
    ]
    with pytest.raises(AlarmError) as exc:
        e.engine.acknowledge("a999")
    assert exc.value.code == "unknown_alarm"


async def test_firing_again_while_listed_counts_and_needs_a_new_ack(autojump_clock):
    e = Engine(AlarmRule("hot", metric="t", above=1.0))
    e.feed("d", t=2.0)
    e.feed("d", t=0.0)
    e.feed("d", t=3.0)
    (alarm,) = e.engine.listed()
    assert (alarm["state"], alarm["count"], alarm["value"]) == ("active", 2, 3.0)
    assert [c[0] for c in e.seen()] == ["raised", "cleared", "raised"]


async def test_a_new_condition_fires_again_and_silence_is_news_while_out_of_range(
    autojump_clock,
):
    e = Engine(AlarmRule("band", metric="t", above=10.0, below=0.0, hysteresis=1.0, no_data=5.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(e.engine.serve)
        e.feed("d", t=11.0)
        e.feed("d", t=-1.0)  # from above straight to below: the alarm says so
        (alarm,) = e.engine.listed()
        assert (alarm["condition"], alarm["count"], alarm["value"]) == ("below", 2, -1.0)
        await trio.sleep(5.1)  # then silent: no_data fires though the last value was out of range
        assert e.engine.listed()[0]["condition"] == "no_data"
        assert [c[3] for c in e.seen() if c[0] == "raised"] == ["above", "below", "no_data"]
        nursery.cancel_scope.cancel()


async def test_text_and_booleans_have_no_threshold(autojump_clock):
    e = Engine(AlarmRule("any", metric="*", above=0.5, below=-0.5))
    e.feed("d", on=True, label="hot", ok=False)
    assert e.seen() == [] and e.engine.listed() == []


async def test_no_data_fires_at_its_deadline_and_clears_on_data(autojump_clock):
    e = Engine(AlarmRule("silent", metric="*", no_data=10.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(e.engine.serve)
        e.feed("d", temperature=1.0)
        await trio.sleep(5)
        e.feed("d", temperature=1.0)  # pushes the deadline to t=15
        await trio.sleep(9.9)
        assert e.seen() == []
        await trio.sleep(0.2)
        assert e.seen() == [("raised", "d", "temperature", "no_data")]
        t_fired = trio.current_time()
        assert 15.0 <= t_fired <= 15.2
        await trio.sleep(60)  # fires once, not again and again
        assert e.seen() == []
        e.feed("d", temperature=2.0)
        assert e.seen() == [("cleared", "d", "temperature", "no_data")]
        await trio.sleep(10.1)  # and the next silence fires again
        assert e.seen() == [("raised", "d", "temperature", "no_data")]
        assert e.engine.listed()[0]["count"] == 2
        nursery.cancel_scope.cancel()


async def test_an_earlier_deadline_wakes_the_timer(autojump_clock):
    e = Engine(
        AlarmRule("slow", metric="a", no_data=100.0), AlarmRule("quick", metric="b", no_data=2.0)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(e.engine.serve)
        e.feed("d", a=1.0)
        await trio.sleep(1)
        e.feed("d", b=1.0)  # due at t=3, before the timer's t=100
        await trio.sleep(2.5)
        assert e.seen() == [("raised", "d", "b", "no_data")]
        nursery.cancel_scope.cancel()


async def test_limits_are_counted(autojump_clock):
    e = Engine(AlarmRule("hot", metric="t", above=0.0, no_data=5.0), max_alarms=3, max_watched=2)
    for i in range(5):
        e.feed(f"d{i}", t=1.0)
    counts = e.engine.counts()
    assert (counts["listed"], counts["refused"]) == (3, 2)
    assert (counts["watched"], counts["unwatched"]) == (2, 3)


async def test_a_removed_device_takes_its_alarms_along(autojump_clock):
    e = Engine(AlarmRule("hot", metric="t", above=0.0, no_data=5.0))
    e.feed("d1", t=1.0)
    e.feed("d2", t=1.0)
    # offline, or a new secret: still a device of the fleet, its alarms stay
    e.engine.on_event(DeviceOffline(0.0, "d1", 1, "timeout", 1.0))
    e.engine.on_event(DeviceOffline(0.0, "d1", 1, "revoked", 1.0))
    assert len(e.engine.listed()) == 2
    e.engine.forget_device("d1")  # removed (the collector calls this, online or not)
    assert [a["device"] for a in e.engine.listed()] == ["d2"]
    assert e.seen()[-1] == ("removed", "d1", "t", "above")
    assert e.engine.watched == 1


@pytest.mark.parametrize(
    "body, message",
    [
        ({"r": {"above": 1}}, "metric must be a glob"),
        ({"r": {"metric": "t"}}, "at least one of above, below, no_data"),
        ({"r": {"metric": "t", "above": 1, "below": 2}}, "below must be under above"),
        ({"r": {"metric": "t", "above": 2, "below": 0, "hysteresis": 1}}, "under half the gap"),
        ({"r": {"metric": "t", "no_data": 0}}, "no_data must be a positive"),
        ({"r": {"metric": "t", "above": True}}, "above must be a number"),
        ({"r": {"metric": "t", "above": 1, "severity": "loud"}}, "severity is one of"),
        ({"r": {"metric": "t", "above": 1, "colour": "red"}}, "unknown key 'colour'"),
        ({"bad name": {"metric": "t", "above": 1}}, "a rule name is"),
        ({"r": {"metric": "t", "above": 1, "devices": []}}, "devices must be a list"),
    ],
)
def test_rule_errors_name_the_rule_and_the_problem(body, message):
    with pytest.raises(ConfigError) as exc:
        config_from_mapping({"alarms": body})
    assert message in str(exc.value) and "[alarms." in str(exc.value)


def test_rules_and_units_from_toml():
    cfg = config_from_mapping(
        {
            "alarms": {"hot": {"metric": "temp*", "above": 30, "severity": "critical"}},
            "metrics": {"temp*": {"unit": "°C", "description": "air"}},
        }
    )
    assert cfg.alarms == parse_rules(
        {"hot": {"metric": "temp*", "above": 30.0, "severity": "critical"}}
    )
    assert cfg.metrics_meta[0].to_json() == {"match": "temp*", "unit": "°C", "description": "air"}
    with pytest.raises(ConfigError, match="unit must be text"):
        config_from_mapping({"metrics": {"t": {"unit": 5}}})


async def test_an_alarm_end_to_end(nursery, autojump_clock):
    """A device's reading fires a rule: the stream says so, /api/alarms lists it, /metrics
    counts it, an acknowledgement through the API reaches the stream, and the clear removes it."""
    collector, _ = await start_collector(
        nursery,
        http_port=0,
        alarms=parse_rules({"hot": {"metric": "temp*", "above": 30, "description": "too hot"}}),
        command_tokens=("op",),
        read_tokens=("viewer",),
    )
    url = f"ws://127.0.0.1:{collector.http_address[1]}/stream?token=viewer"
    async with (
        open_device(
            "127.0.0.1", "dev-1", SECRETS["dev-1"], tcp_port=collector.tcp_address[1]
        ) as dev,
        open_websocket_url(url) as ws,
    ):
        hello = json.loads(await ws.get_message())
        assert hello["alarms"] is True and hello["metrics"] == []
        await ws.send_message(json.dumps({"type": "subscribe"}))
        while (m := json.loads(await ws.get_message()))["type"] != "snapshot" or (
            m["part"] != m["parts"]
        ):
            pass

        async def next_alarm():
            for _ in range(500):
                msg = json.loads(await ws.get_message())
                if msg["type"] == "alarm":
                    return msg
            raise AssertionError("no alarm message in 500")

        await dev.send_readings({"temperature": 35.5})
        msg = await next_alarm()
        assert msg["change"] == "raised"
        a = msg["alarm"]
        assert (a["device"], a["metric"], a["condition"], a["threshold"], a["value"]) == (
            "dev-1", "temperature", "above", 30.0, 35.5,
        )  # fmt: skip
        status, body = await api(collector, "GET", "/api/alarms", token="viewer")
        assert status == 200 and [x["id"] for x in body["alarms"]] == [a["id"]]
        assert body["counts"]["active"] == 1 and body["rules"][0]["description"] == "too hot"

        status, _, raw = await http(collector, "GET", "/metrics", token="viewer")
        families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
        active = families["collector_alarms_active"].samples[0]
        assert active.labels == {"rule": "hot", "severity": "warning"} and active.value == 1
        assert families["collector_alarms_raised"].samples[0].value == 1

        path = f"/api/alarms/{a['id']}/ack"
        status, body = await api(collector, "POST", path, {"by": "ana"}, token="viewer")
        assert status == 403  # acknowledging is an operator's act
        status, body = await api(collector, "POST", path, {"by": "ana"}, token="op")
        assert status == 200 and body["acknowledged_by"] == "ana"
        msg = await next_alarm()
        assert (msg["change"], msg["alarm"]["acknowledged"]) == ("acknowledged", True)
        status, body = await api(collector, "POST", path, {}, token="op")
        assert (status, body["error"]["code"]) == (409, "already_acknowledged")
        status, body = await api(collector, "POST", "/api/alarms/nope/ack", token="op")
        assert (status, body["error"]["code"]) == (404, "unknown_alarm")

        await dev.send_readings({"temperature": 20.0})
        msg = await next_alarm()
        assert msg["change"] == "cleared"
        status, body = await api(collector, "GET", "/api/alarms?recent=1", token="viewer")
        assert body["alarms"] == [] and body["recent"][0]["id"] == a["id"]
