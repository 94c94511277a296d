"""Alarms: threshold rules on readings, evaluated as the readings arrive (docs/ALARMS.md).

A rule (`[alarms.NAME]` in the configuration) names a metric glob and device globs, and any of
three conditions: `above` a value, `below` a value, or `no_data` for a number of seconds. One
alarm is kept per (rule, device, metric) that has fired, with the states operators know from
ISA-18.2 and ThingsBoard:

    normal --fires--> active, unacknowledged --ack--> active, acknowledged --clears--> (gone)
                              |                                            ^
                              +--clears--> cleared, unacknowledged --ack---+

A cleared alarm that nobody acknowledged stays listed, so a short excursion at night is still
there in the morning; one that fires again while listed becomes active again (its `count` goes
up). Each change is an `AlarmChange` handed to `emit` (the stream hub and the log take it).

The engine is sans-IO: `on_telemetry` is called from the ingest path with the readings,
`expire(now)` with the monotonic time when `next_deadline()` comes (the Trio layer, `serve`,
sleeps until then), `acknowledge` from the API. Readings of metrics no rule names cost one
dictionary lookup each. Everything that grows with input is capped and counted: alarms
(`max_alarms`), the (rule, device, metric) triples watched for `no_data` (`max_watched`), and
the memo of which rules apply to which (device, metric).
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import heapq
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import trio

from collector.core.events import Event, Telemetry

log = logging.getLogger("collector.alarms")

RULE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,48}")
SEVERITIES = ("info", "warning", "critical")
MAX_RULES = 256
MAX_ALARMS = 10_000
MAX_WATCHED = 100_000
MAX_MEMO = 200_000
RECENT = 200  # alarms that left the list, kept for /api/alarms?recent=1


class AlarmConfigError(ValueError):
    pass


@attrs.frozen
class AlarmRule:
    name: str
    metric: str = "*"
    devices: tuple[str, ...] = ("*",)
    above: float | None = None
    below: float | None = None
    no_data: float | None = None
    hysteresis: float = 0.0
    severity: str = "warning"
    description: str = ""

    def applies(self, device_id: str, metric: str) -> bool:
        return fnmatch.fnmatchcase(metric, self.metric) and any(
            fnmatch.fnmatchcase(device_id, g) for g in self.devices
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "devices": list(self.devices),
            "above": self.above,
            "below": self.below,
            "no_data": self.no_data,
            "hysteresis": self.hysteresis,
            "severity": self.severity,
            "description": self.description,
        }


#: key -> what it does (docs/CONFIGURATION.md and docs/ALARMS.md are made from this)
RULE_KEYS: dict[str, str] = {
    "metric": "a glob of the metric names the rule watches (required)",
    "devices": 'globs of the device ids it watches (default ["*"])',
    "above": "fire while a reading is above this value",
    "below": "fire while a reading is below this value",
    "no_data": "fire when a (device, metric) it watches has sent no reading for this many seconds",
    "hysteresis": "an alarm above (below) clears only when the value is back at or below `above - hysteresis` (at or above `below + hysteresis`); default 0",
    "severity": '"info", "warning" (default) or "critical"',
    "description": "a sentence for the page and the API",
}


def parse_rules(body: Any) -> tuple[AlarmRule, ...]:
    """`[alarms.NAME]` tables as rules; AlarmConfigError says what is wrong and where."""
    if not isinstance(body, Mapping):
        raise AlarmConfigError("[alarms] must hold tables: [alarms.NAME]")
    if len(body) > MAX_RULES:
        raise AlarmConfigError(f"[alarms]: at most {MAX_RULES} rules")
    rules = []
    for name, table in body.items():
        where = f"[alarms.{name}]"
        if not RULE_NAME.fullmatch(name):
            raise AlarmConfigError(f"{where}: a rule name is 1-48 of A-Z a-z 0-9 _ . -")
        if not isinstance(table, Mapping):
            raise AlarmConfigError(f"{where} must be a table")
        unknown = sorted(set(table) - set(RULE_KEYS))
        if unknown:
            raise AlarmConfigError(
                f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(RULE_KEYS)})"
            )
        kw: dict[str, Any] = {"name": name}
        metric = table.get("metric")
        if not isinstance(metric, str) or not 0 < len(metric) <= 128:
            raise AlarmConfigError(f"{where}: metric must be a glob of 1-128 characters")
        kw["metric"] = metric
        if "devices" in table:
            devices = table["devices"]
            if (
                not isinstance(devices, list)
                or not devices
                or not all(isinstance(g, str) and g for g in devices)
            ):
                raise AlarmConfigError(f"{where}: devices must be a list of globs")
            kw["devices"] = tuple(devices)
        for key in ("above", "below", "no_data", "hysteresis"):
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise AlarmConfigError(f"{where}: {key} must be a number, not {value!r}")
                if not math.isfinite(value):
                    raise AlarmConfigError(f"{where}: {key} must be finite")
                kw[key] = float(value)
        if all(kw.get(k) is None for k in ("above", "below", "no_data")):
            raise AlarmConfigError(f"{where}: give at least one of above, below, no_data")
        if kw.get("no_data") is not None and kw["no_data"] <= 0:
            raise AlarmConfigError(f"{where}: no_data must be a positive number of seconds")
        if kw.get("hysteresis", 0.0) < 0:
            raise AlarmConfigError(f"{where}: hysteresis must not be negative")
        if (
            kw.get("above") is not None
            and kw.get("below") is not None
            and kw["below"] >= kw["above"]
        ):
            raise AlarmConfigError(f"{where}: below must be under above")
        if (
            kw.get("above") is not None
            and kw.get("below") is not None
            and kw.get("hysteresis", 0.0) * 2 >= kw["above"] - kw["below"]
        ):
            raise AlarmConfigError(
                f"{where}: with both above and below, hysteresis must be under half the gap "
                "(an alarm must be able to clear between them)"
            )
        severity = table.get("severity", "warning")
        if severity not in SEVERITIES:
            raise AlarmConfigError(f"{where}: severity is one of {', '.join(SEVERITIES)}")
        kw["severity"] = severity
        description = table.get("description", "")
        if not isinstance(description, str) or len(description) > 500:
            raise AlarmConfigError(f"{where}: description must be text of at most 500 characters")
        kw["description"] = description
        rules.append(AlarmRule(**kw))
    return tuple(rules)


@attrs.define(slots=True, eq=False)
class Alarm:
    id: str
    key: tuple[int, str, str]
    rule: AlarmRule
    device: str
    metric: str
    condition: str  # above | below | no_data
    value: float | None  # the reading that made it fire (None for no_data)
    raised: float  # wall time it (last) fired
    state: str = "active"  # active | cleared
    acknowledged: bool = False
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    cleared: float | None = None
    last_value: float | None = None
    count: int = 1  # times it fired while listed

    @property
    def threshold(self) -> float | None:
        r = self.rule
        return {"above": r.above, "below": r.below, "no_data": r.no_data}[self.condition]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule.name,
            "severity": self.rule.severity,
            "description": self.rule.description,
            "device": self.device,
            "metric": self.metric,
            "condition": self.condition,
            "threshold": self.threshold,
            "value": self.value,
            "last_value": self.last_value,
            "state": self.state,
            "acknowledged": self.acknowledged,
            "acknowledged_at": self.acknowledged_at,
            "acknowledged_by": self.acknowledged_by,
            "raised": self.raised,
            "cleared": self.cleared,
            "count": self.count,
        }


@attrs.frozen
class AlarmChange:
    change: str  # raised | cleared | acknowledged | removed
    alarm: dict[str, Any]


class AlarmError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Key = tuple[int, str, str]  # (rule index, device, metric)


class AlarmEngine:
    def __init__(
        self,
        rules: Sequence[AlarmRule],
        *,
        wall: Callable[[], float],
        emit: Callable[[AlarmChange], None] = lambda change: None,
        max_alarms: int = MAX_ALARMS,
        max_watched: int = MAX_WATCHED,
        id_prefix: str = "",
    ) -> None:
        #: "NODE." on a cluster node or worker: ids stay unique across the processes
        self.id_prefix = id_prefix
        self.rules = tuple(rules)
        self.wall = wall
        self.emit = emit
        self.max_alarms = max_alarms
        self.max_watched = max_watched
        self.alarms: dict[Key, Alarm] = {}  # listed: active, or cleared and not acknowledged
        self.by_id: dict[str, Alarm] = {}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self._memo: dict[tuple[str, str], tuple[int, ...]] = {}
        # no_data: the monotonic time of the last reading per watched key, and a heap of
        # deadlines with at most one entry per key (re-armed when it comes due).
        self._last: dict[Key, float] = {}
        self._armed: set[Key] = set()
        self._heap: list[tuple[float, Key]] = []
        self._ids = 0
        self.wake = trio.Event()  # set when a deadline earlier than all others is armed
        # counts (collector_alarms_*_total)
        self.raised_total: collections.Counter[str] = collections.Counter()  # by rule
        self.acknowledged_total = 0
        self.cleared_total = 0
        self.refused = 0  # alarms that did not fit under max_alarms
        self.unwatched = 0  # keys not watched for no_data: max_watched was reached
        self.memo_resets = 0

    # -- evaluation ------------------------------------------------------------------------

    def _rules_for(self, device_id: str, metric: str) -> tuple[int, ...]:
        memo = self._memo
        if len(memo) >= MAX_MEMO:
            memo.clear()
            self.memo_resets += 1
        found = tuple(i for i, r in enumerate(self.rules) if r.applies(device_id, metric))
        memo[(device_id, metric)] = found
        return found

    def on_telemetry(self, batch: Sequence[Telemetry]) -> None:
        memo = self._memo
        now = None
        for t in batch:
            device_id = t.device_id
            for name, value in t.readings:
                idx = memo.get((device_id, name))
                if idx is None:
                    idx = self._rules_for(device_id, name)
                if not idx:
                    continue
                if now is None:
                    now = trio.current_time()
                for i in idx:
                    self._reading(i, device_id, name, value, now)

    def on_event(self, event: Event) -> None:
        pass  # a session's end is not the device's: removal calls forget_device

    def _reading(self, i: int, device_id: str, name: str, value: Any, now: float) -> None:
        rule = self.rules[i]
        key = (i, device_id, name)
        if rule.no_data is not None:
            if key in self._last or len(self._last) < self.max_watched:
                self._last[key] = now
                if key not in self._armed:
                    self._arm(key, now + rule.no_data)
            else:
                self.unwatched += 1
        alarm = self.alarms.get(key)
        if alarm is not None and alarm.state == "active" and alarm.condition == "no_data":
            self._clear(alarm)  # data again
            alarm = self.alarms.get(key)
        if value.__class__ is bool or not isinstance(value, int | float):
            return  # text and booleans have no threshold
        if alarm is not None:
            alarm.last_value = value
        condition = None
        if rule.above is not None and value > rule.above:
            condition = "above"
        elif rule.below is not None and value < rule.below:
            condition = "below"
        if condition is not None:
            # fires, or fires again for another reason (above, then below: a new condition)
            if alarm is None or alarm.state != "active" or alarm.condition != condition:
                self._raise(key, rule, device_id, name, condition, value)
            return
        if alarm is not None and alarm.state == "active" and alarm.condition != "no_data":
            h = rule.hysteresis
            if (alarm.condition == "above" and value <= rule.above - h) or (  # type: ignore[operator]
                alarm.condition == "below" and value >= rule.below + h  # type: ignore[operator]
            ):
                self._clear(alarm)

    def _arm(self, key: Key, deadline: float) -> None:
        self._armed.add(key)
        earlier = not self._heap or deadline < self._heap[0][0]
        heapq.heappush(self._heap, (deadline, key))
        if earlier:
            self.wake.set()

    def next_deadline(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def expire(self, now: float) -> None:
        """Fire `no_data` for every watched key whose deadline has come."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            last = self._last.get(key)
            if last is None:  # forgotten
                self._armed.discard(key)
                continue
            rule = self.rules[key[0]]
            assert rule.no_data is not None
            due = last + rule.no_data
            if due > now:
                heapq.heappush(heap, (due, key))  # a reading came since: re-arm
                continue
            self._armed.discard(key)  # the next reading arms it again
            alarm = self.alarms.get(key)
            if alarm is None or alarm.state != "active" or alarm.condition != "no_data":
                # silence is news even while the last value was out of range
                self._raise(key, rule, key[1], key[2], "no_data", None)

    # -- changes ---------------------------------------------------------------------------

    def _raise(
        self, key: Key, rule: AlarmRule, device: str, metric: str, condition: str, value: Any
    ) -> None:
        alarm = self.alarms.get(key)
        wall = self.wall()
        if alarm is None:
            if len(self.alarms) >= self.max_alarms:
                self.refused += 1
                return
            self._ids += 1
            alarm_id = f"{self.id_prefix}a{self._ids}"
            alarm = Alarm(alarm_id, key, rule, device, metric, condition, value, wall)
            self.alarms[key] = alarm
            self.by_id[alarm.id] = alarm
        else:  # cleared, not acknowledged yet: active again
            alarm.count += 1
            alarm.condition, alarm.value, alarm.raised = condition, value, wall
            alarm.state, alarm.cleared = "active", None
            alarm.acknowledged, alarm.acknowledged_at, alarm.acknowledged_by = False, None, None
        alarm.last_value = value
        self.raised_total[rule.name] += 1
        self.emit(AlarmChange("raised", alarm.to_json()))

    def _clear(self, alarm: Alarm) -> None:
        alarm.state = "cleared"
        alarm.cleared = self.wall()
        self.cleared_total += 1
        if alarm.acknowledged:
            self._drop(alarm)
        self.emit(AlarmChange("cleared", alarm.to_json()))

    def _drop(self, alarm: Alarm) -> None:
        self.alarms.pop(alarm.key, None)
        self.by_id.pop(alarm.id, None)
        self.recent.append(alarm.to_json())

    def acknowledge(self, alarm_id: str, by: str | None = None) -> dict[str, Any]:
        alarm = self.by_id.get(alarm_id)
        if alarm is None:
            raise AlarmError("unknown_alarm", f"no listed alarm {alarm_id[:60]!r}")
        if alarm.acknowledged:
            raise AlarmError("already_acknowledged", f"alarm {alarm_id} is already acknowledged")
        alarm.acknowledged = True
        alarm.acknowledged_at = self.wall()
        alarm.acknowledged_by = by
        self.acknowledged_total += 1
        if alarm.state == "cleared":
            self._drop(alarm)
        out = alarm.to_json()
        self.emit(AlarmChange("acknowledged", out))
        return out

    def forget_device(self, device_id: str) -> None:
        """A removed device: its alarms leave the list and nothing of it is watched."""
        for key in [k for k in self._last if k[1] == device_id]:
            del self._last[key]
        for alarm in [a for k, a in self.alarms.items() if k[1] == device_id]:
            self._drop(alarm)
            self.emit(AlarmChange("removed", alarm.to_json()))
        for k in [k for k in self._memo if k[0] == device_id]:
            del self._memo[k]

    # -- views -----------------------------------------------------------------------------

    @property
    def watched(self) -> int:
        return len(self._last)

    def listed(self) -> list[dict[str, Any]]:
        return [a.to_json() for a in self.alarms.values()]

    def counts(self) -> dict[str, Any]:
        active = collections.Counter(
            a.rule.severity for a in self.alarms.values() if a.state == "active"
        )
        return {
            "active": sum(active.values()),
            "active_by_severity": {s: active.get(s, 0) for s in SEVERITIES},
            "unacknowledged": sum(1 for a in self.alarms.values() if not a.acknowledged),
            "listed": len(self.alarms),
            "raised_total": dict(self.raised_total),
            "acknowledged_total": self.acknowledged_total,
            "cleared_total": self.cleared_total,
            "refused": self.refused,
            "unwatched": self.unwatched,
            "watched": self.watched,
        }

    def active_by_rule(self) -> Iterable[tuple[AlarmRule, int, int]]:
        """(rule, active alarms, unacknowledged alarms) for every rule."""
        active: collections.Counter[str] = collections.Counter()
        unacked: collections.Counter[str] = collections.Counter()
        for a in self.alarms.values():
            if a.state == "active":
                active[a.rule.name] += 1
            if not a.acknowledged:
                unacked[a.rule.name] += 1
        for r in self.rules:
            yield r, active[r.name], unacked[r.name]

    # -- the Trio layer: one task sleeps until the next no_data deadline ---------------------

    async def serve(
        self,
        guard: Callable[[], Any] = contextlib.nullcontext,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """`guard()`: the error boundary each round runs in (a bug costs that round)."""
        task_status.started()
        while True:
            with trio.move_on_at(self.next_deadline()):
                await self.wake.wait()
            self.wake = trio.Event()
            with guard():
                self.expire(trio.current_time())
