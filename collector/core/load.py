"""Whether the collector's event loop is busy: the one measure of load that decides when the
UDP loop and the stream wait a little to batch (a busy collector saves CPU by doing fewer,
bigger steps) and when they act at once (an idle one adds no delay)."""

from __future__ import annotations

import time
from collections.abc import Callable

#: the load is the share of a core the thread used over windows of this length
BUSY_WINDOW = 0.1
#: busy once a window's load passes this share ...
BUSY_SHARE = 0.5
#: ... and busy until a window's load falls below this one. Batching lowers the load it is
#: decided by, so with a single threshold a loop that is busy at 0.55 of a core and runs at
#: 0.45 while batching would switch every window and pay for both.
CALM_SHARE = 0.35


class BusyMeter:
    """The share of a core this thread used over the last complete window of `window` seconds:
    busy above `share`, and then until it falls below `calm`. Sans-IO: the caller passes the
    time (trio's clock); the CPU time comes from `cpu` (the thread's own, so other processes
    on the machine do not count).

    Cheap enough to ask per batch: it reads the CPU clock at most once a window. A window that
    spans an idle stretch measures a low share, so the first batch after quiet is never held
    back."""

    __slots__ = ("_busy", "_cpu", "_start", "_start_cpu", "calm", "share", "window")

    def __init__(
        self,
        share: float = BUSY_SHARE,
        window: float = BUSY_WINDOW,
        cpu: Callable[[], float] = time.thread_time,
        calm: float = CALM_SHARE,
    ) -> None:
        assert 0 <= calm <= share
        self.share = share
        self.calm = calm
        self.window = window
        self._cpu = cpu
        self._start: float | None = None
        self._start_cpu = 0.0
        self._busy = False

    def busy(self, now: float) -> bool:
        start = self._start
        if start is None:
            self._start, self._start_cpu = now, self._cpu()
        elif now - start >= self.window:
            used = self._cpu()
            load = (used - self._start_cpu) / (now - start)
            self._busy = load >= self.calm if self._busy else load > self.share
            self._start, self._start_cpu = now, used
        return self._busy
