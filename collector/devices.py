"""The device credentials file: which devices may register, and their secrets.

The file is TOML, written by `collector devices add` and readable by hand::

    [devices."greenhouse-1"]
    secret = "7q0n1pC1..."

It holds secrets, so it is written atomically with mode 0600.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

from collector.wire.datagram import DEVICE_ID_RE


class DevicesError(ValueError):
    pass


def generate_secret() -> str:
    return secrets.token_urlsafe(24)


def check_device_id(device_id: str) -> str:
    if not DEVICE_ID_RE.match(device_id):
        raise DevicesError(
            f"bad device id {device_id!r}: use 1-64 of the characters A-Z a-z 0-9 _ . : -"
        )
    return device_id


class DeviceRegistry(Mapping[str, str]):
    """Device id -> secret. A read-only mapping plus `add()` and `save()`."""

    def __init__(self, secrets_by_id: Mapping[str, str] | None = None) -> None:
        self._secrets: dict[str, str] = {}
        for device_id, secret in (secrets_by_id or {}).items():
            self._secrets[check_device_id(device_id)] = secret

    def __getitem__(self, device_id: str) -> str:
        return self._secrets[device_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._secrets)

    def __len__(self) -> int:
        return len(self._secrets)

    def add(self, device_id: str, secret: str | None = None) -> str:
        check_device_id(device_id)
        if device_id in self._secrets:
            raise DevicesError(f"device {device_id!r} already exists")
        self._secrets[device_id] = secret or generate_secret()
        return self._secrets[device_id]

    @classmethod
    def load(cls, path: str | Path) -> DeviceRegistry:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise DevicesError(f"devices file {path} does not exist") from None
        except OSError as exc:
            raise DevicesError(f"cannot read devices file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise DevicesError(f"{path}: {exc}") from None
        table = data.get("devices", {})
        if not isinstance(table, dict):
            raise DevicesError(f"{path}: [devices] must be a table")
        out: dict[str, str] = {}
        for device_id, entry in table.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("secret"), str):
                raise DevicesError(f"{path}: device {device_id!r} needs a string 'secret'")
            out[device_id] = entry["secret"]
        return cls(out)

    @classmethod
    def load_or_empty(cls, path: str | Path) -> DeviceRegistry:
        return cls.load(path) if Path(path).exists() else cls()

    def to_toml(self) -> str:
        lines = [
            "# trio-collector device credentials: keep this file private.",
            "# Add devices with: collector devices add ID --devices FILE",
            "",
        ]
        for device_id, secret in self._secrets.items():
            # ids are restricted to [A-Za-z0-9_.:-] and secrets to URL-safe base64 (or are
            # escaped below), so plain quoting is exact TOML.
            lines += [f'[devices."{device_id}"]', f"secret = {_toml_string(secret)}", ""]
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_toml())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _toml_string(s: str) -> str:
    escaped = s.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in escaped):
        raise DevicesError("secrets must not contain control characters")
    return f'"{escaped}"'
