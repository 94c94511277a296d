"""TLS for the TCP control channel and the HTTP port (the standard library's ssl, trio.SSLStream).

One certificate and key serve both ports; `client_ca` adds mutual TLS on the control channel
(a device must present a certificate signed by that authority). The context is built from the
files at startup and again on `reload()` (SIGHUP): connections made after a reload get the new
certificate, those already open keep theirs, so no session is dropped.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import trio

log = logging.getLogger("collector.tls")


class TlsError(Exception):
    """A certificate or key that cannot be used, with a message for a person."""


class TlsContexts:
    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.control, self.http = self._build()
        self.reloads = 0

    def _context(self, *, client_ca: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(
                f"cannot load the TLS certificate {self.cert} with key {self.key}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
        if client_ca:
            try:
                ctx.load_verify_locations(client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(f"cannot load the client CA {client_ca}: {exc}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _build(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        for path in (self.cert, self.key, self.client_ca):
            if path and not Path(path).is_file():
                raise TlsError(f"TLS file {path} does not exist")
        # Mutual TLS is for devices; browsers and dashboards on the HTTP port use tokens.
        return self._context(client_ca=self.client_ca), self._context(client_ca="")

    def reload(self) -> bool:
        """Load the files again; on an error keep the current certificate (and say why)."""
        try:
            self.control, self.http = self._build()
        except TlsError as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return True


async def accept_tls(
    stream: trio.SocketStream, context: ssl.SSLContext, within: float
) -> trio.SSLStream[trio.SocketStream]:
    """The server side of a TLS handshake, within `within` seconds; raises trio.BrokenResourceError
    (a failed handshake) or trio.TooSlowError."""
    # Not "https compatible": a close sends close_notify, so clients can tell an end from a cut.
    tls = trio.SSLStream(stream, context, server_side=True)
    with trio.fail_after(within):
        await tls.do_handshake()
    return tls


def client_context(ca: str | None = None) -> ssl.SSLContext:
    """What a device or a tool verifies the collector with: `ca` (a PEM bundle), or the
    system's certificate authorities."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
