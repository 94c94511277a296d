"""Keys, proofs, nonces and cookies of protocol version 2 (sans-IO, pure functions).

docs/PROTOCOL.md section 1 is the specification; every value here has a test vector there.

* One AEAD for every datagram: ChaCha20-Poly1305 (RFC 8439), 32-byte keys, 12-byte nonces,
  16-byte tags.
* Every key comes from the device's secret through HKDF-SHA256 (RFC 5869). Per device, once:
  the auth key (TCP registration proofs) and one hello key per direction (HELLO, COOKIE). Per
  session: one key per direction, from both sides' fresh nonces and the session id.
* A datagram of a session is sealed under its direction's key with the nonce
  `u32 session id | u8 direction | 3 zero bytes | u32 sequence number`: unique for as long as
  sequence numbers are not reused within a session, which the protocol forbids (a device that
  loses its sequence number, by rebooting say, registers again and gets new keys).
* HELLO and COOKIE, which have no session yet, carry a random 12-byte nonce in the clear.
"""

from __future__ import annotations

import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

CIPHER = "chacha20-poly1305"
KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
COOKIE_LEN = 16
NONCE_HEX = 32  # TCP nonces: 16 bytes, as 32 lowercase hex digits

DEVICE_TO_COLLECTOR = 0
COLLECTOR_TO_DEVICE = 1

_INFO = b"trio-collector/2 "
_SESSION_NONCE = struct.Struct(">IB3xI")

__all__ = [
    "CIPHER",
    "COLLECTOR_TO_DEVICE",
    "DEVICE_TO_COLLECTOR",
    "Aead",
    "DeviceKeys",
    "InvalidTag",
    "cookie_value",
    "hkdf",
    "registration_proof",
    "session_keys",
    "session_nonce",
]

Aead = ChaCha20Poly1305


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.digest(salt or bytes(32), ikm, "sha256")


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 gives at most 8160 bytes")
    out, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes([i]), "sha256")
        out += block
    return out[:length]


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = KEY_LEN) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with `salt`, then expand with `info`."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


class DeviceKeys:
    """The keys of one device that do not change between sessions, derived from its secret."""

    __slots__ = ("auth", "hello_c2d", "hello_d2c", "secret")

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode("utf-8")
        prk = hkdf_extract(b"", self.secret)
        self.auth = hkdf_expand(prk, _INFO + b"auth", KEY_LEN)
        self.hello_d2c = hkdf_expand(prk, _INFO + b"hello device-to-collector", KEY_LEN)
        self.hello_c2d = hkdf_expand(prk, _INFO + b"hello collector-to-device", KEY_LEN)


def registration_proof(keys: DeviceKeys, device_id: str, nonce_hex: str, cnonce_hex: str) -> str:
    """hex(HMAC-SHA256(auth key, "register|<device>|<nonce>|<cnonce>")): the TCP proof."""
    message = f"register|{device_id}|{nonce_hex}|{cnonce_hex}".encode()
    return hmac.digest(keys.auth, message, "sha256").hex()


def check_registration_proof(
    keys: DeviceKeys, device_id: str, nonce_hex: str, cnonce_hex: str, proof_hex: str
) -> bool:
    expected = registration_proof(keys, device_id, nonce_hex, cnonce_hex)
    return hmac.compare_digest(expected.encode(), proof_hex.encode("ascii", "replace"))


def session_keys(
    secret: bytes, device_id: str, server_nonce: bytes, client_nonce: bytes, session_id: int
) -> tuple[bytes, bytes]:
    """(device-to-collector key, collector-to-device key) of one session.

    HKDF-SHA256 with the secret as input keying material, the collector's nonce followed by the
    device's as salt, and info = "trio-collector/2 session" | u8 id length | id | u32 session id.
    """
    raw_id = device_id.encode("ascii")
    info = _INFO + b"session" + bytes([len(raw_id)]) + raw_id + session_id.to_bytes(4, "big")
    okm = hkdf(secret, server_nonce + client_nonce, info, 2 * KEY_LEN)
    return okm[:KEY_LEN], okm[KEY_LEN:]


def session_nonce(session_id: int, direction: int, seq: int) -> bytes:
    return _SESSION_NONCE.pack(session_id, direction, seq)


def cookie_value(secret: bytes, address: tuple[str, int], client_nonce: bytes) -> bytes:
    """What the collector expects back in a HELLO: a MAC, under a secret only it knows and
    rotates, of the address the HELLO came from and the device's nonce."""
    host, port = address[0], address[1]
    message = (
        b"cookie|"
        + host.encode("ascii", "replace")
        + b"|"
        + port.to_bytes(2, "big")
        + b"|"
        + client_nonce
    )
    return hmac.digest(secret, message, "sha256")[:COOKIE_LEN]
