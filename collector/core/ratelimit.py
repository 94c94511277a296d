"""Rate limits for unauthenticated work, and the flapping ban (sans-IO: the caller passes `now`).

`SourceLimiter` is a token bucket per source address in a bounded table, plus one bucket for
all sources together. It is consulted before the collector spends a key lookup or a MAC on a
datagram that no session vouches for (a HELLO, a datagram for an unknown session, a datagram
for a known session from a new address), so a flood from one address costs it a dictionary
lookup per datagram, and a flood from many addresses at most `total` MACs a second.

`FlappingDetector` bans a device that registers more than `max_count` times within `window`
seconds for `ban` seconds (EMQX's flapping detection does the same for MQTT clients). Only
registrations that authenticated count, so nobody can get another device banned.
"""

from __future__ import annotations

import math


class SourceLimiter:
    def __init__(self, *, rate: float, burst: float, total: float, max_sources: int) -> None:
        self.rate = rate
        self.burst = burst
        self.total = total
        self.max_sources = max_sources
        self._buckets: dict[object, list[float]] = {}  # source -> [tokens, last refill time]
        self._global = [total, 0.0]
        self.limited = 0  # datagrams refused
        self.evicted = 0  # sources forgotten because the table was full

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: object, now: float) -> bool:
        """Take a token for `source` (and one from the shared bucket); False when either is
        empty: then the caller drops the datagram without any further work."""
        b = self._buckets.get(source)
        if b is None:
            if len(self._buckets) >= self.max_sources:
                self._make_room(now)
            b = self._buckets[source] = [self.burst, now]
        else:
            tokens = b[0] + (now - b[1]) * self.rate
            b[0] = tokens if tokens < self.burst else self.burst
            b[1] = now
        if b[0] < 1.0:
            self.limited += 1
            return False
        g = self._global
        tokens = g[0] + (now - g[1]) * self.total
        g[0] = tokens if tokens < self.total else self.total
        g[1] = now
        if g[0] < 1.0:
            self.limited += 1
            return False
        b[0] -= 1.0
        g[0] -= 1.0
        return True

    def _make_room(self, now: float) -> None:
        # Forget the sources whose buckets have refilled (they would start full anyway); if
        # every source is still busy, forget the oldest. A forgotten flooder starts over with
        # one burst, which the shared bucket still bounds.
        refill = self.burst / self.rate if self.rate > 0 else math.inf
        full = [k for k, b in self._buckets.items() if now - b[1] >= refill]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_sources:
            del self._buckets[next(iter(self._buckets))]
            self.evicted += 1


class FlappingDetector:
    def __init__(
        self, *, max_count: int, window: float, ban: float, max_devices: int = 100_000
    ) -> None:
        self.max_count = max_count
        self.window = window
        self.ban = ban
        self.max_devices = max_devices
        #: device -> its registration times within the window, oldest first (a list: a deque
        #: costs 600 bytes empty, and there is one per device); the dict is kept in order of
        #: each device's last registration, so stale entries leave from its front
        self._times: dict[str, list[float]] = {}
        self._banned: dict[str, float] = {}  # device -> ban ends (trio time)
        self.bans = 0  # bans imposed
        self.refused = 0  # registrations refused while banned

    def banned_for(self, device_id: str, now: float) -> float:
        """Seconds the device is still banned (0 if it may register)."""
        until = self._banned.get(device_id)
        if until is None:
            return 0.0
        if now >= until:
            del self._banned[device_id]
            return 0.0
        return until - now

    def check(self, device_id: str, now: float) -> float:
        """A device authenticated and wants to register: record it. Returns 0 if it may, else
        the seconds it is banned for (counted as refused)."""
        left = self.banned_for(device_id, now)
        if left:
            self.refused += 1
            return left
        all_times = self._times
        times = all_times.pop(device_id, None)
        self._forget_stale(now)
        if times is None:
            if len(all_times) >= self.max_devices:
                all_times.clear()  # only known devices get here: a safety net, not a policy
            times = []
        while times and now - times[0] >= self.window:
            del times[0]
        if len(times) >= self.max_count:
            self._banned[device_id] = now + self.ban
            self.bans += 1
            self.refused += 1
            return self.ban
        times.append(now)
        all_times[device_id] = times  # to the back: the most recent
        return 0.0

    def _forget_stale(self, now: float) -> None:
        """Drop devices whose last registration left the window (oldest first, amortised:
        each entry is dropped once)."""
        all_times = self._times
        while all_times:
            device_id = next(iter(all_times))
            if now - all_times[device_id][-1] < self.window:
                return
            del all_times[device_id]

    @property
    def banned(self) -> int:
        return len(self._banned)
