"""A PVE task's log read while the task runs, and the progress lines of a disk import in it.

PVE's task log API (pve-manager ``PVE::API2::Tasks``, ``read_task_log``: ``GET
/nodes/{node}/tasks/{upid}/log`` with ``start``, the number of lines already read, and ``limit``)
answers ``[{"n": <line number from 1>, "t": <text>}, ...]``; a running task's log is read page by
page as it grows. A disk import (``import-from``) logs qemu-server's progress lines, turned here into
bytes done of the disk's size.

Not here: polling the task's status (``proxmox``), what the progress becomes (the pipeline's events).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# qemu-server PVE::QemuServer::QemuImage::convert runs ``qemu-img convert -p`` and, for each line of
# qemu-img's "    (12.34/100%)" (PVE::Cmd::run_command splits its output at \n, \r and backspaces),
# prints "transferred $transferred_h of $total_h ($percent%)": both sizes through
# PVE::Format::render_bytes($n, 1) ("4.0 GiB"), $percent as qemu-img printed it, $transferred
# int($size * $percent / 100) of the source's virtual size $size.
IMPORT_PROGRESS = re.compile(r"transferred (\d+(?:\.\d+)?) ([KMGTP]?i?B) of (\d+(?:\.\d+)?) ([KMGTP]?i?B) "
                             r"\((\d+(?:\.\d+)?)%\)")
_UNITS = {"B": 0, "KiB": 1, "MiB": 2, "GiB": 3, "TiB": 4, "PiB": 5}
PAGE = 500  # lines asked for at a time (read_task_log gives 50 unless ``limit`` says more)

# Bytes done, bytes in all, percent of one import, as its task log tells them.
ImportProgress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Transferred:
    """One progress line of a disk import: ``percent`` as qemu-img printed it, ``done`` and ``total``
    in bytes (from ``size``, the disk's size in bytes when the caller knows it, as PVE computes them;
    else from the line's rounded sizes)."""

    done: int
    total: int
    percent: float


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** _UNITS[unit])


def parse_import_line(line: str, size: int | None = None) -> Transferred | None:
    """A line of an import task's log as progress, None for any other line."""
    match = IMPORT_PROGRESS.fullmatch(line.strip())
    if match is None or match.group(2) not in _UNITS or match.group(4) not in _UNITS:
        return None
    percent = min(float(match.group(5)), 100.0)
    total = size if size else _bytes(match.group(3), match.group(4))
    return Transferred(int(total * percent / 100), total, percent)


class TaskLog:
    """The log of task ``upid`` read on from where the last read stopped: ``read(get)`` returns the new
    lines, ``get`` being the API call (path, start, limit) -> the answer's entries."""

    def __init__(self, path: str) -> None:
        self.path, self.seen = path, 0

    def read(self, get: Callable[[str, int, int], list[dict[str, Any]]]) -> list[str]:
        lines: list[str] = []
        while True:
            page = get(self.path, self.seen, PAGE)
            fresh = [entry for entry in page if int(entry.get("n", 0)) > self.seen]
            for entry in fresh:
                lines.append(str(entry.get("t", "")))
            if fresh:
                self.seen = max(int(entry.get("n", 0)) for entry in fresh)
            if len(page) < PAGE or not fresh:
                return lines


def import_follower(report: ImportProgress, size: int | None) -> Callable[[list[str]], None]:
    """What turns an import task's new log lines into ``report(done, total, percent)``, one call per
    progress line that moved on (PVE repeats a percentage qemu-img printed twice)."""
    last = -1.0

    def follow(lines: list[str]) -> None:
        nonlocal last
        for line in lines:
            step = parse_import_line(line, size)
            if step is not None and step.percent > last:
                last = step.percent
                report(step.done, step.total, step.percent)
    return follow
