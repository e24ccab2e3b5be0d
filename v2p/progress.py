"""Reading progress events: per disk and step, how far, how many bytes really moved, how fast, how long yet.

A ``progress`` event says where a copy is in its disk (``data['bytes']`` of ``data['total']``, the virtual
size) and, from producers that count them, the bytes this run really wrote or sent (``data['moved']``): a
sparse disk's position runs far ahead of what is written, so a rate from the position is no rate at all.
``Meter`` keeps one (disk, step)'s numbers, ``Progress`` one migration's meters; the CLI's printer, the plan
view and the plan's ``VMRun`` read them. The clock is a parameter, so that a test says what time it is.

Not for: showing anything (``cli``, ``planview``), nor making events (the pipeline).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .events import Event

Clock = Callable[[], float]
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
# The rate is the bytes moved over about the last RATE_WINDOW seconds: long enough to smooth qemu-img's
# one-percent steps, short enough to show a --bwlimit change or a stall within seconds.
RATE_WINDOW = 5.0
RATE_MIN_SPAN = 0.5  # seconds of samples before a rate is said at all
# What each step does with the bytes it moves, as a line says it ("700 MiB written").
MOVED_WORDS = {"convert": "written", "upload": "sent", "fetch": "read", "import": "imported", "compare": "compared"}
# A plain progress line (no terminal) at least this often, in seconds and in percent of the disk.
PLAIN_EVERY_SECONDS = 10.0
PLAIN_EVERY_PERCENT = 10.0
COPY = "convert"  # the step of an event without one: a disk's copy onto the target


@dataclass
class Meter:
    """One disk's one step: position and total (bytes of the disk), bytes moved, rate and ETA."""

    stage: str
    step: str = COPY
    disk: int | None = None
    position: int = 0
    total: int = 0
    moved: int = 0
    percent: float = 0.0
    counts_moved: bool = False  # its producer says ``moved``; else ``moved`` is the position (an old producer)
    banked: int = 0  # moved by earlier starts of this copy in the same run (it restarted from zero)
    samples: deque[tuple[float, int, int]] = field(default_factory=deque, repr=False)  # (time, position, moved)

    def see(self, event: Event, now: float) -> None:
        data = event.data
        position = int(data.get("bytes", event.done or 0))
        total = int(data.get("total", event.total or 0))
        self.counts_moved = self.counts_moved or "moved" in data
        moved = int(data["moved"]) if "moved" in data else position
        if moved < self.moved:  # the copy started over: what it wrote before was moved all the same
            self.banked += self.moved
            self.samples.clear()
        self.stage, self.position, self.total, self.moved = event.stage, position, total, moved
        percent = data.get("percent")
        self.percent = float(percent) if isinstance(percent, int | float) else (
            100.0 * position / total if total else 0.0)
        self.samples.append((now, position, moved))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()  # keep one sample at least RATE_WINDOW old, none older

    def finish(self) -> None:
        """Its stage is done: at its end (an old producer's last event may say 99 %)."""
        if self.total:
            self.position, self.percent = self.total, 100.0
            if not self.counts_moved:
                self.moved = self.total
        self.samples.clear()

    @property
    def moved_in_run(self) -> int:
        return self.banked + self.moved

    @property
    def done(self) -> bool:
        return self.percent >= 100.0 or (self.total > 0 and self.position >= self.total)

    def _span(self) -> tuple[float, int, int] | None:
        if len(self.samples) < 2:
            return None
        (then, position0, moved0), (now, position1, moved1) = self.samples[0], self.samples[-1]
        span = now - then
        return (span, position1 - position0, moved1 - moved0) if span >= RATE_MIN_SPAN else None

    @property
    def rate(self) -> float | None:
        """Bytes moved per second over the last few seconds (None: too soon to say)."""
        span = self._span()
        return None if span is None else max(span[2], 0) / span[0]

    @property
    def eta(self) -> float | None:
        """Seconds until the position reaches the total at its recent pace (None: unknown)."""
        span = self._span()
        if self.done:
            return 0.0
        if span is None or not self.total or span[1] <= 0:
            return None
        return (self.total - self.position) * span[0] / span[1]

    def label(self) -> str:
        """``disk 0``, ``upload disk 1``, ``upload`` (the drivers ISO): what the meter measures."""
        what = f"disk {self.disk}" if self.disk is not None else ""
        return " ".join(part for part in (self.step if self.step != COPY else "", what) if part) or "copy"

    def where(self) -> str:
        """``57 % (1.1 of 2.0 GiB)``: the position in the disk."""
        if not self.total:
            return size(self.position)
        unit = unit_of(self.total)
        return f"{self.percent:.0f} % ({in_unit(self.position, unit)} of {in_unit(self.total, unit)} {unit[1]})"

    def pace(self) -> str:
        """``700 MiB written, 40.1 MiB/s, ETA 0:00:23``: the bytes moved, the rate and the time left."""
        parts = [f"{size(self.moved_in_run)} {MOVED_WORDS.get(self.step, 'moved')}"]
        rate, eta = self.rate, self.eta
        if rate is not None and not self.done:
            parts.append(f"{size(rate)}/s")
        if eta is not None and not self.done:
            parts.append(f"ETA {clock_time(eta)}")
        return ", ".join(parts)

    def brief(self) -> str:
        """``57 % of 2.0 GiB, 40.1 MiB/s, ETA 0:00:23, 700 MiB written``: a plan's line, the most telling first."""
        parts = [f"{self.percent:.0f} % of {size(self.total)}" if self.total else size(self.position)]
        rate, eta = self.rate, self.eta
        if rate is not None and not self.done:
            parts.append(f"{size(rate)}/s")
        if eta is not None and not self.done:
            parts.append(f"ETA {clock_time(eta)}")
        parts.append(f"{size(self.moved_in_run)} {MOVED_WORDS.get(self.step, 'moved')}")
        return ", ".join(parts)

    def words(self) -> str:
        """``disk 0: 57 % (1.1 of 2.0 GiB), 700 MiB written, 40.1 MiB/s, ETA 0:00:23``."""
        return f"{self.label()}: {self.where()}, {self.pace()}"


class Pacer:
    """When a plain progress line is due (output that is not a terminal: a log, ``| tee``, cron): every
    PLAIN_EVERY_SECONDS or every PLAIN_EVERY_PERCENT, whichever comes first, and once at 100 %."""

    def __init__(self) -> None:
        self.said: dict[int, tuple[float, float]] = {}  # id(meter) -> (when, percent) of its last line

    def due(self, meter: Meter, now: float) -> bool:
        when, percent = self.said.setdefault(id(meter), (now, 0.0))
        if meter.percent < percent:  # it started over
            when, percent = self.said[id(meter)] = (now, 0.0)
        if percent >= 100.0:
            return False
        if meter.done or now - when >= PLAIN_EVERY_SECONDS or \
                meter.percent // PLAIN_EVERY_PERCENT > percent // PLAIN_EVERY_PERCENT:
            self.said[id(meter)] = (now, 100.0 if meter.done else meter.percent)
            return True
        return False


class Progress:
    """The meters of one migration (or one VM of a plan), fed its events in order."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.meters: dict[tuple[int | None, str], Meter] = {}
        self.current: Meter | None = None  # the one the last progress event was about

    def see(self, event: Event) -> Meter | None:
        """Take in ``event``; the meter a progress event moved (None for any other event)."""
        if event.kind == "stage-done":
            for finished in self.meters.values():
                if finished.stage == event.stage and not finished.done:
                    finished.finish()
            return None
        if event.kind != "progress":
            return None
        disk = event.disk if event.disk is not None else event.data.get("disk")
        key = (disk if isinstance(disk, int) else None, event.step or COPY)
        meter = self.meters.get(key)
        if meter is None:
            meter = self.meters[key] = Meter(event.stage, key[1], key[0])
        meter.see(event, self.clock())
        self.current = meter
        return meter

    @property
    def moved(self) -> int:
        """Bytes the disks' copies wrote onto the target in this run (not uploads, downloads or imports:
        those move the same disk's bytes again on the way)."""
        return sum(meter.moved_in_run for (_disk, step), meter in self.meters.items() if step == COPY)


def unit_of(count: float) -> tuple[int, str]:
    for factor, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if count >= factor:
            return factor, name
    return 1, "B"


def in_unit(count: float, unit: tuple[int, str]) -> str:
    return f"{count:.0f}" if unit[0] == 1 else f"{count / unit[0]:.1f}"


def size(count: float) -> str:
    """``700 MiB``, ``1.1 GiB``, ``512 B``: a byte count as a person reads it (no decimal from 100 up)."""
    factor, name = unit_of(count)
    value = count / factor
    return f"{value:.0f} {name}" if factor == 1 or value >= 100 else f"{value:.1f} {name}"


def clock_time(seconds: float) -> str:
    """``0:00:23``: a duration as hours, minutes and seconds."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
