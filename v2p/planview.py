"""Showing a plan run: a live view on a terminal, plain lines elsewhere, the summary table, ``--json``.

``PlanView`` is the ``on_event`` handler ``run_plan`` calls. On a terminal it keeps one line per VM
(stage, bytes written of the disk's total, rate) redrawn in place, with warnings and each VM's outcome
scrolling above it; anywhere else every event is a line prefixed with the VM's name, as ``v2p migrate``
prints them. This module only formats: running the plan is ``planrun``'s job.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .boot_outcomes import BOOT_SKIPPED, boot_words
from .events import PLAN_KINDS, Event
from .planrun import DRY_RUN, QUEUED, PlanReport, VMRun
from .targets.base import BOOT_FAILED, BOOT_UNCONFIRMED, BOOT_UP

MiB = 1 << 20
GiB = 1 << 30
REDRAW = 0.25  # seconds between redraws of the live view (progress arrives far more often)


class PlanView:
    """Shows a plan's events on ``stream`` (a live view when it is a terminal, unless ``live=False``)."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.rows: dict[int, VMRun] = {}  # by id(): a VMRun is the same object for the whole run
        self.drawn = 0  # lines of the live view on the screen now
        self.last_draw = 0.0

    def __call__(self, vm: VMRun, event: Event) -> None:
        self.rows.setdefault(id(vm), vm)
        line = self._line(vm, event)
        if not self.live:
            if line is not None:
                print(line, file=self.stream, flush=True)
            return
        if line is not None and (event.kind == "warning" or event.kind == "vm-done" or _is_warning(event)):
            self._clear()
            print(line, file=self.stream)
        if event.kind != "progress" or time.monotonic() - self.last_draw >= REDRAW:
            self.draw()

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

    def draw(self) -> None:
        """Redraw the live view in place: cursor up over the old one, each line cleared and rewritten."""
        if not self.live:
            return
        self._clear()
        lines = [row_line(vm) for vm in self.rows.values()]
        for line in lines:
            self.stream.write(f"\x1b[2K{line}\n")
        self.stream.flush()
        self.drawn, self.last_draw = len(lines), time.monotonic()

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def close(self) -> None:
        """Leave the last state of the live view on the screen."""
        self.draw()


def row_line(vm: VMRun) -> str:
    """One VM in the live view: name, VMID, what it does, bytes of the disk being written, rate."""
    vmid = str(vm.vmid) if vm.vmid is not None else "auto"
    if vm.result == "running":
        doing = vm.stage or "starting"
        size = f"{vm.done_bytes / MiB:8.1f} of {vm.total_bytes / MiB:.1f} MiB" if vm.total_bytes else ""
        rate = f"{vm.rate / MiB:6.1f} MiB/s" if vm.rate else ""
        return f"{vm.name:<20} {vmid:>9}  {doing:<12} {size:<24} {rate}".rstrip()
    if vm.result == "waiting" and vm.waiting_for:
        return f"{vm.name:<20} {vmid:>9}  waiting for {vm.waiting_for}"
    boot = f", boot {BOOT_SAID[vm.boot]}" if vm.boot in (BOOT_UP, BOOT_UNCONFIRMED, BOOT_FAILED) else ""
    return f"{vm.name:<20} {vmid:>9}  {vm.result}{boot}"


def summary(report: PlanReport) -> str:
    """The table at the end: VM, VMID, result, boot, seconds, GiB moved; the errors and the boots not
    confirmed under it; then the counts, boots up / not confirmed / failed apart."""
    lines = [f"{'VM':<20} {'VMID':>9}  {'RESULT':<14} {'BOOT':<13} {'SECONDS':>8} {'GIB MOVED':>10}"]
    for vm in report.vms:
        vmid = str(vm.vmid) if vm.vmid is not None else "-"
        boot = BOOT_SAID.get(vm.boot, vm.boot or "-")
        lines.append(f"{vm.name:<20} {vmid:>9}  {vm.result:<14} {boot:<13} {vm.seconds:8.1f} {vm.moved / GiB:10.3f}")
    for vm in report.vms:
        if vm.error and vm.result != "interrupted":
            lines.append(f"{vm.name}: {vm.error}")
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
