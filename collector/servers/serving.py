"""Accepting connections with a graceful stop, shared by the TCP control and HTTP servers."""

from __future__ import annotations

import functools
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio


async def listen_tcp(
    port: int, host: str, what: str, sock: socket.socket | None = None
) -> list[trio.SocketListener]:
    """`trio.open_tcp_listeners`, with an error that names the port it could not bind; or a
    listener on `sock`, a listening socket made already (a worker's, from its parent)."""
    if sock is not None:
        sock.setblocking(False)
        return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise bind_error(exc, what, host, port) from exc


def bind_error(exc: OSError, what: str, host: str, port: int) -> OSError:
    """`exc` again, with `what host:port` as its filename so that the message says where."""
    return OSError(exc.errno, exc.strerror or str(exc), f"{what} port {host}:{port}")


class Acceptor:
    """Accept on `listeners` until `stop()`, then wait for the connections already open.

    The handlers run in an outer nursery and `trio.serve_listeners` in an inner one, so
    cancelling the inner one closes the listeners (no new connections) while the open
    connections carry on until they end or the caller cancels them.
    """

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None

    async def serve(
        self,
        handler: Callable[[trio.SocketStream], Awaitable[Any]],
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[Any],
        address: Any,
    ) -> None:
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as acceptor:
                self._scope = acceptor.cancel_scope
                await acceptor.start(
                    functools.partial(
                        trio.serve_listeners, handler, listeners, handler_nursery=handlers
                    )
                )
                task_status.started(address)

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
