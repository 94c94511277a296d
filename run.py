#!/usr/bin/env python3
"""Set up the project's virtual environment if needed, then run the demo or the tests.

    python3 run.py demo [ARGS...]   # collector plus simulated sensors
    python3 run.py test [ARGS...]   # the whole test suite (extra ARGS go to pytest)
    python3 run.py shell            # print how to activate the environment

Only the standard library is used here, so this works on a fresh machine with Python 3.11+.
The environment lives in ./.venv and is reinstalled whenever pyproject.toml changes.
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
EXTRAS = "tools,bench,test,dev"


def _wanted_stamp() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return f"{digest} {EXTRAS} {sys.version_info[:2]}"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script must explain itself on old Pythons
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    if STAMP.exists() and STAMP.read_text() == _wanted_stamp() and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"[run.py] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    print("[run.py] installing the project and its dependencies (once)", flush=True)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    for args in (["install", "--upgrade", "pip"], ["install", "-e", f".[{EXTRAS}]"]):
        done = subprocess.run([*pip, *args], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            sys.exit(f"[run.py] pip {' '.join(args)} failed (exit {done.returncode})")
    STAMP.write_text(_wanted_stamp())


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    what, rest = argv[0], argv[1:]
    ensure_venv()
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
