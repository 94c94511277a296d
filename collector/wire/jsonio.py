"""The one JSON boundary (sans-IO): every JSON the collector reads enters through
`loads_untrusted`, and everything it writes leaves through `dumps`.

The standard library's parser accepts more than JSON: `NaN`, `Infinity` and `-Infinity`, and
numbers such as `1e999` that overflow to infinity. Every encoder here refuses non-finite
numbers (as strict JSON must), so a value that got in would blow up later, far from where it
entered: in a command driver, a snapshot, a recording. So they stop here, with excessive
nesting, lone surrogates (which no UTF-8 encoder accepts) and integers too long to be numbers
anyone means. Inside the collector, JSON values are then plain and safe to encode.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: Containers deeper than this are refused; real messages are two or three levels deep.
MAX_DEPTH = 32
#: Integers beyond +-2**63 are refused: no device or dashboard means them, and they cannot be
#: stored in a recording or a time-series database.
MAX_INT = 2**63

_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonError(ValueError):
    """Not acceptable JSON; `message` says why, for the error answer."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _refuse_constant(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonError(f"{text[:32]} is out of range")
    return value


def _check(value: Any, max_depth: int) -> None:
    """Walk the parsed value without recursion: depth, integer range, surrogates."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise JsonError("a string holds a lone surrogate")
        elif isinstance(v, dict):
            if depth >= max_depth:
                raise JsonError(f"nested deeper than {max_depth} levels")
            for k, item in v.items():
                if _SURROGATE.search(k):
                    raise JsonError("a key holds a lone surrogate")
                stack.append((item, depth + 1))
        elif isinstance(v, list):
            if depth >= max_depth:
                raise JsonError(f"nested deeper than {max_depth} levels")
            stack.extend((item, depth + 1) for item in v)
        elif isinstance(v, int) and not isinstance(v, bool) and not -MAX_INT <= v < MAX_INT:
            raise JsonError("an integer is out of range")


def loads_untrusted(
    data: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH
) -> Any:
    """Parse JSON from the network (or any file a person may have edited).

    Raises JsonError, and nothing else, for anything that is not strict JSON or that the
    collector refuses to hold.
    """
    if isinstance(data, memoryview | bytearray):
        data = bytes(data)
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except JsonError:
        raise
    except RecursionError:
        raise JsonError(f"nested deeper than {max_depth} levels") from None
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise JsonError(f"not valid JSON ({str(exc)[:80]})") from None
    _check(value, max_depth)
    return value


def loads_object(
    data: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH
) -> dict[str, Any]:
    """`loads_untrusted` for messages, which are JSON objects."""
    value = loads_untrusted(data, max_depth=max_depth)
    if not isinstance(value, dict):
        raise JsonError("not a JSON object")
    return value


def dumps(value: Any) -> str:
    """Compact strict JSON; raises ValueError for a non-finite number (a bug: none gets in)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def dumps_bytes(value: Any) -> bytes:
    return dumps(value).encode()


try:  # 10-15x faster for the stream's rows (the hot path of every dashboard)
    import orjson as _orjson
except ImportError:  # pragma: no cover - a platform without an orjson wheel
    _orjson = None


def dumps_rows(rows: list[Any]) -> str:
    """A list of readings rows (strings and finite numbers, checked where they entered) as
    compact JSON: the same value as `dumps`, with orjson when it is installed (it writes a
    small float in plain decimal, `0.00001` where `json` writes `1e-05`)."""
    if _orjson is not None:
        return _orjson.dumps(rows).decode()
    return dumps(rows)


def check_value(value: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Apply the boundary's rules to a value that did not come from JSON text (a TOML table, a
    value built in code): only JSON types, finite numbers, string keys. Raises JsonError."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if v is None or isinstance(v, bool | str):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise JsonError(f"{v} is not a JSON number")
        elif isinstance(v, int):
            continue
        elif isinstance(v, dict | list):
            if depth >= max_depth:
                raise JsonError(f"nested deeper than {max_depth} levels")
            if isinstance(v, dict):
                if not all(isinstance(k, str) for k in v):
                    raise JsonError("object keys must be strings")
                stack.extend((item, depth + 1) for item in v.values())
            else:
                stack.extend((item, depth + 1) for item in v)
        else:
            raise JsonError(f"a {type(v).__name__} is not a JSON value")
    _check(value, max_depth)
