"""`collector serve --workers N`: N collector processes on one machine, one per core.

The parent process binds every socket and keeps them all open while it runs:

* UDP: N sockets on the one port, in a SO_REUSEPORT group whose steering program
  (collector/cluster/steering.py) gives each datagram of a session to the worker that holds it;
* TCP control channel and HTTP: N listening sockets each, in SO_REUSEPORT groups (the kernel
  spreads new connections over them by a hash of the addresses).

Worker i gets the i-th socket of each group (inherited descriptors) and runs a whole collector
on them, as node `NODE-i` of a cluster bus (collector/cluster/bus.py), through which each worker
sees the devices of the others: a dashboard or an API call reaches any worker and sees every
device. Because the parent holds the sockets, a worker that dies leaves its place in the groups
to the one that replaces it: its datagrams wait in its socket's buffer, its connections in its
listener's backlog, and no other worker's share moves.

The parent supervises: a worker that exits without being asked is started again after a
backoff (0.5 s, doubling to 30 s; back to 0.5 s after a worker has run for a minute); SIGHUP is
passed on to every worker; SIGINT or SIGTERM asks each to shut down gracefully and waits for
them, a second one kills them. At the end it prints one summary of what all of them did.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from collector.cluster import steering
from collector.config import Config
from collector.servers.serving import bind_error
from collector.servers.udp import set_rcvbuf

log = logging.getLogger("collector.workers")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: a worker that ran this long is healthy again: its next failure starts the backoff over
HEALTHY_AFTER = 60.0
#: a worker that fails this many times in a row before it ever becomes ready stops everything
#: (a bad config or a missing file: restarting will not help)
MAX_FAILED_STARTS = 3
READY_TIMEOUT = 60.0


@attrs.frozen
class WorkerSpec:
    """What a worker process is told by its parent (JSON on its command line)."""

    index: int
    count: int
    node: str
    udp_fd: int
    tcp_fd: int
    http_fd: int | None
    ready_fd: int  # the worker writes one line here when it serves
    report: str  # where the worker writes its shutdown report (JSON)
    stats: str | None = None  # where it writes its final statistics (--stats-json)
    redis: str = ""  # the cluster bus
    #: the read end of a pipe whose write end only the parent holds: EOF means the parent is
    #: gone (killed with -9 too), and the worker shuts down (-1: none)
    lifeline_fd: int = -1

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


@attrs.define
class WorkerSockets:
    udp: socket.socket
    tcp: socket.socket
    http: socket.socket | None

    def fds(self) -> list[int]:
        return [s.fileno() for s in (self.udp, self.tcp, self.http) if s is not None]

    def close(self) -> None:
        for s in (self.udp, self.tcp, self.http):
            if s is not None:
                s.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _reuseport(kind: int, host: str, port: int, what: str, *, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(_family(host), kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            set_rcvbuf(sock, rcvbuf)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise bind_error(exc, what, host, port) from exc
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_sockets(config: Config, count: int) -> list[WorkerSockets]:
    """Every worker's sockets, bound in worker order (the order is each socket's index in
    its SO_REUSEPORT group), with the steering program on the UDP group."""
    out: list[WorkerSockets] = []
    ports = {"udp": config.udp_port, "tcp": config.tcp_port, "http": config.http_port}
    try:
        for _ in range(count):
            udp = _reuseport(
                socket.SOCK_DGRAM, config.host, ports["udp"], "UDP", rcvbuf=config.udp_rcvbuf
            )
            ws = WorkerSockets(udp, None, None)  # type: ignore[arg-type]
            out.append(ws)
            ports["udp"] = udp.getsockname()[1]  # port 0: the others join the one it got
            ws.tcp = _reuseport(socket.SOCK_STREAM, config.host, ports["tcp"], "TCP")
            ports["tcp"] = ws.tcp.getsockname()[1]
            if ports["http"] is not None:
                ws.http = _reuseport(socket.SOCK_STREAM, config.host, ports["http"], "HTTP")
                ports["http"] = ws.http.getsockname()[1]
        if count > 1:
            steering.attach(out[0].udp, steering.steering_program(count))
    except BaseException:
        for ws in out:
            ws.close()
        raise
    return out


async def wait_for_parent_exit(fd: int) -> None:
    """Return when the parent is gone: the lifeline pipe's write end, which only the parent
    holds, is closed (by the kernel if the parent was killed), so the read end reads EOF.

    (Not PR_SET_PDEATHSIG: that signal follows the *thread* that forked the child, and Trio
    starts processes from a worker thread that exits after 10 s idle.)"""
    while True:
        await trio.lowlevel.wait_readable(fd)
        if not os.read(fd, 64):  # the parent never writes: readable means EOF
            return


@attrs.define
class Worker:
    index: int
    spec: WorkerSpec
    sockets: WorkerSockets
    process: trio.Process | None = None
    starts: int = 0
    restarts: int = 0
    failed_starts: int = 0  # in a row, before ready
    ready: bool = False
    done: bool = False  # no longer run (stopping, or given up)
    started_at: float = 0.0
    exit_codes: list[int] = attrs.Factory(list)


class Supervisor:
    """Runs `count` worker processes of `collector serve` (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        count: int,
        argv: Sequence[str],
        *,
        node: str,
        redis: str,
        stats_json: str | None = None,
    ) -> None:
        self.config = config
        self.count = count
        self.argv = list(argv)
        self.node = node
        self.redis = redis
        self.stats_json = stats_json
        self.workers: list[Worker] = []
        self.stopping = False
        self.addresses: dict[str, Any] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="collector-workers-"))
        self._all_ready = trio.Event()
        self._stopped = trio.Event()  # stop() or kill(): a worker waiting to restart does not
        self.all_stopped = trio.Event()  # set once stopping and every worker has exited
        self.failure: str | None = None

    def worker_node(self, index: int) -> str:
        return f"{self.node}-{index}"

    def bind(self) -> None:
        sockets = bind_sockets(self.config, self.count)
        first = sockets[0]
        self.addresses = {
            "udp": first.udp.getsockname(),
            "tcp": first.tcp.getsockname(),
            "http": first.http.getsockname() if first.http is not None else None,
        }
        for i, ws in enumerate(sockets):
            spec = WorkerSpec(
                index=i,
                count=self.count,
                node=self.worker_node(i),
                udp_fd=ws.udp.fileno(),
                tcp_fd=ws.tcp.fileno(),
                http_fd=ws.http.fileno() if ws.http is not None else None,
                ready_fd=-1,
                report=str(self._dir / f"report-{i}.json"),
                stats=f"{self.stats_json}.{i}" if self.stats_json else None,
                redis=self.redis,
            )
            self.workers.append(Worker(i, spec, ws))

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until `stop()` and they all exit. Reports when every worker serves."""
        async with trio.open_nursery() as nursery:
            for w in self.workers:
                nursery.start_soon(self._supervise, w)
            with trio.move_on_after(READY_TIMEOUT) as wait:
                await self._all_ready.wait()
            if wait.cancelled_caught or self.failure:
                self.failure = self.failure or f"the workers were not ready in {READY_TIMEOUT:.0f}s"
                self.stop()
                task_status.started(None)
            else:
                task_status.started(self.addresses)

    async def _supervise(self, w: Worker) -> None:
        try:
            await self._keep_running(w)
        finally:
            w.done = True
            if all(x.done for x in self.workers):
                self.all_stopped.set()

    async def _keep_running(self, w: Worker) -> None:
        delay = BACKOFF_FIRST
        while not self.stopping:
            try:
                code = await self._run_once(w)
            except OSError as exc:  # no process at all (EMFILE, EAGAIN): a failed start
                log.error("worker %d could not be started: %s", w.index, exc)
                w.ready = False
                w.started_at = trio.current_time()
                code = -1
            w.exit_codes.append(code)
            if self.stopping:
                return
            lived = trio.current_time() - w.started_at
            if not w.ready:
                w.failed_starts += 1
                if w.failed_starts >= MAX_FAILED_STARTS:
                    self.failure = (
                        f"worker {w.index} exited with status {code} before it was ready, "
                        f"{w.failed_starts} times in a row (see its log above)"
                    )
                    log.error("%s: stopping every worker", self.failure)
                    self.stop()
                    self._all_ready.set()  # wakes run(), which sees the failure
                    return
            if lived >= HEALTHY_AFTER:
                delay = BACKOFF_FIRST
            log.error(
                "worker %d (pid %s) exited with status %d after %.1fs: starting it again in %.1fs",
                w.index,
                w.process.pid if w.process else "?",
                code,
                lived,
                delay,
            )
            with trio.move_on_after(delay):  # a shutdown does not wait out the backoff
                await self._stopped.wait()
            delay = min(BACKOFF_MAX, delay * 2)
            w.restarts += 1

    async def _run_once(self, w: Worker) -> int:
        r, wfd = os.pipe()
        life_r, life_w = os.pipe()  # the worker's lifeline: this process keeps life_w open
        spec = attrs.evolve(w.spec, ready_fd=wfd, lifeline_fd=life_r)
        with os.fdopen(r, "rb", buffering=0) as ready_pipe, os.fdopen(life_w, "wb") as _:
            try:
                cmd = [sys.executable, "-m", "collector", "serve", *self.argv]
                cmd += ["--worker-spec", spec.to_json()]
                w.ready = False
                w.started_at = trio.current_time()
                w.process = await trio.lowlevel.open_process(
                    cmd, pass_fds=(*w.sockets.fds(), wfd, life_r), start_new_session=True
                )
            finally:
                os.close(wfd)
                os.close(life_r)
            w.starts += 1
            log.info("worker %d started (pid %d)", w.index, w.process.pid)
            if self.stopping:  # stop() came while it was being started
                w.process.send_signal(signal.SIGTERM)
            async with trio.open_nursery() as nursery:

                async def wait_ready() -> None:
                    line = await trio.to_thread.run_sync(
                        ready_pipe.readline, abandon_on_cancel=True
                    )
                    if line.startswith(b"ready"):
                        w.ready = True
                        w.failed_starts = 0
                        if all(x.ready for x in self.workers):
                            self._all_ready.set()

                nursery.start_soon(wait_ready)
                code = await w.process.wait()
                nursery.cancel_scope.cancel()
        return code

    def signal_all(self, signum: int) -> None:
        for w in self.workers:
            if w.process is not None and w.process.returncode is None:
                try:
                    w.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """Ask every worker to shut down gracefully (SIGTERM); none is started again."""
        self.stopping = True
        self._stopped.set()
        self.signal_all(signal.SIGTERM)

    def kill(self) -> None:
        self.stopping = True
        self._stopped.set()
        self.signal_all(signal.SIGKILL)

    def close(self) -> None:
        for w in self.workers:
            w.sockets.close()

    # -- the summary -----------------------------------------------------------------------

    def reports(self) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = []
        for w in self.workers:
            try:
                out.append(json.loads(Path(w.spec.report).read_text()))
            except (OSError, ValueError):
                out.append(None)
        return out

    def summary(self, duration: float) -> str:
        reports = self.reports()
        got = [r for r in reports if r is not None]
        missing = [w.index for w, r in zip(self.workers, reports, strict=True) if r is None]
        total = sum_reports(got)
        restarts = sum(w.restarts for w in self.workers)
        clean = not missing and all(r["clean"] for r in got)
        how = "complete" if clean else "forced"
        parts = [
            f"shutdown {how} in {duration:.2f}s: {self.count} workers"
            f" ({restarts} restart{'s' if restarts != 1 else ''})",
            f"{total.get('devices', 0)} devices, {total.get('sessions_ended', 0)} sessions ended",
            f"datagrams accepted {total.get('datagrams_accepted', 0)}, lost "
            f"{total.get('datagrams_lost', 0)}, rejected {total.get('datagrams_rejected', 0)}",
            f"commands abandoned {total.get('commands_abandoned', 0)}",
        ]
        if missing:
            parts.append(
                "no report from worker "
                + ", ".join(map(str, missing))
                + " (it did not stop cleanly)"
            )
        overran = sorted({s for r in got for s in r.get("overran", ())})
        if overran:
            parts.append(f"ran out of time: {', '.join(overran)}")
        return "; ".join(parts)

    def merge_stats(self) -> None:
        if not self.stats_json:
            return
        merged: dict[str, Any] = {"workers": {}}
        for w in self.workers:
            assert w.spec.stats is not None
            try:
                merged["workers"][w.spec.node] = json.loads(Path(w.spec.stats).read_text())
                Path(w.spec.stats).unlink()
            except (OSError, ValueError):
                merged["workers"][w.spec.node] = None
        Path(self.stats_json).write_text(json.dumps(merged, indent=1))


def sum_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for r in reports:
        for key, value in r.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total
