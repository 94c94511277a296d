"""Device credentials kept in Redis, shared by every node (`[cluster] shared_devices`).

Keys, under `[cluster] prefix` P:

    P:credentials            hash    device id -> secret
    P:credentials:seeded     string  the node whose devices file seeded the hash
    P:credentials:changes    stream  one entry per change: {"device", "from"} (JSON, field d)

The first node that joins with `shared_devices` seeds the hash with its devices file, in one
script (nothing of another seed is overwritten). From then on the hash is the truth: a node
takes all of it when it joins (and again after every reconnect), writes its own changes to it
(the API: add, remove, rotate), and follows the changes stream to take the others' within
milliseconds. Its devices file becomes its cache of the hash, so a node that restarts while
Redis is away still knows every device.

`collector devices add|remove|rotate|list --redis URL` works on the hash directly; every
node applies the change without a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from collector.devices import DevicesError, _check_secret, check_device_id
from collector.wire.jsonio import dumps_bytes

CHANGES_MAXLEN = 1000

SEED_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) end
  return 1
end
return 0
"""


class Keys:
    def __init__(self, prefix: str) -> None:
        self.hash = f"{prefix}:credentials"
        self.seeded = f"{prefix}:credentials:seeded"
        self.changes = f"{prefix}:credentials:changes"


async def write(c: Any, keys: Keys, changes: Mapping[str, str | None], origin: str) -> None:
    """Apply `changes` (device -> new secret, or None: removed) and announce each one, in one
    MULTI/EXEC transaction: a node never sees a change notice before the change."""
    from coredis.tokens import PureToken

    async with c.pipeline(transaction=True) as pipe:
        for device_id, secret in changes.items():
            if secret is None:
                pipe.hdel(keys.hash, [device_id])
            else:
                pipe.hset(keys.hash, {device_id: secret})
            pipe.xadd(
                keys.changes,
                {b"d": dumps_bytes({"device": device_id, "from": origin})},
                trim_strategy=PureToken.MAXLEN,
                trim_operator=PureToken.APPROXIMATELY,
                threshold=CHANGES_MAXLEN,
            )


async def seed(c: Any, keys: Keys, secrets: Mapping[str, str], origin: str) -> bool:
    """If no node seeded the hash yet, seed it with `secrets`; True if this call did."""
    args: list[str] = [origin]
    for device_id, secret in secrets.items():
        args += [device_id, secret]
    return bool(await c.eval(SEED_SCRIPT, keys=[keys.seeded, keys.hash], args=args))


async def seeded_by(c: Any, keys: Keys) -> str | None:
    raw = await c.get(keys.seeded)
    return None if raw is None else raw.decode(errors="replace")


def checked(raw: Mapping[bytes, bytes | None]) -> tuple[dict[str, str | None], list[str]]:
    """What the hash holds, checked like a devices file: (device -> secret or None, problems).
    A field that is not a valid device id or secret is left out and named in the problems."""
    out: dict[str, str | None] = {}
    problems = []
    for raw_id, raw_secret in raw.items():
        device_id = raw_id.decode(errors="replace")
        try:
            check_device_id(device_id)
            out[device_id] = (
                None
                if raw_secret is None
                else _check_secret(device_id, raw_secret.decode(errors="replace"), "redis")
            )
        except DevicesError as exc:
            problems.append(str(exc))
    return out, problems


async def read_all(c: Any, keys: Keys) -> tuple[dict[str, str], list[str]]:
    found, problems = checked(await c.hgetall(keys.hash))
    return {d: s for d, s in found.items() if s is not None}, problems


async def read_some(
    c: Any, keys: Keys, device_ids: list[str]
) -> tuple[dict[str, str | None], list[str]]:
    """The secrets of `device_ids` now (None: the device is no longer there)."""
    values = await c.hmget(keys.hash, device_ids)
    return checked(dict(zip((d.encode() for d in device_ids), values, strict=True)))
