"""SIGINT and SIGTERM as one interruption that a whole run sees.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT
arrives. Inside a finaliser it is printed as "Exception ignored" and lost:
asyncio logs abandoned tasks from ``__del__``, and the QMP client (qemu.qmp's
legacy, synchronous API) runs an event loop on every call, so a Ctrl-C during
a boot check could vanish and the run carried on to "migrated". Its bottom
halves also catch ``BaseException`` and turn it into a disconnect, which a
watcher that expects QEMU to close the socket takes for a normal end.

So ``install()`` makes both signals record themselves and raise, and every
long wait calls ``check()``, which raises again if a signal came: nothing can
swallow it for good. This module is not a general signal framework.
"""

from __future__ import annotations

import signal
from types import FrameType

_received: list[int] = []


def install() -> None:
    """SIGINT and SIGTERM both interrupt the run (``KeyboardInterrupt``); main thread only."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def check() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT or SIGTERM arrived (even if that one was swallowed)."""
    if _received:
        raise KeyboardInterrupt


def received() -> int | None:
    """The last interrupting signal, if any."""
    return _received[-1] if _received else None
