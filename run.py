#!/usr/bin/env python3
"""Set up the project's virtual environment if needed, then run the demo or the tests.

    python3 run.py demo [ARGS...]   # collector plus simulated sensors
    python3 run.py test [ARGS...]   # the whole test suite (extra ARGS go to pytest)
    python3 run.py shell            # install everything (tools, benchmarks, tests, linters);
                                    # print how to activate the environment

Only the standard library is used here, so this works on a fresh machine with Python 3.11+.
The environment lives in ./.venv and is reinstalled whenever pyproject.toml changes. Each
command installs only what it needs: the demo the collector alone, the tests the `tools` and
`test` extras, `shell` every extra.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".installed-from"
#: what each command installs (extras of pyproject.toml)
EXTRAS = {"demo": "", "test": "tools,test", "shell": "tools,bench,test,dev,parquet"}


def _wanted_stamp(extras: str) -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return f"{digest} {extras} {sys.version_info[:2]}"


def _installed(extras: str) -> bool:
    """Already installed: the same pyproject.toml, and at least these extras."""
    if not (STAMP.exists() and PYTHON.exists()):
        return False
    digest, have, version = [*STAMP.read_text().split(" ", 2), "", ""][:3]
    want = _wanted_stamp(extras).split(" ", 2)
    return (
        digest == want[0]
        and version == want[2]
        and set(filter(None, extras.split(","))) <= set(filter(None, have.split(",")))
    )


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script must explain itself on old Pythons
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    if _installed(extras):
        return
    if not PYTHON.exists():
        print(f"[run.py] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    print("[run.py] installing the project and its dependencies (once)", flush=True)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    target = f".[{extras}]" if extras else "."
    for args in (["install", "--upgrade", "pip"], ["install", "-e", target]):
        done = subprocess.run([*pip, *args], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            sys.exit(f"[run.py] pip {' '.join(args)} failed (exit {done.returncode})")
    STAMP.write_text(_wanted_stamp(extras))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    what, rest = argv[0], argv[1:]
    if what not in EXTRAS:
        print(f"unknown command {what!r}; try: demo, test, shell", file=sys.stderr)
        return 2
    ensure_venv(EXTRAS[what])
    os.chdir(ROOT)
    if what == "demo":
        cmd = [str(PYTHON), "-m", "collector", "demo", *rest]
    elif what == "test":
        cmd = [str(PYTHON), "-m", "pytest", *rest]
    elif what == "shell":
        print(f"source {BIN / 'activate'}")
        return 0
    else:
        print(f"unknown command {what!r}; try: demo, test", file=sys.stderr)
        return 2
    if os.name == "nt":
        return subprocess.call(cmd)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
