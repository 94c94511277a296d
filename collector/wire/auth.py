"""Registration proofs and session keys (sans-IO, pure functions).

All inputs are text so that a person can reproduce every value with `python3 -c` or
`openssl dgst`; docs/PROTOCOL.md gives the formulas and worked examples.

* A device's secret is a string; its UTF-8 bytes are the HMAC key. It never crosses the wire.
* TCP registration proof:  hex(HMAC-SHA256(secret, "register|<device>|<nonce>|<cnonce>"))
* UDP HELLO tag key:        HMAC-SHA256(secret, "hello")
* Session key:              HMAC-SHA256(secret, "session|<device>|<nonce>|<cnonce>|<session id>")

where <nonce> and <cnonce> are the server's and the device's 16-byte nonces in lowercase hex and
<session id> is the decimal session id.
"""

from __future__ import annotations

import hashlib
import hmac


def _mac(secret: str, message: str) -> bytes:
    return hmac.new(secret.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).digest()


def registration_proof(secret: str, device_id: str, nonce_hex: str, cnonce_hex: str) -> str:
    return _mac(secret, f"register|{device_id}|{nonce_hex}|{cnonce_hex}").hex()


def check_registration_proof(
    secret: str, device_id: str, nonce_hex: str, cnonce_hex: str, proof_hex: str
) -> bool:
    expected = registration_proof(secret, device_id, nonce_hex, cnonce_hex)
    return hmac.compare_digest(expected, proof_hex.lower())


def session_key(
    secret: str, device_id: str, nonce_hex: str, cnonce_hex: str, session_id: int
) -> bytes:
    return _mac(secret, f"session|{device_id}|{nonce_hex}|{cnonce_hex}|{session_id}")


def hello_key(secret: str) -> bytes:
    return _mac(secret, "hello")
