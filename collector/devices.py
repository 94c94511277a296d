"""The device credentials file: which devices may register, and their secrets.

The file is TOML, written by `collector devices add` and readable (and editable) by hand::

    # the greenhouse, north side
    [devices."greenhouse-1"]
    secret = "7q0n1pC1..."

It holds secrets, so it is written atomically with mode 0600.

A change (`collector devices`, the HTTP API) keeps everything else in the file as the operator
wrote it: comments, order, other keys, line ends. The file is read with the standard library's
`tomllib`, and a change edits the lines of the device tables it touches (`edit_devices_text`):
a new secret replaces the value on the `secret =` line, a removed device loses its header and
key lines (comments stay, above and after it: they may be about the next table, or the
file's own), a new device is appended. The result is parsed again and must hold exactly the
devices wanted and everything else unchanged; a file these line edits do not fit (inline
tables, dotted keys, multi-line strings) is edited through tomlkit instead. Nothing is kept in
memory but the secrets. At 100,000 devices a read takes 1.8 s against 12.3 s with tomlkit,
whose document took about 370 MB (docs/PERFORMANCE.md, "The devices file at fleet size").
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
import threading
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import tomlkit

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: no lock among processes
    fcntl = None  # type: ignore[assignment]
import tomlkit.exceptions

from collector.wire.datagram import DEVICE_ID_RE


class DevicesFileError(OSError):
    """The devices file cannot be saved because of what it holds now (someone left it invalid):
    an OSError, like a full disk, so a change that cannot be saved is undone the same way."""


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
        self._save_lock = threading.Lock()  # one write of the file at a time (worker threads)
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
    def read(path: str | Path) -> dict[str, str]:
        """The devices a file holds, checked (DevicesError if it is not a valid devices file).
        It touches no registry, so it may run in a worker thread."""
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
            return devices_of(tomllib.loads(text), str(path))
        except tomllib.TOMLDecodeError as exc:
            raise DevicesError(f"{path}: not valid TOML: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> DeviceRegistry:
        return cls(cls.read(path))

    @classmethod
    def load_or_empty(cls, path: str | Path) -> DeviceRegistry:
        return cls.load(path) if Path(path).exists() else cls()

    def reload(self, path: str | Path) -> Changes:
        """Read the file again and take what it says now; returns what changed."""
        return self.replace(self.read(path))

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

    def snapshot(self) -> dict[str, str]:
        """A copy of the devices, to save from a worker thread while this registry changes."""
        return dict(self._secrets)

    def save(
        self,
        path: str | Path,
        devices: Mapping[str, str] | None = None,
        *,
        changes: Mapping[str, str | None] | None = None,
    ) -> None:
        """Bring the file to `devices` (default: this registry), keeping the rest of it; or,
        with `changes` (device -> secret, None: removed), apply only those to what the file
        holds now, so that devices another process wrote there meanwhile (another worker,
        `collector devices add --devices`, an edit waiting for SIGHUP) stay.

        Safe in a worker thread with a `snapshot()`: writes are one at a time, in this process
        and among processes (an flock on a lock file beside it), and each is atomic (a
        temporary file, fsync, rename)."""
        path = Path(path)
        wanted: Mapping[str, str] = self._secrets if devices is None else devices
        with self._save_lock, _file_lock(path):
            try:
                old = path.read_bytes().decode("utf-8")  # line ends as they are
            except FileNotFoundError:
                old = None
            except UnicodeDecodeError:
                raise DevicesFileError(f"{path} is not UTF-8 text: not saved") from None
            try:
                before = None if old is None else tomllib.loads(old)
                if changes is not None:
                    held = {} if before is None else devices_of(before, str(path))
                    for device_id, secret in changes.items():
                        if secret is None:
                            held.pop(device_id, None)
                        else:
                            held[device_id] = secret
                    wanted = held
                if old is None:
                    text = new_devices_text(wanted)
                else:
                    text = edit_devices(old, wanted, before=before)
            except tomllib.TOMLDecodeError as exc:
                raise DevicesFileError(f"{path}: not valid TOML: {exc}; not saved") from None
            except DevicesError as exc:
                raise DevicesFileError(f"{path}: {exc}; not saved") from None
            write_private(path, text)


def write_private(path: Path, text: str) -> None:
    """Replace the file with `text` atomically (a temporary file beside it, fsync, rename),
    mode 0600, line ends as they are in `text`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `.NAME.lock` beside the file, for one save among processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def devices_of(doc: Mapping[str, Any], where: str) -> dict[str, str]:
    """The checked device -> secret mapping of a parsed devices file."""
    table = doc.get("devices", {})
    if not isinstance(table, Mapping):
        raise DevicesError(f"{where}: [devices] must be a table")
    out: dict[str, str] = {}
    for device_id, entry in table.items():
        check_device_id(str(device_id))
        if not isinstance(entry, Mapping):
            raise DevicesError(f"{where}: device {device_id!r} must be a table with a 'secret'")
        out[str(device_id)] = _check_secret(device_id, entry.get("secret"), where)
    return out


# -- the file's text: sans-IO ------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_DEVICE_HEADER = re.compile(
    r"""[ \t]*\[[ \t]*devices[ \t]*\.[ \t]*(?:([A-Za-z0-9_-]+)|"([^"\\\n]*)"|'([^'\n]*)')"""
    r"""[ \t]*\][ \t]*(?:\#.*)?\r?\n?\Z"""
)
_SECRET_LINE = re.compile(
    r"""([ \t]*secret[ \t]*=[ \t]*)("(?:[^"\\\n]|\\.)*"|'[^'\n]*')(.*\n?)\Z""", re.DOTALL
)
_HEADER_NOTE = (
    "# trio-collector device credentials: keep this file private.\n"
    "# Add devices with: collector devices add ID --devices FILE\n"
)


def toml_string(value: str) -> str:
    """A TOML basic string (control characters are refused before this)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table_lines(device_id: str, secret: str) -> str:
    key = device_id if _BARE_KEY.match(device_id) else toml_string(device_id)
    return f"[devices.{key}]\nsecret = {toml_string(secret)}\n"


def new_devices_text(devices: Mapping[str, str]) -> str:
    """A new devices file."""
    return _HEADER_NOTE + "".join("\n" + _table_lines(d, s) for d, s in devices.items())


def edit_devices(
    text: str, devices: Mapping[str, str], *, before: dict[str, Any] | None = None
) -> str:
    """`text` (a devices file) brought to hold exactly `devices`, the rest kept: line edits
    when they fit the file, else tomlkit (slow on large files, but any valid TOML)."""
    edited = edit_devices_text(text, devices, before=before)
    return edited if edited is not None else edit_devices_tomlkit(text, devices)


def edit_devices_tomlkit(text: str, devices: Mapping[str, str]) -> str:
    """`edit_devices` through a tomlkit document: any valid TOML, comments kept where tomlkit
    keeps them (a removed table takes the comments right above the next one along)."""
    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise DevicesError(f"the devices file is not valid TOML: {exc}") from None
    if "devices" not in doc:
        doc["devices"] = tomlkit.table(is_super_table=True)
    table = doc["devices"]
    if not isinstance(table, Mapping) or not all(isinstance(t, Mapping) for t in table.values()):
        raise DevicesError("[devices] must be a table of tables")
    for device_id in [d for d in table if d not in devices]:
        del table[device_id]
    for device_id, secret in devices.items():
        if device_id in table:
            if table[device_id].get("secret") != secret:
                table[device_id]["secret"] = secret
        else:
            entry = tomlkit.table()
            entry["secret"] = secret
            table[device_id] = entry
    return tomlkit.dumps(doc)


def edit_devices_text(
    text: str, devices: Mapping[str, str], *, before: dict[str, Any] | None = None
) -> str | None:
    """The line edits of `edit_devices`, or None where they do not fit this file.

    The result is parsed again: it must hold exactly `devices`, and everything outside
    `[devices]` as `text` did."""
    if before is None:  # (`before`: `text` parsed already, by the caller)
        try:
            before = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return None
    had = before.get("devices", {})
    if not isinstance(had, dict) or not all(isinstance(t, dict) for t in had.values()):
        return None
    # Lines end at "\n" only (str.splitlines would split on U+2028 and others, which TOML
    # allows inside strings and comments); "\r\n" files stay so.
    parts = text.split("\n")
    lines = [line + "\n" for line in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    nl = "\r\n" if "\r\n" in text else "\n"
    headers: list[tuple[int, str | None]] = []  # (line, device id or None for another table)
    for i, line in enumerate(lines):
        if line.lstrip(" \t").startswith("["):
            m = _DEVICE_HEADER.match(line)
            if m is None:
                headers.append((i, None))
            else:
                bare, basic, literal = m.groups()
                headers.append(
                    (i, bare if bare is not None else basic if basic is not None else literal)
                )
    found = [d for _, d in headers if d is not None]
    if len(set(found)) != len(found):
        return None

    def body_end(start: int, end: int) -> int:
        """Where a removed table's lines end: after its last key (or value) line and the
        blank lines after it. Comment lines after its last key stay: they may be about the
        next table, or the file's own."""
        last = start
        for i in range(start + 1, end):
            stripped = lines[i].strip()
            if stripped and not stripped.startswith("#"):
                last = i
        i = last + 1
        while i < end and not lines[i].strip():
            i += 1
        return i

    drop: set[int] = set()
    replace: dict[int, str] = {}
    for k, (start, device_id) in enumerate(headers):
        if device_id is None:
            continue
        end = headers[k + 1][0] if k + 1 < len(headers) else len(lines)
        if device_id not in devices:
            drop.update(range(start, body_end(start, end)))
            continue
        wanted = devices[device_id]
        if device_id in had and had[device_id].get("secret") == wanted:
            continue
        for i in range(start + 1, end):
            m = _SECRET_LINE.match(lines[i])
            if m is not None:
                replace[i] = m.group(1) + toml_string(wanted) + m.group(3)
                break
        else:
            return None
    out = [replace.get(i, line) for i, line in enumerate(lines) if i not in drop]
    have = set(found)
    added = [d for d in devices if d not in have]
    if added:
        if out and not out[-1].endswith("\n"):
            out[-1] += nl
        for device_id in added:
            if out and out[-1].strip():
                out.append(nl)
            out.append(_table_lines(device_id, devices[device_id]).replace("\n", nl))
    result = "".join(out)
    try:
        after = tomllib.loads(result)
    except tomllib.TOMLDecodeError:
        return None
    rest = {k: v for k, v in after.items() if k != "devices"}
    if rest != {k: v for k, v in before.items() if k != "devices"}:
        return None
    got = after.get("devices", {})
    if not isinstance(got, dict) or set(got) != set(devices):
        return None
    for device_id, secret in devices.items():  # the secret wanted, the table's other keys kept
        if got[device_id] != {**had.get(device_id, {}), "secret": secret}:
            return None
    return result
