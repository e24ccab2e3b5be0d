"""Crash points for the test suite.

``V2P_TEST_HOLD_AFTER=<point>`` makes v2p stop dead (sleep until killed) when
it reaches ``<point>`` — a stage name after its record is written, or a step
of the driver dance (``dance:boot1-started``, ...) — so a test can SIGKILL it
at an exact place. Unset in normal use, where this does nothing.
"""

from __future__ import annotations

import os
import sys
import time

HOLD_ENV = "V2P_TEST_HOLD_AFTER"


def hold_point(name: str) -> None:
    if os.environ.get(HOLD_ENV) == name:
        print(f"v2p: holding after {name}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
