"""A migration's events as a person reads them: a line per event, and each disk's progress as a tqdm
bar per step on a terminal or, anywhere else, a plain line every PLAIN_EVERY_SECONDS or PLAIN_EVERY_PERCENT
(``progress.Pacer``); and the run's log file (``logfile``) fed the same plain lines.

``v2p migrate`` and ``v2p dance`` print with it; each child of a ``plan run`` writes its VM's log with it.
Not for: a plan's view of many VMs (``planview``), nor JSON (``cli``).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from .errors import V2PError
from .events import Event
from .logfile import RunLog
from .progress import Clock, Meter, Pacer, Progress


class EventPrinter:
    """Shows pipeline events as lines; progress as a tqdm bar per step when ``out`` is a terminal (``live``),
    else as a plain line every PLAIN_EVERY_SECONDS or PLAIN_EVERY_PERCENT of a disk (``progress.Pacer``)."""

    def __init__(self, out: TextIO | None = None, *, live: bool | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.bar: Any = None
        self.bar_meter: Meter | None = None
        self.out = out or sys.stdout  # not bound at import: sys.stdout may be replaced (_standard_streams)
        self.live = is_terminal(self.out) if live is None else live
        self.progress = Progress(clock)
        self.pacer = Pacer()

    def __call__(self, event: Event) -> None:
        meter = self.progress.see(event)
        if event.kind == "progress":
            if meter is not None:
                self._show(meter)
            return
        self.close_bar()
        if event.kind == "stage-start":
            self._say(f"[{event.stage}] {event.message}")
        elif event.kind == "stage-skip":
            self._say(f"[{event.stage}] already {event.message}, skipped")
        elif event.kind == "stage-done":
            self._say(f"[{event.stage}] done in {event.message}")
        elif event.kind == "warning" or event.kind == "finding" and event.data.get("severity") == "warning":
            self._say(f"[{event.stage}] warning: {event.message}")
        elif event.kind == "finding" and event.data.get("severity") == "error":
            return  # the run stops on it with its own error line
        else:
            self._say(f"[{event.stage}] {event.message}")

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _show(self, meter: Meter) -> None:
        if not self.live:
            if self.pacer.due(meter, self.progress.clock()):
                self._say(f"[{meter.stage}] {meter.words()}")
            return
        if self.bar is not None and self.bar_meter is not meter:  # a fetch's bar, then the copy's
            self.close_bar()
        if self.bar is None:
            self.bar = line_bar(total=meter.total or None, unit="B", unit_scale=True, unit_divisor=1024,
                                desc=f"[{meter.stage}] {meter.label()}", file=self.out, dynamic_ncols=True,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}")
            self.bar_meter = meter
        self.bar.set_postfix_str(meter.pace(), refresh=False)
        self.bar.update(meter.position - self.bar.n)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.bar_meter = None, None


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (a stream without a descriptor, or closed, is not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@functools.cache
def _row_class() -> Any:
    r"""tqdm, drawing (and clearing) a line as ``\r``, the text, erase to the end of the line, sized anew at
    every draw: tqdm's own padding with spaces to the last line's length would wrap a narrowed terminal's
    line (each wrap leaving a copy), its clearing pads to the length it last wrote itself (never, here),
    and a terminal that says it has no rows would get no line at all."""
    from tqdm import tqdm

    class Row(tqdm):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.dynamic_ncols = _screen_size  # read at every draw, as display() does
            self.sp = self._line  # tqdm's clear() (before tqdm.write prints above) erases the line too

        def _line(self, text: str) -> None:
            self.fp.write("\r" + text + "\x1b[K")

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            pos = abs(self.pos) if pos is None else pos
            self.ncols, self.nrows = _screen_size(self.fp)
            nrows = self.nrows
            if pos >= nrows:
                return False
            if pos == nrows - 1 and msg != "":
                msg = " ... (more hidden) ..."
            if pos:
                self.moveto(pos)
            self._line(self.__str__() if msg is None else msg)
            if pos:
                self.moveto(-pos)
            self.fp.flush()
            return True
    return Row


def _screen_size(stream: TextIO) -> tuple[int, int]:
    """The terminal's columns and rows now; 80x24 when it says none (a pseudo-terminal nobody sized)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        columns, rows = size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        columns, rows = 0, 0
    return columns or 80, rows or 24


def line_bar(**kwargs: Any) -> Any:
    """A tqdm bar (``kwargs`` as tqdm takes them) drawn as ``_row_class`` says; tqdm imported on first use."""
    return _row_class()(**kwargs)


# The stages that make nothing: a run refused there (a bad input, a rule) says so in one line and leaves
# no log file; from the first stage after them on, the run's log is kept.
MAKES_NOTHING = ("inspect", "preflight")


def logged(log: RunLog, warn: Callable[[str], None]) -> Callable[[Event], None]:
    """The log's event handler: every event as a plain line (progress every few seconds or percent);
    the file made when a stage after the preflight starts (``RunLog.keep``; ``warn`` says it if it cannot)."""
    printer = EventPrinter(log.stream, live=False)
    tried = False

    def handle(event: Event) -> None:
        nonlocal tried
        if event.vmid is not None:  # a migration's log is named after its VMID, the one it ends up with
            log.follow(str(event.vmid))
        if not tried and event.kind in ("stage-start", "stage-skip") and event.stage not in MAKES_NOTHING:
            tried = True
            kept(log, warn)
        printer(event)
    return handle


def kept(log: RunLog, warn: Callable[[str], None]) -> bool:
    """Make the log's file; said (``warn``), and the run goes on without it, when it cannot be made."""
    try:
        log.keep()
        return True
    except (OSError, V2PError) as exc:
        warn(f"v2p: warning: no log file for this run: {exc}")
        return False
