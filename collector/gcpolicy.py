"""Short garbage-collection pauses however many devices the collector holds.

Python's full collection looks at every object that can be part of a reference cycle, and it
stops the event loop while it does. At 100,000 sessions the collector holds about five million
such objects (sessions, their tasks and cancel scopes, the devices file, trio's deadline heap),
and a full collection takes seconds: the UDP socket's buffer fills meanwhile and the kernel drops
what arrives. Most of those objects live as long as their device is registered; looking at them
again and again finds nothing.

So after a full collection that stopped the loop for longer than `freeze_pause` seconds, the
objects that survived it are moved to the permanent generation (`gc.freeze()`): later
collections look only at what was made since. Reference counting still frees every frozen
object the moment it is no longer used; only a *reference cycle* among objects frozen while they
were alive is never collected. The collector's own paths make none: a device's whole life
(registration over UDP and over TCP, datagrams, timeouts, closes and supersessions), and
connections that end badly (a control error, a dashboard closed for not answering pings,
kept-alive API requests, commands), all over TLS as well (`tests/test_gcpolicy.py`).

One cycle is not the collector's: trio's `SSLStream` holds a bound method of itself, so with TLS
every control and HTTP connection is one. A TLS connection alive at a freeze stays in memory after
it closes (once: a frozen object is frozen only once). That is why it is off by default
(`[server] gc_freeze_pause = 0`): turn it on for a large fleet that sends datagrams and uses
plain-text or few TLS connections.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("collector.gc")


class GcPolicy:
    """Times every full collection and freezes after one longer than `freeze_pause` (0: never).

    `install()` hooks into `gc.callbacks`. The freeze happens in the callback, right after the
    collection, when every object left is one that survived it (it only moves lists: nothing
    is allocated or freed). `schedule` runs `_after_freeze` soon after, outside the callback
    (a trio token's `run_sync_soon`); without it the line is logged at once and nothing else.
    """

    def __init__(
        self,
        freeze_pause: float,
        *,
        schedule: Callable[[Callable[[], None]], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.freeze_pause = freeze_pause
        self.schedule = schedule
        self.clock = clock
        self.full_collections = 0
        self.pause_total = 0.0
        self.pause_max = 0.0
        self.pause_last = 0.0
        self.freezes = 0
        self._started: float | None = None
        self._pending = False
        self._last_frozen = 0
        #: objects frozen, counted once after each freeze: gc.get_freeze_count() walks the
        #: whole permanent generation, far too slow for every scrape or inside the callback
        self._frozen = 0

    def install(self) -> None:
        self._pending = False
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        while self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def statistics(self) -> dict[str, float]:
        return {
            "full_collections": self.full_collections,
            "pause_total_seconds": round(self.pause_total, 6),
            "pause_max_seconds": round(self.pause_max, 6),
            "freezes": self.freezes,
            "frozen_objects": self.frozen(),
        }

    def frozen(self) -> int:
        """Objects in the permanent generation, as counted after the last freeze."""
        return self._frozen

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = self.clock()
            return
        if self._started is None:
            return
        took = self.clock() - self._started
        self._started = None
        self.full_collections += 1
        self.pause_total += took
        self.pause_last = took
        self.pause_max = max(self.pause_max, took)
        if self.freeze_pause > 0 and took > self.freeze_pause:
            gc.freeze()
            self.freezes += 1
            if self.schedule is None:
                self._count()
                self._log()
            elif not self._pending:
                self._pending = True
                try:
                    self.schedule(self._after_freeze)
                except Exception:  # the loop is gone (shutting down): no line then
                    self._pending = False

    def _after_freeze(self) -> None:
        """Soon after a freeze, outside the collector's callback: one more full collection,
        over only what was made since (milliseconds). Python starts a full collection when
        the objects that reached the oldest generation since the last one pass a quarter of
        those the last one left; a freeze does not reset that count, so without this the next
        full collection would wait for a quarter of everything frozen (a million objects at
        100,000 devices) and take seconds again."""
        self._pending = False
        if gc.isenabled():
            gc.collect()
        self._count()
        self._log()

    def _count(self) -> None:
        before, self._frozen = self._frozen, gc.get_freeze_count()
        self._last_frozen = self._frozen - before

    def _log(self) -> None:
        log.info(
            "a full garbage collection stopped the collector for %.0f ms: froze the %d objects "
            "that survived it, so later collections skip them (%d frozen in all)",
            self.pause_last * 1000,
            self._last_frozen,
            self._frozen,
        )
