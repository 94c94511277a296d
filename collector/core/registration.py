"""What UDP-only registration remembers, and what it must not need to (sans-IO; the caller
passes `now`, trio time).

A HELLO earns a WELCOME only with a cookie (docs/PROTOCOL.md 3.5): a MAC of the HELLO's source
address and client nonce under a secret that the collector draws at random when it starts and
replaces every `rotate` seconds, accepting the current and the previous one. So a cookie proves
that whoever sent the HELLO receives datagrams at that address, and is worthless after at most
two rotations or any restart: a HELLO captured on the path and replayed later, however many
times the collector restarted meanwhile, gets at most a new COOKIE, sealed under a key the
attacker does not have. Nothing here survives a restart, and nothing needs to.

Within one run, a captured HELLO with a still-valid cookie could be replayed from the same
(spoofed) address: `RecentRegistrations` remembers each device's client nonces for the cookie's
lifetime, so such a replay is answered with the WELCOME already sent (if it is the same
session, from the same address: a retransmission) or refused, and never opens a session.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from collector.wire.crypto import cookie_value


class CookieJar:
    def __init__(self, rotate: float = 60.0) -> None:
        self.rotate = rotate
        self._current = os.urandom(32)
        self._previous = os.urandom(32)
        self._rotated_at: float | None = None

    @property
    def lifetime(self) -> float:
        """The longest a cookie stays valid."""
        return 2 * self.rotate

    def _turn(self, now: float) -> None:
        if self._rotated_at is None:
            self._rotated_at = now
        elif now - self._rotated_at >= self.rotate:
            idle = now - self._rotated_at >= 2 * self.rotate
            self._previous = os.urandom(32) if idle else self._current
            self._current = os.urandom(32)
            self._rotated_at = now

    def make(self, now: float, address: tuple[str, int], client_nonce: bytes) -> bytes:
        self._turn(now)
        return cookie_value(self._current, address, client_nonce)

    def check(
        self, now: float, address: tuple[str, int], client_nonce: bytes, cookie: bytes
    ) -> bool:
        import hmac

        self._turn(now)
        return any(
            hmac.compare_digest(cookie_value(secret, address, client_nonce), cookie)
            for secret in (self._current, self._previous)
        )


@attrs.define
class Registration:
    client_nonce: bytes
    expires: float
    session_id: int
    address: Any
    welcome: bytes


class RecentRegistrations:
    """Each device's recent UDP registrations, for as long as their cookies could be valid.

    Bounded per device: a device may register at most `per_device` times within a cookie's
    lifetime (the flapping ban sees to that: `2 * flapping_max` covers two windows), and only
    devices in the credentials file get here."""

    def __init__(self, lifetime: float, per_device: int) -> None:
        self.lifetime = lifetime
        self.per_device = per_device
        #: device -> its registrations, oldest first (lists: a deque costs 600 bytes empty); the
        #: dict is in order of each device's last registration, so expired ones leave from
        #: its front
        self._by_device: dict[str, list[Registration]] = {}

    def find(self, now: float, device_id: str, client_nonce: bytes) -> Registration | None:
        recent = self._by_device.get(device_id)
        if not recent:
            return None
        while recent and recent[0].expires <= now:
            del recent[0]
        for r in recent:
            if r.client_nonce == client_nonce:
                return r
        return None

    def add(self, now: float, device_id: str, registration: Registration) -> None:
        by_device = self._by_device
        recent = by_device.pop(device_id, None)
        while by_device:  # devices whose every registration expired
            oldest = next(iter(by_device))
            if by_device[oldest][-1].expires > now:
                break
            del by_device[oldest]
        if recent is None:
            recent = []
        recent.append(registration)
        if len(recent) > self.per_device:
            del recent[0]
        by_device[device_id] = recent

    def forget(self, device_id: str) -> None:
        self._by_device.pop(device_id, None)
