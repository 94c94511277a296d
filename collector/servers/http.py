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
    GET  /api/replay                     replay position, speed, pause (stand-in only) (read)
    POST /api/replay                     {"action": "pause"|"resume"|"speed"|"seek", ...} (command)
    GET  /stream                         WebSocket upgrade                   (read)

Tokens: `Authorization: Bearer <token>`, or `?token=<token>` (browsers cannot set headers on a
WebSocket). With no tokens configured, access control is off.
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import mimetypes
import re
import urllib.parse
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio
import trio_websocket

from collector.core.commands import CommandError, command_json
from collector.core.events import format_address
from collector.logs import RateLimitedLog
from collector.servers import metrics
from collector.servers.serving import Acceptor

if TYPE_CHECKING:
    from collector.app import Collector

log = logging.getLogger("collector.http")

MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
WEB = resources.files("collector") / "web"

READ, COMMAND = 1, 2


class PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read from `stream`, then reads on."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, obj: Any) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode() + b"\n")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}})


class HttpServer:
    def __init__(
        self, app: Collector, *, read_tokens: tuple[str, ...], command_tokens: tuple[str, ...]
    ) -> None:
        assert app.hub is not None
        self.app = app
        self.hub = app.hub
        self.read_tokens = tuple(read_tokens)
        self.command_tokens = tuple(command_tokens)
        self.access_control = bool(read_tokens or command_tokens)
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.rlog = RateLimitedLog(log, app.config.log_rate_limit)
        self.registry = metrics.make_registry(app)
        self.acceptor = Acceptor()
        self.address: tuple[Any, ...] | None = None

    # -- serving -----------------------------------------------------------------------------

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.address = listeners[0].socket.getsockname()
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

    def _access(self, headers: dict[bytes, bytes], query: dict[str, list[str]]) -> int:
        if not self.access_control:
            return COMMAND
        token = None
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        elif "token" in query:
            token = query["token"][0]
        if token is None:
            return 0
        if any(hmac.compare_digest(token, t) for t in self.command_tokens):
            return COMMAND
        if any(hmac.compare_digest(token, t) for t in self.read_tokens):
            return READ
        return -1

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = format_address(stream.socket.getpeername()) or "?"
        except OSError:
            return
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        raw = bytearray()  # the bytes of the first request, in case it is a WebSocket upgrade
        first = True
        async with stream:
            try:
                while True:
                    with trio.move_on_after(IDLE_TIMEOUT if not first else REQUEST_TIMEOUT) as idle:
                        request, body = await self._read_request(
                            stream, conn, raw if first else None
                        )
                    if idle.cancelled_caught or request is None:
                        return
                    if self._is_upgrade(request):
                        if not first or request.target.split(b"?")[0] != b"/stream":
                            await self._send(
                                stream,
                                conn,
                                error_response(400, "bad_upgrade", "WebSocket only on /stream"),
                                "ws",
                            )
                            return
                        await self._websocket(stream, bytes(raw), request, peer)
                        return
                    first = False
                    route, response = self.route(request, body)
                    self.requests[(route, response.status)] += 1
                    await self._send(stream, conn, response, route, head=request.method == b"HEAD")
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
            except h11.RemoteProtocolError as exc:
                self.requests[("bad_request", 400)] += 1
                self.rlog.warning(
                    "bad_http", trio.current_time(), "bad HTTP request from %s: %s", peer, exc
                )
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send(
                        stream,
                        conn,
                        error_response(exc.error_status_hint, "bad_request", str(exc)),
                        "bad_request",
                    )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception:
                # This handler is an error boundary: a bug in answering one request closes that
                # connection (logged with its traceback, counted), never the collector.
                self.requests[("internal_error", 500)] += 1
                log.exception("internal error answering %s", peer)

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection, raw: bytearray | None
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if raw is not None and request is None:
                    raw += data
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
                if self._is_upgrade(event):
                    return request, b""
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    @staticmethod
    def _is_upgrade(request: h11.Request) -> bool:
        headers = {k.lower(): v.lower() for k, v in request.headers}
        return headers.get(b"upgrade") == b"websocket"

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
        await stream.send_all(data)

    async def _websocket(
        self, stream: trio.SocketStream, raw: bytes, request: h11.Request, peer: str
    ) -> None:
        target = request.target.decode("latin-1")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        headers = {k.lower(): v for k, v in request.headers}
        access = self._access(headers, query)
        async with trio.open_nursery() as nursery:
            ws_request = await trio_websocket.wrap_server_stream(
                nursery,
                PrefixedStream(stream, raw),
                max_message_size=self.hub.config.max_message,
            )
            if access < READ:
                self.requests[("stream", 401)] += 1
                self.hub.errors["unauthorized"] += 1
                self.rlog.warning(
                    "unauthorized",
                    trio.current_time(),
                    "stream from %s: bad or missing token",
                    peer,
                )
                await ws_request.reject(
                    401,
                    extra_headers=[
                        (b"content-type", b"application/json"),
                        (b"www-authenticate", b"Bearer"),
                    ],
                    body=b'{"error":{"code":"unauthorized","message":"a valid read token is needed"}}\n',
                )
                return
            if not self.hub.can_accept() or not self.app.accepting:
                self.requests[("stream", 503)] += 1
                await ws_request.reject(
                    503,
                    body=b'{"error":{"code":"unavailable","message":"too many subscribers or shutting down"}}\n',
                )
                return
            self.requests[("stream", 101)] += 1
            ws = await ws_request.accept()
            await self.hub.run_subscriber(ws, peer, can_command=access >= COMMAND)
            nursery.cancel_scope.cancel()

    # -- routing (synchronous: everything here answers from memory) ----------------------------

    def route(self, request: h11.Request, body: bytes) -> tuple[str, Response]:
        method = request.method.decode("ascii", "replace")
        split = urllib.parse.urlsplit(request.target.decode("latin-1"))
        path = urllib.parse.unquote(split.path)
        query = urllib.parse.parse_qs(split.query)
        headers = {k.lower(): v for k, v in request.headers}

        if path == "/" or path.startswith("/static/"):
            return "static", self._static(method, path)
        if path == "/healthz":
            return "healthz", self._healthz(method)
        access = self._access(headers, query)
        need = COMMAND if method == "POST" else READ
        if access < need:
            if access < READ:
                return path_route(path), error_response(
                    401, "unauthorized", "a valid bearer token is needed"
                )
            return path_route(path), error_response(
                403, "forbidden", "this token may read but not send commands"
            )
        if path == "/stream":  # a plain request where a WebSocket upgrade belongs
            return "stream", Response(
                426,
                json_response(
                    426,
                    {"error": {"code": "upgrade_required", "message": "connect with a WebSocket"}},
                ).body,
                headers=(("upgrade", "websocket"),),
            )
        if path == "/metrics":
            if method != "GET":
                return "metrics", error_response(405, "method_not_allowed", "GET only")
            return "metrics", Response(200, metrics.render(self.registry), metrics.CONTENT_TYPE)
        route = path_route(path)
        try:
            return route, self._api(method, path, query, body)
        except _ApiError as exc:
            return route, error_response(exc.status, exc.code, exc.message)

    def _static(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return error_response(405, "method_not_allowed", "GET only")
        name = "index.html" if path == "/" else path[len("/static/") :]
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)?", name) or ".." in name:
            return error_response(404, "not_found", f"no file {name!r}")
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
            },
        )

    def _api(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        parts = [p for p in path.split("/") if p]
        app = self.app
        if parts == ["api", "devices"]:
            _only(method, "GET")
            return json_response(
                200,
                {
                    "time": app.wall(),
                    "devices": [self.hub.device_summary(d) for d in self.hub.known_devices()],
                },
            )
        if len(parts) == 3 and parts[:2] == ["api", "devices"]:
            _only(method, "GET")
            device_id = parts[2]
            self._known(device_id)
            history = _int_param(query, "history", 0, self.hub.config.history)
            out = self.hub.device_summary(device_id, history=history)
            state = app.registry.devices.get(device_id)
            out["sessions"] = [attrs.asdict(h) for h in state.history] if state else []
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
                raise _ApiError(404, "unknown_command", f"no command {parts[2]!r}")
            return json_response(200, command_json(cmd))
        if parts == ["api", "replay"]:
            return self._replay(method, body)
        if parts == ["api", "config"]:
            _only(method, "POST")
            req = _json_body(body)
            match, config = req.get("match"), req.get("config")
            if not isinstance(match, str) or not isinstance(config, dict):
                raise _ApiError(400, "bad_config", 'send {"match": glob, "config": object}')
            return json_response(200, {"match": match, "sent_to": app.push_config(match, config)})
        raise _ApiError(404, "not_found", f"no route {path!r}")

    def _replay(self, method: str, body: bytes) -> Response:
        playback = self.app.playback
        if playback is None:
            raise _ApiError(
                404, "not_replaying", "this collector is live, not replaying a recording"
            )
        if method == "GET":
            return json_response(200, playback.status())
        _only(method, "POST")
        req = _json_body(body)
        action = req.get("action")
        try:
            if action == "pause":
                playback.pause()
            elif action == "resume":
                playback.resume()
            elif action == "speed":
                playback.set_speed(float(req.get("speed", 0)))
            elif action == "seek":
                playback.seek(float(req["position"]))
            else:
                raise _ApiError(400, "bad_action", "action is pause, resume, speed or seek")
        except (KeyError, TypeError, ValueError) as exc:
            raise _ApiError(400, "bad_action", f"{action}: {exc}") from None
        return json_response(200, playback.status())

    def _known(self, device_id: str) -> None:
        if device_id not in self.app.devices and device_id not in self.app.registry.devices:
            raise _ApiError(404, "unknown_device", f"no device {device_id!r}")


_COMMAND_ERROR_STATUS = {
    "unknown_device": 404,
    "queue_full": 409,
    "replay_mode": 409,
    "shutting_down": 503,
}


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def path_route(path: str) -> str:
    """A low-cardinality label for metrics: ids replaced by placeholders."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "devices"] and len(parts) >= 3:
        parts[2] = "{id}"
    if parts[:2] == ["api", "commands"] and len(parts) >= 3:
        parts[2] = "{id}"
    known = {
        "metrics",
        "api/devices",
        "api/devices/{id}",
        "api/devices/{id}/commands",
        "api/devices/{id}/kick",
        "api/commands/{id}",
        "api/config",
    }
    route = "/".join(parts)
    return route if route in known else "other"


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise _ApiError(405, "method_not_allowed", f"{allowed} only")


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        req = json.loads(body or b"{}")
    except ValueError:
        raise _ApiError(400, "bad_json", "the body must be a JSON object") from None
    if not isinstance(req, dict):
        raise _ApiError(400, "bad_json", "the body must be a JSON object")
    return req


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
