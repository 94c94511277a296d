"""Accepting connections with a graceful stop, shared by the TCP control and HTTP servers."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import trio


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
