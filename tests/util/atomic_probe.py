"""Run by tests/util/test_atomic.py: start an atomic write, say so, then wait to be killed.

usage: python atomic_probe.py FINAL_PATH
"""

from __future__ import annotations

import sys
import time

from spread_dials.util.atomic import atomic_write

with atomic_write(sys.argv[1], "wb") as f:
    f.write(b"partial " * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)  # killed here
    f.write(b"end")
