"""Error boundaries: where a bug in handling one input stops, is counted and is logged.

Every kind of handler (one HTTP request, one control message, one datagram, one command, one
listener call, one dashboard) runs inside a boundary. An exception there costs that one piece
of work: the handler answers what it can (a 500, a control `error`, a close with 1011), the
boundary counts it by kind (`collector_internal_errors_total{kind=...}`) and logs it with its
traceback, at most a few times a second per kind, with a count of what it suppressed. The
collector, and every other device and dashboard, carry on.

The loops that run the handlers (the accept loops, the UDP receive loop) are not boundaries: a
bug there is a bug in the collector itself and should stop it loudly.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("collector.errors")

#: The kinds of handler, as counted in /metrics.
KINDS = (
    "http_request",
    "control_message",
    "datagram",
    "command",
    "listener",
    "subscriber",
    "task",
    "output",
)


class ErrorBoundary:
    def __init__(self, clock: Callable[[], float], per_second: float = 2.0) -> None:
        self.clock = clock
        self.burst = max(1, int(per_second))
        self.counts: collections.Counter[str] = collections.Counter()
        self._windows: dict[str, list[float]] = {}  # kind -> [window start, logged, suppressed]

    def report(self, kind: str, exc: BaseException, what: str = "") -> None:
        """Count and (rate-limited) log an exception that a handler of `kind` did not expect."""
        self.counts[kind] += 1
        now = self.clock()
        w = self._windows.get(kind)
        if w is None or now - w[0] >= 1.0:
            if w is not None and w[2]:
                log.error("internal errors (%s): %d more suppressed in the last second", kind, w[2])
            w = self._windows[kind] = [now, 0, 0]
        if w[1] >= self.burst:
            w[2] += 1
            return
        w[1] += 1
        log.error(
            "internal error (%s)%s: %s: %s",
            kind,
            f" {what}" if what else "",
            type(exc).__name__,
            exc,
            exc_info=(type(exc), exc, exc.__traceback__),
        )

    @contextmanager
    def guard(self, kind: str, what: str = "") -> Iterator[None]:
        """Run a block as a handler of `kind`: an Exception is reported and swallowed."""
        try:
            yield
        except Exception as exc:
            self.report(kind, exc, what)
