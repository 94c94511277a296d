#!/usr/bin/env python3
"""Soak test (the code is collector.tools.soak; `--help` says what it runs)."""

import sys

from collector.tools.soak import main

if __name__ == "__main__":
    sys.exit(main())
