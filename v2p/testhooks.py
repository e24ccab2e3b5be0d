"""Hooks for the test suite, both unset in normal use, where they do nothing.

``V2P_TEST_HOLD_AFTER=<point>`` makes v2p stop dead (sleep until killed) when
it reaches ``<point>`` — a stage name after its record is written, a disk's
copy after the checkpoint of its Nth window (``convert:window:N``,
``convert:1:window:N``), or a step of the driver dance (``dance:boot1-started``,
...) — so a test can SIGKILL it at an exact place.

``V2P_TEST_SETTLE=<seconds>`` shortens the boot check's settle (``bootwatch.SETTLE``,
20 s: how long a guest must run without a reset or failure after its I/O sign)
for the suite's v2p processes, whose sample guests reset or fail within a few
seconds of their sign, if at all. Only shorter than the real value, never
longer; the boot engine's own tests (tests/test_boot_signs.py, test_boot.py's
in-process checks) run with the real one.
"""

from __future__ import annotations

import os
import sys
import time

HOLD_ENV = "V2P_TEST_HOLD_AFTER"
SETTLE_ENV = "V2P_TEST_SETTLE"


def hold_point(name: str) -> None:
    if os.environ.get(HOLD_ENV) == name:
        print(f"v2p: holding after {name}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def settle_seconds(real: float) -> float:
    """``real``, or the shorter settle ``V2P_TEST_SETTLE`` asks for (a number of seconds above 0)."""
    try:
        asked = float(os.environ.get(SETTLE_ENV, ""))
    except ValueError:
        return real
    return asked if 0 < asked < real else real
