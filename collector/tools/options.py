"""What every `collector` subcommand shares: one vocabulary of flags, value checks that say what
is wrong, and one way of ending (a line that says what and what to do, and an exit status).

Exit statuses, the same for every subcommand (docs/CONFIGURATION.md lists them too):

    0    it did what was asked
    1    it ran, but did not do what was asked (errors on the way, nothing received, a check
         that failed): the last line says what
    2    bad usage or bad input: a flag, a config file, a devices file, a recording
    3    the environment: a port in use, a permission, a collector that does not answer,
         no terminal
    130  interrupted (Ctrl-C)

Shared flags: `--devices FILE` is always a credentials file; `--device GLOB` always selects
devices (repeatable); `--host`, `--tcp-port`, `--udp-port`, `--http-port` are always the
collector's; `--tls` and `--ca FILE` make a client verify the collector's certificate.
"""

from __future__ import annotations

import argparse
import logging
import math
import ssl
import sys
from collections.abc import Callable
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class UserError(Exception):
    """Something a person can fix; `status` is the exit status (2 input, 3 environment)."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


# -- value types (argparse calls them; a ValueError or ArgumentTypeError becomes exit 2) ------


def port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a port is a number from 0 to 65535, not {text!r}"
        ) from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {n}")
    return n


def positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number above 0, not {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"a number above 0, not {text!r}")
    return v


def count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number, not {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"a whole number of 0 or more, not {v}")
    return v


def at_least(n: int) -> Callable[[str], int]:
    """An argparse type: a whole number of `n` or more."""

    def check(text: str) -> int:
        v = count(text)
        if v < n:
            raise argparse.ArgumentTypeError(f"a whole number of {n} or more, not {v}")
        return v

    return check


def seconds_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds from `low` to `high`."""

    def check(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a number of seconds, not {text!r}") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"from {low:g} to {high:g} seconds, not {v:g}")
        return v

    return check


def share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a share from 0 to 1, not {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"a share from 0 to 1 (0.05 is 5 %), not {v}")
    return v


def speed(text: str) -> float:
    """A replay speed: a factor above 0 (0.5, 1, 10), or `max`."""
    if text.strip().lower() == "max":
        return math.inf
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a speed is a factor above 0 (like 0.5, 1 or 10) or max, not {text!r}"
        ) from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(
            f"a speed is a factor above 0 (like 0.5, 1 or 10) or max, not {text!r}"
        )
    return v


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return level


# -- parsers and shared options ------------------------------------------------------------


def parser(prog: str, doc: str | None, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand's parser: the first paragraph of `doc` as its description, the rest as the
    epilog (examples, method), formatted as written."""
    parts = (doc or "").strip().split("\n\n", 1)
    return argparse.ArgumentParser(
        prog=prog,
        description=parts[0],
        epilog=parts[1] if len(parts) > 1 else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )


def add_collector_address(
    p: argparse.ArgumentParser,
    *,
    tcp: bool = True,
    udp: bool = True,
    http: bool = False,
    host: str = "127.0.0.1",
) -> None:
    p.add_argument("--host", default=host, help=f"the collector's address (default {host})")
    if tcp:
        p.add_argument(
            "--tcp-port", type=port, default=8080, help="its TCP control port (default 8080)"
        )
    if udp:
        p.add_argument("--udp-port", type=port, default=8081, help="its UDP port (default 8081)")
    if http:
        p.add_argument("--http-port", type=port, default=8082, help="its HTTP port (default 8082)")


def add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls",
        action="store_true",
        help="the collector's TCP port speaks TLS: verify it with the system's CAs",
    )
    p.add_argument(
        "--ca",
        metavar="FILE",
        help="verify the collector's certificate with this CA bundle (implies --tls)",
    )


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (getattr(args, "tls", False) or getattr(args, "ca", None)):
        return None
    from collector.servers.tls import client_context

    try:
        return client_context(args.ca)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(
            f"cannot use the CA bundle {args.ca}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def add_device_select(p: argparse.ArgumentParser, what: str = "devices") -> None:
    p.add_argument(
        "--device", metavar="GLOB", action="append", default=None,
        help=f"only the {what} whose id matches this glob (repeatable; default all)",
    )  # fmt: skip


def add_log_level(p: argparse.ArgumentParser, default: str = "WARNING") -> None:
    p.add_argument(
        "--log-level",
        type=log_level,
        default=default,
        help=f"DEBUG, INFO, WARNING or ERROR (default {default})",
    )


# -- ending ------------------------------------------------------------------------------


def fail(prog: str, message: str, status: int = EXIT_USAGE) -> NoReturn:
    raise SystemExit(_say(prog, message, status))


def _say(prog: str, message: str, status: int) -> int:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return status


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a subcommand's body, turning what a person caused into one line and an exit status
    (the traceback only with --log-level DEBUG), and a closed pipe (`| head`) into silence."""
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    try:
        return body()
    except UserError as exc:
        return _say(prog, exc.message, exc.status)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK
    except BaseExceptionGroup as group:
        found = first_user_error(group)
        if found is None or debug:
            raise
        return _say(prog, *found)
    except OSError as exc:
        if debug:
            raise
        return _say(prog, describe_os_error(exc), EXIT_ENVIRONMENT)


def first_user_error(group: BaseExceptionGroup) -> tuple[str, int] | None:
    """(message, status) of the first error in a (nested) exception group that a person can
    act on, if every error in it is one, or a cancellation."""
    from collector.config import ConfigError
    from collector.devices import DevicesError
    from collector.servers.tls import TlsError
    from collector.wire.recording import RecordingError

    todo: list[BaseException] = [group]
    found: tuple[str, int] | None = None
    import trio

    while todo:
        e = todo.pop()
        if isinstance(e, BaseExceptionGroup):
            todo.extend(reversed(e.exceptions))
        elif isinstance(e, trio.Cancelled | KeyboardInterrupt):
            continue
        elif isinstance(e, UserError):
            found = found or (e.message, e.status)
        elif isinstance(e, ConfigError | DevicesError | RecordingError | TlsError):
            found = found or (str(e), EXIT_USAGE)
        elif isinstance(e, OSError):
            found = found or (describe_os_error(e), EXIT_ENVIRONMENT)
        else:
            return None
    return found


def describe_os_error(exc: OSError) -> str:
    """An OSError as a person would say it, with what to do where there is something to do."""
    import errno

    what = exc.strerror or str(exc)
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if exc.errno == errno.EADDRINUSE:
        return f"{what}{where}: another program (another collector?) has that port; stop it, or choose other ports (--tcp-port, --udp-port, --http-port; 0 picks a free one)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{what}{where}: ports below 1024 need privileges (use 8080 and up), and directories need write permission"
    if exc.errno == errno.ECONNREFUSED:
        return f"{what}: no collector answers there; is it running, and are --host and the ports right?"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{what}{where}: that address is not one of this machine's (check --host)"
    return f"{what}{where}"


def _quiet_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def require(module: str, extra: str, what: str) -> None:
    """Fail with a clear line if an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"{what} needs the '{extra}' extra ({module} is missing): pip install 'trio-collector[{extra}]'"
        )
