"""Connecting to the cluster bus: a Redis URL, or Redis Sentinel.

    redis://[[USER]:PASSWORD@]HOST:PORT/DB       one Redis
    rediss://...                                 one Redis over TLS
    unix:///PATH?db=N                            one Redis on a Unix socket
    redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]
                                                 the primary that these Sentinels name SERVICE

With Sentinel, the client asks the Sentinels for the primary of SERVICE on every connection,
so after a failover the next (re)join reaches the new primary. The user and password are the
primary's (Sentinels without a password are assumed).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import attrs

SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")


class BadRedisUrl(ValueError):
    pass


@attrs.frozen
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel(url: str) -> SentinelTarget:
    """redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]"""
    rest = url.removeprefix("redis+sentinel://")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        user, _, secret = auth.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) or None
    sentinels = []
    for part in netloc.split(","):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadRedisUrl(f"a Sentinel must be HOST:PORT, not {part!r} in {url!r}")
        sentinels.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise BadRedisUrl(
            f"say the Sentinel service (and optionally the db): "
            f"redis+sentinel://HOST:PORT/SERVICE[/DB], not {url!r}"
        )
    return SentinelTarget(
        tuple(sentinels),
        urllib.parse.unquote(parts[0]),
        int(parts[1]) if len(parts) == 2 else 0,
        username,
        password,
    )


def check_url(url: str) -> None:
    if not url.startswith(SCHEMES):
        raise BadRedisUrl(
            f"[cluster] redis must be a redis://, rediss://, unix:// or redis+sentinel:// URL, "
            f"not {url!r}"
        )
    if url.startswith("redis+sentinel://"):
        parse_sentinel(url)


@contextlib.asynccontextmanager
async def redis_client(url: str, **options: Any) -> AsyncIterator[Any]:
    """A coredis client for `url` (see the module's docstring), closed on exit."""
    import coredis  # only a clustered collector needs it

    if not url.startswith("redis+sentinel://"):
        async with coredis.Redis.from_url(url, **options) as client:
            yield client
        return
    from coredis.connection import TCPLocation

    target = parse_sentinel(url)
    extra = {k: options.pop(k) for k in ("decode_responses", "retry_policy") if k in options}
    sentinel = coredis.Sentinel(
        [TCPLocation(host, port) for host, port in target.sentinels],
        sentinel_kwargs={
            k: options[k] for k in ("connect_timeout", "stream_timeout") if k in options
        },
        **extra,
    )
    async with sentinel:
        client = sentinel.primary_for(
            target.service,
            db=target.db,
            username=target.username,
            password=target.password,
            **options,
        )
        async with client:
            yield client
