#!/usr/bin/env python3
"""Flood benchmark (the code is collector.tools.bench_flood; `--help` says what it runs)."""

import sys

from collector.tools.bench_flood import main

if __name__ == "__main__":
    sys.exit(main())
