"""A private redis-server for `collector serve --workers N` when no cluster bus is configured:
the workers of one machine share their view of the devices through it, on a Unix socket only
they can reach, with nothing saved to disk."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from collector.config import Config
from collector.tools.options import EXIT_ENVIRONMENT, UserError

log = logging.getLogger("collector.workers")

START_TIMEOUT = 10.0


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
    finally:
        s.close()


@contextlib.asynccontextmanager
async def private_redis(config: Config) -> AsyncIterator[str]:
    """The bus URL: `[cluster] redis` when set; else, for more than one worker, a redis-server
    started here (stopped on exit); else "" (no bus)."""
    if config.redis or config.workers <= 1:
        yield config.redis
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise UserError(
            f"{config.workers} workers share their devices through a cluster bus: set [cluster] "
            "redis (or --redis redis://HOST:PORT), or install redis-server (Debian: apt-get "
            "install redis-server) and a private one is started for them",
            EXIT_ENVIRONMENT,
        )
    with tempfile.TemporaryDirectory(prefix="collector-bus-") as tmp:
        path = Path(tmp) / "redis.sock"
        proc = await trio.lowlevel.open_process(
            [binary, "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", tmp, "--loglevel", "warning"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            with trio.move_on_after(START_TIMEOUT):
                while not (path.exists() and _answers(path)):
                    if proc.returncode is not None or proc.poll() is not None:
                        raise UserError(
                            f"the private redis-server exited with status {proc.returncode}",
                            EXIT_ENVIRONMENT,
                        )
                    await trio.sleep(0.02)
            if not _answers(path):
                raise UserError(
                    f"the private redis-server did not answer in {START_TIMEOUT:.0f}s",
                    EXIT_ENVIRONMENT,
                )
            log.info("cluster bus: a private redis-server (pid %d) on %s", proc.pid, path)
            yield f"unix://{path}"
        finally:
            proc.terminate()
            with trio.move_on_after(5) as waited:
                await proc.wait()
            if waited.cancelled_caught:
                proc.kill()
                await proc.wait()
