"""Where each VM of a plan stands, read from its migration record without taking its lock.

Not for: running (``planrun``) or showing (``planview``) a plan.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import api, boot_outcomes
from .errors import StateError, V2PError
from .options import MigrationOptions
from .plan_checks import Targets, described
from .plan_model import PlanVM, VMStatus
from .state import MigrationState


def status_of(vm: PlanVM, targets: Targets) -> VMStatus:
    target = targets.get(vm.target)
    if isinstance(target, V2PError):
        return VMStatus(vm.name, vm.vmid if isinstance(vm.vmid, int) else None, "unknown", detail=f"target: {target}")
    vmid: int | None = vm.vmid if isinstance(vm.vmid, int) else None
    try:
        if vmid is None:
            options = MigrationOptions(**{"storage": target.default_storage(), **vm.options})
            vmid = api.earlier_migration(target, described(vm.source), options)
            if vmid is None:
                return VMStatus(vm.name, None, "not started", detail="vmid auto: no migration of this source yet")
        record = MigrationState(target.state_dir(), vmid)
        if not record.load():
            return VMStatus(vm.name, vmid, "running" if locked(record.directory, vmid) else "not started")
    except StateError as exc:
        return VMStatus(vm.name, vmid, "unreadable", detail=str(exc))
    except V2PError as exc:
        return VMStatus(vm.name, vmid, "unknown", detail=str(exc))
    data = record.data
    recorded = list(data["stages"])
    last = recorded[-1] if recorded else None
    source = data["request"].get("source")
    if source != described(vm.source):
        return VMStatus(vm.name, vmid, "other", last, f"VMID {vmid} holds the migration of {source}, not of "
                                                      "this VM's source")
    boot_record = data["stages"].get("boot")
    boot, signal = boot_outcomes.boot_outcome(boot_record.get("result") if isinstance(boot_record, dict) else None)
    if boot_record is None:
        boot = ""  # not that far yet
    if data["finished"]:
        seconds = sum(float(stage.get("seconds", 0)) for stage in data["stages"].values())
        return VMStatus(vm.name, vmid, "finished", last, f"at {data.get('finished_at', '?')} ({seconds:.1f} s of "
                        f"work); {boot_outcomes.boot_words(boot, signal)}", boot, signal)
    percent = copied_percent(data)
    if locked(record.directory, vmid):
        done = f"{len(recorded)} stage(s) done" + (f", last {last}" if last else "")
        if percent is not None:
            done = f"in {stopped_in(data)}; {done}"
        return VMStatus(vm.name, vmid, "running", last, done, boot, signal, percent)
    failed = data.get("failed")
    if isinstance(failed, dict) and failed.get("error") == "interrupted":  # Ctrl-C, SIGTERM: resumable
        return VMStatus(vm.name, vmid, "interrupted", last,
                        f"in {stopped_in(data, failed.get('stage'))}; rerun the plan to resume", boot, signal, percent)
    if isinstance(failed, dict):
        return VMStatus(vm.name, vmid, "failed", last,
                        f"in {stopped_in(data, failed.get('stage'))}: {failed.get('error')}", boot, signal, percent)
    return VMStatus(vm.name, vmid, "unfinished", last, f"{len(recorded)} stage(s) done; rerun the plan to resume",
                    boot, signal)


def copied_percent(data: dict[str, Any]) -> float | None:
    """How far the unfinished copy of a disk got, from a migration record's checkpoint
    (``data["progress"]``: its ``stage``, ``done`` and ``total`` bytes, written while a disk is copied
    in windows and dropped with that stage's record); None without one, or with one that does not
    add up."""
    progress = data.get("progress")
    if not isinstance(progress, dict) or progress.get("stage") in data.get("stages", {}):
        return None
    done, total = progress.get("done"), progress.get("total")
    if isinstance(done, bool) or isinstance(total, bool) or not isinstance(done, int) or \
            not isinstance(total, int) or total <= 0 or not 0 <= done <= total:
        return None
    return 100.0 * done / total


def stopped_in(data: dict[str, Any], stage: object = None) -> str:
    """Where a migration record's run stopped, in words: ``stage`` (the failed record's), or the stage
    of its copy checkpoint, with the checkpoint's percentage when it is that stage's: "convert (57 %)"."""
    progress = data.get("progress")
    at = progress.get("stage") if isinstance(progress, dict) else None
    percent = copied_percent(data)
    if stage is None:
        stage = at
    if percent is not None and stage == at:
        return f"{stage} ({percent:.0f} %)"
    return str(stage)


def locked(directory: Path, vmid: int) -> bool:
    """Whether a run holds VMID ``vmid``'s lock, read from /proc/locks (taking the lock, even for a
    moment, could make that run fail to start)."""
    try:
        info = (directory / f"{vmid}.lock").stat()
        held = Path("/proc/locks").read_text()
    except OSError:
        return False
    want = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any("FLOCK" in line and want in line.split() for line in held.splitlines())

