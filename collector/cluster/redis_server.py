"""A private redis-server for `collector serve --workers N` when no cluster bus is configured:
the workers of one machine share their view of the devices through it, on a Unix socket only
they can reach, with nothing saved to disk.

redis-server runs under a small guard (`python -m collector.cluster.redis_server FD CMD...`)
that stops it when the collector is gone, even killed with -9: the guard holds the read end of
a pipe whose write end only the collector holds, and reads EOF when the kernel closes it."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
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
    life_r, life_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="collector-bus-") as tmp, os.fdopen(life_w, "wb"):
        path = Path(tmp) / "redis.sock"
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "collector.cluster.redis_server", str(life_r),
                 binary, "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--dir", tmp, "--loglevel", "warning"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(life_r,),
            )  # fmt: skip
        finally:
            os.close(life_r)
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


def guard(argv: list[str]) -> int:
    """Run CMD (redis-server) until it exits, SIGTERM comes, or FD reads EOF (the collector
    that started it is gone); then stop it (SIGTERM, and SIGKILL 5 s later)."""
    fd, cmd = int(argv[0]), argv[1:]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the collector decides
    while child.poll() is None and not stop:
        try:
            readable, _, _ = select.select([fd], [], [], 0.5)
        except InterruptedError:  # pragma: no cover (Python retries select itself)
            continue
        if readable and not os.read(fd, 64):
            break  # EOF: the collector is gone
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return child.returncode or 0


if __name__ == "__main__":
    sys.exit(guard(sys.argv[1:]))
