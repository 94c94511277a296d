"""Logging setup (stdlib logging, text or JSON lines) and a rate limiter for noisy problems."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _NodeFilter(logging.Filter):
    """Adds `node` to every record: a JSON line gets a "node" field."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


def setup_logging(
    level: str = "INFO", fmt: str = "text", stream: Any = None, *, node: str | None = None
) -> None:
    """Log lines to `stream` (stderr). `node`: the cluster node (a worker) each line is from."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if node is not None:
        handler.addFilter(_NodeFilter(node))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        where = "[%(node)s] " if node is not None else ""
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)-7s {where}%(name)s: %(message)s", "%H:%M:%S"
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """At most `per_second` lines per key and second; the rest are counted, then summarised.

    The caller passes the current time (trio.current_time()), so tests on the autojump clock see
    exactly which lines are logged.
    """

    def __init__(self, logger: logging.Logger, per_second: float = 10.0) -> None:
        self.logger = logger
        self.burst = max(1, int(per_second))
        self._windows: dict[str, list[float | int]] = {}  # key -> [window start, sent, suppressed]

    def log(self, level: int, key: str, now: float, msg: str, *args: Any) -> bool:
        w = self._windows.get(key)
        if w is None or now - w[0] >= 1.0:
            if w is not None and w[2]:
                self.logger.log(
                    level, "%s: %d similar lines suppressed in the last second", key, w[2]
                )
            w = self._windows[key] = [now, 0, 0]
        if w[1] >= self.burst:
            w[2] += 1
            return False
        w[1] += 1
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, now: float, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, key, now, msg, *args)

    def info(self, key: str, now: float, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, key, now, msg, *args)
