"""The HTTP port: the dashboard page, the JSON API, /metrics, /healthz and the WebSocket stream.

Plain HTTP is parsed with h11. A request that asks to upgrade to a WebSocket on `/stream` is
handed, with the bytes already read, to trio-websocket, which never negotiates compression.

Routes (docs/STREAM.md has the details):

    GET  /                               the web dashboard (static files, no build step)
    GET  /static/<file>
    GET  /healthz                        always open
    GET  /metrics                        Prometheus text format            (read)
    GET  /api/devices                    every device, with stats and values  (read)
    GET  /api/devices/<id>[?history=N]   one device, its commands and sessions (read)
    GET  /api/commands/<id>              one command                         (read)
    POST /api/devices/<id>/commands      {"name", "args", "timeout", "expires_in"} (command)
    POST /api/devices/<id>/kick          end the device's session            (command)
    POST /api/config                     {"match": glob, "config": {...}}    (command)
    GET  /api/outputs                    each output: state, checkpoint, counts, lag (read)
    GET  /api/replay                     replay position, speed, pause (stand-in only) (read)
    POST /api/replay                     {"action": "pause"|"resume"|"speed"|"seek", ...} (command)
    GET  /stream                         WebSocket upgrade                   (read)

Tokens: `Authorization: Bearer <token>`, or `?token=<token>` (browsers cannot set headers on a
WebSocket). With no tokens configured, access control is off.

Every wait on a client has a deadline (`[http]` header, body, send and idle timeouts, the
stream's handshake timeout), connections are capped in all and per client address, and each
request is an error boundary: a bug answers 500 and costs nothing else.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import logging
import math
import mimetypes
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Awaitable, Iterator
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import h11
import trio
import trio_websocket

from collector.config import ConfigPushError
from collector.core import history
from collector.core.alarms import AlarmError
from collector.core.commands import CommandError, command_json
from collector.core.events import format_address
from collector.devices import DevicesError
from collector.logs import RateLimitedLog
from collector.servers import metrics
from collector.servers.serving import Acceptor, listen_tcp
from collector.servers.tls import accept_tls
from collector.servers.udp import kernel_drops
from collector.wire.jsonio import JsonError, dumps_bytes, loads_untrusted
from collector.wire.recording import RecordingError
from collector.wire.stream import server_text_frame

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from collector.config import Config
    from collector.core.commands import CommandManager, CommandRecord
    from collector.core.hub import StreamHub
    from collector.servers.tls import TlsContexts

log = logging.getLogger("collector.http")

WEB = resources.files("collector") / "web"
SEND_CHUNK = 64 * 1024  # a send makes progress at least this often, or times out
MAX_QUERY_FIELDS = 32
HISTORY_THREADS = 2  # history queries computed at once; more are answered 503 busy

READ, COMMAND = 1, 2


class PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read from `stream`, then reads on.

    Its writes are serialized by one lock, so that the stream's own text frames
    (`StreamWriter`) and trio-websocket's frames (pongs, pings, close) never interleave; what
    is left of a frame `offer` began is written before anything else."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix
        self._send_lock = trio.StrictFIFOLock()
        self.tail: memoryview | None = None  # the rest of a frame `offer` wrote in part
        # a plain TCP connection can be written without a trip through the scheduler
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            await self._send_tail()
            await self.stream.send_all(data)

    async def flush(self) -> None:
        """Write what is left of a frame `offer` began."""
        async with self._send_lock:
            await self._send_tail()

    async def _send_tail(self) -> None:
        # A send at a time, keeping what is left: a cancelled wait (a ping's timeout, the
        # stall watchdog) writes nothing twice, and whoever writes next finishes the frame.
        while self.tail is not None:
            assert self._sock is not None  # only `offer` makes a tail, on a plain socket
            try:
                sent = await self._sock.send(self.tail)
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket error: {exc}") from exc
            self.tail = self.tail[sent:] if sent < len(self.tail) else None

    @property
    def can_offer(self) -> bool:
        return self._sock is not None

    def offer(self, data: bytes) -> bool:
        """Write what the socket takes now, without waiting. What it does not take becomes
        `tail`, written before anything else (`flush`, `send_all`). False, and nothing
        written, when another write is in progress or a tail is pending, on TLS, or when the
        socket buffer is full; an error is left for `send_all` to raise."""
        if self._sock is None or self.tail is not None or self._send_lock.locked():
            return False
        fd = self._sock.fileno()  # asked each time: -1 once closed, never a reused number
        if fd < 0:
            return False
        try:
            sent = os.write(fd, data)
        except OSError:  # EAGAIN, or a broken connection: send_all finds out which
            return False
        if sent < len(data):
            self.tail = memoryview(data)[sent:]
        return True

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


class StreamWriter:
    """Sends the dashboard stream's text messages on a WebSocket as frames it builds itself.

    Through trio-websocket a message costs about 34 us of CPU here, most of it the two trips
    through the scheduler of `send_all`; written straight to a socket that has room it costs
    about 5 us (measured: docs/PERFORMANCE.md). Frames from the server are not masked, so a
    text frame is a header and the UTF-8 payload. Handshake, control frames and all reading
    stay with trio-websocket."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, stream: PrefixedStream) -> None:
        self.ws = ws
        self.stream = stream

    def offer(self, text: str) -> bool:
        """Write one message now if the socket takes it (see PrefixedStream.offer); False
        if not a byte of it was written (a full socket, TLS, or the WebSocket closing)."""
        if self.ws.closed is not None:  # closing or closed: no data frame may follow
            return False
        return self.stream.offer(server_text_frame(text.encode()))

    @property
    def pending(self) -> bool:
        return self.stream.tail is not None

    @property
    def can_offer(self) -> bool:
        return self.stream.can_offer

    async def flush(self) -> None:
        await self._wait(self.stream.flush())

    async def send_text(self, text: str) -> None:
        if self.ws.closed is not None:
            raise trio_websocket.ConnectionClosed(self.ws.closed)
        frame = server_text_frame(text.encode())
        if not self.stream.offer(frame):
            await self._wait(self.stream.send_all(frame))
        elif self.stream.tail is not None:
            await self.flush()

    async def _wait(self, send: Awaitable[None]) -> None:
        try:
            await send
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise trio_websocket.ConnectionClosed(
                self.ws.closed or trio_websocket.CloseReason(1006, "connection lost")
            ) from None


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    #: an answer that takes long to compute (GET /api/history): work(stopped) is run in a
    #: worker thread, at most HISTORY_THREADS at once; `stopped()` turns true when nobody
    #: waits for it any more (the collector shuts down). The work bounds itself (a scan reads
    #: at most history.DEFAULT_MAX_BYTES of segments, then answers `truncated`).
    work: Callable[[Callable[[], bool]], Response] | None = None
    #: an answer the event loop must wait for (a change to the devices, saved to the file in
    #: a worker thread): `await action()` gives the real answer
    action: Callable[[], Awaitable[Response]] | None = None


def json_response(status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, dumps_bytes(obj) + b"\n", headers=headers)


def error_response(
    status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}}, headers)


class _ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class _Timeout(Exception):
    """A client did not send (or take) what it had to within its deadline."""

    def __init__(self, kind: str, started: bool) -> None:
        super().__init__(kind)
        self.kind = kind
        self.started = started  # the client had sent part of a request


#: How long a closing connection keeps reading (and dropping) what the client still sends:
#: after a request that was not read to its end (an error, a timeout) ...
LINGER_INCOMPLETE = 1.0
#: ... and otherwise (a refusal before reading, an answer to a complete request).
LINGER = 0.1
LINGER_BYTES = 256 * 1024


async def _close(stream: trio.abc.Stream, linger: float = LINGER) -> None:
    """Close without losing what was sent. Closing a socket with unread input makes the kernel
    send a reset, which can discard an answer still in the client's buffers (a refusal, an
    error about a request it is still sending): so half-close first, and read and drop what
    the client still sends, for a moment and a bounded number of bytes (nginx's lingering
    close does the same). A TLS stream instead ends with its close_notify (a cancelled read
    would break it), so the client can tell the end from a cut."""
    if isinstance(stream, trio.SSLStream):
        with trio.move_on_after(linger + 1.0):
            try:
                await stream.aclose()
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)
        return
    with trio.move_on_after(linger):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            n = 0
            while n < LINGER_BYTES:
                data = await stream.receive_some(65536)
                if not data:
                    break
                n += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass
    await trio.aclose_forcefully(stream)


def _refusal(status: int, code: str, message: str) -> bytes:
    """A whole response, for refusing a connection before any request was read."""
    body = dumps_bytes({"error": {"code": code, "message": message}}) + b"\n"
    reason = HTTPStatus(status).phrase.encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


class HttpHost(metrics.MetricsHost, Protocol):
    """What the HTTP server uses of the collector (`collector.app.Collector` is one): what
    /metrics reads, and the API's actions."""

    accepting: bool
    cluster: Any  # a collector.cluster.bus.ClusterBus, or None
    commands: CommandManager
    config: Config
    hub: StreamHub
    playback: Any
    tls: TlsContexts | None
    wall: Callable[[], float]

    async def add_device(self, device_id: str) -> str: ...
    async def remove_device(self, device_id: str) -> bool: ...
    async def rotate_device(self, device_id: str) -> str: ...
    def kick(self, device_id: str) -> bool: ...
    def push_config(
        self, match: str, config: Mapping[str, Any], *, forward: bool = True
    ) -> tuple[list[str], dict[str, str]]: ...
    def send_command(
        self,
        device_id: str,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        expires_in: float | None = None,
    ) -> CommandRecord: ...


class HttpServer:
    def __init__(
        self, app: HttpHost, *, read_tokens: tuple[str, ...], command_tokens: tuple[str, ...]
    ) -> None:
        assert app.hub is not None
        cfg = app.config
        self.app = app
        self.hub = app.hub
        self.config = cfg
        self.set_tokens(read_tokens, command_tokens)
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.timeouts: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self.active = 0
        self.handshakes = 0
        self.per_client: collections.Counter[str] = collections.Counter()
        self.rlog = RateLimitedLog(log, cfg.log_rate_limit)
        self.registry = metrics.make_registry(app)
        self.acceptor = Acceptor()
        self.work_limiter = trio.CapacityLimiter(HISTORY_THREADS)
        self._drops: int | None = None  # kernel drops for /api/status, and when read
        self._drops_at = -math.inf
        self.address: tuple[Any, ...] | None = None
        self.tls_port: int | None = None
        self.plaintext_address: tuple[Any, ...] | None = None

    # -- serving -----------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        sock: socket.socket | None = None,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await listen_tcp(port, host, "HTTP", sock)
        self.address = listeners[0].socket.getsockname()
        tls = self.app.tls
        if tls is not None:
            self.tls_port = self.address[1]
            log.info("HTTPS on %s:%d (dashboard, API, metrics, WSS stream)", *self.address[:2])
            extra = self.config.tls_plaintext_http_port
            if extra >= 0:
                plain = await listen_tcp(extra, host, "plain-text HTTP")
                listeners += plain
                self.plaintext_address = plain[0].socket.getsockname()
                log.warning(
                    "PLAIN TEXT: the HTTP port is also on %s:%d without TLS ([tls] "
                    "plaintext_http_port): tokens and readings travel in the clear there",
                    *self.plaintext_address[:2],
                )
        else:
            log.warning(
                "PLAIN TEXT: HTTP on %s:%d without TLS: bearer tokens and readings travel in the "
                "clear (set [tls] cert and key)",
                *self.address[:2],
            )
        if not self.access_control:
            log.warning(
                "HTTP access control is OFF: anyone who can reach port %d can watch the stream "
                "and send commands (set [http] read_tokens / command_tokens)",
                self.address[1],
            )
        # After stop_accepting(), open connections (streams, keep-alive API connections) go on
        # until the collector's shutdown closes the streams and then cancels what is left.
        await self.acceptor.serve(self.handle, listeners, task_status, self.address)

    def stop_accepting(self) -> None:
        self.acceptor.stop()

    def set_tokens(self, read_tokens: tuple[str, ...], command_tokens: tuple[str, ...]) -> None:
        self.read_tokens = tuple(t.encode() for t in read_tokens)
        self.command_tokens = tuple(t.encode() for t in command_tokens)
        self.access_control = bool(read_tokens or command_tokens)

    def _access(self, headers: dict[bytes, bytes], query: dict[str, list[str]]) -> int:
        if not self.access_control:
            return COMMAND
        token: bytes | None = None
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            token = auth[7:].strip()
        elif "token" in query:
            token = query["token"][0].encode("utf-8", "surrogateescape")
        if token is None:
            return 0
        # Bytes, so any token a client sends compares in constant time (str would refuse
        # non-ASCII text with a TypeError).
        if any(hmac.compare_digest(token, t) for t in self.command_tokens):
            return COMMAND
        if any(hmac.compare_digest(token, t) for t in self.read_tokens):
            return READ
        return -1

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            # (a stream that is not a socket, in the tests, is one client called "memory")
            addr = stream.socket.getpeername() if hasattr(stream, "socket") else ("memory", 0)
        except OSError:
            await stream.aclose()
            return
        peer = format_address(addr) or "?"
        client = addr[0]
        cfg = self.config
        if (
            self.active >= cfg.http_max_connections
            or self.per_client[client] >= cfg.http_max_per_client
        ):
            which = "total" if self.active >= cfg.http_max_connections else "per_client"
            self.refused[which] += 1
            self.requests[("refused", 503)] += 1
            self.rlog.warning(
                "http_refused",
                trio.current_time(),
                "refused an HTTP connection from %s: too many connections (%s limit)",
                peer,
                which,
            )
            limit = cfg.http_max_connections if which == "total" else cfg.http_max_per_client
            with trio.move_on_after(1.0):
                try:
                    await stream.send_all(
                        _refusal(
                            503, "too_many_connections", f"at most {limit} connections ({which})"
                        )
                    )
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await _close(stream)
            return
        self.active += 1
        self.per_client[client] += 1
        try:
            tls = self.app.tls
            if (
                tls is not None
                and self.tls_port is not None
                and stream.socket.getsockname()[1] == self.tls_port
            ):
                try:
                    stream = await accept_tls(stream, tls.http, cfg.http_header_timeout)  # type: ignore[assignment]
                except (trio.BrokenResourceError, trio.TooSlowError):
                    self.timeouts["tls_handshake"] += 1
                    await trio.aclose_forcefully(stream)
                    return
            await self._serve_connection(stream, peer)
        finally:
            self.active -= 1
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]

    async def _serve_connection(self, stream: trio.SocketStream, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        raw = bytearray()  # the bytes of the first request, in case it is a WebSocket upgrade
        first = True
        linger = LINGER
        try:
            try:
                while True:
                    request, body = await self._read_request(
                        stream, conn, raw if first else None, first
                    )
                    if request is None:
                        return
                    if self._is_upgrade(request):
                        if not first or request.target.split(b"?")[0] != b"/stream":
                            response = error_response(
                                400, "bad_upgrade", "WebSocket only on /stream"
                            )
                            await self._send(stream, conn, response, "ws")
                            return
                        await self._websocket(stream, conn, bytes(raw), request, peer)
                        return
                    first = False
                    route, response = self._answer(request, body)
                    if response.work is not None:
                        response = await self._work(response.work, request)
                    elif response.action is not None:
                        response = await self._act(response.action, request)
                    self.requests[(route, response.status)] += 1
                    await self._send(stream, conn, response, route, head=request.method == b"HEAD")
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
            except h11.RemoteProtocolError as exc:
                linger = LINGER_INCOMPLETE
                status = exc.error_status_hint
                self.requests[("bad_request", status)] += 1
                self.rlog.warning(
                    "bad_http", trio.current_time(), "bad HTTP request from %s: %s", peer, exc
                )
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    code = "too_large" if status == 413 else "bad_request"
                    await self._send(
                        stream, conn, error_response(status, code, str(exc)), "bad_request"
                    )
            except _Timeout as exc:
                linger = LINGER_INCOMPLETE
                self.timeouts[exc.kind] += 1
                if (
                    exc.kind in ("header", "body")
                    and exc.started
                    and conn.our_state
                    in (
                        h11.IDLE,
                        h11.SEND_RESPONSE,
                    )
                ):
                    self.requests[("timeout", 408)] += 1
                    with trio.move_on_after(1.0):
                        await stream.send_all(
                            _refusal(
                                408,
                                "request_timeout",
                                f"the request took longer than its {exc.kind} timeout",
                            )
                        )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        finally:
            await _close(stream, linger)

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection, raw: bytearray | None, first: bool
    ) -> tuple[h11.Request | None, bytes]:
        cfg = self.config
        wait = cfg.http_header_timeout if first else cfg.http_idle_timeout
        deadline = trio.current_time() + wait
        kind = "header" if first else "idle"
        request: h11.Request | None = None
        body = bytearray()
        started = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_at(deadline) as cs:
                    data = await stream.receive_some(65536)
                if cs.cancelled_caught:
                    raise _Timeout(kind, started)
                if not started and data:
                    started = True
                    if kind == "idle":  # the next request began: its head gets the header timeout
                        kind, deadline = "header", trio.current_time() + cfg.http_header_timeout
                if raw is not None and request is None:
                    raw += data
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
                if self._is_upgrade(event):
                    return request, b""
                length = dict(event.headers).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > cfg.http_max_body:
                    raise h11.RemoteProtocolError(
                        f"request body over {cfg.http_max_body} bytes", error_status_hint=413
                    )
                kind, deadline = "body", trio.current_time() + cfg.http_body_timeout
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > cfg.http_max_body:
                    raise h11.RemoteProtocolError(
                        f"request body over {cfg.http_max_body} bytes", error_status_hint=413
                    )
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None, b""

    @staticmethod
    def _is_upgrade(request: h11.Request) -> bool:
        for k, v in request.headers:
            if k == b"upgrade":
                return v.lower() == b"websocket"
        return False

    async def _send(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        r: Response,
        route: str,
        *,
        head: bool = False,
    ) -> None:
        headers = [
            ("content-type", r.content_type),
            ("content-length", str(len(r.body))),
            # Static files revalidate too: after an upgrade, no old app.js with a new page.
            ("cache-control", "no-store" if route != "static" else "no-cache"),
            *r.headers,
        ]
        reason = (
            HTTPStatus(r.status).phrase.encode()
            if r.status in HTTPStatus._value2member_map_
            else b""
        )
        data = conn.send(h11.Response(status_code=r.status, headers=headers, reason=reason))
        if r.body and not head:  # a HEAD answer has the GET's headers and no body
            data += conn.send(h11.Data(data=r.body))
        data += conn.send(h11.EndOfMessage())
        await self._send_bytes(stream, data)

    async def _send_bytes(self, stream: trio.abc.Stream, data: bytes) -> None:
        """Send, making progress at least every `send_timeout` (a client that does not read
        is dropped; a slow one that does, however large the answer, is not)."""
        view = memoryview(data)
        for i in range(0, len(view), SEND_CHUNK):
            with trio.move_on_after(self.config.http_send_timeout) as cs:
                await stream.send_all(view[i : i + SEND_CHUNK])
            if cs.cancelled_caught:
                raise _Timeout("send", True)

    async def _websocket(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        raw: bytes,
        request: h11.Request,
        peer: str,
    ) -> None:
        try:
            _, query = _split_target(request.target)
        except _ApiError as exc:
            await self._send(
                stream, conn, error_response(exc.status, exc.code, exc.message), "stream"
            )
            return
        headers = {k.lower(): v for k, v in request.headers}
        access = self._access(headers, query)
        # Refusals are plain HTTP answers from here, and then the connection is closed: no
        # WebSocket machinery is started for a client that will not get a stream.
        if access < READ:
            self.requests[("stream", 401)] += 1
            self.hub.errors["unauthorized"] += 1
            self.rlog.warning(
                "unauthorized", trio.current_time(), "stream from %s: bad or missing token", peer
            )
            response = error_response(
                401,
                "unauthorized",
                "a valid read token is needed",
                (("www-authenticate", "Bearer"),),
            )
            await self._send(stream, conn, response, "stream")
            return
        if (
            not self.hub.can_accept()
            or not self.app.accepting
            or self.handshakes >= self.config.stream_max_handshakes
        ):
            self.requests[("stream", 503)] += 1
            self.hub.errors["unavailable"] += 1
            response = error_response(
                503, "unavailable", "too many subscribers or handshakes, or shutting down"
            )
            await self._send(stream, conn, response, "stream")
            return
        async with trio.open_nursery() as nursery:
            self.handshakes += 1
            try:
                with trio.move_on_after(self.config.stream_handshake_timeout) as cs:
                    prefixed = PrefixedStream(stream, raw)
                    ws_request = await trio_websocket.wrap_server_stream(
                        nursery, prefixed, max_message_size=self.hub.config.max_message
                    )
                    ws = await ws_request.accept()
            finally:
                self.handshakes -= 1
            if cs.cancelled_caught:
                self.timeouts["handshake"] += 1
                nursery.cancel_scope.cancel()
                return
            self.requests[("stream", 101)] += 1
            await self.hub.run_subscriber(
                ws,
                peer,
                can_command=access >= COMMAND,
                writer=StreamWriter(ws, prefixed),
            )
            nursery.cancel_scope.cancel()

    # -- routing (synchronous: everything here answers from memory) ----------------------------

    async def _work(
        self, work: Callable[[Callable[[], bool]], Response], request: h11.Request
    ) -> Response:
        """Run a long answer in a worker thread (the event loop, and so ingest, goes on)."""
        if self.work_limiter.borrowed_tokens >= self.work_limiter.total_tokens:
            return error_response(
                503, "busy", f"{HISTORY_THREADS} history queries are running: try again"
            )
        stop = threading.Event()

        def run() -> Response:
            try:
                return work(stop.is_set)
            except Exception as exc:
                what = f"{request.method.decode('ascii', 'replace')} {request.target[:200]!r}"
                trio.from_thread.run_sync(self.app.boundary.report, "http_request", exc, what)
                return error_response(
                    500, "internal_error", "the collector failed to answer this request"
                )

        try:
            return await trio.to_thread.run_sync(
                run, limiter=self.work_limiter, abandon_on_cancel=True
            )
        finally:
            stop.set()

    async def _act(
        self, action: Callable[[], Awaitable[Response]], request: h11.Request
    ) -> Response:
        """The boundary of an answer that waits: as `_answer`'s."""
        try:
            return await action()
        except _ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except Exception as exc:
            what = f"{request.method.decode('ascii', 'replace')} {request.target[:200]!r}"
            self.app.boundary.report("http_request", exc, what)
            return error_response(
                500, "internal_error", "the collector failed to answer this request"
            )

    def _answer(self, request: h11.Request, body: bytes) -> tuple[str, Response]:
        """The boundary of one request: a bug answers 500 and costs nothing else."""
        try:
            return self.route(request, body)
        except Exception as exc:
            what = f"{request.method.decode('ascii', 'replace')} {request.target[:200]!r}"
            self.app.boundary.report("http_request", exc, what)
            return "internal_error", error_response(
                500, "internal_error", "the collector failed to answer this request"
            )

    def route(self, request: h11.Request, body: bytes) -> tuple[str, Response]:
        method = request.method.decode("ascii", "replace")
        try:
            path, query = _split_target(request.target)
        except _ApiError as exc:
            return "bad_request", error_response(exc.status, exc.code, exc.message)
        headers = {k.lower(): v for k, v in request.headers}

        if path == "/" or path.startswith("/static/"):
            return "static", self._static(method, path)
        if path == "/healthz":
            if method not in ("GET", "HEAD"):
                return "healthz", _method_not_allowed("GET, HEAD")
            return "healthz", self._healthz(method)
        if path == "/api/openapi.json":  # open: what the API is, not what it holds
            if method not in ("GET", "HEAD"):
                return "api/openapi.json", _method_not_allowed("GET, HEAD")
            return "api/openapi.json", Response(200, (WEB / "openapi.json").read_bytes())
        access = self._access(headers, query)
        need = COMMAND if method in ("POST", "DELETE") else READ
        if access < need:
            if access < READ:
                return path_route(path), error_response(
                    401,
                    "unauthorized",
                    "a valid bearer token is needed",
                    (("www-authenticate", "Bearer"),),
                )
            return path_route(path), error_response(
                403, "forbidden", "this token may read but not send commands"
            )
        if path == "/stream":  # a plain request where a WebSocket upgrade belongs
            return "stream", error_response(
                426, "upgrade_required", "connect with a WebSocket", (("upgrade", "websocket"),)
            )
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                return "metrics", _method_not_allowed("GET, HEAD")
            return "metrics", Response(200, metrics.render(self.registry), metrics.CONTENT_TYPE)
        route = path_route(path)
        try:
            return route, self._api(method, path, query, body)
        except _ApiError as exc:
            return route, error_response(exc.status, exc.code, exc.message, exc.headers)

    def _static(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return _method_not_allowed("GET, HEAD")
        name = "index.html" if path == "/" else path[len("/static/") :]
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?", name) or ".." in name:
            return error_response(404, "not_found", f"no file {name[:100]!r}")
        resource = WEB.joinpath(*name.split("/"))
        if not resource.is_file():
            return error_response(404, "not_found", f"no file {name!r}")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        return Response(200, resource.read_bytes(), ctype)

    def _healthz(self, method: str) -> Response:
        s = self.app.statistics()
        status = "ok" if self.app.accepting else "stopping"
        return json_response(
            200 if self.app.accepting else 503,
            {
                "status": status,
                "uptime": round(s.uptime, 3),
                "devices_online": s.devices_online,
                "devices_known": len(self.app.devices),
                "stream_subscribers": len(self.hub.subscribers),
                **({"cluster": self._cluster_health()} if self.app.cluster is not None else {}),
                **(
                    {"outputs": {o.name: o.state for o in self.app.outputs}}
                    if self.app.outputs
                    else {}
                ),
            },
        )

    def _cluster_health(self) -> dict[str, Any]:
        c = self.app.cluster.status()
        return {
            "node": c["node"],
            "redis": c["redis"],
            "nodes": c["nodes"],
            "nodes_lost": c["lost_nodes"],
            "buffered": c["buffered"],
            "dropped": c["dropped"],
        }

    def _api(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        parts = [p for p in path.split("/") if p]
        app = self.app
        if parts == ["api", "devices"] and method == "POST":
            req = _json_body(body)
            device_id = req.get("id")
            if not isinstance(device_id, str):
                raise _ApiError(400, "bad_device", 'send {"id": "the new device id"}')

            async def add() -> Response:
                with _devices_change():
                    secret = await app.add_device(device_id)
                return json_response(201, {"id": device_id, "secret": secret})

            return Response(201, action=add)
        if parts == ["api", "devices"]:
            _only(method, "GET", allow="GET, HEAD, POST")
            return json_response(
                200,
                {
                    "time": app.wall(),
                    "devices": [self.hub.device_summary(d) for d in self.hub.known_devices()],
                },
            )
        if len(parts) == 3 and parts[:2] == ["api", "devices"] and method == "DELETE":
            device_id = parts[2]
            if device_id not in app.devices:
                raise _ApiError(404, "unknown_device", f"no device {device_id[:100]!r}")

            async def remove() -> Response:
                with _devices_change():
                    ended = await app.remove_device(device_id)
                return json_response(
                    200, {"id": device_id, "removed": True, "session_ended": ended}
                )

            return Response(200, action=remove)
        if len(parts) == 4 and parts[:2] == ["api", "devices"] and parts[3] == "rotate":
            _only(method, "POST")
            device_id = parts[2]
            if device_id not in app.devices:
                raise _ApiError(404, "unknown_device", f"no device {device_id[:100]!r}")

            async def rotate() -> Response:
                with _devices_change():
                    secret = await app.rotate_device(device_id)
                return json_response(200, {"id": device_id, "secret": secret})

            return Response(200, action=rotate)
        if len(parts) == 3 and parts[:2] == ["api", "devices"]:
            _only(method, "GET", allow="GET, HEAD, DELETE")
            device_id = parts[2]
            self._known(device_id)
            history = _int_param(query, "history", 0, self.hub.config.history)
            out = self.hub.device_summary(device_id, history=history)
            state = app.registry.devices.get(device_id)
            out["session_history"] = [attrs.asdict(h) for h in state.history] if state else []
            out["commands"] = [command_json(c) for c in app.commands.for_device(device_id)]
            return json_response(200, out)
        if len(parts) == 4 and parts[:2] == ["api", "devices"] and parts[3] == "commands":
            _only(method, "POST")
            device_id = parts[2]
            self._known(device_id)
            req = _json_body(body)
            name = req.get("name")
            args = req.get("args", {})
            if not isinstance(name, str) or not isinstance(args, dict):
                raise _ApiError(400, "bad_command", 'send {"name": string, "args": object}')
            for decl in app.config.declared_commands:
                if decl.name == name and decl.applies_to(device_id):
                    problem = decl.check(args)
                    if problem is not None:
                        raise _ApiError(400, "bad_command", problem)
                    break
            timeout = _opt_number(req, "timeout")
            expires = _opt_number(req, "expires_in")
            try:
                cmd = app.send_command(device_id, name, args, timeout=timeout, expires_in=expires)
            except CommandError as exc:
                status = _COMMAND_ERROR_STATUS.get(exc.code, 400)
                raise _ApiError(status, exc.code, exc.message) from None
            return json_response(202, command_json(cmd))
        if len(parts) == 4 and parts[:2] == ["api", "devices"] and parts[3] == "kick":
            _only(method, "POST")
            self._known(parts[2])
            if not app.kick(parts[2]):
                raise _ApiError(409, "not_online", f"device {parts[2]!r} is not online")
            return json_response(200, {"device": parts[2], "kicked": True})
        if len(parts) == 3 and parts[:2] == ["api", "commands"]:
            _only(method, "GET")
            cmd = app.commands.get(parts[2])
            if cmd is None:
                raise _ApiError(404, "unknown_command", f"no command {parts[2][:100]!r}")
            return json_response(200, command_json(cmd))
        if parts == ["api", "replay"]:
            return self._replay(method, body)
        if parts == ["api", "alarms"]:
            _only(method, "GET")
            return json_response(200, self._alarms(query))
        if len(parts) == 4 and parts[:2] == ["api", "alarms"] and parts[3] == "ack":
            _only(method, "POST")
            if app.alarms is None:
                raise _ApiError(404, "unknown_alarm", "this collector has no alarm rules")
            req = _json_body(body) if body.strip() else {}
            by = req.get("by")
            if by is not None and (not isinstance(by, str) or len(by) > 100):
                raise _ApiError(400, "bad_ack", '"by" is who acknowledges: text, at most 100')
            try:
                alarm = app.alarms.acknowledge(parts[2], by)
            except AlarmError as exc:
                status = 404 if exc.code == "unknown_alarm" else 409
                raise _ApiError(status, exc.code, exc.message) from None
            return json_response(200, alarm)
        if parts == ["api", "history"]:
            _only(method, "GET")
            return self._history(query)
        if parts == ["api", "status"]:
            _only(method, "GET")
            return json_response(200, self._status())
        if parts == ["api", "meta"]:
            _only(method, "GET")
            return json_response(
                200,
                {
                    "metrics": [m.to_json() for m in app.config.metrics_meta],
                    "alarm_rules": [r.to_json() for r in app.config.alarms],
                    "commands": [c.to_json() for c in app.config.declared_commands],
                    "recording": bool(app.history_dir),
                    "history_points": self.hub.config.history,
                },
            )
        if parts == ["api", "outputs"]:
            _only(method, "GET")
            return json_response(
                200, {"time": app.wall(), "outputs": [o.status() for o in app.outputs]}
            )
        if parts == ["api", "config"]:
            _only(method, "POST")
            req = _json_body(body)
            match, config = req.get("match"), req.get("config")
            if (
                not isinstance(match, str)
                or not 0 < len(match) <= 128
                or not isinstance(config, dict)
            ):
                raise _ApiError(400, "bad_config", 'send {"match": glob, "config": object}')
            try:
                sent, failed = app.push_config(match, config)
            except ConfigPushError as exc:
                status = 413 if exc.code == "config_too_large" else 409
                raise _ApiError(status, exc.code, exc.message) from None
            return json_response(200, {"match": match, "sent_to": sent, "failed": failed})
        raise _ApiError(404, "not_found", f"no route {path[:100]!r}")

    def _history(self, query: dict[str, list[str]]) -> Response:
        try:
            q = history.parse_query(query, self.app.wall())
        except history.HistoryError as exc:
            raise _ApiError(400, exc.code, exc.message) from None
        source = query.get("source", ["auto"])[0]
        if source not in ("auto", "memory", "recording"):
            raise _ApiError(400, "bad_history", "source is auto, memory or recording")
        record_dir = self.app.history_dir
        if source == "recording" and not record_dir:
            raise _ApiError(409, "not_recording", "this collector keeps no recording")
        rings = [(d, v.history) for d, v in self.hub.views.items()]
        if source == "memory" or (
            source == "auto" and (not record_dir or history.memory_covers(q, rings))
        ):
            # A copy of the matched series now (C-level array copies); the buckets in a thread.
            match = q.device_match()
            copied = [
                (d, {q.metric: _RingCopy(ring)})
                for d, series in rings
                if (ring := series.get(q.metric)) is not None and match(d)
            ]
            return Response(
                200,
                work=lambda stopped: json_response(200, history.from_memory(q, copied).to_json()),
            )

        def scan(stopped: Callable[[], bool]) -> Response:
            try:
                found = history.scan_recording(record_dir, q, cancelled=stopped)
            except RecordingError as exc:
                return error_response(409, "not_recording", f"the recording cannot be read: {exc}")
            return json_response(200, found.to_json())

        return Response(200, work=scan)

    def _status(self) -> dict[str, Any]:
        """The collector's own health, for the page's health panel: counters (the page turns
        them into rates) and states. Cheap at any fleet size: nothing per device."""
        app = self.app
        ing = app.ingest
        hub = self.hub
        now = trio.current_time()
        if now - self._drops_at >= 1.0:  # /proc/net/udp is read at most once a second
            self._drops = kernel_drops(ing.sock) if ing.sock is not None else None
            self._drops_at = now
        drops = self._drops
        return {
            "time": app.wall(),
            "uptime": round(trio.current_time() - app.started_at, 3),
            "mode": "replay" if app.playback is not None else "live",
            "accepting": app.accepting,
            "ingest": {
                "datagrams_received": ing.received,
                "datagrams_accepted": ing.accepted,
                "readings": ing.readings,
                "rejected": dict(ing.rejected),
                "kernel_drops": drops,
            },
            "sessions": {
                "online": len(app.registry.online),
                "known": len(app.devices),
                "opened": app.registry.opened,
                "ended": dict(app.registry.ended_by_reason),
            },
            "dashboards": {
                "subscribers": len(hub.subscribers),
                "missed": hub.missed_closed + sum(s.missed_total for s in hub.subscribers),
            },
            "recording": app.recorder.statistics() if app.recorder is not None else None,
            "outputs": [o.status() for o in app.outputs],
            "cluster": self._cluster_health() if app.cluster is not None else None,
            "alarms": app.alarms.counts() if app.alarms is not None else None,
            "internal_errors": dict(app.boundary.counts),
        }

    def _alarms(self, query: dict[str, list[str]]) -> dict[str, Any]:
        engine = self.app.alarms
        out: dict[str, Any] = {"time": self.app.wall()}
        if engine is None:
            out.update(rules=[], alarms=[], counts=None)
            return out
        out["rules"] = [r.to_json() for r in engine.rules]
        out["alarms"] = engine.listed()
        out["counts"] = engine.counts()
        if query.get("recent", ["0"])[0] not in ("0", ""):
            out["recent"] = list(engine.recent)
        return out

    def _replay(self, method: str, body: bytes) -> Response:
        playback = self.app.playback
        if playback is None:
            raise _ApiError(
                404, "not_replaying", "this collector is live, not replaying a recording"
            )
        if method in ("GET", "HEAD"):
            return json_response(200, playback.status())
        _only(method, "POST", allow="GET, HEAD, POST")
        req = _json_body(body)
        action = req.get("action")
        try:
            if action == "pause":
                playback.pause()
            elif action == "resume":
                playback.resume()
            elif action == "speed":
                playback.set_speed(_number(req, "speed"))
            elif action == "seek":
                playback.seek(_number(req, "position"))
            else:
                raise _ApiError(400, "bad_action", "action is pause, resume, speed or seek")
        except (KeyError, TypeError, ValueError) as exc:
            raise _ApiError(400, "bad_action", f"{action}: {exc}") from None
        return json_response(200, playback.status())

    def _known(self, device_id: str) -> None:
        cluster = self.app.cluster
        if (
            device_id not in self.app.devices
            and device_id not in self.app.registry.devices
            and (cluster is None or device_id not in cluster.remote)
        ):
            raise _ApiError(404, "unknown_device", f"no device {device_id[:100]!r}")


_COMMAND_ERROR_STATUS = {
    "unknown_device": 404,
    "queue_full": 409,
    "replay_mode": 409,
    "too_large": 413,
    "shutting_down": 503,
}


class _RingCopy:
    """A SeriesRing's arrays copied, for a worker thread (the hub appends to the originals)."""

    __slots__ = ("maxlen", "t", "v")

    def __init__(self, ring: Any) -> None:
        self.maxlen = ring.maxlen
        self.t = ring.t[-ring.maxlen :]
        self.v = ring.v[-ring.maxlen :]


def _split_target(target: bytes) -> tuple[str, dict[str, list[str]]]:
    """Path and query of a request target. Origin form (`/a/b?c=d`) is what clients send;
    absolute form (`http://host/a`) is accepted too. Raises _ApiError for anything else."""
    text = target.decode("latin-1")
    if not text.startswith("/"):
        try:
            split = urllib.parse.urlsplit(text)
        except ValueError:
            raise _ApiError(400, "bad_request", "the request target is not a valid URL") from None
        if split.scheme not in ("http", "https") or not split.path.startswith("/"):
            raise _ApiError(400, "bad_request", "the request target must be a path")
        path, query_text = split.path, split.query
    else:
        path, _, query_text = text.partition("?")
        query_text = query_text.partition("#")[0]
    try:
        query = urllib.parse.parse_qs(query_text, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise _ApiError(400, "bad_request", f"at most {MAX_QUERY_FIELDS} query fields") from None
    return urllib.parse.unquote(path), query


_DEVICES_ERROR_STATUS = {
    "bad_device": 400, "unknown_device": 404, "exists": 409, "read_only": 409,
    "cluster_backlog": 503,
}  # fmt: skip


@contextlib.contextmanager
def _devices_change() -> Iterator[None]:
    """A change to the devices: refusals as API errors, a file that cannot be saved as 500."""
    try:
        yield
    except DevicesError as exc:
        raise _ApiError(_DEVICES_ERROR_STATUS.get(exc.code, 400), exc.code, str(exc)) from None
    except OSError as exc:  # the change was undone; the file is as it was
        raise _ApiError(
            500,
            "save_failed",
            f"could not save the devices file ({exc.strerror or exc}); nothing was changed",
        ) from None


def path_route(path: str) -> str:
    """A low-cardinality label for metrics: ids replaced by placeholders."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "devices"] and len(parts) >= 3:
        parts[2] = "{id}"
    if parts[:2] in (["api", "commands"], ["api", "alarms"]) and len(parts) >= 3:
        parts[2] = "{id}"
    known = {
        "metrics",
        "api/devices",
        "api/devices/{id}",
        "api/devices/{id}/commands",
        "api/devices/{id}/kick",
        "api/devices/{id}/rotate",
        "api/commands/{id}",
        "api/config",
        "api/replay",
        "api/outputs",
        "api/alarms",
        "api/alarms/{id}/ack",
        "api/meta",
        "api/status",
        "api/history",
        "api/openapi.json",
    }
    route = "/".join(parts)
    return route if route in known else "other"


_ALLOW = {"GET": "GET, HEAD", "POST": "POST"}


def _method_not_allowed(allow: str) -> Response:
    return error_response(
        405, "method_not_allowed", f"this resource allows {allow}", (("allow", allow),)
    )


def _only(method: str, allowed: str, allow: str | None = None) -> None:
    ok = (allowed,) if allowed != "GET" else ("GET", "HEAD")
    if method not in ok:
        allow = allow or _ALLOW.get(allowed, allowed)
        raise _ApiError(
            405, "method_not_allowed", f"this resource allows {allow}", (("allow", allow),)
        )


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        req = loads_untrusted(body or b"{}")
    except JsonError as exc:
        raise _ApiError(400, "bad_json", f"the body must be a JSON object: {exc.message}") from None
    if not isinstance(req, dict):
        raise _ApiError(400, "bad_json", "the body must be a JSON object")
    return req


def _number(req: dict[str, Any], key: str) -> float:
    v = req.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{key!r} must be a number")
    return float(v)


def _opt_number(req: dict[str, Any], key: str) -> float | None:
    v = req.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 86400:
        raise _ApiError(400, "bad_command", f"{key!r} must be a number of seconds (0, 86400]")
    return float(v)


def _int_param(query: dict[str, list[str]], key: str, default: int, maximum: int) -> int:
    if key not in query:
        return default
    try:
        return max(0, min(int(query[key][0]), maximum))
    except ValueError:
        raise _ApiError(400, "bad_parameter", f"{key!r} must be an integer") from None
