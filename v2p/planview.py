"""Showing a plan run: a live view on a terminal, plain lines elsewhere, the summary table, ``--json``.

``PlanView`` is the ``on_event`` handler ``run_plan`` calls. On a terminal it keeps one line per VM (stage,
percent, bytes, rate, ETA: ``row_line``) drawn by tqdm, which fits each to the terminal's width as it is
now, with warnings and each VM's outcome scrolling above them; anywhere else every event is a line prefixed
with the VM's name, as ``v2p migrate`` prints them, and each disk's progress a line every few seconds or
percent (``progress.Pacer``). This module only formats: running the plan is ``planrun``'s job.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .boot_outcomes import BOOT_SKIPPED, boot_words
from .eventlines import is_terminal, line_bar
from .events import PLAN_KINDS, Event
from .planrun import DRY_RUN, QUEUED, PlanReport, VMRun
from .progress import COPY, Clock, Pacer
from .targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP

GiB = 1 << 30
REDRAW = 0.25  # seconds between redraws of a VM's line (progress arrives far more often)


class PlanView:
    """Shows a plan's events on ``stream`` (a live view when it is a terminal, unless ``live=False``)."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.stream = stream or sys.stdout
        self.live = is_terminal(self.stream) if live is None else live
        self.clock = clock
        self.rows: dict[int, VMRun] = {}  # by id(): a VMRun is the same object for the whole run
        self.bars: dict[int, Any] = {}  # id(VMRun) -> its tqdm line
        self.drawn: dict[int, float] = {}  # id(VMRun) -> when its line was last drawn
        self.pacer = Pacer()

    def __call__(self, vm: VMRun, event: Event) -> None:
        self.rows.setdefault(id(vm), vm)
        line = self._line(vm, event)
        if not self.live:
            if line is not None:
                print(line, file=self.stream, flush=True)
            meter = vm.meter
            if event.kind == "progress" and meter is not None and self.pacer.due(meter, self.clock()):
                print(f"[{vm.name}] [{meter.stage}] {meter.words()}", file=self.stream, flush=True)
            return
        if line is not None and (event.kind == "warning" or event.kind == "vm-done" or _is_warning(event)):
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)  # above the VMs' lines, which tqdm draws again under it
        if event.kind != "progress" or self.clock() - self.drawn.get(id(vm), 0.0) >= REDRAW:
            self._draw(vm)

    @staticmethod
    def _line(vm: VMRun, event: Event) -> str | None:
        head = f"[{vm.name}]"
        if event.kind == "progress" or (event.kind, event.message) in (("vm-wait", QUEUED), ("vm-done", DRY_RUN)):
            return None
        if event.kind == "stage-start":
            return f"{head} [{event.stage}] {event.message}"
        if event.kind == "stage-skip":
            return f"{head} [{event.stage}] already {event.message}, skipped"
        if event.kind == "stage-done":
            return f"{head} [{event.stage}] done in {event.message}"
        if event.kind == "warning" or _is_warning(event):
            return f"{head} [{event.stage}] warning: {event.message}"
        if event.kind in PLAN_KINDS:
            vmid = f" VMID {vm.vmid}" if vm.vmid is not None else ""
            return f"{head}{vmid} {event.message}"
        return f"{head} [{event.stage}] {event.message}"

    def _draw(self, vm: VMRun) -> None:
        """(Re)draw ``vm``'s line: tqdm keeps one per VM, in the order they became known, trimmed to the
        terminal's width at each draw."""
        bar = self.bars.get(id(vm))
        width = max(len(row.name) for row in self.rows.values())
        if bar is None:
            bar = self.bars[id(vm)] = line_bar(file=self.stream, position=len(self.bars), bar_format="{desc}",
                                               dynamic_ncols=True, leave=True, mininterval=0)
        bar.set_description_str(row_line(vm, width), refresh=True)
        self.drawn[id(vm)] = self.clock()

    def draw(self) -> None:
        """Redraw every VM's line (live view only)."""
        if self.live:
            for vm in self.rows.values():
                self._draw(vm)

    def close(self) -> None:
        """Leave the last state of the live view on the screen, under it the cursor."""
        self.draw()
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def row_line(vm: VMRun, width: int = 20) -> str:
    """One VM in the live view: name, VMID, what it does and, while it moves bytes, how far, how fast and
    how long yet (``web01  502  convert:1: 57 % of 2.0 GiB, 40.1 MiB/s, ETA 0:00:23, 700 MiB written``).
    ``width``: the names' column."""
    vmid = str(vm.vmid) if vm.vmid is not None else "auto"
    head = f"{vm.name:<{width}} {vmid:>5}  "
    if vm.result == "running":
        meter = vm.meter
        doing = vm.stage or "starting"
        if meter is not None:
            doing += f"{' ' + meter.step if meter.step != COPY else ''}: {meter.brief()}"
        return head + doing
    if vm.result == "waiting" and vm.waiting_for:
        return head + f"waiting for {vm.waiting_for}"
    boot = f", boot {BOOT_SAID[vm.boot]}" if vm.boot in (BOOT_UP, BOOT_UNCONFIRMED, BOOT_FAILED) else ""
    return head + f"{vm.result}{boot}"


def summary(report: PlanReport) -> str:
    """The table at the end: VM, VMID, result, boot, seconds, GiB moved; the errors (each with its
    migration's log, if kept) and the boots not confirmed under it; then the counts, boots up / not
    confirmed / failed apart."""
    lines = [f"{'VM':<20} {'VMID':>9}  {'RESULT':<14} {'BOOT':<13} {'SECONDS':>8} {'GIB MOVED':>10}"]
    for vm in report.vms:
        vmid = str(vm.vmid) if vm.vmid is not None else "-"
        boot = BOOT_SAID.get(vm.boot, vm.boot or "-")
        lines.append(f"{vm.name:<20} {vmid:>9}  {vm.result:<14} {boot:<13} {vm.seconds:8.1f} {vm.moved / GiB:10.3f}")
    for vm in report.vms:
        if vm.error and vm.result != "interrupted":
            lines.append(f"{vm.name}: {vm.error}")
            if vm.log:
                lines.append(f"{vm.name}: the log of its migration: {vm.log}")
        elif vm.boot == BOOT_UNCONFIRMED:
            lines.append(f"{vm.name}: {boot_words(vm.boot, vm.boot_signal)}")
    done = sum(1 for vm in report.vms if vm.ok)
    counted = report.boots()
    boots = ", ".join(f"{count} {BOOT_SAID[outcome]}" for outcome, count in counted.items())
    lines.append(f"{done} of {len(report.vms)} VMs migrated" + (" or already done" if any(
        vm.result == "nothing to do" for vm in report.vms) else "") + (f"; boot: {boots}" if boots else ""))
    if counted.get(BOOT_UNCONFIRMED):
        lines.append(UNCONFIRMED_ADVICE)
    return "\n".join(lines)


# A boot outcome in the summary's column and in its counts: "not confirmed" is never shortened to "up".
BOOT_SAID = {BOOT_UP: "up", BOOT_UNCONFIRMED: "not confirmed", BOOT_FAILED: "failed", BOOT_SKIPPED: "not checked"}
UNCONFIRMED_ADVICE = ("boot not confirmed: the VM is migrated and kept, but v2p saw no sign that its OS runs; "
                      "start it and look at its console before relying on it")


def dry_run_text(report: PlanReport) -> str:
    """What each VM would do, as ``v2p migrate --dry-run`` prints it, under its name."""
    lines: list[str] = []
    for vm in report.vms:
        lines.append(f"[{vm.name}]")
        if vm.error:
            lines.append(f"  refused: {vm.error}")
            continue
        lines += [f"  {text}" for text in vm.about]  # Preview.lines(): the stages included
    return "\n".join(lines)


def _is_warning(event: Event) -> bool:
    """A preflight rule finding of warning severity (kind "finding"): shown like any warning."""
    return event.kind == "finding" and event.data.get("severity") == "warning"
