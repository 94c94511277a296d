"""The device credentials file: which devices may register, and their secrets.

The file is TOML, written by `collector devices add` and readable (and editable) by hand::

    # the greenhouse, north side
    [devices."greenhouse-1"]
    secret = "7q0n1pC1..."

It holds secrets, so it is written atomically with mode 0600. Edits through `collector devices`
keep everything else in the file as the operator wrote it (comments, order, other keys), with
tomlkit.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs
import tomlkit
import tomlkit.exceptions

from collector.wire.datagram import DEVICE_ID_RE


class DevicesError(ValueError):
    """A change or a file the devices registry refuses; `code` is the HTTP API's error code."""

    code = "bad_device"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


def generate_secret() -> str:
    return secrets.token_urlsafe(24)


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise DevicesError(
            f"bad device id {device_id!r}: use 1-64 of the characters A-Z a-z 0-9 _ . : -"
        )
    return device_id


def _check_secret(device_id: str, secret: object, where: str) -> str:
    if not isinstance(secret, str) or not secret:
        raise DevicesError(f"{where}: device {device_id!r} needs a non-empty string 'secret'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in secret):
        raise DevicesError(
            f"{where}: device {device_id!r}: a secret must not contain control characters"
        )
    return secret


@attrs.frozen
class Changes:
    """What a reload found: devices added, removed, and whose secret changed."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rotated: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.rotated)

    def describe(self) -> str:
        parts = [
            f"{label} {len(ids)} ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
            for label, ids in (
                ("added", self.added),
                ("removed", self.removed),
                ("new secret for", self.rotated),
            )
            if ids
        ]
        return "; ".join(parts) or "no change"


class DeviceRegistry(Mapping[str, str]):
    """Device id -> secret: a mapping, plus add, remove, rotate, save and reload."""

    def __init__(self, secrets_by_id: Mapping[str, str] | None = None) -> None:
        self._secrets: dict[str, str] = {}
        self._doc: tomlkit.TOMLDocument | None = None  # the file as read, to keep its comments
        for device_id, secret in (secrets_by_id or {}).items():
            self._secrets[check_device_id(device_id)] = _check_secret(device_id, secret, "devices")

    def __getitem__(self, device_id: str) -> str:
        return self._secrets[device_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._secrets)

    def __len__(self) -> int:
        return len(self._secrets)

    def add(self, device_id: str, secret: str | None = None) -> str:
        check_device_id(device_id)
        if device_id in self._secrets:
            raise DevicesError(f"device {device_id!r} already exists", "exists")
        self._secrets[device_id] = secret or generate_secret()
        return self._secrets[device_id]

    def remove(self, device_id: str) -> None:
        if device_id not in self._secrets:
            raise DevicesError(f"no device {device_id!r}", "unknown_device")
        del self._secrets[device_id]

    def rotate(self, device_id: str) -> str:
        """A new secret for the device (the old one stops working)."""
        if device_id not in self._secrets:
            raise DevicesError(f"no device {device_id!r}", "unknown_device")
        self._secrets[device_id] = generate_secret()
        return self._secrets[device_id]

    # -- files --------------------------------------------------------------------------------

    @staticmethod
    def _parse(path: str | Path) -> tuple[dict[str, str], tomlkit.TOMLDocument]:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DevicesError(
                f"devices file {path} does not exist (create it with: collector devices add ID --devices {path})"
            ) from None
        except OSError as exc:
            raise DevicesError(f"cannot read devices file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise DevicesError(f"{path}: not UTF-8 text") from None
        try:
            doc = tomlkit.parse(text)
        except tomlkit.exceptions.ParseError as exc:
            raise DevicesError(f"{path}: not valid TOML: {exc}") from None
        table = doc.get("devices", {})
        if not isinstance(table, Mapping):
            raise DevicesError(f"{path}: [devices] must be a table")
        out: dict[str, str] = {}
        for device_id, entry in table.items():
            check_device_id(str(device_id))
            if not isinstance(entry, Mapping):
                raise DevicesError(f"{path}: device {device_id!r} must be a table with a 'secret'")
            out[str(device_id)] = _check_secret(device_id, entry.get("secret"), str(path))
        return out, doc

    @classmethod
    def load(cls, path: str | Path) -> DeviceRegistry:
        found, doc = cls._parse(path)
        registry = cls(found)
        registry._doc = doc
        return registry

    @classmethod
    def load_or_empty(cls, path: str | Path) -> DeviceRegistry:
        return cls.load(path) if Path(path).exists() else cls()

    def reload(self, path: str | Path) -> Changes:
        """Read the file again and take what it says now; returns what changed."""
        found, doc = self._parse(path)
        changes = self.replace(found)
        self._doc = doc
        return changes

    def replace(self, found: Mapping[str, str]) -> Changes:
        """Take `found` (checked already) as the whole set of devices; returns what changed."""
        return self.update({**dict.fromkeys(self._secrets), **found})

    def update(self, changes: Mapping[str, str | None]) -> Changes:
        """Apply device -> secret (None: remove it), checked already; returns what changed."""
        added, removed, rotated = [], [], []
        for device_id, secret in changes.items():
            old = self._secrets.get(device_id)
            if secret is None:
                if old is not None:
                    del self._secrets[device_id]
                    removed.append(device_id)
            elif old is None:
                self._secrets[device_id] = secret
                added.append(device_id)
            elif old != secret:
                self._secrets[device_id] = secret
                rotated.append(device_id)
        return Changes(tuple(added), tuple(removed), tuple(rotated))

    def to_toml(self) -> str:
        doc = self._doc
        if doc is None:
            doc = tomlkit.document()
            doc.add(tomlkit.comment("trio-collector device credentials: keep this file private."))
            doc.add(tomlkit.comment("Add devices with: collector devices add ID --devices FILE"))
            doc.add(tomlkit.nl())
        if "devices" not in doc:
            doc["devices"] = tomlkit.table(is_super_table=True)
        table = doc["devices"]
        for device_id in [d for d in table if d not in self._secrets]:
            del table[device_id]
        for device_id, secret in self._secrets.items():
            if device_id in table:
                if table[device_id].get("secret") != secret:
                    table[device_id]["secret"] = secret
            else:
                entry = tomlkit.table()
                entry["secret"] = secret
                table[device_id] = entry
        self._doc = doc
        return tomlkit.dumps(doc)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_toml()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
