"""Stopping a run: SIGINT/SIGTERM for the whole process, a cancel token for one migration.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT
arrives. Inside a finaliser it is printed as "Exception ignored" and lost:
asyncio logs abandoned tasks from ``__del__``, and the QMP client (qemu.qmp's
legacy, synchronous API) runs an event loop on every call, so a Ctrl-C during
a boot check could vanish and the run carried on to "migrated". Its bottom
halves also catch ``BaseException`` and turn it into a disconnect, which a
watcher that expects QEMU to close the socket takes for a normal end.

So ``install()`` makes both signals record themselves and raise, and every
long wait calls ``check()``, which raises again if a signal came: nothing can
swallow it for good. Once a run's outcome is decided (``settle()``: its
"finished" is being recorded) a signal is still noted but no longer raises.

A library user runs migrations in threads, where signals do not reach, and
stops one of them with ``Migration.cancel()``: the migration's thread runs
under a ``CancelToken`` (a context variable, so each thread sees its own).
``check()`` raises ``Cancelled`` once it is set, again on every call, and
the runner kills the external program the thread waits for the moment the
token is set (``on_cancel``). This module is not a general signal framework.
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from .errors import Cancelled

_received: list[int] = []
_settled: list[bool] = []  # set by settle(): the run's outcome is decided, a signal changes nothing
# What the command says when a signal stops it (any time from its first import on).
STOPPED = "v2p: interrupted; run the same command again to resume"


def install() -> None:
    """SIGINT and SIGTERM both interrupt the run (``KeyboardInterrupt``); main thread only."""
    _settled.clear()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if not _settled:
        raise KeyboardInterrupt


def settle() -> None:
    """The run in the main thread has its outcome (a migration's "finished" is being recorded): a
    signal from now on is noted but raises nothing, so the command ends as it would have (exit 0),
    not as if it had been stopped. Only v2p's own handlers (``install``) heed this, and only for the
    main thread, where signals land: a migration in another thread leaves them as they are."""
    if threading.current_thread() is threading.main_thread():
        _settled.append(True)


def exit_status() -> int:
    """The command's exit status after an interruption: 128 + the signal, as a shell reports it."""
    return 128 + (received() or signal.SIGINT)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT or SIGTERM arrived (even if that one was swallowed),
    ``Cancelled`` if this thread's migration was cancelled."""
    if _received and not _settled:
        raise KeyboardInterrupt
    token = _token.get()
    if token is not None:
        token.check()


def received() -> int | None:
    """The last interrupting signal, if any."""
    return _received[-1] if _received else None


class CancelToken:
    """Set once, from any thread; read by the thread of the migration it belongs to."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._next = 0

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        """Set the token and run every ``on_cancel`` callback registered now (each at most once)."""
        with self._lock:
            self._event.set()
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for callback in callbacks:
            # A program that has just ended cannot be killed: nothing is left to stop.
            with contextlib.suppress(OSError):
                callback()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("the migration was cancelled", hint="run it again to resume")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking at once when cancelled; whether it was."""
        return self._event.wait(seconds)

    @contextlib.contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """Run ``callback`` if the token is set while in this block (at once if it already is)."""
        with self._lock:
            key = self._next
            self._next += 1
            if not self._event.is_set():
                self._callbacks[key] = callback
                registered = True
            else:
                registered = False
        if not registered:
            with contextlib.suppress(OSError):
                callback()
        try:
            yield
        finally:
            with self._lock:
                self._callbacks.pop(key, None)


_token: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar("v2p_cancel_token", default=None)


def current() -> CancelToken | None:
    """The cancel token of the migration running in this thread, if any."""
    return _token.get()


@contextlib.contextmanager
def cancelled_by(token: CancelToken) -> Iterator[CancelToken]:
    """Run the block under ``token``: ``check()`` and the runner's waits in this thread consult it."""
    reset = _token.set(token)
    try:
        yield token
    finally:
        _token.reset(reset)


@contextlib.contextmanager
def on_cancel(callback: Callable[[], None]) -> Iterator[None]:
    """``CancelToken.on_cancel`` of this thread's token; nothing when there is none."""
    token = _token.get()
    if token is None:
        yield
        return
    with token.on_cancel(callback):
        yield
